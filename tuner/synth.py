"""Synthetic GGUF models of the real architectures, written with the ``gguf`` package.

Same tensor names, shapes, layer pattern and metadata as a converted Qwen3.5 / Qwen3.6 (``qwen35moe``, ``qwen35``,
``qwen3next``) or a plain transformer (``llama``, ``qwen3``, ``qwen3moe``), with a tiny byte-level BPE tokenizer (256
byte tokens, a few merges, the ChatML special tokens and template), so llama-server loads and serves the file on the
CPU. Two fillings:

* ``fill="random"``: small random weights (f32/f16, or quantized through gguf-py's reference quantizers); the file
  holds real data and can be split into shards;
* ``fill="zeros"``: only the header is written and the file is extended to its full length, a sparse file: a
  20 GB-shaped model takes a few MB on disk and llama-server still loads it (zeros are valid for every ggml type).
  ``random_roles`` (e.g. ``{"embd", "router"}``) writes random data into the tensors of those roles only: with
  random token embeddings and routers the hidden state differs per token and the routers spread tokens over the
  experts as a real model's do, while every other byte stays a hole (what ``tuner calibrate`` writes, see
  :mod:`tuner.calibration`). Types gguf-py cannot quantize (the k-quants, i-quants) get random blocks whose f16
  scales are set to a small finite value (:data:`BLOCK_SCALE_OFFSETS`, from ggml-common.h's block structs).

Names and shapes come from the package's one shape table, :func:`tuner.shapes.tensor_shapes`, fed the metadata the
file carries. The writer needs numpy and gguf, so nothing that plans or sizes a model imports this module: the tests
use it, and whatever writes a model at run time imports it when it does.
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

from tuner.cards import ModelCard
from tuner.errors import TunerError
from tuner.ggml import GgmlType, ggml_type, tensor_bytes
from tuner.layout import HYBRID_ARCHS, ModelLayout, recurrent_pattern
from tuner.shapes import MOE_ARCHS, TensorPlan, tensor_shapes

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_MERGES = ("Ġ t", "h e", "i n", "Ġ a", "e r", "o n", "Ġt he", "r e", "a t", "e n")
#: Byte offsets of the f16 scale fields inside one block of each block type (ggml/src/ggml-common.h:181-440): random
#: bytes there could be inf or NaN, so a random block gets a small finite scale written over them.
BLOCK_SCALE_OFFSETS: dict[str, tuple[int, ...]] = {
    "q4_0": (0,), "q4_1": (0, 2), "q5_0": (0,), "q5_1": (0, 2), "q8_0": (0,),
    "q2_K": (80, 82), "q3_K": (108,), "q4_K": (0, 2), "q5_K": (0, 2), "q6_K": (208,),
    "iq2_xxs": (0,), "iq2_xs": (0,), "iq2_s": (0,), "iq3_xxs": (0,), "iq3_s": (0,), "iq1_s": (0,),
    "iq4_nl": (0,), "iq4_xs": (0,),
}
_RANDOM_BLOCK_SCALE = np.float16(2.0**-10)


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
    random_roles: frozenset[str] = frozenset()  # fill="zeros": roles written with random data all the same
    extra_vocab: int = 0  # pad the vocabulary with this many unused tokens
    extra_merges: int = 0  # add this many never-applicable BPE merges (a real Qwen3.5 header has 247,587)
    chat_template: str | None = CHATML_TEMPLATE  # tokenizer.chat_template (None: the file carries none)
    base_model_repo: str | None = None  # general.base_model.0.repo_url = https://huggingface.co/<this>

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


def tensor_plan(spec: SynthSpec, n_vocab: int) -> TensorPlan:
    """Every tensor of the model: name, shape in ggml order, and role (for its type); the package's one shape table,
    :func:`tuner.shapes.tensor_shapes`, read from the metadata the file will carry."""
    return tensor_shapes(hparams_metadata(spec), n_vocab, tied_embeddings=spec.tie_embeddings)


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


def hparams_metadata(spec: SynthSpec) -> dict[str, Any]:
    """The GGUF metadata of the model's hyperparameters (the tokenizer aside), in the order the file holds them:
    ints are written as uint32, floats as float32, lists as arrays."""
    a = spec.arch
    meta: dict[str, Any] = {
        "general.architecture": a,
        "general.name": spec.name,
        f"{a}.block_count": spec.n_layer_all,
        f"{a}.context_length": spec.n_ctx_train,
        f"{a}.embedding_length": spec.n_embd,
        f"{a}.attention.head_count": spec.n_head,
        f"{a}.attention.head_count_kv": spec.n_head_kv,
        f"{a}.attention.key_length": spec.head_dim,
        f"{a}.attention.value_length": spec.head_dim,
        f"{a}.attention.layer_norm_rms_epsilon": 1e-6,
        f"{a}.rope.freq_base": 10_000_000.0,
        f"{a}.rope.dimension_count": rope_dims(spec),
    }
    if a in ("qwen35moe", "qwen35"):
        # IMRoPE sections must sum to rope dims / 2 (converter default [11, 11, 10, 0] for 64 dims)
        half = rope_dims(spec) // 2
        s0 = -(-half * 11 // 32)
        s1 = -(-half * 11 // 32)
        meta[f"{a}.rope.dimension_sections"] = [s0, s1, max(half - s0 - s1, 0), 0]
    if a in MOE_ARCHS:
        meta[f"{a}.expert_count"] = spec.n_expert
        meta[f"{a}.expert_used_count"] = spec.n_expert_used
        meta[f"{a}.expert_feed_forward_length"] = spec.n_ff_exp
        if a != "qwen3moe":
            meta[f"{a}.expert_shared_feed_forward_length"] = spec.n_ff_shexp
    else:
        meta[f"{a}.feed_forward_length"] = spec.n_ff
    if a in HYBRID_ARCHS:
        meta[f"{a}.ssm.conv_kernel"] = spec.ssm_d_conv
        meta[f"{a}.ssm.state_size"] = spec.ssm_d_state
        meta[f"{a}.ssm.group_count"] = spec.ssm_n_group
        meta[f"{a}.ssm.time_step_rank"] = spec.ssm_dt_rank
        meta[f"{a}.ssm.inner_size"] = spec.ssm_d_inner
        if spec.write_recurrent_array:
            _, rec = recurrent_pattern(spec.n_layer, spec.n_layer_all, None, spec.full_attention_interval)
            meta[f"{a}.attention.recurrent_layers"] = [i in rec for i in range(spec.n_layer_all)]
        else:
            meta[f"{a}.full_attention_interval"] = spec.full_attention_interval
    if spec.mtp:
        meta[f"{a}.nextn_predict_layers"] = 1
    return meta


def _metadata(spec: SynthSpec, writer: GGUFWriter) -> None:
    w = writer
    a = spec.arch
    for key, value in hparams_metadata(spec).items():
        if key == "general.architecture":  # GGUFWriter writes it itself
            continue
        if key == "general.name":
            w.add_name(value)
        elif isinstance(value, list):
            w.add_array(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_uint32(key, value)
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
    if spec.chat_template is not None:
        w.add_chat_template(spec.chat_template)
    if spec.base_model_repo:
        w.add_uint32("general.base_model.count", 1)
        w.add_string("general.base_model.0.repo_url", f"https://huggingface.co/{spec.base_model_repo}")


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


def random_block_bytes(rng: np.random.Generator, t: GgmlType, n_elements: int) -> bytes:
    """``n_elements`` of type ``t`` as random data: random floats for f32/f16/bf16, random blocks with a small finite
    f16 scale (:data:`BLOCK_SCALE_OFFSETS`) for block types; TunerError for a type without an entry there."""
    if t.name == "f32":
        return rng.normal(0, 1, n_elements).astype(np.float32).tobytes()
    if t.name == "f16":
        return rng.normal(0, 1, n_elements).astype(np.float16).tobytes()
    if t.name == "bf16":
        return (rng.normal(0, 1, n_elements).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).tobytes()
    offsets = BLOCK_SCALE_OFFSETS.get(t.name)
    if offsets is None:
        raise TunerError(f"cannot write random {t.name} data (no block layout known for it)")
    n_blocks = n_elements // t.block_size
    blocks = rng.integers(0, 256, (n_blocks, t.type_bytes), dtype=np.uint8)
    scale = np.frombuffer(_RANDOM_BLOCK_SCALE.tobytes(), dtype=np.uint8)
    for off in offsets:
        blocks[:, off:off + 2] = scale
    return blocks.tobytes()


def _write_random_roles(path: Path, spec: SynthSpec, plan: TensorPlan, type_name: Callable[[str, str], str]) -> None:
    """Random data into the tensors of ``spec.random_roles`` of a zero-filled file, in place."""
    from tuner.gguf_file import read_gguf

    header = read_gguf(path, use_cache=False)
    data_start = header.header_bytes
    roles = {name: role for name, _, role in plan}
    rng = np.random.default_rng(spec.seed)
    with open(path, "r+b") as fh:
        for info in header.tensors:
            if roles.get(info.name) not in spec.random_roles:
                continue
            fh.seek(data_start + info.offset)
            fh.write(random_block_bytes(rng, ggml_type(type_name(info.name, roles[info.name])), info.n_elements))


def _write_sparse(writer: GGUFWriter, path: Path, tensors: list[tuple[str, tuple[int, ...], str]]) -> None:
    """Write ``writer``'s header for ``tensors`` (name, shape, ggml type name) and extend the file to its full size
    without writing the data (a sparse file: the full size, reading as zeros, with no data blocks)."""
    sizes = []
    for name, shape, type_name in tensors:
        t = ggml_type(type_name)
        nbytes = tensor_bytes(t, shape)
        writer.add_tensor_info(name, tuple(reversed(shape)), np.dtype(np.float32), nbytes,
                               raw_dtype=GGMLQuantizationType(t.type_id))
        sizes.append(nbytes)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    fout = writer.fout[0] if isinstance(writer.fout, list) else writer.fout
    assert fout is not None
    fout.flush()
    header_end = fout.tell()
    writer.close()
    align = writer.data_alignment
    with open(path, "r+b") as fh:
        fh.truncate(-(-header_end // align) * align + sum(-(-n // align) * align for n in sizes))


def write_synthetic_gguf(path: str | os.PathLike[str], spec: SynthSpec | None = None, *,
                         split_max_tensors: int = 0,
                         type_for: Callable[[str, str], str] | None = None,
                         keep: Callable[[str], bool] | None = None) -> list[Path]:
    """Write a synthetic model; returns the file(s) written (several when split). ``type_for(name, role)`` may
    override the ggml type name of any tensor (e.g. to follow a quant recipe); ``keep(name)`` writes only the
    tensors it accepts (the metadata stays the whole model's)."""
    spec = spec or SynthSpec()
    if spec.fill not in ("random", "zeros"):
        raise TunerError(f"fill must be 'random' or 'zeros', got {spec.fill!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokens, _, _ = vocabulary(spec)
    full_plan = tensor_plan(spec, len(tokens))
    plan = [p for p in full_plan if keep is None or keep(p[0])]

    def type_name(name: str, role: str) -> str:
        return type_for(name, role) if type_for else _role_type(spec, role)

    if spec.fill == "zeros":
        if split_max_tensors:
            raise TunerError("sparse (fill='zeros') models are written as one file")
        writer = GGUFWriter(path, spec.arch)
        _metadata(spec, writer)
        _write_sparse(writer, path, [(name, shape, type_name(name, role)) for name, shape, role in plan])
        if spec.random_roles:
            _write_random_roles(path, spec, plan, type_name)
        return [path]

    rng = np.random.default_rng(spec.seed)
    writer = GGUFWriter(path, spec.arch, split_max_tensors=split_max_tensors)
    _metadata(spec, writer)
    for name, shape, role in full_plan:  # every tensor draws from the generator, so a kept one is the same
        tname = type_name(name, role)
        array = _random_tensor(rng, shape, tname, role)
        if keep is not None and not keep(name):
            continue
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
    """The real Qwen3.5-35B-A3B hyperparameters (its card, profiles/models/qwen3.5-35b-a3b.yaml) with a tiny
    vocabulary placeholder.

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


def spec_from_card(card: ModelCard, *, mtp: bool = False) -> SynthSpec:
    """A built-in card's hyperparameters as a sparse (``fill="zeros"``) :class:`SynthSpec`, with the tiny
    vocabulary (see :func:`real_vocab_overrides` for the real one)."""
    g = card.gguf
    try:
        return SynthSpec(
            arch=card.arch, name=card.name, n_layer=int(g["block_count"]), n_embd=int(g["embedding_length"]),
            n_head=int(g["attention.head_count"]), n_head_kv=int(g["attention.head_count_kv"]),
            head_dim=int(g["attention.key_length"]), full_attention_interval=int(g.get("full_attention_interval", 4)),
            n_expert=int(g.get("expert_count", 0)), n_expert_used=int(g.get("expert_used_count", 0)),
            n_ff_exp=int(g.get("expert_feed_forward_length", 0)),
            n_ff_shexp=int(g.get("expert_shared_feed_forward_length", 0)), n_ff=int(g.get("feed_forward_length", 0)),
            ssm_d_conv=int(g.get("ssm.conv_kernel", 0)), ssm_d_state=int(g.get("ssm.state_size", 0)),
            ssm_n_group=int(g.get("ssm.group_count", 0)), ssm_dt_rank=int(g.get("ssm.time_step_rank", 0)),
            n_ctx_train=int(g.get("context_length", 4096)), rope_dims=int(g.get("rope.dimension_count", 0)),
            mtp=mtp and card.mtp_layers > 0, tie_embeddings=card.tie_embeddings, fill="zeros")
    except KeyError as error:
        raise TunerError(f"model card {card.key} lacks GGUF key {error.args[0]}") from None


def write_mtp_sidecar(path: str | os.PathLike[str], spec: SynthSpec) -> Path:
    """The MTP head of ``spec`` (which must have ``mtp``) as its own GGUF, as ``convert_hf_to_gguf.py --mtp`` writes
    it (conversion/qwen.py:340-367 in llama.cpp's tree): the whole model's metadata, and only ``token_embd``,
    ``output_norm``, ``output`` and the MTP block ``blk.{n_layer}.*``. With the same ``seed`` its tensors are the
    whole model's, so a sidecar cut from a model drafts for it as that model's own head would."""
    if not spec.mtp:
        raise TunerError("an MTP sidecar needs a spec with the MTP block (mtp=True)")
    head = f"blk.{spec.n_layer}."
    return write_synthetic_gguf(path, spec, keep=lambda n: not n.startswith("blk.") or n.startswith(head))[0]


@dataclass(frozen=True)
class MmprojSpec:
    """A Qwen3-VL vision projector (``clip.projector_type`` ``qwen3vl_merger``, conversion/qwen3vl.py in llama.cpp's
    tree), written sparse (zeros). Defaults: a tiny encoder for a tiny text model; :func:`qwen35_mmproj_spec` has
    the Qwen3.5/3.6 shapes (27 blocks of 1152, MLP 4304, 16 heads)."""

    n_embd_text: int = 64  # the merger's output: the text model's embedding width (mtmd checks they match)
    n_layer: int = 2
    n_embd: int = 64
    n_ff: int = 128
    n_head: int = 4
    patch_size: int = 16
    n_pos: int = 2304  # learned position embeddings (48 x 48), interpolated to the image
    merge: int = 2

    def tensors(self) -> list[tuple[str, tuple[int, ...], str]]:
        """(name, shape in ggml order, type) of every tensor, as clip.cpp loads them for qwen3vl_merger."""
        e, ff, p = self.n_embd, self.n_ff, self.patch_size
        out = [("v.patch_embd.weight", (p, p, 3, e), "f16"), ("v.patch_embd.weight.1", (p, p, 3, e), "f16"),
               ("v.patch_embd.bias", (e,), "f32"), ("v.position_embd.weight", (e, self.n_pos), "f32")]
        for i in range(self.n_layer):
            b = f"v.blk.{i}."
            out += [(b + "attn_qkv.weight", (e, 3 * e), "f16"), (b + "attn_qkv.bias", (3 * e,), "f32"),
                    (b + "attn_out.weight", (e, e), "f16"), (b + "attn_out.bias", (e,), "f32"),
                    (b + "ln1.weight", (e,), "f32"), (b + "ln1.bias", (e,), "f32"),
                    (b + "ln2.weight", (e,), "f32"), (b + "ln2.bias", (e,), "f32"),
                    (b + "ffn_up.weight", (e, ff), "f16"), (b + "ffn_up.bias", (ff,), "f32"),
                    (b + "ffn_down.weight", (ff, e), "f16"), (b + "ffn_down.bias", (e,), "f32")]
        m = e * self.merge * self.merge
        out += [("v.post_ln.weight", (e,), "f32"), ("v.post_ln.bias", (e,), "f32"),
                ("mm.0.weight", (m, m), "f16"), ("mm.0.bias", (m,), "f32"),
                ("mm.2.weight", (m, self.n_embd_text), "f16"), ("mm.2.bias", (self.n_embd_text,), "f32")]
        return out


def qwen35_mmproj_spec(n_embd_text: int = 2048) -> MmprojSpec:
    """The Qwen3.5 / 3.6 vision encoder (446,571,248 parameters with a 2048-wide merger output, as 35B-A3B's)."""
    return MmprojSpec(n_embd_text=n_embd_text, n_layer=27, n_embd=1152, n_ff=4304, n_head=16)


def write_synthetic_mmproj(path: str | os.PathLike[str], spec: MmprojSpec | None = None) -> Path:
    """A sparse vision projector GGUF llama-server loads with ``--mmproj`` (its warm-up image runs on zeros)."""
    spec = spec or MmprojSpec()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = GGUFWriter(path, "clip")
    writer.add_bool("clip.has_vision_encoder", True)
    writer.add_string("clip.projector_type", "qwen3vl_merger")
    writer.add_bool("clip.use_gelu", True)
    writer.add_uint32("clip.vision.image_size", int(spec.n_pos ** 0.5) * spec.patch_size)
    writer.add_uint32("clip.vision.patch_size", spec.patch_size)
    writer.add_uint32("clip.vision.embedding_length", spec.n_embd)
    writer.add_uint32("clip.vision.feed_forward_length", spec.n_ff)
    writer.add_uint32("clip.vision.block_count", spec.n_layer)
    writer.add_uint32("clip.vision.projection_dim", spec.n_embd_text)
    writer.add_uint32("clip.vision.attention.head_count", spec.n_head)
    writer.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-6)
    writer.add_uint32("clip.vision.spatial_merge_size", spec.merge)
    writer.add_array("clip.vision.image_mean", [0.5, 0.5, 0.5])
    writer.add_array("clip.vision.image_std", [0.5, 0.5, 0.5])
    writer.add_uint32("general.file_type", 1)
    _write_sparse(writer, path, list(spec.tensors()))
    return path


def spec_from_layout(layout: ModelLayout, **overrides: Any) -> SynthSpec:
    """The :class:`SynthSpec` of a model's real shape, from its layout (a card's quant, a Hub or local header): same
    architecture, widths, layer pattern, experts, MTP block and vocabulary size (padded with unused tokens), zero
    filled. :func:`layout_type_for` gives the writer its tensor types. TunerError for a shape the writer cannot
    express (per-layer head counts, an irregular attention pattern)."""
    lay = layout
    heads = {lay.n_head[i] for i in range(lay.n_layer)}
    kv_heads = {lay.n_head_kv[i] for i in lay.attention_layers} or {lay.n_head_kv[0]}
    if len(heads) > 1 or len(kv_heads) > 1:
        raise TunerError(f"{lay.name}: per-layer head counts cannot be written as a synthetic model")
    if lay.head_k != lay.head_v:
        raise TunerError(f"{lay.name}: key and value heads of different sizes cannot be written as a synthetic model")
    interval = 4
    if lay.arch in HYBRID_ARCHS:
        gaps = {b - a for a, b in zip((-1, *lay.attention_layers), lay.attention_layers, strict=False)}
        if len(gaps) != 1:
            raise TunerError(f"{lay.name}: an irregular attention pattern cannot be written as a synthetic model")
        interval = gaps.pop()
    base_tokens = len(vocabulary(SynthSpec())[0])
    spec = SynthSpec(
        arch=lay.arch, name=f"{lay.name} (sparse twin)", n_layer=lay.n_layer, n_embd=lay.n_embd,
        n_head=heads.pop(), n_head_kv=kv_heads.pop(), head_dim=lay.head_k, full_attention_interval=interval,
        n_expert=lay.n_expert, n_expert_used=lay.n_expert_used, n_ff_exp=lay.n_ff_exp, n_ff_shexp=lay.n_ff_shexp,
        n_ff=lay.n_ff, ssm_d_conv=lay.ssm_d_conv, ssm_d_state=lay.ssm_d_state, ssm_n_group=lay.ssm_n_group,
        ssm_dt_rank=lay.ssm_dt_rank, n_ctx_train=lay.n_ctx_train, mtp=lay.has_mtp,
        tie_embeddings=lay.tied_embeddings, fill="zeros", extra_vocab=max(lay.n_vocab - base_tokens, 0))
    return replace(spec, **overrides)


def layout_type_for(layout: ModelLayout) -> Callable[[str, str], str]:
    """A ``type_for`` for :func:`write_synthetic_gguf` that gives every tensor the type it has in ``layout`` (1-D
    tensors and any the layout lacks keep the writer's defaults)."""
    types = {t.name: t.ggml_type.name for t in layout.tensors}
    defaults = SynthSpec()

    def type_for(name: str, role: str) -> str:
        return types.get(name) or _role_type(defaults, role)

    return type_for
