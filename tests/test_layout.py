"""The model layout read from real GGUF headers: layer patterns, per-layer heads, tensor classes, and the real
Qwen3.5-35B-A3B arithmetic (a sparse file with the published shapes and the 248,320-token vocabulary)."""

from __future__ import annotations

from math import prod
from pathlib import Path

import pytest

from tuner.errors import TunerError
from tuner.estimate import ServerFlags, estimate_memory
from tuner.gguf_file import read_gguf
from tuner.layout import ModelLayout, TensorClass, layout_from_header, layout_from_metadata
from tuner.models import local_layout
from tuner.synth import SynthSpec, qwen35_35b_a3b_spec, vocabulary, write_synthetic_gguf
from tuner.units import MiB

REAL_VOCAB = 248_320


def write(tmp_path: Path, spec: SynthSpec, name: str = "m.gguf") -> Path:
    return write_synthetic_gguf(tmp_path / name, spec)[0]


def n_params(layout: ModelLayout, cls: TensorClass | None = None) -> int:
    return sum(prod(t.shape) for t in layout.tensors if cls is None or t.cls is cls)


@pytest.fixture(scope="module")
def real_35b(tmp_path_factory: pytest.TempPathFactory) -> ModelLayout:
    spec = qwen35_35b_a3b_spec(extra_vocab=REAL_VOCAB - len(vocabulary(SynthSpec())[0]))
    return local_layout(write_synthetic_gguf(tmp_path_factory.mktemp("l") / "35b.gguf", spec)[0])


@pytest.fixture(scope="module")
def real_35b_mtp(tmp_path_factory: pytest.TempPathFactory) -> ModelLayout:
    spec = qwen35_35b_a3b_spec(extra_vocab=REAL_VOCAB - len(vocabulary(SynthSpec())[0]), mtp=True)
    return local_layout(write_synthetic_gguf(tmp_path_factory.mktemp("l") / "35b-mtp.gguf", spec)[0])


# ------------------------------------------------------------------------------------------------ hybrid patterns


def test_qwen35moe_interval_pattern_puts_attention_on_every_fourth_layer(tmp_path: Path) -> None:
    layout = local_layout(write(tmp_path, SynthSpec(n_layer=12)))
    assert layout.attention_layers == (3, 7, 11)
    assert layout.recurrent_layers == (0, 1, 2, 4, 5, 6, 8, 9, 10)
    assert layout.is_hybrid and layout.is_moe


def test_explicit_recurrent_layers_array_wins_over_the_default_interval(tmp_path: Path) -> None:
    # interval 2 written only as the per-layer array: read with the default interval 4 it would differ
    spec = SynthSpec(n_layer=8, full_attention_interval=2, write_recurrent_array=True)
    path = write(tmp_path, spec)
    meta = read_gguf(path).metadata
    assert "qwen35moe.full_attention_interval" not in meta
    assert meta["qwen35moe.attention.recurrent_layers"] == [True, False] * 4
    layout = local_layout(path)
    assert layout.attention_layers == (1, 3, 5, 7)
    assert layout.recurrent_layers == (0, 2, 4, 6)


def test_recurrent_array_of_the_wrong_length_is_an_error(tmp_path: Path) -> None:
    header = read_gguf(write(tmp_path, SynthSpec(n_layer=8, write_recurrent_array=True)))
    meta = {**header.metadata, "qwen35moe.attention.recurrent_layers": [True, False, True]}
    with pytest.raises(TunerError, match="recurrent_layers has 3 entries for 8 layers"):
        layout_from_metadata(meta, ((t.name, t.ggml_type, t.shape, t.nbytes) for t in header.tensors))


def test_per_layer_head_count_kv_array_sizes_each_attention_layer(tmp_path: Path) -> None:
    header = read_gguf(write(tmp_path, SynthSpec(n_layer=8, n_head_kv=2, head_dim=16)))
    kv_heads = [0, 0, 0, 1, 0, 0, 0, 4]
    meta = {**header.metadata, "qwen35moe.attention.head_count_kv": kv_heads}
    layout = layout_from_metadata(meta, ((t.name, t.ggml_type, t.shape, t.nbytes) for t in header.tensors))
    assert layout.n_head_kv == tuple(kv_heads)
    assert layout.kv_bytes_per_cell("f16", "f16", [3]) == 2 * 1 * 16 * 2
    assert layout.kv_bytes_per_cell("f16", "f16", [7]) == 2 * 4 * 16 * 2
    assert layout.kv_bytes_per_cell("f16", "f16") == 2 * (1 + 4) * 16 * 2
    est = estimate_memory(layout, ServerFlags(ctx_size=4096, parallel=1))
    assert est.kv_bytes == 4096 * 2 * (1 + 4) * 16 * 2  # the scalar 2 heads would give 4096 * 2 * (2 + 2) * 16 * 2


def test_head_count_kv_array_of_the_wrong_length_is_an_error(tmp_path: Path) -> None:
    header = read_gguf(write(tmp_path, SynthSpec()))
    meta = {**header.metadata, "qwen35moe.attention.head_count_kv": [2, 2]}
    with pytest.raises(TunerError, match="head_count_kv has 2 entries for 4 layers"):
        layout_from_metadata(meta, [])


