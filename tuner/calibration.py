"""``tuner calibrate``: measure this machine for a model before downloading it.

A model's real shape and tensor types (a card's quant, a Hub header, a local file's header) are written as a sparse
GGUF, its **twin** (:func:`tuner.synth.spec_from_layout`, zero-filled: every byte a hole, except random token
embeddings and routers so tokens route over the experts as in a real model; docs/calibration.md has the figures
behind that). llama.cpp loads it as it would the real file — same buffers, same bytes read per token — so a short
**ladder** of real llama-server launches (``--fit off -lv 4``, :func:`ladder`) answers what no estimate can:

* what llama.cpp reports per buffer and device (:mod:`tuner.serverlog`), against the pure estimate: memory points;
* on a GPU, what NVML says the process holds after load and a first request (the CUDA context and pools no buffer
  line counts): the same points' ``process_bytes``;
* tg and pp at two depths, measured by tuner bench's own code (:func:`tuner.bench.measure_once`), against the speed
  model's prediction: speed points.

The points go into the profile store (:meth:`tuner.profile_store.ProfileStore.add_points`), where
:func:`tuner.profile_store.load_calibration` gives them to every later plan and estimate (the correction model is
:mod:`tuner.corrections`'s); :func:`tuner.calibration_file.export_document` makes the shareable file.

Safe on a busy machine: it refuses (one line) when other processes hold more than :data:`BUSY_FRACTION` of a GPU's
memory, never leaves a server running (each rung's server is stopped before the next starts, and on any failure or
Ctrl-C), and deletes its twin (a temporary folder under the cache directory) however it ends. Nothing here prints:
progress goes to ``on_progress`` as :class:`Progress` values, with an estimated time left.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tuner.bench import BenchConfig, PromptSource, ServerPool, capacity_ok, flagset_from_flags, measure_once, ready
from tuner.build import LlamaBuild, obtain_build
from tuner.build import ProgressFn as BuildProgressFn
from tuner.corrections import (
    MEMORY_KINDS,
    MemoryPoint,
    SpeedPoint,
    corrected_estimate,
    hardware_label,
    memory_points,
    placement_class,
    shape_id,
)
from tuner.devices import CPU
from tuner.errors import TunerError
from tuner.estimate import kv_cache_type_supported
from tuner.flags import FLAGS, ServerFlags
from tuner.hardware import Hardware, NvmlApi, gpu_split, read_gpus
from tuner.layout import ModelLayout
from tuner.models import QuantCandidate, resolve_candidates
from tuner.paths import cache_dir
from tuner.planner import Budget, Wishes, budget_for, fits, recommend
from tuner.serve import gpu_process_bytes, gpus_for_build, nvml_view
from tuner.serverlog import parse_load_log
from tuner.speed import predict_speed
from tuner.units import GiB, fmt_bytes

BUSY_FRACTION = 0.5
"""Refuse when other processes hold more than this fraction of a GPU's memory."""
BUSY_CPU_LOAD_PER_CORE = 1.0
"""A CPU whose 1-minute load average (before the ladder starts) exceeds this many runnable processes per logical
core is busy: speeds measured on it (CPU-only plans, experts in RAM) say more about the other processes than about
the machine, so they are reported but not recorded. Buffer sizes do not depend on load and are recorded."""
TWIN_WEIGHTS = "zeros+routing"
SERVER_ARGS: tuple[str, ...] = (*FLAGS["fit"].to_args("off"), *FLAGS["verbosity"].to_args(4))
"""What every rung's llama-server gets beyond its flags: the rung is already placed (llama.cpp's fit would change
it), and the buffer lines are INFO (verbosity 4, see :mod:`tuner.serverlog`)."""
QUICK_CONTEXTS = (4096, 32768)
FULL_CONTEXTS = (4096, 16384, 65536)
BIG_UBATCH = 2048
LOAD_BYTES_S = 2 * GiB
"""For the time estimate before a rung has run: how fast a sparse twin loads (page-cache zeros copied)."""


