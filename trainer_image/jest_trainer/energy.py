"""Energy meters for training workers: NVML, RAPL and an honest modelled fallback.

Every figure this module produces carries a ``method`` and a ``source`` so that nobody mistakes a model
for a measurement (DESIGN.md §5):

* ``measured``  — a hardware energy counter: NVML ``nvmlDeviceGetTotalEnergyConsumption`` (mJ, source
  ``nvml``) or RAPL ``/sys/class/powercap/intel-rapl:*/energy_uj`` (µJ, source ``rapl:node``; the whole
  node's CPU packages, other pods' work included, so its series carry ``scope="node"``; wraps at
  ``max_energy_range_uj``). Every other channel is ``scope="device"``: one physical device of this worker.
* ``integrated`` — NVML ``nvmlDeviceGetPowerUsage`` (mW) sampled and integrated over time (trapezoid),
  used per GPU where the energy counter answers NOT_SUPPORTED (pre-Volta boards).
* ``modelled`` — ``EnergyConfig.modelledWattsPerDevice`` x time, optionally scaled by a utilisation
  callable (TPU and CPU-only machines; source ``config:modelledWattsPerDevice``).

Design: one :class:`DeviceChannel` per physical device (or RAPL package zone), each driven by its own
sampler thread that sleeps on ``Event.wait`` so ``stop()`` returns promptly. The training step never
calls into this module on its hot path and nothing here synchronises an accelerator; readers
(:meth:`EnergyMeter.total_joules`, the Prometheus collector) only take a per-channel lock. The cost of
sampling is itself measured (:meth:`EnergyMeter.sampling_seconds_total`).

GPU identity: NVML enumerates boards in PCI bus order, while the CUDA device ``cuda:i`` a process uses is
the i-th entry of ``CUDA_VISIBLE_DEVICES`` (integers, ``GPU-<uuid>`` or ``MIG-<uuid>``; unset = every board)
in CUDA's order (``FASTEST_FIRST`` unless ``CUDA_DEVICE_ORDER=PCI_BUS_ID``). :func:`resolve_nvml_device`
maps one to the other: UUID entries by ``nvmlDeviceGetHandleByUUID``, integers directly under
``PCI_BUS_ID``, otherwise through the UUID torch reports for the device; every NVML channel records the
board's UUID (``DeviceChannel.uuid``). A device it cannot identify for certain (an entry NVML does not
know, a MIG instance, whose counters are the whole GPU's) is modelled, with the reason logged.

Energy counts from sampler start; ``initial_joules`` carries the total restored from a checkpoint so a
restarted worker continues its job total. Each rank meters its own devices, so the job total is the sum
over ranks of :meth:`EnergyMeter.total_joules` — as long as the restored ``initial_joules`` of all ranks
sum to the previous job total (e.g. every rank restores its own figure, or rank 0 restores the job total
and the others 0), never when every rank restores the whole job total.

This module imports neither torch nor pynvml at import time: pynvml (package ``nvidia-ml-py``) is loaded
only when a CUDA meter is created, and can be injected (the tests use a faithful fake module); torch only
when a CUDA device's UUID must be asked of it (:func:`torch_cuda_uuid`, injectable too).
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from jest_trainer.config import EnergyConfig

LOG = logging.getLogger(__name__)

MEASURED = "measured"
INTEGRATED = "integrated"
MODELLED = "modelled"
METHODS: tuple[str, ...] = (MEASURED, INTEGRATED, MODELLED)  # most to least trustworthy

SOURCE_NVML = "nvml"
#: RAPL counts the node's CPU packages, whatever runs on them: the source says so wherever it is shown.
SOURCE_RAPL = "rapl:node"
SCOPE_DEVICE = "device"
SCOPE_NODE = "node"
SOURCE_MODELLED = "config:modelledWattsPerDevice"

DEFAULT_POWERCAP_ROOT = Path("/sys/class/powercap")
DEFAULT_INTERVAL_SECONDS = 1.0

_GPU_KINDS = frozenset({"cuda", "gpu"})
_KNOWN_KINDS = frozenset({"cuda", "gpu", "cpu", "tpu", "xla"})
_RAPL_TOP_ZONE = re.compile(r"^intel-rapl:\d+$")  # package zones only: subzones overlap their parent


class EnergyBackendUnavailableError(RuntimeError):
    """The configured ``energy.backend`` cannot run on this machine (the message names the field)."""


@dataclass(frozen=True)
class EnergySample:
    """Energy of one physical device since its sampler started, and its latest power."""

    device: str
    joules: float
    watts: float
    method: str
    source: str
    scope: str = SCOPE_DEVICE
    #: The physical board's NVML UUID (``GPU-...``) where one was identified, else "".
    uuid: str = ""


class DeviceChannel:
    """Reads one physical device and accumulates its energy; subclasses define how one reading works.

    ``prime`` takes the baseline reading, ``advance`` a later one; both receive a monotonic timestamp so
    that the arithmetic is testable with synthetic times. Thread-safe: the sampler thread writes, the
    scrape thread reads, both under ``lock``.
    """

    method: str = MODELLED
    source: str = SOURCE_MODELLED
    scope: str = SCOPE_DEVICE

    def __init__(self, device: str, uuid: str = "") -> None:
        self.device = device
        self.uuid = uuid
        self.lock = threading.Lock()
        self.joules = 0.0
        self.watts = 0.0
        self.errors = 0
        self.readings = 0
        self.sampling_seconds = 0.0
        self._last_time: float | None = None

    def _read_baseline(self, now: float) -> None:
        """Read the device once to set the baseline (no energy accrues)."""

    def _read_delta(self, now: float, elapsed: float) -> tuple[float, float]:
        """Read the device and return (joules since the previous reading, current watts)."""
        raise NotImplementedError

    def prime(self, now: float) -> None:
        """Take the baseline reading at time ``now`` (seconds, monotonic)."""
        started = time.perf_counter()
        try:
            self._read_baseline(now)
            with self.lock:
                self._last_time = now
        finally:
            self.sampling_seconds += time.perf_counter() - started

    def advance(self, now: float) -> None:
        """Read the device at ``now`` and add the energy since the previous reading.

        A failing read is counted in ``errors`` and logged once; the previous totals are kept (a missed
        sample loses no energy for counter-based channels, and integrates over the gap for the others).
        """
        if self._last_time is None:
            self.prime(now)
            return
        started = time.perf_counter()
        try:
            elapsed = max(0.0, now - self._last_time)
            try:
                joules, watts = self._read_delta(now, elapsed)
            except Exception as exc:
                self.errors += 1
                if self.errors == 1:
                    LOG.warning("energy sampler %s/%s failed: %s", self.source, self.device, exc)
                return
            with self.lock:
                self.joules += joules
                self.watts = watts
                self._last_time = now
                self.readings += 1
        finally:
            self.sampling_seconds += time.perf_counter() - started

    def sample(self) -> EnergySample:
        """A consistent snapshot of this device's totals."""
        with self.lock:
            return EnergySample(self.device, self.joules, self.watts, self.method, self.source, self.scope, self.uuid)


