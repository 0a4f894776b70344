"""``--tune``: coordinate descent from the plan, at the depth the plan serves, with successive halving.

:func:`run_tune` walks the dimensions of :func:`tune_dimensions` from the plan, at the depth the plan serves (its
context per slot less the room a measurement needs), never at an empty context:

* each round measures the incumbent and the dimension's other values — only those whose estimate fits the budget
  (:func:`tuner.planner.fits`) and whose KV type llama.cpp accepts for the head size — with the repeats
  interleaved and **successive halving** (after each repeat the slower half is dropped and stopped; the incumbent
  always stays);
* a challenger replaces the incumbent only if its median score is more than ``min_gain`` higher *and* it won most
  of the paired repeats (each pair ran back to back, so drift cancels);
* servers stay in a pool: the incumbent (and the plan, if memory allows) stay up between rounds, so a
  configuration is launched once; launches ≈ 1 + Σ (values − 1) + 1 for the baseline, against the grid's Π values;
* a last **verdict** round measures llama-server's defaults (only the model and ``--fit on``), the plan and the
  search's best side by side, at every ``--depths`` depth up to the tuning depth and at that depth; the ratios come
  from that round alone (every depth, with the spread of the paired runs:
  :func:`tuner.bench.stats.comparison`), and if the best is not faster than the plan at the tuning depth (median
  and most paired runs) the plan stays the winner.

When a round's servers do not fit side by side (large models on one GPU), its members run one after another,
each launched once for all its repeats; drift is then bounded only by re-measuring the incumbent every round.

Nothing here prints: progress goes to ``on_progress(line)``; failures are :class:`~tuner.errors.TunerError`.
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tuner.bench.flagsets import DEFAULTS_NAME, FIT_OFF_ARGS, PLAN_NAME, FlagSet, defaults_set
from tuner.bench.measure import BenchConfig, Sample, capacity_ok, max_depth, measure_once, ready
from tuner.bench.memory import decide_together, default_budget, estimate_for, fit_problem
from tuner.bench.prompts import PromptSource
from tuner.bench.run import rotated
from tuner.bench.servers import Launch, ProgressFn, ServerPool
from tuner.bench.stats import OBJECTIVES, DraftStats, SetResult, comparison, score_of, summarize
from tuner.errors import TunerError
from tuner.estimate import MemoryEstimate
from tuner.flags import FLAGS, SPEC_MTP, Occurrence, ServerFlags, scan
from tuner.hardware import Hardware
from tuner.layout import ModelLayout
from tuner.planner import Budget


@dataclass(frozen=True)
class TuneConfig:
    """A point of the tuning space: planned :class:`ServerFlags` plus what the estimate does not model."""

    flags: ServerFlags
    threads: int | None = None  # -t; None = llama-server's default (physical cores)
    load_mode: str | None = None  # --load-mode; None = auto (mmap)
    fixed: tuple[str, ...] = ()  # the plan's own extra arguments (YaRN), kept as they are
    draft_model: str | None = None  # the MTP sidecar (-md), given to the configurations that draft with MTP

    def extra_args(self) -> tuple[str, ...]:
        """Everything beyond :class:`ServerFlags`; ``--fit off`` because every configuration tried fits."""
        out: list[str] = [*self.fixed, *FIT_OFF_ARGS]
        if self.draft_model is not None and self.flags.spec_type == SPEC_MTP:
            out += FLAGS["spec_draft_model"].to_args(self.draft_model)
        if self.threads is not None:
            out += FLAGS["threads"].to_args(self.threads)
        if self.load_mode is not None:
            out += FLAGS["load_mode"].to_args(self.load_mode)
        return tuple(out)

    def args(self) -> tuple[str, ...]:
        return (*self.flags.to_args(), *self.extra_args())

    def label(self, base: TuneConfig) -> str:
        """A short name: what differs from ``base`` (``ub1024+q8_0kv``), or ``plan``."""
        parts: list[str] = []
        for dim in _LABELS:
            if dim.get(self) != dim.get(base):
                parts.append(dim.short(dim.get(self)))
        return "+".join(parts) or PLAN_NAME


@dataclass(frozen=True)
class Dimension:
    """One axis of the search: a name, how to read and set it on a config, and the values to try."""

    name: str
    values: tuple[Any, ...]
    get: Callable[[TuneConfig], Any] = field(repr=False, compare=False)
    put: Callable[[TuneConfig, Any], TuneConfig] = field(repr=False, compare=False)
    short: Callable[[Any], str] = field(repr=False, compare=False)


def _flag_dim(name: str, attr: str, short: Callable[[Any], str], values: Sequence[Any] = ()) -> Dimension:
    return Dimension(name, tuple(values), lambda c: getattr(c.flags, attr),
                     lambda c, v: replace(c, flags=c.flags.with_(**{attr: v})), short)


def _kv_put(c: TuneConfig, v: str) -> TuneConfig:
    return replace(c, flags=c.flags.with_(cache_type_k=v, cache_type_v=v))


def _np_put(c: TuneConfig, v: int) -> TuneConfig:
    return replace(c, flags=c.flags.with_(parallel=v, kv_unified=None if v == -1 else c.flags.kv_unified))


def _dim(name: str, values: Sequence[Any] = ()) -> Dimension:
    proto = _PROTOS[name]
    return Dimension(name, tuple(values), proto.get, proto.put, proto.short)


_PROTOS: dict[str, Dimension] = {
    "n_cpu_moe": _flag_dim("n_cpu_moe", "n_cpu_moe", lambda v: f"ncmoe{v}"),
    "ubatch": _flag_dim("ubatch", "ubatch_size", lambda v: f"ub{v}"),
    "batch": _flag_dim("batch", "batch_size", lambda v: f"b{v}"),
    "kv": Dimension("kv", (), lambda c: c.flags.cache_type_k, _kv_put, lambda v: f"{v}kv"),
    "threads": Dimension("threads", (), lambda c: c.threads, lambda c, v: replace(c, threads=v),
                         lambda v: f"t{v if v is not None else 'auto'}"),
    "parallel": Dimension("parallel", (), lambda c: c.flags.parallel, _np_put,
                          lambda v: "np-auto" if v == -1 else f"np{v}"),
    "load_mode": Dimension("load_mode", (), lambda c: c.load_mode, lambda c, v: replace(c, load_mode=v),
                           lambda v: f"lm-{v or 'auto'}"),
    "mtp": _flag_dim("mtp", "spec_type", lambda v: "mtp" if v else "no-mtp"),
}
_LABELS = tuple(_PROTOS.values())
TUNE_DIMENSIONS = tuple(_PROTOS)


def tune_dimensions(base: TuneConfig, layout: ModelLayout, hardware: Hardware, *, min_parallel: int = 1,
                    only: Sequence[str] | None = None) -> list[Dimension]:
    """The values tried per dimension, the base's own value first. Fit is checked later, per configuration.

    * ``n_cpu_moe`` (GPU, MoE only): the plan's value ± 1, 2 and 4 (fewer experts on the CPU is faster when it
      fits; more frees VRAM for a bigger ubatch);
    * ``ubatch`` 256 … 2048 and ``batch`` 2048 / 4096 (never below the ubatch);
    * ``kv``: f16 and q8_0 for K and V together;
    * ``threads`` (-t): physical cores, logical cores, half the physical cores (None = llama-server's default,
      which is the physical cores);
    * ``parallel`` (-np): 1 and auto (4 slots, unified), never below ``min_parallel``;
    * ``load_mode``: auto (mmap) and none (read into memory);
    * ``mtp``: off and ``draft-mtp`` when the GGUF has the MTP layer or an MTP sidecar is given.
    """
    f = base.flags
    dims: list[Dimension] = []

    def add(name: str, values: Iterable[Any]) -> None:
        vals: list[Any] = []
        for v in [_PROTOS[name].get(base), *values]:
            if v not in vals:
                vals.append(v)
        if len(vals) > 1 and (only is None or name in only):
            dims.append(_dim(name, vals))

    if hardware.gpus and layout.is_moe and not f.cpu_moe:
        n = layout.n_layer
        add("n_cpu_moe", sorted(v for v in {f.n_cpu_moe + d for d in (-4, -2, -1, 1, 2, 4)} if 0 <= v <= n))
    add("ubatch", [v for v in (256, 512, 1024, 2048) if v <= max(f.batch_size, 2048)])
    add("batch", [v for v in (2048, 4096) if v >= f.ubatch_size])
    add("kv", ["f16", "q8_0"])
    phys, logical = hardware.cpu_physical_cores, hardware.cpu_logical_cores
    add("threads", [v for v in (None, logical, max(1, phys // 2)) if v != phys])
    add("parallel", [v for v in (1, -1) if (4 if v == -1 else v) >= min_parallel])
    add("load_mode", [None, "none"])
    if layout.has_mtp or base.draft_model is not None:
        add("mtp", [None, SPEC_MTP])
    if only is not None:
        unknown = [n for n in only if n not in _PROTOS]
        if unknown:
            raise TunerError(f"unknown tuning dimension(s) {', '.join(unknown)}; known: {', '.join(_PROTOS)}")
    return dims


def grid_size(dims: Sequence[Dimension]) -> int:
    n = 1
    for d in dims:
        n *= len(d.values)
    return n


@dataclass(frozen=True)
class Trial:
    """One configuration the search looked at: measured, or skipped because its estimate does not fit."""

    name: str
    config: TuneConfig
    round: int
    dimension: str
    fits: bool
    reason: str = ""
    score: float = 0.0
    pp_tok_s: float = 0.0
    tg_tok_s: float = 0.0
    n_samples: int = 0
    dropped_after: int | None = None  # successive halving: dropped after this many repeats
    draft: DraftStats | None = None  # tokens drafted and accepted over the same samples; None: it did not draft

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "args": list(self.config.args()), "round": self.round,
                "dimension": self.dimension, "fits": self.fits, "reason": self.reason, "score": self.score,
                "pp_tok_s": self.pp_tok_s, "tg_tok_s": self.tg_tok_s, "n_samples": self.n_samples,
                "dropped_after": self.dropped_after,
                "draft_acceptance": self.draft.to_dict() if self.draft is not None else None}


def measured_trial(name: str, config: TuneConfig, round_no: int, dimension: str, samples: Sequence[Sample],
                   objective: str, dropped_after: int | None = None) -> Trial:
    """The trial of ``config`` from its samples of one round: medians, score and the server's draft counts
    (:class:`~tuner.bench.stats.DraftStats`), all over the deepest depth measured (the verdict round measures
    shallower depths too)."""
    deepest = max((s.depth for s in samples), default=0)
    mine = [s for s in samples if s.depth == deepest]
    return Trial(name, config, round_no, dimension, True, "", round(score_of(mine, objective), 3),
                 round(statistics.median(s.pp_tok_s for s in mine), 3) if mine else 0.0,
                 round(statistics.median(s.tg_tok_s for s in mine), 3) if mine else 0.0,
                 len(mine), dropped_after, DraftStats.of(mine))


@dataclass(frozen=True)
class TuneResult:
    winner: SetResult
    plan: SetResult
    defaults: SetResult | None
    trials: tuple[Trial, ...]
    launches: tuple[Launch, ...]
    grid_size: int
    dimensions: tuple[tuple[str, tuple[Any, ...]], ...]
    depth: int
    objective: str
    samples: tuple[Sample, ...]
    notes: tuple[str, ...] = ()
    search_best: str = ""  # what the descent ended on; ``winner`` is the plan when the verdict did not confirm it

    def comparisons(self) -> list[dict[str, Any]]:
        """The verdict round at every depth it measured (:func:`tuner.bench.stats.comparison`): the winner, and the
        plan when it is not the winner, against llama-server's defaults; the winner against the plan."""
        out = []
        if self.defaults is not None:
            out.append(comparison(self.winner, self.defaults))
            if self.plan.fs.name != self.winner.fs.name:
                out.append(comparison(self.plan, self.defaults))
        if self.plan.fs.name != self.winner.fs.name:
            out.append(comparison(self.winner, self.plan))
        return out

    def ratio(self, other: SetResult | None) -> dict[str, float] | None:
        if other is None or not other.tg_tok_s or not other.pp_tok_s:
            return None
        return {"tg": round(self.winner.tg_tok_s / other.tg_tok_s, 3),
                "pp": round(self.winner.pp_tok_s / other.pp_tok_s, 3)}


