"""A plain benchmark: flag sets measured side by side, interleaved A B A B … at every depth.

How sets are interleaved: the runs go A B, B A, A B … (for each depth, for each repeat, every set once, the order
rotated every repeat: :func:`rotated`), so drift — thermal, clocks, the page cache, other load — hits every set
alike, and no set always runs right after another. That needs every set's server up at once:

* ``together`` (used when the sum of the sets' estimates fits the budget, with mmap'd weights counted once on the
  CPU since the page cache shares them): all servers stay up; an idle llama-server costs memory, not compute.
* ``cycle`` (otherwise, and always on GPUs when a set relies on ``--fit``, which sizes itself to the memory free
  at launch, so another server beside it would change what it picks): one server at a time, relaunched for
  every repeat (repeat → set → depths, rotated likewise), at the cost of sets × repeats launches.

Nothing here prints: progress goes to ``on_progress(line)``; failures are :class:`~tuner.errors.TunerError`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from tuner.bench.flagsets import FlagSet, check_unique_names
from tuner.bench.measure import BenchConfig, Sample, capacity_ok, measure_once, ready
from tuner.bench.memory import check_sets_fit, check_slots, decide_together, default_budget
from tuner.bench.prompts import PromptSource
from tuner.bench.servers import Launch, LiveServer, ProgressFn, ServerPool
from tuner.bench.stats import SetResult, summarize
from tuner.errors import TunerError
from tuner.hardware import Hardware
from tuner.layout import ModelLayout
from tuner.planner import Budget


@dataclass(frozen=True)
class BenchRun:
    results: tuple[SetResult, ...]
    samples: tuple[Sample, ...]  # all of them, in the order they were taken
    config: BenchConfig
    mode: str  # together | cycle
    mode_reason: str
    launches: tuple[Launch, ...]
    notes: tuple[str, ...] = ()

    def result(self, name: str) -> SetResult:
        for r in self.results:
            if r.fs.name == name:
                return r
        raise KeyError(name)


_T = TypeVar("_T")


def rotated(items: Sequence[_T], rep: int) -> list[_T]:
    """``items`` in the order of repeat ``rep``: A B C, then B C A, C A B …, so that every set runs first, second …
    equally often and no set always follows another (a server that just finished still has threads spinning for
    work, ggml-cpu.c: ggml_graph_compute_poll_for_work, and warms the caches for itself, not for the next)."""
    k = rep % len(items) if items else 0
    return [*items[k:], *items[:k]]


def run_bench(model_path: str | os.PathLike[str], sets: Sequence[FlagSet], cfg: BenchConfig, *,
              server_bin: str | os.PathLike[str], layout: ModelLayout, hardware: Hardware,
              budget: Budget | None = None, together: bool | None = None, log_dir: Path | None = None,
              on_progress: ProgressFn | None = None) -> BenchRun:
    """Measure ``sets`` interleaved at ``cfg.depths`` (see the module doc). Refuses a set that does not fit
    ``budget`` (default: the planner's, with its default buffer)."""
    if not sets:
        raise TunerError("nothing to benchmark: no flag sets")
    check_unique_names(sets)
    budget = budget or default_budget(hardware)
    estimates = check_sets_fit(layout, sets, hardware, budget)
    check_slots(sets, cfg.concurrency)
    if together is None:
        together, reason = decide_together(layout, sets, hardware, budget, estimates)
    else:
        reason = "chosen by the caller"
    say = on_progress or (lambda _line: None)
    say(f"{len(sets)} set(s), {'all servers up at once' if together else 'one server at a time'}: {reason}")
    prompts = PromptSource(seed=cfg.seed)
    samples: list[Sample] = []
    skipped: dict[str, set[int]] = {fs.name: set() for fs in sets}
    notes: list[str] = []
    with ServerPool(server_bin, model_path, log_dir=log_dir, on_progress=on_progress) as pool:

        def one(live: LiveServer, depth: int, rep: int, depth_index: int) -> None:
            if not capacity_ok(live, depth, cfg):
                skipped[live.fs.name].add(depth)
                return
            s = measure_once(live, prompts, cfg, depth=depth, repeat=rep, seq=len(samples),
                             key=("bench", depth_index, rep))
            samples.append(s)
            say(f"{live.fs.name} depth {depth} #{rep + 1}: pp {s.pp_tok_s:.1f} tok/s, tg {s.tg_tok_s:.1f} tok/s"
                + ("" if s.cache_hit else " (prefix cache missed)"))

        if together:
            lives = [ready(pool, prompts, cfg, fs) for fs in sets]
            for di, depth in enumerate(cfg.depths):
                for rep in range(cfg.repeat):
                    for live in rotated(lives, rep):
                        one(live, depth, rep, di)
        else:
            for rep in range(cfg.repeat):
                for fs in rotated(sets, rep):
                    live = ready(pool, prompts, cfg, fs)
                    for di, depth in enumerate(cfg.depths):
                        one(live, depth, rep, di)
                    pool.down(fs.name)
        launches = tuple(pool.launches)
    measured_depths = [{s.depth for s in samples if s.set_name == fs.name} for fs in sets]
    common = set.intersection(*measured_depths) if measured_depths else set()
    ref_depth = max(common) if common else max((s.depth for s in samples), default=0)
    for fs in sets:
        if skipped[fs.name]:
            notes.append(f"{fs.name}: depth(s) {', '.join(map(str, sorted(skipped[fs.name])))} skipped: its "
                         f"context is too small for them plus {cfg.room()} tokens")
    if not samples:
        raise TunerError(f"no depth fits any set's context (depths {list(cfg.depths)}, each needs {cfg.room()} "
                         "tokens of room)")
    results = tuple(summarize(fs, samples, ref_depth, skipped[fs.name], estimates.get(fs.name), launches)
                    for fs in sets)
    return BenchRun(results, tuple(samples), cfg, "together" if together else "cycle", reason, launches,
                    tuple(notes))
