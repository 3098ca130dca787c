# ruff: noqa: N802  (function names mirror the real NVML bindings)
"""A fake ``pynvml`` (nvidia-ml-py) module with the slice of the API the energy meters use.

It mirrors the real bindings' behaviour that matters to callers: functions raise ``NVMLError`` whose
``value`` is an ``NVML_ERROR_*`` code and whose class is the matching ``NVMLError_<Name>`` subclass
(``NVMLError(code)`` constructs the subclass, as in nvidia-ml-py); every device call before
``nvmlInit`` raises ``NVMLError_Uninitialized``; energy is an integer in millijoules and power an
integer in milliwatts. Tests drive the hardware by mutating :class:`FakeGpu` fields.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

NVML_SUCCESS = 0
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_LIBRARY_NOT_FOUND = 12

_ERROR_NAMES = {
    NVML_ERROR_UNINITIALIZED: ("Uninitialized", "Uninitialized"),
    NVML_ERROR_INVALID_ARGUMENT: ("InvalidArgument", "Invalid Argument"),
    NVML_ERROR_NOT_SUPPORTED: ("NotSupported", "Not Supported"),
    NVML_ERROR_LIBRARY_NOT_FOUND: ("LibraryNotFound", "NVML Shared Library Not Found"),
}


@dataclass
class FakeGpu:
    """One simulated board: set ``energy_mj`` / ``power_mw`` to what the hardware would report."""

    energy_mj: int = 0
    power_mw: int = 0
    supports_energy_counter: bool = True
    name: str = "NVIDIA Fake H100"
    uuid: str = "GPU-00000000-0000-0000-0000-000000000000"


def build_fake_pynvml(gpus: list[FakeGpu], *, library_present: bool = True) -> types.ModuleType:
    """A fresh module object behaving like ``import pynvml`` on a machine with ``gpus``.

    ``library_present=False`` reproduces a machine without the NVIDIA driver: ``nvmlInit`` raises
    ``NVMLError_LibraryNotFound``. The module records ``calls`` (function name -> count).
    """
    module = types.ModuleType("pynvml")
    state = {"initialised": 0}
    calls: dict[str, int] = {}

    class NVMLError(Exception):
        """Base of every NVML error; ``NVMLError(code)`` returns the code's subclass."""

        _subclasses: dict[int, type] = {}

        def __new__(cls, value: int):
            if cls is NVMLError and value in NVMLError._subclasses:
                cls = NVMLError._subclasses[value]
            return Exception.__new__(cls)

        def __init__(self, value: int) -> None:
            super().__init__(value)
            self.value = value

        def __str__(self) -> str:
            return _ERROR_NAMES.get(self.value, ("Unknown", f"Unknown Error {self.value}"))[1]

    module.NVMLError = NVMLError
    for code, (suffix, _) in _ERROR_NAMES.items():
        subclass = type(f"NVMLError_{suffix}", (NVMLError,), {})
        NVMLError._subclasses[code] = subclass
        setattr(module, f"NVMLError_{suffix}", subclass)
    for name, value in list(globals().items()):
        if name.startswith("NVML_"):
            setattr(module, name, value)

    def record(name: str) -> None:
        calls[name] = calls.get(name, 0) + 1

    def require_init() -> None:
        if not state["initialised"]:
            raise NVMLError(NVML_ERROR_UNINITIALIZED)

    def device(handle: object) -> FakeGpu:
        require_init()
        if not isinstance(handle, FakeGpu):
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        return handle

    def nvmlInit() -> None:
        record("nvmlInit")
        if not library_present:
            raise NVMLError(NVML_ERROR_LIBRARY_NOT_FOUND)
        state["initialised"] += 1

    def nvmlShutdown() -> None:
        record("nvmlShutdown")
        require_init()
        state["initialised"] -= 1

    def nvmlDeviceGetCount() -> int:
        record("nvmlDeviceGetCount")
        require_init()
        return len(gpus)

    def nvmlDeviceGetHandleByIndex(index: int) -> FakeGpu:
        record("nvmlDeviceGetHandleByIndex")
        require_init()
        if not 0 <= index < len(gpus):
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        return gpus[index]

    def nvmlDeviceGetTotalEnergyConsumption(handle: object) -> int:
        record("nvmlDeviceGetTotalEnergyConsumption")
        gpu = device(handle)
        if not gpu.supports_energy_counter:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return int(gpu.energy_mj)

    def nvmlDeviceGetPowerUsage(handle: object) -> int:
        record("nvmlDeviceGetPowerUsage")
        return int(device(handle).power_mw)

    def nvmlDeviceGetName(handle: object) -> str:
        record("nvmlDeviceGetName")
        return device(handle).name

    def nvmlDeviceGetUUID(handle: object) -> str:
        record("nvmlDeviceGetUUID")
        return device(handle).uuid

    for function in (
        nvmlInit,
        nvmlShutdown,
        nvmlDeviceGetCount,
        nvmlDeviceGetHandleByIndex,
        nvmlDeviceGetTotalEnergyConsumption,
        nvmlDeviceGetPowerUsage,
        nvmlDeviceGetName,
        nvmlDeviceGetUUID,
    ):
        setattr(module, function.__name__, function)
    module.calls = calls
    module.is_initialised = lambda: state["initialised"] > 0
    return module
