"""The planner: which quant, KV cache type, ``--n-cpu-moe``, context, ubatch and slots to run on this hardware.

What it searches, per quant candidate × KV cache type (f16 and q8_0; q4_0 only when nothing else reaches the
context; or the one type asked for):

1. **placement** — the smallest ``--n-cpu-moe`` (expert tensors of the first N layers in RAM) that fits the GPU at the
   context floor, by binary search (GPU memory falls monotonically with N). Only experts are spilled: attention,
   DeltaNet, the shared expert, router, norms, the output head, the KV cache and the recurrent state stay on the GPU.
   Only when even every expert on the CPU does not fit are whole layers left on the CPU (``--n-gpu-layers``).
   With several GPUs, :class:`tuner.placement.Placer` decides instead: the layer split (``--tensor-split``, and
   ``--device`` to put the fastest card last), and which expert tensors each device sends to RAM (``-ot`` rules; the
   fewest), every device keeping its buffer; steps 2-4 then re-place at each context they try.
2. **host RAM** — the estimate's host part (CPU weights, pinned buffers, worst-case context checkpoints and a full
   prompt cache) must fit the available RAM; if it does not, ``--cache-ram`` and then ``--ctx-checkpoints`` are
   lowered before the option is given up.
3. **context** — the largest ``--ctx-size`` (a multiple of 256 per slot) that still fits with that placement, by
   binary search, up to the model's native ``n_ctx_train`` (4 × that with ``allow_yarn``).
4. **ubatch** — 512, except with experts on the CPU: those are copied to the GPU once per ubatch, so a 2048 (or
   1024) ubatch multiplies prompt speed. The chosen plan is placed again at that ubatch (steps 1-3) and takes it
   when generation stays within :data:`SPEED_TOLERANCE` and prompts get :data:`UBATCH_MIN_PP_GAIN` times faster
   (never with ``--prefer context``, which keeps every token of context).
5. **slots** — ``--parallel 1`` unless asked: each slot costs one recurrent state (62.8 MiB for 35B-A3B) in VRAM (in
   RAM without a GPU) and up to ``--ctx-checkpoints`` more in RAM. More slots get separate per-slot caches
   (``--no-kv-unified``), so every slot is guaranteed its context.

The **context floor** a plan must reach: ``Wishes.ctx_size`` when given (exactly that); otherwise
:data:`tuner.policy.CTX_FLOOR` (65536) for ``balanced``, :data:`WORKING_CTX` (32768) for ``speed`` and ``quality``
— then grown to the largest that fits — and the model's maximum for ``context``. ``balanced`` searches every quant
and KV type once per context tier (:func:`tuner.policy.ctx_tiers`: 65536, 131072, 262144), each with the fewest
expert layers in RAM that reach it. When nothing reaches the floor, it drops to :data:`MIN_CTX` (4096) and the
largest context that fits wins; when nothing fits even then, :class:`~tuner.errors.TunerError` says what the
smallest plan needs.

**Scoring** (``Wishes.prefer``), over the options that fit; quant quality is the candidates' own order
(``quality_rank``, then bits per weight), KV quality is f16 > q8_0 > q4_0:

* ``balanced`` (default): :mod:`tuner.policy` — Q4_K_M-class quality and 65536 tokens per slot where they fit, then
  more context, a better quant and an exact KV cache while generation stays within 10% of the fastest plan meeting
  those floors; a floor given up to fit is a warning. Every quant × KV type × tier competes.
* the other policies first take one KV type per quant: the most exact one (f16), unless a more compact one (q8_0)
  predicts more than :data:`SPEED_TOLERANCE` (5%) faster generation, i.e. it saves expert layers in RAM — VRAM goes
  to experts before the cache is quantized; without a GPU, only when context needs it. With ``context``, the type
  that reaches more context, then that rule.
* ``speed``: the fastest predicted generation among quants of at least
  :data:`SPEED_MIN_BITS_PER_WEIGHT` bits per weight (below that only if nothing else fits); plans within
  :data:`SPEED_TOLERANCE` (5%, below the accuracy of the prediction) of the fastest count as equally fast, and among
  those the best quant wins, then the most context. A smaller quant is thus taken only when it is clearly faster
  (on a 16 GB card it keeps more experts on the GPU).
* ``quality``: the best quant among plans at least :data:`QUALITY_MIN_SPEED_FRACTION` (a third) as fast as the
  fastest plan of at least 4 bits per weight; then speed, then context.
* ``context``: the most context; among equal context, the ``speed`` rule.

The VRAM **buffer** kept free on every GPU defaults to :data:`DEFAULT_VRAM_BUFFER_BYTES` (1280 MiB): 768 MiB of
headroom against spilling (a driver that spills VRAM into shared system memory slows generation several-fold) plus
512 MiB for the CUDA context, cuBLAS workspace and memory pools, which the estimate does not include and llama.cpp's
memory breakdown does not count either (its "unaccounted" column is total − free − model − context − compute,
common/fit.cpp:984). llama.cpp's own ``--fit`` keeps a margin of the same size, 1024 MiB per device by default
(``fit_params_target``, common/common.h:482-483). Without a GPU the buffer applies to RAM and defaults to
:data:`DEFAULT_RAM_BUFFER_BYTES`.

**Calibration** (a :class:`tuner.corrections.Calibration`, from ``tuner serve``'s observations and ``tuner
calibrate``): every estimate is :func:`tuner.corrections.corrected_estimate` (compute buffers scaled by what llama.cpp
reported on this device model and build), roofline predictions are rescaled by the measured speed scale, and when
the CUDA context and pools were measured on every GPU here, the default buffer becomes that measurement plus a
margin (:meth:`~tuner.corrections.Calibration.buffer_bytes`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tuner import policy
from tuner.cards import preset_args
from tuner.corrections import Calibration, corrected_estimate, shape_id
from tuner.devices import CPU
from tuner.errors import TunerError
from tuner.estimate import MemoryEstimate, ServerFlags, estimate_memory, kv_cache_type_supported, pad
from tuner.flags import FLAGS, SPEC_MTP
from tuner.ggml import kv_cache_type
from tuner.hardware import Hardware, gpu_split, rpc_endpoints
from tuner.layout import ModelLayout
from tuner.models import ProgressFn, QuantCandidate, read_projector, resolve_candidates
from tuner.mtp import DRAFT_LENGTHS, MTP_ACCEPTANCE, drafting_blocked, mtp_flags, predict_mtp
from tuner.placement import Placer, bisect_fit, cpu_expert_layers, cpu_expert_tensors, devices_of, placement_reason
from tuner.policy import BALANCED
from tuner.speed import Prediction, predict_speed
from tuner.units import GiB, MiB, fmt_bytes

__all__ = [
    "Budget", "Measured", "Plan", "Prediction", "Recommendation", "Wishes", "budget_for", "estimate_on", "fits",
    "gpu_split", "headroom_bytes", "plan_for", "recommend", "threads_for",
]

COMMUNITY_HEADROOM_BYTES = 768 * MiB
CUDA_UNACCOUNTED_BYTES = 512 * MiB
DEFAULT_VRAM_BUFFER_BYTES = COMMUNITY_HEADROOM_BYTES + CUDA_UNACCOUNTED_BYTES
DEFAULT_RAM_BUFFER_BYTES = 1 * GiB
"""CPU only: RAM kept free for the OS and the server process itself."""
VISION_COMPUTE_BYTES = 384 * MiB
"""Kept for reference: the flat allowance the planner once held back for the vision encoder's compute buffer. The
projector's weights and warm-up buffer are now in the estimate (:mod:`tuner.vision`: 248 MiB measured for Qwen3.5's
encoder with flash attention); the budget keeps only what an image grows that buffer by at run time
(:meth:`tuner.vision.Projector.growth_bytes`)."""

MIN_CTX = 4096
"""The smallest context a plan may have (llama.cpp's --fit stops at the same 4096)."""
WORKING_CTX = 32768
"""The context a speed or quality plan must reach before anything else (then grown to the most that fits)."""
CTX_STEP = 256
YARN_FACTOR = 4
KV_TYPES = ("f16", "q8_0")
KV_LAST_RESORT = ("q4_0",)
KV_QUALITY = {"f32": 4, "f16": 3, "bf16": 3, "q8_0": 2, "q5_1": 1, "q5_0": 1, "q4_1": 0, "q4_0": 0, "iq4_nl": 0}
DEFAULT_UBATCH = 512
OFFLOAD_UBATCHES = (2048, 1024)
UBATCH_MIN_PP_GAIN = 1.25
"""A larger ubatch is taken for prompts at least this much faster (for at most :data:`SPEED_TOLERANCE` slower
generation): in long agent turns prompt processing is most of the wait. 512 → 1024 with experts in RAM gives ~1.5×."""
PREFERENCES = (BALANCED, "speed", "quality", "context")
SPEED_TOLERANCE = 0.05
SPEED_MIN_BITS_PER_WEIGHT = 4.0
QUALITY_MIN_SPEED_FRACTION = 1 / 3
MAX_ALTERNATIVES = 4

Measured = Callable[[QuantCandidate, ServerFlags, Hardware], Prediction | None]


# ------------------------------------------------------------------------------------------------ data model


@dataclass(frozen=True)
class Budget:
    """What a plan may use: every GPU's free memory less the buffer, and the available RAM."""

    device: str  # "CUDA0", "CUDA0+CUDA1", or "CPU" when planning for RAM alone
    vram_total_bytes: int
    vram_free_bytes: int
    buffer_bytes: int
    ram_available_bytes: int
    gpu_free_bytes: tuple[tuple[str, int], ...] = ()  # per GPU, llama.cpp's name and its free bytes
    reserved_bytes: int = 0  # what the estimate does not count: the vision encoder's run-time growth, on its device
    reserved_on_host: bool = False  # that growth is in RAM (the projector on the CPU, --no-mmproj-offload)
    gpu_total_bytes: tuple[int, ...] = ()  # per GPU (same order), its total memory
    buffer_source: str = ""  # why buffer_bytes is what it is, when a calibration set it

    @property
    def cpu_only(self) -> bool:
        return not self.gpu_free_bytes

    def reserved_device(self, estimate: MemoryEstimate | None = None) -> str:
        """Where the vision reserve is kept free: the CPU without a GPU or with ``--no-mmproj-offload``; else the
        projector's device in ``estimate`` (:func:`tuner.devices.projector_device`: the first ``--device`` entry,
        else the first local GPU); the first GPU when no estimate says."""
        if self.cpu_only or self.reserved_on_host:
            return CPU
        if estimate is not None and estimate.vision is not None:
            return str(estimate.vision["device"])
        return self.gpu_free_bytes[0][0]

    def device_budgets(self, estimate: MemoryEstimate | None = None, *, reserve: bool = True) -> list[int]:
        """Bytes the estimate may put on each GPU: its free memory less the buffer (and, with ``reserve``, less the
        vision projector's reserve on :meth:`reserved_device`)."""
        return [free - self.buffer_bytes - (self.gpu_reserved_bytes(name, estimate) if reserve else 0)
                for name, free in self.gpu_free_bytes]

    def gpu_reserved_bytes(self, name: str, estimate: MemoryEstimate | None = None) -> int:
        """The vision reserve on GPU ``name``: all of it on :meth:`reserved_device`, none elsewhere."""
        return self.reserved_bytes if name == self.reserved_device(estimate) else 0

    def ram_reserved_bytes(self, estimate: MemoryEstimate | None = None) -> int:
        """What RAM keeps free beyond the estimate: the buffer and the vision reserve without a GPU; the vision
        reserve alone when the projector is on the CPU beside GPUs."""
        if self.cpu_only:
            return self.buffer_bytes + self.reserved_bytes
        return self.reserved_bytes if self.reserved_device(estimate) == CPU else 0

    def to_dict(self, estimate: MemoryEstimate | None = None) -> dict[str, Any]:
        totals = self.gpu_total_bytes or tuple(0 for _ in self.gpu_free_bytes)
        return {"device": self.device, "vram_total_bytes": self.vram_total_bytes,
                "vram_free_bytes": self.vram_free_bytes, "buffer_bytes": self.buffer_bytes,
                "ram_available_bytes": self.ram_available_bytes, "reserved_bytes": self.reserved_bytes,
                "reserved_on": self.reserved_device(estimate),
                "buffer_source": self.buffer_source or None,
                "gpus": [{"name": n, "vram_free_bytes": b} for n, b in self.gpu_free_bytes],
                "devices": [{"device": n, "vram_total_bytes": t, "vram_free_bytes": b,
                             "buffer_bytes": self.buffer_bytes}
                            for (n, b), t in zip(self.gpu_free_bytes, totals, strict=True)]}


@dataclass(frozen=True)
class Wishes:
    """What the user asked for; everything else the planner decides."""

    ctx_size: int | None = None  # context per slot; None = the largest that fits
    parallel: int = 1
    prefer: str = BALANCED  # balanced | speed | quality | context
    vision: bool = False
    mmproj_offload: bool = True  # the vision projector on the GPU (False: --no-mmproj-offload, on the CPU)
    buffer_bytes: int | None = None  # None = DEFAULT_VRAM_BUFFER_BYTES (GPU) / DEFAULT_RAM_BUFFER_BYTES (CPU only)
    quant: str | None = None
    allow_yarn: bool = False
    cache_type: str | None = None  # force this KV type for K and V

    def __post_init__(self) -> None:
        if self.prefer not in PREFERENCES:
            raise TunerError(f"--prefer must be one of {', '.join(PREFERENCES)}; got {self.prefer!r}")
        if self.parallel < 1:
            raise TunerError(f"--parallel must be 1 or more for planning, got {self.parallel}")
        if self.ctx_size is not None and self.ctx_size < CTX_STEP:
            raise TunerError(f"--ctx-size must be at least {CTX_STEP}, got {self.ctx_size}")
        if self.buffer_bytes is not None and self.buffer_bytes < 0:
            raise TunerError("--buffer must not be negative")
        if not self.mmproj_offload and not self.vision:
            raise TunerError("--no-mmproj-offload places the vision projector: it needs --vision")
        if self.cache_type is not None:
            kv_cache_type(self.cache_type)


@dataclass(frozen=True)
class Plan:
    candidate: QuantCandidate
    flags: ServerFlags
    estimate: MemoryEstimate
    budget: Budget
    predicted: Prediction
    reasons: tuple[str, ...] = ()
    vision: bool = False
    extra_args: tuple[str, ...] = ()  # beyond ServerFlags: YaRN rope scaling
    mmproj_offload: bool = True  # with vision: the projector on the GPU (False: --no-mmproj-offload)

    @property
    def quant(self) -> str:
        return self.candidate.quant

    @property
    def model_name(self) -> str:
        return self.candidate.card_key or self.candidate.layout.name or self.candidate.layout.source

    @property
    def mtp_blocked(self) -> str | None:
        """Why this plan could not draft with an MTP head, whatever the file (:func:`tuner.mtp.drafting_blocked`)."""
        return drafting_blocked(self.candidate.layout, self.flags, [n for n, _ in self.budget.gpu_free_bytes],
                                vision=self.vision)

    @property
    def uses_sidecar(self) -> bool:
        """Whether the plan drafts with an MTP head kept in its own file (``-md``), not in the model."""
        return self.flags.spec_type == SPEC_MTP and not self.candidate.layout.has_mtp

    def command(self, server_bin: str = "llama-server", model_path: str | None = None,
                mmproj_path: str | None = None, mtp_path: str | None = None, *,
                preset: str | None = None) -> list[str]:
        """The llama-server command line, runnable as printed. The model: ``model_path``, or a local file's absolute
        path, or else ``-hf REPO:QUANT`` for llama-server to fetch from the Hub itself (common/arg.cpp:3060; the
        tag picks the file whose name carries it, with its shards, common/download.cpp:655-690). Then the plan's
        flags, ``--fit off`` because the plan already fits, ``--jinja`` for the model's chat template (tool calls),
        the MTP sidecar it drafts with (``-md``; with ``-hf`` llama-server fetches the repo's ``mtp-*`` sidecar
        itself, common/arg.cpp:366-368, download.cpp:613-617), the vision projector, or else ``--no-mmproj`` (so
        no projector the plan did not count is loaded: ``-hf`` would fetch the repo's, common/arg.cpp:383-401), and
        the card's sampling ``preset`` (default: the card's own), as ``tuner serve`` runs it. A projector planned on
        the CPU adds ``--no-mmproj-offload`` (common/arg.cpp:2601-2606; tools/mtmd/clip.cpp:188 then
        keeps it on the CPU backend)."""
        c = self.candidate
        if model_path:
            model = FLAGS["model"].to_args(str(model_path))
        elif c.source == "local" and c.files:
            model = FLAGS["model"].to_args(str(Path(c.files[0]).expanduser().resolve()))
        elif c.repo:
            model = FLAGS["hf_repo"].to_args(f"{c.repo}:{c.quant}")
        else:
            raise TunerError(f"{self.model_name} {self.quant}: no model file to put on the command line")
        args = [server_bin, *model, *self.flags.to_args(), *self.extra_args,
                *FLAGS["fit"].to_args("off"), *FLAGS["jinja"].to_args(True)]
        on_hub = not model_path and not (c.source == "local" and c.files)
        if self.uses_sidecar:
            sidecar = mtp_path or (None if on_hub else c.mtp_sidecar)
            if sidecar:
                args += FLAGS["spec_draft_model"].to_args(str(sidecar))
            elif not on_hub:
                raise TunerError(f"{self.model_name} {self.quant}: MTP drafting needs the head's file (mtp-*.gguf)")
        if self.vision:
            mmproj = mmproj_path or (None if on_hub else c.mmproj)
            if mmproj:
                args += FLAGS["mmproj"].to_args(str(mmproj))
            elif not on_hub:  # -hf fetches and loads the repo's projector by itself
                raise TunerError(f"{self.model_name} {self.quant}: no vision projector (mmproj) known")
            if not self.mmproj_offload:
                args += FLAGS["mmproj_offload"].to_args(False)
        else:
            args += FLAGS["mmproj_auto"].to_args(False)
        return args + preset_args(c.card_key, c.layout, preset)

    def to_dict(self) -> dict[str, Any]:
        f, c = self.flags, self.candidate
        return {
            "model": self.model_name, "quant": c.quant, "file": c.files[0] if c.files else None,
            "files": list(c.files), "source": c.source, "repo": c.repo, "revision": c.revision,
            "file_bytes": c.file_bytes, "bits_per_weight": round(c.bits_per_weight, 2),
            "cache_type_k": f.cache_type_k, "cache_type_v": f.cache_type_v,
            "n_cpu_moe": f.n_cpu_moe, "n_gpu_layers": "all" if f.n_gpu_layers is None else f.n_gpu_layers,
            "tensor_split": list(f.tensor_split), "override_tensor": list(f.override_tensor),
            "ctx_size": f.ctx_size, "ctx_per_slot": self.estimate.n_ctx_seq, "parallel": f.n_seq,
            "kv_unified": self.estimate.kv_unified, "batch_size": f.batch_size, "ubatch_size": f.ubatch_size,
            "flash_attn": f.flash_attn, "cache_ram_mib": f.cache_ram_mib, "ctx_checkpoints": f.ctx_checkpoints,
            "vision": self.vision, "mmproj": c.mmproj if self.vision else None,
            "mmproj_offload": self.mmproj_offload if self.vision else None,
            "mtp": f.spec_type == SPEC_MTP, "spec_draft_n_max": f.spec_draft_n_max if f.spec_type else None,
            "mtp_sidecar": c.mtp_sidecar if self.uses_sidecar else None,
            "extra_args": list(self.extra_args), "args": f.to_args() + list(self.extra_args),
        }


@dataclass(frozen=True)
class Recommendation:
    plan: Plan
    alternatives: tuple[tuple[Plan, str], ...]  # ranked, each with why it lost
    hardware: Hardware
    notes: tuple[str, ...] = ()
    wishes: Wishes = field(default_factory=Wishes)
    planning_s: float = 0.0
    calibration: Calibration | None = None
    policy: dict[str, Any] = field(default_factory=dict)  # the policy followed: name, rule, floors (balanced)
    warnings: tuple[str, ...] = ()  # a floor of the policy given up to fit

    def to_dict(self, server_bin: str = "llama-server") -> dict[str, Any]:
        p = self.plan
        return {
            "plan": p.to_dict(),
            "memory": p.estimate.to_dict()["memory"],
            "budget": p.budget.to_dict(p.estimate),
            "headroom_bytes": headroom_bytes(p.estimate, p.budget),
            "predicted": p.predicted.to_dict(),
            "reasons": list(p.reasons),
            "command": p.command(server_bin),
            "alternatives": [{**a.to_dict(), "predicted": a.predicted.to_dict(), "why_not": why,
                              "gpu_bytes": sum(d.total_bytes for d in a.estimate.gpu_devices),
                              "host_bytes": a.estimate.host_total_bytes}
                             for a, why in self.alternatives],
            "wishes": {"ctx_size": self.wishes.ctx_size, "parallel": self.wishes.parallel,
                       "prefer": self.wishes.prefer, "vision": self.wishes.vision, "quant": self.wishes.quant,
                       "cache_type": self.wishes.cache_type, "allow_yarn": self.wishes.allow_yarn},
            "policy": self.policy,
            "warnings": list(self.warnings),
            "notes": list(self.notes),
            "calibration": self._calibration_dict(),
            "planning_s": round(self.planning_s, 3),
        }

    def _calibration_dict(self) -> dict[str, Any] | None:
        cal = self.calibration
        if not cal:
            return None
        lay, est = self.plan.candidate.layout, self.plan.estimate
        return {"line": cal.describe(self.hardware), **cal.summary(self.hardware, shape_id(lay), est.n_ubatch)}


# ---------------------------------------------------------------------------------------------- the budget


def estimate_on(layout: ModelLayout, flags: ServerFlags, hardware: Hardware) -> MemoryEstimate:
    """The memory estimate on this hardware's GPUs (named as llama.cpp names them), layers split as it splits them
    (by ``--tensor-split`` when the flags give one, else by free memory)."""
    return estimate_memory(layout, flags, devices_of(hardware), gpu_split(hardware))


def budget_for(hardware: Hardware, wishes: Wishes, calibration: Calibration | None = None) -> Budget:
    """What a plan may use on ``hardware``; the buffer is ``--buffer``, else the calibrated one (see the module
    doc), else the default."""
    if hardware.cpu_only:
        buffer = DEFAULT_RAM_BUFFER_BYTES if wishes.buffer_bytes is None else wishes.buffer_bytes
        return Budget("CPU", 0, 0, buffer, hardware.ram_available_bytes)
    buffer = DEFAULT_VRAM_BUFFER_BYTES if wishes.buffer_bytes is None else wishes.buffer_bytes
    source = ""
    calibrated = calibration.buffer_bytes(hardware) if calibration and wishes.buffer_bytes is None else None
    if calibrated is not None:
        buffer, source = calibrated
    return Budget(
        device="+".join(g.llama_name for g in hardware.gpus),
        vram_total_bytes=sum(g.vram_total_bytes for g in hardware.gpus),
        vram_free_bytes=sum(g.vram_free_bytes for g in hardware.gpus),
        buffer_bytes=buffer,
        ram_available_bytes=hardware.ram_available_bytes,
        gpu_free_bytes=tuple((g.llama_name, g.vram_free_bytes) for g in hardware.gpus),
        gpu_total_bytes=tuple(g.vram_total_bytes for g in hardware.gpus),
        buffer_source=source,
    )


def headroom_bytes(estimate: MemoryEstimate, budget: Budget) -> dict[str, int]:
    """Bytes left beyond the buffer on every GPU and in RAM (``"CPU"``); negative where the plan overflows."""
    out: dict[str, int] = {}
    for name, free in budget.gpu_free_bytes:
        used = estimate.device(name).total_bytes + budget.gpu_reserved_bytes(name, estimate)
        out[name] = free - budget.buffer_bytes - used
    out[CPU] = budget.ram_available_bytes - budget.ram_reserved_bytes(estimate) - estimate.host_total_bytes
    return out


def fits(estimate: MemoryEstimate, budget: Budget) -> bool:
    """Every GPU keeps its buffer free and the host part fits the available RAM."""
    return all(v >= 0 for v in headroom_bytes(estimate, budget).values())


def _gpus_fit(estimate: MemoryEstimate, budget: Budget) -> bool:
    return all(v >= 0 for k, v in headroom_bytes(estimate, budget).items() if k != CPU)


# ------------------------------------------------------------------------------------------------ the search


@dataclass(frozen=True)
class _Option:
    candidate: QuantCandidate
    flags: ServerFlags
    estimate: MemoryEstimate
    budget: Budget
    predicted: Prediction
    quant_quality: int
    host_notes: tuple[str, ...] = ()
    floor: int = 0  # the context per slot the placement was searched at (balanced: its tier)

    @property
    def kv(self) -> str:
        return self.flags.cache_type_k

    @property
    def kv_quality(self) -> int:
        return KV_QUALITY.get(self.flags.cache_type_k, 0) + KV_QUALITY.get(self.flags.cache_type_v, 0)

    @property
    def ctx(self) -> int:
        return self.estimate.n_ctx_seq

    @property
    def tg(self) -> float:
        return self.predicted.tg_tok_s

    @property
    def bpw(self) -> float:
        return self.candidate.bits_per_weight

    @property
    def experts_on_cpu(self) -> int:
        """Layers with expert tensors in RAM (``--n-cpu-moe N``: N; several devices: the ``-ot`` rules')."""
        lay = self.candidate.layout
        if not lay.is_moe or self.budget.cpu_only:
            return 0
        if self.flags.override_tensor:
            return cpu_expert_layers(lay, self.flags, [name for name, _ in self.budget.gpu_free_bytes])
        return lay.n_layer if self.flags.cpu_moe else min(self.flags.n_cpu_moe, lay.n_layer)


@dataclass(frozen=True)
class _Miss:
    """An option that does not fit: where it overflows, and what it needs at its leanest."""

    candidate: QuantCandidate
    kv: str
    why: str  # "VRAM" | "RAM"
    gpu_need_bytes: int = 0  # the estimate's GPU part at the placement found (the vision reserve not included)
    host_need_bytes: int = 0  # with no prompt cache and no checkpoints
    placement: str = ""  # "--n-cpu-moe 12", "--n-gpu-layers 20", ""

    def describe(self) -> str:
        return ", ".join(x for x in (self.candidate.quant, f"KV {self.kv}", self.placement) if x)




class _Search:
    """One planning run: hardware, budget, wishes and the quant ladder, with the estimates it needs."""

    def __init__(self, candidates: Sequence[QuantCandidate], hardware: Hardware, wishes: Wishes,
                 measured: Measured | None, calibration: Calibration | None = None) -> None:
        self.hardware = hardware
        self.wishes = wishes
        self.measured = measured
        self.calibration = calibration
        self.budget = budget_for(hardware, wishes, calibration)
        self.devices = tuple(devices_of(hardware))
        self.split = gpu_split(hardware)
        order = sorted({(c.quality_rank, round(c.bits_per_weight, 4)) for c in candidates})
        self.quality = {id(c): order.index((c.quality_rank, round(c.bits_per_weight, 4))) for c in candidates}
        # what the estimate adds to a layout: its MTP sidecar and, with --vision, its projector (keyed by the layout
        # object, so every estimate of the search counts them without being handed the candidate)
        self.candidate_of = {id(c.layout): c for c in candidates}

    # --- primitives -------------------------------------------------------------------------------------------
    def estimate(self, layout: ModelLayout, flags: ServerFlags) -> MemoryEstimate:
        cand = self.candidate_of.get(id(layout))
        draft = cand.mtp_draft if cand is not None and not layout.has_mtp else None
        vision = cand.vision_projector() if cand is not None and self.wishes.vision else None
        return corrected_estimate(layout, flags, self.hardware, self.calibration, draft=draft, vision=vision,
                                  mmproj_offload=self.wishes.mmproj_offload)

    def placer(self, budget: Budget) -> Placer:
        """Several devices: the placement search with each GPU's budget and memory bandwidth."""
        return Placer(self.devices, budget.device_budgets(reserve=False),
                      [float(g.mem_bandwidth_bytes_s) for g in self.hardware.gpus], estimate=self.estimate,
                      reserve_bytes=0 if budget.reserved_device() == CPU else budget.reserved_bytes)

    def correct(self, layout: ModelLayout) -> Callable[[MemoryEstimate], MemoryEstimate] | None:
        """The calibration's corrections of an estimate of ``layout`` on this hardware (None without one)."""
        calibration = self.calibration
        if calibration is None:
            return None
        return lambda est: calibration.apply(est, layout, self.hardware)

    def budget_for_candidate(self, cand: QuantCandidate) -> Budget:
        projector = cand.vision_projector() if self.wishes.vision else None
        if projector is not None:  # the estimate counts its warm-up buffer; an image grows it at run time
            return replace(self.budget, reserved_bytes=projector.growth_bytes(),
                           reserved_on_host=not self.wishes.mmproj_offload)
        return self.budget

    def predict(self, cand: QuantCandidate, flags: ServerFlags) -> Prediction:
        if self.measured is not None:
            got = self.measured(cand, flags, self.hardware)
            if got is not None:
                return got
        if flags.spec_type == SPEC_MTP:
            plain = self.predict(cand, flags.with_(spec_type=None))
            return predict_mtp(cand.layout, flags, self.hardware, plain, draft=cand.mtp_draft, gpu_split=self.split)
        pred = predict_speed(cand.layout, flags, self.hardware, gpu_split=self.split)
        return self.calibration.rescale(pred, cand.layout, flags, self.hardware) if self.calibration else pred

    def with_ctx(self, flags: ServerFlags, ctx_per_slot: int) -> ServerFlags:
        return flags.with_(ctx_size=ctx_per_slot * flags.n_seq)

    # --- one option -------------------------------------------------------------------------------------------
    def base_flags(self, cand: QuantCandidate, kv: str, ctx_per_slot: int) -> ServerFlags:
        np_ = self.wishes.parallel
        return ServerFlags(
            rpc=rpc_endpoints(self.hardware.gpus),
            ctx_size=ctx_per_slot * np_, parallel=np_, kv_unified=False if np_ > 1 else None,
            cache_type_k=kv, cache_type_v=kv, batch_size=2048, ubatch_size=DEFAULT_UBATCH, flash_attn="on",
            n_gpu_layers=0 if self.budget.cpu_only else None,
        )

    def place(self, cand: QuantCandidate, flags: ServerFlags, budget: Budget
              ) -> tuple[ServerFlags, MemoryEstimate] | None:
        """The fewest expert layers on the CPU (then the most GPU layers) that fit the GPUs at ``flags``'s
        context; host RAM is checked separately. Several devices: :class:`tuner.placement.Placer`."""
        lay = cand.layout
        if budget.cpu_only:
            return flags, self.estimate(lay, flags)
        if len(self.devices) > 1:  # the split and each device's spills (tuner.placement); -ts and -ot rules
            got = self.placer(budget).place(lay, flags, correct=self.correct(lay))
            return None if got is None else (got.flags, got.estimate)

        def probe(f: ServerFlags) -> tuple[ServerFlags, MemoryEstimate] | None:
            est = self.estimate(lay, f)
            return (f, est) if _gpus_fit(est, budget) else None

        first = probe(flags)
        if first is not None:
            return first
        if lay.is_moe:
            all_cpu = flags.with_(n_cpu_moe=lay.n_layer)
            fitted = probe(all_cpu)
            if fitted is not None:  # the fewest expert layers in RAM
                return bisect_fit(0, lay.n_layer, lambda n: probe(flags.with_(n_cpu_moe=n)), fitted)
            flags = all_cpu
        # not even with every expert in RAM: leave whole layers on the CPU as well (the most -ngl that fits)
        none_on_gpu = probe(flags.with_(n_gpu_layers=0))
        if none_on_gpu is None:
            return None
        return bisect_fit(lay.n_layer_all + 1, 0, lambda ngl: probe(flags.with_(n_gpu_layers=ngl)), none_on_gpu)

    def fit_host(self, cand: QuantCandidate, flags: ServerFlags, est: MemoryEstimate, budget: Budget
                 ) -> tuple[ServerFlags, MemoryEstimate, tuple[str, ...]] | None:
        """Lower ``--cache-ram``, then ``--ctx-checkpoints``, until the host part fits; None if it never does."""
        over = -headroom_bytes(est, budget)[CPU]
        if over <= 0:
            return flags, est, ()
        notes = []
        cut_mib = -(-over // MiB)
        if cut_mib <= flags.cache_ram_mib:
            cache = (flags.cache_ram_mib - cut_mib) // 256 * 256
            flags = flags.with_(cache_ram_mib=cache)
            notes.append(f"--cache-ram {cache}: the default 8192 MiB prompt cache would not fit in RAM")
        else:
            over -= flags.cache_ram_mib * MiB
            per = flags.n_seq * cand.layout.recurrent_bytes_per_seq()
            need = -(-over // per) if per else flags.ctx_checkpoints + 1
            if need > flags.ctx_checkpoints:
                return None
            cp = flags.ctx_checkpoints - need
            flags = flags.with_(cache_ram_mib=0, ctx_checkpoints=cp)
            notes.append("--cache-ram 0: no RAM left for a prompt cache")
            notes.append(f"--ctx-checkpoints {cp}: fewer recurrent-state snapshots per slot so RAM fits"
                         + (" (0 = every turn re-processes the whole prompt)" if cp == 0 else ""))
        est = self.estimate(cand.layout, flags)
        return (flags, est, tuple(notes)) if fits(est, budget) else None

    def largest_ctx(self, cand: QuantCandidate, flags: ServerFlags, est: MemoryEstimate, budget: Budget,
                    floor: int, cap: int) -> tuple[ServerFlags, MemoryEstimate]:
        """Grow the per-slot context from ``floor`` (which fits) to the largest multiple of 256 that fits.

        Every term that grows with context (KV, KQ mask, f16 conversion copy, pinned mask) is linear in it once
        it exceeds the batch, so the limit is interpolated from the estimates at ``floor`` and ``cap`` and then
        checked; a binary search finishes whatever the interpolation leaves open."""
        if len(self.devices) > 1 and not budget.cpu_only and flags.n_gpu_layers is None:
            return self._largest_ctx_placed(cand, flags, est, budget, floor, cap)
        if cap <= floor:
            return flags, est
        f_cap = self.with_ctx(flags, cap)
        e_cap = self.estimate(cand.layout, f_cap)
        if fits(e_cap, budget):
            return f_cap, e_cap
        lo, hi = floor // CTX_STEP, cap // CTX_STEP  # in steps: lo fits, hi fails (cap is a multiple of 256)
        best = (flags, est)
        h_lo, h_hi = headroom_bytes(est, budget), headroom_bytes(e_cap, budget)
        guess = hi - 1
        for dev, left in h_lo.items():
            slope = (h_hi[dev] - left) / (cap - floor)
            if h_hi[dev] < 0 and slope < 0:
                guess = min(guess, int((floor + left / -slope) // CTX_STEP))
        def probe(step: int) -> tuple[ServerFlags, MemoryEstimate] | None:
            f = self.with_ctx(flags, step * CTX_STEP)
            e = self.estimate(cand.layout, f)
            return (f, e) if fits(e, budget) else None

        for step in (guess, guess + 1):  # the interpolated limit and the step above it
            if not lo < step < hi:
                continue
            got = probe(step)
            if got is None:
                hi = step
                break
            lo, best = step, got
        return bisect_fit(hi, lo, probe, best)

    def _largest_ctx_placed(self, cand: QuantCandidate, flags: ServerFlags, est: MemoryEstimate, budget: Budget,
                            floor: int, cap: int) -> tuple[ServerFlags, MemoryEstimate]:
        """Several devices: the largest context at which a placement with no more expert tensors in RAM than
        ``flags``'s fits (the split may move with the context), by binary search; host RAM must still fit."""
        placer = self.placer(budget)
        lay = cand.layout
        spills = len(cpu_expert_tensors(lay, flags, self.devices))

        def probe(step: int, speed: bool = False) -> tuple[ServerFlags, MemoryEstimate] | None:
            f = self.with_ctx(flags, step * CTX_STEP)
            got = placer.place(lay, f, max_spills=spills, allow_partial=False, speed=speed, correct=self.correct(lay))
            return (got.flags, got.estimate) if got is not None and fits(got.estimate, budget) else None

        top = probe(cap // CTX_STEP, speed=True)  # the context is final: the fastest split that holds it
        if top is not None:
            return top
        return bisect_fit(cap // CTX_STEP, floor // CTX_STEP, probe, (flags, est))

    def option(self, cand: QuantCandidate, kv: str, floor: int, cap: int) -> _Option | _Miss:
        budget = self.budget_for_candidate(cand)
        placed = self.place(cand, self.base_flags(cand, kv, floor), budget)
        if placed is None:  # not even -ngl 0 fits the GPU (its compute buffers and the vision reserve)
            e = self.estimate(cand.layout, self.base_flags(cand, kv, floor).with_(
                n_gpu_layers=0, cache_ram_mib=0, ctx_checkpoints=0))
            return _Miss(cand, kv, "VRAM", sum(d.total_bytes for d in e.gpu_devices), e.host_total_bytes,
                         "--n-gpu-layers 0")
        flags, est = placed
        hosted = self.fit_host(cand, flags, est, budget)
        if hosted is None:
            lean = self.estimate(cand.layout, flags.with_(cache_ram_mib=0, ctx_checkpoints=0))
            return _Miss(cand, kv, "RAM", sum(d.total_bytes for d in est.gpu_devices), lean.host_total_bytes,
                         _placement(flags, budget))
        flags, est, host_notes = hosted
        flags, est = self.largest_ctx(cand, flags, est, budget, floor, cap)
        return _Option(cand, flags, est, budget, self.predict(cand, flags), self.quality[id(cand)], host_notes,
                       floor)

    def raise_ubatch(self, opt: _Option, floor: int, cap: int) -> tuple[_Option, str | None]:
        """With experts in RAM, a larger ubatch amortises their per-ubatch copy to the GPU: take 2048 (or 1024)
        when, re-placed at that ubatch (from ``floor`` tokens per slot), generation stays within the speed tolerance
        and prompts get faster by at least :data:`UBATCH_MIN_PP_GAIN`."""
        if opt.experts_on_cpu == 0 or opt.budget.cpu_only or opt.flags.n_gpu_layers is not None:
            return opt, None
        cand = opt.candidate
        for ub in OFFLOAD_UBATCHES:
            start = opt.flags.with_(ubatch_size=ub, batch_size=max(opt.flags.batch_size, ub), n_cpu_moe=0,
                                    ctx_size=floor * opt.flags.n_seq)
            placed = self.place(cand, start, opt.budget)
            if placed is None or placed[0].n_gpu_layers is not None or not fits(placed[1], opt.budget):
                continue
            f, e = self.largest_ctx(cand, *placed, opt.budget, floor, cap)
            pred = self.predict(cand, f)
            slower = pred.tg_tok_s < (1 - SPEED_TOLERANCE) * opt.tg
            if slower or pred.pp_tok_s < UBATCH_MIN_PP_GAIN * opt.predicted.pp_tok_s:
                continue
            moved = (cpu_expert_layers(cand.layout, f, self.devices) - opt.experts_on_cpu if len(self.devices) > 1
                     else f.n_cpu_moe - opt.flags.n_cpu_moe)
            why = (f"--ubatch-size {ub}: expert weights in RAM are copied to the GPU once per ubatch, so prompts run "
                   f"~{pred.pp_tok_s:.0f} instead of ~{opt.predicted.pp_tok_s:.0f} tok/s"
                   + (f", for {moved} more expert layer(s) in RAM ({pred.tg_tok_s:.0f} vs {opt.tg:.0f} tok/s)"
                      if moved > 0 else "")
                   + (f" and context {e.n_ctx_seq} instead of {opt.ctx}" if e.n_ctx_seq < opt.ctx else ""))
            return replace(opt, flags=f, estimate=e, predicted=pred), why
        return opt, None

    def try_mtp(self, opt: _Option, floor: int) -> tuple[_Option, str | None]:
        """MTP drafting (:mod:`tuner.mtp`) for the chosen plan, when it has a head (in its GGUF or a sidecar): only
        with the whole trunk on the GPU, one slot and no vision; the draft length that predicts (or measured) the
        fastest generation, taken when that beats plain decoding by more than the speed tolerance and its draft
        context fits (at this context, or, unless ``--prefer context``, at the largest that fits from the floor).
        Returns the plan (changed or not) and the reason, or None when there is no head to talk about."""
        cand = opt.candidate
        if not cand.has_mtp:
            return opt, None
        floor = floor or MIN_CTX
        where = ("the MTP head of " + cand.mtp_sidecar.rsplit("/", 1)[-1] if not cand.layout.has_mtp
                 and cand.mtp_sidecar else "the model's MTP head")
        if opt.budget.cpu_only:
            return opt, (f"MTP off: no GPU; {where} drafts on the CPU, where verifying the drafted tokens costs "
                         f"about what it saves (tuner bench measures it on and off)")
        if self.wishes.parallel > 1:
            return opt, f"MTP off: --parallel {self.wishes.parallel}; MTP drafting is planned for one slot"
        if self.wishes.vision:
            return opt, "MTP off: not planned together with --vision (the MTP GGUFs' uploaders do not support it)"
        if opt.flags.n_gpu_layers is not None or opt.experts_on_cpu:
            return opt, (f"MTP off: experts of {opt.experts_on_cpu or cand.layout.n_layer} layer(s) in RAM; "
                         "verifying 1 + n drafted tokens reads up to 1 + n times the routed experts from RAM, "
                         "more than drafting saves")
        best: tuple[ServerFlags, MemoryEstimate, Prediction] | None = None
        for n in DRAFT_LENGTHS:
            f = mtp_flags(opt.flags, n)
            est = self.estimate(cand.layout, f)
            if not fits(est, opt.budget):
                if self.wishes.prefer == "context":
                    continue
                start = self.with_ctx(f, floor)
                lean = self.estimate(cand.layout, start)
                if not fits(lean, opt.budget):
                    continue
                f, est = self.largest_ctx(cand, start, lean, opt.budget, floor, opt.ctx)
            pred = self.predict(cand, f)
            if best is None or pred.tg_tok_s > best[2].tg_tok_s:
                best = (f, est, pred)
        if best is None:
            return opt, (f"MTP off: {where} would not fit: its draft context (one layer of KV, a compute buffer) "
                         "and rollback states of the recurrent layers need memory this plan does not have")
        f, est, pred = best
        basis = "measured" if pred.source == "measured" else f"predicted at an assumed acceptance of {MTP_ACCEPTANCE}"
        if pred.tg_tok_s <= (1 + SPEED_TOLERANCE) * opt.tg:
            return opt, (f"MTP off: drafting with {where} gives {pred.tg_tok_s:.0f} vs {opt.tg:.0f} tok/s ({basis}), "
                         f"not more than {SPEED_TOLERANCE:.0%} faster")
        ctx = f" at context {est.n_ctx_seq} instead of {opt.ctx}" if est.n_ctx_seq < opt.ctx else ""
        why = (f"--spec-type {SPEC_MTP} --spec-draft-n-max {f.spec_draft_n_max}: drafting with {where} generates "
               f"{pred.tg_tok_s:.0f} instead of {opt.tg:.0f} tok/s ({basis}){ctx}; every layer is on the GPU")
        return replace(opt, flags=f, estimate=est, predicted=pred), why


# ----------------------------------------------------------------------------------------------- scoring


def _kv_choice(group: Sequence[_Option], prefer: str) -> _Option:
    """One quant's KV cache type: the most exact type, unless a more compact one is clearly faster because it
    leaves room for fewer expert layers in RAM, or, with ``--prefer context``, reaches more context.

    Without a GPU there is no VRAM to free: the cache is quantized only for context. The roofline would credit a
    quantized cache with reading fewer KV bytes, but on the CPU backend it cut prompt speed to a third where we
    measured it (bench_results/mid-qwen35moe/cpu-amd-epyc/20261123T161203150194Z.json, synthetic qwen35moe at 6144
    tokens: 411 vs 1286 tok/s, generation ×1.18), a cost the roofline does not see."""
    ordered = sorted(group, key=lambda o: -o.kv_quality)
    if prefer == "context":
        most = max(o.ctx for o in ordered)
        ordered = [o for o in ordered if o.ctx == most]
    pick = ordered[0]
    for o in ordered[1:]:
        if not o.budget.cpu_only and o.tg > (1 + SPEED_TOLERANCE) * pick.tg:
            pick = o
    return pick


def _kv_why_lost(alt: _Option, best: _Option, prefer: str) -> str:
    fast = f"{alt.tg:.0f} vs {best.tg:.0f} tok/s predicted"
    if prefer == "context" and alt.ctx < best.ctx:
        return f"{alt.kv} KV reaches less context: {alt.ctx} vs {best.ctx} tokens"
    if alt.kv_quality > best.kv_quality:
        return f"{alt.kv} KV is slower ({fast}), with experts of {alt.experts_on_cpu} layers in RAM"
    gain = alt.tg / best.tg - 1 if best.tg else 0.0
    return (f"{alt.kv} KV would be only {gain:+.0%} in speed ({fast}"
            + (f", {alt.ctx} tokens of context" if alt.ctx != best.ctx else "")
            + f"): not worth quantizing; {best.kv} is exact"
            + ("" if best.budget.cpu_only else " and needs no f16 conversion buffer on CUDA"))


def _speed_keys(options: Sequence[_Option]) -> dict[int, tuple]:
    ok = [o for o in options if o.bpw >= SPEED_MIN_BITS_PER_WEIGHT] or list(options)
    best = max((o.tg for o in ok), default=0.0)
    keys = {}
    for o in options:
        eligible = o in ok
        near = eligible and o.tg >= (1 - SPEED_TOLERANCE) * best
        keys[id(o)] = (eligible, near, o.quant_quality if near else 0, o.kv_quality if near else 0,
                       o.ctx if near else 0, o.tg)
    return keys


def _rank(options: Sequence[_Option], prefer: str) -> list[tuple[_Option, tuple]]:
    """Options best first under ``prefer``, each with its sort key (see the module docstring)."""
    if not options:
        return []
    if prefer == "quality":
        best = max(o.tg for o in [o for o in options if o.bpw >= SPEED_MIN_BITS_PER_WEIGHT] or options)
        keyed = [(o, (o.tg >= QUALITY_MIN_SPEED_FRACTION * best, o.quant_quality, o.kv_quality, o.tg, o.ctx))
                 for o in options]
    elif prefer == "context":
        keyed = []
        for ctx in sorted({o.ctx for o in options}):
            group = [o for o in options if o.ctx == ctx]
            sk = _speed_keys(group)
            keyed += [(o, (ctx, *sk[id(o)])) for o in group]
    else:
        sk = _speed_keys(options)
        keyed = [(o, sk[id(o)]) for o in options]
    return sorted(keyed, key=lambda ok: ok[1], reverse=True)


def _why_lost(alt: _Option, key: tuple, best: _Option, best_key: tuple, prefer: str) -> str:
    fast = f"{alt.tg:.0f} vs {best.tg:.0f} tok/s predicted"
    cpu = f", experts of {alt.experts_on_cpu} layers in RAM" if alt.experts_on_cpu > best.experts_on_cpu else ""
    if prefer == "context" and key[0] < best_key[0]:
        return f"less context: {alt.ctx} vs {best.ctx} tokens"
    if prefer == "context":
        key, best_key = key[1:], best_key[1:]
    if prefer == "quality":
        if not key[0]:
            return f"too slow for --prefer quality ({fast}, under a third of the fastest 4-bit plan{cpu})"
        if key[1] < best_key[1]:
            return f"lower-quality quant {policy.quality_gap(alt, best)}"
        if key[2] < best_key[2]:
            return f"quantized KV cache ({alt.kv}) where {best.kv} fits as well"
        if key[3] < best_key[3]:
            return f"slower: {fast}{cpu}"
        return f"less context: {alt.ctx} vs {best.ctx} tokens"
    if not key[0]:
        return (f"below the {SPEED_MIN_BITS_PER_WEIGHT:g}-bit quality floor of --prefer speed "
                f"({alt.bpw:.2f} bits/weight, {fast})")
    if not key[1]:
        return f"slower: {fast}{cpu}"
    if key[2] < best_key[2]:
        return (f"lower-quality quant {policy.quality_gap(alt, best)} for under {SPEED_TOLERANCE:.0%} of speed "
                f"({fast})")
    if key[3] < best_key[3]:
        return f"quantized KV cache ({alt.kv}) at a similar speed ({fast})"
    if key[4] < best_key[4]:
        return f"less context: {alt.ctx} vs {best.ctx} tokens at a similar speed"
    return f"slightly slower: {fast}"


# ------------------------------------------------------------------------------------------------- recommend


def _ctx_bounds(layouts: Sequence[ModelLayout], wishes: Wishes) -> tuple[int, int, int]:
    """(floor, cap, native) per slot: what every plan must reach, what none may exceed, and n_ctx_train."""
    native = min(lay.n_ctx_train for lay in layouts)
    limit = native * YARN_FACTOR if wishes.allow_yarn else native
    if wishes.ctx_size is not None:
        want = pad(wishes.ctx_size, CTX_STEP)
        if want > limit:
            raise TunerError(
                f"--ctx-size {wishes.ctx_size} is beyond the model's native context ({native})"
                + (f" and YaRN's ×{YARN_FACTOR} ({limit})" if wishes.allow_yarn
                   else "; allow YaRN rope scaling (--allow-yarn) to go further"))
        return want, want, native
    cap = native  # YaRN only when a context beyond native was asked for
    floor = {"context": cap, BALANCED: min(policy.CTX_FLOOR, cap)}.get(wishes.prefer, min(WORKING_CTX, cap))
    return floor, cap, native


def _kv_types(wishes: Wishes, last_resort: bool, layout: ModelLayout) -> tuple[str, ...]:
    """The KV cache types to try for this model (only those llama.cpp accepts for its head size)."""
    if wishes.cache_type:
        return (kv_cache_type(wishes.cache_type).name,)
    return tuple(t for t in (KV_LAST_RESORT if last_resort else KV_TYPES) if kv_cache_type_supported(layout, t))


def _placement(flags: ServerFlags, budget: Budget) -> str:
    if budget.cpu_only:
        return ""
    if flags.n_gpu_layers is not None:
        return f"--n-gpu-layers {flags.n_gpu_layers}, every expert in RAM"
    return f"--n-cpu-moe {flags.n_cpu_moe}" if flags.n_cpu_moe else "all on the GPU"


def _no_fit_error(misses: Sequence[_Miss], search: _Search, floor: int) -> TunerError:
    smallest = min(misses, key=lambda m: (m.gpu_need_bytes + m.host_need_bytes))
    b = search.budget_for_candidate(smallest.candidate)  # with the vision reserve, if any
    projector = smallest.candidate.vision_projector() if search.wishes.vision else None
    vision = (f" ({fmt_bytes(projector.total_bytes() + b.reserved_bytes)} of it for the vision projector)"
              if projector is not None else "")
    if b.cpu_only:
        have = f"{fmt_bytes(b.ram_available_bytes - b.buffer_bytes)} of RAM after a {fmt_bytes(b.buffer_bytes)} buffer"
        need = (f"{fmt_bytes(smallest.host_need_bytes + b.reserved_bytes)} of RAM{vision} "
                f"(no prompt cache, no checkpoints)")
    else:
        free = sum(f - b.buffer_bytes for _, f in b.gpu_free_bytes)  # all GPUs together, as the need
        have = (f"{fmt_bytes(free)} of VRAM after a {fmt_bytes(b.buffer_bytes)} buffer per GPU, and "
                f"{fmt_bytes(b.ram_available_bytes)} of RAM")
        need = (f"{fmt_bytes(smallest.gpu_need_bytes + b.reserved_bytes)} of VRAM{vision} and "
                f"{fmt_bytes(smallest.host_need_bytes)} of RAM (no prompt cache, no checkpoints)")
    return TunerError(f"nothing fits at {floor} tokens of context: the smallest plan ({smallest.describe()}) "
                      f"needs {need}; available: {have}",
                      hint="free memory, lower --buffer, or pick a smaller model"
                      + ("" if b.cpu_only else "; --gpu none plans for RAM alone"))


def recommend(candidates: list[QuantCandidate], hardware: Hardware, wishes: Wishes, *,
              measured: Measured | None = None, calibration: Calibration | None = None) -> Recommendation:
    """The best plan for ``candidates`` (the quants of one model) on ``hardware``, and the runners-up."""
    started = time.perf_counter()
    if not candidates:
        raise TunerError("no model files to plan for")
    pool = list(candidates)
    if wishes.quant:
        pool = [c for c in pool if c.quant.lower() == wishes.quant.lower()]
        if not pool:
            raise TunerError(f"no quant {wishes.quant!r} for this model; known: "
                             + ", ".join(c.quant for c in candidates))
    if wishes.vision:
        pool = [c for c in pool if c.mmproj]
        if not pool:
            raise TunerError("--vision: no vision projector (mmproj) is known for this model")
    search = _Search(pool, hardware, wishes, measured, calibration)
    floor, cap, native = _ctx_bounds([c.layout for c in pool], wishes)
    notes: list[str] = []

    pf = policy.Floors(floor, policy.ctx_tiers(floor, cap) if wishes.ctx_size is None else (floor,),
                       quality=not wishes.quant, ctx_asked=wishes.ctx_size is not None,
                       cpu_only=search.budget.cpu_only)

    def run(floor_: int, last_resort: bool) -> tuple[list[_Option], list[_Miss]]:
        opts: list[_Option] = []
        misses: list[_Miss] = []
        for cand in pool:
            for kv in _kv_types(wishes, last_resort, cand.layout):
                got = search.option(cand, kv, floor_, cap)
                if isinstance(got, _Option):
                    opts.append(got)
                else:
                    misses.append(got)
        if wishes.prefer == BALANCED and floor_ == pf.ctx:
            def place(o: _Option, tier: int) -> _Option | None:
                got = search.option(o.candidate, o.kv, tier, cap)
                return got if isinstance(got, _Option) else None

            opts += policy.climb_tiers(opts, pf, place, SPEED_TOLERANCE)
        return opts, misses

    floors = [floor] + ([MIN_CTX] if wishes.ctx_size is None and floor > MIN_CTX else [])
    options: list[_Option] = []
    misses: list[_Miss] = []
    for floor in floors:
        options, misses = run(floor, False)
        if not options and not wishes.cache_type:
            options, _ = run(floor, True)
            if options:
                notes.append(f"only a {KV_LAST_RESORT[0]} KV cache reaches {floor} tokens of context")
        if options:
            break
        notes.append(f"nothing reaches {floor} tokens of context")
    if not options:
        raise _no_fit_error(misses, search, floor)
    if floor < floors[0]:
        notes.append(f"planned from {floor} tokens of context instead")

    choice: policy.Choice | None = None
    more_ctx: _Option | None = None
    if wishes.prefer == BALANCED:
        choice, ub_reasons = policy.rank_as_planned(options, pf, lambda o: search.raise_ubatch(o, o.floor, cap),
                                                    SPEED_TOLERANCE)
        ranked: list[tuple[_Option, tuple]] = list(choice.ranked)  # type: ignore[arg-type]
        best, best_key = ranked[0]
        ub_reason = ub_reasons.get(id(best))
        if not choice.window_tg:  # no window (no plan meets the floors): the speed tolerance alone
            best, ub_reason = search.raise_ubatch(best, best.floor, cap)

        def as_planned(o: _Option) -> _Option:  # an alternative as it would be planned if it were chosen
            return o if id(o) in ub_reasons else search.raise_ubatch(o, o.floor, cap)[0]

        same = [o for o, _ in ranked if o.candidate is best.candidate and o is not ranked[0][0]]
        other_kv = [o for o in same if o.kv != best.kv]  # at the plan's tier if there is one, else the highest
        kv_losers = [as_planned(max(other_kv, key=lambda o: (pf.tier(o) == pf.tier(best), pf.tier(o), o.tg)))
                     ] if other_kv else []
        more = [o for o in same if o.ctx > best.ctx]
        more_ctx = max(more, key=lambda o: o.tg) if more else None
        alts = [(o, policy.why_lost(o, best, choice))
                for o in map(as_planned, policy.alternatives(best, choice, MAX_ALTERNATIVES))]  # type: ignore[arg-type]
    else:
        # one KV type per quant, then the quants ranked
        groups: dict[int, list[_Option]] = {}
        for o in options:
            groups.setdefault(id(o.candidate), []).append(o)
        winners = [_kv_choice(g, wishes.prefer) for g in groups.values()]
        ranked = _rank(winners, wishes.prefer)
        best, best_key = ranked[0]
        kv_losers = [o for o in groups[id(best.candidate)] if o is not best]
        ub_reason = None
        if wishes.prefer != "context":
            best, ub_reason = search.raise_ubatch(best, floor, cap)

        planned: dict[int, _Option] = {id(ranked[0][0]): best}

        def as_planned(o: _Option) -> _Option:  # an option as it would be planned if it were chosen (once each)
            if id(o) not in planned:
                planned[id(o)] = search.raise_ubatch(o, floor, cap)[0] if wishes.prefer != "context" else o
            return planned[id(o)]

        # one computation for the whole report: the reasons quote the same plans as the alternatives table shows
        kv_losers = [as_planned(o) for o in kv_losers]
        ranked = [(as_planned(o), key) for o, key in ranked]
        alts = [(o, _kv_why_lost(o, best, wishes.prefer)) for o in kv_losers[:1]]
        for opt, key in ranked[1:MAX_ALTERNATIVES + 1 - len(alts)]:
            alts.append((opt, _why_lost(opt, key, best, best_key, wishes.prefer)))

    best, mtp_reason = search.try_mtp(best, best.floor)
    reasons = _reasons(best, best_key, ranked, kv_losers, search, cap, native, ub_reason, choice, more_ctx)
    if mtp_reason:
        reasons = (*reasons, mtp_reason)
    threads, why_threads = threads_for(hardware)
    if threads is not None and _runs_on_cpu(best):
        reasons = (*reasons, why_threads or "")
    plan = _to_plan(best, reasons, wishes, native, threads)
    alt_plans = tuple((_to_plan(o, (), wishes, native, threads), why) for o, why in alts)
    missing: dict[int, _Miss] = {}
    for m in sorted(misses, key=lambda m: m.gpu_need_bytes + m.host_need_bytes):
        if not any(o.candidate is m.candidate for o in options):
            missing.setdefault(id(m.candidate), m)
    for m in missing.values():
        gpu = "" if search.budget.cpu_only else f" with {fmt_bytes(m.gpu_need_bytes)} on the GPU ({m.placement})"
        notes.append(f"{m.candidate.quant} does not fit in {m.why}: it needs {fmt_bytes(m.host_need_bytes)} of "
                     f"RAM at least{gpu}")
    notes[:0] = plan.candidate.notes  # a card quant sized from another file than its own (tuner.cards.quant_mix)
    followed = {**(choice.to_dict() if choice else {"name": wishes.prefer}), "rule": _rule(wishes, best, choice)}
    return Recommendation(plan, alt_plans, hardware, tuple(notes), wishes, time.perf_counter() - started,
                          calibration or None, followed, choice.warnings if choice else ())


def threads_for(hardware: Hardware) -> tuple[int | None, str | None]:
    """``--threads`` where other work keeps some of this machine's cores busy (None: llama-server's default, every
    physical core, common/common.cpp:201-225), and the reason.

    llama.cpp's CPU threads meet at a barrier after every graph node (ggml/src/ggml-cpu/ggml-cpu.c: ggml_barrier),
    so a thread waiting for a core another process holds stalls all of them, every node: on a 2-core machine with a
    load of 8, ``-t 2`` generated 0.7 tok/s where ``-t 1`` generated 12
    (bench_results/w2-qwen35moe/cpu-amd-epyc/threads-llama-bench.md), and the plan measured ×9.5-15 llama-server's
    defaults in generation, ×1.4-1.6 in prompts (20261201T234440119948Z.json there). The plan takes the cores left
    free (at least one); a quiet machine keeps the default."""
    phys = hardware.cpu_physical_cores
    busy = hardware.cpu_busy_logical * phys / max(hardware.cpu_logical_cores, 1)
    n = max(1, int(phys - busy + 0.5))
    if n >= phys:
        return None, None
    return n, (f"--threads {n}: other work keeps {busy:.1f} of this machine's {phys} cores busy (measured when "
               f"planning); llama.cpp's threads wait for each other after every operation, so one that waits for a "
               f"busy core stalls them all (llama-server's default: all {phys})")


def _runs_on_cpu(opt: _Option) -> bool:
    return opt.budget.cpu_only or opt.experts_on_cpu > 0 or opt.flags.n_gpu_layers is not None


def _to_plan(opt: _Option, reasons: tuple[str, ...], wishes: Wishes, native: int, threads: int | None = None
             ) -> Plan:
    extra: tuple[str, ...] = ()
    if opt.estimate.n_ctx_seq > native:
        scale = -(-opt.estimate.n_ctx_seq // native)
        extra = (*FLAGS["rope_scaling"].to_args("yarn"), *FLAGS["rope_scale"].to_args(scale),
                 *FLAGS["yarn_orig_ctx"].to_args(native))
    if threads is not None and _runs_on_cpu(opt):
        extra += tuple(FLAGS["threads"].to_args(threads))
    return Plan(opt.candidate, opt.flags, opt.estimate, opt.budget, opt.predicted, reasons, wishes.vision, extra,
                mmproj_offload=wishes.mmproj_offload)


def _rule(w: Wishes, best: _Option, choice: policy.Choice | None) -> str:
    """The rule ``w.prefer`` follows, as the first reason (and the JSON's ``policy.rule``) says it."""
    if choice is not None:
        return policy.rule_text(choice)
    rule = {
        "speed": (f"the fastest predicted generation among quants of at least {SPEED_MIN_BITS_PER_WEIGHT:g} bits/"
                  f"weight, counting plans within {SPEED_TOLERANCE:.0%} as equal and then taking the best quality"),
        "quality": (f"the best quality among plans at least a third as fast as the fastest plan of at least "
                    f"{SPEED_MIN_BITS_PER_WEIGHT:g} bits/weight"),
        "context": "the most context, then the speed rule",
    }[w.prefer]
    if w.prefer != "context" and best.bpw < SPEED_MIN_BITS_PER_WEIGHT:
        rule += f" (no quant of {SPEED_MIN_BITS_PER_WEIGHT:g} bits/weight or more fits)"
    return rule


def _experts_in_ram(n_layers: int, budget: Budget) -> str:
    """What an option with experts of ``n_layers`` layers in RAM needs, in the flags that do it: ``--n-cpu-moe`` on
    one GPU; on several devices, per-device ``--override-tensor`` rules (:mod:`tuner.placement`)."""
    if len(budget.gpu_free_bytes) > 1:
        return f"experts of {n_layers} layers in RAM (--override-tensor)"
    return f"--n-cpu-moe {n_layers}"


def _reasons(best: _Option, best_key: tuple, ranked: Sequence[tuple[_Option, tuple]],
             kv_losers: Sequence[_Option], search: _Search, cap: int, native: int, ub_reason: str | None,
             choice: policy.Choice | None = None, more_ctx: _Option | None = None) -> tuple[str, ...]:
    w = search.wishes
    out: list[str] = []
    lay = best.candidate.layout

    def why(o: _Option, okey: tuple) -> str:
        return policy.why_lost(o, best, choice) if choice else _why_lost(o, okey, best, best_key, w.prefer)

    verb = "keeps" if choice else "takes"
    rule = _rule(w, best, choice).removeprefix("keeps ")
    out.append(f"{best.candidate.quant} ({best.bpw:.2f} bits/weight): --prefer {w.prefer} {verb} {rule}; "
               f"{best.tg:.0f} tok/s predicted")
    b = best.budget
    if b.cpu_only:
        out.append(f"no GPU: everything runs from RAM ({fmt_bytes(b.ram_available_bytes)} available, "
                   f"{fmt_bytes(b.buffer_bytes)} kept free"
                   + (f", {fmt_bytes(b.reserved_bytes)} for the vision encoder's largest image" if b.reserved_bytes
                      else "") + ")")
    else:
        out.append(f"{fmt_bytes(b.buffer_bytes)} of VRAM kept free on every GPU"
                   + (f" ({b.buffer_source})" if b.buffer_source else
                      " (768 MiB of community headroom + 512 MiB of CUDA context and pools llama.cpp does not "
                      "count)" if b.buffer_bytes == DEFAULT_VRAM_BUFFER_BYTES else " (--buffer)")
                   + (f"; {fmt_bytes(b.reserved_bytes)} more "
                      + ("of RAM (the projector on the CPU) " if b.reserved_device(best.estimate) == CPU
                         else f"on {b.reserved_device(best.estimate)} " if len(b.gpu_free_bytes) > 1 else "")
                      + "for the vision encoder's largest image" if b.reserved_bytes else ""))
        n = best.experts_on_cpu
        if best.flags.n_gpu_layers is not None:
            out.append(f"--n-gpu-layers {best.flags.n_gpu_layers}: even with every expert in RAM the model does "
                       f"not fit, so {lay.n_layer_all + 1 - best.flags.n_gpu_layers} layers run on the CPU")
        elif len(b.gpu_free_bytes) > 1:
            out.append(placement_reason(best.candidate.layout, best.flags, search.devices, best.floor))
        elif n == 0:
            out.append("every layer, expert and cache on the GPU")
        else:
            out.append(f"--n-cpu-moe {n}: the fewest expert layers in RAM that fit {best.floor} tokens of context "
                       f"({n} × {fmt_bytes(lay.expert_bytes_by_layer().get(0, 0))}); attention, DeltaNet, shared "
                       f"experts, router, output head, KV cache and recurrent state stay on the GPU")
            on_gpu = [o for o, _ in ranked if o.experts_on_cpu == 0]
            if on_gpu:
                o = max(on_gpu, key=lambda x: (x.quant_quality, x.tg))
                if o.candidate is not best.candidate:
                    okey = next(k for x, k in ranked if x is o)
                    out.append(f"kept {best.candidate.quant} with experts in RAM rather than drop to "
                               f"{o.candidate.quant}, which fits entirely on the GPU: "
                               + why(o, okey))
            else:
                out.append("no quant fits entirely on the GPU with that context, so experts are offloaded")
        bigger = [o for o, _ in ranked if o.quant_quality > best.quant_quality]
        if bigger:
            step = min(o.quant_quality for o in bigger)
            o = max((x for x in bigger if x.quant_quality == step), key=lambda x: x.tg)
            if o.experts_on_cpu > n:
                need = _experts_in_ram(o.experts_on_cpu, b)
                out.append(f"{o.candidate.quant}, the next better quant, would need {need} here: {o.tg:.0f} vs "
                           f"{best.tg:.0f} tok/s")
    if w.ctx_size is not None:
        out.append(f"context {best.ctx} per slot, as asked")
    elif best.ctx >= cap:
        out.append(f"context {best.ctx}: the model's native maximum" if cap == native
                   else f"context {best.ctx} with YaRN")
    else:
        out.append(f"context {best.ctx}: the largest that fits with this placement (native {native})"
                   + (f"; {more_ctx.ctx} would need {_experts_in_ram(more_ctx.experts_on_cpu, b)} and predict "
                      f"{more_ctx.tg:.0f} tok/s" + (f", outside the {policy.SPEED_WINDOW:.0%} window"
                                                    if choice and not choice.in_window(more_ctx) else
                                                    ", for no higher context tier")
                      if more_ctx else ""))
    alt = next(iter(kv_losers), None)
    if w.cache_type:
        out.append(f"KV cache {best.kv}, as asked")
    elif choice is not None:
        out.append(policy.kv_reason(best, alt, choice))
    elif alt is None:
        out.append(f"KV cache {best.kv}: the only type that fits")
    elif best.kv_quality > alt.kv_quality:
        out.append(f"KV cache {best.kv}: " + _kv_why_lost(alt, best, w.prefer))
    else:
        why = (f"reaches {best.ctx} tokens where {alt.kv} reaches {alt.ctx}" if best.ctx > alt.ctx
               else f"{best.tg:.0f} vs {alt.tg:.0f} tok/s with {alt.kv}, which needs experts of "
                    f"{alt.experts_on_cpu} layers in RAM")
        out.append(f"KV cache {best.kv}: {why}" + ("" if b.cpu_only else
                                                  " (on CUDA it also costs an f16 conversion buffer, counted)"))
    if ub_reason:
        out.append(ub_reason)
    vision = best.estimate.vision
    if vision is not None:
        out.append(f"vision: {vision['file'] or 'the projector'} on {vision['device']}, "
                   f"{fmt_bytes(vision['weights_bytes'])} of weights and a {fmt_bytes(vision['compute_bytes'])} "
                   f"compute buffer (sized from its {vision['sized_from']}), counted in the memory estimate")
    cal = search.calibration.describe(search.hardware) if search.calibration else None
    if cal:
        out.append(f"{cal}: memory and speed corrected by what llama.cpp reported and what was measured "
                   "(tuner profile show; cleared by tuner profile reset)")
    if w.parallel == 1:
        state = fmt_bytes(lay.recurrent_bytes_per_seq())
        checkpoints = best.flags.ctx_checkpoints
        out.append(f"--parallel 1: every extra slot costs a {state} recurrent state and up to {checkpoints} "
                   "checkpoints of that size, all in RAM" if b.cpu_only else
                   f"--parallel 1: every extra slot costs a {state} recurrent state in VRAM and up to "
                   f"{checkpoints} checkpoints of that size in RAM")
    else:
        out.append(f"--parallel {w.parallel} with separate caches: every slot is guaranteed {best.ctx} tokens")
    out.extend(best.host_notes)
    return tuple(out)


# ---------------------------------------------------------------------------------------------- entry point


def plan_for(model_ref: str | None, hardware: Hardware, wishes: Wishes, *, measured: Measured | None = None,
             on_progress: ProgressFn | None = None, calibration: Calibration | None = None) -> Recommendation:
    """Plan for a model reference as the CLI takes it (None = the Qwen3.5-35B-A3B card's quant ladder, offline):
    the one planning entry ``recommend``, ``serve`` and ``bench`` share. With ``--vision`` the projector's header is
    read (:func:`tuner.models.read_projector`), so its real tensors and encoder are sized."""
    candidates = resolve_candidates(model_ref, on_progress)
    if wishes.vision:
        candidates = [replace(c, projector=read_projector(c)) if c.mmproj else c for c in candidates]
    return recommend(candidates, hardware, wishes, measured=measured, calibration=calibration)