class NvmlEnergyChannel(DeviceChannel):
    """NVML total-energy counter (mJ since driver load) → ``measured``; watts = Δenergy / Δt."""

    method = MEASURED
    source = SOURCE_NVML

    def __init__(self, device: str, nvml: ModuleType, handle: Any, uuid: str = "") -> None:
        super().__init__(device, uuid)
        self._nvml = nvml
        self._handle = handle
        self._last_millijoules = 0

    def _read_baseline(self, now: float) -> None:
        self._last_millijoules = int(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle))

    def _read_delta(self, now: float, elapsed: float) -> tuple[float, float]:
        current = int(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle))
        delta_mj = current - self._last_millijoules
        self._last_millijoules = current
        if delta_mj < 0:  # the driver was reloaded: the counter restarted from zero
            self.errors += 1
            delta_mj = current
        joules = delta_mj / 1000.0
        return joules, (joules / elapsed if elapsed > 0 else self.watts)


class NvmlPowerChannel(DeviceChannel):
    """NVML power (mW) integrated with the trapezoid rule → ``integrated`` (no energy counter)."""

    method = INTEGRATED
    source = SOURCE_NVML

    def __init__(self, device: str, nvml: ModuleType, handle: Any, uuid: str = "") -> None:
        super().__init__(device, uuid)
        self._nvml = nvml
        self._handle = handle

    def _read_watts(self) -> float:
        return float(self._nvml.nvmlDeviceGetPowerUsage(self._handle)) / 1000.0

    def _read_baseline(self, now: float) -> None:
        watts = self._read_watts()
        with self.lock:
            self.watts = watts

    def _read_delta(self, now: float, elapsed: float) -> tuple[float, float]:
        watts = self._read_watts()
        return (watts + self.watts) / 2.0 * elapsed, watts


