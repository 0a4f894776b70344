"""The host: RAM and CPU cores as this process may use them (a container's cgroup memory limit and the CPU affinity
applied), the CPU's name, and the RAM bandwidth CPU-side speed estimates rest on (assumed, or measured).
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import NamedTuple

import psutil

from tuner.hardware.gpu import GB
from tuner.units import MiB, fmt_bytes

DESKTOP_RAM_BANDWIDTH_BYTES_S = 50 * GB
"""Assumed when nothing is measured on a desktop-class CPU: dual-channel DDR4-3200 peaks at 51.2 GB/s and
delivers ~40-45 GB/s; dual-channel DDR5-5600 peaks at 89.6 GB/s and delivers ~60-70 GB/s. 50 GB/s is about right
for the first and errs low for the second, so CPU-side speed estimates err slow, never fast."""

MANY_CORE_RAM_BANDWIDTH_BYTES_S = 100 * GB
"""Assumed for more than :data:`MANY_CORE_THRESHOLD` physical cores: such CPUs (Threadripper, Xeon, EPYC) sit on
platforms with four or more memory channels; 100 GB/s is what four channels of DDR4 deliver, low for servers."""

MANY_CORE_THRESHOLD = 16


class HostInfo(NamedTuple):
    ram_total_bytes: int
    ram_available_bytes: int
    cpu_physical_cores: int
    cpu_logical_cores: int
    cpu_model: str


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
    return read_host_noted()[0]


def read_host_noted() -> tuple[HostInfo, tuple[str, ...]]:
    """:func:`read_host`, and one note per limit applied (cgroup memory, CPU affinity)."""
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


def cpu_busy_logical(interval_s: float = 0.25) -> float:
    """Logical CPUs of this process's affinity set that other work keeps busy: the smaller of their measured use
    over ``interval_s`` and the smallest of the 1-, 5- and 15-minute load averages (sustained demand; a compile that
    started a minute ago does not count), capped at the set's size.

    The load average alone would do on a machine of its own, but in a container it is the whole host's; the
    measured use alone cannot see demand beyond 100% and catches momentary spikes. 0.0 where neither can be read."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = list(range(psutil.cpu_count(logical=True) or 1))
    try:
        per_cpu = psutil.cpu_percent(interval=interval_s, percpu=True)
        used = sum(per_cpu[i] for i in cpus if i < len(per_cpu)) / 100.0
        load = min(os.getloadavg())
    except (AttributeError, OSError):
        return 0.0
    return round(max(0.0, min(used, load, float(len(cpus)))), 2)


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
