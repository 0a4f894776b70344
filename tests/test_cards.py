"""Built-in model cards: layouts without files, recipes against real file sizes, presets, matching local files."""

from __future__ import annotations

import json
import math
import shutil
from collections import Counter
from pathlib import Path

import pytest

from tuner.cards import (
    DEFAULT_CARD,
    card_candidates,
    card_layout,
    iter_recipe_types,
    known_size_rows,
    list_cards,
    load_card,
    match_card,
    quant_mix,
    rank_by_quality,
    recipe_class,
    recipe_tensors,
    use_more_bits,
)
from tuner.cli import main as cli_main
from tuner.errors import TunerError
from tuner.layout import ModelLayout, TensorClass
from tuner.models import QuantCandidate, local_layout, resolve_candidates, resolve_layout
from tuner.synth import SynthSpec, qwen35_35b_a3b_spec, spec_from_card, vocabulary, write_synthetic_gguf
from tuner.units import GiB, MiB

MAIN = "qwen3.5-35b-a3b"
# How close the plain llama-quantize recipes must come to real files made with plain llama-quantize (lmstudio
# Q4_K_M, Q8_0 and BF16, whose every type is fixed by the file type). BF16's reference figure is rounded to 0.1 GiB.
PLAIN_RECIPE_TOLERANCE = 0.002
# Uploaders' own mixes (unsloth, bartowski): each recorded mix must land this close to the file it is recorded for.
MIX_TOLERANCE = 0.005


@pytest.fixture(autouse=True)
def _default_catalogs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TUNER_CATALOG_DIR", raising=False)


def _params(layout: ModelLayout) -> int:
    return sum(math.prod(t.shape) for t in layout.tensors)


# --- loading ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["qwen3.5-35b-a3b", "Qwen3.5-35B-A3B", "QWEN3.5-35B-A3B", "qwen35-35b-a3b"])
def test_load_card_accepts_key_name_and_alias_in_any_case(key: str) -> None:
    assert load_card(key).key == MAIN


def test_unknown_card_error_lists_the_cards() -> None:
    with pytest.raises(TunerError, match=r"no model card 'qwen9' \(cards: qwen3\.5-35b-a3b, "):
        load_card("qwen9")


def test_list_cards_holds_the_family_with_the_main_model_first() -> None:
    keys = [c.key for c in list_cards()]
    assert keys[0] == DEFAULT_CARD == MAIN
    assert set(keys) == {MAIN, "qwen3.6-35b-a3b", "qwen3.5-27b", "qwen3.5-122b-a10b", "qwen3.5-397b-a17b"}


