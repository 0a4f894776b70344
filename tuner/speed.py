"""Speed prediction: physical terms (bytes over bandwidth, FLOPs over throughput, fixed costs per layer), weighted by
a few coefficients fitted to published llama.cpp measurements.

Token generation (tg, one sequence, batch 1). Every token reads the active weights once —

* the router-selected experts: ``n_expert_used / n_expert`` of each layer's expert tensors (8/256 here);
* everything else of the trunk: attention, Gated DeltaNet, shared expert, router, norms, and the output head;
* one row of ``token_embd`` (a lookup, on the CPU);
* the recurrent state (read and written) and the KV cache up to the current depth (attention layers only) —

and runs a chain of small kernels per layer whatever the model's size (norms, projections, the DeltaNet or
attention core, router, top-k, expert and shared-expert matmuls: src/models/qwen35moe.cpp:178-226,
delta-net-base.cpp); on a GPU each launch and tail costs microseconds even inside a CUDA graph
(ggml-cuda.cu:2555-2585), so a 3B-active MoE on a fast card is bound by them, not by bandwidth. Seconds per token::

    tg = Σ_gpu [ weights_and_state / (B_gpu·GPU_TG_BANDWIDTH_EFFICIENCY) + kv(depth) / (B_gpu·KV_READ_EFFICIENCY)
                 + layers_gpu · GPU_LAYER_SECONDS[generation] ]
       + bytes_cpu / (B_ram·RAM_EFFICIENCY) + layers_cpu · CPU_LAYER_SECONDS

``B`` are the spec-sheet bandwidths (profiles/gpus.yaml, :attr:`Hardware.ram_bandwidth_bytes_s`); ``layers_cpu``
counts trunk layers computed wholly on the CPU, where every graph node ends with a barrier of all threads
(ggml-cpu.c:3129-3158). Experts kept in RAM cost their bytes at RAM bandwidth.

Prompt processing (pp), seconds per prompt token at the current depth, ``ub`` = the ubatch::

    pp = Σ_gpu [ dense_flops / (P_gpu·PP_DENSE_EFFICIENCY) + expert_flops / (P_gpu·PP_EXPERT_EFFICIENCY)
                 + attention_flops(depth) / (P_gpu·PP_ATTENTION_EFFICIENCY)
                 + resident_weights / (B_gpu·PP_WEIGHT_PASS_EFFICIENCY·ub) + layers_gpu · GPU_LAYER_SECONDS / ub ]
       + cpu_experts / (pcie·PCIE_EFFICIENCY·ub)
       + cpu_flops / (cores·CPU_PP_FLOPS_PER_CORE) + cpu_weights / (B_ram·RAM_EFFICIENCY·ub)
         + layers_cpu · CPU_LAYER_SECONDS / ub

``P`` is the dense FP16 tensor throughput (``fp16_tflops`` in profiles/gpus.yaml); the output head is skipped (the
server computes logits for the last prompt token only). Expert tensors kept on the CPU are, for ubatches of 32 tokens
or more, copied to the first GPU once per ubatch and multiplied there (llama.cpp's op offload,
ggml-backend.cpp:965-975, ggml-cuda.cu:5825): the PCIe term. A quantized KV cache on CUDA is converted to f16 for
the flash-attention kernels on every ubatch (fattn.cu:722-754): that traffic joins the weight pass.

With layers on RPC workers (llama.cpp's RPC backend), the network adds seconds per token that no coefficient
scales: the bytes that cross it per generated token (per prompt ubatch, divided by its tokens) over the link's
payload rate, plus one round-trip time for every blocking exchange (:mod:`tuner.network` counts both;
:class:`~tuner.hardware.NetworkLink` is the stated link, 1 Gbit/s and 0.2 ms unless told). It is serial with the
compute: llama.cpp runs the splits of a graph one after another. A worker's device counts as a GPU of its card (a
catalog card, or a generic GPU when RPC does not say), and op offload of experts in RAM goes to the first GPU of
this machine, never to a worker (RPC devices have no ``offload_op``, ggml-rpc.cpp:2262).

The coefficients were fitted (:mod:`tuner.speedfit`) on the mainline records of tests/data/speed-measurements.yaml
and are checked against that fit by tests/test_speedfit.py; each says how many records bear on it. A GPU of a
generation without a fitted per-layer cost takes the slowest fitted one, with a note. Not modelled: prompt
pipelining across several GPUs (llama-context.cpp:430-457), several busy slots at once, speculative decoding.
Nothing here reads files except the GPU catalog (for FLOP/s), once.
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from tuner.devices import CPU, slot_devices, tensor_placement
from tuner.errors import TunerError
from tuner.estimate import OP_OFFLOAD_MIN_BATCH, ServerFlags, context_shape
from tuner.ggml import is_quantized, kv_cache_type
from tuner.hardware import GB, Gpu, Hardware, catalog_entry_for_name, gpu_split, load_gpu_catalog
from tuner.layout import ModelLayout, TensorClass
from tuner.network import NetworkTerm, network_term

PLANNING_DEPTH_TOKENS = 4096
"""Depth (tokens already in the context) at which plans are compared: a typical chat turn. The KV read grows with
depth; for this model it is small (10 of 40 layers have a KV cache)."""

# ------------------------------------------------------------------------------- fitted coefficients
# Fitted, not guessed: tuner.speedfit.fit_coefficients on the mainline records of tests/data/speed-measurements.yaml
# (33 tg and 25 pp values for these 13 numbers), rounded to 4 digits; tests/test_speedfit.py re-fits and holds them
# to the fit. "N records" below: fitted records where the part a coefficient scales is at least 5% of the prediction.

GPU_TG_BANDWIDTH_EFFICIENCY = 1.093
"""Fraction of the spec VRAM bandwidth at which generation streams weights and recurrent state (dimensionless).
Fitted; 32 records. Above 1 because the cards' quants stand in for the unsloth UD files most records ran (Q4_K_M is
unsloth's own mix, about 1.5% smaller than their UD-Q4_K_XL; Q3_K_M llama-quantize's, several percent smaller than
UD-Q3_K_XL): the inefficiency of small kernels is in :data:`GPU_LAYER_SECONDS`, not here."""

KV_READ_EFFICIENCY = 0.5816
"""Fraction of the spec VRAM bandwidth at which flash attention reads the KV cache in generation (dimensionless; few
KV heads per layer leave the decode kernel short of parallelism). Fitted; 14 records (8K-131K tokens deep)."""

GPU_LAYER_SECONDS: Mapping[str, float] = {"ampere": 135.6e-6, "ada": 101.3e-6, "blackwell": 78.06e-6}
"""Fixed seconds per trunk layer per token on a GPU, by generation: the launches and tails of a layer's chain of
small kernels, whatever its weights (also paid once per ubatch in prompt processing). Fitted; ampere 3 records
(RTX 3090, 2 x 3090 Ti), ada 26 (RTX 4090, 4070), blackwell 6 (RTX 5090, 5070 Ti)."""

RAM_EFFICIENCY = 0.5423
"""Fraction of the host RAM bandwidth (:attr:`Hardware.ram_bandwidth_bytes_s`: spec-sheet or measured) at which the
CPU reads weights, state and KV in generation, and its resident weights once per ubatch in prompt processing
(dimensionless). Fitted; 5 records (4 with experts in RAM, 1 CPU only)."""

CPU_LAYER_SECONDS = 938.5e-6
"""Fixed seconds per trunk layer per token computed wholly on the CPU: a barrier of all threads after each of the
layer's graph nodes (ggml-cpu.c:3129-3158). Fitted on 1 record (a CPU-only laptop), which alone sets it."""