@dataclass(frozen=True)
class CalibrateOptions:
    """What ``tuner calibrate`` takes besides the model and the hardware."""

    quick: bool = False
    quant: str | None = None
    server_bin: str | None = None
    depths: tuple[int, ...] | None = None  # None: (0, 2048) quick, (0, 8192) full
    prompt_tokens: int | None = None  # None: 256 quick, 512 full
    gen_tokens: int | None = None  # None: 32 quick, 64 full
    busy_fraction: float = BUSY_FRACTION
    record: bool = True  # add the points to the profile store
    ignore_load: bool = False  # record CPU speeds even when the CPU is busy

    def config(self) -> BenchConfig:
        depths = self.depths or ((0, 2048) if self.quick else (0, 8192))
        return BenchConfig(depths=tuple(depths), repeat=1 if self.quick else 2,
                           prompt_tokens=self.prompt_tokens or (256 if self.quick else 512),
                           gen_tokens=self.gen_tokens or (32 if self.quick else 64), warmup=True)


@dataclass(frozen=True)
class Rung:
    """One launch of the ladder: its flags, and what it varies."""

    name: str
    flags: ServerFlags
    why: str


@dataclass(frozen=True)
class RungResult:
    rung: Rung
    seconds: float
    load_s: float = 0.0
    memory: tuple[MemoryPoint, ...] = ()
    speed: tuple[SpeedPoint, ...] = ()
    reported: dict[str, Any] = field(default_factory=dict)  # kind -> device -> bytes, as llama.cpp reported
    predicted: dict[str, Any] = field(default_factory=dict)  # kind -> device -> bytes, the pure estimate
    failed: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.rung.name, "why": self.rung.why, "flags": self.rung.flags.to_args(),
                "seconds": round(self.seconds, 2), "load_s": round(self.load_s, 2), "failed": self.failed,
                "reported": self.reported, "predicted": self.predicted,
                "speed": [{"depth": p.depth, "tg_tok_s": round(p.tg_tok_s, 2), "pp_tok_s": round(p.pp_tok_s, 2),
                           "tg_predicted_tok_s": round(p.tg_predicted_tok_s, 2),
                           "pp_predicted_tok_s": round(p.pp_predicted_tok_s, 2)} for p in self.speed],
                "process_bytes": {p.id.rsplit(":", 1)[1]: p.process_bytes for p in self.memory
                                  if p.process_bytes is not None},
                "uncounted_bytes": {p.id.rsplit(":", 1)[1]: p.uncounted_bytes for p in self.memory
                                    if p.uncounted_bytes is not None}}


@dataclass(frozen=True)
class Progress:
    """Where a calibration is: ``done`` of ``total`` steps (writing the twin, then one per rung), what runs now,
    and the estimated seconds left (None before anything can be estimated)."""

    done: int
    total: int
    line: str
    eta_s: float | None = None


ProgressFn = Callable[[Progress], None]


@dataclass(frozen=True)
class CalibrationReport:
    model: str
    quant: str
    shape: str
    shapes: dict[str, dict[str, Any]]
    hardware: str
    build: LlamaBuild
    twin_file_bytes: int
    twin_disk_bytes: int
    rungs: tuple[RungResult, ...]
    skipped: tuple[str, ...]
    seconds: float
    recorded: int
    run_id: str
    notes: tuple[str, ...] = ()
    load_before: float | None = None
    kept: tuple[MemoryPoint | SpeedPoint, ...] = ()  # the points recorded (or to record): all but busy-CPU speeds

    @property
    def points(self) -> list[MemoryPoint | SpeedPoint]:
        return list(self.kept)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "quant": self.quant, "shape": self.shape, "hardware": self.hardware,
                "build": {"commit": self.build.commit, "cuda": self.build.cuda}, "run_id": self.run_id,
                "twin": {"file_bytes": self.twin_file_bytes, "disk_bytes": self.twin_disk_bytes,
                         "weights": TWIN_WEIGHTS},
                "seconds": round(self.seconds, 1), "recorded_points": self.recorded,
                "load_average_before": self.load_before, "notes": list(self.notes),
                "rungs": [r.to_dict() for r in self.rungs], "skipped": list(self.skipped)}


