"""What the machine has: GPUs (through NVML), RAM, CPU cores, and the memory bandwidths speed estimates rest on.

Everything here returns data; nothing prints or exits. NVML is reached only through :class:`NvmlApi`, a Protocol
holding exactly the ``pynvml`` calls used, so tests (and ``--gpu`` what-ifs) can stand a recorded snapshot
(:class:`SnapshotNvml`) in for the real library. A missing library, a missing driver or any NVML error degrades to
"no GPUs" plus a note; an optional query that fails (bus width, PCIe link, ...) degrades to ``None`` or to the
catalog value, never to a crash.

GPU numbering: :attr:`Gpu.index` is NVML's index (PCI bus order). llama.cpp's ``CUDAn`` is the same GPU only when
``CUDA_DEVICE_ORDER=PCI_BUS_ID`` and ``CUDA_VISIBLE_DEVICES`` is unset; :func:`detect_hardware` notes when that
may not hold.
"""

from __future__ import annotations

import json
import os
import platform
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple, Protocol, TypeVar, cast

import psutil
import pynvml
import yaml

from tuner.errors import TunerError
from tuner.estimate import MemoryEstimate, ServerFlags, estimate_memory
from tuner.layout import ModelLayout
from tuner.paths import CATALOG_ENV, catalog_dir, load_yaml
from tuner.units import GiB, MiB, fmt_bytes, parse_size_bytes

GB = 1000**3
"""Decimal gigabyte: memory bandwidths are quoted in GB/s (10^9 bytes per second)."""

NVML_CLOCK_MEM = 2
"""``nvmlClockType_t`` value of ``NVML_CLOCK_MEM`` (part of NVML's stable ABI)."""

DESKTOP_RAM_BANDWIDTH_BYTES_S = 50 * GB
"""Assumed when nothing is measured on a desktop-class CPU: dual-channel DDR4-3200 peaks at 51.2 GB/s and
delivers ~40-45 GB/s; dual-channel DDR5-5600 peaks at 89.6 GB/s and delivers ~60-70 GB/s. 50 GB/s is about right
for the first and errs low for the second, so CPU-side speed estimates err slow, never fast."""

MANY_CORE_RAM_BANDWIDTH_BYTES_S = 100 * GB
"""Assumed for more than :data:`MANY_CORE_THRESHOLD` physical cores: such CPUs (Threadripper, Xeon, EPYC) sit on
platforms with four or more memory channels; 100 GB/s is what four channels of DDR4 deliver, low for servers."""

MANY_CORE_THRESHOLD = 16

GENERIC_GPU_BANDWIDTH_BYTES_S = 300 * GB
"""Assumed for a GPU whose bandwidth is neither reported nor in the catalog: below every card in the catalog
except the RTX 4060 Ti (288 GB/s), so GPU speed estimates err slow."""

_CATALOG_FILE = "gpus.yaml"
_MAX_GPU_COUNT = 16


# --------------------------------------------------------------------------------------------------- data model


@dataclass(frozen=True)
class Gpu:
    index: int
    """NVML's index (PCI bus order); see the module docstring for how it relates to llama.cpp's numbering."""
    name: str
    """As NVML says it, e.g. ``NVIDIA GeForce RTX 4090``."""
    vram_total_bytes: int
    vram_free_bytes: int
    vram_used_bytes: int
    mem_bandwidth_bytes_s: int
    """bus_width_bits / 8 × max_mem_clock_hz × 2 (DDR) for detected cards; the catalog value for catalog cards."""
    pcie_gen: int | None
    pcie_width: int | None
    compute_capability: tuple[int, int] | None
    driver_version: str | None = None
    source: str = "nvml"
    """``nvml`` (detected), ``catalog`` (named with --gpu) or ``manual`` (made up from --vram)."""

    @property
    def llama_name(self) -> str:
        """How llama.cpp names the device (``--device``, ``--tensor-split`` order)."""
        return f"CUDA{self.index}"


@dataclass(frozen=True)
class Hardware:
    gpus: tuple[Gpu, ...]
    ram_total_bytes: int
    ram_available_bytes: int
    cpu_physical_cores: int
    cpu_logical_cores: int
    cpu_model: str
    ram_bandwidth_bytes_s: int
    """:func:`default_ram_bandwidth_bytes_s` unless a caller measured it (:func:`measure_ram_bandwidth_bytes_s`)."""
    notes: tuple[str, ...] = ()
    """One line each, for the user: what could not be read, what was assumed instead."""

    @property
    def cpu_only(self) -> bool:
        return not self.gpus


class HostInfo(NamedTuple):
    ram_total_bytes: int
    ram_available_bytes: int
    cpu_physical_cores: int
    cpu_logical_cores: int
    cpu_model: str


