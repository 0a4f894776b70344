"""The host (tuner.hardware.host): RAM and CPU as this process may use them, cgroup limits, RAM bandwidth."""

from __future__ import annotations

from pathlib import Path

import pytest

from tuner.hardware import host as host_module
from tuner.hardware.gpu import GB
from tuner.hardware.host import (
    cgroup_memory_limit_bytes,
    cpu_busy_logical,
    cpu_model_from_cpuinfo,
    default_ram_bandwidth_bytes_s,
    measure_ram_bandwidth_bytes_s,
    read_host,
)
from tuner.units import GiB, MiB


def test_host_values_are_sane() -> None:
    host = read_host()
    assert host.ram_total_bytes > 256 * MiB
    assert 0 < host.ram_available_bytes <= host.ram_total_bytes
    assert 1 <= host.cpu_physical_cores <= host.cpu_logical_cores
    assert host.cpu_model.strip()


def test_cpu_model_comes_from_model_name_on_x86() -> None:
    cpuinfo = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel\t\t: 33\nmodel name\t: AMD Ryzen 9 5950X 16-Core\n"
    assert cpu_model_from_cpuinfo(cpuinfo) == "AMD Ryzen 9 5950X 16-Core"


def test_cpu_model_falls_back_to_hardware_on_arm_and_skips_numeric_model() -> None:
    assert cpu_model_from_cpuinfo("processor\t: 0\nmodel\t: 33\nHardware\t: BCM2835\n") == "BCM2835"
    assert cpu_model_from_cpuinfo("processor\t: 0\nCPU part\t: 0xd0c\n") is None


def test_cgroup_v2_limit_is_the_tightest_up_the_tree(tmp_path: Path) -> None:
    (tmp_path / "user.slice" / "app").mkdir(parents=True)
    (tmp_path / "memory.max").write_text("max\n")
    (tmp_path / "user.slice" / "memory.max").write_text(f"{8 * GiB}\n")
    (tmp_path / "user.slice" / "app" / "memory.max").write_text("max\n")
    assert cgroup_memory_limit_bytes("0::/user.slice/app\n", tmp_path) == 8 * GiB


def test_cgroup_v1_memory_limit_is_read(tmp_path: Path) -> None:
    (tmp_path / "memory").mkdir()
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text(f"{4 * GiB}\n")
    text = "12:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n"
    assert cgroup_memory_limit_bytes(text, tmp_path) == 4 * GiB


def test_no_cgroup_limit_reads_as_none(tmp_path: Path) -> None:
    (tmp_path / "memory.max").write_text("max\n")
    assert cgroup_memory_limit_bytes("0::/\n", tmp_path) is None


def test_default_ram_bandwidth_is_conservative_and_grows_with_many_cores() -> None:
    desktop = default_ram_bandwidth_bytes_s(8)
    assert 30 * GB <= desktop <= 60 * GB
    assert default_ram_bandwidth_bytes_s(64) > desktop


def test_measured_ram_bandwidth_is_plausible() -> None:
    measured = measure_ram_bandwidth_bytes_s(seconds=0.02, size_bytes=16 * MiB)
    assert 1 * GB < measured < 10_000 * GB


def test_busy_cpus_are_the_sustained_load_and_the_measured_use_whichever_is_smaller(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host_module.os, "sched_getaffinity", lambda _pid: {0, 1}, raising=False)
    monkeypatch.setattr(host_module.psutil, "cpu_percent", lambda interval, percpu: [90.0, 80.0, 100.0, 100.0])
    monkeypatch.setattr(host_module.os, "getloadavg", lambda: (8.0, 7.5, 6.8))
    assert cpu_busy_logical(0) == 1.7  # only this process's CPUs: 0 and 1
    monkeypatch.setattr(host_module.os, "getloadavg", lambda: (3.0, 0.9, 0.4))  # a spike of the last minute
    assert cpu_busy_logical(0) == 0.4
    monkeypatch.setattr(host_module.psutil, "cpu_percent", lambda interval, percpu: [10.0, 5.0])
    monkeypatch.setattr(host_module.os, "getloadavg", lambda: (30.0, 30.0, 30.0))  # a container: the host's load
    assert cpu_busy_logical(0) == 0.15

    def unreadable() -> tuple[float, float, float]:
        raise OSError("no load average here")

    monkeypatch.setattr(host_module.os, "getloadavg", unreadable)
    assert cpu_busy_logical(0) == 0.0
