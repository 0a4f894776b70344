"""Corrections: what llama.cpp reported and what was measured on a machine, applied above the pure estimate and the
speed model.

:mod:`tuner.estimate` stays llama.cpp's arithmetic and :mod:`tuner.speed` its fitted model; this module holds the
observations that correct them (**points**, written by ``tuner serve`` and ``tuner calibrate``, kept in the profile
store, :mod:`tuner.profile_store`, or shipped as calibration files, :mod:`tuner.calibration_file`) and the one
function that applies them to an estimate, :func:`corrected_estimate`, which the planner and ``tuner estimate`` both
call. Nothing here reads or writes files.

The correction model — what is scaled or added, per which key:

* **Compute buffer, scaled.** A :class:`MemoryPoint` is one device of one launch: the pure estimate's compute buffer
  on it and the one llama.cpp reported (``sched_reserve: <buf> compute buffer size``). For a device model (a GPU as
  NVML names it; ``CPU: <cpu model>`` for a CPU-only run) and a llama.cpp build, the corrected compute buffer is
  ``round(predicted × s)``, ``s`` = the median of ``reported / predicted`` over the points of the same model shape
  (:func:`shape_id`: the widths and layer pattern, not the tensor types) and ubatch; without those, of the same shape
  at any ubatch; without those, of every shape on that device (each scope is named in the note). The host's compute
  buffer in a GPU run (pinned inputs, a few MiB) is not corrected.
* **Uncounted GPU memory, added to the buffer the planner keeps.** What NVML says the server process holds on a GPU
  after load and a first request, less every buffer llama.cpp reported on it: the CUDA context, cuBLAS workspace and
  memory pools, which no estimate counts. Measured on this machine, the planner keeps ``max(uncounted) +``
  :data:`CALIBRATED_MARGIN_BYTES` free on every GPU instead of its 1280 MiB default
  (:func:`Calibration.buffer_bytes`).
* **Speed, scaled.** A :class:`SpeedPoint` is one measured flag set at one depth with the speed model's prediction
  for it. For a hardware (the GPU models, or the CPU) and build, predictions are multiplied by ``s_tg`` / ``s_pp``,
  the medians of ``measured / predicted`` over the points of the same placement (:func:`placement_class`: all on the
  GPU, experts in RAM, layers on the CPU, CPU only), else over all points. Points measured on a calibration's sparse
  twin (``weights`` ``zeros+routing``) count as they are: see docs/calibration.md for the zero-versus-random figures
  behind that choice.
* **Not corrected:** weights, KV cache, recurrent state and output buffers (llama.cpp's arithmetic, exact to the
  log's print rounding: tests/test_serve.py); the points keep them for comparison only.

Which points apply (:mod:`tuner.profile_store` selects them): this machine's, of the same llama.cpp build ("this
machine"); for a device model this machine has none of, a shipped calibration file's ("shipped").
"""

from __future__ import annotations

import hashlib
import shlex
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from tuner import records as rec
from tuner.devices import CPU
from tuner.estimate import MemoryEstimate, estimate_memory
from tuner.flags import ServerFlags
from tuner.hardware import Hardware, gpu_split
from tuner.layout import ModelLayout
from tuner.placement import devices_of
from tuner.speed import Prediction
from tuner.units import MiB, fmt_bytes
from tuner.vision import Projector

MEMORY_KINDS: tuple[str, ...] = ("weights", "kv", "recurrent", "compute")
CALIBRATED_MARGIN_BYTES = 512 * MiB
"""Kept free on a calibrated GPU beyond the uncounted memory measured there: pools grow past what one request
allocated (longer prompts, more slots in use), and other programs open CUDA contexts too."""
LOCAL = "this machine"
SHIPPED = "shipped"
PLACEMENTS: tuple[str, ...] = ("gpu", "experts_in_ram", "layers_on_cpu", "cpu")


# ----------------------------------------------------------------------------------------------------- keys