@dataclass(frozen=True)
class CatalogGpu:
    key: str
    name: str
    vram_bytes: int
    mem_bandwidth_bytes_s: int
    pcie_gen: int | None
    pcie_width: int | None
    compute_capability: tuple[int, int] | None
    source_note: str
    aliases: tuple[str, ...] = ()
    nvml_names: tuple[str, ...] = ()
    fp16_tflops: float | None = None  # dense FP16 tensor throughput (prompt-processing roofline)

    def to_gpu(self, index: int = 0) -> Gpu:
        """The card as a planner sees it: nothing else on it, so all its memory is free."""
        return Gpu(
            index=index,
            name=self.name,
            vram_total_bytes=self.vram_bytes,
            vram_free_bytes=self.vram_bytes,
            vram_used_bytes=0,
            mem_bandwidth_bytes_s=self.mem_bandwidth_bytes_s,
            pcie_gen=self.pcie_gen,
            pcie_width=self.pcie_width,
            compute_capability=self.compute_capability,
            source="catalog",
        )


# ------------------------------------------------------------------------------------------------- NVML access


class NvmlMemoryInfo(Protocol):
    @property
    def total(self) -> int: ...
    @property
    def free(self) -> int: ...
    @property
    def used(self) -> int: ...


class NvmlProcessInfo(Protocol):
    @property
    def pid(self) -> int: ...
    @property
    def usedGpuMemory(self) -> int | None: ...


class NvmlApi(Protocol):
    """The part of ``pynvml`` this module calls; the ``pynvml`` module itself satisfies it."""

    def nvmlInit(self) -> None: ...
    def nvmlShutdown(self) -> None: ...
    def nvmlSystemGetDriverVersion(self) -> str | bytes: ...
    def nvmlDeviceGetCount(self) -> int: ...
    def nvmlDeviceGetHandleByIndex(self, index: int, /) -> Any: ...
    def nvmlDeviceGetName(self, handle: Any, /) -> str | bytes: ...
    def nvmlDeviceGetMemoryInfo(self, handle: Any, /) -> NvmlMemoryInfo: ...
    def nvmlDeviceGetMemoryBusWidth(self, handle: Any, /) -> int: ...
    def nvmlDeviceGetMaxClockInfo(self, handle: Any, clock_type: int, /) -> int: ...
    def nvmlDeviceGetMaxPcieLinkGeneration(self, handle: Any, /) -> int: ...
    def nvmlDeviceGetCurrPcieLinkGeneration(self, handle: Any, /) -> int: ...
    def nvmlDeviceGetMaxPcieLinkWidth(self, handle: Any, /) -> int: ...
    def nvmlDeviceGetCudaComputeCapability(self, handle: Any, /) -> tuple[int, int]: ...
    def nvmlDeviceGetComputeRunningProcesses(self, handle: Any, /) -> Sequence[NvmlProcessInfo]: ...


# AttributeError: a pynvml binding too old to have the function. OSError: the library failed to load oddly.
_NVML_ERRORS: tuple[type[BaseException], ...] = (pynvml.NVMLError, AttributeError, OSError)

_T = TypeVar("_T")


def _default_nvml(nvml: NvmlApi | None) -> NvmlApi:
    return cast(NvmlApi, pynvml) if nvml is None else nvml


@contextmanager
def _nvml_open(nvml: NvmlApi | None) -> Iterator[NvmlApi]:
    """``nvmlInit`` ... ``nvmlShutdown``; NVML counts inits, so a caller that keeps NVML open makes this cheap."""
    api = _default_nvml(nvml)
    api.nvmlInit()
    try:
        yield api
    finally:
        with suppress(*_NVML_ERRORS):
            api.nvmlShutdown()


def _text(value: str | bytes) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _optional(call: Callable[[], _T]) -> _T | None:
    try:
        return call()
    except _NVML_ERRORS:
        return None