class RaplChannel(DeviceChannel):
    """One RAPL package zone (``energy_uj``, µJ) → ``measured``, node/socket scope, with wraparound.

    The counter wraps to zero after ``max_energy_range_uj``; a reading lower than the previous one is
    taken as exactly one wrap (sampling every second is far faster than the minutes a wrap takes).
    """

    method = MEASURED
    source = SOURCE_RAPL
    scope = SCOPE_NODE

    def __init__(self, device: str, zone_dir: Path) -> None:
        super().__init__(device)
        self._energy_file = zone_dir / "energy_uj"
        self._max_range_uj = int((zone_dir / "max_energy_range_uj").read_text().strip())
        self._last_microjoules = 0

    def _read_counter(self) -> int:
        return int(self._energy_file.read_text().strip())

    def _read_baseline(self, now: float) -> None:
        self._last_microjoules = self._read_counter()

    def _read_delta(self, now: float, elapsed: float) -> tuple[float, float]:
        current = self._read_counter()
        delta_uj = current - self._last_microjoules
        if delta_uj < 0:
            delta_uj += self._max_range_uj
        self._last_microjoules = current
        joules = delta_uj / 1e6
        return joules, (joules / elapsed if elapsed > 0 else self.watts)


class ModelledChannel(DeviceChannel):
    """Configured watts x time, scaled by ``utilisation()`` (clamped to [0, 1]) when given → ``modelled``."""

    method = MODELLED
    source = SOURCE_MODELLED

    def __init__(self, device: str, watts: float, utilisation: Callable[[], float] | None = None) -> None:
        super().__init__(device)
        self._rated_watts = watts
        self._utilisation = utilisation

    def _current_watts(self) -> float:
        if self._utilisation is None:
            return self._rated_watts
        return self._rated_watts * min(1.0, max(0.0, float(self._utilisation())))

    def _read_baseline(self, now: float) -> None:
        watts = self._current_watts()
        with self.lock:
            self.watts = watts

    def _read_delta(self, now: float, elapsed: float) -> tuple[float, float]:
        watts = self._current_watts()
        return (watts + self.watts) / 2.0 * elapsed, watts


