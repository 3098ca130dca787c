"""A fake ``/sys/class/powercap`` tree with Intel RAPL zones, laid out as the kernel does.

Per zone directory ``intel-rapl:<socket>`` (package) and subzones ``intel-rapl:<socket>:<n>`` (core,
uncore, dram — they overlap the package): files ``name``, ``energy_uj`` (µJ, wraps to 0 after
``max_energy_range_uj``), ``max_energy_range_uj`` and ``enabled``. Tests advance the counters with
:func:`set_energy_uj`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class FakeRaplZone:
    """One package zone and its subzones' names."""

    socket: int
    energy_uj: int = 0
    max_energy_range_uj: int = 262_143_328_850
    subzones: list[str] = field(default_factory=lambda: ["core", "dram"])


def zone_dir(root: Path, socket: int) -> Path:
    """The directory of package zone ``socket`` under ``root``."""
    return root / f"intel-rapl:{socket}"


def build_powercap_tree(root: Path, zones: list[FakeRaplZone]) -> Path:
    """Create the tree under ``root`` (the stand-in for /sys/class/powercap) and return ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "intel-rapl").mkdir(exist_ok=True)  # the control type directory, not a zone
    (root / "intel-rapl" / "enabled").write_text("1\n")
    for zone in zones:
        package = zone_dir(root, zone.socket)
        _write_zone(package, f"package-{zone.socket}", zone.energy_uj, zone.max_energy_range_uj)
        for index, name in enumerate(zone.subzones):
            _write_zone(root / f"intel-rapl:{zone.socket}:{index}", name, 0, zone.max_energy_range_uj)
    return root


def _write_zone(directory: Path, name: str, energy_uj: int, max_range_uj: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "name").write_text(f"{name}\n")
    (directory / "energy_uj").write_text(f"{energy_uj}\n")
    (directory / "max_energy_range_uj").write_text(f"{max_range_uj}\n")
    (directory / "enabled").write_text("1\n")


def set_energy_uj(root: Path, socket: int, value: int) -> None:
    """Set the package counter of ``socket`` to ``value`` µJ (the test applies any wraparound itself)."""
    (zone_dir(root, socket) / "energy_uj").write_text(f"{value}\n")