def shape_id(layout: ModelLayout) -> str:
    """The model shape a compute buffer depends on (widths, heads, layer pattern, experts, vocabulary), not its
    tensor types: every quant of a model, and its sparse twin, share it. ``qwen35moe-40L-2048e-<8 hex>``."""
    parts = (layout.arch, layout.n_layer, layout.n_layer_all, layout.n_embd, layout.n_vocab, layout.n_head,
             layout.n_head_kv, layout.head_k, layout.head_v, layout.attention_layers, layout.recurrent_layers,
             layout.ssm_d_conv, layout.ssm_d_inner, layout.ssm_d_state, layout.ssm_n_group, layout.ssm_dt_rank,
             layout.n_expert, layout.n_expert_used, layout.n_ff_exp, layout.n_ff_shexp, layout.n_ff,
             layout.tied_embeddings)
    digest = hashlib.sha256(repr(parts).encode()).hexdigest()[:8]
    return f"{layout.arch}-{layout.n_layer}L-{layout.n_embd}e-{digest}"


def cpu_device(cpu_model: str) -> str:
    """The device name of a CPU-only run's points."""
    return f"CPU: {cpu_model}"


def device_model(llama_name: str, hardware: Hardware) -> str | None:
    """The device model whose points correct llama.cpp's device ``llama_name`` (``CUDA0``, ``CPU``) on
    ``hardware``: the GPU's name, ``CPU: <model>`` without GPUs; None for the host of a GPU run and for an RPC
    worker's device (another machine, whose card RPC does not name)."""
    if llama_name == CPU:
        return cpu_device(hardware.cpu_model) if hardware.cpu_only else None
    return next((g.name for g in hardware.local_gpus if g.llama_name == llama_name), None)


def hardware_label(hardware: Hardware) -> str:
    """The hardware speed points belong to: the GPU models in order, or ``CPU: <model>``."""
    return " + ".join(g.name for g in hardware.gpus) if hardware.gpus else cpu_device(hardware.cpu_model)


def placement_class(layout: ModelLayout, flags: ServerFlags, hardware: Hardware) -> str:
    """Where a plan computes (one of :data:`PLACEMENTS`): speeds scale differently on each."""
    if hardware.cpu_only or flags.n_gpu_layers == 0:
        return "cpu"
    if flags.n_gpu_layers is not None and 0 < flags.n_gpu_layers <= layout.n_layer_all:
        return "layers_on_cpu"
    if layout.is_moe and (flags.cpu_moe or flags.n_cpu_moe > 0):
        return "experts_in_ram"
    return "gpu"


# ----------------------------------------------------------------------------------------------------- points


def _args(value: Any) -> tuple[str, ...]:
    """Flags as stored (one shell-quoted string) or as a list."""
    if isinstance(value, str):
        return tuple(shlex.split(value))
    return tuple(str(a) for a in value or ())


def _int_map(d: Any) -> dict[str, int]:
    return {str(k): int(v) for k, v in (d or {}).items() if isinstance(v, int | float) and not isinstance(v, bool)}


def _flags_text(value: Any, where: str) -> Any:
    """A point's flags: one shell-quoted string (as written), or a list of arguments."""
    if isinstance(value, str):
        return rec.string(8192)(value, where)
    return rec.seq_of(rec.string(4096), 1024)(value, where)


_TEXT, _WHEN, _TOK_S = rec.string(1024), rec.string(64), rec.number(0.0, 1e9)
_BYTES = rec.integer(-(1 << 62), 1 << 62)  # differences are negative
_POINT_BYTES = rec.map_of(_BYTES, 16)
_maybe, _or = rec.maybe, rec.field
# A stored point (MemoryPoint and SpeedPoint, both kinds in one record), wherever it is read (the profile, an
# observation file, a calibration file): every field their from_dict reads, checked before it does (tuner.records).
POINT = rec.record(
    kind=rec.string(32), id=_or(rec.string(512), ""), build=_or(rec.string(128), ""), cuda=_or(rec.boolean(), False),
    shape=_or(rec.string(512), ""), flags=_or(_flags_text, ""), source=_or(rec.string(64), ""),
    observed_at=_or(_WHEN, ""), device=_or(_TEXT, ""), driver=_maybe(rec.string(128)),
    n_ubatch=_or(rec.integer(0, 1 << 31), 0), predicted=_or(_POINT_BYTES, {}), reported=_or(_POINT_BYTES, {}),
    process_bytes=_maybe(_BYTES), hardware=_or(_TEXT, ""), placement=_or(rec.string(64), ""),
    depth=_or(rec.integer(0, 1 << 40), 0), tg_tok_s=_or(_TOK_S, 0.0), pp_tok_s=_or(_TOK_S, 0.0),
    tg_predicted_tok_s=_or(_TOK_S, 0.0), pp_predicted_tok_s=_or(_TOK_S, 0.0), weights=_or(rec.string(64), "real"))