PP_DENSE_EFFICIENCY = 0.5408
"""Fraction of dense FP16 tensor throughput that the non-expert matmuls (attention and DeltaNet projections, shared
expert, dense FFN) reach in prompt processing (dimensionless). Fitted; 23 records."""

PP_EXPERT_EFFICIENCY = 0.09639
"""Fraction of dense FP16 tensor throughput that the routed-expert matmuls reach in prompt processing
(dimensionless): with 8 of 256 experts, a 512-token ubatch gives each expert ~16 rows, far below a tensor-core
tile. Fitted; 20 records."""

PP_ATTENTION_EFFICIENCY = 0.1304
"""Fraction of dense FP16 tensor throughput that attention over the context (and the DeltaNet state update) reaches
in prompt processing (dimensionless). Fitted; 18 records."""

PP_WEIGHT_PASS_EFFICIENCY = 0.5311
"""Fraction of the spec VRAM bandwidth at which prompt processing passes over every resident weight once per
ubatch (dimensionless): why a bigger ubatch is faster. Fitted; 23 records, ubatch 512 and 2048 among them."""

PCIE_EFFICIENCY = 0.7371
"""Fraction of the PCIe link's rate at which CPU-resident experts are copied to the GPU once per ubatch
(dimensionless; pageable memory under mmap). Fitted; 2 records (experts in RAM, with a prompt speed)."""

