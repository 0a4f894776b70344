"""NVML access (tuner.hardware.nvml) against recorded snapshots (tests/data/nvml), replayed by
tuner.hardware.snapshot through the same interface as pynvml; and the recorder that writes such snapshots."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from tuner.errors import TunerError
from tuner.hardware import nvml as nv
from tuner.hardware.catalog import GENERIC_GPU_BANDWIDTH_BYTES_S, load_gpu_catalog
from tuner.hardware.gpu import GB
from tuner.hardware.machine import detect_hardware
from tuner.hardware.snapshot import SnapshotNvml, record_snapshot
from tuner.units import GiB, MiB

SNAPSHOTS = Path(__file__).parent / "data" / "nvml"
RTX4090 = SNAPSHOTS / "rtx4090_driver550.json"
H100 = SNAPSHOTS / "h100_sxm_driver550.json"
RTX3090X2 = SNAPSHOTS / "rtx3090x2_driver535.json"
NO_NVML = SNAPSHOTS / "no_nvml.json"


def snapshot_data(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def nvml_with(path: Path, **device_changes: Any) -> SnapshotNvml:
    """The snapshot with fields of device 0 replaced (e.g. a query that fails on this card)."""
    data = copy.deepcopy(snapshot_data(path))
    data["devices"][0].update(device_changes)
    return SnapshotNvml(data)


NOT_SUPPORTED = {"nvml_error": "NOT_SUPPORTED"}


# ---------------------------------------------------------------------------------------- GPUs from snapshots


def test_rtx4090_snapshot_reads_as_the_card_reports_itself() -> None:
    gpus, note = nv.read_gpus(SnapshotNvml(RTX4090))
    assert note is None
    (gpu,) = gpus
    assert gpu.name == "NVIDIA GeForce RTX 4090"
    assert gpu.vram_total_bytes == 25757220864
    assert gpu.vram_free_bytes + gpu.vram_used_bytes == gpu.vram_total_bytes
    assert (gpu.pcie_gen, gpu.pcie_width, gpu.compute_capability) == (4, 16, (8, 9))
    assert gpu.driver_version == "550.120"
    assert gpu.source == "nvml"


def test_bandwidth_is_bus_width_times_double_data_rate_clock() -> None:
    (rtx4090,), _ = nv.read_gpus(SnapshotNvml(RTX4090))
    (h100,), _ = nv.read_gpus(SnapshotNvml(H100))
    assert rtx4090.mem_bandwidth_bytes_s == 384 // 8 * 10_501_000_000 * 2  # 1008.1 GB/s
    assert rtx4090.mem_bandwidth_bytes_s == pytest.approx(1008 * GB, rel=0.001)
    assert h100.mem_bandwidth_bytes_s == pytest.approx(3.35e12, rel=0.001)


def test_detected_bandwidth_agrees_with_the_catalog_spec_sheet() -> None:
    catalog = load_gpu_catalog()
    for path, key in ((RTX4090, "rtx-4090"), (H100, "h100-80gb"), (RTX3090X2, "rtx-3090")):
        gpus, _ = nv.read_gpus(SnapshotNvml(path))
        for gpu in gpus:
            assert gpu.mem_bandwidth_bytes_s == pytest.approx(catalog[key].mem_bandwidth_bytes_s, rel=0.005)
            assert gpu.vram_total_bytes == catalog[key].vram_bytes


def test_two_gpus_keep_their_own_links_and_llama_names() -> None:
    gpus, _ = nv.read_gpus(SnapshotNvml(RTX3090X2))
    assert [gpu.llama_name for gpu in gpus] == ["CUDA0", "CUDA1"]
    assert [(gpu.pcie_gen, gpu.pcie_width) for gpu in gpus] == [(4, 16), (3, 4)]
    assert gpus[0].vram_free_bytes != gpus[1].vram_free_bytes


def test_every_nvml_session_is_shut_down() -> None:
    nvml = SnapshotNvml(RTX3090X2)
    nv.read_gpus(nvml)
    nv.gpu_free_bytes(1, nvml)
    nv.gpu_process_memory_bytes(7311, nvml)
    record_snapshot(nvml)
    assert nvml.open_sessions == 0


def test_idle_pcie_link_does_not_hide_the_max_generation() -> None:
    nvml = nvml_with(RTX4090, curr_pcie_link_generation=1)
    (gpu,), _ = nv.read_gpus(nvml)
    assert gpu.pcie_gen == 4


def test_current_pcie_generation_stands_in_when_max_is_not_reported() -> None:
    nvml = nvml_with(RTX4090, max_pcie_link_generation=NOT_SUPPORTED, curr_pcie_link_generation=3)
    (gpu,), _ = nv.read_gpus(nvml)
    assert gpu.pcie_gen == 3


def test_unsupported_optional_queries_degrade_to_none() -> None:
    nvml = nvml_with(
        RTX4090,
        max_pcie_link_generation=NOT_SUPPORTED,
        curr_pcie_link_generation=NOT_SUPPORTED,
        max_pcie_link_width=NOT_SUPPORTED,
        cuda_compute_capability={"nvml_error": "FUNCTION_NOT_FOUND"},
    )
    (gpu,), _ = nv.read_gpus(nvml)
    assert (gpu.pcie_gen, gpu.pcie_width, gpu.compute_capability) == (None, None, None)
    assert gpu.vram_total_bytes == 25757220864


def test_missing_bus_width_falls_back_to_the_catalog_bandwidth() -> None:
    (gpu,), note = nv.read_gpus(nvml_with(RTX4090, memory_bus_width_bits=NOT_SUPPORTED))
    assert gpu.mem_bandwidth_bytes_s == 1008 * GB
    assert note is not None and "rtx-4090" in note


def test_unknown_card_without_bus_width_gets_the_conservative_generic_bandwidth() -> None:
    nvml = nvml_with(RTX4090, name="NVIDIA Made Up 9000", max_mem_clock_mhz=0)
    (gpu,), note = nv.read_gpus(nvml)
    assert gpu.mem_bandwidth_bytes_s == GENERIC_GPU_BANDWIDTH_BYTES_S
    assert note is not None and "not in the catalog" in note


def test_a_gpu_nvml_cannot_read_is_left_out_with_a_note() -> None:
    data = snapshot_data(RTX3090X2)
    data["devices"][0]["memory"] = NOT_SUPPORTED
    gpus, note = nv.read_gpus(SnapshotNvml(data))
    assert [gpu.llama_name for gpu in gpus] == ["CUDA1"]
    assert note is not None and note.startswith("GPU 0:")


def test_no_nvml_snapshot_means_cpu_only_with_a_note() -> None:
    gpus, note = nv.read_gpus(SnapshotNvml(NO_NVML))
    assert gpus == ()
    assert note is not None and note.startswith("NVML not available: ") and "CPU only" in note
    hardware = detect_hardware(SnapshotNvml(NO_NVML))
    assert hardware.cpu_only
    assert hardware.notes[0] == note


def test_driver_without_gpus_is_cpu_only_with_a_note() -> None:
    data = snapshot_data(H100)
    data["devices"] = []
    gpus, note = nv.read_gpus(SnapshotNvml(data))
    assert gpus == ()
    assert note == "NVML found no GPUs; planning for CPU only"


def test_real_pynvml_degrades_instead_of_crashing() -> None:
    """On a machine without an NVIDIA driver this is the no-NVML path; with one, real GPUs must read sanely."""
    hardware = detect_hardware()
    if hardware.cpu_only:
        assert any(note.startswith("NVML") and "CPU only" in note for note in hardware.notes)
        assert nv.gpu_free_bytes(0) is None
        assert nv.gpu_process_memory_bytes(1) is None
    else:
        assert all(gpu.vram_total_bytes > GiB and gpu.mem_bandwidth_bytes_s > 0 for gpu in hardware.gpus)


def test_record_snapshot_captures_no_nvml_as_an_init_error() -> None:
    assert record_snapshot(SnapshotNvml(NO_NVML)) == {"format": 1, "init_error": "LIBRARY_NOT_FOUND"}


@pytest.mark.parametrize("path", [RTX4090, H100, RTX3090X2, NO_NVML], ids=lambda p: p.stem)
def test_record_snapshot_captures_everything_the_snapshot_replays(path: Path) -> None:
    original = snapshot_data(path)
    original.pop("description")
    assert record_snapshot(SnapshotNvml(original)) == original


def test_recorded_errors_replay_as_the_same_errors() -> None:
    nvml = nvml_with(RTX4090, memory_bus_width_bits=NOT_SUPPORTED)
    recorded = record_snapshot(nvml)
    assert recorded["devices"][0]["memory_bus_width_bits"] == NOT_SUPPORTED
    assert nv.read_gpus(SnapshotNvml(recorded)) == nv.read_gpus(nvml)


@pytest.mark.parametrize("path", [RTX4090, H100, RTX3090X2], ids=lambda p: p.stem)
def test_snapshot_files_are_internally_consistent(path: Path) -> None:
    for device in snapshot_data(path)["devices"]:
        memory = device["memory"]
        assert memory["free"] + memory["used"] == memory["total"]
        assert sum(p["used_gpu_memory"] for p in device["compute_processes"]) <= memory["used"]


def test_snapshot_calls_outside_an_nvml_session_fail_like_nvml() -> None:
    import pynvml

    with pytest.raises(pynvml.NVMLError_Uninitialized):
        SnapshotNvml(RTX4090).nvmlDeviceGetCount()


def test_unreadable_snapshot_is_a_tuner_error(tmp_path: Path) -> None:
    with pytest.raises(TunerError, match="cannot read NVML snapshot"):
        SnapshotNvml(tmp_path / "missing.json")
    with pytest.raises(TunerError, match="not an NVML snapshot"):
        SnapshotNvml({"devices": []})


# --------------------------------------------------------------------------------- per-process and free memory


def test_process_memory_is_what_nvml_lists_for_that_pid() -> None:
    assert nv.gpu_process_memory_bytes(48213, SnapshotNvml(RTX4090)) == 19473 * MiB


def test_process_memory_sums_over_gpus() -> None:
    assert nv.gpu_process_memory_bytes(7311, SnapshotNvml(RTX3090X2)) == (10692 + 11534) * MiB


def test_process_memory_is_zero_for_a_pid_on_no_gpu() -> None:
    assert nv.gpu_process_memory_bytes(1, SnapshotNvml(RTX4090)) == 0


def test_process_memory_is_unknown_when_nvml_will_not_say() -> None:
    wddm = nvml_with(RTX4090, compute_processes=[{"pid": 48213, "used_gpu_memory": None}])
    assert nv.gpu_process_memory_bytes(48213, wddm) is None
    assert nv.gpu_process_memory_bytes(48213, SnapshotNvml(NO_NVML)) is None


def test_gpu_free_bytes_reads_the_named_gpu() -> None:
    nvml = SnapshotNvml(RTX3090X2)
    assert nv.gpu_free_bytes(0, nvml) == 13847494656
    assert nv.gpu_free_bytes(1, nvml) == 13396606976


def test_gpu_free_bytes_is_none_for_a_missing_gpu_or_no_nvml() -> None:
    assert nv.gpu_free_bytes(2, SnapshotNvml(RTX3090X2)) is None
    assert nv.gpu_free_bytes(-1, SnapshotNvml(RTX3090X2)) is None
    assert nv.gpu_free_bytes(0, SnapshotNvml(NO_NVML)) is None


def mixed_3090_3060() -> dict[str, Any]:
    """The recorded RTX 3090 pair with its second card turned into an RTX 3060 (12 GiB, 192-bit at 7501 MHz, 1 GiB
    held by another process): two different cards in NVML's (PCI bus) order."""
    data = copy.deepcopy(snapshot_data(RTX3090X2))
    data["devices"][1].update(name="NVIDIA GeForce RTX 3060", memory_bus_width_bits=192, max_mem_clock_mhz=7501,
                              memory={"total": 12 * GiB, "free": 11 * GiB, "used": 1 * GiB},
                              compute_processes=[{"pid": 7311, "used_gpu_memory": 1 * GiB}])
    return data