def _positive_int(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value if value > 0 else None


def nvml_bandwidth_bytes_s(bus_width_bits: int, max_mem_clock_mhz: int) -> int:
    """Peak memory bandwidth from what NVML reports: bytes per transfer × clock × 2 (double data rate).

    RTX 4090: 384 bits, 10501 MHz → 1008 GB/s. H100 SXM: 5120 bits, 2619 MHz → 3.35 TB/s.
    """
    return bus_width_bits // 8 * max_mem_clock_mhz * 1_000_000 * 2


def read_gpus(nvml: NvmlApi | None = None) -> tuple[tuple[Gpu, ...], str | None]:
    """The GPUs NVML sees, and a note (``None`` when there is nothing to say). No NVML → ``((), note)``."""
    gpus, notes = _read_gpus(nvml)
    return gpus, "; ".join(notes) or None


def _read_gpus(nvml: NvmlApi | None) -> tuple[tuple[Gpu, ...], tuple[str, ...]]:
    try:
        with _nvml_open(nvml) as api:
            driver_version = _optional(lambda: _text(api.nvmlSystemGetDriverVersion()))
            count = api.nvmlDeviceGetCount()
            gpus: list[Gpu] = []
            notes: list[str] = []
            for index in range(count):
                try:
                    gpu, note = _read_gpu(api, index, driver_version)
                except _NVML_ERRORS as error:
                    notes.append(f"GPU {index}: NVML could not read it ({error}); left out")
                    continue
                gpus.append(gpu)
                if note:
                    notes.append(note)
    except _NVML_ERRORS as error:
        return (), (f"NVML not available: {str(error) or type(error).__name__}; planning for CPU only",)
    if not gpus and not notes:
        notes.append("NVML found no GPUs; planning for CPU only")
    return tuple(gpus), tuple(notes)


def _read_gpu(api: NvmlApi, index: int, driver_version: str | None) -> tuple[Gpu, str | None]:
    handle = api.nvmlDeviceGetHandleByIndex(index)
    name = _text(api.nvmlDeviceGetName(handle))
    memory = api.nvmlDeviceGetMemoryInfo(handle)
    bus_width_bits = _positive_int(_optional(lambda: api.nvmlDeviceGetMemoryBusWidth(handle)))
    max_mem_clock_mhz = _positive_int(_optional(lambda: api.nvmlDeviceGetMaxClockInfo(handle, NVML_CLOCK_MEM)))
    # Max: what device and slot can do (the current link drops to gen 1 when idle); current as the last resort.
    pcie_gen = _positive_int(_optional(lambda: api.nvmlDeviceGetMaxPcieLinkGeneration(handle))) or _positive_int(
        _optional(lambda: api.nvmlDeviceGetCurrPcieLinkGeneration(handle))
    )
    pcie_width = _positive_int(_optional(lambda: api.nvmlDeviceGetMaxPcieLinkWidth(handle)))
    capability = _optional(lambda: api.nvmlDeviceGetCudaComputeCapability(handle))
    compute_capability = (int(capability[0]), int(capability[1])) if capability else None

    note = None
    if bus_width_bits and max_mem_clock_mhz:
        bandwidth_bytes_s = nvml_bandwidth_bytes_s(bus_width_bits, max_mem_clock_mhz)
    else:
        bandwidth_bytes_s, note = _fallback_bandwidth(index, name)
    gpu = Gpu(
        index=index,
        name=name,
        vram_total_bytes=int(memory.total),
        vram_free_bytes=int(memory.free),
        vram_used_bytes=int(memory.used),
        mem_bandwidth_bytes_s=bandwidth_bytes_s,
        pcie_gen=pcie_gen,
        pcie_width=pcie_width,
        compute_capability=compute_capability,
        driver_version=driver_version,
        source="nvml",
    )
    return gpu, note


def _fallback_bandwidth(index: int, name: str) -> tuple[int, str]:
    missing = f"GPU {index} ({name}): NVML reports no memory bus width or clock"
    try:
        entry = catalog_entry_for_name(name, load_gpu_catalog())
    except TunerError:
        entry = None
    if entry is not None:
        gb_s = entry.mem_bandwidth_bytes_s / GB
        return entry.mem_bandwidth_bytes_s, f"{missing}; bandwidth {gb_s:g} GB/s from the catalog ({entry.key})"
    gb_s = GENERIC_GPU_BANDWIDTH_BYTES_S / GB
    return GENERIC_GPU_BANDWIDTH_BYTES_S, f"{missing} and it is not in the catalog; assuming {gb_s:g} GB/s"


def gpu_process_memory_bytes(pid: int, nvml: NvmlApi | None = None) -> int | None:
    """GPU memory held by process ``pid``, summed over all GPUs; ``0`` if NVML lists it on none.

    ``None`` when NVML is unavailable or will not say (Windows WDDM reports no per-process figure). In a container
    NVML lists host PIDs, so a container PID is never found (0): compare with the drop in free memory instead.
    """
    try:
        with _nvml_open(nvml) as api:
            total_bytes = 0
            for index in range(api.nvmlDeviceGetCount()):
                handle = api.nvmlDeviceGetHandleByIndex(index)
                for process in api.nvmlDeviceGetComputeRunningProcesses(handle):
                    if process.pid != pid:
                        continue
                    if process.usedGpuMemory is None:
                        return None
                    total_bytes += int(process.usedGpuMemory)
            return total_bytes
    except _NVML_ERRORS:
        return None


def gpu_free_bytes(index: int, nvml: NvmlApi | None = None) -> int | None:
    """Free memory on NVML GPU ``index`` right now; ``None`` if NVML is unavailable or there is no such GPU."""
    try:
        with _nvml_open(nvml) as api:
            if not 0 <= index < api.nvmlDeviceGetCount():
                return None
            return int(api.nvmlDeviceGetMemoryInfo(api.nvmlDeviceGetHandleByIndex(index)).free)
    except _NVML_ERRORS:
        return None


# --------------------------------------------------------------------------------------- recorded NVML snapshots

SNAPSHOT_FORMAT = 1

_ERROR_NAMES: dict[int, str] = {
    value: name.removeprefix("NVML_ERROR_")
    for name, value in vars(pynvml).items()
    if name.startswith("NVML_ERROR_") and isinstance(value, int)
}


def _error_record(error: BaseException) -> dict[str, str]:
    if isinstance(error, pynvml.NVMLError):
        return {"nvml_error": _ERROR_NAMES.get(error.value, "UNKNOWN")}
    return {"nvml_error": "FUNCTION_NOT_FOUND" if isinstance(error, AttributeError) else "UNKNOWN"}


def _nvml_error(name: str) -> pynvml.NVMLError:
    return pynvml.NVMLError(getattr(pynvml, f"NVML_ERROR_{name}", pynvml.NVML_ERROR_UNKNOWN))


def _record(call: Callable[[], Any]) -> Any:
    try:
        return call()
    except _NVML_ERRORS as error:
        return _error_record(error)


def record_snapshot(nvml: NvmlApi | None = None) -> dict[str, Any]:
    """Every value :class:`NvmlApi` returns on this machine, as JSON-ready data :class:`SnapshotNvml` replays.

    A failing call is recorded as ``{"nvml_error": "NOT_SUPPORTED"}`` (the ``NVML_ERROR_`` name) and replayed
    as that error; NVML failing to start is recorded as ``{"init_error": ...}``.
    """
    api = _default_nvml(nvml)
    try:
        api.nvmlInit()
    except _NVML_ERRORS as error:
        return {"format": SNAPSHOT_FORMAT, "init_error": _error_record(error)["nvml_error"]}
    try:
        count = api.nvmlDeviceGetCount()
        return {
            "format": SNAPSHOT_FORMAT,
            "driver_version": _record(lambda: _text(api.nvmlSystemGetDriverVersion())),
            "devices": [_record_device(api, index) for index in range(count)],
        }
    finally:
        with suppress(*_NVML_ERRORS):
            api.nvmlShutdown()


def _record_device(api: NvmlApi, index: int) -> dict[str, Any]:
    try:
        handle = api.nvmlDeviceGetHandleByIndex(index)
    except _NVML_ERRORS as error:
        return _error_record(error)

    def memory() -> dict[str, int]:
        info = api.nvmlDeviceGetMemoryInfo(handle)
        return {"total": int(info.total), "free": int(info.free), "used": int(info.used)}

    def processes() -> list[dict[str, int | None]]:
        return [
            {"pid": int(p.pid), "used_gpu_memory": None if p.usedGpuMemory is None else int(p.usedGpuMemory)}
            for p in api.nvmlDeviceGetComputeRunningProcesses(handle)
        ]

    return {
        "name": _record(lambda: _text(api.nvmlDeviceGetName(handle))),
        "memory": _record(memory),
        "memory_bus_width_bits": _record(lambda: api.nvmlDeviceGetMemoryBusWidth(handle)),
        "max_mem_clock_mhz": _record(lambda: api.nvmlDeviceGetMaxClockInfo(handle, NVML_CLOCK_MEM)),
        "max_pcie_link_generation": _record(lambda: api.nvmlDeviceGetMaxPcieLinkGeneration(handle)),
        "curr_pcie_link_generation": _record(lambda: api.nvmlDeviceGetCurrPcieLinkGeneration(handle)),
        "max_pcie_link_width": _record(lambda: api.nvmlDeviceGetMaxPcieLinkWidth(handle)),
        "cuda_compute_capability": _record(lambda: list(api.nvmlDeviceGetCudaComputeCapability(handle))),
        "compute_processes": _record(processes),
    }


@dataclass(frozen=True)
class _MemoryInfo:
    total: int
    free: int
    used: int


@dataclass(frozen=True)
class _ProcessInfo:
    pid: int
    usedGpuMemory: int | None


class SnapshotNvml:
    """An :class:`NvmlApi` that replays a snapshot written by :func:`record_snapshot` (a path or the data).

    It checks that calls come between ``nvmlInit`` and ``nvmlShutdown``, as the real library does;
    :attr:`open_sessions` tells a test whether every init was matched by a shutdown.
    """

    def __init__(self, snapshot: str | Path | Mapping[str, Any]) -> None:
        if isinstance(snapshot, (str, Path)):
            try:
                snapshot = json.loads(Path(snapshot).read_text(encoding="utf-8"))
            except (OSError, ValueError) as error:
                raise TunerError(f"cannot read NVML snapshot {snapshot}: {error}") from error
        if not isinstance(snapshot, Mapping) or snapshot.get("format") != SNAPSHOT_FORMAT:
            raise TunerError(f"not an NVML snapshot of format {SNAPSHOT_FORMAT}")
        self._data: Mapping[str, Any] = snapshot
        self.open_sessions = 0

    def _value(self, record: Mapping[str, Any], key: str) -> Any:
        if self.open_sessions <= 0:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_UNINITIALIZED)
        if key not in record:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        value = record[key]
        if isinstance(value, Mapping) and "nvml_error" in value:
            raise _nvml_error(str(value["nvml_error"]))
        return value

    def _device(self, handle: Any) -> Mapping[str, Any]:
        devices = self._value(self._data, "devices")
        if not isinstance(handle, int) or not 0 <= handle < len(devices):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return devices[handle]

    def nvmlInit(self) -> None:
        if "init_error" in self._data:
            raise _nvml_error(str(self._data["init_error"]))
        self.open_sessions += 1

    def nvmlShutdown(self) -> None:
        if self.open_sessions <= 0:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_UNINITIALIZED)
        self.open_sessions -= 1

    def nvmlSystemGetDriverVersion(self) -> str:
        return str(self._value(self._data, "driver_version"))

    def nvmlDeviceGetCount(self) -> int:
        return len(self._value(self._data, "devices"))

    def nvmlDeviceGetHandleByIndex(self, index: int, /) -> int:
        device = self._device(index)
        if "nvml_error" in device:
            raise _nvml_error(str(device["nvml_error"]))
        return index

    def nvmlDeviceGetName(self, handle: Any, /) -> str:
        return str(self._value(self._device(handle), "name"))

    def nvmlDeviceGetMemoryInfo(self, handle: Any, /) -> _MemoryInfo:
        memory = self._value(self._device(handle), "memory")
        return _MemoryInfo(total=int(memory["total"]), free=int(memory["free"]), used=int(memory["used"]))

    def nvmlDeviceGetMemoryBusWidth(self, handle: Any, /) -> int:
        return int(self._value(self._device(handle), "memory_bus_width_bits"))

    def nvmlDeviceGetMaxClockInfo(self, handle: Any, clock_type: int, /) -> int:
        if clock_type != NVML_CLOCK_MEM:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)  # only the memory clock is recorded
        return int(self._value(self._device(handle), "max_mem_clock_mhz"))

    def nvmlDeviceGetMaxPcieLinkGeneration(self, handle: Any, /) -> int:
        return int(self._value(self._device(handle), "max_pcie_link_generation"))

    def nvmlDeviceGetCurrPcieLinkGeneration(self, handle: Any, /) -> int:
        return int(self._value(self._device(handle), "curr_pcie_link_generation"))

    def nvmlDeviceGetMaxPcieLinkWidth(self, handle: Any, /) -> int:
        return int(self._value(self._device(handle), "max_pcie_link_width"))

    def nvmlDeviceGetCudaComputeCapability(self, handle: Any, /) -> tuple[int, int]:
        major, minor = self._value(self._device(handle), "cuda_compute_capability")
        return int(major), int(minor)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: Any, /) -> tuple[_ProcessInfo, ...]:
        return tuple(
            _ProcessInfo(pid=int(p["pid"]), usedGpuMemory=p["used_gpu_memory"])
            for p in self._value(self._device(handle), "compute_processes")
        )