def test_mtp_block_is_its_own_class_and_has_no_kv_or_state(tmp_path: Path) -> None:
    layout = local_layout(write(tmp_path, SynthSpec(n_layer=4, mtp=True)))
    assert (layout.n_layer, layout.n_layer_all, layout.n_nextn, layout.has_mtp) == (4, 5, 1, True)
    mtp = [t for t in layout.tensors if t.layer == 4]
    assert mtp and all(t.cls is TensorClass.MTP for t in mtp)
    assert {t.name for t in mtp} >= {"blk.4.nextn.eh_proj.weight", "blk.4.attn_q.weight", "blk.4.ffn_up_exps.weight"}
    assert 4 not in layout.attention_layers and 4 not in layout.recurrent_layers
    assert layout.weights_bytes == sum(t.nbytes for t in layout.tensors) - sum(t.nbytes for t in mtp)
    without = local_layout(write(tmp_path, SynthSpec(n_layer=4), "plain.gguf"))
    assert layout.kv_bytes_per_cell("f16", "f16") == without.kv_bytes_per_cell("f16", "f16")
    assert layout.weights_bytes == without.weights_bytes


def test_tied_embeddings_are_detected_by_the_missing_output_tensor(tmp_path: Path) -> None:
    tied = local_layout(write(tmp_path, SynthSpec(tie_embeddings=True)))
    untied = local_layout(write(tmp_path, SynthSpec(), "untied.gguf"))
    assert tied.tied_embeddings and not untied.tied_embeddings
    assert TensorClass.OUTPUT not in tied.bytes_by_class()
    assert untied.bytes_by_class()[TensorClass.OUTPUT] == untied.bytes_by_class()[TensorClass.TOKEN_EMBD]


def test_tensor_classes_of_a_hybrid_moe_model(tmp_path: Path) -> None:
    layout = local_layout(write(tmp_path, SynthSpec(n_layer=4)))
    by_name = {t.name: t for t in layout.tensors}
    assert by_name["token_embd.weight"].cls is TensorClass.TOKEN_EMBD
    assert by_name["output.weight"].cls is TensorClass.OUTPUT
    assert by_name["output_norm.weight"].cls is TensorClass.NORM
    assert by_name["blk.0.attn_qkv.weight"].cls is TensorClass.DELTANET
    assert by_name["blk.0.ssm_conv1d.weight"].cls is TensorClass.DELTANET
    assert by_name["blk.3.attn_q.weight"].cls is TensorClass.ATTENTION
    assert by_name["blk.3.attn_k_norm.weight"].cls is TensorClass.ATTENTION
    assert by_name["blk.1.ffn_gate_exps.weight"].cls is TensorClass.EXPERTS
    assert by_name["blk.1.ffn_gate_exps.weight"].is_expert
    assert by_name["blk.1.ffn_up_shexp.weight"].cls is TensorClass.SHARED_EXPERT
    assert not by_name["blk.1.ffn_up_shexp.weight"].is_expert
    assert by_name["blk.1.ffn_gate_inp.weight"].cls is TensorClass.ROUTER
    assert by_name["blk.1.attn_norm.weight"].cls is TensorClass.NORM
    assert set(layout.expert_bytes_by_layer()) == {0, 1, 2, 3}


def test_dense_qwen35_has_the_hybrid_pattern_and_a_dense_ffn(tmp_path: Path) -> None:
    layout = local_layout(write(tmp_path, SynthSpec(arch="qwen35", n_layer=8, n_ff=96)))
    assert layout.attention_layers == (3, 7)
    assert not layout.is_moe and layout.n_ff == 96
    assert TensorClass.DENSE_FFN in layout.bytes_by_class()
    assert TensorClass.EXPERTS not in layout.bytes_by_class()


def test_qwen3next_reads_like_qwen35moe(tmp_path: Path) -> None:
    layout = local_layout(write(tmp_path, SynthSpec(arch="qwen3next", n_layer=8)))
    assert layout.arch == "qwen3next"
    assert layout.attention_layers == (3, 7)
    assert layout.recurrent_layers == (0, 1, 2, 4, 5, 6)
    assert layout.recurrent_bytes_per_seq() == 6 * 4 * (3 * (64 + 2 * 2 * 16) + 16 * 64)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "qwen3moe"])
def test_generic_transformers_have_kv_on_every_layer_and_no_state(tmp_path: Path, arch: str) -> None:
    spec = SynthSpec(arch=arch, n_layer=6, n_head=4, n_head_kv=2, head_dim=16)
    layout = local_layout(write(tmp_path, spec))
    assert layout.attention_layers == tuple(range(6))
    assert layout.recurrent_layers == () and not layout.is_hybrid
    assert layout.recurrent_bytes_per_seq() == 0
    assert layout.kv_bytes_per_cell("f16", "f16") == 6 * 2 * (2 * 16) * 2
    assert layout.is_moe == (arch == "qwen3moe")