class EnergyMeter:
    """The energy of this worker's devices: one sampler thread per channel, read at any time.

    ``method`` is the least trustworthy method among the channels (measured < integrated < modelled), so a
    job is never reported as measured when one of its devices is only integrated; ``source`` names the
    backend. ``budget_joules`` is the job's configured budget (exported by the metrics, not enforced here).
    """

    def __init__(
        self,
        channels: list[DeviceChannel],
        *,
        method: str,
        source: str,
        initial_joules: float = 0.0,
        interval_seconds: float = DEFAULT_INTERVAL_SECONDS,
        budget_joules: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_stop: Callable[[], None] | None = None,
    ) -> None:
        if interval_seconds <= 0:
            raise ValueError(f"interval_seconds must be > 0, got {interval_seconds}")
        if initial_joules < 0:
            raise ValueError(f"initial_joules must be >= 0, got {initial_joules}")
        self.channels = channels
        self.method = method
        self.source = source
        self.initial_joules = float(initial_joules)
        self.interval_seconds = float(interval_seconds)
        self.budget_joules = budget_joules
        self._clock = clock
        self._on_stop = on_stop
        self._stop_event = threading.Event()
        self._threads: list[threading.Thread] = []

    @property
    def running(self) -> bool:
        """Whether the sampler threads are alive."""
        return any(thread.is_alive() for thread in self._threads)

    def start(self) -> None:
        """Take each device's baseline and start one daemon sampler thread per channel (idempotent)."""
        if self._threads:
            return
        self._stop_event.clear()
        for channel in self.channels:
            channel.prime(self._clock())
            thread = threading.Thread(
                target=self._sample_loop, args=(channel,), name=f"energy-{channel.device}", daemon=True
            )
            self._threads.append(thread)
            thread.start()

    def _sample_loop(self, channel: DeviceChannel) -> None:
        while not self._stop_event.wait(self.interval_seconds):
            channel.advance(self._clock())

    def stop(self) -> None:
        """Stop the threads promptly and take one final reading so the totals cover the whole run."""
        self._stop_event.set()
        for thread in self._threads:
            thread.join(timeout=max(5.0, 2 * self.interval_seconds))
        if self._threads:
            for channel in self.channels:
                channel.advance(self._clock())
        self._threads = []
        if self._on_stop is not None:
            self._on_stop()
            self._on_stop = None

    def total_joules(self) -> float:
        """Energy of all this meter's devices since start, plus ``initial_joules`` from a checkpoint."""
        return self.initial_joules + sum(channel.sample().joules for channel in self.channels)

    def total_watts(self) -> float:
        """Sum of the devices' latest power readings."""
        return sum(channel.sample().watts for channel in self.channels)

    def samples(self) -> list[EnergySample]:
        """Per-device energy since sampler start (without ``initial_joules``) and latest power."""
        return [channel.sample() for channel in self.channels]

    def sampling_seconds_total(self) -> float:
        """Wall time the sampler threads spent reading devices (the meter's own overhead)."""
        return sum(channel.sampling_seconds for channel in self.channels)

    def readings_total(self) -> int:
        """Successful device readings after the baselines (for per-reading cost accounting)."""
        return sum(channel.readings for channel in self.channels)

    def errors_total(self) -> int:
        """Failed device readings so far (a counter reset or an exception in a read)."""
        return sum(channel.errors for channel in self.channels)


def weakest_method(methods: list[str]) -> str:
    """The least trustworthy of ``methods`` (``modelled`` when there are none)."""
    if not methods:
        return MODELLED
    return max(methods, key=METHODS.index)


def rapl_zones(powercap_root: Path = DEFAULT_POWERCAP_ROOT) -> list[Path]:
    """Top-level RAPL zones (packages) whose ``energy_uj`` this process can read; [] where there are none.

    Subzones (``intel-rapl:0:0`` core, dram, ...) are excluded because they overlap their package.
    """
    if not powercap_root.is_dir():
        return []
    zones = []
    for zone in sorted(powercap_root.iterdir()):
        if not _RAPL_TOP_ZONE.match(zone.name):
            continue
        try:
            int((zone / "energy_uj").read_text().strip())
            int((zone / "max_energy_range_uj").read_text().strip())
        except (OSError, ValueError):
            continue
        zones.append(zone)
    return zones


def _rapl_zone_label(zone: Path) -> str:
    """``rapl:<name>`` from the zone's ``name`` file (e.g. ``rapl:package-0``), else its directory name."""
    try:
        name = (zone / "name").read_text().strip()
    except OSError:
        name = ""
    return f"rapl:{name or zone.name}"