def test_every_card_repo_with_a_vision_projector_knows_its_size(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    for card in list_cards():
        for repo in card.repos:
            assert not repo.mmproj or repo.mmproj_bytes > 800_000_000, (card.key, repo.repo)
    assert load_card("qwen3.6-35b-a3b").repo().mmproj_bytes == load_card(MAIN).repo().mmproj_bytes == 899_283_648
    # the 27B and 122B projectors end in the wider text width: 4608 x (5120 | 3072) instead of 4608 x 2048
    widen = 4608 * 2 + 4
    assert load_card("qwen3.5-27b").repo().mmproj_bytes == 899_283_648 + widen * (5120 - 2048)
    assert load_card("qwen3.5-122b-a10b").repo().mmproj_bytes == 899_283_648 + widen * (3072 - 2048)

    import yaml

    src = Path(__file__).resolve().parent.parent / "profiles" / "models"
    shutil.copytree(src, tmp_path / "models")
    card_file = tmp_path / "models" / "qwen3.5-27b.yaml"
    data = yaml.safe_load(card_file.read_text(encoding="utf-8"))
    del data["repos"][0]["mmproj_bytes"]
    card_file.write_text(yaml.safe_dump(data), encoding="utf-8")
    monkeypatch.setenv("TUNER_CATALOG_DIR", str(tmp_path))
    with pytest.raises(TunerError, match=r"names an mmproj but no mmproj_bytes"):
        load_card(MAIN)


def test_card_with_a_recipe_missing_a_tensor_class_is_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import yaml

    src = Path(__file__).resolve().parent.parent / "profiles" / "models"
    shutil.copytree(src, tmp_path / "models")
    recipes = yaml.safe_load((tmp_path / "models" / "_recipes.yaml").read_text(encoding="utf-8"))
    del recipes["recipes"]["Q4_K_M"]["types"]["experts_down"]
    (tmp_path / "models" / "_recipes.yaml").write_text(yaml.safe_dump(recipes), encoding="utf-8")
    monkeypatch.setenv("TUNER_CATALOG_DIR", str(tmp_path))
    with pytest.raises(TunerError, match=r"recipe Q4_K_M lacks tensor classes experts_down$"):
        load_card(MAIN)


# --- layouts ------------------------------------------------------------------------------------------------------

def test_card_layout_has_the_real_tensor_and_parameter_counts() -> None:
    card = load_card(MAIN)
    text_only = card_layout(card, "Q8_0")
    with_mtp = card_layout(card, "Q8_0", mtp=True)
    # Qwen3.5-35B-A3B's config.json and GGUF metadata: 733 tensors / 34,660,610,688 params;
    # with the MTP layer 753 / 35,505,251,456
    assert (len(text_only.tensors), _params(text_only)) == (733, 34_660_610_688)
    assert (len(with_mtp.tensors), _params(with_mtp)) == (753, 35_505_251_456)
    assert (text_only.n_layer, text_only.n_layer_all, with_mtp.n_layer, with_mtp.n_layer_all) == (40, 40, 40, 41)
    experts = sum(math.prod(t.shape) for t in text_only.tensors if t.cls is TensorClass.EXPERTS)
    assert experts == 32_212_254_720


def test_card_layout_sizes_kv_and_recurrent_state_as_llama_cpp() -> None:
    layout = card_layout(load_card(MAIN), "Q4_K_M")
    assert layout.attention_layers == tuple(range(3, 40, 4))
    assert len(layout.recurrent_layers) == 30
    assert layout.kv_bytes_per_cell("f16", "f16") == 20_480
    assert layout.kv_bytes_per_cell("q8_0", "q8_0") == 10_880
    assert round(layout.recurrent_bytes_per_seq() / MiB, 2) == 62.81
    assert layout.n_vocab == 248_320 and layout.n_ctx_train == 262_144


def test_card_layout_equals_the_layout_read_from_a_gguf_written_with_the_recipe(tmp_path: Path) -> None:
    """The card path (tensor_plan + recipe -> layout_from_metadata) and the file path (a sparse GGUF with the same
    types, read back through the header parser) agree tensor by tensor."""
    card = load_card(MAIN)
    types = {name: t for name, _cls, t in iter_recipe_types(card, "Q4_K_M")}
    base_vocab = len(vocabulary(SynthSpec())[0])
    spec = qwen35_35b_a3b_spec(name=card.name, extra_vocab=card.vocab_size - base_vocab)
    path = write_synthetic_gguf(tmp_path / "q4km.gguf", spec, type_for=lambda name, role: types[name])[0]

    from_file = local_layout(path)
    from_card = card_layout(card, "Q4_K_M")

    assert [(t.name, t.ggml_type.name, t.shape, t.nbytes, t.cls) for t in from_file.tensors] == \
        [(t.name, t.ggml_type.name, t.shape, t.nbytes, t.cls) for t in from_card.tensors]
    assert from_file.to_dict() | {"file_bytes": 0} == from_card.to_dict() | {"file_bytes": 0}
    assert match_card(from_file) is card


def test_dense_27b_card_builds_a_dense_hybrid_layout() -> None:
    layout = card_layout(load_card("qwen3.5-27b"), "Q8_0")
    assert layout.arch == "qwen35" and layout.n_layer == 64 and not layout.is_moe
    assert len(layout.attention_layers) == 16 and len(layout.recurrent_layers) == 48
    assert layout.bytes_by_class()[TensorClass.DENSE_FFN] > 0
    assert layout.kv_bytes_per_cell("f16", "f16") == 16 * 2 * 4 * 256 * 2


def test_122b_card_has_the_reported_parameter_count() -> None:
    layout = card_layout(load_card("qwen3.5-122b-a10b"), "Q4_K_M")
    assert layout.n_layer == 48 and len(layout.attention_layers) == 12 and layout.n_expert == 256
    assert round(_params(layout) / 1e9, 2) == 122.11  # "Total Parameters 122.11B" as llama.cpp users report


def test_397b_card_has_the_config_shapes_and_the_derived_parameter_count() -> None:
    """60 blocks (15 attention, 45 Gated DeltaNet), 512 experts of which 10 are used; the parameter count is the
    shape formula's, which gives the 35B-A3B's known count exactly (checked above through the same layouts)."""
    card = load_card("qwen3.5-397b-a17b")
    layout = card_layout(card, "Q4_K_M")
    assert layout.n_layer == 60 and layout.attention_layers == tuple(range(3, 60, 4))
    assert len(layout.recurrent_layers) == 45 and (layout.n_expert, layout.n_expert_used) == (512, 10)
    assert _params(layout) == 396_346_350_336
    assert layout.kv_bytes_per_cell("f16", "f16") == 30_720
    assert round(layout.recurrent_bytes_per_seq() / MiB, 2) == 186.33
    with_mtp = card_layout(card, "Q4_K_M", mtp=True)
    assert _params(with_mtp) - _params(layout) == 6_595_568_128
    assert card.repo("unsloth/Qwen3.5-397B-A17B-MTP-GGUF").mtp and not card.repo().mtp
    # every quant is over the Hub's 50 GB file limit: the expected files are shards in a folder
    assert all(len(c.files) > 1 and c.files[0].startswith(f"{c.quant}/") for c in card_candidates(card))


# --- recipes ------------------------------------------------------------------------------------------------------

def test_use_more_bits_matches_llama_quant_for_40_and_41_layers() -> None:
    assert [i for i in range(40) if use_more_bits(i, 40)] == [0, 1, 2, 3, 4, *range(7, 35, 3), 35, 36, 37, 38, 39]
    assert [i for i in range(41) if use_more_bits(i, 41)] == [0, 1, 2, 3, 4, *range(7, 35, 3), 35, 36, 37, 38, 39,
                                                              40]


def test_q4_k_m_recipe_gives_q6_k_to_the_more_bits_layers_only() -> None:
    types = {name: t for name, _cls, t in iter_recipe_types(load_card(MAIN), "Q4_K_M", recipe="Q4_K_M")}
    more = {i for i in range(40) if use_more_bits(i, 40)}
    for il in range(40):
        want = "q6_K" if il in more else "q4_K"
        assert types[f"blk.{il}.ffn_down_exps.weight"] == want
        assert types[f"blk.{il}.ffn_down_shexp.weight"] == want
        v = f"blk.{il}.attn_v.weight" if (il + 1) % 4 == 0 else f"blk.{il}.attn_qkv.weight"
        assert types[v] == want
        assert types[f"blk.{il}.ffn_gate_exps.weight"] == "q4_K"
        assert types[f"blk.{il}.ffn_gate_inp.weight"] == "f32"
    assert (types["token_embd.weight"], types["output.weight"], types["output_norm.weight"]) == ("q4_K", "q6_K", "f32")
    assert types["blk.0.ssm_conv1d.weight"] == "f32" and types["blk.0.ssm_alpha.weight"] == "q4_K"
    assert types["blk.3.attn_output.weight"] == "q4_K" and types["blk.0.ssm_out.weight"] == "q4_K"


def test_q3_k_m_recipe_upgrades_the_first_layers() -> None:
    types = {name: t for name, _cls, t in iter_recipe_types(load_card(MAIN), "Q3_K_M", recipe="Q3_K_M")}
    # ffn_down: layer < 40/16 -> q5_K, else q4_K; attn_v/attn_qkv: counter < 2 -> q5_K, else q4_K
    assert [types[f"blk.{i}.ffn_down_exps.weight"] for i in (0, 1, 2, 39)] == ["q5_K", "q5_K", "q4_K", "q4_K"]
    assert [types[f"blk.{i}.attn_qkv.weight"] for i in (0, 1, 2)] == ["q5_K", "q5_K", "q4_K"]
    assert types["blk.3.attn_v.weight"] == "q4_K" and types["blk.3.attn_output.weight"] == "q4_K"
    assert types["blk.0.ffn_up_exps.weight"] == "q3_K" and types["output.weight"] == "q6_K"


def test_mtp_block_is_counted_in_n_layer_all_and_follows_the_recipe() -> None:
    types = {name: t for name, _cls, t in iter_recipe_types(load_card(MAIN), "Q4_K_M", mtp=True, recipe="Q4_K_M")}
    assert types["blk.40.ffn_down_exps.weight"] == "q6_K"  # 40 >= 7*41/8
    assert types["blk.40.nextn.eh_proj.weight"] == "q4_K"
    assert types["blk.40.attn_v.weight"] == "q6_K"


def test_every_planned_tensor_has_a_recipe_class() -> None:
    for card in list_cards():
        classes = Counter(recipe_class(name) for name, _t, _s, _n in recipe_tensors(card, card.recipe("Q8_0"),
                                                                                     mtp=True))
        assert classes["router"] == (int(card.gguf["block_count"]) + 1 if card.gguf.get("expert_count") else 0)
        assert classes["token_embd"] == 1 and classes["output"] == 1


def _size_rows() -> list[dict[str, object]]:
    return [dict(r, card=c.key) for c in list_cards() for r in known_size_rows(c)]


@pytest.mark.parametrize("row", [r for r in _size_rows() if not r["calibration"] and r["recorded"]],
                         ids=lambda r: f"{r['card']}:{r['repo']}:{r['quant']}")
def test_every_recorded_mix_lands_within_half_a_percent_of_its_known_file_size(row: dict[str, object]) -> None:
    """Plain llama-quantize files against the recipe (0.2%), uploaders' files against the mix the card records for
    them (0.5%)."""
    tolerance = PLAIN_RECIPE_TOLERANCE if row["recipe"] == "llama-quantize" else MIX_TOLERANCE
    assert abs(float(row["error"])) <= tolerance, json.dumps(row)


def test_a_file_whose_mix_is_not_recorded_is_never_planned_smaller_than_it_is() -> None:
    rows = [r for r in _size_rows() if not r["recorded"]]
    assert rows  # bartowski's Q2_K: only its size is known
    for row in rows:
        assert int(row["computed_bytes"]) >= int(row["real_bytes"]), json.dumps(row)


def test_every_mix_is_checked_by_a_known_file() -> None:
    card = load_card(MAIN)
    checked = {str(r["mix"]).lower() for r in _size_rows() if r["recorded"] and r["recipe"] == "uploader"
               and abs(float(r["error"])) <= MIX_TOLERANCE}
    assert set(card.mixes) <= checked, sorted(set(card.mixes) - checked)
    for mix in card.mixes.values():
        assert mix.source and mix.confidence in ("header", "size", "guess"), mix.name


def test_unsloths_moe_q4_k_m_mix_reproduces_two_models_files_to_the_byte() -> None:
    """The mix unsloth's Qwen3.5 MoE Q4_K_M files carry: every tensor outside the routed experts q8_0, output q6_K,
    routed gate/up q4_K and down q5_K. 35B-A3B to the byte; 122B-A10B to its two extra shard headers."""
    rows = {(r["card"], r["quant"], r["repo"].split("/")[0]): r for r in _size_rows()}
    a35 = rows[(MAIN, "Q4_K_M", "unsloth")]
    a122 = rows[("qwen3.5-122b-a10b", "Q4_K_M", "unsloth")]
    assert a35["mix"] == a122["mix"] == "unsloth-moe-Q4_K_M"
    assert a35["computed_bytes"] == a35["real_bytes"] == 22_016_023_168
    assert 0 < int(a122["real_bytes"]) - int(a122["computed_bytes"]) < 16_384


def test_ud_q6_k_xl_mix_has_the_type_counts_of_the_real_header() -> None:
    """ik_llama.cpp#1420's load log of unsloth's UD-Q6_K_XL: f32 301, f16 90, q8_0 264, q6_K 78."""
    counts = Counter(t for _n, _c, t in iter_recipe_types(load_card(MAIN), "UD-Q6_K_XL"))
    assert counts == {"f32": 301, "f16": 90, "q8_0": 264, "q6_K": 78}


def test_unrecorded_quant_is_sized_as_the_largest_known_file_of_that_quant_with_a_note() -> None:
    card = load_card(MAIN)
    q6 = quant_mix(card, "Q6_K")  # unsloth's Q6_K: not recorded; bartowski's (larger than the plain recipe) is
    assert not q6.recorded and q6.recipe.name == "bartowski-moe-Q6_K"
    assert q6.note and "not recorded" in q6.note and "bartowski" in q6.note
    iq4 = quant_mix(card, "IQ4_XS")
    assert not iq4.recorded and iq4.recipe.name == "IQ4_XS" and "IQ4_XS" in (iq4.note or "")
    own = quant_mix(card, "Q4_K_M")
    assert own.recorded and own.note is None and own.recipe.name == "unsloth-moe-Q4_K_M"
    assert {c.quant: c.notes for c in card_candidates(card)}["Q6_K"] == (q6.note,)


def test_uploaders_own_quants_plan_offline_like_the_plain_ones(capsys: pytest.CaptureFixture[str]) -> None:
    [ud] = resolve_candidates("qwen3.5-35b-a3b:ud-q4_k_xl")
    assert ud.quant == "UD-Q4_K_XL" and ud.source == "card" and ud.repo == "unsloth/Qwen3.5-35B-A3B-GGUF"
    assert ud.files == ("Qwen3.5-35B-A3B-UD-Q4_K_XL.gguf",)
    assert abs(ud.file_bytes / 22_241_950_336 - 1) < MIX_TOLERANCE
    assert cli_main(["recommend", "qwen3.5-35b-a3b:UD-Q6_K_XL", "--gpu", "rtx-4090", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)["plan"]
    assert plan["quant"] == "UD-Q6_K_XL" and plan["file"] == "Qwen3.5-35B-A3B-UD-Q6_K_XL.gguf"
    with pytest.raises(TunerError, match=r"has no quant 'UD-Q9_K_XL' \(known: BF16, .*UD-Q4_K_XL"):
        resolve_candidates("qwen3.5-35b-a3b:UD-Q9_K_XL")


def test_a_mix_that_does_not_say_where_it_comes_from_is_rejected(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import yaml

    src = Path(__file__).resolve().parent.parent / "profiles" / "models"
    shutil.copytree(src, tmp_path / "models")
    recipes = yaml.safe_load((tmp_path / "models" / "_recipes.yaml").read_text(encoding="utf-8"))
    del recipes["mixes"]["unsloth-moe-Q4_K_M"]["source"]
    (tmp_path / "models" / "_recipes.yaml").write_text(yaml.safe_dump(recipes), encoding="utf-8")
    monkeypatch.setenv("TUNER_CATALOG_DIR", str(tmp_path))
    with pytest.raises(TunerError, match=r"mix unsloth-moe-Q4_K_M does not say where it comes from"):
        load_card(MAIN)


def test_header_calibration_rows_agree_by_construction_and_are_not_the_only_check() -> None:
    """``header_bytes`` was taken from one real file per card: that row must agree to the byte (the YAML is
    consistent), and each card with such a row has another plain-recipe size that checks the recipes for real."""
    rows = _size_rows()
    for row in rows:
        if row["calibration"]:
            assert row["computed_bytes"] == row["real_bytes"], json.dumps(row)
            assert any(r["card"] == row["card"] and r["recipe"] == "llama-quantize" and not r["calibration"]
                       for r in rows), row["card"]
    assert {r["card"] for r in rows if r["calibration"]} == {MAIN, "qwen3.5-27b"}


def test_q8_0_recipe_gives_the_reported_tensor_data() -> None:
    layout = card_layout(load_card(MAIN), "Q8_0")
    data = sum(t.nbytes for t in layout.tensors)
    assert round(data / GiB, 2) == 34.36  # llama-bench size of the unsloth Q8_0
    assert round(sum(t.nbytes for t in card_layout(load_card(MAIN), "BF16").tensors) / GiB, 1) == 64.6


# --- candidates and quality ---------------------------------------------------------------------------------------

def test_card_candidates_are_the_ladder_with_expected_files() -> None:
    """The plain ladder plus the repo's own UD quants whose mix is recorded, ranked by quality (UD-Q6_K_XL by its
    bits per weight, UD-Q4_K_XL below Q4_K_M as the card's quality_order says)."""
    card = load_card(MAIN)
    cands = card_candidates(card)
    assert [c.quant for c in cands] == ["BF16", "Q8_0", "UD-Q6_K_XL", "Q6_K", "Q5_K_M", "Q4_K_M", "UD-Q4_K_XL",
                                        "IQ4_XS", "Q3_K_M", "Q2_K"]
    assert [c.quality_rank for c in cands] == list(range(10, 0, -1))
    by = {c.quant: c for c in cands}
    assert by["Q4_K_M"].files == ("Qwen3.5-35B-A3B-Q4_K_M.gguf",)
    assert by["UD-Q4_K_XL"].files == ("Qwen3.5-35B-A3B-UD-Q4_K_XL.gguf",)
    assert by["BF16"].files == ("BF16/Qwen3.5-35B-A3B-BF16-00001-of-00002.gguf",
                                "BF16/Qwen3.5-35B-A3B-BF16-00002-of-00002.gguf")
    for c in cands:
        assert c.source == "card" and c.repo == "unsloth/Qwen3.5-35B-A3B-GGUF" and c.card_key == MAIN
        assert c.file_bytes == sum(t.nbytes for t in c.layout.tensors) + card.header_bytes == c.layout.file_bytes
        assert c.mmproj == "mmproj-F16.gguf" and c.mmproj_bytes == 899_283_648
    assert by["Q8_0"].file_bytes == 36_903_139_968


def test_mtp_repo_candidates_carry_the_mtp_block() -> None:
    card = load_card("qwen3.6-35b-a3b")
    plain = card_candidates(card)[0]
    mtp = card_candidates(card, "unsloth/Qwen3.6-35B-A3B-MTP-GGUF")[0]
    assert not plain.layout.has_mtp and mtp.layout.has_mtp and mtp.layout.n_layer == 40
    assert mtp.file_bytes > plain.file_bytes and mtp.layout.weights_bytes == plain.layout.weights_bytes


def _cand(card_key: str, quant: str, recipe: str) -> QuantCandidate:
    layout = card_layout(load_card(card_key), recipe)
    return QuantCandidate(quant=quant, layout=layout, files=(f"{quant}.gguf",), file_bytes=layout.file_bytes,
                          source="hub")


def test_quality_order_puts_q4_k_m_above_the_larger_ud_q4_k_xl() -> None:
    # an UD-Q4_K_XL with more bits per weight than Q4_K_M (as the real one: 22.24 GB vs 21.17 GB)
    q4km, udxl, q5ks, q3km = (_cand(MAIN, "Q4_K_M", "Q4_K_M"), _cand(MAIN, "UD-Q4_K_XL", "Q5_K_M"),
                              _cand(MAIN, "Q5_K_S", "Q5_K_M"), _cand(MAIN, "Q3_K_M", "Q3_K_M"))
    assert udxl.bits_per_weight > q4km.bits_per_weight

    ranked = rank_by_quality([q3km, udxl, q4km, q5ks], load_card(MAIN))
    assert [c.quant for c in ranked] == ["Q5_K_S", "Q4_K_M", "UD-Q4_K_XL", "Q3_K_M"]
    assert [c.quality_rank for c in ranked] == [4, 3, 2, 1]
    # without a card, bits per weight alone (ties by label)
    assert [c.quant for c in rank_by_quality([q3km, udxl, q4km, q5ks], None)] == \
        ["Q5_K_S", "UD-Q4_K_XL", "Q4_K_M", "Q3_K_M"]


# --- presets ------------------------------------------------------------------------------------------------------

def test_sampling_args_are_llama_server_flags() -> None:
    card = load_card(MAIN)
    assert card.default_preset == "thinking-general"
    assert card.sampling_args() == ["--temp", "1", "--top-p", "0.95", "--top-k", "20", "--min-p", "0",
                                    "--presence-penalty", "1.5"]
    assert card.sampling_args("thinking-coding") == ["--temp", "0.6", "--top-p", "0.95", "--top-k", "20",
                                                     "--min-p", "0", "--presence-penalty", "0"]
    assert card.sampling_presets["non-thinking"] == {"temp": 0.7, "top_p": 0.8, "top_k": 20.0, "min_p": 0.0,
                                                     "presence_penalty": 1.5}
    assert card.reasoning_args("non-thinking") == ["--reasoning", "off"]
    assert card.reasoning_args() == []
    with pytest.raises(TunerError, match="has no sampling preset 'creative'"):
        card.sampling_args("creative")


# --- matching local files -----------------------------------------------------------------------------------------

def test_every_card_layout_matches_its_own_card() -> None:
    for card in list_cards():
        for quant in ("Q8_0", "Q4_K_M"):
            assert match_card(card_layout(card, quant)) is card, (card.key, quant)


def test_match_card_by_shapes_and_name(tmp_path: Path) -> None:
    qwen36 = write_synthetic_gguf(tmp_path / "a.gguf", qwen35_35b_a3b_spec(name="Qwen3.6-35B-A3B Instruct"))[0]
    unnamed = write_synthetic_gguf(tmp_path / "b.gguf", qwen35_35b_a3b_spec(name="my finetune"))[0]
    tiny = write_synthetic_gguf(tmp_path / "c.gguf", SynthSpec(fill="zeros"))[0]
    dense = write_synthetic_gguf(tmp_path / "d.gguf", spec_from_card(load_card("qwen3.5-27b")))[0]

    assert match_card(local_layout(qwen36)).key == "qwen3.6-35b-a3b"
    assert match_card(local_layout(unnamed)).key == MAIN
    assert match_card(local_layout(tiny)) is None
    assert match_card(local_layout(dense)).key == "qwen3.5-27b"
    assert resolve_candidates(str(unnamed))[0].card_key == MAIN


# --- references ---------------------------------------------------------------------------------------------------

def test_no_model_means_the_main_card_ladder_offline() -> None:
    cands = resolve_candidates(None)
    assert sorted(c.quant for c in cands) == sorted(load_card(MAIN).repo_quants())
    assert set(load_card(MAIN).quants) < {c.quant for c in cands}
    assert all(c.source == "card" for c in cands)


def test_card_references_resolve_with_and_without_a_quant() -> None:
    assert [c.quant for c in resolve_candidates("Qwen3.5-35B-A3B:q4_k_m")] == ["Q4_K_M"]
    assert resolve_layout("qwen3.5-35b-a3b:Q4_K_M").source == "qwen3.5-35b-a3b:Q4_K_M"
    with pytest.raises(TunerError, match=r"comes in 8 quants; name one as qwen3\.5-35b-a3b:QUANT \(BF16, Q8_0"):
        resolve_layout("qwen3.5-35b-a3b")
    with pytest.raises(TunerError, match=r"has no quant 'Q9_K' \(known: BF16"):
        resolve_layout("qwen3.5-35b-a3b:Q9_K")
    with pytest.raises(TunerError, match=r"cannot find model 'qwen9': not a file, a known card"):
        resolve_layout("qwen9")


def test_estimate_command_takes_a_card_reference(capsys: pytest.CaptureFixture[str]) -> None:
    code = cli_main(["estimate", "qwen3.5-35b-a3b:Q4_K_M", "--ctx-size", "32768", "--gpu", "none", "--json"])
    out = capsys.readouterr().out
    assert code == 0, out
    result = json.loads(out)
    assert result["model"] == "qwen3.5-35b-a3b:Q4_K_M" and result["arch"] == "qwen35moe"
    assert result["layout"]["kv_bytes_per_token_f16"] == 20_480
