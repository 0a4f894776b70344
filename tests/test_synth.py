"""Synthetic GGUF models: what they contain, that sparse files stay sparse, and that llama.cpp itself accepts every
architecture tuner writes (a real llama-server loads each one; the tiny random one answers a chat request)."""

from __future__ import annotations

import re
import time
from dataclasses import replace
from pathlib import Path

import gguf
import numpy as np
import pytest

from tuner.errors import TunerError
from tuner.gguf_file import ArraySummary, read_gguf
from tuner.models import local_layout
from tuner.server import LlamaServer
from tuner.synth import (
    REAL_QWEN35_MERGES,
    REAL_QWEN35_VOCAB,
    SPECIAL_TOKENS,
    SynthSpec,
    qwen35_35b_a3b_spec,
    real_vocab_overrides,
    tensor_plan,
    vocabulary,
    write_synthetic_gguf,
)


def test_tiny_vocabulary_is_byte_level_with_chatml_specials() -> None:
    tokens, types, merges = vocabulary(SynthSpec())
    assert len(tokens) == len(types)
    assert len(set(tokens)) == len(tokens)
    assert tokens[-3:] == list(SPECIAL_TOKENS)
    assert types[-3:] == [int(gguf.TokenType.CONTROL)] * 3
    assert len(tokens) >= 256 and all(" " in m for m in merges)


def test_real_vocab_overrides_reach_the_published_counts() -> None:
    tokens, _, merges = vocabulary(SynthSpec(**real_vocab_overrides()))
    assert (len(tokens), len(merges)) == (REAL_QWEN35_VOCAB, REAL_QWEN35_MERGES) == (248_320, 247_587)
    assert len(set(merges)) == len(merges)


