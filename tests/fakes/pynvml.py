# ruff: noqa: N802  (function names mirror the real NVML bindings)
"""A fake ``pynvml`` (nvidia-ml-py) module with the slice of the API the energy meters use.

It mirrors the real bindings' behaviour that matters to callers: functions raise ``NVMLError`` whose
``value`` is an ``NVML_ERROR_*`` code and whose class is the matching ``NVMLError_<Name>`` subclass
(``NVMLError(code)`` constructs the subclass, as in nvidia-ml-py); every device call before
``nvmlInit`` raises ``NVMLError_Uninitialized``; energy is an integer in millijoules and power an
integer in milliwatts. Tests drive the hardware by mutating :class:`FakeGpu` fields.

Boards are enumerated in the order given (NVML's PCI bus order); each has a UUID (``fake_uuid(index)``
unless set), found by ``nvmlDeviceGetHandleByUUID`` (whole UUIDs only, ``NVMLError_NotFound`` otherwise,
like the real library). ``mig_instances`` adds MIG instances to a board: reachable by their ``MIG-`` UUID
only, with ``nvmlDeviceIsMigDeviceHandle`` true and no energy counter or power reading of their own.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

NVML_SUCCESS = 0
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_GPU_IS_LOST = 15

_ERROR_NAMES = {
    NVML_ERROR_UNINITIALIZED: ("Uninitialized", "Uninitialized"),
    NVML_ERROR_INVALID_ARGUMENT: ("InvalidArgument", "Invalid Argument"),
    NVML_ERROR_NOT_SUPPORTED: ("NotSupported", "Not Supported"),
    NVML_ERROR_NOT_FOUND: ("NotFound", "Not Found"),
    NVML_ERROR_LIBRARY_NOT_FOUND: ("LibraryNotFound", "NVML Shared Library Not Found"),
    NVML_ERROR_GPU_IS_LOST: ("GpuIsLost", "GPU is lost"),
}


def fake_uuid(index: int) -> str:
    """The UUID of the fake board at NVML index ``index`` when the test sets none."""
    return f"GPU-{index:08x}-1111-2222-3333-444455556666"


@dataclass
class FakeGpu:
    """One simulated board: set ``energy_mj`` / ``power_mw`` to what the hardware would report."""

    energy_mj: int = 0
    power_mw: int = 0
    supports_energy_counter: bool = True
    name: str = "NVIDIA Fake H100"
    uuid: str = ""  # "" = fake_uuid(its index)
    #: MIG instance UUIDs (``MIG-...``) carved out of this board.
    mig_instances: tuple[str, ...] = ()
    #: An NVML error code every energy/power read raises (e.g. NVML_ERROR_GPU_IS_LOST), or None.
    fail_with: int | None = None


@dataclass
class _MigDevice:
    """A MIG instance handle: it has a UUID and a parent, and no energy counter or power of its own."""

    uuid: str
    parent: FakeGpu


def build_fake_pynvml(gpus: list[FakeGpu], *, library_present: bool = True) -> types.ModuleType:
    """A fresh module object behaving like ``import pynvml`` on a machine with ``gpus``.

    ``library_present=False`` reproduces a machine without the NVIDIA driver: ``nvmlInit`` raises
    ``NVMLError_LibraryNotFound``. The module records ``calls`` (function name -> count).
    """
    module = types.ModuleType("pynvml")
    state = {"initialised": 0}
    calls: dict[str, int] = {}
    for index, gpu in enumerate(gpus):
        if not gpu.uuid:
            gpu.uuid = fake_uuid(index)
    mig_devices = [_MigDevice(uuid, gpu) for gpu in gpus for uuid in gpu.mig_instances]

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
        if isinstance(handle, _MigDevice):
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        if not isinstance(handle, FakeGpu):
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        return handle

    def reading(handle: object) -> FakeGpu:
        gpu = device(handle)
        if gpu.fail_with is not None:
            raise NVMLError(gpu.fail_with)
        return gpu

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

    def nvmlDeviceGetHandleByUUID(uuid: str | bytes) -> FakeGpu | _MigDevice:
        record("nvmlDeviceGetHandleByUUID")
        require_init()
        wanted = uuid.decode() if isinstance(uuid, bytes) else uuid
        for handle in [*gpus, *mig_devices]:
            if handle.uuid == wanted:
                return handle
        raise NVMLError(NVML_ERROR_NOT_FOUND)

    def nvmlDeviceIsMigDeviceHandle(handle: object) -> int:
        record("nvmlDeviceIsMigDeviceHandle")
        require_init()
        return int(isinstance(handle, _MigDevice))

    def nvmlDeviceGetTotalEnergyConsumption(handle: object) -> int:
        record("nvmlDeviceGetTotalEnergyConsumption")
        gpu = reading(handle)
        if not gpu.supports_energy_counter:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return int(gpu.energy_mj)

    def nvmlDeviceGetPowerUsage(handle: object) -> int:
        record("nvmlDeviceGetPowerUsage")
        return int(reading(handle).power_mw)

    def nvmlDeviceGetName(handle: object) -> str:
        record("nvmlDeviceGetName")
        require_init()
        return handle.parent.name if isinstance(handle, _MigDevice) else device(handle).name

    def nvmlDeviceGetUUID(handle: object) -> str:
        record("nvmlDeviceGetUUID")
        require_init()
        return handle.uuid if isinstance(handle, _MigDevice) else device(handle).uuid

    for function in (
        nvmlInit,
        nvmlShutdown,
        nvmlDeviceGetCount,
        nvmlDeviceGetHandleByIndex,
        nvmlDeviceGetHandleByUUID,
        nvmlDeviceIsMigDeviceHandle,
        nvmlDeviceGetTotalEnergyConsumption,
        nvmlDeviceGetPowerUsage,
        nvmlDeviceGetName,
        nvmlDeviceGetUUID,
    ):
        setattr(module, function.__name__, function)
    module.calls = calls
    module.is_initialised = lambda: state["initialised"] > 0
    return module