def _threads_apart(extra: Sequence[str]) -> tuple[int | None, tuple[str, ...]]:
    """A plan's extra arguments as (its ``--threads``, the rest): the thread count is a tuning dimension."""
    found = scan(extra)
    threads = [occ for occ in found if isinstance(occ, Occurrence) and occ.row.key == "threads"]
    if not threads:
        return None, tuple(extra)
    rest = [t for occ in found if not (isinstance(occ, Occurrence) and occ.row.key == "threads")
            for t in ((occ,) if isinstance(occ, str) else occ.tokens)]
    return int(threads[-1].value()), tuple(rest)


def run_tune(model_path: str | os.PathLike[str], plan_flags: ServerFlags, cfg: BenchConfig, *,
             server_bin: str | os.PathLike[str], layout: ModelLayout, hardware: Hardware,
             budget: Budget | None = None, plan_extra: Sequence[str] = (), depth: int | None = None,
             objective: str = "both", min_gain: float = 0.02,
             only: Sequence[str] | None = None, min_parallel: int = 1, include_defaults: bool = True,
             log_dir: Path | None = None, on_progress: ProgressFn | None = None,
             draft_model: str | os.PathLike[str] | None = None) -> TuneResult:
    """Coordinate descent around ``plan_flags`` (see the module doc), measured at ``depth`` tokens of context;
    ``draft_model``: the MTP sidecar to draft with when the model has no head of its own.

    ``depth`` defaults to the plan's context per slot minus the room a measurement needs. ``cfg.repeat`` is the
    most repeats a configuration gets in a round (successive halving drops the slower half after each one).
    """
    if objective not in OBJECTIVES:
        raise TunerError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    threads, fixed = _threads_apart(plan_extra)
    base = TuneConfig(plan_flags, threads=threads, fixed=fixed, draft_model=str(draft_model) if draft_model else None)
    search = _Search(model_path, base, cfg, server_bin=server_bin,
                     layout=layout, hardware=hardware, budget=budget or default_budget(hardware),
                     objective=objective, log_dir=log_dir, on_progress=on_progress)
    problem = search.problem(search.base)
    base_estimate = search.estimate(search.base)
    if problem or base_estimate is None:
        raise TunerError(f"the plan itself does not fit: {problem}")
    if depth is None:
        depth = max(base_estimate.n_ctx_seq - cfg.room(), 0)
    search.depth = depth
    dims = tune_dimensions(search.base, layout, hardware, min_parallel=min_parallel, only=only)
    grid = grid_size(dims)
    search.say(f"tuning at depth {depth} over {len(dims)} dimension(s); the full grid has {grid} configuration(s)")
    with search.pool:
        incumbent = search.base
        for dim in dims:
            challengers: list[TuneConfig] = []
            for value in dim.values:
                c = dim.put(incumbent, value)
                if c == incumbent or c in challengers or c in search.measured:
                    continue
                problem = search.problem(c)
                if problem:
                    search.trials.append(Trial(search.name(c), c, search.round_no, dim.name, False, problem))
                    search.say(f"[{dim.name}] skip {search.name(c)}: {problem}")
                    continue
                challengers.append(c)
            if not challengers:
                continue
            inc_name = search.name(incumbent)
            dropped = search.round([search.flagset(c) for c in (incumbent, *challengers)], keep={inc_name},
                                   label=dim.name)
            if not any(t.config == search.base and t.fits for t in search.trials):
                search.trials.append(search.trial(search.base, "plan"))
            best, best_gain = incumbent, min_gain
            for c in challengers:
                search.trials.append(search.trial(c, dim.name, dropped.get(search.name(c))))
                if search.name(c) in dropped:
                    continue
                gain, wins, pairs = search.paired(incumbent, c)
                if gain > best_gain and 2 * wins > pairs:
                    best, best_gain = c, gain
            if best != incumbent:
                search.say(f"[{dim.name}] {search.name(best)} beats {inc_name} by {best_gain * 100:.1f}%")
                incumbent = best
            else:
                search.say(f"[{dim.name}] keep {inc_name}")
            search.settle({search.name(incumbent), PLAN_NAME})
        # the verdict: winner, plan and llama-server's defaults measured side by side in one last round
        final = [search.flagset(search.base)]
        if incumbent != search.base:
            final.append(search.flagset(incumbent))
        if include_defaults:
            final.insert(0, defaults_set())
        verdict_depths = sorted({d for d in cfg.depths if d <= depth} | {depth})
        search.round(final, keep={fs.name for fs in final}, label="verdict", depths=verdict_depths)
        if not any(t.config == search.base and t.fits for t in search.trials):
            search.trials.append(search.trial(search.base, "plan"))
        final_round = search.round_no - 1
        found = incumbent
        if incumbent != search.base:
            gain, wins, pairs = search.paired(search.base, incumbent)
            if gain <= 0 or 2 * wins <= pairs:
                search.notes.append(f"the search's best, {search.name(incumbent)}, was not faster than the plan in "
                                    f"the verdict round ({gain * 100:+.1f}%, {wins} of {pairs} paired runs): "
                                    "the plan stays")
                incumbent = search.base
    launches = tuple(search.pool.launches)
    winner = search.result(search.name(incumbent), launches, final_round)
    plan = search.result(PLAN_NAME, launches, final_round)
    defaults = search.result(DEFAULTS_NAME, launches, final_round) if include_defaults else None
    return TuneResult(winner, plan, defaults, tuple(search.trials), launches, grid,
                      tuple((d.name, d.values) for d in dims), depth, objective, tuple(search.samples),
                      tuple(search.notes), search.name(found))