CPU_PP_FLOPS_PER_CORE = 11.77e9
"""FLOP/s per physical core that llama.cpp's CPU matmuls deliver in prompt processing. Fitted on 1 record (a
CPU-only laptop), which alone sets it."""

# ------------------------------------------------------------------------------------------ assumed physics

CPU_PEAK_FLOPS_PER_CORE = 100e9
"""Peak FP32-equivalent FLOP/s of one core for the prompt bound only: 2 FMA units × 8 lanes × 2 FLOP at ~3 GHz
(AVX2), rounded; what llama.cpp delivers is :data:`CPU_PP_FLOPS_PER_CORE`."""

GENERIC_GPU_FP16_FLOPS = 50e12
"""FP16 FLOP/s assumed for a GPU that is not in the catalog: below every catalog card but the RTX 3060 (51), so
prompt-processing predictions for an unknown card err slow."""

PCIE_LANE_BYTES_S = {1: 0.25 * GB, 2: 0.5 * GB, 3: 0.985 * GB, 4: 1.969 * GB, 5: 3.938 * GB, 6: 7.563 * GB}
"""Usable bytes per second of one PCIe lane, per generation, after line encoding."""

DEFAULT_PCIE = (4, 16)
_DELTANET_FLOPS_PER_STATE = 6  # decay, outer-product update and query product over the d_state × d_inner state

GPU_GENERATIONS: tuple[tuple[tuple[int, int], str], ...] = (
    ((10, 0), "blackwell"), ((9, 0), "hopper"), ((8, 9), "ada"), ((8, 0), "ampere"), ((7, 5), "turing"),
    ((7, 0), "volta"), ((6, 0), "pascal"),
)
"""CUDA compute capability from which each generation starts (the first that is not above the card's wins)."""


def gpu_generation(compute_capability: tuple[int, int] | None) -> str | None:
    """``ada`` for 8.9, ``blackwell`` for 10.x and 12.x …; None when unknown or older than Pascal."""
    if compute_capability is None:
        return None
    return next((name for start, name in GPU_GENERATIONS if tuple(compute_capability) >= start), None)


@dataclass(frozen=True)
class Prediction:
    """Predicted speed of one plan, one sequence: generation and prompt processing, in tokens per second."""

    tg_tok_s: float
    pp_tok_s: float
    tg_bound_tok_s: float
    pp_bound_tok_s: float
    efficiency: float  # tg_tok_s / tg_bound_tok_s
    source: str  # "roofline" (this module's fitted model) | "measured"
    notes: tuple[str, ...] = ()
    network: NetworkTerm | None = None  # the network's share, with layers on RPC workers

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {
            "tg_tok_s": round(self.tg_tok_s, 1), "pp_tok_s": round(self.pp_tok_s, 1),
            "tg_bound_tok_s": round(self.tg_bound_tok_s, 1), "pp_bound_tok_s": round(self.pp_bound_tok_s, 1),
            "efficiency": round(self.efficiency, 3), "source": self.source, "notes": list(self.notes)}
        if self.network is not None:
            out["network"] = self.network.to_dict()
        return out