@dataclass(frozen=True)
class MemoryPoint:
    """One device of one llama-server launch: the pure estimate's bytes per kind on it, and llama.cpp's."""

    id: str  # unique per launch and device: "serve:<observation key>:CUDA0", "calibrate:<run>:<rung>:CPU"
    device: str  # device_model(): the GPU's name, or "CPU: <cpu model>"
    build: str  # llama.cpp commit
    cuda: bool
    shape: str  # shape_id()
    n_ubatch: int
    flags: tuple[str, ...]  # ServerFlags.to_args() of the launch
    predicted: Mapping[str, int]  # kind (weights, kv, recurrent, compute) -> bytes, the pure estimate
    reported: Mapping[str, int]  # kind -> bytes llama.cpp reported on this device
    process_bytes: int | None = None  # GPU: NVML's memory of the server process on this GPU after load
    source: str = "serve"  # serve | calibrate
    observed_at: str = ""
    driver: str | None = None
    origin: str = LOCAL  # set when read: "this machine", or "shipped <file>"

    @property
    def compute_ratio(self) -> float | None:
        p, r = self.predicted.get("compute", 0), self.reported.get("compute", 0)
        return r / p if p > 0 and r > 0 else None

    @property
    def uncounted_bytes(self) -> int | None:
        """NVML's figure less every buffer llama.cpp reported on the device (GPU points only)."""
        if self.process_bytes is None or self.process_bytes <= 0:
            return None
        return self.process_bytes - sum(self.reported.get(k, 0) for k in MEMORY_KINDS)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "memory", "id": self.id, "device": self.device, "build": self.build, "cuda": self.cuda,
                "driver": self.driver, "shape": self.shape, "n_ubatch": self.n_ubatch, "flags": shlex.join(self.flags),
                "predicted": dict(self.predicted), "reported": dict(self.reported),
                "process_bytes": self.process_bytes, "source": self.source, "observed_at": self.observed_at}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], origin: str = LOCAL) -> MemoryPoint:
        pb = d.get("process_bytes")
        return cls(id=str(d.get("id", "")), device=str(d.get("device", "")), build=str(d.get("build", "")),
                   cuda=bool(d.get("cuda", False)), shape=str(d.get("shape", "")), n_ubatch=int(d.get("n_ubatch") or 0),
                   flags=_args(d.get("flags")), predicted=_int_map(d.get("predicted")),
                   reported=_int_map(d.get("reported")), process_bytes=int(pb) if isinstance(pb, int) else None,
                   source=str(d.get("source", "")), observed_at=str(d.get("observed_at", "")),
                   driver=d.get("driver"), origin=origin)


@dataclass(frozen=True)
class SpeedPoint:
    """One measured flag set at one depth, with what the speed model predicted for it."""

    id: str
    hardware: str  # hardware_label()
    build: str
    cuda: bool
    shape: str
    placement: str  # placement_class()
    flags: tuple[str, ...]
    depth: int
    tg_tok_s: float
    pp_tok_s: float
    tg_predicted_tok_s: float
    pp_predicted_tok_s: float
    weights: str = "real"  # real | zeros+routing (a calibration's sparse twin)
    source: str = "calibrate"
    observed_at: str = ""
    origin: str = LOCAL

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "speed", "id": self.id, "hardware": self.hardware, "build": self.build, "cuda": self.cuda,
                "shape": self.shape, "placement": self.placement, "flags": shlex.join(self.flags), "depth": self.depth,
                "tg_tok_s": self.tg_tok_s, "pp_tok_s": self.pp_tok_s, "tg_predicted_tok_s": self.tg_predicted_tok_s,
                "pp_predicted_tok_s": self.pp_predicted_tok_s, "weights": self.weights, "source": self.source,
                "observed_at": self.observed_at}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], origin: str = LOCAL) -> SpeedPoint:
        return cls(id=str(d.get("id", "")), hardware=str(d.get("hardware", "")), build=str(d.get("build", "")),
                   cuda=bool(d.get("cuda", False)), shape=str(d.get("shape", "")),
                   placement=str(d.get("placement", "")), flags=_args(d.get("flags")),
                   depth=int(d.get("depth") or 0), tg_tok_s=float(d.get("tg_tok_s") or 0.0),
                   pp_tok_s=float(d.get("pp_tok_s") or 0.0),
                   tg_predicted_tok_s=float(d.get("tg_predicted_tok_s") or 0.0),
                   pp_predicted_tok_s=float(d.get("pp_predicted_tok_s") or 0.0),
                   weights=str(d.get("weights", "real")), source=str(d.get("source", "")),
                   observed_at=str(d.get("observed_at", "")), origin=origin)