def load_nvml(nvml: ModuleType | None = None) -> tuple[ModuleType | None, str]:
    """Import (unless injected) and initialise pynvml; returns (module, "") or (None, why not)."""
    if nvml is None:
        try:
            import pynvml as nvml  # package nvidia-ml-py
        except ImportError as exc:
            return None, f"pynvml is not installed ({exc})"
    try:
        nvml.nvmlInit()
    except Exception as exc:
        return None, f"nvmlInit failed ({exc})"
    return nvml, ""


def _nvml_is_not_supported(nvml: ModuleType, exc: BaseException) -> bool:
    not_supported = getattr(nvml, "NVML_ERROR_NOT_SUPPORTED", 3)
    return isinstance(exc, nvml.NVMLError) and getattr(exc, "value", None) == not_supported


class DeviceIdentityError(RuntimeError):
    """The NVML board behind a CUDA device cannot be identified for certain (the message says why)."""


#: ``CUDA_VISIBLE_DEVICES`` entries CUDA accepts: an index, or a (prefix of a) ``GPU-``/``MIG-`` UUID.
_VISIBLE_ENTRY = re.compile(r"^(\d+|(?i:gpu|mig)-[0-9A-Za-z/-]+)$")


def visible_devices(env: Mapping[str, str]) -> list[str] | None:
    """``CUDA_VISIBLE_DEVICES`` as CUDA reads it: its entries up to the first invalid one; None when unset.

    CUDA stops at the first entry it cannot parse (``0,2,-1,1`` shows devices 0 and 2), and an empty or
    wholly invalid value hides every device.
    """
    raw = env.get("CUDA_VISIBLE_DEVICES")
    if raw is None:
        return None
    entries: list[str] = []
    for part in raw.split(","):
        entry = part.strip()
        if not _VISIBLE_ENTRY.match(entry):
            break
        entries.append(entry)
    return entries


def torch_cuda_uuid(index: int) -> str | None:
    """The UUID torch reports for ``cuda:<index>`` (``torch.cuda.get_device_properties(i).uuid``), else None.

    Imports torch lazily; None without CUDA, on a torch without the property, or on any error (the caller
    then identifies the board another way or models it).
    """
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    except Exception as exc:
        LOG.debug("torch cannot report the UUID of cuda:%d: %s", index, exc)
        return None
    return str(uuid) if uuid is not None else None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _nvml_uuid(nvml: ModuleType, handle: Any) -> str:
    return _text(nvml.nvmlDeviceGetUUID(handle))


def _handle_by_uuid(nvml: ModuleType, uuid: str) -> Any:
    """The handle of the board (or MIG instance) ``uuid`` names, whole or as a unique prefix like CUDA."""
    try:
        return nvml.nvmlDeviceGetHandleByUUID(uuid)
    except Exception as exc:
        if not isinstance(exc, nvml.NVMLError):
            raise
    matches = []
    for index in range(int(nvml.nvmlDeviceGetCount())):
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        if _nvml_uuid(nvml, handle).lower().startswith(uuid.lower()):
            matches.append(handle)
    if len(matches) != 1:
        found = "no board" if not matches else f"{len(matches)} boards"
        raise DeviceIdentityError(f"{found} of this node has the UUID {uuid!r}")
    return matches[0]


def _handle_by_torch_uuid(nvml: ModuleType, uuid: str) -> Any:
    """The handle for a UUID as torch prints it (no ``GPU-``/``MIG-`` prefix, or with one)."""
    if uuid[:4].lower() in ("gpu-", "mig-"):
        return _handle_by_uuid(nvml, uuid)
    for prefix in ("GPU-", "MIG-"):  # torch prints the bare UUID; a MIG instance's is found (and refused) too
        try:
            return _handle_by_uuid(nvml, prefix + uuid)
        except DeviceIdentityError:
            continue
    raise DeviceIdentityError(f"torch reports the UUID {uuid} for this device, which no NVML board of this node has")


