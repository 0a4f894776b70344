"""Bench statistics: medians and ranges per set and depth, one score per objective, and the verdict of a run."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from tuner.bench.flagsets import FlagSet
from tuner.bench.measure import Sample
from tuner.bench.servers import Launch
from tuner.estimate import MemoryEstimate

OBJECTIVES = ("tg", "pp", "both")


@dataclass(frozen=True)
class Stats:
    median: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, values: Iterable[float]) -> Stats:
        vals = list(values)
        if not vals:
            return cls(0.0, 0.0, 0.0, 0)
        return cls(round(statistics.median(vals), 3), round(min(vals), 3), round(max(vals), 3), len(vals))


@dataclass(frozen=True)
class DraftStats:
    """Speculative decoding as the server counted it: tokens drafted and accepted (``timings.draft_n`` and
    ``timings.draft_n_accepted``, present only when something was drafted: tools/server/server-common.cpp:83-104)."""

    drafted: int
    accepted: int

    @property
    def rate(self) -> float | None:
        return round(self.accepted / self.drafted, 4) if self.drafted else None

    def to_dict(self) -> dict[str, Any]:
        return {"drafted": self.drafted, "accepted": self.accepted, "rate": self.rate}

    @classmethod
    def of(cls, samples: Iterable[Sample]) -> DraftStats | None:
        """The sums over ``samples``' requests; None when none of them drafted."""
        timings = [r for s in samples for r in s.requests if r.draft_n is not None]
        if not timings:
            return None
        return cls(sum(r.draft_n or 0 for r in timings), sum(r.draft_n_accepted or 0 for r in timings))


@dataclass(frozen=True)
class DepthResult:
    depth: int
    pp: Stats
    tg: Stats
    per_request_pp: Stats | None = None
    per_request_tg: Stats | None = None
    cache_misses: int = 0
    draft: DraftStats | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"depth": self.depth, "pp_tok_s": asdict(self.pp), "tg_tok_s": asdict(self.tg),
                             "cache_misses": self.cache_misses}
        if self.per_request_pp is not None and self.per_request_tg is not None:
            d["per_request_pp_tok_s"] = asdict(self.per_request_pp)
            d["per_request_tg_tok_s"] = asdict(self.per_request_tg)
        if self.draft is not None:
            d["draft_acceptance"] = self.draft.to_dict()
        return d


@dataclass(frozen=True)
class SetResult:
    """What one set measured. ``pp_tok_s`` / ``tg_tok_s`` are medians at ``ref_depth``, the deepest depth every
    set of the run measured (the context a server is used at); ``by_depth`` has every depth."""

    fs: FlagSet
    samples: tuple[Sample, ...]
    by_depth: tuple[DepthResult, ...]
    ref_depth: int
    skipped_depths: tuple[int, ...] = ()
    estimate_bytes: dict[str, int] = field(default_factory=dict)
    launches: tuple[Launch, ...] = ()

    def at(self, depth: int) -> DepthResult | None:
        return next((d for d in self.by_depth if d.depth == depth), None)

    @property
    def ref(self) -> DepthResult | None:
        return self.at(self.ref_depth)

    @property
    def pp_tok_s(self) -> float:
        r = self.ref
        return r.pp.median if r else 0.0

    @property
    def tg_tok_s(self) -> float:
        r = self.ref
        return r.tg.median if r else 0.0

    def ref_samples(self) -> list[Sample]:
        return [s for s in self.samples if s.depth == self.ref_depth]

    @property
    def draft(self) -> DraftStats | None:
        """Tokens drafted and accepted over every measurement of the set (None: it does not draft)."""
        return DraftStats.of(self.samples)

    def to_dict(self) -> dict[str, Any]:
        ref = self.ref_samples()
        return {
            "name": self.fs.name,
            "flags": list(self.fs.args),
            "origin": self.fs.origin,
            "server_flags": asdict(self.fs.flags) if self.fs.flags else None,
            "extra_args": list(self.fs.extra),
            "ref_depth": self.ref_depth,
            "pp_tok_s": self.pp_tok_s,
            "tg_tok_s": self.tg_tok_s,
            "pp_samples": [s.pp_tok_s for s in ref],
            "tg_samples": [s.tg_tok_s for s in ref],
            "by_depth": [d.to_dict() for d in self.by_depth],
            "skipped_depths": list(self.skipped_depths),
            "estimate_bytes": dict(self.estimate_bytes),
            "commands": [list(launch.command) for launch in self.launches],
            "load_s": [launch.load_s for launch in self.launches],
            "n_ctx_slot": self.launches[-1].n_ctx_slot if self.launches else None,
            "draft_acceptance": self.draft.to_dict() if self.draft is not None else None,
            "samples": [s.to_dict() for s in self.samples],
        }