@dataclass(frozen=True)
class Roofline:
    """The physical quantities behind a prediction, per device name (``CUDA0`` …, ``CPU``)."""

    tg_bytes: dict[str, int]  # bytes read (and the recurrent state written) per generated token, KV included
    tg_kv_bytes: dict[str, int]  # of which the KV cache up to the depth
    pp_flops: dict[str, float]  # FLOPs per prompt token, where they run
    pp_expert_flops: dict[str, float]  # of which routed experts
    pp_attention_flops: dict[str, float]  # of which attention over the context and the DeltaNet state update
    pp_weight_bytes: dict[str, int]  # weights each device reads once per ubatch in prompt processing
    pp_offload_bytes: int  # CPU-resident expert bytes copied to the first GPU once per ubatch
    pp_kv_convert_bytes: dict[str, int]  # f16 conversion traffic of a quantized KV cache, per ubatch
    layers: dict[str, int]  # trunk layers computed on each device
    n_ubatch: int


@dataclass(frozen=True)
class SpeedTerms:
    """A plan's costs at 100% of the hardware's spec rates, one per fitted coefficient (what :mod:`tuner.speedfit`
    fits on). ``*_s``: seconds per generated (``tg_``) or prompt (``pp_``) token."""

    tg_gpu_weights_s: float  # active weights and recurrent state over VRAM bandwidth
    tg_gpu_kv_s: float  # KV cache up to the depth over VRAM bandwidth
    gpu_layers: Mapping[str, int]  # trunk layers on GPUs, by generation name ("?" when unknown)
    tg_cpu_bytes_s: float  # everything read on the CPU over RAM bandwidth
    cpu_layers: int  # trunk layers computed wholly on the CPU
    pp_dense_s: float  # non-expert matmul FLOPs over FP16 throughput
    pp_expert_s: float  # routed-expert FLOPs over FP16 throughput (op-offloaded ones on the first GPU)
    pp_attention_s: float  # attention over the context and DeltaNet state FLOPs over FP16 throughput
    pp_weight_pass_s: float  # resident GPU weights and f16 KV conversion, per ubatch, over VRAM bandwidth, per token
    pp_pcie_s: float  # CPU experts copied per ubatch over the PCIe link, per token
    pp_cpu_core_flops: float  # FLOPs the CPU computes per token, per physical core
    pp_cpu_pass_s: float  # CPU-resident weights per ubatch over RAM bandwidth, per token
    n_ubatch: int
    tg_bound_s: float  # bytes over spec bandwidths: the upper bound
    pp_bound_s: float  # each device's FLOPs at peak or its weight pass, whichever is slower, plus PCIe
    notes: tuple[str, ...] = ()
    network: NetworkTerm | None = None  # RPC workers: the network's seconds (not fitted; in the bounds too)


# ---------------------------------------------------------------------------------------------- roofline