def point_from_dict(d: Any, origin: str = LOCAL) -> MemoryPoint | SpeedPoint | None:
    """A stored point by its ``kind``, checked against :data:`POINT`; None for a point that fails it and for a kind
    this tuner does not know (a newer one's). A reader that must say which field is bad validates first."""
    try:
        checked = rec.validate(POINT, d)
    except rec.RecordError:
        return None
    kind = checked["kind"]
    if kind == "memory":
        return MemoryPoint.from_dict(checked, origin)
    if kind == "speed":
        return SpeedPoint.from_dict(checked, origin)
    return None


# ----------------------------------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class DeviceCorrection:
    """The correction of one device model for one shape and ubatch, and how many launches it rests on."""

    device: str
    compute_scale: float | None
    compute_runs: int
    scope: str  # "this shape and ubatch" | "this shape" | "other shapes"
    uncounted_bytes: int | None
    uncounted_runs: int
    origin: str

    def describe(self) -> str:
        parts = []
        if self.compute_scale is not None:
            parts.append(f"compute buffer ×{self.compute_scale:.3f} ({self.scope})")
        if self.uncounted_bytes is not None:
            parts.append(f"{fmt_bytes(self.uncounted_bytes)} of CUDA context and pools measured")
        runs = max(self.compute_runs, self.uncounted_runs)
        return f"{self.device}: " + ", ".join(parts) + f"; calibrated by {runs} run{'s' if runs != 1 else ''} " \
               f"({self.origin})"

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "compute_scale": None if self.compute_scale is None
                else round(self.compute_scale, 4), "compute_runs": self.compute_runs, "scope": self.scope,
                "uncounted_bytes": self.uncounted_bytes, "uncounted_runs": self.uncounted_runs, "origin": self.origin}


@dataclass(frozen=True)
class SpeedScale:
    tg: float
    pp: float
    runs: int
    scope: str  # the placement class, or "all placements"
    origin: str

    def describe(self) -> str:
        return (f"speed ×{self.tg:.2f} tg, ×{self.pp:.2f} pp ({self.scope}; calibrated by {self.runs} "
                f"measurement{'s' if self.runs != 1 else ''}, {self.origin})")


def _median(values: Iterable[float]) -> float | None:
    vals = [v for v in values if v > 0]
    return statistics.median(vals) if vals else None