# ----------------------------------------------------------------------------------------------------- the host


def cpu_model_from_cpuinfo(cpuinfo_text: str) -> str | None:
    """The CPU's name from ``/proc/cpuinfo`` text: ``model name`` (x86), else ``Hardware`` / ``Model`` (ARM)."""
    fields: dict[str, str] = {}
    for line in cpuinfo_text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip().lower(), value.strip())
    for key in ("model name", "hardware", "model", "cpu model"):
        value = fields.get(key, "")
        if value and not value.isdigit():  # x86's "model : 25" is a number, not a name
            return value
    return None


def cgroup_memory_limit_bytes(
    proc_self_cgroup: str | None = None, cgroup_root: Path = Path("/sys/fs/cgroup")
) -> int | None:
    """The tightest memory limit on this process's cgroup and its ancestors (v2 ``memory.max``, v1
    ``memory.limit_in_bytes``); ``None`` if there is none or it cannot be read. ``proc_self_cgroup`` is the text
    of ``/proc/self/cgroup`` (read when not given)."""
    if proc_self_cgroup is None:
        proc_self_cgroup = _read_text(Path("/proc/self/cgroup"))
        if proc_self_cgroup is None:
            return None
    limits: list[int] = []
    for line in proc_self_cgroup.splitlines():
        parts = line.strip().split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, cgroup_path = parts
        if controllers == "":
            limits += _limits_up_the_tree(cgroup_root, cgroup_path, "memory.max")
        elif "memory" in controllers.split(","):
            limits += _limits_up_the_tree(cgroup_root / "memory", cgroup_path, "memory.limit_in_bytes")
    return min(limits, default=None)


