"""The model's layout: which layers are attention and which recurrent, the shapes that size memory, and every tensor
sorted into a class (routed experts, shared expert, router, attention, DeltaNet, norms, embeddings, output, MTP).

Built from a GGUF header (:func:`layout_from_header`) or, without any file, from a model card (``tuner.cards``).
The rules follow llama.cpp (paths relative to its source tree):

* hybrid pattern: ``<arch>.attention.recurrent_layers`` when present, else layer ``i`` is recurrent iff
  ``(i + 1) % full_attention_interval != 0`` (default 4) — src/models/qwen35moe.cpp:20-26; MTP/NextN layers
  (``i >= block_count - nextn_predict_layers``) are never recurrent and get no KV in the main context
  (llama-model.cpp:2699-2704);
* ``head_count``/``head_count_kv`` may be per-layer arrays; key/value head size default ``n_embd / n_head``
  (llama-model.cpp:1396-1443);
* generic transformers get a KV cache on every layer with ``head_count_kv > 0``; sliding-window caches (llama4's
  chunked attention, olmo2 with ``attention.sliding_window``: src/models/llama4.cpp:8-19, olmo2.cpp:6-9) are sized
  differently (llama-kv-cache-iswa.cpp) and refused rather than over-estimated.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum
from math import prod
from typing import Any
from urllib.parse import urlsplit

from tuner.errors import TunerError
from tuner.ggml import GgmlType, kv_cache_type, row_bytes
from tuner.gguf_file import ArraySummary, GgufHeader
from tuner.gguf_schema import check_metadata
from tuner.untrusted import check_repo_id

HYBRID_ARCHS: frozenset[str] = frozenset({"qwen35moe", "qwen35", "qwen3next"})
# Transformers where every layer has a KV cache, sized by the generic keys alone.
GENERIC_ARCHS: frozenset[str] = frozenset({
    "llama", "qwen2", "qwen2moe", "qwen3", "qwen3moe", "mistral3", "granite", "granitemoe", "olmoe", "olmo2",
    "phi3", "internlm2", "starcoder2", "stablelm",
})
# Generic architectures whose llama.cpp loader honours ``<arch>.attention.sliding_window`` (an iSWA cache).
_SWA_ARCHS: frozenset[str] = frozenset({"olmo2"})
SUPPORTED_ARCHS: frozenset[str] = HYBRID_ARCHS | GENERIC_ARCHS


class TensorClass(str, Enum):
    EXPERTS = "experts"  # routed experts ffn_{gate,up,down,gate_up}_exps
    SHARED_EXPERT = "shared_expert"
    ROUTER = "router"
    ATTENTION = "attention"
    DELTANET = "deltanet"
    DENSE_FFN = "dense_ffn"
    NORM = "norm"
    TOKEN_EMBD = "token_embd"
    OUTPUT = "output"
    MTP = "mtp"
    OTHER = "other"


# Name patterns (the part after ``blk.N.``), first match wins. Tensor names as in gguf-py's TENSOR_NAMES.
_BLOCK_CLASSES: tuple[tuple[re.Pattern[str], TensorClass], ...] = tuple(
    (re.compile(p), c) for p, c in (
        (r"^ffn_(gate|up|down|gate_up)_(ch|)exps\b", TensorClass.EXPERTS),
        (r"^ffn_(gate_inp_shexp|gate_shexp|up_shexp|down_shexp)\b", TensorClass.SHARED_EXPERT),
        (r"^(ffn_gate_inp|exp_probs_b)\b", TensorClass.ROUTER),
        (r"^ffn_(gate|up|down)\b", TensorClass.DENSE_FFN),
        (r"^(ssm_|attn_qkv|attn_gate)", TensorClass.DELTANET),
        (r"^attn_(q|k|v|output|q_norm|k_norm|sinks)\b", TensorClass.ATTENTION),
        (r"norm\b", TensorClass.NORM),
    )
)
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(.+)$")
CHAT_TEMPLATE_KEY = "tokenizer.chat_template"  # src/llama-arch.cpp:411
_HUB_HOSTS = frozenset({"huggingface.co", "www.huggingface.co", "hf.co"})
# llama.cpp's --n-cpu-moe / --cpu-moe pattern (common/common.h:1198-1217).
EXPERT_TENSOR_RE = re.compile(r"\.ffn_(up|down|gate|gate_up)_(ch|)exps")


@dataclass(frozen=True)
class Tensor:
    name: str
    layer: int | None  # block index, None for token_embd / output / output_norm
    cls: TensorClass
    ggml_type: GgmlType
    shape: tuple[int, ...]
    nbytes: int

    @property
    def n_elements(self) -> int:
        return prod(self.shape)

    @property
    def is_expert(self) -> bool:
        return EXPERT_TENSOR_RE.search(self.name) is not None


@dataclass(frozen=True)
class ModelLayout:
    """Everything the memory estimate and the planner need to know about one model file (or a card's quant)."""

    arch: str
    name: str
    n_layer: int  # repeating trunk layers (llama.cpp n_layer())
    n_layer_all: int  # block_count, includes MTP/NextN blocks
    n_embd: int
    n_vocab: int
    n_ctx_train: int
    n_head: tuple[int, ...]  # per layer (all n_layer_all)
    n_head_kv: tuple[int, ...]  # per layer
    head_k: int
    head_v: int
    attention_layers: tuple[int, ...]  # trunk layers with a KV cache
    recurrent_layers: tuple[int, ...]  # trunk layers with a recurrent (DeltaNet) state
    ssm_d_conv: int = 0
    ssm_d_inner: int = 0
    ssm_d_state: int = 0
    ssm_n_group: int = 0
    ssm_dt_rank: int = 0
    n_expert: int = 0
    n_expert_used: int = 0
    n_ff_exp: int = 0
    n_ff_shexp: int = 0
    n_ff: int = 0
    tied_embeddings: bool = False
    tensors: tuple[Tensor, ...] = field(default=(), repr=False)
    file_bytes: int = 0
    source: str = ""
    chat_template: str | None = field(default=None, repr=False)  # tokenizer.chat_template, as the file holds it
    base_model_repo: str | None = None  # the Hub repo general.base_model.0.repo_url names, when it names one

    # --- shape facts ------------------------------------------------------------------------------------------
    @property
    def n_nextn(self) -> int:
        return self.n_layer_all - self.n_layer

    @property
    def has_mtp(self) -> bool:
        return self.n_nextn > 0

    @property
    def is_hybrid(self) -> bool:
        return bool(self.recurrent_layers)

    @property
    def is_moe(self) -> bool:
        return self.n_expert > 0

    @property
    def n_head_attn(self) -> int:
        """Query heads of the widest attention layer (0 without attention layers): sizes the attention scratch."""
        return max((self.n_head[i] for i in self.attention_layers), default=0)

    @property
    def n_head_kv_attn(self) -> int:
        """KV heads of the widest attention layer (0 without attention layers)."""
        return max((self.n_head_kv[i] for i in self.attention_layers), default=0)

    def kv_bytes_per_cell(self, cache_type_k: str, cache_type_v: str, layers: Iterable[int] | None = None) -> int:
        """K+V bytes of one context cell summed over ``layers`` (default: every attention layer)."""
        tk, tv = kv_cache_type(cache_type_k), kv_cache_type(cache_type_v)
        total = 0
        for il in self.attention_layers if layers is None else layers:
            total += row_bytes(tk, self.n_head_kv[il] * self.head_k) + row_bytes(tv, self.n_head_kv[il] * self.head_v)
        return total

    @property
    def n_embd_r(self) -> int:
        """Conv-state floats per recurrent layer and sequence (llama-hparams.cpp:226-229)."""
        return (self.ssm_d_conv - 1) * (self.ssm_d_inner + 2 * self.ssm_n_group * self.ssm_d_state)

    @property
    def n_embd_s(self) -> int:
        """Delta-rule state floats per recurrent layer and sequence (llama-hparams.cpp:257)."""
        return self.ssm_d_state * self.ssm_d_inner

    @property
    def recurrent_bytes_per_layer(self) -> int:
        """f32 conv + delta state of one sequence in one recurrent layer: ``type_r = type_s = f32`` whatever the
        cache types (llama-model.cpp:2765-2766, llama-memory-recurrent.cpp:101-103)."""
        return 4 * (self.n_embd_r + self.n_embd_s)

    def recurrent_bytes_per_seq(self, layers: Iterable[int] | None = None) -> int:
        """f32 conv + delta state of one sequence over ``layers`` (default all recurrent layers)."""
        n = len(self.recurrent_layers) if layers is None else sum(1 for _ in layers)
        return n * self.recurrent_bytes_per_layer

    # --- tensors ----------------------------------------------------------------------------------------------
    def bytes_by_class(self) -> dict[TensorClass, int]:
        out: dict[TensorClass, int] = {}
        for t in self.tensors:
            out[t.cls] = out.get(t.cls, 0) + t.nbytes
        return out

    def expert_bytes_by_layer(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for t in self.tensors:
            if t.is_expert and t.layer is not None:
                out[t.layer] = out.get(t.layer, 0) + t.nbytes
        return out

    @property
    def weights_bytes(self) -> int:
        """Tensor data of the trunk (everything but the MTP block, which llama.cpp skips unless drafting)."""
        return sum(t.nbytes for t in self.tensors if t.cls is not TensorClass.MTP)

    def to_dict(self) -> dict[str, Any]:
        return {
            "arch": self.arch,
            "name": self.name,
            "n_layer": self.n_layer,
            "n_layer_all": self.n_layer_all,
            "n_embd": self.n_embd,
            "n_vocab": self.n_vocab,
            "n_ctx_train": self.n_ctx_train,
            "attention_layers": list(self.attention_layers),
            "recurrent_layers": list(self.recurrent_layers),
            "n_head": self.n_head[0] if self.n_head else 0,
            "n_head_kv": sorted(set(self.n_head_kv)) if self.n_head_kv else [],
            "head_k": self.head_k,
            "head_v": self.head_v,
            "n_expert": self.n_expert,
            "n_expert_used": self.n_expert_used,
            "n_ff_exp": self.n_ff_exp,
            "has_mtp": self.has_mtp,
            "kv_bytes_per_token_f16": self.kv_bytes_per_cell("f16", "f16") if self.attention_layers else 0,
            "recurrent_bytes_per_seq": self.recurrent_bytes_per_seq(),
            "bytes_by_class": {c.value: b for c, b in self.bytes_by_class().items()},
            "file_bytes": self.file_bytes,
        }


def classify_tensor(name: str, n_layer: int, recurrent: frozenset[int]) -> tuple[int | None, TensorClass]:
    """The block index and class of a tensor, by its GGUF name."""
    m = _BLOCK_RE.match(name)
    if not m:
        if name.startswith("token_embd."):
            return None, TensorClass.TOKEN_EMBD
        if name.startswith("output_norm."):
            return None, TensorClass.NORM
        if name.startswith("output."):
            return None, TensorClass.OUTPUT
        return None, TensorClass.OTHER
    layer, rest = int(m.group(1)), m.group(2)
    if layer >= n_layer:
        return layer, TensorClass.MTP
    for pattern, cls in _BLOCK_CLASSES:
        if pattern.search(rest):
            if cls is TensorClass.DELTANET and layer not in recurrent:
                return layer, TensorClass.OTHER
            return layer, cls
    return layer, TensorClass.OTHER


def _per_layer(value: Any, n: int, what: str) -> tuple[int, ...]:
    if isinstance(value, list):
        if len(value) != n:
            raise TunerError(f"{what} has {len(value)} entries for {n} layers")
        return tuple(int(v) for v in value)
    return (int(value),) * n


def recurrent_pattern(n_layer: int, n_layer_all: int, recurrent_flags: list[Any] | None,
                      full_attention_interval: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(attention layers, recurrent layers) of the trunk, as qwen35moe.cpp:20-26 decides them."""
    if recurrent_flags is not None:
        flags = [bool(f) for f in recurrent_flags]
        if len(flags) != n_layer_all:
            raise TunerError(f"attention.recurrent_layers has {len(flags)} entries for {n_layer_all} layers")
    else:
        if full_attention_interval <= 0:
            raise TunerError(f"full_attention_interval must be positive, got {full_attention_interval}")
        flags = [(i + 1) % full_attention_interval != 0 for i in range(n_layer_all)]
    recurrent = tuple(i for i in range(n_layer) if flags[i])
    attention = tuple(i for i in range(n_layer) if not flags[i])
    return attention, recurrent


def layout_from_metadata(metadata: dict[str, Any], tensors: Iterable[tuple[str, GgmlType, tuple[int, ...], int]],
                         *, file_bytes: int = 0, source: str = "") -> ModelLayout:
    """Build a layout from GGUF metadata and (name, type, shape, nbytes) tensor entries."""
    check_metadata(metadata, source or "model")  # types and ranges of every key read below
    arch = str(metadata.get("general.architecture", "")).strip()
    if not arch:
        raise TunerError(f"{source or 'model'}: no general.architecture in the GGUF metadata")
    if arch not in SUPPORTED_ARCHS:
        raise TunerError(f"unsupported architecture {arch!r} in {source or 'model'} (tuner knows: "
                         f"{', '.join(sorted(HYBRID_ARCHS))} exactly, and {', '.join(sorted(GENERIC_ARCHS))})")
    tensor_list = list(tensors)

    def key(name: str, default: Any = None, *, required: bool = False) -> Any:
        full = f"{arch}.{name}"
        if full in metadata:
            return metadata[full]
        if required:
            raise TunerError(f"{source or 'model'}: missing GGUF key {full}")
        return default

    n_layer_all = int(key("block_count", required=True))
    n_nextn = int(key("nextn_predict_layers", 0))
    n_layer = n_layer_all - n_nextn
    n_embd = int(key("embedding_length", required=True))
    if n_layer <= 0 or n_embd <= 0:
        raise TunerError(f"{source or 'model'}: block_count {n_layer_all} / embedding_length {n_embd} make no sense")
    n_head = _per_layer(key("attention.head_count", required=True), n_layer_all, "attention.head_count")
    n_head_kv = _per_layer(key("attention.head_count_kv", key("attention.head_count")), n_layer_all,
                           "attention.head_count_kv")
    # default head size: n_embd over layer 0's head count, as llama.cpp's n_head() (llama-model.cpp:1435-1443)
    head_default = n_embd // n_head[0] if n_head[0] else 0
    head_k = int(key("attention.key_length", head_default))
    head_v = int(key("attention.value_length", head_default))

    if arch in _SWA_ARCHS and int(key("attention.sliding_window", 0) or 0) > 0:
        raise TunerError(f"{source or 'model'}: {arch} with sliding-window attention "
                         f"({arch}.attention.sliding_window = {key('attention.sliding_window')}) is not sized by tuner")
    if arch in HYBRID_ARCHS:
        attention, recurrent = recurrent_pattern(
            n_layer, n_layer_all, key("attention.recurrent_layers"), int(key("full_attention_interval", 4)))
    else:
        attention, recurrent = tuple(i for i in range(n_layer) if n_head_kv[i] > 0), ()

    n_vocab = 0
    for name, _, shape, _ in tensor_list:
        if name == "token_embd.weight" and len(shape) >= 2:
            n_vocab = int(shape[1])
    if not n_vocab:
        tokens = metadata.get("tokenizer.ggml.tokens")
        n_vocab = len(tokens) if isinstance(tokens, list | ArraySummary) else int(key("vocab_size", 0))

    rec_set = frozenset(recurrent)
    classified = []
    for name, gtype, shape, nbytes in tensor_list:
        layer, cls = classify_tensor(name, n_layer, rec_set)
        classified.append(Tensor(name, layer, cls, gtype, tuple(shape), nbytes))
    names = {t.name for t in classified}

    n_ff_arr = key("feed_forward_length", 0)
    n_ff = int(max(n_ff_arr) if isinstance(n_ff_arr, list) else n_ff_arr)
    n_ff_exp = key("expert_feed_forward_length", 0)
    n_ff_exp = int(max(n_ff_exp) if isinstance(n_ff_exp, list) else n_ff_exp)
    n_used = key("expert_used_count", 0)
    n_used = int(max(n_used) if isinstance(n_used, list) else n_used)
    return ModelLayout(
        arch=arch,
        name=str(metadata.get("general.name", "") or source),
        n_layer=n_layer,
        n_layer_all=n_layer_all,
        n_embd=n_embd,
        n_vocab=n_vocab,
        n_ctx_train=int(key("context_length", 4096)),
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_k=head_k,
        head_v=head_v,
        attention_layers=attention,
        recurrent_layers=recurrent,
        ssm_d_conv=int(key("ssm.conv_kernel", 0)),
        ssm_d_inner=int(key("ssm.inner_size", 0)),
        ssm_d_state=int(key("ssm.state_size", 0)),
        ssm_n_group=int(key("ssm.group_count", 0)),
        ssm_dt_rank=int(key("ssm.time_step_rank", 0)),
        n_expert=int(key("expert_count", 0)),
        n_expert_used=n_used,
        n_ff_exp=n_ff_exp,
        n_ff_shexp=int(key("expert_shared_feed_forward_length", 0)),
        n_ff=n_ff,
        tied_embeddings="output.weight" not in names and "token_embd.weight" in names,
        tensors=tuple(classified),
        file_bytes=file_bytes,
        source=source,
        chat_template=template if isinstance(template := metadata.get(CHAT_TEMPLATE_KEY), str) else None,
        base_model_repo=base_model_repo(metadata),
    )


def base_model_repo(metadata: dict[str, Any]) -> str | None:
    """The Hub repo of the model a GGUF was converted from: ``general.base_model.0.repo_url`` when it is a
    ``https://huggingface.co/<owner>/<name>`` URL (gguf-py/gguf/constants.py:81-90); None otherwise."""
    url = metadata.get("general.base_model.0.repo_url")
    if not isinstance(url, str) or len(url) > 512:
        return None
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or parts.netloc.lower() not in _HUB_HOSTS:
        return None
    repo = parts.path.strip("/")
    try:
        return check_repo_id(repo)
    except TunerError:
        return None


def layout_from_header(header: GgufHeader) -> ModelLayout:
    return layout_from_metadata(
        header.metadata,
        ((t.name, t.ggml_type, t.shape, t.nbytes) for t in header.tensors),
        file_bytes=header.file_bytes,
        source=header.paths[0],
    )