# ------------------------------------------------------------------------------------------------- safety


def check_gpus_idle(hardware: Hardware, nvml: NvmlApi | None = None, fraction: float = BUSY_FRACTION) -> None:
    """Refuse (TunerError, one line) when other processes hold more than ``fraction`` of a detected GPU's memory:
    the measurements would be wrong and the ladder could push them out of memory."""
    detected = {g.index for g in hardware.gpus if g.source == "nvml"}
    if not detected:
        return
    for g in read_gpus(nvml)[0]:
        if g.index in detected and g.vram_total_bytes and g.vram_used_bytes > fraction * g.vram_total_bytes:
            raise TunerError(f"GPU {g.index} ({g.name}) is busy: {fmt_bytes(g.vram_used_bytes)} of "
                             f"{fmt_bytes(g.vram_total_bytes)} in use by other processes; calibrate needs it to "
                             "itself", hint="stop what runs there (nvidia-smi lists it) and try again")


# ------------------------------------------------------------------------------------------------- the ladder


def _fit(layout: ModelLayout, flags: ServerFlags, hardware: Hardware, budget: Budget) -> ServerFlags | None:
    """``flags`` as they are when they fit the budget; on a GPU, with the fewest expert layers in RAM that do
    (MoE only); None when nothing fits."""

    def ok(f: ServerFlags) -> bool:
        return fits(corrected_estimate(layout, f, hardware), budget)

    if ok(flags):
        return flags
    if budget.cpu_only or not layout.is_moe or not ok(flags.with_(n_cpu_moe=layout.n_layer)):
        return None
    lo, hi = flags.n_cpu_moe, layout.n_layer  # lo fails, hi fits
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(flags.with_(n_cpu_moe=mid)):
            hi = mid
        else:
            lo = mid
    return flags.with_(n_cpu_moe=hi)