@dataclass(frozen=True)
class Calibration:
    """The points that apply to one machine and build (see the module doc), and the corrections they give."""

    memory: tuple[MemoryPoint, ...] = ()
    speed: tuple[SpeedPoint, ...] = ()
    _memo: dict[tuple[Any, ...], Any] = field(default_factory=dict, compare=False, repr=False)

    def __bool__(self) -> bool:
        return bool(self.memory or self.speed)

    @property
    def runs(self) -> int:
        """Launches behind the points (ids are ``<launch>:<device or depth>``: one launch gives a point per device
        and per depth)."""
        return len({p.id.rsplit(":", 1)[0] for p in (*self.memory, *self.speed)})

    def device(self, device: str, shape: str, n_ubatch: int) -> DeviceCorrection | None:
        """The correction of ``device`` for ``shape`` at ``n_ubatch`` (None when nothing was measured on it)."""
        key = ("device", device, shape, n_ubatch)
        if key in self._memo:
            return self._memo[key]  # type: ignore[no-any-return]
        pts = [p for p in self.memory if p.device == device]
        found = None
        if pts:
            scale, runs, scope = None, 0, ""
            for scope_name, chosen in (
                    ("this shape and ubatch", [p for p in pts if p.shape == shape and p.n_ubatch == n_ubatch]),
                    ("this shape", [p for p in pts if p.shape == shape]),
                    ("other shapes", pts)):
                ratios = [r for p in chosen if (r := p.compute_ratio) is not None]
                if ratios:
                    scale, runs, scope = statistics.median(ratios), len(ratios), scope_name
                    break
            unc = [u for p in pts if (u := p.uncounted_bytes) is not None]
            origins = sorted({p.origin for p in pts})
            found = DeviceCorrection(device, scale, runs, scope, max(unc) if unc else None, len(unc),
                                     ", ".join(origins))
        self._memo[key] = found
        return found

    def apply(self, estimate: MemoryEstimate, layout: ModelLayout, hardware: Hardware) -> MemoryEstimate:
        """``estimate`` with every device's compute buffer scaled by its correction (see the module doc)."""
        shape = shape_id(layout)
        devices = []
        notes = list(estimate.notes)
        for d in estimate.devices:
            model = device_model(d.name, hardware)
            corr = self.device(model, shape, estimate.n_ubatch) if model and d.compute_bytes else None
            if corr is None or corr.compute_scale is None:
                devices.append(d)
                continue
            devices.append(replace(d, compute_bytes=round(d.compute_bytes * corr.compute_scale)))
            notes.append(f"{d.name} compute buffer ×{corr.compute_scale:.3f}: calibrated by {corr.compute_runs} "
                         f"run{'s' if corr.compute_runs != 1 else ''} ({corr.scope}, {corr.origin})")
        return replace(estimate, devices=tuple(devices), notes=tuple(notes))

    def buffer_bytes(self, hardware: Hardware) -> tuple[int, str] | None:
        """The VRAM to keep free on every GPU when each of ``hardware``'s GPUs has uncounted memory measured on this
        machine: the largest of those plus :data:`CALIBRATED_MARGIN_BYTES`, and a line saying so; else None."""
        if hardware.cpu_only:
            return None
        measured = []
        for g in hardware.gpus:
            unc = [u for p in self.memory if p.device == g.name and p.origin == LOCAL
                   and (u := p.uncounted_bytes) is not None]
            if not unc:
                return None
            measured.append((max(unc), len(unc)))
        most = max(u for u, _ in measured)
        runs = sum(n for _, n in measured)
        return most + CALIBRATED_MARGIN_BYTES, (
            f"calibrated on this machine by {runs} run{'s' if runs != 1 else ''}: {fmt_bytes(most)} of CUDA context "
            f"and pools measured + {fmt_bytes(CALIBRATED_MARGIN_BYTES)} margin")

    def speed_scale(self, hardware: Hardware, placement: str) -> SpeedScale | None:
        """The speed scale of ``hardware`` for a plan of ``placement`` (see the module doc)."""
        key = ("speed", hardware_label(hardware), placement)
        if key in self._memo:
            return self._memo[key]  # type: ignore[no-any-return]
        pts = [p for p in self.speed if p.hardware == key[1] and p.tg_predicted_tok_s > 0 and p.pp_predicted_tok_s > 0]
        same = [p for p in pts if p.placement == placement]
        chosen, scope = (same, placement.replace("_", " ")) if same else (pts, "all placements")
        found = None
        tg = _median(p.tg_tok_s / p.tg_predicted_tok_s for p in chosen)
        pp = _median(p.pp_tok_s / p.pp_predicted_tok_s for p in chosen)
        if tg is not None and pp is not None:
            found = SpeedScale(tg, pp, len(chosen), scope, ", ".join(sorted({p.origin for p in chosen})))
        self._memo[key] = found
        return found

    def rescale(self, prediction: Prediction, layout: ModelLayout, flags: ServerFlags,
                hardware: Hardware) -> Prediction:
        """A roofline ``prediction`` times the speed scale of its hardware and placement (unchanged without one,
        and for a measured one)."""
        if prediction.source != "roofline":
            return prediction
        scale = self.speed_scale(hardware, placement_class(layout, flags, hardware))
        if scale is None:
            return prediction
        return replace(prediction, tg_tok_s=prediction.tg_tok_s * scale.tg, pp_tok_s=prediction.pp_tok_s * scale.pp,
                       efficiency=prediction.efficiency * scale.tg, source="calibrated",
                       notes=(*prediction.notes, scale.describe()))

    def summary(self, hardware: Hardware, shape: str | None = None, n_ubatch: int | None = None) -> dict[str, Any]:
        """What applies on ``hardware`` (for one :func:`shape_id` and ubatch when given): JSON-ready, for the
        commands' output."""
        devices: dict[str, Any] = {}
        names = [g.llama_name for g in hardware.gpus] or [CPU]
        for name in names:
            model = device_model(name, hardware)
            if model is None:
                continue
            corr = self.device(model, shape or "", n_ubatch or 0)
            if corr is not None:
                devices[name] = corr.to_dict()
        buffer = self.buffer_bytes(hardware)
        scale = self.speed_scale(hardware, "cpu" if hardware.cpu_only else "gpu")
        origins = sorted({p.origin for p in (*self.memory, *self.speed)})
        return {"runs": self.runs, "origin": ", ".join(origins), "devices": devices,
                "buffer_bytes": buffer[0] if buffer else None,
                "speed": {"tg_scale": round(scale.tg, 4), "pp_scale": round(scale.pp, 4), "runs": scale.runs,
                          "scope": scale.scope} if scale else None}

    def describe(self, hardware: Hardware) -> str | None:
        """One line for a report: "calibrated on this machine by N runs" (or from a shipped file)."""
        if not self:
            return None
        origins = sorted({p.origin for p in (*self.memory, *self.speed)})
        where = "on this machine" if origins == [LOCAL] else "from " + ", ".join(
            o if o != LOCAL else "this machine" for o in origins)
        n = self.runs
        return f"calibrated {where} by {n} run{'s' if n != 1 else ''}"