def _limits_up_the_tree(base: Path, cgroup_path: str, file_name: str) -> list[int]:
    limits = []
    directory = base / cgroup_path.strip("/")
    while True:
        text = _read_text(directory / file_name)
        if text is not None and text.strip().isdigit():  # "max" (v2) means no limit
            limits.append(int(text.strip()))
        if directory == base or base not in directory.parents:
            return limits
        directory = directory.parent


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def _usable_logical_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def read_host() -> HostInfo:
    """RAM and CPU as this process may use them (a container's memory limit and CPU affinity applied)."""
    return _read_host()[0]


def _read_host() -> tuple[HostInfo, tuple[str, ...]]:
    notes: list[str] = []
    memory = psutil.virtual_memory()
    ram_total_bytes, ram_available_bytes = int(memory.total), int(memory.available)
    limit_bytes = cgroup_memory_limit_bytes()
    if limit_bytes is not None and limit_bytes < ram_total_bytes:
        notes.append(
            f"memory limited to {fmt_bytes(limit_bytes)} by this container's cgroup "
            f"(the host has {fmt_bytes(ram_total_bytes)})"
        )
        ram_total_bytes = limit_bytes
        ram_available_bytes = min(ram_available_bytes, limit_bytes)

    machine_logical = psutil.cpu_count(logical=True) or 1
    machine_physical = psutil.cpu_count(logical=False) or machine_logical
    logical = min(_usable_logical_cores(), machine_logical)
    physical = machine_physical
    if logical < machine_logical:
        notes.append(f"this process may use {logical} of the {machine_logical} logical CPUs (CPU affinity)")
        physical = max(1, round(machine_physical * logical / machine_logical))
    physical = min(physical, logical)

    cpu_model = (
        cpu_model_from_cpuinfo(_read_text(Path("/proc/cpuinfo")) or "")
        or platform.processor()
        or platform.machine()
        or "unknown CPU"
    )
    host = HostInfo(ram_total_bytes, ram_available_bytes, physical, logical, cpu_model)
    return host, tuple(notes)