def roofline(layout: ModelLayout, flags: ServerFlags, gpu_names: Sequence[str] = (),
             gpu_split: Sequence[float] | None = None, *, depth_tokens: int = PLANNING_DEPTH_TOKENS,
             remote: Collection[str] = ()) -> Roofline:
    """Bytes per generated token and FLOPs per prompt token, by device, at ``depth_tokens`` of context. ``remote``:
    the devices among ``gpu_names`` that are behind RPC (op offload never goes to them)."""
    shape = context_shape(layout, flags)
    depth = max(0, min(depth_tokens, shape.n_ctx_seq))
    devs = slot_devices(layout, flags, gpu_names, gpu_split)  # -ts, -sm none, --device as llama.cpp
    # op offload: the first device in llama.cpp's order that holds layers (--device may reorder them), never a worker
    first_gpu = next((d for d in devs if d != CPU and d not in remote),
                     next((name for name in gpu_names if name not in remote), CPU))
    op_offload = first_gpu != CPU and shape.n_ubatch >= OP_OFFLOAD_MIN_BATCH
    active = layout.n_expert_used / layout.n_expert if layout.n_expert else 1.0

    tg: dict[str, float] = {}
    tg_kv: dict[str, float] = {}
    flops: dict[str, float] = {}
    expert_flops: dict[str, float] = {}
    attention_flops: dict[str, float] = {}
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
        where = first_gpu if dev == CPU and t.is_expert and op_offload else dev
        if where != dev:  # copied to the GPU once per ubatch, multiplied there
            offload += t.nbytes
        else:
            add(weights, dev, t.nbytes)
        add(flops, where, f)
        if t.is_expert:
            add(expert_flops, where, f)

    def ctx_dev(il: int) -> str:
        return CPU if flags.no_kv_offload else devs[il]

    tk, tv = kv_cache_type(flags.cache_type_k), kv_cache_type(flags.cache_type_v)
    quantized_kv = is_quantized(tk) or is_quantized(tv)
    convert: dict[str, float] = {}
    for il in layout.attention_layers:
        cell = layout.kv_bytes_per_cell(tk.name, tv.name, [il])
        add(tg, ctx_dev(il), depth * cell)
        add(tg_kv, ctx_dev(il), depth * cell)
        heads = layout.n_head[il]
        f = 2.0 * heads * (layout.head_k + layout.head_v) * depth
        add(flops, devs[il], f)
        add(attention_flops, devs[il], f)
        if quantized_kv and ctx_dev(il) != CPU:  # read the quantized view, write its f16 copy
            f16_cell = layout.kv_bytes_per_cell("f16", "f16", [il])
            add(convert, ctx_dev(il), depth * (cell + f16_cell))
    per_layer_rs = layout.recurrent_bytes_per_seq([0])
    for il in layout.recurrent_layers:
        add(tg, ctx_dev(il), 2 * per_layer_rs)  # read and write the whole state every token
        f = float(_DELTANET_FLOPS_PER_STATE * layout.n_embd_s)
        add(flops, devs[il], f)
        add(attention_flops, devs[il], f)
    layers: dict[str, int] = {}
    for il in range(layout.n_layer):
        layers[devs[il]] = layers.get(devs[il], 0) + 1
    return Roofline(tg_bytes={k: int(v) for k, v in tg.items()}, tg_kv_bytes={k: int(v) for k, v in tg_kv.items()},
                    pp_flops=flops, pp_expert_flops=expert_flops, pp_attention_flops=attention_flops,
                    pp_weight_bytes={k: int(v) for k, v in weights.items()}, pp_offload_bytes=offload,
                    pp_kv_convert_bytes={k: int(v) for k, v in convert.items()}, layers=layers,
                    n_ubatch=shape.n_ubatch)


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


def gpu_layer_seconds(generation: str) -> tuple[float, str | None]:
    """:data:`GPU_LAYER_SECONDS` of a generation, or the slowest fitted one and a note when it has none."""
    if generation in GPU_LAYER_SECONDS:
        return GPU_LAYER_SECONDS[generation], None
    slowest = max(GPU_LAYER_SECONDS, key=lambda g: GPU_LAYER_SECONDS[g])
    what = f"{generation} GPUs" if generation != "?" else "a GPU of unknown compute capability"
    return GPU_LAYER_SECONDS[slowest], (f"no fitted per-layer cost for {what}: generation speed assumes "
                                        f"{slowest}'s ({GPU_LAYER_SECONDS[slowest] * 1e6:.0f} µs per layer)")


# ------------------------------------------------------------------------------------------- prediction