def summarize(fs: FlagSet, samples: Sequence[Sample], ref_depth: int, skipped: Iterable[int] = (),
              estimate: MemoryEstimate | None = None, launches: Iterable[Launch] = ()) -> SetResult:
    mine = [s for s in samples if s.set_name == fs.name]
    by_depth = []
    for depth in sorted({s.depth for s in mine}):
        at = [s for s in mine if s.depth == depth]
        conc = any(s.concurrency > 1 for s in at)
        by_depth.append(DepthResult(
            depth, Stats.of(s.pp_tok_s for s in at), Stats.of(s.tg_tok_s for s in at),
            Stats.of(s.per_request_pp_tok_s for s in at) if conc else None,
            Stats.of(s.per_request_tg_tok_s for s in at) if conc else None,
            sum(1 for s in at if not s.cache_hit), DraftStats.of(at)))
    est = {}
    if estimate is not None:
        est = {d.name: d.total_bytes for d in estimate.devices}
        est["host_total"] = estimate.host_total_bytes
    return SetResult(fs, tuple(mine), tuple(by_depth), ref_depth, tuple(sorted(set(skipped))), est,
                     tuple(la for la in launches if la.name == fs.name))


def score(tg_tok_s: float, pp_tok_s: float, objective: str) -> float:
    """One number to rank by: tg, pp, or their geometric mean (``both``: a 2× gain in either counts the same)."""
    if objective == "tg":
        return tg_tok_s
    if objective == "pp":
        return pp_tok_s
    return math.sqrt(max(tg_tok_s, 0.0) * max(pp_tok_s, 0.0))


def score_of(samples: Sequence[Sample], objective: str) -> float:
    """The score of the samples' medians (0 for none)."""
    if not samples:
        return 0.0
    return score(statistics.median(s.tg_tok_s for s in samples), statistics.median(s.pp_tok_s for s in samples),
                 objective)


METRICS = ("tg", "pp")


@dataclass(frozen=True)
class Ratio:
    """One set against a reference at one depth, for one metric: the ratio of their medians, and the spread of the
    ratios of the runs taken back to back (same depth, same repeat: drift hits both alike)."""

    ratio: float | None  # median / reference median
    paired: Stats  # the per-repeat ratios
    wins: int  # repeats in which the set was faster
    noise: float  # the reference's own spread, (max - min) / median at this depth

    def to_dict(self) -> dict[str, Any]:
        return {"ratio": self.ratio, "paired": asdict(self.paired), "wins": self.wins, "n": self.paired.n,
                "noise": self.noise}

    @property
    def slower(self) -> bool:
        """Slower beyond doubt: the ratio of medians under 1 and the set slower in most paired repeats."""
        return self.ratio is not None and self.ratio < 1.0 and 2 * self.wins < self.paired.n


def _metric(s: Sample, metric: str) -> float:
    return s.tg_tok_s if metric == "tg" else s.pp_tok_s


def ratio_at(result: SetResult, reference: SetResult, depth: int, metric: str) -> Ratio | None:
    """``result`` against ``reference`` at ``depth`` (None when either has no run there)."""
    mine, ref = result.at(depth), reference.at(depth)
    if mine is None or ref is None:
        return None
    m, r = (getattr(x, metric).median for x in (mine, ref))
    ref_runs = {s.repeat: _metric(s, metric) for s in reference.samples if s.depth == depth}
    pairs = [(_metric(s, metric), ref_runs[s.repeat]) for s in result.samples
             if s.depth == depth and ref_runs.get(s.repeat)]
    spread = getattr(ref, metric)
    return Ratio(round(m / r, 3) if r else None, Stats.of(a / b for a, b in pairs), sum(a > b for a, b in pairs),
                 round((spread.max - spread.min) / spread.median, 3) if spread.median else 0.0)


