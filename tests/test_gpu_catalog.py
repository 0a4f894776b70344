"""The GPU catalog (tuner.hardware.catalog): profiles/gpus.yaml checked, and cards found by the names people and
NVML give them."""

from __future__ import annotations

from pathlib import Path

import pytest

from tuner.errors import TunerError
from tuner.hardware.catalog import (
    catalog_entry_for_name,
    catalog_gpu,
    find_catalog_gpu,
    load_gpu_catalog,
)
from tuner.hardware.gpu import GB
from tuner.hardware.machine import hardware_for
from tuner.units import GiB, MiB

REQUIRED_CATALOG_KEYS = {
    "rtx-3060", "rtx-3080", "rtx-3090", "rtx-4060-ti", "rtx-4070", "rtx-4080", "rtx-4090", "rtx-5060-ti",
    "rtx-5070-ti", "rtx-5080", "rtx-5090", "a100-40gb", "a100-80gb", "l40s", "h100-80gb", "h200",
}  # fmt: skip


def test_catalog_has_every_required_card_with_sane_values() -> None:
    catalog = load_gpu_catalog()
    assert set(catalog) >= REQUIRED_CATALOG_KEYS
    for key, entry in catalog.items():
        assert 8 * GiB <= entry.vram_bytes <= 160 * GiB, key
        assert 200 * GB <= entry.mem_bandwidth_bytes_s <= 6000 * GB, key
        assert entry.pcie_gen in (3, 4, 5) and entry.pcie_width in (8, 16), key
        assert entry.compute_capability is not None and entry.compute_capability >= (8, 0), key
        assert entry.source_note and "\n" not in entry.source_note, key


def test_catalog_memory_sizes_are_what_nvml_reports() -> None:
    catalog = load_gpu_catalog()
    assert catalog["rtx-4090"].vram_bytes == 25757220864
    assert catalog["rtx-3090"].vram_bytes == 24576 * MiB
    assert catalog["h100-80gb"].vram_bytes == 81559 * MiB
    assert catalog["rtx-3060"].vram_bytes == 12 * GiB
    assert catalog["rtx-3080"].vram_bytes == 10 * GiB


def test_every_catalog_key_and_name_resolves_to_itself() -> None:
    catalog = load_gpu_catalog()
    for key, entry in catalog.items():
        assert find_catalog_gpu(key, catalog).key == key
        assert find_catalog_gpu(key.upper(), catalog).key == key
        for name in entry.nvml_names:
            assert catalog_entry_for_name(name, catalog) == entry


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
    assert find_catalog_gpu(spelling).key == key


@pytest.mark.parametrize("spelling", ["4060", "rtx 3060 8gb", "h100 pcie", "rtx-9090", "", "gtx"])
def test_catalog_does_not_guess_a_different_card(spelling: str) -> None:
    with pytest.raises(TunerError, match="unknown GPU") as raised:
        find_catalog_gpu(spelling)
    assert raised.value.hint is not None and "rtx-4090" in raised.value.hint and "h200" in raised.value.hint


def test_ambiguous_card_names_both_candidates() -> None:
    with pytest.raises(TunerError, match="ambiguous") as raised:
        find_catalog_gpu("a100")
    assert "a100-40gb" in str(raised.value) and "a100-80gb" in str(raised.value)


def test_catalog_gpu_is_the_whole_card_free() -> None:
    gpu = catalog_gpu("rtx-4090")
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
        load_gpu_catalog()


def test_missing_catalog_is_a_tuner_error_with_a_hint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNER_CATALOG_DIR", str(tmp_path))
    with pytest.raises(TunerError, match="cannot read the GPU catalog") as raised:
        load_gpu_catalog()
    assert raised.value.hint is not None and "TUNER_CATALOG_DIR" in raised.value.hint


def test_unknown_gpu_option_is_a_tuner_error_listing_valid_keys() -> None:
    with pytest.raises(TunerError, match="unknown GPU 'rtx-9090'") as raised:
        hardware_for("rtx-9090")
    assert raised.value.hint is not None and all(key in raised.value.hint for key in REQUIRED_CATALOG_KEYS)
