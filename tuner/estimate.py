"""The memory estimate: bytes per device that llama-server will allocate for a model and a flag set.

Each rule below names where llama.cpp implements it (paths relative to its tree, the llama-cpp-python 0.3.36 sdist's
``vendor/llama.cpp``); the compute model's measurements are the tests in tests/test_estimate.py and
tests/test_estimate_vs_llama.py.

* context: ``n_ctx = pad256(-c or n_ctx_train)``; unified KV: ``n_ctx_seq = n_ctx``; else
  ``n_ctx_seq = pad256(n_ctx / np)`` and ``n_ctx = n_ctx_seq * np`` (llama-context.cpp:288-313). llama-server with
  no ``-np`` uses 4 slots and a unified cache (tools/server/server.cpp:156-160).
* KV: attention layers only; one K and one V tensor of ``n_ctx`` cells per layer, ``row_size(type, n_head_kv *
  head_dim)`` bytes a cell (llama-kv-cache.cpp:208-237). Same total for unified and per-slot streams.
* recurrent state: f32 whatever the cache type; ``(d_conv-1)*(d_inner+2*n_group*d_state) + d_state*d_inner``
  floats per recurrent layer and sequence, ``max(1, np) * (1 + n_rs_seq)`` sequences, ``n_rs_seq`` =
  ``--spec-draft-n-max`` with MTP drafting (llama-memory-recurrent.cpp:76-103, common/common.h:396-402).
* weights: every tensor's bytes on the device :mod:`tuner.devices` places it on (``-ngl``, ``--tensor-split``,
  ``--n-cpu-moe``, ``-ot``; :func:`~tuner.devices.tensor_placement`). On CUDA a quantized tensor whose row length is
  not a multiple of 512 gets one row's worth of padding (``ggml_backend_cuda_buffer_type_get_alloc_size``,
  ggml-cuda.cu:903-920).
* compute buffer (sched_reserve, llama-context.cpp:615-765): ggml-alloc's peak over the worst-case graph, a ubatch of
  ``n_tok = roundup(min(n_ctx, n_ubatch), np)`` tokens (:2528-2531) against the full cache (``init_full``).
  Derived from the graph code (src/models/qwen35moe.cpp, qwen35.cpp, delta-net-base.cpp, llama-graph.cpp), with the
  coefficients fitted to the CPU backend's reported buffers (:func:`compute_bytes_cpu`): the largest of the
  per-block peaks of :func:`activation_peaks` (MoE or dense FFN, DeltaNet conv, DeltaNet state, attention) and the
  logits of ``min(n_tok, n_outputs)`` rows, plus the KQ mask ``n_kv*n_tok`` (f16 with FA, f32 without; ``n_kv =
  n_ctx`` unified, ``n_ctx_seq`` per-slot streams, llama-graph.cpp:29-46), the per-token graph inputs (36 B/token)
  and, with a quantized cache, the ``head^2`` f32 Hadamard matrix (llama-kv-cache.cpp:321-362). Without FA the f32
  ``KQ`` matrix ``n_kv*n_tok*n_head*4`` (llama-graph.cpp:2688-2722) and its block dominate. Checked: the reference
  notes' appendix-B runs are reproduced to 0.1 MiB (tests/test_estimate.py), and a live CPU llama-server over 4
  shapes x 31 flag sets to within 20 % (tests/test_estimate_vs_llama.py, run in CI; most runs to 0.1 MiB, the
  slot-count and MTP cases within about 12 %). The MTP draft context has its own, smaller buffer
  (:func:`mtp_compute_bytes`). CUDA adds, read from code (not measured here): an f16 copy of the full K/V views for
  quantized caches on the MMA FA path (fattn.cu:722-756), and the largest CPU-resident expert tensor when expert
  weights stay on the CPU and the ubatch is >= 32 (op offload, ggml-backend.cpp:961-981, ggml-cuda.cu:5825). The
  graph inputs (mask, embeddings) also live in the pinned host (``CUDA_Host``) compute buffer
  (ggml-backend.cpp:944-948).
* output buffer: ``n_vocab * 4 * np`` bytes in host memory, one per context: ``output_reserve(n_seq_max)`` at
  construction (llama-context.cpp:377-383, 2116-2230); llama-server caps outputs at ``np * (1 + n_draft)``
  (server-context.cpp:41-53), so the logits never dominate its compute buffer.
* host extras: context checkpoints (``--ctx-checkpoints`` per slot, each one sequence's recurrent state) and the prompt
  cache (``--cache-ram`` MiB, 8192 by default, -1 = no limit), both host RAM (server-context.cpp:2290-2356,
  server-task.cpp:1691+, common/common.h:634).
* MTP drafting (``--spec-type draft-mtp``): the head's tensors load only then (qwen35moe.cpp:37-40,
  common/common.cpp:1625); the target context keeps ``--spec-draft-n-max`` rollback snapshots of the recurrent state;
  a draft context on the head (common/speculative.cpp:2446-2570) has the target's ``n_ctx`` and slots, a KV cache
  of the MTP block alone in the draft cache types (f16 by default), and its own compute and output buffers. A
  **sidecar** head (``-md mtp-*.gguf``, ``draft`` below) is a second model: all of its tensors load
  (common/speculative.cpp:2456-2466, 2537-2556), placed by :func:`~tuner.devices.sidecar_placement` — so it
  duplicates the trunk's ``token_embd`` and ``output``.
* vision (``--mmproj``, ``vision`` below): the projector's weights and its encoder's compute buffer
  (:mod:`tuner.vision`), as ``vision_bytes`` of the device :func:`~tuner.devices.projector_device` puts it on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from tuner.devices import (
    CPU,
    Device,
    layer_devices,
    model_devices,
    projector_device,
    sidecar_placement,
    slot_devices,
    tensor_placement,
)
from tuner.errors import TunerError
from tuner.flags import SPEC_MTP, ServerFlags
from tuner.ggml import CUDA_MATRIX_ROW_PADDING, is_quantized, kv_cache_type, row_bytes
from tuner.layout import ModelLayout, Tensor, TensorClass
from tuner.units import MiB
from tuner.vision import Projector

# Architectures with M-RoPE / IMRoPE: four positions per token (llama-graph.cpp build_inp_pos).
MROPE_ARCHS: frozenset[str] = frozenset({"qwen35", "qwen35moe"})
OP_OFFLOAD_MIN_BATCH = 32  # GGML_OP_OFFLOAD_MIN_BATCH (ggml-cuda.cu:5825)
# Architectures whose recurrent state keeps --spec-draft-n-max rollback snapshots (llm_arch_supports_rs_rollback,
# llama-arch.cpp:1123-1139); for the others llama.cpp clamps n_rs_seq to 0 (llama-context.cpp:105-110).
RS_ROLLBACK_ARCHS: frozenset[str] = frozenset({"qwen35", "qwen35moe"})
# The draft context's KV cache type unless --cache-type-k-draft / --cache-type-v-draft say otherwise (common.h).
DRAFT_CACHE_TYPE = "f16"


def pad(n: int, multiple: int) -> int:
    """``n`` rounded up to a multiple of ``multiple`` (GGML_PAD)."""
    return -(-n // multiple) * multiple


@dataclass(frozen=True)
class DeviceMemory:
    name: str  # as llama.cpp prints it: CUDA0, CUDA1, CPU (host)
    weights_bytes: int = 0
    kv_bytes: int = 0
    recurrent_bytes: int = 0
    compute_bytes: int = 0
    output_bytes: int = 0
    vision_bytes: int = 0  # the vision projector: its weights and its encoder's compute buffer

    @property
    def is_gpu(self) -> bool:
        return self.name != CPU

    @property
    def total_bytes(self) -> int:
        return (self.weights_bytes + self.kv_bytes + self.recurrent_bytes + self.compute_bytes + self.output_bytes
                + self.vision_bytes)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total_bytes": self.total_bytes}


@dataclass(frozen=True)
class MemoryEstimate:
    n_ctx: int
    n_ctx_seq: int
    n_seq: int
    kv_unified: bool
    flash_attn: bool
    n_batch: int
    n_ubatch: int
    n_gpu_layers: int  # blocks (and the output layer) on a GPU, as llama.cpp counts them
    devices: tuple[DeviceMemory, ...]
    checkpoints_bytes: int = 0  # host RAM, worst case: --ctx-checkpoints per slot
    prompt_cache_bytes: int = 0  # host RAM, upper bound: --cache-ram (0 when -1, no limit: see notes)
    mtp_bytes: int = 0  # part of the totals above that the MTP draft context adds
    notes: tuple[str, ...] = field(default=())
    pipeline_parallel: bool = False  # llama.cpp's pipeline parallelism is on (bigger compute buffers)
    vision: dict[str, Any] | None = None  # the projector: file, device, weights and compute bytes
    mtp_draft: str | None = None  # the sidecar file the draft context runs on (None: the head in the model)

    def _sum(self, attr: str) -> int:
        return sum(getattr(d, attr) for d in self.devices)

    @property
    def weights_bytes(self) -> int:
        return self._sum("weights_bytes")

    @property
    def kv_bytes(self) -> int:
        return self._sum("kv_bytes")

    @property
    def recurrent_bytes(self) -> int:
        return self._sum("recurrent_bytes")

    @property
    def compute_bytes(self) -> int:
        return self._sum("compute_bytes")

    @property
    def output_bytes(self) -> int:
        return self._sum("output_bytes")

    @property
    def vision_bytes(self) -> int:
        return self._sum("vision_bytes")

    @property
    def total_bytes(self) -> int:
        return self._sum("total_bytes")

    def device(self, name: str) -> DeviceMemory:
        for d in self.devices:
            if d.name == name:
                return d
        return DeviceMemory(name)

    @property
    def gpu_devices(self) -> tuple[DeviceMemory, ...]:
        return tuple(d for d in self.devices if d.is_gpu)

    @property
    def host(self) -> DeviceMemory:
        return self.device(CPU)

    @property
    def host_total_bytes(self) -> int:
        """Host RAM at worst: CPU buffers, pinned buffers, checkpoints and a full prompt cache."""
        return self.host.total_bytes + self.checkpoints_bytes + self.prompt_cache_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "context": {"n_ctx": self.n_ctx, "n_ctx_seq": self.n_ctx_seq, "n_seq": self.n_seq,
                        "kv_unified": self.kv_unified, "flash_attn": self.flash_attn,
                        "n_batch": self.n_batch, "n_ubatch": self.n_ubatch, "n_gpu_layers": self.n_gpu_layers,
                        "pipeline_parallel": self.pipeline_parallel},
            "memory": {
                "weights_bytes": self.weights_bytes,
                "kv_bytes": self.kv_bytes,
                "recurrent_bytes": self.recurrent_bytes,
                "compute_bytes": self.compute_bytes,
                "output_bytes": self.output_bytes,
                "vision_bytes": self.vision_bytes,
                "total_bytes": self.total_bytes,
                "devices": [d.to_dict() for d in self.devices],
                "host": {"checkpoints_bytes": self.checkpoints_bytes,
                         "prompt_cache_bytes": self.prompt_cache_bytes,
                         "total_bytes": self.host_total_bytes},
                "mtp_bytes": self.mtp_bytes,
                "mtp_draft": self.mtp_draft,
                "vision": self.vision,
            },
            "notes": list(self.notes),
        }


@dataclass(frozen=True)
class ContextShape:
    n_ctx: int
    n_ctx_seq: int
    n_seq: int
    unified: bool
    n_batch: int
    n_ubatch: int

    @property
    def n_tok(self) -> int:
        """Tokens of the worst-case graph sched_reserve sizes: the ubatch rounded up to a multiple of the sequences
        (llama-context.cpp:628-629, 2528-2531)."""
        return pad(self.n_ubatch, self.n_seq)

    @property
    def n_kv_mask(self) -> int:
        """KV cells one stream's attention (and its KQ mask) spans: the whole cache when unified, one slot's stream
        otherwise (llama-graph.cpp:29-46)."""
        return self.n_ctx if self.unified else self.n_ctx_seq


def context_shape(layout: ModelLayout, flags: ServerFlags) -> ContextShape:
    """n_ctx, n_ctx_seq and batch sizes after llama.cpp's rounding (llama-context.cpp:246-313)."""
    n_seq = flags.n_seq
    n_ctx = pad(flags.ctx_size or layout.n_ctx_train, 256)
    if flags.unified:
        n_ctx_seq = n_ctx
    else:
        n_ctx_seq = pad(n_ctx // n_seq, 256)
        n_ctx = n_ctx_seq * n_seq
    n_batch = min(flags.batch_size, n_ctx)
    n_ubatch = min(flags.ubatch_size, n_batch)
    return ContextShape(n_ctx, n_ctx_seq, n_seq, flags.unified, n_batch, n_ubatch)


def device_tensor_bytes(t: Tensor, device: Device | None) -> int:
    """Bytes of ``t`` in a buffer of ``device`` (None: the CPU): a quantized tensor whose rows are not a multiple of
    512 gets one row of padding on CUDA (``ggml_backend_cuda_buffer_type_get_alloc_size``, ggml-cuda.cu:903-920)."""
    nbytes = t.nbytes
    if device is not None and device.cuda and is_quantized(t.ggml_type) and t.shape \
            and t.shape[0] % CUDA_MATRIX_ROW_PADDING:
        nbytes += row_bytes(t.ggml_type, CUDA_MATRIX_ROW_PADDING - t.shape[0] % CUDA_MATRIX_ROW_PADDING)
    return nbytes


def context_bytes_by_layer(layout: ModelLayout, flags: ServerFlags) -> dict[int, tuple[int, int]]:
    """KV and recurrent-state bytes of every block that has them, ``{il: (kv, rs)}``: one K and V of ``n_ctx``
    cells per attention layer (llama-kv-cache.cpp:208-237), one state per sequence and rollback snapshot per
    recurrent layer (llama-memory-recurrent.cpp:76-103), the MTP block's draft KV (f16 unless told) when drafting.
    They live with their block's device (``dev_layer(il)``), or on the CPU with ``--no-kv-offload``."""
    shape = context_shape(layout, flags)
    tk, tv = kv_cache_type(flags.cache_type_k), kv_cache_type(flags.cache_type_v)
    mtp = flags.spec_type == SPEC_MTP
    out: dict[int, list[int]] = {}
    for il in layout.attention_layers:
        out.setdefault(il, [0, 0])[0] += shape.n_ctx * layout.kv_bytes_per_cell(tk.name, tv.name, [il])
    n_rs_seq = flags.spec_draft_n_max if mtp and layout.arch in RS_ROLLBACK_ARCHS else 0
    rs_rows = max(1, shape.n_seq) * (1 + n_rs_seq)
    for il in layout.recurrent_layers:
        out.setdefault(il, [0, 0])[1] += layout.recurrent_bytes_per_layer * rs_rows
    if mtp:
        for il in range(layout.n_layer, layout.n_layer_all):
            out.setdefault(il, [0, 0])[0] += shape.n_ctx * layout.kv_bytes_per_cell(DRAFT_CACHE_TYPE,
                                                                                    DRAFT_CACHE_TYPE, [il])
    return {il: (kv, rs) for il, (kv, rs) in out.items()}


def activation_peaks(layout: ModelLayout, n_tok: int, n_seq: int = 1, n_rs_seq: int = 0) -> dict[str, int]:
    """Bytes of intermediate tensors live at the peak of each kind of block, for one ubatch of ``n_tok`` tokens
    in ``n_seq`` sequences (the compute buffer holds the largest, see the module docstring for the derivation).

    Floats per token (E = n_embd, U = experts used, F = expert FFN width, NF = dense FFN width, C = conv channels
    ``2*n_group*d_state + d_inner``, K = ``n_group*d_state``, V = d_inner, H*D = query heads * head size):

    * ``moe_ffn``  ``U*E + 3*U*F + 4*E``: up, gate and SwiGLU ``[F, U]`` outputs and the down projection ``[E, U]``
      (``build_moe_ffn``, llama-graph.cpp:2007-2370) beside the block's residual and normed input;
    * ``dense_ffn`` ``3*NF + 3*E`` (up, gate, SwiGLU);
    * ``deltanet_conv`` ``3*C + 3*E`` plus the ``d_conv - 1`` conv-state columns of each sequence, twice: the
      projected qkv, the concatenated conv input and the ssm_conv output (delta-net-base.cpp:447-525);
    * ``deltanet_state`` ``2*E + 2*C + 2*K + V`` plus ``(1 + K_snap)`` f32 recurrent states of each sequence,
      ``K_snap = 1 + n_rs_seq`` (the gated-delta-net op writes the output and K_snap state snapshots next to the
      gathered input state, delta-net-base.cpp:527-590): it wins with many slots or MTP snapshots;
    * ``attention`` ``5*H*D + E``: the fused Q+gate projection, the gate copy, the normed and roped Q, the attention
      output (qwen35moe.cpp:258-350; FA on, the KQ mask is counted apart).

    The coefficients count ggml-alloc's best-fit fragmentation as well as the live tensors: they were fitted to the
    CPU backend's reported buffers (the sparse 35B-A3B runs re-checked by tests/test_estimate.py, and the
    live qwen35moe / qwen35 / qwen3next runs of tests/test_estimate_vs_llama.py at the 35B-A3B widths): the
    ``moe_ffn``/``dense_ffn``/``deltanet_conv`` terms are exact there (to 0.1 MiB); ``deltanet_state`` (many slots,
    MTP snapshots) is within about 15 %.
    """
    e = layout.n_embd
    t = max(n_tok, 1)
    peaks: dict[str, float] = {}
    if layout.is_moe:
        u, f = layout.n_expert_used, layout.n_ff_exp
        peaks["moe_ffn"] = u * e + 3 * u * f + 4 * e
    elif layout.n_ff:
        peaks["dense_ffn"] = 3 * layout.n_ff + 3 * e
    if layout.is_hybrid:
        k = layout.ssm_n_group * layout.ssm_d_state
        v = layout.ssm_d_inner
        c = 2 * k + v
        k_snap = 1 + n_rs_seq
        peaks["deltanet_conv"] = 3 * c + 3 * e + 2 * (layout.ssm_d_conv - 1) * c * n_seq / t
        peaks["deltanet_state"] = 2 * e + 2 * c + 2 * k + v + (1 + k_snap) * layout.n_embd_s * n_seq / t
    if layout.attention_layers:
        peaks["attention"] = 5 * layout.n_head_attn * layout.head_k + e
    if not peaks:
        peaks["embeddings"] = 4 * e
    return {name: int(n_tok * 4 * floats) for name, floats in peaks.items()}


def activation_bytes(layout: ModelLayout, n_tok: int, n_seq: int = 1, n_rs_seq: int = 0) -> int:
    """Peak intermediate tensors of one ubatch: the largest of :func:`activation_peaks`."""
    return max(activation_peaks(layout, n_tok, n_seq, n_rs_seq).values())


def _input_bytes(layout: ModelLayout, n_tok: int) -> int:
    """Per-token graph inputs that stay allocated: token ids (i32), positions (i32, four per token with M-RoPE) and,
    with attention layers, the K and V cache row indices (i64 each). 36 B/token for Qwen3.5: the "+0.02 MiB" of
    the reference's fit at ub 512, 0.14 MiB at ub 4096."""
    per_token = 4 + 4 * (4 if layout.arch in MROPE_ARCHS else 1) + (16 if layout.attention_layers else 0)
    return n_tok * per_token


def _rotation_bytes(layout: ModelLayout, k_quantized: bool, v_quantized: bool) -> int:
    """The Hadamard matrix input used when K or V is quantized and the head size is a multiple of 64
    (llama-kv-cache.cpp:321-362): head_dim^2 f32."""
    head = max(layout.head_k, layout.head_v)
    if (k_quantized or v_quantized) and head % 64 == 0 and layout.attention_layers:
        return head * head * 4
    return 0


def compute_bytes_cpu(layout: ModelLayout, shape: ContextShape, flash_attn: bool, k_quantized: bool,
                      n_outputs: int, *, v_quantized: bool = False, n_rs_seq: int = 0) -> int:
    """The compute buffer of the backend that runs the repeating layers, as the CPU backend reserves it.

    FA on: activations + f16 KQ mask ``[n_kv, n_tok]``. FA off: the larger of (activations + f32 mask) and the
    attention block, whose f32 ``KQ [n_kv, n_tok, n_head]`` (llama-graph.cpp:2688-2722) and f32 mask come with
    ``5*E + 2.75*H*D`` floats per token of other tensors (+ a rotated f32 Q ``[D, H, n_tok]`` when K is
    quantized). ``n_kv`` is the whole cache (``n_ctx``) when unified, one stream (``n_ctx_seq``) otherwise.
    """
    n_tok, n_kvm = shape.n_tok, shape.n_kv_mask
    act = activation_bytes(layout, n_tok, shape.n_seq, n_rs_seq)
    logits = min(n_tok, n_outputs) * layout.n_vocab * 4 + n_tok * layout.n_embd * 4
    peak = max(act, logits)
    base = _input_bytes(layout, n_tok) + _rotation_bytes(layout, k_quantized, v_quantized)
    if not layout.attention_layers:
        return peak + base
    if flash_attn:
        return peak + n_kvm * n_tok * 2 + base
    n_head = layout.n_head_attn
    mask = n_kvm * n_tok * 4
    attention = (n_kvm * n_tok * n_head * 4 + mask
                 + int(n_tok * 4 * (5 * layout.n_embd + 2.75 * n_head * layout.head_k))
                 + (n_tok * n_head * layout.head_k * 4 if k_quantized else 0))
    return max(peak + mask, attention) + base


def mtp_compute_bytes(layout: ModelLayout, shape: ContextShape, flash_attn: bool, k_quantized: bool,
                      n_outputs: int, *, v_quantized: bool = False) -> int:
    """The compute buffer of the MTP draft context (graph_mtp, qwen35moe.cpp:553-741): one full-attention block
    with the token embedding and the trunk's hidden state concatenated in front, its FFN, and the LM head.

    Floats per token: the FFN ``U*E + 3*U*F + 2*E`` (MoE) or ``3*NF + 2*E`` (dense), or the attention block
    ``4*H*D + 3*E`` together with the KQ mask, whichever is larger (fitted on the same CPU runs as
    :func:`activation_peaks`, within about 10 %). Qwen3-Next's draft head runs its FFN on the output rows only.
    """
    n_tok, n_kvm = shape.n_tok, shape.n_kv_mask
    e = layout.n_embd
    if layout.is_moe:
        ffn = layout.n_expert_used * e + 3 * layout.n_expert_used * layout.n_ff_exp + 2 * e
    else:
        ffn = 3 * layout.n_ff + 2 * e
    # Qwen3-Next's draft head keeps only the output rows before its FFN (qwen3next.cpp:749-752)
    ffn_tok = min(n_tok, n_outputs) if layout.arch == "qwen3next" else n_tok
    n_head = max(layout.n_head[layout.n_layer:] or layout.n_head)
    attention = n_tok * 4 * (4 * n_head * layout.head_k + 3 * e)
    if flash_attn:
        attention += n_kvm * n_tok * 2
    else:
        attention += n_kvm * n_tok * (n_head + 1) * 4
    logits = min(n_tok, n_outputs) * layout.n_vocab * 4 + n_tok * e * 4
    return (max(ffn_tok * 4 * ffn, attention, logits) + _input_bytes(layout, n_tok)
            + _rotation_bytes(layout, k_quantized, v_quantized))


def kv_cache_type_supported(layout: ModelLayout, type_name: str, *, flash_attn: bool = True) -> bool:
    """Whether llama.cpp accepts this K/V cache type for the model: with flash attention a quantized type's block
    must divide the head size (llama_init_from_model, llama-context.cpp:3851-3870)."""
    t = kv_cache_type(type_name)
    if not (flash_attn and layout.attention_layers and is_quantized(t)):
        return True
    return layout.head_k % t.block_size == 0 and layout.head_v % t.block_size == 0


# Per-device compute buffers, measured with CPU-backend devices (two ggml-rpc-server workers on loopback, a qwen35moe
# at the 35B-A3B widths, tests/test_multidevice_vs_llama.py) and, for one CUDA device, the reference run that
# tests/test_estimate.py reproduces: the rules of compute_by_device.
PARTIAL_FIRST_DEVICE_ACTS = 4.5
"""With some blocks on the CPU and blocks on several devices, the first device's buffer held 4.5 activations more
than its blocks' peak (18.1 MiB at ubatch 512 and n_embd 2048, 10.1 at ubatch 256), whatever the context (measured,
not derived; that device's mask was not in it)."""


class BlockSpan:
    """The blocks of one device, added in order, reduced to what its compute buffer depends on (the mask window of
    :class:`ComputeModel`): an accumulator, so a placement search can grow a device's range block by block."""

    __slots__ = ("attn", "before", "n", "plain", "since")

    def __init__(self) -> None:
        self.attn = False  # an attention block on the device
        self.before = 0  # the largest FFN / DeltaNet peak of a block before the device's last attention block
        self.since = 0  # ... of the last attention block and the blocks after it
        self.plain = 0  # the largest FFN / DeltaNet peak of any block
        self.n = 0

    def add(self, rest_peak: int, is_attention: bool) -> None:
        if is_attention:
            self.before = max(self.before, self.since)
            self.since = rest_peak
            self.attn = True
        else:
            self.since = max(self.since, rest_peak)
        self.plain = max(self.plain, rest_peak)
        self.n += 1


class ComputeModel:
    """The compute buffers of one context shape and flag set, device by device (see :func:`compute_by_device`)."""

    def __init__(self, layout: ModelLayout, shape: ContextShape, *, flash_attn: bool, k_quantized: bool,
                 v_quantized: bool, n_outputs: int, n_rs_seq: int = 0) -> None:
        self.layout, self.shape = layout, shape
        n_tok = shape.n_tok
        e = layout.n_embd
        self.act = n_tok * e * 4
        self.has_attention = bool(layout.attention_layers)
        self.mask = shape.n_kv_mask * n_tok * (2 if flash_attn else 4) if self.has_attention else 0
        self.inputs = _input_bytes(layout, n_tok) + _rotation_bytes(layout, k_quantized, v_quantized)
        peaks = activation_peaks(layout, n_tok, shape.n_seq, n_rs_seq)
        self.ffn_peak = peaks.get("moe_ffn", peaks.get("dense_ffn", 0))
        self.attention_peak = peaks.get("attention", 0) + self.mask
        self.recurrent_peak = max(peaks.get("deltanet_conv", 0), peaks.get("deltanet_state", 0))
        self.fallback_peak = peaks.get("embeddings", 0)
        self.logits_full = min(n_tok, n_outputs) * layout.n_vocab * 4 + self.act
        self.attention = frozenset(layout.attention_layers)
        self.recurrent = frozenset(layout.recurrent_layers)
        self.fa_off = 0
        if not flash_attn and self.has_attention:  # the f32 KQ of an attention block, with its mask
            n_head = layout.n_head_attn
            self.fa_off = (shape.n_kv_mask * n_tok * n_head * 4 + self.mask
                           + int(n_tok * 4 * (5 * e + 2.75 * n_head * layout.head_k))
                           + (n_tok * n_head * layout.head_k * 4 if k_quantized else 0))
        self.kv_convert = 0  # CUDA FA's f16 copy of a quantized cache, per device with attention layers
        if flash_attn and (k_quantized or v_quantized) and self.has_attention:
            self.kv_convert = shape.n_ctx * layout.n_head_kv_attn * (
                (layout.head_k if k_quantized else 0) + (layout.head_v if v_quantized else 0)) * 2
        self.cpu_main = compute_bytes_cpu(layout, shape, flash_attn, k_quantized, n_outputs, v_quantized=v_quantized,
                                          n_rs_seq=n_rs_seq)
        self.op_offload = shape.n_ubatch >= OP_OFFLOAD_MIN_BATCH

    def rest_peak(self, il: int) -> int:
        """A block's FFN and DeltaNet peak (its attention part is :attr:`attention_peak`)."""
        top = max(self.ffn_peak, self.recurrent_peak if il in self.recurrent else 0)
        return top or self.fallback_peak

    def span(self, blocks: Sequence[int]) -> BlockSpan:
        acc = BlockSpan()
        for il in blocks:
            acc.add(self.rest_peak(il), il in self.attention)
        return acc

    def device_bytes(self, span: BlockSpan, holds_output: bool, device: Device, *, op_offload_bytes: int = 0,
                     pipeline: bool = False, partial_first: bool = False) -> int:
        """One device's compute buffer: its blocks (``span``), the output layer if it holds it, the largest
        CPU-resident expert it multiplies for the CPU (``op_offload_bytes``), pipeline parallelism's copies."""
        if not span.n and not holds_output:
            return op_offload_bytes
        if not span.n:
            c = self.logits_full
        else:
            c = max(self.attention_peak if span.attn else 0, span.before + self.mask if span.attn else 0, span.since)
            if span.attn:
                c = max(c, self.fa_off)
            if partial_first:
                c = max(c, span.plain + int(PARTIAL_FIRST_DEVICE_ACTS * self.act))
            if not device.cuda:
                c -= self.act
            if holds_output:
                c = max(c, self.logits_full)
            if span.attn:
                c += self.inputs
        if device.cuda and span.attn:
            c += self.kv_convert
        c += op_offload_bytes
        if pipeline:
            c += 4 * self.act + (3 * (self.mask + self.inputs) if span.attn else 0)
        return int(c)

    def host_bytes(self, first_device: Device | None, *, cpu_runs_layers: bool, cpu_runs_experts: bool = False,
                   pipeline: bool = False) -> int:
        """The CPU backend's compute buffer (``CUDA_Host`` when the first device is a local CUDA device)."""
        if cpu_runs_layers or first_device is None:
            return self.cpu_main
        local_cuda = first_device.cuda and not first_device.remote
        host = self.mask + self.act * (1 if local_cuda else 2) + (self.inputs if self.has_attention else 0)
        if cpu_runs_experts and self.ffn_peak:
            host = max(host, self.ffn_peak - 2 * self.act + self.mask)
        if pipeline:
            host += 3 * (self.mask + self.act + self.inputs)
        return host


def compute_by_device(layout: ModelLayout, shape: ContextShape, devs: Sequence[str], used: Sequence[Device], *,
                      flash_attn: bool, k_quantized: bool, v_quantized: bool, n_outputs: int, n_rs_seq: int = 0,
                      pipeline: bool = False, largest_cpu_expert: int = 0) -> dict[str, int]:
    """The compute buffer of every backend (sched_reserve, llama-context.cpp:615-765): each device's, sized by the
    splits of the graph it runs, and the CPU's (``CUDA_Host`` when the first device is a local CUDA device).

    ``act`` = ``n_tok * n_embd * 4`` (a block's input), ``mask`` the KQ mask, ``inputs`` the per-token graph inputs.

    * CPU runs blocks (``-ngl`` below all, or no device): :func:`compute_bytes_cpu` on the CPU.
    * A device with blocks: the largest :func:`activation_peaks` of its blocks' kinds (the logits of
      ``min(n_tok, n_outputs)`` rows plus ``act`` on the output device), with the mask counted only for the blocks
      before its last attention layer (the scheduler copies a split's inputs in at the split's start and frees them
      after their last use, ggml-backend.cpp:1375-1392, 1507-1530); ``act`` less on a non-CUDA device (measured: its
      block input stays in the host buffer), ``inputs`` more where it has attention layers; on CUDA, the f16 copy of
      a quantized cache (fattn.cu:722-756) where it has attention layers, and on the first local CUDA device the
      largest CPU-resident expert tensor when experts are in RAM and the ubatch is at least 32 (op offload,
      ggml-backend.cpp:961-981, ggml-cuda.cu:5825).
    * A device holding only the output layer: its logits and ``act``.
    * The CPU when no block runs there: the mask, ``act`` (two with a non-CUDA first device: measured) and the
      inputs; with experts in RAM and no local CUDA device to offload them to, the CPU runs them: the MoE peak less
      two ``act``, with the mask (measured).
    * Pipeline parallelism (several devices, ``-ngl all``, layer split, no tensor override, llama-context.cpp:430-457)
      keeps 4 copies of every split input, none reused (``GGML_SCHED_MAX_COPIES``, ggml-backend.cpp:1375-1392):
      ``3 * (mask + inputs)`` more on every device with attention layers and ``4 * act`` on every device with slots;
      ``3 * (mask + act + inputs)`` more on the CPU (measured exactly).
    """
    model = ComputeModel(layout, shape, flash_attn=flash_attn, k_quantized=k_quantized, v_quantized=v_quantized,
                         n_outputs=n_outputs, n_rs_seq=n_rs_seq)
    trunk = devs[: layout.n_layer]
    cpu_runs_layers = CPU in trunk or not used
    with_slots = [d for d in used if d.name in devs]
    # op offload goes to the first backend in model order that takes it (ggml-backend.cpp:961-981): a local CUDA
    # device; counted on the first one that holds slots (none with -ngl 0, as tuner always sized it)
    first_cuda = next((d.name for d in with_slots if d.cuda and not d.remote), None)
    block_devices = {name for name in trunk if name != CPU}
    out: dict[str, int] = {}
    for d in used:
        span = model.span([il for il, name in enumerate(trunk) if name == d.name])
        offload = largest_cpu_expert if d.name == first_cuda and model.op_offload else 0
        partial_first = cpu_runs_layers and len(block_devices) > 1 and d is with_slots[0]
        c = model.device_bytes(span, devs[layout.n_layer_all] == d.name, d, op_offload_bytes=offload,
                               pipeline=pipeline, partial_first=partial_first)
        if c:
            out[d.name] = out.get(d.name, 0) + c
    offloadable = first_cuda is not None and model.op_offload
    out[CPU] = model.host_bytes(with_slots[0] if with_slots else None, cpu_runs_layers=cpu_runs_layers,
                                cpu_runs_experts=bool(largest_cpu_expert) and not offloadable, pipeline=pipeline)
    return out


def check_sidecar(layout: ModelLayout, draft: ModelLayout) -> None:
    """A sidecar drafts for ``layout`` only if it is the same model's head: same architecture, widths, vocabulary
    and trunk depth, an MTP block and no trunk blocks (llama.cpp's MTP-only test, qwen35moe.cpp:37-38)."""
    what = f"{draft.source or 'the MTP sidecar'}"
    if not draft.has_mtp or any(t.layer is not None and t.layer < draft.n_layer for t in draft.tensors):
        raise TunerError(f"{what} is not an MTP sidecar: it needs nextn_predict_layers > 0 and only the MTP block")
    mine = (draft.arch, draft.n_embd, draft.n_vocab, draft.n_layer)
    theirs = (layout.arch, layout.n_embd, layout.n_vocab, layout.n_layer)
    if mine != theirs:
        raise TunerError(f"{what} is the MTP head of another model: (arch, n_embd, n_vocab, layers) {mine} vs the "
                         f"model's {theirs}")


def estimate_memory(layout: ModelLayout, flags: ServerFlags, gpu_names: Sequence[str | Device] = (),
                    gpu_split: Sequence[float] | None = None, *, draft: ModelLayout | None = None,
                    vision: Projector | None = None, mmproj_offload: bool = True) -> MemoryEstimate:
    """Bytes per device llama-server allocates for ``layout`` with ``flags`` on the devices ``gpu_names`` (llama.cpp's
    order; names or :class:`Device`), layers split by ``flags.tensor_split`` or else by ``gpu_split`` (llama.cpp's
    default: the devices' free memory; equal shares when None); with ``draft``, the MTP sidecar given with ``-md``
    (used only with ``--spec-type draft-mtp``); with ``vision``, the projector given with ``--mmproj`` (on
    :func:`projector_device`: the first ``--device`` entry, else the first local device, or the CPU when not
    ``mmproj_offload``)."""
    shape = context_shape(layout, flags)
    tk, tv = kv_cache_type(flags.cache_type_k), kv_cache_type(flags.cache_type_v)
    notes: list[str] = []
    if flags.flash_attn == "off" and is_quantized(tv):
        raise TunerError("a quantized V cache requires flash attention: use --flash-attn on (or auto)")
    flash_attn = flags.flash_attn != "off"
    if flash_attn:
        for which, t, head in (("K", tk, layout.head_k), ("V", tv, layout.head_v)):
            if not kv_cache_type_supported(layout, t.name, flash_attn=True):
                raise TunerError(f"{which} cache type {t.name} (blocks of {t.block_size}) does not divide the head "
                                 f"size {head} of this model: pick f16, bf16 or f32 for --cache-type-{which.lower()}")
    mtp = flags.spec_type == SPEC_MTP
    if draft is not None:
        check_sidecar(layout, draft)
    head = draft if mtp and draft is not None else layout  # the model the draft context runs on
    if mtp and not head.has_mtp:
        raise TunerError("--spec-type draft-mtp needs a GGUF with the MTP layer (nextn_predict_layers = 0 here) "
                         "or its MTP sidecar (-md mtp-*.gguf)")
    all_devices = [Device.of(d) for d in gpu_names]
    by_name = {d.name: d for d in all_devices}
    used = model_devices(all_devices, flags)
    if any(d.cuda for d in used) and (tk.name == "iq4_nl" or tv.name == "iq4_nl"):
        notes.append("CUDA flash attention has no iq4_nl kernel: attention would fall back to the CPU")

    devs = slot_devices(layout, flags, all_devices, gpu_split)
    acc: dict[str, dict[str, int]] = {n: {} for n in [*by_name, CPU]}

    def add(dev: str, kind: str, n: int) -> None:
        acc[dev][kind] = acc[dev].get(kind, 0) + n

    # weights
    largest_cpu_expert = 0
    mtp_bytes = 0
    for t, dev in tensor_placement(layout, flags, all_devices, gpu_split):
        nbytes = device_tensor_bytes(t, None if dev == CPU else by_name[dev])
        if dev == CPU and t.is_expert:
            largest_cpu_expert = max(largest_cpu_expert, t.nbytes)
        if t.cls is TensorClass.MTP:
            mtp_bytes += nbytes
        add(dev, "weights", nbytes)
    head_devs = devs
    if mtp and head is draft:  # a second model: every tensor of the sidecar
        used_names = [d.name for d in used]
        head_devs = layer_devices(draft.n_layer_all, None, used_names, gpu_split)
        for t, dev in sidecar_placement(draft, used_names, gpu_split):
            nbytes = t.nbytes
            if dev != CPU and is_quantized(t.ggml_type) and t.shape and t.shape[0] % CUDA_MATRIX_ROW_PADDING:
                nbytes += row_bytes(t.ggml_type, CUDA_MATRIX_ROW_PADDING - t.shape[0] % CUDA_MATRIX_ROW_PADDING)
            mtp_bytes += nbytes
            add(dev, "weights", nbytes)

    # KV cache and recurrent state, with their layers (or on the CPU with --no-kv-offload)
    def ctx_dev(il: int) -> str:
        return CPU if flags.no_kv_offload else devs[il]

    for il, (kv, rs) in context_bytes_by_layer(layout, flags).items():
        add(ctx_dev(il), "kv", kv)
        add(ctx_dev(il), "recurrent", rs)
        if il >= layout.n_layer:
            mtp_bytes += kv
    n_rs_seq = flags.spec_draft_n_max if mtp and layout.arch in RS_ROLLBACK_ARCHS else 0

    # compute buffers
    n_outputs = shape.n_seq * (1 + (flags.spec_draft_n_max if mtp else 0))
    pipeline = (len(used) > 1 and CPU not in devs and flags.split_mode == "layer" and not flags.no_kv_offload
                and not (flags.cpu_moe or flags.n_cpu_moe or flags.override_tensor))
    computes = compute_by_device(layout, shape, devs, used, flash_attn=flash_attn, k_quantized=is_quantized(tk),
                                 v_quantized=is_quantized(tv), n_outputs=n_outputs, n_rs_seq=n_rs_seq,
                                 pipeline=pipeline, largest_cpu_expert=largest_cpu_expert)
    for name, n in computes.items():
        add(name, "compute", n)
    if pipeline:
        notes.append("pipeline parallelism (several devices, no tensor override): llama.cpp keeps 4 copies of "
                     "every graph input, larger compute buffers (llama-context.cpp:430-457)")

    output = layout.n_vocab * 4 * shape.n_seq
    add(CPU, "output", output)

    # MTP draft context (common/speculative.cpp:2446-2570): same n_ctx and slots, one attention layer of KV per MTP
    # block in the draft cache types (--cache-type-k/v-draft, f16 by default, not the main ones), and one compute and
    # one output buffer of its own
    if mtp:
        if head is draft:  # a sidecar: its MTP block's draft KV, on the sidecar's devices
            for il in range(draft.n_layer, draft.n_layer_all):
                kv = shape.n_ctx * draft.kv_bytes_per_cell(DRAFT_CACHE_TYPE, DRAFT_CACHE_TYPE, [il])
                add(CPU if flags.no_kv_offload else head_devs[il], "kv", kv)
                mtp_bytes += kv
        draft_compute = mtp_compute_bytes(head, shape, flash_attn, False, shape.n_seq)
        add(head_devs[head.n_layer], "compute", draft_compute)
        add(CPU, "output", output)
        mtp_bytes += draft_compute + output
        mtp_bytes += layout.recurrent_bytes_per_seq() * max(1, shape.n_seq) * n_rs_seq
        notes.append("MTP drafting: RS keeps draft snapshots; the draft context's compute buffer is approximate")
    if flags.cache_ram_mib < 0:
        notes.append("--cache-ram -1: the prompt cache has no limit, host RAM below leaves it out")

    vision_doc = None
    if vision is not None:
        vdev = projector_device(all_devices, flags, mmproj_offload)
        add(vdev, "vision", vision.total_bytes(flash_attn))
        vision_doc = {**vision.to_dict(flash_attn), "device": vdev}
        growth = vision.growth_bytes(flash_attn)
        if growth:
            notes.append(f"vision: the largest image grows the projector's compute buffer by {growth / MiB:.0f} MiB "
                         f"at run time beyond its warm-up reservation (not in the load log)")

    devices = tuple(
        DeviceMemory(name, v.get("weights", 0), v.get("kv", 0), v.get("recurrent", 0), v.get("compute", 0),
                     v.get("output", 0), v.get("vision", 0))
        for name, v in acc.items()
    )
    # worst case: every slot holds --ctx-checkpoints snapshots of its recurrent state (server-context.cpp:2290-2356)
    checkpoints = shape.n_seq * flags.ctx_checkpoints * layout.recurrent_bytes_per_seq()
    n_gpu = sum(1 for d in devs if d != CPU)
    return MemoryEstimate(
        n_ctx=shape.n_ctx,
        n_ctx_seq=shape.n_ctx_seq,
        n_seq=shape.n_seq,
        kv_unified=shape.unified,
        flash_attn=flash_attn,
        n_batch=shape.n_batch,
        n_ubatch=shape.n_ubatch,
        n_gpu_layers=n_gpu,
        devices=devices,
        checkpoints_bytes=checkpoints,
        prompt_cache_bytes=max(flags.cache_ram_mib, 0) * MiB,
        mtp_bytes=mtp_bytes,
        notes=tuple(notes),
        pipeline_parallel=pipeline,
        vision=vision_doc,
        mtp_draft=(draft.source or "sidecar") if mtp and draft is not None else None,
    )
