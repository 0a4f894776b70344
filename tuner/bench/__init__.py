"""Benchmarking llama-server flag sets side by side, from the server's own timings, and tuning around a plan.

One job per module (each imports only those above it):

* :mod:`~tuner.bench.flagsets` — named flag sets (``--set NAME=FLAGS``, the plan, llama-server's defaults), read
  through :mod:`tuner.flags`;
* :mod:`~tuner.bench.memory` — whether a set fits the budget, and whether all sets fit side by side;
* :mod:`~tuner.bench.prompts` — the token pools prompts are cut from;
* :mod:`~tuner.bench.servers` — the pool of running llama-servers and their launches;
* :mod:`~tuner.bench.measure` — one measurement (fill to a depth, measure fresh tokens; the server's timings);
* :mod:`~tuner.bench.stats` — medians per set and depth, scores, the verdict;
* :mod:`~tuner.bench.run` — a plain benchmark, sets interleaved A B, B A …;
* :mod:`~tuner.bench.tune` — ``--tune``: coordinate descent around the plan with successive halving;
* :mod:`~tuner.bench.results` — the results file;
* :mod:`~tuner.bench.plot` — the PNG (matplotlib, optional) and the terminal bars;
* :mod:`~tuner.bench.benchmark` — :func:`run_benchmark`, the one entry point ``tuner bench`` calls.

The names below are the package's API; ``from tuner import bench`` gives all of them.
"""

from tuner.bench.benchmark import (
    DEFAULT_OUT_DIR,
    BenchOptions,
    BenchReport,
    bench_hardware,
    learn,
    resolve_model,
    run_benchmark,
)
from tuner.bench.flagsets import (
    DEFAULTS_ARGS,
    DEFAULTS_NAME,
    FIT_OFF_ARGS,
    PLAN_NAME,
    FlagSet,
    check_unique_names,
    defaults_set,
    flagset_from_flags,
    load_mode,
    parse_set,
    set_flags,
    slug,
    split_flag_string,
    uses_fit,
)
from tuner.bench.measure import (
    CTX_MARGIN_TOKENS,
    DEFAULT_DEPTHS,
    BenchConfig,
    RequestTiming,
    Sample,
    capacity_ok,
    max_depth,
    measure_once,
    parse_depths,
    ready,
    warm_up,
)
from tuner.bench.memory import (
    check_sets_fit,
    check_slots,
    decide_together,
    default_budget,
    estimate_for,
    fit_problem,
    host_bytes,
    memory_problem,
)
from tuner.bench.prompts import PromptSource, pseudo_text
from tuner.bench.results import (
    RESULTS_SCHEMA,
    bench_document,
    build_summary,
    hardware_slug,
    hardware_summary,
    model_slug,
    result_rows,
    results_path,
    roofline_rows,
    timestamp,
    tune_document,
    write_json_atomic,
)
from tuner.bench.run import BenchRun, rotated, run_bench
from tuner.bench.servers import Launch, LiveServer, ProgressFn, ServerPool, get_props, tokenizer_of
from tuner.bench.stats import (
    OBJECTIVES,
    DepthResult,
    Ratio,
    SetResult,
    Stats,
    comparison,
    predicted_ratios,
    score,
    score_of,
    summarize,
    verdict,
)
from tuner.bench.tune import (
    TUNE_DIMENSIONS,
    Dimension,
    Trial,
    TuneConfig,
    TuneResult,
    grid_size,
    run_tune,
    tune_dimensions,
)

__all__ = [
    "CTX_MARGIN_TOKENS",
    "DEFAULTS_ARGS",
    "DEFAULTS_NAME",
    "DEFAULT_DEPTHS",
    "DEFAULT_OUT_DIR",
    "FIT_OFF_ARGS",
    "OBJECTIVES",
    "PLAN_NAME",
    "RESULTS_SCHEMA",
    "TUNE_DIMENSIONS",
    "BenchConfig",
    "BenchOptions",
    "BenchReport",
    "BenchRun",
    "DepthResult",
    "Dimension",
    "FlagSet",
    "Launch",
    "LiveServer",
    "ProgressFn",
    "PromptSource",
    "Ratio",
    "RequestTiming",
    "Sample",
    "ServerPool",
    "SetResult",
    "Stats",
    "Trial",
    "TuneConfig",
    "TuneResult",
    "bench_document",
    "bench_hardware",
    "build_summary",
    "capacity_ok",
    "check_sets_fit",
    "check_slots",
    "check_unique_names",
    "comparison",
    "decide_together",
    "default_budget",
    "defaults_set",
    "estimate_for",
    "fit_problem",
    "flagset_from_flags",
    "get_props",
    "grid_size",
    "hardware_slug",
    "hardware_summary",
    "host_bytes",
    "learn",
    "load_mode",
    "max_depth",
    "measure_once",
    "memory_problem",
    "model_slug",
    "parse_depths",
    "parse_set",
    "predicted_ratios",
    "pseudo_text",
    "ready",
    "resolve_model",
    "result_rows",
    "results_path",
    "roofline_rows",
    "rotated",
    "run_bench",
    "run_benchmark",
    "run_tune",
    "score",
    "score_of",
    "set_flags",
    "slug",
    "split_flag_string",
    "summarize",
    "timestamp",
    "tokenizer_of",
    "tune_dimensions",
    "tune_document",
    "uses_fit",
    "verdict",
    "warm_up",
    "write_json_atomic"
]