def _is_mig(nvml: ModuleType, handle: Any) -> bool:
    probe = getattr(nvml, "nvmlDeviceIsMigDeviceHandle", None)
    if probe is None:
        return False
    try:
        return bool(probe(handle))
    except Exception:
        return False


def resolve_nvml_device(
    nvml: ModuleType,
    cuda_index: int,
    *,
    env: Mapping[str, str],
    cuda_uuid: Callable[[int], str | None] | None = torch_cuda_uuid,
) -> tuple[Any, str, str]:
    """The NVML handle, UUID and how it was found, of the board behind CUDA device ``cuda:<cuda_index>``.

    ``cuda_index`` counts the devices this process sees (``torch.device("cuda", i)``). Its entry of
    ``CUDA_VISIBLE_DEVICES`` (``env``; unset: the index itself) decides:

    * a ``GPU-`` UUID (or unique prefix): ``nvmlDeviceGetHandleByUUID``;
    * a ``MIG-`` identifier: refused (a MIG instance has no counter of its own: NVML reports the parent's);
    * an integer with ``CUDA_DEVICE_ORDER=PCI_BUS_ID``: NVML's index (both enumerate by PCI bus id);
    * an integer in CUDA's default ``FASTEST_FIRST`` order: the UUID ``cuda_uuid`` (torch) reports for the
      device, looked up in NVML; without one, NVML's index where every board is the same model (the
      order only differs between boards of different speed), else nothing certain.

    Raises :class:`DeviceIdentityError` saying why when the board cannot be identified for certain.
    """
    entries = visible_devices(env)
    if entries is None:
        entry = str(cuda_index)
    elif cuda_index < len(entries):
        entry = entries[cuda_index]
    else:
        raise DeviceIdentityError(
            f"cuda:{cuda_index} is not among CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES', '')!r} "
            f"({len(entries)} visible)"
        )
    lowered = entry.lower()
    if lowered.startswith("mig-"):
        raise DeviceIdentityError(
            f"cuda:{cuda_index} is the MIG instance {entry}: NVML counts the whole GPU, shared with other instances"
        )
    if lowered.startswith("gpu-"):
        handle, how = _handle_by_uuid(nvml, entry), "CUDA_VISIBLE_DEVICES UUID"
    elif env.get("CUDA_DEVICE_ORDER", "").strip().upper() == "PCI_BUS_ID":
        handle, how = _handle_by_index(nvml, int(entry)), "PCI bus order"
    else:
        uuid = cuda_uuid(cuda_index) if cuda_uuid is not None else None
        if uuid:
            handle, how = _handle_by_torch_uuid(nvml, uuid), "torch device UUID"
        elif _identical_boards(nvml):
            # FASTEST_FIRST ranks boards by a speed estimate: identical boards keep their PCI order
            handle, how = _handle_by_index(nvml, int(entry)), "identical boards, CUDA order taken as PCI order"
        else:
            raise DeviceIdentityError(
                f"cuda:{cuda_index} (CUDA_VISIBLE_DEVICES entry {entry}) is numbered in CUDA's FASTEST_FIRST order, "
                "which on this node of different boards need not be NVML's PCI order, and torch reported no UUID "
                "for it; set CUDA_DEVICE_ORDER=PCI_BUS_ID or list GPU UUIDs in CUDA_VISIBLE_DEVICES"
            )
    if _is_mig(nvml, handle):
        raise DeviceIdentityError(
            f"cuda:{cuda_index} is a MIG instance: NVML counts the whole GPU, shared with other instances"
        )
    return handle, _nvml_uuid(nvml, handle), how


def _identical_boards(nvml: ModuleType) -> bool:
    """Whether every NVML board of this node is the same model (one board counts as identical)."""
    try:
        names = {_text(nvml.nvmlDeviceGetName(nvml.nvmlDeviceGetHandleByIndex(index)))
                 for index in range(int(nvml.nvmlDeviceGetCount()))}
    except Exception as exc:
        LOG.debug("cannot read the NVML board names: %s", exc)
        return False
    return len(names) <= 1


