"""``tuner bench`` as one library call: plan, fetch, build, measure (or tune), write the results and the chart, learn.

:func:`run_benchmark` is to ``tuner bench`` what :func:`tuner.serve.run_serve` is to ``tuner serve``: the command
line parses options into :class:`BenchOptions`, the hardware and the planner's wishes, calls it, and prints the
:class:`BenchReport`. Progress goes to ``on_progress(line)`` and the build's to ``on_build_progress``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tuner.bench.flagsets import FIT_OFF_ARGS, PLAN_NAME, FlagSet, check_unique_names, defaults_set, flagset_from_flags
from tuner.bench.measure import BenchConfig
from tuner.bench.memory import check_sets_fit, check_slots
from tuner.bench.plot import PlotUnavailable, render_document_png
from tuner.bench.results import bench_document, results_path, timestamp, tune_document, write_json_atomic
from tuner.bench.run import run_bench
from tuner.bench.servers import ProgressFn
from tuner.bench.stats import OBJECTIVES
from tuner.bench.tune import run_tune
from tuner.build import ProgressFn as BuildProgressFn
from tuner.build import obtain_build
from tuner.errors import TunerError
from tuner.fetch import fetch_candidate
from tuner.flags import FLAGS, SPEC_MTP, flag_value
from tuner.hardware import Hardware, HostSpec, hardware_for, rpc_endpoints
from tuner.layout import ModelLayout
from tuner.models import resolve_candidates
from tuner.planner import Plan, Wishes, budget_for, plan_for
from tuner.profile_store import ProfileStore, model_identity
from tuner.replan import replan_from_file
from tuner.serve import gpus_for_build

DEFAULT_OUT_DIR = Path("bench_results")


@dataclass(frozen=True)
class BenchOptions:
    """Everything ``tuner bench`` takes besides the model, the hardware and the planner's wishes. Refuses, when made,
    what can be refused before any work (a bad objective, ``--tune`` with sets, two sets of one name, too few slots
    for the concurrency)."""

    sets: tuple[FlagSet, ...] = ()  # none: the plan against llama-server's defaults
    config: BenchConfig = field(default_factory=BenchConfig)
    tune: bool = False
    tune_depth: int | None = None  # --tune: the context depth to measure at (None: the plan's context)
    dims: tuple[str, ...] | None = None  # --tune: only these dimensions
    objective: str = "both"
    server_bin: str | None = None
    out_dir: Path = DEFAULT_OUT_DIR
    keep_logs: bool = False
    learn: bool = True  # record the results in the profile
    cpu_only: bool = False  # --gpu none: measure the CPU alone (a CUDA build would still use the GPU)

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise TunerError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.tune and self.sets:
            raise TunerError("--tune searches around the plan; leave out --set (or bench the sets without --tune)")
        check_unique_names(self.sets)
        check_slots(self.sets, self.config.concurrency)


@dataclass(frozen=True)
class BenchReport:
    """What :func:`run_benchmark` wrote: the results document and file, the chart (None, with the reason, when it
    could not be drawn) and what the profile learnt (None with ``learn`` off)."""

    document: dict[str, Any]
    results_path: Path
    plot_path: Path | None
    plot_problem: str | None
    profile: dict[str, Any] | None


def bench_hardware(gpu: str | None, vram: str | None, host: HostSpec | None = None) -> Hardware:
    """The hardware measured: this machine's (``--vram`` and ``host``, from ``--ram`` …, may change what the plan
    counts on), or its CPU alone."""
    if gpu is not None and gpu.strip().lower() not in ("none", "cpu"):
        raise TunerError(f"--gpu {gpu}: tuner bench measures this machine; --gpu takes only 'none' (CPU only)")
    return hardware_for(gpu, vram, host=host)


def resolve_model(model: str | None, hardware: Hardware, wishes: Wishes, *, need_plan: bool,
                  on_progress: ProgressFn | None = None) -> tuple[Path, ModelLayout, Plan | None]:
    """(local GGUF path, layout, plan or None). A file is used as it is; anything else is planned (to pick the
    quant) and fetched like ``tuner serve`` does, then planned again from the downloaded file's own header when it
    is not what the plan was sized for (:mod:`tuner.replan`; ``on_progress`` says so; TunerError, one line, when it
    no longer fits)."""
    path, layout, plan, _ = resolve_model_files(model, hardware, wishes, need_plan=need_plan,
                                                on_progress=on_progress)
    return path, layout, plan


def resolve_model_files(model: str | None, hardware: Hardware, wishes: Wishes, *, need_plan: bool,
                        on_progress: ProgressFn | None = None
                        ) -> tuple[Path, ModelLayout, Plan | None, Path | None]:
    """:func:`resolve_model`, and the local MTP sidecar of the quant when it has one and no head of its own."""
    plan = None
    if need_plan or model is None or not Path(model).expanduser().is_file():
        plan = plan_for(model, hardware, wishes).plan
        candidate = plan.candidate
    else:
        candidate = resolve_candidates(model)[0]
    sidecar = not candidate.layout.has_mtp and candidate.mtp_draft is not None
    fetched = fetch_candidate(candidate, mtp_sidecar=sidecar)
    if plan is not None:
        replanned = replan_from_file(plan, fetched.model_path, hardware, wishes)
        if replanned.replanned and on_progress is not None:
            on_progress(replanned.message())
        plan = replanned.plan
        candidate = plan.candidate
    return fetched.model_path, candidate.layout, plan, fetched.mtp_path


def mtp_variant(plan: Plan, layout: ModelLayout, sidecar: Path | None) -> FlagSet | None:
    """The plan with MTP drafting toggled, when the model can draft (its head or a sidecar): ``plan-no-mtp`` when
    the plan drafts, ``plan-mtp`` (``--spec-draft-n-max`` 3, llama.cpp's default) when it does not; so a plain
    benchmark measures MTP on and off side by side, with the acceptance rate."""
    if not layout.has_mtp and sidecar is None:
        return None
    extra: tuple[str, ...] = (*plan.extra_args, *FIT_OFF_ARGS)
    if plan.flags.spec_type == SPEC_MTP:
        return flagset_from_flags(f"{PLAN_NAME}-no-mtp", plan.flags.with_(spec_type=None), extra)
    if sidecar is not None:
        extra = (*extra, *FLAGS["spec_draft_model"].to_args(str(sidecar)))
    flags = plan.flags.with_(spec_type=SPEC_MTP, spec_draft_n_max=FLAGS["spec_draft_n_max"].default)
    return flagset_from_flags(f"{PLAN_NAME}-mtp", flags, extra)


def _sidecar_args(plan: Plan, sidecar: Path | None) -> tuple[str, ...]:
    if plan.flags.spec_type == SPEC_MTP and not plan.candidate.layout.has_mtp and sidecar is not None:
        return tuple(FLAGS["spec_draft_model"].to_args(str(sidecar)))
    return ()


def on_workers(sets: Sequence[FlagSet], endpoints: Sequence[str]) -> list[FlagSet]:
    """Every set with ``--rpc`` to ``endpoints`` in front (a set that names its own ``--rpc`` keeps it): the RPC
    devices come first in llama.cpp's device order, and ``-ot`` may name their buffers only after ``--rpc``."""
    if not endpoints:
        return list(sets)
    out = []
    for fs in sets:
        if flag_value(fs.args, "rpc"):
            out.append(fs)
            continue
        args = (*FLAGS["rpc"].to_args(tuple(endpoints)), *fs.args)
        flags = fs.flags.with_(rpc=tuple(endpoints)) if fs.flags is not None else None
        out.append(replace(fs, args=args, flags=flags))
    return out


def learn(path: Path) -> dict[str, Any]:
    """Learn a results file into the profile (read back from disk, as a later import would) with the memory
    observations ``tuner serve`` left; a summary of the profile entry."""
    store = ProfileStore()
    entry = store.learn_file(path)
    attached, _skipped = store.absorb_observations()
    best = entry.best
    return {"path": str(store.path), "entry": entry.key.id(), "measurements": len(entry.measurements),
            "memory_observations_attached": attached, "best": best.to_dict() if best else None}


def run_benchmark(model_ref: str | None, hardware: Hardware, wishes: Wishes, options: BenchOptions, *,
                  on_progress: ProgressFn | None = None,
                  on_build_progress: BuildProgressFn | None = None) -> BenchReport:
    """Plan (when needed) and fetch the model, build llama.cpp, measure ``options.sets`` side by side (or the plan
    against llama-server's defaults, or ``--tune`` around the plan), write the results file and its PNG, and learn
    them into the profile. A set that does not fit is refused before anything is built or launched."""
    cfg = options.config
    endpoints = rpc_endpoints(hardware.gpus)
    options = replace(options, sets=tuple(on_workers(options.sets, endpoints)))
    if wishes.parallel < cfg.concurrency:
        wishes = replace(wishes, parallel=cfg.concurrency)  # the plan needs a slot per concurrent request
    budget = budget_for(hardware, wishes)
    model_path, layout, plan, sidecar = resolve_model_files(model_ref, hardware, wishes, need_plan=not options.sets,
                                                            on_progress=on_progress)
    check_sets_fit(layout, options.sets, hardware, budget)
    build, _cached = obtain_build(server_bin=options.server_bin, gpus=gpus_for_build(hardware),
                                  on_progress=on_build_progress)
    if options.cpu_only and build.cuda:
        raise TunerError("--gpu none with a CUDA build of llama-server would still use the GPU; "
                         "give --server-bin a CPU build")
    identity = model_identity(model_path).to_dict()
    path = results_path(options.out_dir, model_path, hardware, timestamp())
    log_dir = path.with_suffix(".logs") if options.keep_logs else None
    if options.tune:
        assert plan is not None  # planned: --tune has no sets
        result = run_tune(model_path, plan.flags, cfg, server_bin=build.server_bin, layout=layout, hardware=hardware,
                          budget=budget, plan_extra=plan.extra_args, depth=options.tune_depth,
                          objective=options.objective, only=options.dims,
                          min_parallel=max(wishes.parallel, cfg.concurrency), log_dir=log_dir,
                          on_progress=on_progress, draft_model=sidecar)
        document = tune_document(result, model_path=model_path, layout=layout, hardware=hardware, build=build,
                                 cfg=cfg, model_identity=identity)
    else:
        assert options.sets or plan is not None
        # the baseline first: every ratio in the verdict is then "against llama-server's defaults"
        sets = list(options.sets)
        if not sets:
            assert plan is not None
            plan_set = flagset_from_flags(PLAN_NAME, plan.flags, (*plan.extra_args, *FIT_OFF_ARGS,
                                                                  *_sidecar_args(plan, sidecar)))
            variant = mtp_variant(plan, layout, sidecar)
            sets = on_workers([defaults_set(), plan_set, *([variant] if variant is not None else [])], endpoints)
        run = run_bench(model_path, sets, cfg, server_bin=build.server_bin, layout=layout, hardware=hardware,
                        budget=budget, log_dir=log_dir, on_progress=on_progress)
        document = bench_document(run, model_path=model_path, layout=layout, hardware=hardware, build=build,
                                  objective=options.objective, model_identity=identity)
    write_json_atomic(path, document)
    plot_path: Path | None = None
    plot_problem = None
    try:
        plot_path = render_document_png(document, path.with_suffix(".png"))
    except PlotUnavailable as exc:
        plot_problem = str(exc)
    return BenchReport(document, path, plot_path, plot_problem, learn(path) if options.learn else None)
