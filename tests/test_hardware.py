"""The hardware layer, against recorded NVML snapshots (tests/data/nvml) through the same interface as pynvml."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from tuner import hardware as hw
from tuner.errors import TunerError
from tuner.hardware import GB, SnapshotNvml
from tuner.units import GiB, MiB

SNAPSHOTS = Path(__file__).parent / "data" / "nvml"
RTX4090 = SNAPSHOTS / "rtx4090_driver550.json"
H100 = SNAPSHOTS / "h100_sxm_driver550.json"
RTX3090X2 = SNAPSHOTS / "rtx3090x2_driver535.json"
NO_NVML = SNAPSHOTS / "no_nvml.json"

REQUIRED_CATALOG_KEYS = {
    "rtx-3060", "rtx-3080", "rtx-3090", "rtx-4060-ti", "rtx-4070", "rtx-4080", "rtx-4090", "rtx-5060-ti",
    "rtx-5070-ti", "rtx-5080", "rtx-5090", "a100-40gb", "a100-80gb", "l40s", "h100-80gb", "h200",
}  # fmt: skip


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
    gpus, note = hw.read_gpus(SnapshotNvml(RTX4090))
    assert note is None
    (gpu,) = gpus
    assert gpu.name == "NVIDIA GeForce RTX 4090"
    assert gpu.vram_total_bytes == 25757220864
    assert gpu.vram_free_bytes + gpu.vram_used_bytes == gpu.vram_total_bytes
    assert (gpu.pcie_gen, gpu.pcie_width, gpu.compute_capability) == (4, 16, (8, 9))
    assert gpu.driver_version == "550.120"
    assert gpu.source == "nvml"


def test_bandwidth_is_bus_width_times_double_data_rate_clock() -> None:
    (rtx4090,), _ = hw.read_gpus(SnapshotNvml(RTX4090))
    (h100,), _ = hw.read_gpus(SnapshotNvml(H100))
    assert rtx4090.mem_bandwidth_bytes_s == 384 // 8 * 10_501_000_000 * 2  # 1008.1 GB/s
    assert rtx4090.mem_bandwidth_bytes_s == pytest.approx(1008 * GB, rel=0.001)
    assert h100.mem_bandwidth_bytes_s == pytest.approx(3.35e12, rel=0.001)


def test_detected_bandwidth_agrees_with_the_catalog_spec_sheet() -> None:
    catalog = hw.load_gpu_catalog()
    for path, key in ((RTX4090, "rtx-4090"), (H100, "h100-80gb"), (RTX3090X2, "rtx-3090")):
        gpus, _ = hw.read_gpus(SnapshotNvml(path))
        for gpu in gpus:
            assert gpu.mem_bandwidth_bytes_s == pytest.approx(catalog[key].mem_bandwidth_bytes_s, rel=0.005)
            assert gpu.vram_total_bytes == catalog[key].vram_bytes


def test_two_gpus_keep_their_own_links_and_llama_names() -> None:
    gpus, _ = hw.read_gpus(SnapshotNvml(RTX3090X2))
    assert [gpu.llama_name for gpu in gpus] == ["CUDA0", "CUDA1"]
    assert [(gpu.pcie_gen, gpu.pcie_width) for gpu in gpus] == [(4, 16), (3, 4)]
    assert gpus[0].vram_free_bytes != gpus[1].vram_free_bytes


def test_every_nvml_session_is_shut_down() -> None:
    nvml = SnapshotNvml(RTX3090X2)
    hw.read_gpus(nvml)
    hw.gpu_free_bytes(1, nvml)
    hw.gpu_process_memory_bytes(7311, nvml)
    hw.record_snapshot(nvml)
    assert nvml.open_sessions == 0


def test_idle_pcie_link_does_not_hide_the_max_generation() -> None:
    nvml = nvml_with(RTX4090, curr_pcie_link_generation=1)
    (gpu,), _ = hw.read_gpus(nvml)
    assert gpu.pcie_gen == 4


def test_current_pcie_generation_stands_in_when_max_is_not_reported() -> None:
    nvml = nvml_with(RTX4090, max_pcie_link_generation=NOT_SUPPORTED, curr_pcie_link_generation=3)
    (gpu,), _ = hw.read_gpus(nvml)
    assert gpu.pcie_gen == 3


def test_unsupported_optional_queries_degrade_to_none() -> None:
    nvml = nvml_with(
        RTX4090,
        max_pcie_link_generation=NOT_SUPPORTED,
        curr_pcie_link_generation=NOT_SUPPORTED,
        max_pcie_link_width=NOT_SUPPORTED,
        cuda_compute_capability={"nvml_error": "FUNCTION_NOT_FOUND"},
    )
    (gpu,), _ = hw.read_gpus(nvml)
    assert (gpu.pcie_gen, gpu.pcie_width, gpu.compute_capability) == (None, None, None)
    assert gpu.vram_total_bytes == 25757220864


def test_missing_bus_width_falls_back_to_the_catalog_bandwidth() -> None:
    (gpu,), note = hw.read_gpus(nvml_with(RTX4090, memory_bus_width_bits=NOT_SUPPORTED))
    assert gpu.mem_bandwidth_bytes_s == 1008 * GB
    assert note is not None and "rtx-4090" in note


def test_unknown_card_without_bus_width_gets_the_conservative_generic_bandwidth() -> None:
    nvml = nvml_with(RTX4090, name="NVIDIA Made Up 9000", max_mem_clock_mhz=0)
    (gpu,), note = hw.read_gpus(nvml)
    assert gpu.mem_bandwidth_bytes_s == hw.GENERIC_GPU_BANDWIDTH_BYTES_S
    assert note is not None and "not in the catalog" in note


def test_a_gpu_nvml_cannot_read_is_left_out_with_a_note() -> None:
    data = snapshot_data(RTX3090X2)
    data["devices"][0]["memory"] = NOT_SUPPORTED
    gpus, note = hw.read_gpus(SnapshotNvml(data))
    assert [gpu.llama_name for gpu in gpus] == ["CUDA1"]
    assert note is not None and note.startswith("GPU 0:")


def test_no_nvml_snapshot_means_cpu_only_with_a_note() -> None:
    gpus, note = hw.read_gpus(SnapshotNvml(NO_NVML))
    assert gpus == ()
    assert note is not None and note.startswith("NVML not available: ") and "CPU only" in note
    hardware = hw.detect_hardware(SnapshotNvml(NO_NVML))
    assert hardware.cpu_only
    assert hardware.notes[0] == note


def test_driver_without_gpus_is_cpu_only_with_a_note() -> None:
    data = snapshot_data(H100)
    data["devices"] = []
    gpus, note = hw.read_gpus(SnapshotNvml(data))
    assert gpus == ()
    assert note == "NVML found no GPUs; planning for CPU only"


def test_real_pynvml_degrades_instead_of_crashing() -> None:
    """On a machine without an NVIDIA driver this is the no-NVML path; with one, real GPUs must read sanely."""
    hardware = hw.detect_hardware()
    if hardware.cpu_only:
        assert any(note.startswith("NVML") and "CPU only" in note for note in hardware.notes)
        assert hw.gpu_free_bytes(0) is None
        assert hw.gpu_process_memory_bytes(1) is None
    else:
        assert all(gpu.vram_total_bytes > GiB and gpu.mem_bandwidth_bytes_s > 0 for gpu in hardware.gpus)


def test_record_snapshot_captures_no_nvml_as_an_init_error() -> None:
    assert hw.record_snapshot(SnapshotNvml(NO_NVML)) == {"format": 1, "init_error": "LIBRARY_NOT_FOUND"}


@pytest.mark.parametrize("path", [RTX4090, H100, RTX3090X2, NO_NVML], ids=lambda p: p.stem)
def test_record_snapshot_captures_everything_the_snapshot_replays(path: Path) -> None:
    original = snapshot_data(path)
    original.pop("description")
    assert hw.record_snapshot(SnapshotNvml(original)) == original


def test_recorded_errors_replay_as_the_same_errors() -> None:
    nvml = nvml_with(RTX4090, memory_bus_width_bits=NOT_SUPPORTED)
    recorded = hw.record_snapshot(nvml)
    assert recorded["devices"][0]["memory_bus_width_bits"] == NOT_SUPPORTED
    assert hw.read_gpus(SnapshotNvml(recorded)) == hw.read_gpus(nvml)


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
    assert hw.gpu_process_memory_bytes(48213, SnapshotNvml(RTX4090)) == 19473 * MiB


def test_process_memory_sums_over_gpus() -> None:
    assert hw.gpu_process_memory_bytes(7311, SnapshotNvml(RTX3090X2)) == (10692 + 11534) * MiB


def test_process_memory_is_zero_for_a_pid_on_no_gpu() -> None:
    assert hw.gpu_process_memory_bytes(1, SnapshotNvml(RTX4090)) == 0


def test_process_memory_is_unknown_when_nvml_will_not_say() -> None:
    wddm = nvml_with(RTX4090, compute_processes=[{"pid": 48213, "used_gpu_memory": None}])
    assert hw.gpu_process_memory_bytes(48213, wddm) is None
    assert hw.gpu_process_memory_bytes(48213, SnapshotNvml(NO_NVML)) is None


def test_gpu_free_bytes_reads_the_named_gpu() -> None:
    nvml = SnapshotNvml(RTX3090X2)
    assert hw.gpu_free_bytes(0, nvml) == 13847494656
    assert hw.gpu_free_bytes(1, nvml) == 13396606976


def test_gpu_free_bytes_is_none_for_a_missing_gpu_or_no_nvml() -> None:
    assert hw.gpu_free_bytes(2, SnapshotNvml(RTX3090X2)) is None
    assert hw.gpu_free_bytes(-1, SnapshotNvml(RTX3090X2)) is None
    assert hw.gpu_free_bytes(0, SnapshotNvml(NO_NVML)) is None


# --------------------------------------------------------------------------------------------- numbering notes


def test_mixed_gpus_without_pci_bus_order_get_a_numbering_note() -> None:
    gpus = (hw.catalog_gpu("rtx-3060", 0), hw.catalog_gpu("rtx-4090", 1))
    assert len(hw._cuda_numbering_notes(gpus, {})) == 1
    assert hw._cuda_numbering_notes(gpus, {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}) == ()


def test_cuda_visible_devices_gets_a_numbering_note() -> None:
    gpus = (hw.catalog_gpu("rtx-3090", 0), hw.catalog_gpu("rtx-3090", 1))
    assert hw._cuda_numbering_notes(gpus, {}) == ()
    (note,) = hw._cuda_numbering_notes(gpus, {"CUDA_VISIBLE_DEVICES": "1"})
    assert "CUDA_VISIBLE_DEVICES='1'" in note


# ------------------------------------------------------------------------------------------------------- host


def test_host_values_are_sane() -> None:
    host = hw.read_host()
    assert host.ram_total_bytes > 256 * MiB
    assert 0 < host.ram_available_bytes <= host.ram_total_bytes
    assert 1 <= host.cpu_physical_cores <= host.cpu_logical_cores
    assert host.cpu_model.strip()


def test_detected_hardware_carries_the_host_and_a_default_ram_bandwidth() -> None:
    hardware = hw.detect_hardware(SnapshotNvml(RTX4090))
    assert len(hardware.gpus) == 1 and not hardware.cpu_only
    assert hardware.ram_total_bytes == hw.read_host().ram_total_bytes
    assert hardware.ram_bandwidth_bytes_s == hw.default_ram_bandwidth_bytes_s(hardware.cpu_physical_cores)


def test_cpu_model_comes_from_model_name_on_x86() -> None:
    cpuinfo = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel\t\t: 33\nmodel name\t: AMD Ryzen 9 5950X 16-Core\n"
    assert hw.cpu_model_from_cpuinfo(cpuinfo) == "AMD Ryzen 9 5950X 16-Core"


def test_cpu_model_falls_back_to_hardware_on_arm_and_skips_numeric_model() -> None:
    assert hw.cpu_model_from_cpuinfo("processor\t: 0\nmodel\t: 33\nHardware\t: BCM2835\n") == "BCM2835"
    assert hw.cpu_model_from_cpuinfo("processor\t: 0\nCPU part\t: 0xd0c\n") is None


def test_cgroup_v2_limit_is_the_tightest_up_the_tree(tmp_path: Path) -> None:
    (tmp_path / "user.slice" / "app").mkdir(parents=True)
    (tmp_path / "memory.max").write_text("max\n")
    (tmp_path / "user.slice" / "memory.max").write_text(f"{8 * GiB}\n")
    (tmp_path / "user.slice" / "app" / "memory.max").write_text("max\n")
    assert hw.cgroup_memory_limit_bytes("0::/user.slice/app\n", tmp_path) == 8 * GiB


def test_cgroup_v1_memory_limit_is_read(tmp_path: Path) -> None:
    (tmp_path / "memory").mkdir()
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text(f"{4 * GiB}\n")
    text = "12:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n"
    assert hw.cgroup_memory_limit_bytes(text, tmp_path) == 4 * GiB


def test_no_cgroup_limit_reads_as_none(tmp_path: Path) -> None:
    (tmp_path / "memory.max").write_text("max\n")
    assert hw.cgroup_memory_limit_bytes("0::/\n", tmp_path) is None


def test_default_ram_bandwidth_is_conservative_and_grows_with_many_cores() -> None:
    desktop = hw.default_ram_bandwidth_bytes_s(8)
    assert 30 * GB <= desktop <= 60 * GB
    assert hw.default_ram_bandwidth_bytes_s(64) > desktop


def test_measured_ram_bandwidth_is_plausible() -> None:
    measured = hw.measure_ram_bandwidth_bytes_s(seconds=0.02, size_bytes=16 * MiB)
    assert 1 * GB < measured < 10_000 * GB


# ------------------------------------------------------------------------------------------------ GPU catalog


def test_catalog_has_every_required_card_with_sane_values() -> None:
    catalog = hw.load_gpu_catalog()
    assert set(catalog) >= REQUIRED_CATALOG_KEYS
    for key, entry in catalog.items():
        assert 8 * GiB <= entry.vram_bytes <= 160 * GiB, key
        assert 200 * GB <= entry.mem_bandwidth_bytes_s <= 6000 * GB, key
        assert entry.pcie_gen in (3, 4, 5) and entry.pcie_width in (8, 16), key
        assert entry.compute_capability is not None and entry.compute_capability >= (8, 0), key
        assert entry.source_note and "\n" not in entry.source_note, key


def test_catalog_memory_sizes_are_what_nvml_reports() -> None:
    catalog = hw.load_gpu_catalog()
    assert catalog["rtx-4090"].vram_bytes == 25757220864
    assert catalog["rtx-3090"].vram_bytes == 24576 * MiB
    assert catalog["h100-80gb"].vram_bytes == 81559 * MiB
    assert catalog["rtx-3060"].vram_bytes == 12 * GiB
    assert catalog["rtx-3080"].vram_bytes == 10 * GiB


def test_every_catalog_key_and_name_resolves_to_itself() -> None:
    catalog = hw.load_gpu_catalog()
    for key, entry in catalog.items():
        assert hw.find_catalog_gpu(key, catalog).key == key
        assert hw.find_catalog_gpu(key.upper(), catalog).key == key
        for name in entry.nvml_names:
            assert hw.catalog_entry_for_name(name, catalog) == entry


@pytest.mark.parametrize(
    ("spelling", "key"),
    [
        ("RTX 4090", "rtx-4090"),
        ("4090", "rtx-4090"),
        ("NVIDIA GeForce RTX 4090", "rtx-4090"),
        ("rtx4090 24gb", "rtx-4090"),
        ("4060ti", "rtx-4060-ti"),
        ("RTX 5070 Ti", "rtx-5070-ti"),
        ("h100", "h100-80gb"),
        ("H100 SXM", "h100-80gb"),
        ("NVIDIA H100 80GB HBM3", "h100-80gb"),
        ("A100 80GB", "a100-80gb"),
        ("NVIDIA A100-PCIE-40GB", "a100-40gb"),
        ("L40S", "l40s"),
        ("h200", "h200"),
    ],
)
def test_catalog_accepts_the_ways_people_name_cards(spelling: str, key: str) -> None:
    assert hw.find_catalog_gpu(spelling).key == key


@pytest.mark.parametrize("spelling", ["4060", "rtx 3060 8gb", "h100 pcie", "rtx-9090", "", "gtx"])
def test_catalog_does_not_guess_a_different_card(spelling: str) -> None:
    with pytest.raises(TunerError, match="unknown GPU") as raised:
        hw.find_catalog_gpu(spelling)
    assert raised.value.hint is not None and "rtx-4090" in raised.value.hint and "h200" in raised.value.hint


def test_ambiguous_card_names_both_candidates() -> None:
    with pytest.raises(TunerError, match="ambiguous") as raised:
        hw.find_catalog_gpu("a100")
    assert "a100-40gb" in str(raised.value) and "a100-80gb" in str(raised.value)


def test_catalog_gpu_is_the_whole_card_free() -> None:
    gpu = hw.catalog_gpu("rtx-4090")
    assert gpu.source == "catalog" and gpu.index == 0 and gpu.llama_name == "CUDA0"
    assert gpu.vram_free_bytes == gpu.vram_total_bytes == 25757220864 and gpu.vram_used_bytes == 0
    assert gpu.mem_bandwidth_bytes_s == 1008 * GB


@pytest.mark.parametrize(
    "contents",
    [
        "gpus: [",
        "format: 1\n",
        "gpus:\n  x:\n    name: X\n    vram_bytes: 24G\n    mem_bandwidth_gb_s: 100\n    source: s\n",
        "gpus:\n  x:\n    name: X\n    vram_bytes: 25769803776\n    mem_bandwidth_gb_s: 0\n    source: s\n",
        "gpus:\n  x:\n    name: X\n    vram_bytes: 25769803776\n    mem_bandwidth_gb_s: 900\n"
        "    compute_capability: 8.6\n    source: s\n",
    ],
    ids=["bad-yaml", "no-gpus", "vram-text", "zero-bandwidth", "capability-float"],
)
def test_broken_catalog_is_a_tuner_error_naming_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, contents: str
) -> None:
    (tmp_path / "gpus.yaml").write_text(contents)
    monkeypatch.setenv("TUNER_CATALOG_DIR", str(tmp_path))
    with pytest.raises(TunerError, match=r"gpus\.yaml"):
        hw.load_gpu_catalog()


def test_missing_catalog_is_a_tuner_error_with_a_hint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNER_CATALOG_DIR", str(tmp_path))
    with pytest.raises(TunerError, match="cannot read the GPU catalog") as raised:
        hw.load_gpu_catalog()
    assert raised.value.hint is not None and "TUNER_CATALOG_DIR" in raised.value.hint


# ------------------------------------------------------------------------------------------------ hardware_for


def test_no_gpu_option_detects_this_machine() -> None:
    hardware = hw.hardware_for(None, None, nvml=SnapshotNvml(RTX3090X2))
    assert [gpu.source for gpu in hardware.gpus] == ["nvml", "nvml"]


def test_gpu_none_is_cpu_only_with_the_live_host() -> None:
    hardware = hw.hardware_for("none", None, nvml=SnapshotNvml(RTX4090))
    assert hardware.cpu_only
    assert hardware.cpu_logical_cores == hw.read_host().cpu_logical_cores


def test_catalog_gpu_option_plans_for_that_card_with_the_live_host() -> None:
    hardware = hw.hardware_for("RTX 4090", None, nvml=SnapshotNvml(NO_NVML))
    (gpu,) = hardware.gpus
    assert gpu.source == "catalog" and gpu.vram_free_bytes == 25757220864
    assert hardware.ram_total_bytes == hw.read_host().ram_total_bytes
    assert any("catalog" in note for note in hardware.notes)


@pytest.mark.parametrize("spelling", ["rtx-3090x2", "3090 x2", "RTX 3090*2", "rtx-3090×2"])
def test_count_suffix_plans_for_several_cards(spelling: str) -> None:
    hardware = hw.hardware_for(spelling)
    assert [gpu.llama_name for gpu in hardware.gpus] == ["CUDA0", "CUDA1"]
    assert {gpu.name for gpu in hardware.gpus} == {"NVIDIA GeForce RTX 3090"}


def test_count_out_of_range_is_a_tuner_error() -> None:
    with pytest.raises(TunerError, match="between 1 and 16"):
        hw.hardware_for("rtx-3090x0")


def test_unknown_gpu_option_is_a_tuner_error_listing_valid_keys() -> None:
    with pytest.raises(TunerError, match="unknown GPU 'rtx-9090'") as raised:
        hw.hardware_for("rtx-9090")
    assert raised.value.hint is not None and all(key in raised.value.hint for key in REQUIRED_CATALOG_KEYS)


def test_vram_overrides_gpu0_of_the_detected_machine_only() -> None:
    hardware = hw.hardware_for(None, "20G", nvml=SnapshotNvml(RTX3090X2))
    first, second = hardware.gpus
    assert (first.vram_total_bytes, first.vram_free_bytes, first.vram_used_bytes) == (20 * GiB, 20 * GiB, 0)
    assert second.vram_free_bytes == 13396606976
    assert any("20.00 GiB (--vram)" in note for note in hardware.notes)


def test_vram_override_notes_when_it_exceeds_what_is_free_now() -> None:
    hardware = hw.hardware_for(None, "24G", nvml=SnapshotNvml(RTX4090))
    assert any("more than the" in note for note in hardware.notes)


def test_vram_overrides_a_catalog_card() -> None:
    (gpu,) = hw.hardware_for("h100", "40G").gpus
    assert gpu.vram_total_bytes == 40 * GiB and gpu.source == "catalog"


def test_vram_without_any_gpu_makes_a_generic_one() -> None:
    hardware = hw.hardware_for(None, "12", nvml=SnapshotNvml(NO_NVML))
    (gpu,) = hardware.gpus
    assert gpu.vram_total_bytes == gpu.vram_free_bytes == 12 * GiB
    assert gpu.source == "manual" and gpu.llama_name == "CUDA0"
    assert gpu.mem_bandwidth_bytes_s == hw.GENERIC_GPU_BANDWIDTH_BYTES_S


def test_vram_with_gpu_none_is_a_tuner_error() -> None:
    with pytest.raises(TunerError, match="--gpu none"):
        hw.hardware_for("none", "24G")


@pytest.mark.parametrize("vram", ["lots", "0", "-4G"])
def test_bad_vram_is_a_tuner_error(vram: str) -> None:
    with pytest.raises(TunerError):
        hw.hardware_for("rtx-4090", vram)