def _handle_by_index(nvml: ModuleType, index: int) -> Any:
    try:
        return nvml.nvmlDeviceGetHandleByIndex(index)
    except Exception as exc:
        if not isinstance(exc, nvml.NVMLError):
            raise
        count = int(nvml.nvmlDeviceGetCount())
        raise DeviceIdentityError(f"NVML has no board {index} (it sees {count}): {exc}") from exc


def _nvml_channel(nvml: ModuleType, label: str, handle: Any, uuid: str) -> DeviceChannel:
    """The energy counter where the board has one, else its power integrated over time."""
    try:
        nvml.nvmlDeviceGetTotalEnergyConsumption(handle)
    except Exception as exc:
        if not _nvml_is_not_supported(nvml, exc):
            raise
        return NvmlPowerChannel(label, nvml, handle, uuid)
    return NvmlEnergyChannel(label, nvml, handle, uuid)


def _nvml_channels(
    nvml: ModuleType,
    device_indices: list[int],
    *,
    env: Mapping[str, str],
    cuda_uuid: Callable[[int], str | None] | None,
) -> tuple[list[DeviceChannel], dict[int, str]]:
    """One NVML channel per identified GPU; the devices that could not be identified, with the reason."""
    channels: list[DeviceChannel] = []
    unidentified: dict[int, str] = {}
    seen: dict[str, int] = {}
    for index in device_indices:
        label = f"cuda:{index}"
        try:
            handle, uuid, how = resolve_nvml_device(nvml, index, env=env, cuda_uuid=cuda_uuid)
        except (DeviceIdentityError, nvml.NVMLError) as exc:
            unidentified[index] = str(exc) if isinstance(exc, DeviceIdentityError) else f"NVML error: {exc}"
            continue
        if uuid in seen:  # two CUDA devices of this process on one board: meter it once
            LOG.info("energy: %s is NVML board %s, already metered as cuda:%d", label, uuid, seen[uuid])
            continue
        seen[uuid] = index
        LOG.info("energy: %s is NVML board %s (%s)", label, uuid, how)
        channels.append(_nvml_channel(nvml, label, handle, uuid))
    return channels, unidentified


def _shutdown_nvml(nvml: ModuleType) -> Callable[[], None]:
    def shutdown() -> None:
        try:
            nvml.nvmlShutdown()
        except Exception as exc:
            LOG.debug("nvmlShutdown failed: %s", exc)

    return shutdown


