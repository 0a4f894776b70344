"""Synthetic GGUF models of the real architectures, written with the ``gguf`` package.

Same tensor names, shapes, layer pattern and metadata as a converted Qwen3.5 / Qwen3.6 (``qwen35moe``, ``qwen35``,
``qwen3next``) or a plain transformer (``llama``, ``qwen3``, ``qwen3moe``), with a tiny byte-level BPE tokenizer (256
byte tokens, a few merges, the ChatML special tokens and template), so llama-server loads and serves the file on the
CPU. Two fillings:

* ``fill="random"``: small random weights (f32/f16, or quantized through gguf-py's reference quantizers); the file
  holds real data and can be split into shards;
* ``fill="zeros"``: only the header is written and the file is extended to its full length, a sparse file: a
  20 GB-shaped model takes a few MB on disk and llama-server still loads it (zeros are valid for every ggml type).

Shapes follow llama.cpp's loaders (src/models/qwen35moe.cpp, qwen35.cpp; ggml order ``{ne0, ne1, ne2}``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter, TokenType
from gguf import quants as gguf_quants

from tuner.errors import TunerError
from tuner.ggml import ggml_type, tensor_bytes
from tuner.layout import HYBRID_ARCHS, recurrent_pattern

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Architectures whose attention normalises Q and K per head (llama and qwen2 do not).
QK_NORM_ARCHS = frozenset({"qwen35moe", "qwen35", "qwen3next", "qwen3", "qwen3moe"})
_MERGES = ("Ġ t", "h e", "i n", "Ġ a", "e r", "o n", "Ġt he", "r e", "a t", "e n")


@dataclass(frozen=True)
class SynthSpec:
    """Hyperparameters of a synthetic model. Defaults: a tiny qwen35moe that serves quickly on a CPU."""

    arch: str = "qwen35moe"
    name: str = "tuner-synthetic"
    n_layer: int = 4
    n_embd: int = 64
    n_head: int = 4
    n_head_kv: int = 2
    head_dim: int = 16
    full_attention_interval: int = 4
    write_recurrent_array: bool = False  # write attention.recurrent_layers instead of relying on the interval
    n_expert: int = 8
    n_expert_used: int = 2
    n_ff_exp: int = 32
    n_ff_shexp: int = 32
    n_ff: int = 128  # dense FFN width (qwen35, llama, qwen3)
    ssm_d_conv: int = 4
    ssm_d_state: int = 16  # head_k_dim = head_v_dim
    ssm_n_group: int = 2  # number of K heads
    ssm_dt_rank: int = 4  # number of V heads
    n_ctx_train: int = 4096
    rope_dims: int = 0  # 0 = head_dim / 4 in the hybrids (partial rotary as in Qwen3.5), head_dim otherwise
    mtp: bool = False  # add the MTP (NextN) block as layer n_layer
    tie_embeddings: bool = False
    # ggml type per tensor role: "matrix" (2-D+ weights), "experts", "embd", "output"; 1-D tensors are f32.
    types: dict[str, str] = field(default_factory=lambda: {"matrix": "f16", "experts": "f16", "embd": "f16",
                                                           "output": "f16"})
    fill: str = "random"
    seed: int = 0
    extra_vocab: int = 0  # pad the vocabulary with this many unused tokens
    extra_merges: int = 0  # add this many never-applicable BPE merges (a real Qwen3.5 header has 247,587)

    @property
    def ssm_d_inner(self) -> int:
        return self.ssm_d_state * self.ssm_dt_rank

    @property
    def n_layer_all(self) -> int:
        return self.n_layer + (1 if self.mtp else 0)


# GPT-2 byte <-> unicode mapping (byte-level BPE alphabet)
def _bytes_to_unicode() -> list[str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs, strict=True))
    return [chr(table[b]) for b in range(256)]


def vocabulary(spec: SynthSpec) -> tuple[list[str], list[int], list[str]]:
    """Tokens, token types and merges of the tiny byte-level tokenizer."""
    tokens = _bytes_to_unicode()
    merges = list(_MERGES)
    for m in merges:
        merged = m.replace(" ", "")
        if merged not in tokens:
            tokens.append(merged)
    # pairs of symbols that byte-level pre-tokenization never produces: they fill the header, never change a token
    merges += [f"[PAD{i}] [PAD{i + 1}]" for i in range(spec.extra_merges)]
    types = [int(TokenType.NORMAL)] * len(tokens)
    tokens += [f"[PAD{i}]" for i in range(spec.extra_vocab)]
    types += [int(TokenType.UNUSED)] * spec.extra_vocab
    tokens += list(SPECIAL_TOKENS)
    types += [int(TokenType.CONTROL)] * len(SPECIAL_TOKENS)
    return tokens, types, merges


TensorPlan = list[tuple[str, tuple[int, ...], str]]  # (name, ggml-order shape, role)


def tensor_plan(spec: SynthSpec, n_vocab: int) -> TensorPlan:
    """Every tensor of the model: name, shape in ggml order, and role (for its type)."""
    e, hd = spec.n_embd, spec.head_dim
    plan: TensorPlan = [("token_embd.weight", (e, n_vocab), "embd"), ("output_norm.weight", (e,), "norm")]
    if not spec.tie_embeddings:
        plan.append(("output.weight", (e, n_vocab), "output"))
    hybrid = spec.arch in HYBRID_ARCHS
    moe = spec.arch in ("qwen35moe", "qwen3next", "qwen3moe", "qwen2moe")
    _, recurrent = recurrent_pattern(spec.n_layer, spec.n_layer_all, None, spec.full_attention_interval)
    recurrent_set = set(recurrent) if hybrid else set()
    key_dim = spec.ssm_d_state * spec.ssm_n_group
    value_dim = spec.ssm_d_inner
    for il in range(spec.n_layer_all):
        b = f"blk.{il}."
        is_mtp = il >= spec.n_layer
        plan.append((b + "attn_norm.weight", (e,), "norm"))
        if hybrid:
            plan.append((b + "post_attention_norm.weight", (e,), "norm"))
        else:
            plan.append((b + "ffn_norm.weight", (e,), "norm"))
        if il in recurrent_set:
            plan += [
                (b + "attn_qkv.weight", (e, key_dim * 2 + value_dim), "matrix"),
                (b + "attn_gate.weight", (e, value_dim), "matrix"),
                (b + "ssm_conv1d.weight", (spec.ssm_d_conv, key_dim * 2 + value_dim), "norm"),
                (b + "ssm_dt.bias", (spec.ssm_dt_rank,), "norm"),
                (b + "ssm_a", (spec.ssm_dt_rank,), "norm"),
            ]
            if spec.arch == "qwen3next":  # one fused beta/alpha projection (src/models/qwen3next.cpp)
                plan.append((b + "ssm_ba.weight", (e, 2 * spec.ssm_dt_rank), "matrix"))
            else:
                plan += [(b + "ssm_beta.weight", (e, spec.ssm_dt_rank), "matrix"),
                         (b + "ssm_alpha.weight", (e, spec.ssm_dt_rank), "matrix")]
            plan += [
                (b + "ssm_norm.weight", (spec.ssm_d_state,), "norm"),
                (b + "ssm_out.weight", (value_dim, e), "matrix"),
            ]
        else:
            q_rows = hd * spec.n_head * (2 if hybrid else 1)
            plan += [
                (b + "attn_q.weight", (e, q_rows), "matrix"),
                (b + "attn_k.weight", (e, hd * spec.n_head_kv), "matrix"),
                (b + "attn_v.weight", (e, hd * spec.n_head_kv), "matrix"),
                (b + "attn_output.weight", (hd * spec.n_head, e), "matrix"),
            ]
            if spec.arch in QK_NORM_ARCHS:
                plan += [(b + "attn_q_norm.weight", (hd,), "norm"), (b + "attn_k_norm.weight", (hd,), "norm")]
        if moe:
            plan += [
                (b + "ffn_gate_inp.weight", (e, spec.n_expert), "router"),
                (b + "ffn_gate_exps.weight", (e, spec.n_ff_exp, spec.n_expert), "experts"),
                (b + "ffn_up_exps.weight", (e, spec.n_ff_exp, spec.n_expert), "experts"),
                (b + "ffn_down_exps.weight", (spec.n_ff_exp, e, spec.n_expert), "experts"),
            ]
            if spec.arch != "qwen3moe":
                plan += [
                    (b + "ffn_gate_inp_shexp.weight", (e,), "norm"),
                    (b + "ffn_gate_shexp.weight", (e, spec.n_ff_shexp), "matrix"),
                    (b + "ffn_up_shexp.weight", (e, spec.n_ff_shexp), "matrix"),
                    (b + "ffn_down_shexp.weight", (spec.n_ff_shexp, e), "matrix"),
                ]
        else:
            plan += [
                (b + "ffn_gate.weight", (e, spec.n_ff), "matrix"),
                (b + "ffn_up.weight", (e, spec.n_ff), "matrix"),
                (b + "ffn_down.weight", (spec.n_ff, e), "matrix"),
            ]
        if is_mtp:
            plan += [
                (b + "nextn.eh_proj.weight", (2 * e, e), "matrix"),
                (b + "nextn.enorm.weight", (e,), "norm"),
                (b + "nextn.hnorm.weight", (e,), "norm"),
                (b + "nextn.shared_head_norm.weight", (e,), "norm"),
            ]
    return plan


def _role_type(spec: SynthSpec, role: str) -> str:
    if role == "norm":
        return "f32"
    if role == "router":
        return spec.types.get("router", "f32")
    return spec.types.get(role, spec.types.get("matrix", "f16"))


def rope_dims(spec: SynthSpec) -> int:
    """Rotary dimensions: a quarter of the head in the hybrids (partial_rotary_factor 0.25), the whole head in the
    plain transformers (llama.cpp checks ``n_rot == head_dim`` for them)."""
    if spec.rope_dims:
        return spec.rope_dims
    return max(2, spec.head_dim // 4) if spec.arch in HYBRID_ARCHS else spec.head_dim


def _metadata(spec: SynthSpec, writer: GGUFWriter) -> None:
    a = spec.arch
    w = writer
    w.add_name(spec.name)
    w.add_uint32(f"{a}.block_count", spec.n_layer_all)
    w.add_uint32(f"{a}.context_length", spec.n_ctx_train)
    w.add_uint32(f"{a}.embedding_length", spec.n_embd)
    w.add_uint32(f"{a}.attention.head_count", spec.n_head)
    w.add_uint32(f"{a}.attention.head_count_kv", spec.n_head_kv)
    w.add_uint32(f"{a}.attention.key_length", spec.head_dim)
    w.add_uint32(f"{a}.attention.value_length", spec.head_dim)
    w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_float32(f"{a}.rope.freq_base", 10_000_000.0)
    w.add_uint32(f"{a}.rope.dimension_count", rope_dims(spec))
    if a in ("qwen35moe", "qwen35"):
        # IMRoPE sections must sum to rope dims / 2 (converter default [11, 11, 10, 0] for 64 dims)
        half = rope_dims(spec) // 2
        s0 = -(-half * 11 // 32)
        s1 = -(-half * 11 // 32)
        w.add_array(f"{a}.rope.dimension_sections", [s0, s1, max(half - s0 - s1, 0), 0])
    if a in ("qwen35moe", "qwen3next", "qwen3moe", "qwen2moe"):
        w.add_uint32(f"{a}.expert_count", spec.n_expert)
        w.add_uint32(f"{a}.expert_used_count", spec.n_expert_used)
        w.add_uint32(f"{a}.expert_feed_forward_length", spec.n_ff_exp)
        if a != "qwen3moe":
            w.add_uint32(f"{a}.expert_shared_feed_forward_length", spec.n_ff_shexp)
    else:
        w.add_uint32(f"{a}.feed_forward_length", spec.n_ff)
    if a in HYBRID_ARCHS:
        w.add_uint32(f"{a}.ssm.conv_kernel", spec.ssm_d_conv)
        w.add_uint32(f"{a}.ssm.state_size", spec.ssm_d_state)
        w.add_uint32(f"{a}.ssm.group_count", spec.ssm_n_group)
        w.add_uint32(f"{a}.ssm.time_step_rank", spec.ssm_dt_rank)
        w.add_uint32(f"{a}.ssm.inner_size", spec.ssm_d_inner)
        if spec.write_recurrent_array:
            _, rec = recurrent_pattern(spec.n_layer, spec.n_layer_all, None, spec.full_attention_interval)
            w.add_array(f"{a}.attention.recurrent_layers", [i in rec for i in range(spec.n_layer_all)])
        else:
            w.add_uint32(f"{a}.full_attention_interval", spec.full_attention_interval)
    if spec.mtp:
        w.add_uint32(f"{a}.nextn_predict_layers", 1)
    tokens, types, merges = vocabulary(spec)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen35" if a in ("qwen35moe", "qwen35") else "qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_pad_token_id(tokens.index("<|endoftext|>"))
    w.add_bos_token_id(tokens.index("<|endoftext|>"))
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML_TEMPLATE)


def _random_tensor(rng: np.random.Generator, shape: tuple[int, ...], type_name: str, role: str) -> np.ndarray:
    np_shape = tuple(reversed(shape))
    if role == "norm":
        data = np.ones(np_shape, dtype=np.float32)
        if len(shape) > 1:  # conv kernel
            data = rng.normal(0, 0.2, np_shape).astype(np.float32)
        return data
    fan_in = shape[0]
    data = rng.normal(0, 1.0 / np.sqrt(fan_in), np_shape).astype(np.float32)
    t = ggml_type(type_name)
    if t.name == "f32":
        return data
    if t.name == "f16":
        return data.astype(np.float16)
    qtype = GGMLQuantizationType(t.type_id)
    try:
        return gguf_quants.quantize(data, qtype)
    except NotImplementedError:
        raise TunerError(f"gguf-py cannot quantize to {t.name}; use fill='zeros' for that type") from None
    except gguf_quants.QuantError as exc:  # rows that are not whole blocks of the type
        raise TunerError(f"cannot write a {t.name} tensor of shape {shape}: {exc}") from None


def write_synthetic_gguf(path: str | os.PathLike[str], spec: SynthSpec | None = None, *,
                         split_max_tensors: int = 0,
                         type_for: Callable[[str, str], str] | None = None) -> list[Path]:
    """Write a synthetic model; returns the file(s) written (several when split). ``type_for(name, role)`` may
    override the ggml type name of any tensor (e.g. to follow a quant recipe)."""
    spec = spec or SynthSpec()
    if spec.fill not in ("random", "zeros"):
        raise TunerError(f"fill must be 'random' or 'zeros', got {spec.fill!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokens, _, _ = vocabulary(spec)
    plan = tensor_plan(spec, len(tokens))

    def type_name(name: str, role: str) -> str:
        return type_for(name, role) if type_for else _role_type(spec, role)

    if spec.fill == "zeros":
        if split_max_tensors:
            raise TunerError("sparse (fill='zeros') models are written as one file")
        writer = GGUFWriter(path, spec.arch)
        _metadata(spec, writer)
        for name, shape, role in plan:
            t = ggml_type(type_name(name, role))
            writer.add_tensor_info(name, tuple(reversed(shape)), np.dtype(np.float32), tensor_bytes(t, shape),
                                   raw_dtype=GGMLQuantizationType(t.type_id))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        fout = writer.fout[0] if isinstance(writer.fout, list) else writer.fout
        assert fout is not None
        fout.flush()
        header_end = fout.tell()
        writer.close()
        align = writer.data_alignment
        data = sum(-(-tensor_bytes(ggml_type(type_name(n, r)), s) // align) * align for n, s, r in plan)
        with open(path, "r+b") as fh:
            fh.truncate(-(-header_end // align) * align + data)
        return [path]

    rng = np.random.default_rng(spec.seed)
    writer = GGUFWriter(path, spec.arch, split_max_tensors=split_max_tensors)
    _metadata(spec, writer)
    for name, shape, role in plan:
        tname = type_name(name, role)
        array = _random_tensor(rng, shape, tname, role)
        t = ggml_type(tname)
        raw = None if t.name in ("f32", "f16") else GGMLQuantizationType(t.type_id)
        writer.add_tensor(name, array, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if split_max_tensors:
        stem = path.with_suffix("")
        return sorted(path.parent.glob(f"{stem.name}-*-of-*.gguf"))
    return [path]


REAL_QWEN35_VOCAB = 248_320
REAL_QWEN35_MERGES = 247_587


def real_vocab_overrides() -> dict[str, int]:
    """``extra_vocab`` / ``extra_merges`` that give the synthetic tokenizer Qwen3.5's real vocabulary and merge count,
    so the header is as long as a real one (≈ 10 MB)."""
    base_tokens, _, base_merges = vocabulary(SynthSpec())
    return {"extra_vocab": REAL_QWEN35_VOCAB - len(base_tokens), "extra_merges": REAL_QWEN35_MERGES - len(base_merges)}


def qwen35_35b_a3b_spec(**overrides: Any) -> SynthSpec:
    """The real Qwen3.5-35B-A3B hyperparameters (qwen35-family.md) with a tiny vocabulary placeholder.

    The real vocabulary is 248,320 tokens and 247,587 merges: pass ``extra_vocab`` / ``extra_merges`` to reach them
    (see :func:`real_vocab_overrides`; the tokenizer stays byte-level).
    """
    base = SynthSpec(
        arch="qwen35moe", name="Qwen3.5-35B-A3B (synthetic)", n_layer=40, n_embd=2048, n_head=16, n_head_kv=2,
        head_dim=256, full_attention_interval=4, n_expert=256, n_expert_used=8, n_ff_exp=512, n_ff_shexp=512,
        ssm_d_conv=4, ssm_d_state=128, ssm_n_group=16, ssm_dt_rank=32, n_ctx_train=262_144, rope_dims=64,
        fill="zeros",
    )
    return replace(base, **overrides)