def ratios_by_depth(result: SetResult, reference: SetResult) -> dict[int, dict[str, Ratio]]:
    """:func:`ratio_at` at every depth both sets measured, for tg and pp."""
    depths = sorted({d.depth for d in result.by_depth} & {d.depth for d in reference.by_depth})
    out: dict[int, dict[str, Ratio]] = {}
    for depth in depths:
        got = {m: ratio_at(result, reference, depth, m) for m in METRICS}
        out[depth] = {m: r for m, r in got.items() if r is not None}
    return out


def comparison(result: SetResult, reference: SetResult) -> dict[str, Any]:
    """``result`` against ``reference`` at every depth, the worst depth per metric, and whether it is at least as
    fast everywhere: its median at least the reference's (``at_least``), and never slower beyond doubt (``not_slower``:
    a lower median that most paired repeats confirm; a lower median within the noise of paired runs that
    disagree is not)."""
    by_depth = ratios_by_depth(result, reference)
    worst: dict[str, Any] = {}
    for m in METRICS:
        at = [(d, r[m]) for d, r in by_depth.items() if m in r and r[m].ratio is not None]
        if at:
            d, r = min(at, key=lambda x: x[1].ratio or 0.0)
            worst[m] = {"ratio": r.ratio, "depth": d, "paired_min": r.paired.min, "paired_max": r.paired.max}
    every = [r for rs in by_depth.values() for r in rs.values()]
    return {"set": result.fs.name, "reference": reference.fs.name,
            "by_depth": [{"depth": d, **{m: r.to_dict() for m, r in rs.items()}} for d, rs in by_depth.items()],
            "worst": worst,
            "at_least": bool(every) and all(r.ratio is not None and r.ratio >= 1.0 for r in every),
            "not_slower": bool(every) and not any(r.slower for r in every)}


def verdict(results: Sequence[SetResult], objective: str = "both") -> dict[str, Any]:
    """Which set won at the reference depth, every set's ratio to the first one (the reference set) there, and
    every other set against the reference at every depth with the spread (:func:`comparison`)."""
    if not results:
        return {}
    ranked = sorted(results, key=lambda r: -score(r.tg_tok_s, r.pp_tok_s, objective))
    ref = results[0]
    ratios = {}
    for r in results:
        ratios[r.fs.name] = {"tg": round(r.tg_tok_s / ref.tg_tok_s, 3) if ref.tg_tok_s else None,
                             "pp": round(r.pp_tok_s / ref.pp_tok_s, 3) if ref.pp_tok_s else None}
    return {"objective": objective, "winner": ranked[0].fs.name, "ref_depth": results[0].ref_depth,
            "reference_set": ref.fs.name, "ratios_to_reference": ratios,
            "ranking": [r.fs.name for r in ranked],
            "comparisons": [comparison(r, ref) for r in results[1:]]}


def predicted_ratios(rows: Sequence[dict[str, Any]], name: str, reference: str) -> dict[int, dict[str, float]]:
    """From the results rows' roofline predictions (:func:`tuner.bench.results.result_rows`): ``name``'s predicted
    tg and pp over ``reference``'s, by depth (only where both have a prediction)."""
    pred = {r["name"]: {x["depth"]: x for x in r.get("roofline", [])} for r in rows}
    mine, ref = pred.get(name, {}), pred.get(reference, {})
    out = {}
    for depth in sorted(set(mine) & set(ref)):
        a, b = mine[depth], ref[depth]
        out[depth] = {m: round(a[f"{m}_predicted_tok_s"] / b[f"{m}_predicted_tok_s"], 3)
                      for m in METRICS if b[f"{m}_predicted_tok_s"]}
    return out