def test_random_fill_writes_real_data_that_reads_back(tmp_path: Path) -> None:
    spec = SynthSpec(types={"matrix": "q8_0", "experts": "q4_0", "embd": "f16", "output": "f32"})
    (path,) = write_synthetic_gguf(tmp_path / "r.gguf", spec)
    reader = gguf.GGUFReader(path)
    by_name = {t.name: t for t in reader.tensors}
    assert by_name["blk.0.attn_qkv.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert by_name["blk.0.ffn_up_exps.weight"].tensor_type == gguf.GGMLQuantizationType.Q4_0
    assert by_name["output.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    embd = np.asarray(by_name["token_embd.weight"].data, dtype=np.float32)
    assert embd.std() > 0.01  # random, not zeros
    assert np.all(np.asarray(by_name["output_norm.weight"].data) == 1.0)


def test_types_without_a_reference_quantizer_need_zero_fill(tmp_path: Path) -> None:
    wide = SynthSpec(n_embd=256, n_head=4, head_dim=64, n_ff_exp=256, n_ff_shexp=256, ssm_d_state=64,
                     types={"matrix": "q4_K", "experts": "f16", "embd": "f16", "output": "f16"})
    with pytest.raises(TunerError, match="use fill='zeros'"):
        write_synthetic_gguf(tmp_path / "x.gguf", wide)
    (path,) = write_synthetic_gguf(tmp_path / "z.gguf", replace(wide, fill="zeros"))
    assert {t.ggml_type.name for t in read_gguf(path).tensors if t.name.endswith("attn_qkv.weight")} == {"q4_K"}


def test_rows_that_are_not_whole_blocks_are_refused(tmp_path: Path) -> None:
    with pytest.raises(TunerError, match="q4_K"):  # n_embd 64 is a quarter of a q4_K block
        write_synthetic_gguf(tmp_path / "x.gguf", SynthSpec(types={"matrix": "q4_K"}))
    with pytest.raises(TunerError, match="not a whole number of q4_K blocks"):
        write_synthetic_gguf(tmp_path / "y.gguf", SynthSpec(fill="zeros", types={"matrix": "q4_K"}))


def test_unknown_fill_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(TunerError, match="fill must be"):
        write_synthetic_gguf(tmp_path / "x.gguf", SynthSpec(fill="ones"))


def test_zero_fill_is_a_sparse_file_of_full_length(tmp_path: Path) -> None:
    (path,) = write_synthetic_gguf(tmp_path / "a3b.gguf", qwen35_35b_a3b_spec())
    header = read_gguf(path)
    assert header.file_bytes == path.stat().st_size > 60 * 10**9  # f16 everywhere: ~69 GB long
    assert path.stat().st_blocks * 512 < 64 * 2**20  # but only the header takes disk space
    assert header.header_bytes + header.tensor_bytes <= header.file_bytes
    with open(path, "rb") as fh:
        fh.seek(header.header_bytes + header.tensors[5].offset)
        assert fh.read(4096) == bytes(4096)


def test_type_for_overrides_any_tensor(tmp_path: Path) -> None:
    def q8_experts(name: str, role: str) -> str:
        return "q8_0" if role == "experts" else ("f32" if role == "norm" else "bf16")

    (path,) = write_synthetic_gguf(tmp_path / "t.gguf", SynthSpec(fill="zeros"), type_for=q8_experts)
    types = {t.name: t.ggml_type.name for t in read_gguf(path).tensors}
    assert types["blk.0.ffn_down_exps.weight"] == "q8_0"
    assert types["blk.0.attn_qkv.weight"] == "bf16"
    assert types["output_norm.weight"] == "f32"


def test_split_writes_shards_that_join_to_the_whole(tmp_path: Path) -> None:
    shards = write_synthetic_gguf(tmp_path / "s.gguf", SynthSpec(), split_max_tensors=12)
    whole = write_synthetic_gguf(tmp_path / "w.gguf", SynthSpec())[0]
    assert len(shards) > 1 and all(re.search(r"-\d{5}-of-\d{5}\.gguf$", p.name) for p in shards)
    assert [t.name for t in read_gguf(shards[0]).tensors] == [t.name for t in read_gguf(whole).tensors]
    with pytest.raises(TunerError, match="one file"):
        write_synthetic_gguf(tmp_path / "z.gguf", SynthSpec(fill="zeros"), split_max_tensors=12)


def test_qwen3next_uses_the_fused_beta_alpha_projection() -> None:
    names = {name for name, _, _ in tensor_plan(SynthSpec(arch="qwen3next"), 300)}
    assert "blk.0.ssm_ba.weight" in names and "blk.0.ssm_beta.weight" not in names
    names35 = {name for name, _, _ in tensor_plan(SynthSpec(arch="qwen35moe"), 300)}
    assert {"blk.0.ssm_beta.weight", "blk.0.ssm_alpha.weight"} <= names35


def test_long_tokenizer_arrays_are_written_in_full(tmp_path: Path) -> None:
    (path,) = write_synthetic_gguf(tmp_path / "v.gguf", SynthSpec(fill="zeros", extra_vocab=5000, extra_merges=6000))
    header = read_gguf(path)
    assert isinstance(header.get("tokenizer.ggml.tokens"), ArraySummary)
    assert len(header.get("tokenizer.ggml.tokens")) == len(vocabulary(SynthSpec(extra_vocab=5000))[0])
    assert len(header.get("tokenizer.ggml.merges")) == len(vocabulary(SynthSpec())[2]) + 6000
    assert local_layout(path).n_vocab == len(vocabulary(SynthSpec(extra_vocab=5000))[0])


# ------------------------------------------------------------------------------------ llama.cpp accepts them

ARCH_SPECS = {
    "qwen35moe-mtp": SynthSpec(mtp=True, fill="zeros"),
    "qwen35moe-recurrent-array": SynthSpec(n_layer=8, full_attention_interval=2, write_recurrent_array=True,
                                           fill="zeros"),
    "qwen35-tied": SynthSpec(arch="qwen35", tie_embeddings=True, mtp=True, fill="zeros"),
    "qwen3next": SynthSpec(arch="qwen3next", fill="zeros"),
    "llama": SynthSpec(arch="llama", fill="zeros"),
    "qwen3": SynthSpec(arch="qwen3", fill="zeros"),
    "qwen3moe": SynthSpec(arch="qwen3moe", fill="zeros"),
}
_LOADED = re.compile(r"model loaded|exiting due to model loading error|error loading model")


@pytest.mark.server
@pytest.mark.parametrize("name", list(ARCH_SPECS))
def test_llama_server_loads_every_synthetic_architecture(server_bin: Path, tmp_path: Path, name: str) -> None:
    spec = ARCH_SPECS[name]
    (path,) = write_synthetic_gguf(tmp_path / f"{name}.gguf", spec)
    args = ["--no-warmup", "-lv", "4", "--fit", "off", "-c", "1024", "-np", "1"]
    if spec.mtp:
        args += ["--spec-type", "draft-mtp"]
    with LlamaServer(server_bin, path, args) as server:
        deadline = time.monotonic() + 120
        while not _LOADED.search(server.log_text()) and server.running() and time.monotonic() < deadline:
            time.sleep(0.05)
        log = server.log_text()
    server.cleanup_log()
    assert "model loaded" in log, log[-2000:]
    # llama.cpp reads the same shapes as tuner's layout
    layout = local_layout(path)
    printed = dict(re.findall(r"print_info: (\w+)\s+= (\S+)", log))
    assert printed["arch"] == layout.arch
    assert int(printed["n_embd"]) == layout.n_embd
    assert int(printed["n_vocab"]) == layout.n_vocab
    assert int(printed.get("n_layer_all", printed["n_layer"])) == layout.n_layer_all


@pytest.mark.server
def test_tiny_random_model_answers_a_chat_request(server_bin: Path, tiny_moe_gguf: Path) -> None:
    with LlamaServer(server_bin, tiny_moe_gguf, ["--no-warmup", "-c", "1024", "-np", "1"]) as server:
        server.wait_ready(120)
        reply = server.smoke_completion(max_tokens=4)
    server.cleanup_log()
    assert reply["usage"]["completion_tokens"] >= 1
    assert reply["choices"][0]["message"]["role"] == "assistant"
