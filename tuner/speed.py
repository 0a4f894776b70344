"""Speed prediction: a roofline from first principles, turned into tok/s by a few stated efficiencies.

Token generation (tg, one sequence, batch 1) is memory bound: every token reads the active weights once —

* the router-selected experts: ``n_expert_used / n_expert`` of each layer's expert tensors (8/256 here);
* everything else of the trunk: attention, Gated DeltaNet, shared expert, router, norms, and the output head;
* one row of ``token_embd`` (a lookup, on the CPU);
* the KV cache up to the current depth (attention layers only) and the recurrent state, read and written;

bytes on each GPU / its memory bandwidth + bytes on the CPU / RAM bandwidth = seconds per token; its inverse is the
upper bound ``tg_bound_tok_s``. Measured llama.cpp falls far short of that bound on a GPU (a 3B-active MoE runs ~40
layers × a dozen small kernels per token; launch latency, not bandwidth, dominates), so GPU time is divided by
:data:`GPU_TG_EFFICIENCY`, calibrated on one card (RTX 3090), and CPU time by :data:`CPU_TG_EFFICIENCY`.

Prompt processing (pp) is compute bound: ``2 × active params`` FLOPs per token (the output head is skipped: the
server computes logits for the last prompt token only) plus attention at the current depth, over the GPU's dense
FP16 tensor throughput (``fp16_tflops`` in profiles/gpus.yaml), but never faster than reading every resident weight
once per ubatch. Expert tensors kept on the CPU are, for ubatches of 32 tokens or more, copied to the GPU once per
ubatch and multiplied there (llama.cpp's op offload, ggml-backend.cpp:961-981): PCIe bandwidth per ubatch bounds
that. Without a GPU the CPU's FLOPs bound it. A quantized KV cache on CUDA is converted to f16 for the flash-attention
MMA kernel on every ubatch (fattn.cu:722-756): that traffic is counted against GPU bandwidth.

Everything is pure arithmetic on a layout, a flag set and the hardware; nothing here reads files except the GPU
catalog (for FLOP/s), once.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

from tuner.errors import TunerError
from tuner.estimate import (
    CPU,
    OP_OFFLOAD_MIN_BATCH,
    ServerFlags,
    context_shape,
    layer_devices,
    tensor_placement,
)
from tuner.ggml import is_quantized, kv_cache_type
from tuner.hardware import GB, Gpu, Hardware, catalog_entry_for_name, load_gpu_catalog
from tuner.layout import ModelLayout, TensorClass

PLANNING_DEPTH_TOKENS = 4096
"""Depth (tokens already in the context) at which plans are compared: a typical chat turn. The KV read grows with
depth; for this model it is small (10 of 40 layers have a KV cache)."""

GPU_TG_CALIBRATION_TOK_S = 106.0
"""RTX 3090, Qwen3.5-35B-A3B Q4_K_M, everything on the GPU, q8_0 KV: 100-112 tok/s reported (qwen35-family.md,
"Community practice"); the middle of that range. The one number the tg prediction is calibrated on."""

GPU_TG_EFFICIENCY = 0.244
"""Predicted / bound on a GPU. Derived, not guessed: the roofline bound of the calibration configuration above —
the qwen3.5-35b-a3b card's Q4_K_M on the catalog RTX 3090 at :data:`PLANNING_DEPTH_TOKENS` — is 435 tok/s, and
106 / 435 = 0.244 (:func:`calibrated_gpu_tg_efficiency` recomputes it)."""

CPU_TG_EFFICIENCY = 0.7
"""Predicted / bound for weights read from RAM. An assumption, not calibrated: llama.cpp's CPU matrix-vector
kernels reach roughly 60-80% of the RAM bandwidth, and :attr:`Hardware.ram_bandwidth_bytes_s` is already a
delivered (not peak) figure unless measured."""

GPU_PP_EFFICIENCY = 0.12
"""Fraction of dense FP16 tensor throughput prompt processing of a small-expert MoE reaches. An assumption, not
calibrated: grouped expert matmuls with ~16 tokens per expert per ubatch keep tensor cores far from their peak."""

PCIE_EFFICIENCY = 0.5
"""Fraction of the PCIe link the per-ubatch copies of CPU-resident expert weights reach. An assumption: with mmap
(llama-server's default) those weights sit in pageable memory, which copies at roughly half the pinned rate."""

CPU_FLOPS_PER_CORE = 100e9
"""Peak FP32-equivalent FLOP/s of one core: 2 FMA units × 8 lanes × 2 FLOP at ~3 GHz (AVX2), rounded."""

CPU_PP_EFFICIENCY = 0.5
"""Fraction of that peak llama.cpp's quantized CPU matmuls reach in prompt processing. An assumption."""

GENERIC_GPU_FP16_FLOPS = 50e12
"""FP16 FLOP/s assumed for a GPU that is not in the catalog: below every catalog card but the RTX 3060 (51), so
prompt-processing predictions for an unknown card err slow."""

PCIE_LANE_BYTES_S = {1: 0.25 * GB, 2: 0.5 * GB, 3: 0.985 * GB, 4: 1.969 * GB, 5: 3.938 * GB, 6: 7.563 * GB}
"""Usable bytes per second of one PCIe lane, per generation, after line encoding."""

DEFAULT_PCIE = (4, 16)
_DELTANET_FLOPS_PER_STATE = 6  # decay, outer-product update and query product over the d_state × d_inner state


@dataclass(frozen=True)
class Prediction:
    """Predicted speed of one plan, one sequence: generation and prompt processing, in tokens per second."""

    tg_tok_s: float
    pp_tok_s: float
    tg_bound_tok_s: float
    pp_bound_tok_s: float
    efficiency: float  # tg_tok_s / tg_bound_tok_s
    source: str  # "roofline" | "measured"
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, object]:
        return {"tg_tok_s": round(self.tg_tok_s, 1), "pp_tok_s": round(self.pp_tok_s, 1),
                "tg_bound_tok_s": round(self.tg_bound_tok_s, 1), "pp_bound_tok_s": round(self.pp_bound_tok_s, 1),
                "efficiency": round(self.efficiency, 3), "source": self.source, "notes": list(self.notes)}