def speed_terms(layout: ModelLayout, flags: ServerFlags, hardware: Hardware, *,
                gpu_split: Sequence[float] | None = None,
                depth_tokens: int = PLANNING_DEPTH_TOKENS) -> SpeedTerms:
    """The physical terms of ``layout`` with ``flags`` on ``hardware`` (see the module docstring)."""
    gpus = {g.llama_name: g for g in hardware.gpus}
    endpoints = {g.llama_name: g.endpoint for g in hardware.gpus if g.endpoint is not None}
    roof = roofline(layout, flags, tuple(gpus), gpu_split, depth_tokens=depth_tokens, remote=endpoints)
    notes: list[str] = []
    ram_bw = float(hardware.ram_bandwidth_bytes_s)
    ub = max(roof.n_ubatch, 1)
    cores = max(hardware.cpu_physical_cores, 1)

    tg_gpu_weights = tg_gpu_kv = tg_cpu = 0.0
    for dev, n_bytes in roof.tg_bytes.items():
        kv = roof.tg_kv_bytes.get(dev, 0)
        if dev == CPU:
            tg_cpu += n_bytes / ram_bw
        else:
            bw = gpus[dev].mem_bandwidth_bytes_s
            tg_gpu_weights += (n_bytes - kv) / bw
            tg_gpu_kv += kv / bw

    gpu_layers: dict[str, int] = {}
    for dev, n in roof.layers.items():
        if dev != CPU:
            gen = gpu_generation(gpus[dev].compute_capability) or "?"
            gpu_layers[gen] = gpu_layers.get(gen, 0) + n

    dense = expert = attention = weight_pass = cpu_flops = cpu_pass = pp_bound = 0.0
    for dev, f in roof.pp_flops.items():
        f_expert = roof.pp_expert_flops.get(dev, 0.0)
        f_attention = roof.pp_attention_flops.get(dev, 0.0)
        if dev == CPU:
            cpu_flops += f / cores
            cpu_pass += roof.pp_weight_bytes.get(dev, 0) / ram_bw / ub
            continue
        gpu = gpus[dev]
        peak, note = gpu_fp16_flops(gpu)
        if note and note not in notes:
            notes.append(note)
        dense += (f - f_expert - f_attention) / peak
        expert += f_expert / peak
        attention += f_attention / peak
        passed = (roof.pp_weight_bytes.get(dev, 0) + roof.pp_kv_convert_bytes.get(dev, 0)) / gpu.mem_bandwidth_bytes_s
        weight_pass += passed / ub
        pp_bound += max(f / peak, passed / ub)
    if CPU in roof.pp_flops:
        # the CPU's bound: its cores at their peak FLOP rate, or its weight pass at full RAM bandwidth
        pp_bound += max(roof.pp_flops[CPU] / cores / CPU_PEAK_FLOPS_PER_CORE,
                        roof.pp_weight_bytes.get(CPU, 0) / ram_bw / ub)
    pcie = 0.0
    local = [g for g in hardware.gpus if g.endpoint is None]
    if roof.pp_offload_bytes and local:
        pcie = roof.pp_offload_bytes / pcie_bytes_s(local[0]) / ub
        pp_bound += pcie
    link = hardware.network
    shape = context_shape(layout, flags)
    net = network_term(layout, flags, tuple(gpus), gpu_split, endpoints, depth_tokens=depth_tokens,
                       n_ctx_kv=shape.n_kv_mask, n_ubatch=ub, payload_bytes_s=link.payload_bytes_s,
                       rtt_s=link.rtt_s, link=link.to_dict())
    net_tg, net_pp = (net.tg_s, net.pp_s) if net is not None else (0.0, 0.0)
    return SpeedTerms(
        tg_gpu_weights_s=tg_gpu_weights, tg_gpu_kv_s=tg_gpu_kv, gpu_layers=gpu_layers, tg_cpu_bytes_s=tg_cpu,
        cpu_layers=roof.layers.get(CPU, 0), pp_dense_s=dense, pp_expert_s=expert, pp_attention_s=attention,
        pp_weight_pass_s=weight_pass, pp_pcie_s=pcie, pp_cpu_core_flops=cpu_flops, pp_cpu_pass_s=cpu_pass,
        n_ubatch=ub, tg_bound_s=tg_gpu_weights + tg_gpu_kv + tg_cpu + net_tg, pp_bound_s=pp_bound + net_pp,
        notes=tuple(notes), network=net)


def _layer_parts(terms: SpeedTerms, per: float = 1.0) -> tuple[dict[str, float], tuple[str, ...]]:
    """Fixed seconds of one pass through the layers, divided by ``per``, by coefficient name."""
    parts: dict[str, float] = {}
    notes = []
    for gen, n in terms.gpu_layers.items():
        seconds, note = gpu_layer_seconds(gen)
        parts[f"GPU_LAYER_SECONDS.{gen}"] = n * seconds / per
        if note:
            notes.append(note)
    if terms.cpu_layers:
        parts["CPU_LAYER_SECONDS"] = terms.cpu_layers * CPU_LAYER_SECONDS / per
    return parts, tuple(notes)


NETWORK_PART = "NETWORK"
"""The name of the network's part in :func:`tg_parts` and :func:`pp_parts`: assumed physics, no coefficient."""