def corrected_estimate(layout: ModelLayout, flags: ServerFlags, hardware: Hardware,
                       calibration: Calibration | None = None, *, draft: ModelLayout | None = None,
                       vision: Projector | None = None, mmproj_offload: bool = True) -> MemoryEstimate:
    """The memory estimate on ``hardware``'s GPUs (named and split as llama.cpp does), corrected by
    ``calibration``: the one function the planner and ``tuner estimate`` size memory with (``draft``, ``vision``,
    ``mmproj_offload``: as :func:`tuner.estimate.estimate_memory` takes them)."""
    est = estimate_memory(layout, flags, devices_of(hardware), gpu_split(hardware), draft=draft, vision=vision,
                          mmproj_offload=mmproj_offload)
    return calibration.apply(est, layout, hardware) if calibration else est


def memory_points(*, id_prefix: str, estimate: MemoryEstimate, reported: Mapping[str, Mapping[str, int]],
                  layout: ModelLayout, flags: ServerFlags, hardware: Hardware, build: str, cuda: bool,
                  process_bytes: Mapping[str, int | None] | None = None, source: str, observed_at: str,
                  devices: Sequence[str] | None = None) -> list[MemoryPoint]:
    """The points of one launch: per device that has a device model (GPUs; the CPU of a CPU-only run), the pure
    ``estimate``'s bytes per kind and ``reported`` (kind -> device -> bytes, as :class:`tuner.serverlog.ReportedMemory`
    or a serve observation gives them), and NVML's process memory per device when known."""
    shape = shape_id(layout)
    driver = hardware.local_gpus[0].driver_version if hardware.local_gpus else None
    out = []
    for d in estimate.devices:
        if devices is not None and d.name not in devices:
            continue
        model = device_model(d.name, hardware)
        rep = {k: int(reported.get(k, {}).get(d.name, 0)) for k in MEMORY_KINDS}
        if model is None or not any(rep.values()):
            continue
        out.append(MemoryPoint(
            id=f"{id_prefix}:{d.name}", device=model, build=build, cuda=cuda, shape=shape, n_ubatch=estimate.n_ubatch,
            flags=tuple(flags.to_args()),
            predicted={k: int(getattr(d, f"{k}_bytes")) for k in MEMORY_KINDS}, reported=rep,
            process_bytes=(process_bytes or {}).get(d.name), source=source, observed_at=observed_at,
            driver=driver))
    return out