def test_every_nvml_gpu_is_detected_in_pci_order_and_mixed_cards_get_the_numbering_note(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    hw = detect_hardware(SnapshotNvml(mixed_3090_3060()))
    assert [(g.llama_name, g.name) for g in hw.gpus] == [("CUDA0", "NVIDIA GeForce RTX 3090"),
                                                         ("CUDA1", "NVIDIA GeForce RTX 3060")]
    assert hw.gpus[1].vram_free_bytes == 11 * GiB
    assert hw.gpus[1].mem_bandwidth_bytes_s == 192 // 8 * 7_501_000_000 * 2  # 360 GB/s
    assert any("CUDA_DEVICE_ORDER" in note and "PCI_BUS_ID" in note for note in hw.notes)
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    assert not any("CUDA_DEVICE_ORDER" in n for n in detect_hardware(SnapshotNvml(mixed_3090_3060())).notes)


def test_detected_mixed_gpus_are_planned_with_each_cards_free_memory() -> None:
    from dataclasses import replace

    from tuner.planner import Wishes, fits, plan_for

    hw = replace(detect_hardware(SnapshotNvml(mixed_3090_3060())), ram_total_bytes=64 * GiB,
                 ram_available_bytes=64 * GiB)
    plan = plan_for(None, hw, Wishes(quant="Q4_K_M")).plan
    assert plan.flags.tensor_split and len(plan.flags.tensor_split) == 2
    assert fits(plan.estimate, plan.budget)
    for gpu in hw.gpus:  # what is free now, not the card's size
        assert plan.estimate.device(gpu.llama_name).total_bytes + plan.budget.buffer_bytes <= gpu.vram_free_bytes