def default_ram_bandwidth_bytes_s(cores: int) -> int:
    """A conservative RAM bandwidth for a CPU with ``cores`` physical cores, when none was measured.

    See :data:`DESKTOP_RAM_BANDWIDTH_BYTES_S` and :data:`MANY_CORE_RAM_BANDWIDTH_BYTES_S` for the reasoning.
    """
    return MANY_CORE_RAM_BANDWIDTH_BYTES_S if cores > MANY_CORE_THRESHOLD else DESKTOP_RAM_BANDWIDTH_BYTES_S


def measure_ram_bandwidth_bytes_s(seconds: float = 0.3, size_bytes: int = 256 * MiB) -> int:
    """Copy bandwidth of RAM: best of repeated numpy copies of a ``size_bytes`` array (bytes read + written / s).

    Takes about ``seconds`` after allocating 2 × ``size_bytes``; at least three copies are timed. Keep
    ``size_bytes`` well above the CPU's last-level cache or it measures the cache.
    """
    import numpy as np  # here, not at import: only callers that measure pay for it

    if seconds <= 0 or size_bytes < MiB:
        raise ValueError("measure_ram_bandwidth_bytes_s needs seconds > 0 and size_bytes >= 1 MiB")
    source = np.ones(size_bytes // 8, dtype=np.float64)
    target = np.empty_like(source)
    np.copyto(target, source)  # fault every page in before timing
    best_s = float("inf")
    deadline = time.perf_counter() + seconds
    runs = 0
    while runs < 3 or (time.perf_counter() < deadline and runs < 100):
        start = time.perf_counter()
        np.copyto(target, source)
        best_s = min(best_s, time.perf_counter() - start)
        runs += 1
    return int(2 * source.nbytes / max(best_s, 1e-9))


def detect_hardware(nvml: NvmlApi | None = None) -> Hardware:
    """This machine: GPUs through NVML (or none, with a note), the host live, RAM bandwidth by default."""
    gpus, gpu_notes = _read_gpus(nvml)
    return _with_host(gpus, gpu_notes + _cuda_numbering_notes(gpus, os.environ))


def _with_host(gpus: tuple[Gpu, ...], notes: tuple[str, ...]) -> Hardware:
    host, host_notes = _read_host()
    return Hardware(
        gpus=gpus,
        ram_total_bytes=host.ram_total_bytes,
        ram_available_bytes=host.ram_available_bytes,
        cpu_physical_cores=host.cpu_physical_cores,
        cpu_logical_cores=host.cpu_logical_cores,
        cpu_model=host.cpu_model,
        ram_bandwidth_bytes_s=default_ram_bandwidth_bytes_s(host.cpu_physical_cores),
        notes=notes + host_notes,
    )


def _cuda_numbering_notes(gpus: Sequence[Gpu], environ: Mapping[str, str]) -> tuple[str, ...]:
    notes = []
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if gpus and visible is not None:
        notes.append(
            f"CUDA_VISIBLE_DEVICES={visible!r} is set: llama.cpp numbers only the visible GPUs, "
            "so CUDAn may not be NVML GPU n"
        )
    if len({gpu.name for gpu in gpus}) > 1 and environ.get("CUDA_DEVICE_ORDER") != "PCI_BUS_ID":
        notes.append(
            "the GPUs differ and CUDA_DEVICE_ORDER is not PCI_BUS_ID: CUDA numbers the fastest first, "
            "so CUDAn may not be NVML GPU n"
        )
    return tuple(notes)


# ------------------------------------------------------------------------------------------------ GPU catalog


def load_gpu_catalog(path: Path | None = None) -> dict[str, CatalogGpu]:
    """The shipped ``gpus.yaml`` (or ``path``), checked: every entry has every field, with sane types."""
    path = path or catalog_dir() / _CATALOG_FILE
    try:
        data = load_yaml(path)
    except OSError as error:
        raise TunerError(
            f"cannot read the GPU catalog {path}: {error.strerror or error}",
            hint=f"{CATALOG_ENV} must name the folder holding gpus.yaml",
        ) from error
    except yaml.YAMLError as error:
        raise TunerError(f"the GPU catalog {path} is not valid YAML: {error}") from error
    entries = data.get("gpus") if isinstance(data, dict) else None
    if not isinstance(entries, dict) or not entries:
        raise TunerError(f"the GPU catalog {path} has no 'gpus:' mapping")
    return {str(key).lower(): _catalog_entry(str(key).lower(), raw, path) for key, raw in entries.items()}


def _catalog_entry(key: str, raw: object, path: Path) -> CatalogGpu:
    def bad(field: str, want: str) -> TunerError:
        return TunerError(f"the GPU catalog {path}: {key}.{field} must be {want}")

    if not isinstance(raw, dict):
        raise bad("(entry)", "a mapping")

    def number(field: str) -> float:
        value = raw.get(field)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise bad(field, "a positive number")
        return value

    def optional_int(field: str) -> int | None:
        value = raw.get(field)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise bad(field, "a positive integer or null")
        return value

    def text(field: str) -> str:
        value = raw.get(field)
        if not isinstance(value, str) or not value.strip():
            raise bad(field, "a non-empty string")
        return value.strip()

    def texts(field: str) -> tuple[str, ...]:
        value = raw.get(field, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad(field, "a list of strings")
        return tuple(value)

    vram_bytes = raw.get("vram_bytes")
    if isinstance(vram_bytes, bool) or not isinstance(vram_bytes, int) or vram_bytes < GiB:
        raise bad("vram_bytes", "an integer number of bytes, at least 1 GiB")
    capability = raw.get("compute_capability")
    if capability is not None and not (
        isinstance(capability, list) and len(capability) == 2 and all(isinstance(v, int) for v in capability)
    ):
        raise bad("compute_capability", "[major, minor] or null")
    return CatalogGpu(
        key=key,
        name=text("name"),
        vram_bytes=vram_bytes,
        mem_bandwidth_bytes_s=round(number("mem_bandwidth_gb_s") * GB),
        pcie_gen=optional_int("pcie_gen"),
        pcie_width=optional_int("pcie_width"),
        compute_capability=(capability[0], capability[1]) if capability else None,
        source_note=text("source"),
        aliases=texts("aliases"),
        nvml_names=texts("nvml_names"),
        fp16_tflops=float(number("fp16_tflops")) if raw.get("fp16_tflops") is not None else None,
    )


_IGNORED_TOKENS = frozenset({"nvidia", "geforce"})


def _tokens(text: str) -> tuple[str, ...]:
    """``"NVIDIA GeForce RTX 4060Ti"`` and ``"rtx-4060-ti"`` both → ``("rtx", "4060", "ti")``."""
    return tuple(t for t in re.findall(r"[a-z]+|\d+", text.lower()) if t not in _IGNORED_TOKENS)


def _split_memory(tokens: tuple[str, ...]) -> tuple[tuple[str, ...], int | None]:
    """``("a", "100", "80", "gb")`` → ``(("a", "100"), 80)``."""
    if len(tokens) > 2 and tokens[-1] == "gb" and tokens[-2].isdigit():
        return tokens[:-2], int(tokens[-2])
    return tokens, None


def _spellings(entry: CatalogGpu) -> set[tuple[str, ...]]:
    return {_tokens(s) for s in (entry.key, entry.name, *entry.aliases, *entry.nvml_names)}


def _memory_matches(stated_gb: int, vram_bytes: int) -> bool:
    """A size someone typed (``24gb``) fits a card if within 10% of it in GB or GiB: NVML totals sit between."""
    return any(abs(stated_gb * unit - vram_bytes) <= 0.1 * stated_gb * unit for unit in (GB, GiB))


def _matching_keys(text: str, catalog: Mapping[str, CatalogGpu]) -> list[str]:
    wanted = _tokens(text)
    if not wanted:
        return []
    exact = [key for key, entry in catalog.items() if wanted in _spellings(entry)]
    if exact:
        return exact
    # "rtx" left out ("4090", "5070 ti"), the memory size left out ("h100") or given where the key has none
    # ("rtx 4090 24gb"); a size that does not fit the card ("rtx 3060 8gb") matches nothing.
    family, stated_gb = _split_memory(wanted)
    families = {family, ("rtx", *family)}
    return [
        key
        for key, entry in catalog.items()
        if _split_memory(_tokens(key))[0] in families
        and (stated_gb is None or _memory_matches(stated_gb, entry.vram_bytes))
    ]


def catalog_entry_for_name(name: str, catalog: Mapping[str, CatalogGpu]) -> CatalogGpu | None:
    """The catalog entry for a card NVML names ``name``, if any (exact spellings only, no guessing)."""
    wanted = _tokens(name)
    return next((entry for entry in catalog.values() if wanted in _spellings(entry)), None)


def find_catalog_gpu(text: str, catalog: Mapping[str, CatalogGpu] | None = None) -> CatalogGpu:
    """The catalog card ``text`` names: a key (``rtx-4090``), a name (``RTX 4090``), a model (``4090``),
    or a key without its memory size when that is unambiguous (``h100``). Anything else is a TunerError."""
    catalog = load_gpu_catalog() if catalog is None else catalog
    keys = _matching_keys(text, catalog)
    if len(keys) == 1:
        return catalog[keys[0]]
    if keys:
        raise TunerError(f"GPU {text!r} is ambiguous: it could be {', '.join(keys)}", hint="name one of them")
    raise TunerError(
        f"unknown GPU {text!r}",
        hint=(
            f"known GPUs: {', '.join(sorted(catalog))}; or 'none' for CPU only; "
            "or leave --gpu out to use the GPUs of this machine"
        ),
    )


_COUNT_RE = re.compile(r"^(?P<base>.+?)\s*[x×*]\s*(?P<count>\d{1,2})$", re.IGNORECASE)


def parse_gpu_spec(text: str, catalog: Mapping[str, CatalogGpu] | None = None) -> tuple[CatalogGpu, int]:
    """``rtx-3090x2`` / ``h100 x 4`` / ``4090`` → (catalog card, how many of it)."""
    catalog = load_gpu_catalog() if catalog is None else catalog
    match = _COUNT_RE.match(text.strip())
    if match and not _matching_keys(text, catalog):
        count = int(match["count"])
        if not 1 <= count <= _MAX_GPU_COUNT:
            raise TunerError(f"GPU count in {text!r} must be between 1 and {_MAX_GPU_COUNT}")
        return find_catalog_gpu(match["base"], catalog), count
    return find_catalog_gpu(text, catalog), 1


def catalog_gpu(key: str, index: int = 0) -> Gpu:
    """The catalog card ``key`` (any spelling :func:`find_catalog_gpu` accepts) as a :class:`Gpu`."""
    return find_catalog_gpu(key).to_gpu(index)


# ------------------------------------------------------------------------------------------ the CLI's choice


def override_vram(hardware: Hardware, vram_bytes: int) -> Hardware:
    """GPU 0 with ``vram_bytes`` total and free (nothing else on it); a generic GPU if there is none."""
    if vram_bytes <= 0:
        raise TunerError("--vram must be more than 0")
    size = fmt_bytes(vram_bytes)
    if not hardware.gpus:
        gb_s = GENERIC_GPU_BANDWIDTH_BYTES_S / GB
        gpu = Gpu(
            index=0,
            name="generic GPU",
            vram_total_bytes=vram_bytes,
            vram_free_bytes=vram_bytes,
            vram_used_bytes=0,
            mem_bandwidth_bytes_s=GENERIC_GPU_BANDWIDTH_BYTES_S,
            pcie_gen=None,
            pcie_width=None,
            compute_capability=None,
            source="manual",
        )
        note = f"no GPU known: planning for a generic GPU with {size} (--vram), assuming {gb_s:g} GB/s"
        return replace(hardware, gpus=(gpu,), notes=(*hardware.notes, note))
    first = hardware.gpus[0]
    note = f"{first.llama_name} ({first.name}) planned with {size} (--vram)"
    if first.source == "nvml" and vram_bytes > first.vram_free_bytes:
        note += f", more than the {fmt_bytes(first.vram_free_bytes)} free now"
    first = replace(first, vram_total_bytes=vram_bytes, vram_free_bytes=vram_bytes, vram_used_bytes=0)
    return replace(hardware, gpus=(first, *hardware.gpus[1:]), notes=(*hardware.notes, note))


def gpu_split(hardware: Hardware) -> list[float] | None:
    """How llama.cpp splits layers across GPUs: in proportion to their free memory (None for one GPU)."""
    if len(hardware.gpus) < 2:
        return None
    return [float(g.vram_free_bytes) for g in hardware.gpus]


def estimate_on(layout: ModelLayout, flags: ServerFlags, hardware: Hardware) -> MemoryEstimate:
    """The memory estimate on this hardware's GPUs (named as llama.cpp names them), layers split as it splits them."""
    return estimate_memory(layout, flags, [g.llama_name for g in hardware.gpus], gpu_split(hardware))


def hardware_for(gpu: str | None, vram: str | None = None, nvml: NvmlApi | None = None) -> Hardware:
    """The hardware to plan for, from ``--gpu`` and ``--vram``.

    ``gpu``: ``None`` → this machine (NVML); ``"none"`` → CPU only; a catalog card, optionally ``xN`` of it
    (``rtx-3090x2``) → that card, with this machine's CPU and RAM. ``vram`` (``24G``; a bare number is GiB)
    replaces GPU 0's memory, or makes up a generic GPU when there is none.
    """
    if gpu is None:
        hardware = detect_hardware(nvml)
    elif gpu.strip().lower() in {"none", "cpu"}:
        if vram is not None:
            raise TunerError("--gpu none plans for no GPU, so --vram has nothing to apply to")
        hardware = _with_host((), ("no GPU: --gpu none",))
    else:
        entry, count = parse_gpu_spec(gpu)
        gpus = tuple(entry.to_gpu(index) for index in range(count))
        what = entry.name if count == 1 else f"{count} × {entry.name}"
        hardware = _with_host(gpus, (f"GPU from the catalog ({what}), not detected: all its memory counted free",))
    if vram is not None:
        hardware = override_vram(hardware, parse_size_bytes(vram, default_unit="g"))
    return hardware