@dataclass(frozen=True)
class Roofline:
    """The physical quantities behind a prediction, per device name (``CUDA0`` …, ``CPU``)."""

    tg_bytes: dict[str, int]  # bytes read (and the recurrent state written) per generated token
    pp_flops: dict[str, float]  # FLOPs per prompt token, where they run
    pp_weight_bytes: dict[str, int]  # weights each device reads once per ubatch in prompt processing
    pp_offload_bytes: int  # CPU-resident expert bytes copied to the first GPU once per ubatch
    pp_kv_convert_bytes: dict[str, int]  # f16 conversion traffic of a quantized KV cache, per ubatch
    n_ubatch: int


# ---------------------------------------------------------------------------------------------- roofline


def roofline(layout: ModelLayout, flags: ServerFlags, gpu_names: Sequence[str] = (),
             gpu_split: Sequence[float] | None = None, *, depth_tokens: int = PLANNING_DEPTH_TOKENS) -> Roofline:
    """Bytes per generated token and FLOPs per prompt token, by device, at ``depth_tokens`` of context."""
    shape = context_shape(layout, flags)
    depth = max(0, min(depth_tokens, shape.n_ctx_seq))
    devs = layer_devices(layout.n_layer_all, flags.n_gpu_layers, gpu_names, gpu_split)
    op_offload = bool(gpu_names) and shape.n_ubatch >= OP_OFFLOAD_MIN_BATCH
    first_gpu = gpu_names[0] if gpu_names else CPU
    active = layout.n_expert_used / layout.n_expert if layout.n_expert else 1.0

    tg: dict[str, float] = {}
    flops: dict[str, float] = {}
    weights: dict[str, float] = {}
    offload = 0

    def add(acc: dict[str, float], dev: str, n: float) -> None:
        acc[dev] = acc.get(dev, 0) + n

    for t, dev in tensor_placement(layout, flags, gpu_names, gpu_split):
        if t.cls is TensorClass.TOKEN_EMBD and dev == CPU:  # input lookup: one row per token
            add(tg, dev, t.nbytes // max(layout.n_vocab, 1))
            continue
        is_head = t.layer is None and t.cls in (TensorClass.OUTPUT, TensorClass.TOKEN_EMBD)
        add(tg, dev, round(t.nbytes * active) if t.is_expert else t.nbytes)
        if is_head or len(t.shape) < 2:  # logits only for the last prompt token; 1-D tensors cost nothing
            continue
        f = 2.0 * t.n_elements * (active if t.is_expert else 1.0)
        if dev == CPU and t.is_expert and op_offload:  # copied to the GPU once per ubatch, multiplied there
            offload += t.nbytes
            add(flops, first_gpu, f)
        else:
            add(flops, dev, f)
            add(weights, dev, t.nbytes)

    def ctx_dev(il: int) -> str:
        return CPU if flags.no_kv_offload else devs[il]

    tk, tv = kv_cache_type(flags.cache_type_k), kv_cache_type(flags.cache_type_v)
    quantized_kv = is_quantized(tk) or is_quantized(tv)
    convert: dict[str, float] = {}
    for il in layout.attention_layers:
        cell = layout.kv_bytes_per_cell(tk.name, tv.name, [il])
        add(tg, ctx_dev(il), depth * cell)
        heads = layout.n_head[il]
        add(flops, devs[il], 2.0 * heads * (layout.head_k + layout.head_v) * depth)
        if quantized_kv and ctx_dev(il) != CPU:  # read the quantized view, write its f16 copy
            f16_cell = layout.kv_bytes_per_cell("f16", "f16", [il])
            add(convert, ctx_dev(il), depth * (cell + f16_cell))
    per_layer_rs = layout.recurrent_bytes_per_seq([0])
    for il in layout.recurrent_layers:
        add(tg, ctx_dev(il), 2 * per_layer_rs)  # read and write the whole state every token
        add(flops, devs[il], float(_DELTANET_FLOPS_PER_STATE * layout.n_embd_s))
    return Roofline(tg_bytes={k: int(v) for k, v in tg.items()}, pp_flops=flops,
                    pp_weight_bytes={k: int(v) for k, v in weights.items()}, pp_offload_bytes=offload,
                    pp_kv_convert_bytes={k: int(v) for k, v in convert.items()}, n_ubatch=shape.n_ubatch)


# ------------------------------------------------------------------------------------------ device speeds


@functools.cache
def _catalog_tflops(gpu_name: str) -> float | None:
    """``fp16_tflops`` of the catalog card NVML (or ``--gpu``) names ``gpu_name``, if the catalog knows it."""
    try:
        entry = catalog_entry_for_name(gpu_name, load_gpu_catalog())
    except TunerError:
        return None
    return entry.fp16_tflops if entry else None


def gpu_fp16_flops(gpu: Gpu) -> tuple[float, str | None]:
    """Dense FP16 FLOP/s of ``gpu`` from the catalog, or a generic figure and a note saying so."""
    tflops = _catalog_tflops(gpu.name)
    if tflops:
        return tflops * 1e12, None
    return GENERIC_GPU_FP16_FLOPS, (f"{gpu.name}: no FP16 throughput in the catalog; prompt speed assumes "
                                    f"{GENERIC_GPU_FP16_FLOPS / 1e12:g} TFLOP/s")


def pcie_bytes_s(gpu: Gpu) -> float:
    gen = gpu.pcie_gen or DEFAULT_PCIE[0]
    width = gpu.pcie_width or DEFAULT_PCIE[1]
    return PCIE_LANE_BYTES_S.get(gen, PCIE_LANE_BYTES_S[max(PCIE_LANE_BYTES_S)]) * width


def cpu_flops(hardware: Hardware) -> float:
    return max(hardware.cpu_physical_cores, 1) * CPU_FLOPS_PER_CORE


# ------------------------------------------------------------------------------------------- prediction


def predict_speed(layout: ModelLayout, flags: ServerFlags, hardware: Hardware, *,
                  gpu_split: Sequence[float] | None = None,
                  depth_tokens: int = PLANNING_DEPTH_TOKENS) -> Prediction:
    """tg and pp tok/s of one sequence for ``layout`` with ``flags`` on ``hardware`` (see the module docstring)."""
    gpus = {g.llama_name: g for g in hardware.gpus}
    roof = roofline(layout, flags, tuple(gpus), gpu_split, depth_tokens=depth_tokens)
    notes: list[str] = []
    ram_bw = float(hardware.ram_bandwidth_bytes_s)

    tg_bound_s = tg_pred_s = 0.0
    for dev, n_bytes in roof.tg_bytes.items():
        if dev == CPU:
            t = n_bytes / ram_bw
            tg_bound_s, tg_pred_s = tg_bound_s + t, tg_pred_s + t / CPU_TG_EFFICIENCY
        else:
            t = n_bytes / gpus[dev].mem_bandwidth_bytes_s
            tg_bound_s, tg_pred_s = tg_bound_s + t, tg_pred_s + t / GPU_TG_EFFICIENCY

    pp_bound_s = pp_pred_s = 0.0  # per prompt token
    ub = max(roof.n_ubatch, 1)
    for dev, f in roof.pp_flops.items():
        if dev == CPU:
            t_compute = f / cpu_flops(hardware)
            t_memory = roof.pp_weight_bytes.get(dev, 0) / ram_bw / ub
            pp_bound_s += max(t_compute, t_memory)
            pp_pred_s += max(t_compute / CPU_PP_EFFICIENCY, t_memory / CPU_TG_EFFICIENCY)
            continue
        gpu = gpus[dev]
        peak, note = gpu_fp16_flops(gpu)
        if note and note not in notes:
            notes.append(note)
        t_compute = f / peak
        t_memory = (roof.pp_weight_bytes.get(dev, 0) + roof.pp_kv_convert_bytes.get(dev, 0)) \
            / gpu.mem_bandwidth_bytes_s / ub
        pp_bound_s += max(t_compute, t_memory)
        pp_pred_s += max(t_compute / GPU_PP_EFFICIENCY, t_memory / GPU_TG_EFFICIENCY)
    if roof.pp_offload_bytes and hardware.gpus:
        t = roof.pp_offload_bytes / pcie_bytes_s(hardware.gpus[0]) / ub
        pp_bound_s += t
        pp_pred_s += t / PCIE_EFFICIENCY
    if flags.spec_type:
        notes.append("speculative decoding (MTP) is not modelled: the prediction is for plain decoding")
    if flags.n_seq > 1:
        notes.append(f"per sequence with one busy slot; {flags.n_seq} busy slots share the bandwidth")

    tg_bound = 1.0 / tg_bound_s if tg_bound_s else 0.0
    tg = 1.0 / tg_pred_s if tg_pred_s else 0.0
    return Prediction(
        tg_tok_s=tg,
        pp_tok_s=1.0 / pp_pred_s if pp_pred_s else 0.0,
        tg_bound_tok_s=tg_bound,
        pp_bound_tok_s=1.0 / pp_bound_s if pp_bound_s else 0.0,
        efficiency=tg / tg_bound if tg_bound else 0.0,
        source="roofline",
        notes=tuple(notes),
    )


def calibrated_gpu_tg_efficiency(layout: ModelLayout, hardware: Hardware,
                                 measured_tg_tok_s: float = GPU_TG_CALIBRATION_TOK_S) -> float:
    """The GPU efficiency that makes the full-offload, q8_0-KV bound of ``layout`` on ``hardware`` come out at
    ``measured_tg_tok_s`` (how :data:`GPU_TG_EFFICIENCY` was derived, for a GPU-only plan)."""
    flags = ServerFlags(ctx_size=32768, parallel=1, cache_type_k="q8_0", cache_type_v="q8_0", flash_attn="on")
    bound = predict_speed(layout, flags, hardware).tg_bound_tok_s
    return measured_tg_tok_s / bound