def create_meter(
    config: EnergyConfig,
    *,
    device_kind: str,
    device_indices: list[int],
    initial_joules: float = 0.0,
    utilisation: Callable[[], float] | None = None,
    interval_seconds: float = DEFAULT_INTERVAL_SECONDS,
    nvml: ModuleType | None = None,
    powercap_root: Path = DEFAULT_POWERCAP_ROOT,
    env: Mapping[str, str] | None = None,
    cuda_uuid: Callable[[int], str | None] | None = torch_cuda_uuid,
    owns_node: bool | None = None,
) -> EnergyMeter:
    """Choose the best energy backend for ``device_kind`` (or the one ``config.backend`` forces).

    ``device_kind`` is the torch device type of this worker (``cuda``, ``cpu``, ``xla``/``tpu``) and
    ``device_indices`` the devices this process owns (one meter per device across the job, or energy is
    counted twice): for CUDA the indices torch uses (``cuda:<i>``), which :func:`resolve_nvml_device` maps
    to NVML boards through ``env`` (default ``os.environ``: ``CUDA_VISIBLE_DEVICES``,
    ``CUDA_DEVICE_ORDER``) and ``cuda_uuid`` (default: torch's device UUID); a device it cannot identify
    is modelled, with the reason logged (``nvml`` forced: :class:`EnergyBackendUnavailableError`). RAPL
    is node scope: only the process that ``owns_node`` meters it (the job's lowest rank on that node, which
    the caller learns from its peers: see ``telemetry.owns_node_energy``); ``None`` means the process whose
    ``device_indices`` contain 0, i.e. one per pod.
    ``auto``: NVML for CUDA when it initialises, RAPL for CPU where readable, otherwise ``modelled``;
    TPUs are always modelled (no public power counter). Forcing ``nvml`` or ``rapl`` where unavailable
    raises :class:`EnergyBackendUnavailableError` naming ``energy.backend``. ``nvml`` and
    ``powercap_root`` exist for injection (tests, unusual sysfs mounts). The meter is not started.
    """
    if device_kind not in _KNOWN_KINDS:
        raise ValueError(f"device_kind must be one of {sorted(_KNOWN_KINDS)}, got {device_kind!r}")
    backend = config.backend
    common: dict[str, Any] = {
        "initial_joules": initial_joules,
        "interval_seconds": interval_seconds,
        "budget_joules": config.budget_joules,
    }

    if backend == "nvml" and device_kind not in _GPU_KINDS:
        raise EnergyBackendUnavailableError(
            f"energy.backend: 'nvml' needs CUDA devices, this worker runs on {device_kind}"
        )
    if backend in ("nvml", "auto") and device_kind in _GPU_KINDS:
        module, why = load_nvml(nvml)
        if module is not None:
            channels, unidentified = _nvml_channels(
                module, device_indices, env=os.environ if env is None else env, cuda_uuid=cuda_uuid
            )
            reasons = "; ".join(unidentified.values())
            if unidentified and backend == "nvml":
                _shutdown_nvml(module)()
                raise EnergyBackendUnavailableError(f"energy.backend: 'nvml' cannot meter this worker's GPU: {reasons}")
            for index, reason in unidentified.items():
                LOG.warning("energy: cuda:%d is modelled (energy.modelledWattsPerDevice), not measured: %s",
                            index, reason)
            if channels or not unidentified:
                channels += [
                    ModelledChannel(f"cuda:{index}", config.modelled_watts_per_device, utilisation)
                    for index in unidentified
                ]
                return EnergyMeter(
                    channels,
                    method=weakest_method([channel.method for channel in channels]) if channels else MEASURED,
                    source="+".join(sorted({channel.source for channel in channels})) or SOURCE_NVML,
                    on_stop=_shutdown_nvml(module),
                    **common,
                )
            _shutdown_nvml(module)()  # no board identified: the whole meter is modelled below
        else:
            if backend == "nvml":
                raise EnergyBackendUnavailableError(f"energy.backend: 'nvml' is unavailable: {why}")
            LOG.info("NVML unavailable (%s); GPU energy will be modelled", why)

    if backend == "rapl" or (backend == "auto" and device_kind == "cpu"):
        zones = rapl_zones(powercap_root)
        if zones:
            # RAPL zones are node-wide: only one process of the node meters them, so the others report 0 J
            # instead of counting the same packages again.
            if owns_node is None:
                owns_node = 0 in device_indices
            channels = [RaplChannel(_rapl_zone_label(zone), zone) for zone in zones] if owns_node else []
            return EnergyMeter(channels, method=MEASURED, source=SOURCE_RAPL, **common)
        if backend == "rapl":
            raise EnergyBackendUnavailableError(
                f"energy.backend: 'rapl' is unavailable: no readable intel-rapl zone under {powercap_root}"
            )

    kind_label = "tpu" if device_kind in ("tpu", "xla") else ("cuda" if device_kind in _GPU_KINDS else "cpu")
    channels = [
        ModelledChannel(f"{kind_label}:{index}", config.modelled_watts_per_device, utilisation)
        for index in device_indices
    ]
    return EnergyMeter(channels, method=MODELLED, source=SOURCE_MODELLED, **common)