def ladder(layout: ModelLayout, hardware: Hardware, budget: Budget, *, quick: bool) -> tuple[list[Rung], list[str]]:
    """The rungs to launch, each placed to fit (see the module doc), and a line per rung left out.

    Contexts (:data:`QUICK_CONTEXTS` / :data:`FULL_CONTEXTS`, capped at the model's native context) with an f16
    cache at ubatch 512; a q8_0 cache at the larger context(s); a 2048 ubatch at the smallest (and, full, the
    largest) context; on a GPU with a MoE, one (quick) or two more ``--n-cpu-moe`` values than the smallest that
    fits, at the smallest context."""
    contexts = sorted({min(c, layout.n_ctx_train) for c in (QUICK_CONTEXTS if quick else FULL_CONTEXTS)})
    small, large = contexts[0], contexts[-1]
    base = ServerFlags(parallel=1, flash_attn="on", batch_size=2048, ubatch_size=512, cache_ram_mib=0,
                       n_gpu_layers=0 if hardware.cpu_only else None)
    wanted: list[tuple[str, ServerFlags, str]] = []
    for c in contexts:
        wanted.append((f"ctx{c}-f16", base.with_(ctx_size=c), f"context {c}, f16 KV, ubatch 512"))
    if kv_cache_type_supported(layout, "q8_0"):
        for c in (contexts[-1:] if quick else contexts[1:]):
            wanted.append((f"ctx{c}-q8_0", base.with_(ctx_size=c, cache_type_k="q8_0", cache_type_v="q8_0"),
                           f"context {c}, q8_0 KV"))
    for c in ((small,) if quick else tuple(dict.fromkeys((small, large)))):
        wanted.append((f"ctx{c}-ubatch{BIG_UBATCH}", base.with_(ctx_size=c, ubatch_size=BIG_UBATCH),
                       f"context {c}, ubatch {BIG_UBATCH}"))
    rungs: list[Rung] = []
    skipped: list[str] = []
    for name, flags, why in wanted:
        placed = _fit(layout, flags, hardware, budget)
        if placed is None:
            skipped.append(f"{name} ({why}): does not fit here")
            continue
        if placed.n_cpu_moe != flags.n_cpu_moe:
            why += f", --n-cpu-moe {placed.n_cpu_moe} to fit"
        rungs.append(Rung(name, placed, why))
    if not budget.cpu_only and layout.is_moe and rungs:
        first = rungs[0].flags
        steps = (max(1, layout.n_layer // 4),) if quick else (max(1, layout.n_layer // 4), layout.n_layer)
        for n in sorted({min(first.n_cpu_moe + s, layout.n_layer) for s in steps}):
            rungs.append(Rung(f"ctx{small}-moe-cpu{n}", first.with_(n_cpu_moe=n),
                              f"context {small}, experts of {n} layers in RAM"))
    return rungs, skipped


# ------------------------------------------------------------------------------------------------- the run


def _twin(layout: ModelLayout, folder: Path) -> Path:
    """Write the sparse twin of ``layout`` into ``folder`` (the writer, numpy and gguf, are imported only here)."""
    from tuner.synth import layout_type_for, spec_from_layout, write_synthetic_gguf

    spec = spec_from_layout(layout, random_roles=frozenset({"embd", "router"}))
    (path,) = write_synthetic_gguf(folder / "twin.gguf", spec, type_for=layout_type_for(layout))
    return path


def shape_summary(layout: ModelLayout) -> dict[str, Any]:
    """The widths a shape id stands for (for the export file; no names or paths)."""
    return {"arch": layout.arch, "n_layer": layout.n_layer, "n_layer_all": layout.n_layer_all,
            "n_embd": layout.n_embd, "n_vocab": layout.n_vocab, "n_head": layout.n_head_attn,
            "n_head_kv": layout.n_head_kv_attn, "head_k": layout.head_k,
            "attention_layers": len(layout.attention_layers), "recurrent_layers": len(layout.recurrent_layers),
            "n_expert": layout.n_expert, "n_expert_used": layout.n_expert_used, "n_ff_exp": layout.n_ff_exp,
            "n_ff": layout.n_ff}


def _prior_seconds(layout: ModelLayout, rung: Rung, hardware: Hardware, cfg: BenchConfig) -> float:
    """A guess of one rung's seconds before any ran: loading the twin, then the speed model's time for the
    requests (each depth filled once, then a prompt and a generation)."""
    pred = predict_speed(layout, rung.flags, hardware, gpu_split=gpu_split(hardware))
    pp = max(pred.pp_tok_s, 1.0)
    tg = max(pred.tg_tok_s, 0.1)
    per_depth = (sum(d for d in cfg.depths) + cfg.repeat * len(cfg.depths) * cfg.prompt_tokens) / pp \
        + cfg.repeat * len(cfg.depths) * cfg.gen_tokens / tg
    return 2.0 + layout.weights_bytes / LOAD_BYTES_S + per_depth


def pick_candidate(model_ref: str | None, hardware: Hardware, quant: str | None) -> QuantCandidate:
    """The quant to calibrate: ``quant`` if given, else the one ``tuner recommend`` would plan (the best quality
    when nothing fits: the ladder then says which rungs do not)."""
    candidates = resolve_candidates(model_ref)
    if quant:
        chosen = [c for c in candidates if c.quant.lower() == quant.lower()]
        if not chosen:
            raise TunerError(f"no quant {quant!r} for this model; known: " + ", ".join(c.quant for c in candidates))
        return chosen[0]
    if len(candidates) == 1:
        return candidates[0]
    try:
        return recommend(candidates, hardware, Wishes()).plan.candidate
    except TunerError:
        return candidates[0]


def run_calibration(model_ref: str | None, hardware: Hardware, options: CalibrateOptions | None = None, *,
                    on_progress: ProgressFn | None = None, on_build_progress: BuildProgressFn | None = None,
                    nvml: NvmlApi | None = None, store: Any | None = None) -> CalibrationReport:
    """Calibrate ``hardware`` for a model (see the module doc); the points go into ``store`` (default the user's
    profile store) unless ``options.record`` is off."""
    opts = options or CalibrateOptions()
    started = time.monotonic()
    say = on_progress or (lambda _p: None)
    check_gpus_idle(hardware, nvml, opts.busy_fraction)
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    cpu_busy = (load_before is not None and not opts.ignore_load
                and load_before > BUSY_CPU_LOAD_PER_CORE * max(hardware.cpu_logical_cores, 1))
    candidate = pick_candidate(model_ref, hardware, opts.quant)
    layout = candidate.layout
    budget = budget_for(hardware, Wishes())
    rungs, skipped = ladder(layout, hardware, budget, quick=opts.quick)
    if not rungs:
        raise TunerError(f"{layout.name or 'the model'} {candidate.quant}: no rung of the calibration ladder fits "
                         "this machine (" + "; ".join(skipped) + ")")
    build, _cached = obtain_build(server_bin=opts.server_bin, gpus=gpus_for_build(hardware),
                                  on_progress=on_build_progress)
    if hardware.cpu_only and build.cuda:
        raise TunerError("--gpu none with a CUDA build of llama-server would still use the GPU; "
                         "give --server-bin a CPU build")
    if not hardware.cpu_only and not build.cuda:
        raise TunerError(f"{build.server_bin} was built without CUDA, so it cannot calibrate the GPU",
                         hint="install the CUDA toolkit and run tuner build --cuda, or calibrate the CPU: --gpu none")
    cfg = opts.config()
    total = len(rungs) + 1
    priors = [_prior_seconds(layout, r, hardware, cfg) for r in rungs]
    say(Progress(0, total, f"writing the sparse twin of {layout.name or 'the model'} {candidate.quant} "
                           f"({fmt_bytes(layout.weights_bytes)} of weights)", sum(priors)))
    run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    base = cache_dir() / "calibrate"
    base.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="twin-", dir=base))
    results: list[RungResult] = []
    try:
        twin = _twin(layout, folder)
        st = os.stat(twin)
        twin_bytes, twin_disk = st.st_size, st.st_blocks * 512
        for i, rung in enumerate(rungs):
            ran = [r.seconds for r in results]
            left = (sum(ran) / len(ran)) * (len(rungs) - i) if ran else sum(priors[i:])
            say(Progress(i + 1, total, f"{rung.name}: {rung.why}", left))
            results.append(_run_rung(rung, i, run_id, twin, folder, layout, hardware, build, cfg, nvml))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    say(Progress(total, total, "done", 0.0))
    points = [p for r in results for p in (*r.memory, *r.speed)]
    if not points:
        failures = "; ".join(f"{r.rung.name}: {r.failed}" for r in results if r.failed)
        raise TunerError(f"no rung of the calibration loaded: {failures}")
    notes = []
    if cpu_busy:
        dropped = [p for p in points if isinstance(p, SpeedPoint) and p.placement in ("cpu", "experts_in_ram")]
        points = [p for p in points if p not in dropped]
        if dropped:
            notes.append(f"the CPU was busy (load average {load_before:.1f} on {hardware.cpu_logical_cores} cores "
                         f"before the run): {len(dropped)} speed measurements of CPU work are shown but not recorded "
                         "(--ignore-load records them)")
    recorded = 0
    if opts.record:
        from tuner.profile_store import ProfileStore

        recorded = (store or ProfileStore()).add_points(points)
    return CalibrationReport(
        model=layout.name or candidate.quant, quant=candidate.quant, shape=shape_id(layout),
        shapes={shape_id(layout): shape_summary(layout)}, hardware=hardware_label(hardware), build=build,
        twin_file_bytes=twin_bytes, twin_disk_bytes=twin_disk, rungs=tuple(results), skipped=tuple(skipped),
        seconds=time.monotonic() - started, recorded=recorded, run_id=run_id, notes=tuple(notes),
        load_before=round(load_before, 2) if load_before is not None else None, kept=tuple(points))


