"""The machine tuner plans for (tuner.hardware.machine): this one through recorded NVML snapshots (tests/data/nvml),
or catalog cards and --vram with the live host; and where tuner's files live (tuner.paths)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tuner import hardware as hw
from tuner.errors import TunerError
from tuner.hardware import host, machine
from tuner.hardware.snapshot import SnapshotNvml
from tuner.units import GiB

SNAPSHOTS = Path(__file__).parent / "data" / "nvml"
RTX4090 = SNAPSHOTS / "rtx4090_driver550.json"
RTX3090X2 = SNAPSHOTS / "rtx3090x2_driver535.json"
NO_NVML = SNAPSHOTS / "no_nvml.json"


# --------------------------------------------------------------------------------------------- numbering notes


def test_mixed_gpus_without_pci_bus_order_get_a_numbering_note() -> None:
    gpus = (hw.catalog_gpu("rtx-3060", 0), hw.catalog_gpu("rtx-4090", 1))
    assert len(machine._cuda_numbering_notes(gpus, {})) == 1
    assert machine._cuda_numbering_notes(gpus, {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}) == ()


def test_cuda_visible_devices_gets_a_numbering_note() -> None:
    gpus = (hw.catalog_gpu("rtx-3090", 0), hw.catalog_gpu("rtx-3090", 1))
    assert machine._cuda_numbering_notes(gpus, {}) == ()
    (note,) = machine._cuda_numbering_notes(gpus, {"CUDA_VISIBLE_DEVICES": "1"})
    assert "CUDA_VISIBLE_DEVICES='1'" in note


# ------------------------------------------------------------------------------------------------------- host


def test_detected_hardware_carries_the_host_and_a_default_ram_bandwidth() -> None:
    hardware = hw.detect_hardware(SnapshotNvml(RTX4090))
    assert len(hardware.gpus) == 1 and not hardware.cpu_only
    assert hardware.ram_total_bytes == hw.read_host().ram_total_bytes
    assert hardware.ram_bandwidth_bytes_s == host.default_ram_bandwidth_bytes_s(hardware.cpu_physical_cores)


# ------------------------------------------------------------------------------------------------ hardware_for


def test_no_gpu_option_detects_this_machine() -> None:
    hardware = hw.hardware_for(None, None, nvml=SnapshotNvml(RTX3090X2))
    assert [gpu.source for gpu in hardware.gpus] == ["nvml", "nvml"]


def test_gpu_none_is_cpu_only_with_the_live_host() -> None:
    hardware = hw.hardware_for("none", None, nvml=SnapshotNvml(RTX4090))
    assert hardware.cpu_only
    assert hardware.cpu_logical_cores == hw.read_host().cpu_logical_cores


def test_catalog_gpu_option_plans_for_that_card_on_an_assumed_desktop_not_the_live_host() -> None:
    hardware = hw.hardware_for("RTX 4090", None, nvml=SnapshotNvml(NO_NVML))
    (gpu,) = hardware.gpus
    assert gpu.source == "catalog" and gpu.vram_free_bytes == 25757220864
    assert (hardware.host_source, hardware.ram_total_bytes, hardware.cpu_physical_cores) == ("assumed", 64 * GiB, 8)
    assert hardware.ram_available_bytes == 60 * GiB and hardware.cpu_busy_logical == 0.0
    assert any("catalog" in note for note in hardware.notes)
    assert any(note.startswith("host assumed: 64.00 GiB of RAM") for note in hardware.notes)
    # two 80 GB cards: a server with four times the cards' memory rounded up, and many cores
    big = hw.hardware_for("h100-80gbx2", None, nvml=SnapshotNvml(NO_NVML))
    assert (big.ram_total_bytes, big.cpu_physical_cores) == (512 * GiB, 32)
    given = hw.hardware_for("RTX 4090", None, nvml=SnapshotNvml(NO_NVML), host=hw.HostSpec.from_options("32G"))
    assert (given.host_source, given.ram_total_bytes, given.ram_available_bytes) == ("given", 32 * GiB, 28 * GiB)


@pytest.mark.parametrize("spelling", ["rtx-3090x2", "3090 x2", "RTX 3090*2", "rtx-3090×2"])
def test_count_suffix_plans_for_several_cards(spelling: str) -> None:
    hardware = hw.hardware_for(spelling)
    assert [gpu.llama_name for gpu in hardware.gpus] == ["CUDA0", "CUDA1"]
    assert {gpu.name for gpu in hardware.gpus} == {"NVIDIA GeForce RTX 3090"}


def test_count_out_of_range_is_a_tuner_error() -> None:
    with pytest.raises(TunerError, match="between 1 and 16"):
        hw.hardware_for("rtx-3090x0")


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