def _network_part(seconds: float) -> dict[str, float]:
    return {NETWORK_PART: seconds} if seconds else {}


def tg_parts(terms: SpeedTerms) -> dict[str, float]:
    """Predicted seconds per generated token, by the coefficient that scales each part (the module docstring's tg
    equation: their sum is the prediction), and :data:`NETWORK_PART` with RPC workers."""
    return {"GPU_TG_BANDWIDTH_EFFICIENCY": terms.tg_gpu_weights_s / GPU_TG_BANDWIDTH_EFFICIENCY,
            "KV_READ_EFFICIENCY": terms.tg_gpu_kv_s / KV_READ_EFFICIENCY,
            "RAM_EFFICIENCY": terms.tg_cpu_bytes_s / RAM_EFFICIENCY,
            **_layer_parts(terms)[0],
            **_network_part(terms.network.tg_s if terms.network else 0.0)}


def pp_parts(terms: SpeedTerms) -> dict[str, float]:
    """Predicted seconds per prompt token, by the coefficient that scales each part (the module docstring's pp
    equation: their sum is the prediction)."""
    return {"PP_DENSE_EFFICIENCY": terms.pp_dense_s / PP_DENSE_EFFICIENCY,
            "PP_EXPERT_EFFICIENCY": terms.pp_expert_s / PP_EXPERT_EFFICIENCY,
            "PP_ATTENTION_EFFICIENCY": terms.pp_attention_s / PP_ATTENTION_EFFICIENCY,
            "PP_WEIGHT_PASS_EFFICIENCY": terms.pp_weight_pass_s / PP_WEIGHT_PASS_EFFICIENCY,
            "PCIE_EFFICIENCY": terms.pp_pcie_s / PCIE_EFFICIENCY,
            "CPU_PP_FLOPS_PER_CORE": terms.pp_cpu_core_flops / CPU_PP_FLOPS_PER_CORE,
            "RAM_EFFICIENCY": terms.pp_cpu_pass_s / RAM_EFFICIENCY,
            **_layer_parts(terms, terms.n_ubatch)[0],
            **_network_part(terms.network.pp_s if terms.network else 0.0)}


def predict_speed(layout: ModelLayout, flags: ServerFlags, hardware: Hardware, *,
                  gpu_split: Sequence[float] | None = None,
                  depth_tokens: int = PLANNING_DEPTH_TOKENS) -> Prediction:
    """tg and pp tok/s of one sequence for ``layout`` with ``flags`` on ``hardware`` at ``depth_tokens`` of context
    (see the module docstring)."""
    terms = speed_terms(layout, flags, hardware, gpu_split=gpu_split, depth_tokens=depth_tokens)
    notes = [*terms.notes, *_layer_parts(terms)[1]]
    if flags.spec_type:
        notes.append("speculative decoding (MTP) is not modelled: the prediction is for plain decoding")
    if flags.n_seq > 1:
        notes.append(f"per sequence with one busy slot; {flags.n_seq} busy slots share the bandwidth")
    tg_s, pp_s = sum(tg_parts(terms).values()), sum(pp_parts(terms).values())
    tg_bound = 1.0 / terms.tg_bound_s if terms.tg_bound_s else 0.0
    tg = 1.0 / tg_s if tg_s else 0.0
    return Prediction(
        tg_tok_s=tg,
        pp_tok_s=1.0 / pp_s if pp_s else 0.0,
        tg_bound_tok_s=tg_bound,
        pp_bound_tok_s=1.0 / terms.pp_bound_s if terms.pp_bound_s else 0.0,
        efficiency=tg / tg_bound if tg_bound else 0.0,
        source="roofline",
        notes=tuple(notes),
        network=terms.network,
    )


def predict_on(layout: ModelLayout, flags: ServerFlags, hardware: Hardware, *,
               depth_tokens: int = PLANNING_DEPTH_TOKENS) -> Prediction:
    """:func:`predict_speed` with the layers split over ``hardware``'s GPUs as llama.cpp splits them."""
    return predict_speed(layout, flags, hardware, gpu_split=gpu_split(hardware), depth_tokens=depth_tokens)
