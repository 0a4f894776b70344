"""Recorded NVML snapshots: every answer :class:`~tuner.hardware.nvml.NvmlApi` gives on a machine, as JSON
(:func:`record_snapshot`, what ``tuner hardware --record-snapshot`` writes), and :class:`SnapshotNvml`, which
replays one through the same interface as ``pynvml``.

The replayer stays in the package, beside the recorder, rather than in tests/: the format is written and read in
one place, and a snapshot from a user's bug report (or a ``TUNER_NVML_SNAPSHOT``-style switch for subprocess tests)
needs it importable from an installed tuner. It costs nothing at run time: pure Python, and ``pynvml`` is imported
anyway.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pynvml

from tuner.errors import TunerError
from tuner.hardware.nvml import NVML_CLOCK_MEM, NVML_ERRORS, NvmlApi, decode_text, default_nvml

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
    except NVML_ERRORS as error:
        return _error_record(error)


def record_snapshot(nvml: NvmlApi | None = None) -> dict[str, Any]:
    """Every value :class:`NvmlApi` returns on this machine, as JSON-ready data :class:`SnapshotNvml` replays.

    A failing call is recorded as ``{"nvml_error": "NOT_SUPPORTED"}`` (the ``NVML_ERROR_`` name) and replayed
    as that error; NVML failing to start is recorded as ``{"init_error": ...}``.
    """
    api = default_nvml(nvml)
    try:
        api.nvmlInit()
    except NVML_ERRORS as error:
        return {"format": SNAPSHOT_FORMAT, "init_error": _error_record(error)["nvml_error"]}
    try:
        count = api.nvmlDeviceGetCount()
        return {
            "format": SNAPSHOT_FORMAT,
            "driver_version": _record(lambda: decode_text(api.nvmlSystemGetDriverVersion())),
            "devices": [_record_device(api, index) for index in range(count)],
        }
    finally:
        with suppress(*NVML_ERRORS):
            api.nvmlShutdown()


def _record_device(api: NvmlApi, index: int) -> dict[str, Any]:
    try:
        handle = api.nvmlDeviceGetHandleByIndex(index)
    except NVML_ERRORS as error:
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
        "name": _record(lambda: decode_text(api.nvmlDeviceGetName(handle))),
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
