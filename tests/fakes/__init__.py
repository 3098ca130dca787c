"""Faithful fakes of hardware interfaces that cannot exist on CI machines (NVML, RAPL sysfs)."""