class _Search:
    """The state of one tuning run: names, estimates, the server pool, every sample taken."""

    def __init__(self, model_path: str | os.PathLike[str], base: TuneConfig, cfg: BenchConfig, *,
                 server_bin: str | os.PathLike[str], layout: ModelLayout, hardware: Hardware, budget: Budget,
                 objective: str, log_dir: Path | None, on_progress: ProgressFn | None) -> None:
        self.cfg = cfg
        self.layout = layout
        self.hardware = hardware
        self.budget = budget
        self.objective = objective
        self.say: ProgressFn = on_progress or (lambda _line: None)
        self.base = base
        self.depth = 0
        self.pool = ServerPool(server_bin, model_path, log_dir=log_dir, on_progress=on_progress)
        self.prompts = PromptSource(seed=cfg.seed)
        self.samples: list[Sample] = []
        self.trials: list[Trial] = []
        self.notes: list[str] = []
        self.round_no = 0
        self.measured: set[TuneConfig] = set()
        self._names: dict[TuneConfig, str] = {self.base: PLAN_NAME}
        self._configs: dict[str, TuneConfig] = {PLAN_NAME: self.base}
        self._estimates: dict[TuneConfig, MemoryEstimate | str] = {}

    def name(self, c: TuneConfig) -> str:
        if c not in self._names:
            name = c.label(self.base)
            self._names[c] = name
            self._configs[name] = c
        return self._names[c]

    def flagset(self, c: TuneConfig) -> FlagSet:
        return FlagSet(self.name(c), c.args(), c.flags, c.extra_args(), "plan" if c == self.base else "tune")

    def estimate(self, c: TuneConfig) -> MemoryEstimate | None:
        if c not in self._estimates:
            try:
                self._estimates[c] = estimate_for(self.layout, self.flagset(c), self.hardware)
            except TunerError as exc:
                self._estimates[c] = str(exc)
        est = self._estimates[c]
        return est if isinstance(est, MemoryEstimate) else None

    def problem(self, c: TuneConfig) -> str | None:
        """Why ``c`` may not be tried (its estimate does not fit, or it cannot be estimated); None if it may."""
        est = self.estimate(c)
        if est is None:
            return str(self._estimates[c])
        return fit_problem(est, self.budget)

    def _estimate_of(self, fs: FlagSet) -> MemoryEstimate:
        c = self._configs.get(fs.name)
        est = self.estimate(c) if c is not None else None
        return est or estimate_for(self.layout, fs, self.hardware)

    def _measure(self, fs: FlagSet, rep: int, label: str, depth: int | None = None) -> None:
        live = ready(self.pool, self.prompts, self.cfg, fs)
        want = self.depth if depth is None else depth
        d = want if capacity_ok(live, want, self.cfg) else max_depth(live, self.cfg)
        if d != want and not any(s.set_name == fs.name and s.depth == d for s in self.samples):
            self.notes.append(f"{fs.name}: measured at depth {d}; its context cannot hold {want}")
        s = measure_once(live, self.prompts, self.cfg, depth=d, repeat=rep, seq=len(self.samples),
                         key=("tune", self.round_no, rep, d), round_no=self.round_no)
        self.samples.append(s)
        self.say(f"[{label}] {fs.name} #{rep + 1}: pp {s.pp_tok_s:.1f} tok/s, tg {s.tg_tok_s:.1f} tok/s")

    def round(self, members: list[FlagSet], *, keep: set[str], label: str,
              depths: Sequence[int] | None = None) -> dict[str, int]:
        """Measure ``members`` (at the search's depth, or at each of ``depths``); return the ones successive halving
        dropped (name → repeats they got).

        When their servers fit side by side, repeats are interleaved, the order rotated every repeat
        (:func:`tuner.bench.run.rotated`), and after each one the slower half is dropped (never a member of
        ``keep``) and stopped. Otherwise each member runs alone, launched once for all its repeats. Servers still
        up stay up: the caller stops the losers (:meth:`settle`).
        """
        at = tuple(depths) if depths else (self.depth,)
        together = self._fit_together(members)
        member_names = {fs.name for fs in members}
        idle: list[FlagSet] = []
        for name, live in list(self.pool.live.items()):
            if name in member_names and together:
                continue
            if name not in member_names and together and self._fit_together([*members, *idle, live.fs]):
                idle.append(live.fs)  # an idle reference server (the plan) may stay up beside the round
                continue
            self.pool.down(name)
        dropped: dict[str, int] = {}
        if together:
            alive = list(members)
            for rep in range(self.cfg.repeat):
                for depth in at:
                    for fs in rotated(alive, rep):
                        self._measure(fs, rep, label, depth)
                if rep + 1 < self.cfg.repeat and len(alive) > 2:
                    ranked = sorted(alive, key=lambda x: -self._round_score(x.name))
                    survivors = {fs.name for fs in ranked[: max(2, math.ceil(len(alive) / 2))]} | keep
                    for fs in alive:
                        if fs.name not in survivors:
                            dropped[fs.name] = rep + 1
                            self.pool.down(fs.name)
                    alive = [fs for fs in alive if fs.name in survivors]
        else:
            for fs in members:
                for rep in range(self.cfg.repeat):
                    for depth in at:
                        self._measure(fs, rep, label, depth)
                self.pool.down(fs.name)
        for fs in members:
            c = self._configs.get(fs.name)
            if c is not None:
                self.measured.add(c)
        self.round_no += 1
        return dropped

    def _fit_together(self, sets: Sequence[FlagSet]) -> bool:
        estimates = {fs.name: self._estimate_of(fs) for fs in sets}
        return decide_together(self.layout, sets, self.hardware, self.budget, estimates)[0]

    def settle(self, keep: set[str]) -> None:
        """After a round: stop every server not in ``keep`` (the incumbent and the plan)."""
        for name in list(self.pool.live):
            if name not in keep:
                self.pool.down(name)

    def paired(self, incumbent: TuneConfig, challenger: TuneConfig) -> tuple[float, int, int]:
        """Over the last round's interleaved repeats: the challenger's median score gain over the incumbent, and
        in how many of the paired repeats it was faster (drift hits both members of a pair alike)."""
        rn = self.round_no - 1
        names = {self.name(incumbent), self.name(challenger)}
        last = [s for s in self.samples if s.round == rn and s.set_name in names]
        deepest = max((s.depth for s in last), default=0)  # the verdict round also measures shallower depths
        by_rep: dict[str, dict[int, Sample]] = {}
        for s in last:
            if s.depth == deepest:
                by_rep.setdefault(s.set_name, {})[s.repeat] = s
        inc, ch = by_rep.get(self.name(incumbent), {}), by_rep.get(self.name(challenger), {})
        reps = sorted(set(inc) & set(ch))
        if not reps:
            return 0.0, 0, 0
        wins = sum(1 for r in reps if score_of([ch[r]], self.objective) > score_of([inc[r]], self.objective))
        inc_score = score_of([inc[r] for r in reps], self.objective)
        gain = score_of([ch[r] for r in reps], self.objective) / inc_score - 1 if inc_score else 0.0
        return gain, wins, len(reps)

    def _round_score(self, name: str) -> float:
        """``name``'s score so far in the round being measured."""
        return score_of([s for s in self.samples if s.set_name == name and s.round == self.round_no],
                         self.objective)

    def trial(self, c: TuneConfig, dim: str, dropped_after: int | None = None) -> Trial:
        name, rn = self.name(c), self.round_no - 1
        mine = [s for s in self.samples if s.set_name == name and s.round == rn]
        return measured_trial(name, c, rn, dim, mine, self.objective, dropped_after)

    def result(self, name: str, launches: Sequence[Launch], round_no: int) -> SetResult:
        c = self._configs.get(name)
        fs = self.flagset(c) if c is not None else defaults_set(name)
        mine = [s for s in self.samples if s.set_name == name and s.round == round_no]
        ref = max((s.depth for s in mine), default=self.depth)
        return summarize(fs, mine, ref, (), self.estimate(c) if c is not None else None, launches)