def _run_rung(rung: Rung, index: int, run_id: str, twin: Path, folder: Path, layout: ModelLayout,
              hardware: Hardware, build: LlamaBuild, cfg: BenchConfig, nvml: NvmlApi | None) -> RungResult:
    """Launch one rung, read its load log (and NVML), measure its speed, stop it."""
    t0 = time.monotonic()
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    launch = f"calibrate:{run_id}:{index}-{rung.name}"
    fs = flagset_from_flags(rung.name, rung.flags, SERVER_ARGS, origin="calibrate")
    indices = [g.index for g in hardware.gpus if g.source == "nvml"] if build.cuda else []
    free_before = {g.index: g.vram_free_bytes for g in read_gpus(nvml)[0]} if indices else {}
    prompts = PromptSource(seed=cfg.seed + index)
    with ServerPool(build.server_bin, twin, log_dir=folder / "logs") as pool:
        try:
            live = ready(pool, prompts, cfg, fs)
        except TunerError as exc:
            return RungResult(rung, time.monotonic() - t0, failed=exc.one_line())
        reported = parse_load_log(live.server.log_text())
        view = nvml_view(live.server.pid or 0, indices, free_before, nvml) if indices else None
        speed: list[SpeedPoint] = []
        for rep, (di, depth) in ((r, d) for r in range(cfg.repeat) for d in enumerate(cfg.depths)):
            if not capacity_ok(live, depth, cfg):
                continue
            s = measure_once(live, prompts, cfg, depth=depth, repeat=rep, seq=len(speed),
                             key=("calibrate", index, di, rep))
            pred = predict_speed(layout, rung.flags, hardware, gpu_split=gpu_split(hardware),
                                 depth_tokens=max(depth, 1))
            speed.append(SpeedPoint(
                id=f"{launch}:d{depth}r{rep}", hardware=hardware_label(hardware), build=build.commit, cuda=build.cuda,
                shape=shape_id(layout), placement=placement_class(layout, rung.flags, hardware),
                flags=tuple(rung.flags.to_args()), depth=depth, tg_tok_s=s.tg_tok_s, pp_tok_s=s.pp_tok_s,
                tg_predicted_tok_s=pred.tg_tok_s, pp_predicted_tok_s=pred.pp_tok_s, weights=TWIN_WEIGHTS,
                source="calibrate", observed_at=stamp))
        load_s = pool.launches[-1].load_s if pool.launches else 0.0
    pure = corrected_estimate(layout, rung.flags, hardware)
    by_kind = {k: dict(reported.by_kind(k)) for k in MEMORY_KINDS}
    if reported.repacked_bytes:
        by_kind["weights"][CPU] = by_kind["weights"].get(CPU, 0) - reported.repacked_bytes
    memory = memory_points(id_prefix=launch, estimate=pure, reported=by_kind, layout=layout, flags=rung.flags,
                           hardware=hardware, build=build.commit, cuda=build.cuda,
                           process_bytes=gpu_process_bytes(view, hardware), source="calibrate", observed_at=stamp)
    predicted = {k: {d.name: int(getattr(d, f"{k}_bytes")) for d in pure.devices if getattr(d, f"{k}_bytes")}
                 for k in MEMORY_KINDS}
    failed = None if reported.loaded else "the load log has no buffer sizes"
    return RungResult(rung, time.monotonic() - t0, load_s, tuple(memory), tuple(speed), by_kind, predicted, failed)

