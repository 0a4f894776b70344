"""NVML access: the GPUs this machine has, their free memory, and the GPU memory a process holds.

NVML is reached only through :class:`NvmlApi`, a Protocol holding exactly the ``pynvml`` calls used, so tests can
stand a recorded snapshot (:class:`tuner.hardware.snapshot.SnapshotNvml`) in for the real library. A missing
library, a missing driver or any NVML error degrades to "no GPUs" plus a note; an optional query that fails (bus
width, PCIe link, ...) degrades to ``None`` or to the catalog value, never to a crash.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any, Protocol, TypeVar, cast

import pynvml

from tuner.errors import TunerError
from tuner.hardware.catalog import GENERIC_GPU_BANDWIDTH_BYTES_S, catalog_entry_for_name, load_gpu_catalog
from tuner.hardware.gpu import GB, Gpu

NVML_CLOCK_MEM = 2
"""``nvmlClockType_t`` value of ``NVML_CLOCK_MEM`` (part of NVML's stable ABI)."""


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


#: What an NVML call may raise. AttributeError: a pynvml binding too old to have the function. OSError: the library
#: failed to load oddly.
NVML_ERRORS: tuple[type[BaseException], ...] = (pynvml.NVMLError, AttributeError, OSError)

_T = TypeVar("_T")


def default_nvml(nvml: NvmlApi | None) -> NvmlApi:
    """``nvml``, or the real ``pynvml`` when None."""
    return cast(NvmlApi, pynvml) if nvml is None else nvml


@contextmanager
def nvml_open(nvml: NvmlApi | None) -> Iterator[NvmlApi]:
    """``nvmlInit`` ... ``nvmlShutdown``; NVML counts inits, so a caller that keeps NVML open makes this cheap."""
    api = default_nvml(nvml)
    api.nvmlInit()
    try:
        yield api
    finally:
        with suppress(*NVML_ERRORS):
            api.nvmlShutdown()


def decode_text(value: str | bytes) -> str:
    """NVML strings are bytes in older ``pynvml`` bindings."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _optional(call: Callable[[], _T]) -> _T | None:
    try:
        return call()
    except NVML_ERRORS:
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
    gpus, notes = read_gpus_noted(nvml)
    return gpus, "; ".join(notes) or None


def read_gpus_noted(nvml: NvmlApi | None = None) -> tuple[tuple[Gpu, ...], tuple[str, ...]]:
    """:func:`read_gpus` with its notes one by one."""
    try:
        with nvml_open(nvml) as api:
            driver_version = _optional(lambda: decode_text(api.nvmlSystemGetDriverVersion()))
            count = api.nvmlDeviceGetCount()
            gpus: list[Gpu] = []
            notes: list[str] = []
            for index in range(count):
                try:
                    gpu, note = _read_gpu(api, index, driver_version)
                except NVML_ERRORS as error:
                    notes.append(f"GPU {index}: NVML could not read it ({error}); left out")
                    continue
                gpus.append(gpu)
                if note:
                    notes.append(note)
    except NVML_ERRORS as error:
        return (), (f"NVML not available: {str(error) or type(error).__name__}; planning for CPU only",)
    if not gpus and not notes:
        notes.append("NVML found no GPUs; planning for CPU only")
    return tuple(gpus), tuple(notes)


def _read_gpu(api: NvmlApi, index: int, driver_version: str | None) -> tuple[Gpu, str | None]:
    handle = api.nvmlDeviceGetHandleByIndex(index)
    name = decode_text(api.nvmlDeviceGetName(handle))
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
        with nvml_open(nvml) as api:
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
    except NVML_ERRORS:
        return None


def gpu_free_bytes(index: int, nvml: NvmlApi | None = None) -> int | None:
    """Free memory on NVML GPU ``index`` right now; ``None`` if NVML is unavailable or there is no such GPU."""
    try:
        with nvml_open(nvml) as api:
            if not 0 <= index < api.nvmlDeviceGetCount():
                return None
            return int(api.nvmlDeviceGetMemoryInfo(api.nvmlDeviceGetHandleByIndex(index)).free)
    except NVML_ERRORS:
        return None