def test_sliding_window_architectures_are_refused_not_over_estimated(tmp_path: Path) -> None:
    header = read_gguf(write(tmp_path, SynthSpec(arch="llama")))
    tensors = [(t.name, t.ggml_type, t.shape, t.nbytes) for t in header.tensors]

    def renamed(arch: str, **extra: object) -> dict[str, object]:
        meta = {k.replace("llama.", f"{arch}.", 1): v for k, v in header.metadata.items()}
        return {**meta, "general.architecture": arch, **extra}

    with pytest.raises(TunerError, match="olmo2 with sliding-window attention"):
        layout_from_metadata(renamed("olmo2", **{"olmo2.attention.sliding_window": 4096}), tensors)
    plain = layout_from_metadata(renamed("olmo2"), tensors)  # OLMo 2 without a window: every layer has full KV
    assert plain.attention_layers == tuple(range(plain.n_layer))
    with pytest.raises(TunerError, match="unsupported architecture 'llama4'"):  # chunked attention by default
        layout_from_metadata(renamed("llama4"), tensors)


def test_recurrent_state_is_f32_per_layer_and_sequence(tmp_path: Path) -> None:
    layout = local_layout(write(tmp_path, SynthSpec(n_layer=8)))
    assert layout.recurrent_bytes_per_layer == 4 * (layout.n_embd_r + layout.n_embd_s)
    assert layout.recurrent_bytes_per_seq() == 6 * layout.recurrent_bytes_per_layer
    assert layout.recurrent_bytes_per_seq([0, 1]) == 2 * layout.recurrent_bytes_per_layer


def test_to_dict_is_plain_data(tmp_path: Path) -> None:
    d = local_layout(write(tmp_path, SynthSpec(mtp=True))).to_dict()
    assert d["arch"] == "qwen35moe" and d["has_mtp"] is True
    assert d["attention_layers"] == [3] and d["recurrent_layers"] == [0, 1, 2]
    assert all(isinstance(v, int) for v in d["bytes_by_class"].values())


def test_missing_required_key_is_a_clear_error(tmp_path: Path) -> None:
    header = read_gguf(write(tmp_path, SynthSpec()))
    meta = {k: v for k, v in header.metadata.items() if k != "qwen35moe.embedding_length"}
    with pytest.raises(TunerError, match=r"missing GGUF key qwen35moe\.embedding_length"):
        layout_from_header(type(header)(header.paths, header.version, meta, header.tensors, header.file_bytes,
                                        header.header_bytes))


# ------------------------------------------------------------------------------------------------ the real model


def test_real_35b_a3b_parameter_counts_match_the_published_ones(real_35b: ModelLayout,
                                                                real_35b_mtp: ModelLayout) -> None:
    # Qwen3.5-35B-A3B's config.json and GGUF metadata: 34,660,610,688 params in 733 tensors;
    # 35,505,251,456 in 753 with the MTP layer
    assert (n_params(real_35b), len(real_35b.tensors)) == (34_660_610_688, 733)
    assert (n_params(real_35b_mtp), len(real_35b_mtp.tensors)) == (35_505_251_456, 753)
    assert n_params(real_35b, TensorClass.EXPERTS) == 32_212_254_720
    assert real_35b.n_vocab == REAL_VOCAB


def test_real_35b_a3b_layer_pattern_and_shapes(real_35b: ModelLayout) -> None:
    assert real_35b.attention_layers == tuple(range(3, 40, 4))
    assert len(real_35b.recurrent_layers) == 30
    assert (real_35b.n_embd, real_35b.head_k, real_35b.head_v) == (2048, 256, 256)
    assert (real_35b.n_expert, real_35b.n_expert_used, real_35b.n_ff_exp, real_35b.n_ff_shexp) == (256, 8, 512, 512)
    assert real_35b.n_ctx_train == 262_144


def test_real_35b_a3b_kv_bytes_per_token(real_35b: ModelLayout) -> None:
    assert real_35b.kv_bytes_per_cell("f16", "f16") == 20_480
    assert real_35b.kv_bytes_per_cell("bf16", "bf16") == 20_480
    assert real_35b.kv_bytes_per_cell("q8_0", "q8_0") == 10_880
    assert real_35b.kv_bytes_per_cell("q4_0", "q4_0") == real_35b.kv_bytes_per_cell("iq4_nl", "iq4_nl") == 5_760
    assert real_35b.kv_bytes_per_cell("q8_0", "f16") == (10_880 + 20_480) // 2
    assert real_35b.kv_bytes_per_cell("f16", "f16") * 262_144 == 5120 * MiB


def test_real_35b_a3b_recurrent_state_per_sequence(real_35b: ModelLayout) -> None:
    assert (real_35b.n_embd_r, real_35b.n_embd_s) == (24_576, 524_288)
    assert real_35b.recurrent_bytes_per_seq() == 65_863_680
    assert round(real_35b.recurrent_bytes_per_seq() / MiB, 2) == 62.81
    assert 4 * real_35b.recurrent_bytes_per_seq() == 251.25 * MiB
