"""Benchmarking llama-server flag sets side by side, from the server's own timings, and tuning around a plan.

What one measurement is (llamacpp-memory.md §7 for the server facts it relies on):

* **Prompts are token ids** cut from two pools of pseudo-English text, tokenized once by the first server (all sets
  serve the same GGUF, so the ids are the same everywhere): a *prefix* pool that fills the context to a depth, and
  a *fresh* pool from which every measurement takes a slice no server has seen before. The same measurement key
  gets the same fresh slice on every set (fair), and no key is ever reused (a repeated prompt would be served from
  a context checkpoint or the prompt cache, re-evaluating ~4 tokens).
* **At depth D** a set's slot is first filled with ``prefix[:D]`` (``n_predict`` 1, cached prompt: the first time
  it processes D tokens, later only the few tokens after the last context checkpoint), then the measured request
  sends ``prefix[:D] + fresh`` with ``n_predict`` = the generation length and ``ignore_eos``: the server restores
  the checkpoint just before D and evaluates the fresh tokens (plus the ~4 it always re-evaluates).
* **Figures are the server's**: ``timings.prompt_per_second`` (prompt_n over prompt_ms, which runs to the first
  sampled token, so it is prompt processing including the first token's sampling) and
  ``timings.predicted_per_second`` ((predicted_n − 1) / predicted_ms: generation after the first token). Each
  sample keeps ``prompt_n``, ``cache_n`` and ``predicted_n``, so a cache miss (the depth re-processed) is visible.
* **Concurrency N** fills slots 0..N-1 and then sends N requests at once (threads): per-request figures are each
  request's own timings; the aggregate is Σ prompt_n / max prompt_ms and Σ (predicted_n − 1) / max predicted_ms.

How sets are interleaved: the runs go A B A B … (for each depth, for each repeat, every set once), so drift —
thermal, clocks, the page cache, other load — hits every set alike. That needs every set's server up at once:

* ``together`` (used when the sum of the sets' estimates fits the budget, with mmap'd weights counted once on the
  CPU since the page cache shares them): all servers stay up; an idle llama-server costs memory, not compute.
* ``cycle`` (otherwise, and always on GPUs when a set relies on ``--fit``, which sizes itself to the memory free
  at launch, so another server beside it would change what it picks): one server at a time, relaunched for
  every repeat (repeat → set → depths), so the order is still A B A B at the cost of sets × repeats launches.

``--tune`` (:func:`run_tune`) is coordinate descent from the plan over the dimensions of :func:`tune_dimensions`,
at the depth the plan serves (its context per slot less the room a measurement needs), never at an empty context:

* each round measures the incumbent and the dimension's other values — only those whose estimate fits the budget
  (:func:`tuner.planner.fits`) and whose KV type llama.cpp accepts for the head size — with the repeats
  interleaved and **successive halving** (after each repeat the slower half is dropped and stopped; the incumbent
  always stays);
* a challenger replaces the incumbent only if its median score is more than ``min_gain`` higher *and* it won most
  of the paired repeats (each pair ran back to back, so drift cancels);
* servers stay in a pool: the incumbent (and the plan, if memory allows) stay up between rounds, so a
  configuration is launched once; launches ≈ 1 + Σ (values − 1) + 1 for the baseline, against the grid's Π values;
* a last **verdict** round measures llama-server's defaults (only the model and ``--fit on``), the plan and the
  search's best side by side; the ratios come from that round alone, and if the best is not faster than the plan
  there (median and most paired runs) the plan stays the winner.

When a round's servers do not fit side by side (large models on one GPU), its members run one after another,
each launched once for all its repeats; drift is then bounded only by re-measuring the incumbent every round.

Nothing here prints: progress goes to ``on_progress(line)``; failures are :class:`~tuner.errors.TunerError`.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shlex
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tuner.errors import TunerError
from tuner.estimate import CPU, SPEC_MTP, MemoryEstimate, ServerFlags
from tuner.hardware import Hardware
from tuner.layout import ModelLayout
from tuner.paths import write_atomic
from tuner.planner import Budget, Wishes, budget_for, estimate_on, fits, gpu_split, headroom_bytes
from tuner.server import LlamaServer
from tuner.units import fmt_bytes

ProgressFn = Callable[[str], None]

DEFAULTS_NAME = "defaults"
PLAN_NAME = "plan"
#: what llama-server gets for the baseline: only the model (and host/port), with its default --fit on spelled out.
DEFAULTS_ARGS: tuple[str, ...] = ("--fit", "on")
DEFAULT_DEPTHS: tuple[int, ...] = (0, 8192, 32768)
#: room kept free at the end of a slot beyond prompt + generation (the ~4 re-evaluated tokens, rounding).
CTX_MARGIN_TOKENS = 16
OBJECTIVES = ("tg", "pp", "both")
RESULTS_SCHEMA = 1

# Options that tuner sets itself (model, address) or that would change what is measured (no prompt cache reuse).
_FORBIDDEN = {"-m", "--model", "-mu", "--model-url", "-hf", "-hfr", "--hf-repo", "--host", "--port",
              "--api-key", "--api-key-file", "--path", "--no-cache-prompt", "--no-slots"}


# --------------------------------------------------------------------------------------------- flag sets


@dataclass(frozen=True)
class FlagSet:
    """One named llama-server configuration.

    ``args`` is exactly what llama-server gets after ``-m MODEL --host H --port P``. ``flags`` is what tuner could
    map onto :class:`ServerFlags` for the memory estimate (None: llama-server decides with ``--fit``), ``extra``
    the arguments it passed through unmapped (threads, load mode, …).
    """

    name: str
    args: tuple[str, ...]
    flags: ServerFlags | None
    extra: tuple[str, ...] = ()
    origin: str = "user"  # user | plan | defaults | tune

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "args": list(self.args), "origin": self.origin,
                "flags": asdict(self.flags) if self.flags else None, "extra": list(self.extra)}


_BOOL_FLAGS: dict[str, tuple[str, Any]] = {
    "-kvu": ("kv_unified", True), "--kv-unified": ("kv_unified", True),
    "-no-kvu": ("kv_unified", False), "--no-kv-unified": ("kv_unified", False),
    "-cmoe": ("cpu_moe", True), "--cpu-moe": ("cpu_moe", True),
    "-nkvo": ("no_kv_offload", True), "--no-kv-offload": ("no_kv_offload", True),
    "-fa": ("flash_attn", "on"),  # bare -fa (old spelling) is "on"; "-fa on|off|auto" is handled below
}
_VALUE_FLAGS: dict[str, str] = {
    "-c": "ctx_size", "--ctx-size": "ctx_size",
    "-np": "parallel", "--parallel": "parallel",
    "-ctk": "cache_type_k", "--cache-type-k": "cache_type_k",
    "-ctv": "cache_type_v", "--cache-type-v": "cache_type_v",
    "-b": "batch_size", "--batch-size": "batch_size",
    "-ub": "ubatch_size", "--ubatch-size": "ubatch_size",
    "-fa": "flash_attn", "--flash-attn": "flash_attn",
    "-ngl": "n_gpu_layers", "--n-gpu-layers": "n_gpu_layers", "--gpu-layers": "n_gpu_layers",
    "-ncmoe": "n_cpu_moe", "--n-cpu-moe": "n_cpu_moe",
    "-cram": "cache_ram_mib", "--cache-ram": "cache_ram_mib",
    "-ctxcp": "ctx_checkpoints", "--ctx-checkpoints": "ctx_checkpoints", "--swa-checkpoints": "ctx_checkpoints",
    "--spec-type": "spec_type",
    "--spec-draft-n-max": "spec_draft_n_max", "--draft-max": "spec_draft_n_max", "--draft": "spec_draft_n_max",
}
_INT_FIELDS = {f.name for f in fields(ServerFlags) if f.type in ("int", int)}
_FIT_ON_VALUES = {"on", "1", "true", "yes", "enabled"}


def split_flag_string(text: str) -> list[str]:
    """A llama-server flag string as the shell would split it."""
    try:
        return shlex.split(text)
    except ValueError as exc:
        raise TunerError(f"cannot split flags {text!r}: {exc}") from None


def _value(field_name: str, raw: str, option: str) -> Any:
    if field_name == "n_gpu_layers" and raw.strip().lower() in ("all", "auto", "-1", "-2"):
        return None
    if field_name in _INT_FIELDS or field_name == "n_gpu_layers":
        try:
            return int(raw)
        except ValueError:
            raise TunerError(f"{option} needs a number, got {raw!r}") from None
    if field_name in ("cache_type_k", "cache_type_v", "flash_attn"):
        return raw.lower()
    return raw


def flags_from_args(args: Sequence[str], base: ServerFlags | None = None) -> tuple[ServerFlags, list[str]]:
    """Map llama-server arguments onto :class:`ServerFlags` (for the estimate); return it and what was not mapped.

    ``-ctk X`` alone leaves V at its default, as llama-server does. Options tuner owns (``-m``, ``--port`` …) are
    refused. ``--opt=value`` is read like ``--opt value``.
    """
    changes: dict[str, Any] = {}
    extra: list[str] = []
    items = list(args)
    i = 0
    while i < len(items):
        token = items[i]
        opt, eq, inline = token.partition("=") if token.startswith("-") else (token, "", "")
        if opt in _FORBIDDEN:
            raise TunerError(f"{opt} is set by tuner itself; leave it out of the flag set")
        if opt in _VALUE_FLAGS and not (opt == "-fa" and not eq and (i + 1 >= len(items)
                                                                     or items[i + 1].startswith("-"))):
            if eq:
                raw = inline
            else:
                if i + 1 >= len(items):
                    raise TunerError(f"{opt} needs a value")
                raw = items[i + 1]
                i += 1
            name = _VALUE_FLAGS[opt]
            changes[name] = _value(name, raw, opt)
        elif opt in _BOOL_FLAGS and not eq:
            name, val = _BOOL_FLAGS[opt]
            changes[name] = val
        else:
            extra.append(token)
        i += 1
    try:
        flags = replace(base or ServerFlags(), **changes)
    except TunerError as exc:
        raise TunerError(f"flags {shlex.join(args)!r}: {exc}") from None
    return flags, extra


_CTX_OPTS = {"-c", "--ctx-size"}
_PLACEMENT_OPTS = {"-ngl", "--n-gpu-layers", "--gpu-layers", "-ot", "--override-tensor", "-cmoe", "--cpu-moe",
                   "-ncmoe", "--n-cpu-moe", "-ts", "--tensor-split"}


def uses_fit(args: Sequence[str], gpu: bool = True) -> bool:
    """True when llama-server's ``--fit`` (on by default) may change the set at launch (llamacpp-memory.md §6.2):
    it shrinks the context only when ``-c`` is not given, and moves weights only on a GPU and only when no
    placement option (``-ngl``, ``-ot``, ``--n-cpu-moe`` …) is given."""
    items = list(args)
    for i, token in enumerate(items):
        opt, eq, inline = token.partition("=")
        if opt in ("-fit", "--fit"):
            value = inline if eq else (items[i + 1] if i + 1 < len(items) else "on")
            if value.lower() not in _FIT_ON_VALUES:
                return False
    given = {t.partition("=")[0] for t in items}
    if not _CTX_OPTS & given:
        return True
    return gpu and not _PLACEMENT_OPTS & given


def parse_set(spec: str) -> FlagSet:
    """``NAME=FLAGS`` (from ``--set``) into a :class:`FlagSet`; ``NAME=`` alone means llama-server's defaults."""
    name, eq, text = spec.partition("=")
    name = name.strip()
    if not eq or not name:
        raise TunerError(f"--set expects NAME=FLAGS (e.g. 'q8kv=-ctk q8_0 -ctv q8_0'), got {spec!r}")
    if not re.fullmatch(r"[A-Za-z0-9._+-]+", name):
        raise TunerError(f"set name {name!r}: use letters, digits and . _ + - only")
    args = split_flag_string(text)
    flags, extra = flags_from_args(args)
    return FlagSet(name=name, args=tuple(args), flags=flags, extra=tuple(extra), origin="user")


def defaults_set(name: str = DEFAULTS_NAME) -> FlagSet:
    """llama-server as it starts with only the model: ``--fit on`` sizes context and offload itself."""
    return FlagSet(name=name, args=DEFAULTS_ARGS, flags=None, extra=(), origin="defaults")


def flagset_from_flags(name: str, flags: ServerFlags, extra: Sequence[str] = (), origin: str = "plan") -> FlagSet:
    """A set from planned :class:`ServerFlags` (explicit values, ``--fit off``: the plan already fits)."""
    args = (*flags.to_args(), *extra)
    return FlagSet(name=name, args=args, flags=flags, extra=tuple(extra), origin=origin)


def check_unique_names(sets: Sequence[FlagSet]) -> None:
    seen: set[str] = set()
    for s in sets:
        if s.name in seen:
            raise TunerError(f"two flag sets are named {s.name!r}")
        seen.add(s.name)


# --------------------------------------------------------------------------------------------- memory checks


def _load_mode(args: Sequence[str]) -> str:
    items = list(args)
    for i, token in enumerate(items):
        opt, eq, inline = token.partition("=")
        if opt in ("-lm", "--load-mode"):
            return inline if eq else (items[i + 1] if i + 1 < len(items) else "auto")
    return "auto"


def estimate_for(layout: ModelLayout, fs: FlagSet, hardware: Hardware) -> MemoryEstimate:
    """The estimate of a set; a ``--fit`` set is estimated as llama-server's defaults would start."""
    return estimate_on(layout, fs.flags or ServerFlags(), hardware)


def default_budget(hardware: Hardware) -> Budget:
    """The planner's budget with its default buffer (VRAM, or RAM when there is no GPU)."""
    return budget_for(hardware, Wishes())


def host_bytes(estimate: MemoryEstimate) -> int:
    """Host RAM a server needs beside others: its CPU buffers and checkpoints. The prompt cache (``--cache-ram``)
    is an upper bound that grows only with distinct prompts; a benchmark sends few, so it is left out here."""
    return estimate.host.total_bytes + estimate.checkpoints_bytes


def fit_problem(estimate: MemoryEstimate, budget: Budget) -> str | None:
    """Why one server does not fit the planner's budget (:func:`tuner.planner.fits`), or None."""
    if fits(estimate, budget):
        return None
    short = {k: -v for k, v in headroom_bytes(estimate, budget).items() if v < 0}
    return "; ".join(f"{'RAM' if dev == CPU else dev} is {fmt_bytes(n)} short" for dev, n in short.items()) + \
        f" (buffer {fmt_bytes(budget.buffer_bytes)})"


def memory_problem(estimates: Sequence[tuple[FlagSet, MemoryEstimate]], budget: Budget) -> str | None:
    """Why these servers would not fit side by side in ``budget`` (None if they do).

    GPUs: the sum per device must stay the buffer below its free memory. Host: the sum of host buffers
    (:func:`host_bytes`) must fit the available RAM (less the buffer when there is no GPU); weights mapped from the
    file (load mode auto/mmap) live in the page cache, which the servers share, so they count once.
    """
    for name, free in budget.gpu_free_bytes:
        need = sum(est.device(name).total_bytes for _, est in estimates)
        room = free - budget.buffer_bytes
        if need > room:
            return (f"{name} would need {fmt_bytes(need)}, {fmt_bytes(max(room, 0))} is free "
                    f"after the {fmt_bytes(budget.buffer_bytes)} buffer")
    mapped = [est.host.weights_bytes for fs, est in estimates if _load_mode(fs.args) in ("auto", "mmap")]
    need_host = sum(host_bytes(est) for _, est in estimates) - sum(mapped) + max(mapped, default=0)
    room_host = budget.ram_available_bytes - (budget.buffer_bytes if budget.cpu_only else 0)
    if need_host > room_host:
        return f"host RAM would need {fmt_bytes(need_host)}, {fmt_bytes(max(room_host, 0))} is available"
    return None


def check_sets_fit(layout: ModelLayout, sets: Sequence[FlagSet], hardware: Hardware,
                   budget: Budget) -> dict[str, MemoryEstimate]:
    """Estimate every set and refuse (TunerError) one whose estimate does not fit the budget on its own.

    A set that leaves sizing to ``--fit`` (:func:`uses_fit`) is not refused: llama-server shrinks it at launch.
    """
    out: dict[str, MemoryEstimate] = {}
    for fs in sets:
        try:
            est = estimate_for(layout, fs, hardware)
        except TunerError as exc:
            raise TunerError(f"set {fs.name!r}: {exc}") from None
        if not uses_fit(fs.args, bool(hardware.gpus)):
            problem = fit_problem(est, budget)
            if problem:
                raise TunerError(f"set {fs.name!r} does not fit: {problem}; change its flags or the budget")
        out[fs.name] = est
    return out


def check_slots(sets: Sequence[FlagSet], concurrency: int) -> None:
    """Refuse (TunerError), before anything is launched, a set with fewer slots than ``concurrency`` (a set that
    does not say ``-np`` gets llama-server's auto: 4). :func:`measure_once` checks again with what the server says."""
    for fs in sets:
        slots = fs.flags.n_seq if fs.flags is not None else ServerFlags().n_seq
        if slots < concurrency:
            raise TunerError(f"set {fs.name!r} has {slots} slot(s); --concurrency {concurrency} needs "
                             f"-np {concurrency} or more")


def decide_together(layout: ModelLayout, sets: Sequence[FlagSet], hardware: Hardware, budget: Budget,
                    estimates: dict[str, MemoryEstimate] | None = None) -> tuple[bool, str]:
    """Whether all sets' servers can be up at once, and why (see the module doc)."""
    if len(sets) < 2:
        return True, "one set"
    if hardware.gpus and any(uses_fit(fs.args) for fs in sets):
        return False, "a set sizes itself with --fit to the free GPU memory, so it runs alone"
    estimates = estimates or {fs.name: estimate_for(layout, fs, hardware) for fs in sets}
    problem = memory_problem([(fs, estimates[fs.name]) for fs in sets], budget)
    if problem:
        return False, f"the sets do not fit side by side ({problem})"
    return True, "all sets fit side by side"


# --------------------------------------------------------------------------------------------- prompts

_WORD_TEXT = (
    "the of and to in is that for it as with was on be by at this are from or an which have not but had they "
    "you were their one all we can her has there been if more when will would who so no out up into do time about "
    "than other them may these some only could its new two my first like over also any after what very most years "
    "people where made way many just should because each those now even how back much before well through make "
    "our such work life system data model memory river garden market number city water light music history "
    "window paper engine signal value table field power road energy family story method group island "
    "letter morning question answer reason result student teacher problem program language service country "
    "machine network season animal mountain simple quick quiet bright early late strong small large green "
    "careful modern ancient open closed warm cold happy serious compute measure write read build travel follow"
)
_WORDS = tuple(_WORD_TEXT.split(" "))


def pseudo_text(n_words: int, seed: int) -> str:
    """Deterministic English-like text: sentences of common words (realistic token mix and expert routing)."""
    rng = random.Random(seed)
    out: list[str] = []
    while len(out) < n_words:
        sentence = [rng.choice(_WORDS) for _ in range(rng.randint(6, 16))]
        sentence[0] = sentence[0].capitalize()
        out.extend(sentence)
        out[-1] += "." if rng.random() < 0.85 else ","
        if rng.random() < 0.08:
            out[-1] += "\n\n"
    return " ".join(out[:n_words])


class PromptSource:
    """Token pools for prefixes (context fill) and fresh prompt slices, tokenized by a server on first use.

    ``fresh(key, n)`` gives the same slice for the same key (so every set gets the same prompt for the same
    measurement) and a new, never used slice for a new key.
    """

    def __init__(self, tokenize: Callable[[str], list[int]] | None = None, seed: int = 1234) -> None:
        self._tokenize = tokenize
        self._seed = seed
        self._prefix: list[int] = []
        self._fresh: list[int] = []
        self._fresh_next = 0
        self._fresh_slices: dict[tuple[Any, ...], tuple[int, int]] = {}
        self._chunks = {"prefix": 0, "fresh": 0}

    def bind(self, tokenize: Callable[[str], list[int]]) -> None:
        """Tokenize with this (live) server from now on: every set serves the same GGUF, so the ids agree, and
        the server that tokenized first may have been stopped since (cycle mode, tuning rounds)."""
        self._tokenize = tokenize

    def _grow(self, pool: list[int], kind: str, need: int) -> None:
        if self._tokenize is None:
            raise TunerError("internal: prompt source used before a server could tokenize")
        words = 2048
        while len(pool) < need:
            seed = self._seed * 7919 + (1 if kind == "fresh" else 0) * 104729 + self._chunks[kind]
            self._chunks[kind] += 1
            tokens = self._tokenize(pseudo_text(words, seed) + "\n")
            if not tokens:
                raise TunerError("llama-server's /tokenize returned no tokens")
            pool.extend(tokens)
            words = min(words * 2, 65536)

    def prefix(self, depth: int) -> list[int]:
        self._grow(self._prefix, "prefix", depth)
        return self._prefix[:depth]

    def fresh(self, key: tuple[Any, ...], n_tokens: int) -> list[int]:
        if key not in self._fresh_slices:
            self._fresh_slices[key] = (self._fresh_next, n_tokens)
            self._fresh_next += n_tokens
        start, n = self._fresh_slices[key]
        if n != n_tokens:
            raise TunerError(f"internal: prompt key {key} reused with another length")
        self._grow(self._fresh, "fresh", start + n)
        return self._fresh[start:start + n]


# --------------------------------------------------------------------------------------------- servers


@dataclass(frozen=True)
class Launch:
    """One llama-server start: which set, its exact command line, and how long it took to become ready."""

    name: str
    command: tuple[str, ...]
    load_s: float
    n_ctx_slot: int
    total_slots: int
    build_info: str = ""


@dataclass
class LiveServer:
    fs: FlagSet
    server: LlamaServer
    n_ctx_slot: int
    total_slots: int
    unified: bool
    warmed: bool = False


class ServerPool:
    """The llama-servers of a benchmark, by set name; each launch is recorded. Use as a context manager."""

    def __init__(self, server_bin: str | os.PathLike[str], model_path: str | os.PathLike[str], *,
                 log_dir: Path | None = None, ready_timeout_s: float = 900.0,
                 on_progress: ProgressFn | None = None) -> None:
        self.server_bin = Path(server_bin)
        self.model_path = Path(model_path)
        self.log_dir = log_dir
        self.ready_timeout_s = ready_timeout_s
        self.on_progress = on_progress
        self.live: dict[str, LiveServer] = {}
        self.launches: list[Launch] = []

    def _say(self, line: str) -> None:
        if self.on_progress:
            self.on_progress(line)

    def up(self, fs: FlagSet) -> LiveServer:
        """The running server of ``fs``, started (and waited for) if it is not up."""
        live = self.live.get(fs.name)
        if live is not None and live.server.running():
            return live
        log_path = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            log_path = self.log_dir / f"{_slug(fs.name)}-{len(self.launches) + 1}.log"
        server = LlamaServer(self.server_bin, self.model_path, list(fs.args), log_path=log_path)
        self._say(f"starting {fs.name}: llama-server {shlex.join(fs.args)}")
        server.start()
        try:
            load_s = server.wait_ready(self.ready_timeout_s)
            props = _get_props(server)
        except BaseException:
            server.stop()
            raise
        settings = props.get("default_generation_settings") or {}
        n_ctx_slot = int(settings.get("n_ctx") or 0)
        total_slots = int(props.get("total_slots") or 1)
        unified = fs.flags.unified if fs.flags is not None else True
        live = LiveServer(fs, server, n_ctx_slot, total_slots, unified)
        self.live[fs.name] = live
        self.launches.append(Launch(fs.name, tuple(server.command), round(load_s, 3), n_ctx_slot, total_slots,
                                    str(props.get("build_info", ""))))
        self._say(f"{fs.name} ready in {load_s:.1f} s (context {n_ctx_slot} per slot, {total_slots} slot(s))")
        return live

    def down(self, name: str) -> None:
        live = self.live.pop(name, None)
        if live is not None:
            live.server.stop()
            if self.log_dir is None:
                live.server.cleanup_log()

    def close(self) -> None:
        for name in list(self.live):
            self.down(name)

    def __enter__(self) -> ServerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _get_props(server: LlamaServer) -> dict[str, Any]:
    import httpx

    try:
        r = httpx.get(f"{server.base_url}/props", timeout=30.0)
        r.raise_for_status()
        return dict(r.json())
    except (httpx.HTTPError, ValueError) as exc:
        raise TunerError(f"llama-server /props failed: {exc}") from None


def tokenizer_of(server: LlamaServer) -> Callable[[str], list[int]]:
    def tokenize(text: str) -> list[int]:
        reply = server.post("/tokenize", {"content": text, "add_special": False})
        return [int(t) for t in reply.get("tokens", [])]

    return tokenize


def ready(pool: ServerPool, prompts: PromptSource, cfg: BenchConfig, fs: FlagSet) -> LiveServer:
    """``fs``'s server, launched if it is not up, tokenizing for ``prompts`` and warmed up (once per launch)."""
    live = pool.up(fs)
    prompts.bind(tokenizer_of(live.server))
    if cfg.warmup:
        warm_up(live, prompts, cfg)
    return live


# --------------------------------------------------------------------------------------------- measuring


@dataclass(frozen=True)
class BenchConfig:
    depths: tuple[int, ...] = DEFAULT_DEPTHS
    repeat: int = 3
    prompt_tokens: int = 512
    gen_tokens: int = 128
    concurrency: int = 1
    warmup: bool = True
    seed: int = 1234
    request_timeout_s: float = 1800.0

    def __post_init__(self) -> None:
        if self.repeat < 1:
            raise TunerError(f"--repeat must be at least 1, got {self.repeat}")
        if self.prompt_tokens < 1 or self.gen_tokens < 2:
            raise TunerError("--prompt-tokens must be at least 1 and --gen-tokens at least 2")
        if self.concurrency < 1:
            raise TunerError(f"--concurrency must be at least 1, got {self.concurrency}")
        if not self.depths or any(d < 0 for d in self.depths):
            raise TunerError("--depths needs one or more context depths, 0 or positive")

    def room(self) -> int:
        """Tokens a slot needs beyond the depth."""
        return self.prompt_tokens + self.gen_tokens + CTX_MARGIN_TOKENS


def parse_depths(text: str) -> tuple[int, ...]:
    """``0,8192,32k`` → (0, 8192, 32768); sorted, unique."""
    out: set[int] = set()
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        scale = 1024 if part.endswith("k") else 1
        try:
            out.add(int(float(part.rstrip("k")) * scale))
        except ValueError:
            raise TunerError(f"--depths: cannot read {part!r} as a token count") from None
    if not out or min(out) < 0:
        raise TunerError(f"--depths needs token counts ≥ 0, got {text!r}")
    return tuple(sorted(out))


@dataclass(frozen=True)
class RequestTiming:
    """One request's ``timings``."""

    prompt_n: int
    cache_n: int
    prompt_ms: float
    predicted_n: int
    predicted_ms: float
    pp_tok_s: float
    tg_tok_s: float
    draft_n: int | None = None
    draft_n_accepted: int | None = None

    @classmethod
    def from_reply(cls, reply: dict[str, Any]) -> RequestTiming:
        t = reply.get("timings")
        if not isinstance(t, dict):
            raise TunerError("llama-server's reply has no timings")
        return cls(
            prompt_n=int(t.get("prompt_n", 0)), cache_n=int(t.get("cache_n", 0)),
            prompt_ms=float(t.get("prompt_ms", 0.0)), predicted_n=int(t.get("predicted_n", 0)),
            predicted_ms=float(t.get("predicted_ms", 0.0)), pp_tok_s=float(t.get("prompt_per_second", 0.0)),
            tg_tok_s=float(t.get("predicted_per_second", 0.0)),
            draft_n=int(t["draft_n"]) if "draft_n" in t else None,
            draft_n_accepted=int(t["draft_n_accepted"]) if "draft_n_accepted" in t else None,
        )


@dataclass(frozen=True)
class Sample:
    """One measurement of one set at one depth; ``seq`` is its place in the run's order (0, 1, 2 …)."""

    seq: int
    set_name: str
    depth: int
    repeat: int
    pp_tok_s: float
    tg_tok_s: float
    prompt_n: int
    cache_n: int
    predicted_n: int
    concurrency: int = 1
    wall_s: float = 0.0
    cache_hit: bool = True
    requests: tuple[RequestTiming, ...] = ()
    round: int = 0

    @property
    def per_request_pp_tok_s(self) -> float:
        return statistics.median(r.pp_tok_s for r in self.requests) if self.requests else self.pp_tok_s

    @property
    def per_request_tg_tok_s(self) -> float:
        return statistics.median(r.tg_tok_s for r in self.requests) if self.requests else self.tg_tok_s

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["requests"] = [asdict(r) for r in self.requests]
        d["per_request_pp_tok_s"] = self.per_request_pp_tok_s
        d["per_request_tg_tok_s"] = self.per_request_tg_tok_s
        return d


def _payload(tokens: list[int], n_predict: int, slot: int, seed: int) -> dict[str, Any]:
    return {"prompt": tokens, "n_predict": n_predict, "ignore_eos": True, "cache_prompt": True,
            "id_slot": slot, "seed": seed, "stream": False, "return_tokens": False}


def _request(live: LiveServer, payload: dict[str, Any], timeout_s: float) -> RequestTiming:
    reply = live.server.post("/completion", payload, timeout_s=timeout_s)
    return RequestTiming.from_reply(reply)


def capacity_ok(live: LiveServer, depth: int, cfg: BenchConfig) -> bool:
    """Does ``depth`` + prompt + generation fit the slot(s) (all N of them in one pool when the KV is unified)?"""
    need = depth + cfg.room()
    if cfg.concurrency > 1 and live.unified:
        need *= cfg.concurrency
    return 0 < need <= live.n_ctx_slot


def max_depth(live: LiveServer, cfg: BenchConfig) -> int:
    per = live.n_ctx_slot // (cfg.concurrency if cfg.concurrency > 1 and live.unified else 1)
    return max(per - cfg.room(), 0)


def warm_up(live: LiveServer, prompts: PromptSource, cfg: BenchConfig) -> None:
    """One short request (allocations, page faults, thread start-up) before anything is measured."""
    if live.warmed:
        return
    tokens = prompts.fresh(("warmup", live.fs.name), min(32, cfg.prompt_tokens))
    _request(live, _payload(tokens, 4, 0, cfg.seed), cfg.request_timeout_s)
    live.warmed = True


def measure_once(live: LiveServer, prompts: PromptSource, cfg: BenchConfig, *, depth: int, repeat: int, seq: int,
                 key: tuple[Any, ...], round_no: int = 0) -> Sample:
    """Fill to ``depth`` (cached after the first time), then measure fresh prompt tokens and generation."""
    if cfg.concurrency > live.total_slots:
        raise TunerError(f"set {live.fs.name!r} has {live.total_slots} slot(s); --concurrency {cfg.concurrency} "
                         f"needs -np {cfg.concurrency} or more")
    prefix = prompts.prefix(depth)
    n = cfg.concurrency
    if depth:
        for slot in range(n):
            _request(live, _payload(prefix, 1, slot, cfg.seed), cfg.request_timeout_s)
    payloads = [_payload(prefix + prompts.fresh((*key, i), cfg.prompt_tokens), cfg.gen_tokens, i, cfg.seed)
                for i in range(n)]
    t0 = time.monotonic()
    if n == 1:
        timings = [_request(live, payloads[0], cfg.request_timeout_s)]
    else:
        with ThreadPoolExecutor(max_workers=n) as pool:
            timings = list(pool.map(lambda p: _request(live, p, cfg.request_timeout_s), payloads))
    wall_s = time.monotonic() - t0
    # the slot keeps the prefix up to the checkpoint before the depth: more evaluated than that is a cache miss
    slack = 4 + (live.fs.flags.ubatch_size if live.fs.flags else 512) + CTX_MARGIN_TOKENS
    cache_hit = all(t.prompt_n <= cfg.prompt_tokens + slack for t in timings)
    if n == 1:
        t = timings[0]
        pp, tg = t.pp_tok_s, t.tg_tok_s
    else:
        max_prompt_ms = max(t.prompt_ms for t in timings) or math.inf
        max_pred_ms = max(t.predicted_ms for t in timings) or math.inf
        pp = sum(t.prompt_n for t in timings) / max_prompt_ms * 1000.0
        tg = sum(max(t.predicted_n - 1, 0) for t in timings) / max_pred_ms * 1000.0
    return Sample(seq=seq, set_name=live.fs.name, depth=depth, repeat=repeat, pp_tok_s=round(pp, 3),
                  tg_tok_s=round(tg, 3), prompt_n=sum(t.prompt_n for t in timings),
                  cache_n=min(t.cache_n for t in timings), predicted_n=sum(t.predicted_n for t in timings),
                  concurrency=n, wall_s=round(wall_s, 4), cache_hit=cache_hit,
                  requests=tuple(timings) if n > 1 or timings[0].draft_n is not None else (), round=round_no)


# --------------------------------------------------------------------------------------------- statistics


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
class DepthResult:
    depth: int
    pp: Stats
    tg: Stats
    per_request_pp: Stats | None = None
    per_request_tg: Stats | None = None
    cache_misses: int = 0

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"depth": self.depth, "pp_tok_s": asdict(self.pp), "tg_tok_s": asdict(self.tg),
                             "cache_misses": self.cache_misses}
        if self.per_request_pp is not None and self.per_request_tg is not None:
            d["per_request_pp_tok_s"] = asdict(self.per_request_pp)
            d["per_request_tg_tok_s"] = asdict(self.per_request_tg)
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
            sum(1 for s in at if not s.cache_hit)))
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


# --------------------------------------------------------------------------------------------- a benchmark run


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
                    for live in lives:
                        one(live, depth, rep, di)
        else:
            for rep in range(cfg.repeat):
                for fs in sets:
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


# --------------------------------------------------------------------------------------------- tuning


@dataclass(frozen=True)
class TuneConfig:
    """A point of the tuning space: planned :class:`ServerFlags` plus what the estimate does not model."""

    flags: ServerFlags
    threads: int | None = None  # -t; None = llama-server's default (physical cores)
    load_mode: str | None = None  # --load-mode; None = auto (mmap)
    fixed: tuple[str, ...] = ()  # the plan's own extra arguments (YaRN), kept as they are

    def extra_args(self) -> tuple[str, ...]:
        """Everything beyond :class:`ServerFlags`; ``--fit off`` because every configuration tried fits."""
        out: list[str] = [*self.fixed, "--fit", "off"]
        if self.threads is not None:
            out += ["--threads", str(self.threads)]
        if self.load_mode is not None:
            out += ["--load-mode", self.load_mode]
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
    * ``mtp``: off and ``draft-mtp`` when the GGUF has the MTP layer.
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
    if layout.has_mtp:
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

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "args": list(self.config.args()), "round": self.round,
                "dimension": self.dimension, "fits": self.fits, "reason": self.reason, "score": self.score,
                "pp_tok_s": self.pp_tok_s, "tg_tok_s": self.tg_tok_s, "n_samples": self.n_samples,
                "dropped_after": self.dropped_after}


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

    def ratio(self, other: SetResult | None) -> dict[str, float] | None:
        if other is None or not other.tg_tok_s or not other.pp_tok_s:
            return None
        return {"tg": round(self.winner.tg_tok_s / other.tg_tok_s, 3),
                "pp": round(self.winner.pp_tok_s / other.pp_tok_s, 3)}


def run_tune(model_path: str | os.PathLike[str], plan_flags: ServerFlags, cfg: BenchConfig, *,
             server_bin: str | os.PathLike[str], layout: ModelLayout, hardware: Hardware,
             budget: Budget | None = None, plan_extra: Sequence[str] = (), depth: int | None = None,
             objective: str = "both", min_gain: float = 0.02,
             only: Sequence[str] | None = None, min_parallel: int = 1, include_defaults: bool = True,
             log_dir: Path | None = None, on_progress: ProgressFn | None = None) -> TuneResult:
    """Coordinate descent around ``plan_flags`` (see the module doc), measured at ``depth`` tokens of context.

    ``depth`` defaults to the plan's context per slot minus the room a measurement needs. ``cfg.repeat`` is the
    most repeats a configuration gets in a round (successive halving drops the slower half after each one).
    """
    if objective not in OBJECTIVES:
        raise TunerError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    search = _Search(model_path, TuneConfig(plan_flags, fixed=tuple(plan_extra)), cfg, server_bin=server_bin,
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
        search.round(final, keep={fs.name for fs in final}, label="verdict")
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
                self._estimates[c] = estimate_on(self.layout, c.flags, self.hardware)
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

    def _measure(self, fs: FlagSet, rep: int, label: str) -> None:
        live = ready(self.pool, self.prompts, self.cfg, fs)
        d = self.depth if capacity_ok(live, self.depth, self.cfg) else max_depth(live, self.cfg)
        if d != self.depth and not any(s.set_name == fs.name for s in self.samples):
            self.notes.append(f"{fs.name}: measured at depth {d}; its context cannot hold {self.depth}")
        s = measure_once(live, self.prompts, self.cfg, depth=d, repeat=rep, seq=len(self.samples),
                         key=("tune", self.round_no, rep), round_no=self.round_no)
        self.samples.append(s)
        self.say(f"[{label}] {fs.name} #{rep + 1}: pp {s.pp_tok_s:.1f} tok/s, tg {s.tg_tok_s:.1f} tok/s")

    def round(self, members: list[FlagSet], *, keep: set[str], label: str) -> dict[str, int]:
        """Measure ``members``; return the ones successive halving dropped (name → repeats they got).

        When their servers fit side by side, repeats are interleaved and after each one the slower half is
        dropped (never a member of ``keep``) and stopped. Otherwise each member runs alone, launched once for all
        its repeats. Servers still up stay up: the caller stops the losers (:meth:`settle`).
        """
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
                for fs in alive:
                    self._measure(fs, rep, label)
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
                    self._measure(fs, rep, label)
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
        by_rep: dict[str, dict[int, Sample]] = {}
        for s in self.samples:
            if s.round == rn:
                by_rep.setdefault(s.set_name, {})[s.repeat] = s
        inc, ch = by_rep.get(self.name(incumbent), {}), by_rep.get(self.name(challenger), {})
        reps = sorted(set(inc) & set(ch))
        if not reps:
            return 0.0, 0, 0
        wins = sum(1 for r in reps if _score_of([ch[r]], self.objective) > _score_of([inc[r]], self.objective))
        inc_score = _score_of([inc[r] for r in reps], self.objective)
        gain = _score_of([ch[r] for r in reps], self.objective) / inc_score - 1 if inc_score else 0.0
        return gain, wins, len(reps)

    def _round_score(self, name: str) -> float:
        """``name``'s score so far in the round being measured."""
        return _score_of([s for s in self.samples if s.set_name == name and s.round == self.round_no],
                         self.objective)

    def trial(self, c: TuneConfig, dim: str, dropped_after: int | None = None) -> Trial:
        name = self.name(c)
        mine = [s for s in self.samples if s.set_name == name and s.round == self.round_no - 1]
        return Trial(name, c, self.round_no - 1, dim, True, "", round(_score_of(mine, self.objective), 3),
                     round(statistics.median(s.pp_tok_s for s in mine), 3) if mine else 0.0,
                     round(statistics.median(s.tg_tok_s for s in mine), 3) if mine else 0.0,
                     len(mine), dropped_after)

    def result(self, name: str, launches: Sequence[Launch], round_no: int) -> SetResult:
        c = self._configs.get(name)
        fs = self.flagset(c) if c is not None else defaults_set(name)
        mine = [s for s in self.samples if s.set_name == name and s.round == round_no]
        ref = max((s.depth for s in mine), default=self.depth)
        return summarize(fs, mine, ref, (), self.estimate(c) if c is not None else None, launches)


def _score_of(samples: Sequence[Sample], objective: str) -> float:
    if not samples:
        return 0.0
    return score(statistics.median(s.tg_tok_s for s in samples), statistics.median(s.pp_tok_s for s in samples),
                 objective)


# --------------------------------------------------------------------------------------------- results files


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "x"


def model_slug(model_path: str | os.PathLike[str]) -> str:
    name = Path(model_path).name
    name = re.sub(r"-\d{5}-of-\d{5}\.gguf$", "", name)
    return _slug(re.sub(r"\.gguf$", "", name))


def hardware_slug(hardware: Hardware) -> str:
    if not hardware.gpus:
        return "cpu-" + _slug(hardware.cpu_model.lower())
    names = [_slug(g.name.lower().replace("nvidia", "").replace("geforce", "")) for g in hardware.gpus]
    if len(set(names)) == 1:
        return names[0] if len(names) == 1 else f"{names[0]}x{len(names)}"
    return "+".join(names)


def hardware_summary(hardware: Hardware) -> dict[str, Any]:
    return {
        "gpus": [{"index": g.index, "name": g.name, "llama_name": g.llama_name, "driver_version": g.driver_version,
                  "vram_total_bytes": g.vram_total_bytes, "vram_free_bytes": g.vram_free_bytes,
                  "compute_capability": list(g.compute_capability) if g.compute_capability else None,
                  "source": g.source} for g in hardware.gpus],
        "cpu_model": hardware.cpu_model,
        "cpu_physical_cores": hardware.cpu_physical_cores,
        "cpu_logical_cores": hardware.cpu_logical_cores,
        "ram_total_bytes": hardware.ram_total_bytes,
        "ram_available_bytes": hardware.ram_available_bytes,
    }


def build_summary(build: Any) -> dict[str, Any]:
    """What llama.cpp ran: a :class:`tuner.build.LlamaBuild` (duck-typed, so tests may pass a stand-in)."""
    if build is None:
        return {}
    return {"key": getattr(build, "key", ""), "version_text": getattr(build, "version_text", ""),
            "commit": getattr(build, "commit", ""), "cuda": bool(getattr(build, "cuda", False)),
            "options": dict(getattr(build, "options", {}) or {}), "server_bin": str(getattr(build, "server_bin", ""))}


def timestamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")


def results_path(base_dir: str | os.PathLike[str], model_path: str | os.PathLike[str], hardware: Hardware,
                 stamp: str | None = None) -> Path:
    """``<base>/<model>/<hardware>/<timestamp>.json``."""
    return Path(base_dir) / model_slug(model_path) / hardware_slug(hardware) / f"{stamp or timestamp()}.json"


def write_json_atomic(path: Path, data: dict[str, Any]) -> Path:
    """Write ``data`` as JSON to ``path`` atomically."""
    return write_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def verdict(results: Sequence[SetResult], objective: str = "both") -> dict[str, Any]:
    """Which set won at the reference depth, and every set's ratio to the first one (the reference set)."""
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
            "ranking": [r.fs.name for r in ranked]}


def roofline_rows(layout: ModelLayout, fs: FlagSet, hardware: Hardware, depths: Iterable[int]) -> list[dict[str, Any]]:
    """:mod:`tuner.speed`'s bounds and predictions for a set at each depth (none for a ``--fit`` set on a GPU,
    whose placement llama-server decides)."""
    from tuner.speed import predict_speed

    if hardware.gpus and uses_fit(fs.args):
        return []
    flags = fs.flags or ServerFlags()
    rows = []
    for depth in depths:
        try:
            p = predict_speed(layout, flags, hardware, gpu_split=gpu_split(hardware), depth_tokens=max(depth, 1))
        except TunerError:
            return []
        rows.append({"depth": depth, "tg_bound_tok_s": round(p.tg_bound_tok_s, 3),
                     "pp_bound_tok_s": round(p.pp_bound_tok_s, 3), "tg_predicted_tok_s": round(p.tg_tok_s, 3),
                     "pp_predicted_tok_s": round(p.pp_tok_s, 3)})
    return rows


def result_rows(results: Iterable[SetResult], layout: ModelLayout, hardware: Hardware) -> list[dict[str, Any]]:
    """Each set's dict with its roofline rows and efficiency (measured / bound) at the reference depth."""
    out = []
    for r in results:
        d = r.to_dict()
        d["roofline"] = roofline_rows(layout, r.fs, hardware, [x.depth for x in r.by_depth])
        ref = next((x for x in d["roofline"] if x["depth"] == r.ref_depth), None)
        d["efficiency"] = ({"tg": round(r.tg_tok_s / ref["tg_bound_tok_s"], 4) if ref["tg_bound_tok_s"] else None,
                            "pp": round(r.pp_tok_s / ref["pp_bound_tok_s"], 4) if ref["pp_bound_tok_s"] else None}
                           if ref else None)
        out.append(d)
    return out


def _model_doc(model_path: str | os.PathLike[str], layout: ModelLayout,
               identity: dict[str, Any] | None) -> dict[str, Any]:
    return {"path": str(Path(model_path).resolve()), "name": model_slug(model_path), "arch": layout.arch,
            "file_bytes": layout.file_bytes, "has_mtp": layout.has_mtp, "identity": identity}


def _document_head(kind: str, model_path: str | os.PathLike[str], layout: ModelLayout, hardware: Hardware,
                   build: Any, model_identity: dict[str, Any] | None, config: Any, launches: Any, results: Any,
                   samples: Any) -> dict[str, Any]:
    """What every results file starts with: the model, the hardware, the build, the runs and their order."""
    return {
        "schema": RESULTS_SCHEMA,
        "kind": kind,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": _model_doc(model_path, layout, model_identity),
        "hardware": hardware_summary(hardware),
        "llama_cpp": build_summary(build),
        "config": asdict(config),
        "launches": [asdict(la) for la in launches],
        "results": result_rows(results, layout, hardware),
        "order": [[s.seq, s.set_name, s.depth, s.repeat] for s in samples],
    }


def bench_document(run: BenchRun, *, model_path: str | os.PathLike[str], layout: ModelLayout, hardware: Hardware,
                   build: Any, objective: str = "both", model_identity: dict[str, Any] | None = None,
                   extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The results file of a plain benchmark (:mod:`tuner.profile_store` learns from it)."""
    return {
        **_document_head("bench", model_path, layout, hardware, build, model_identity, run.config, run.launches,
                         run.results, run.samples),
        "mode": run.mode,
        "mode_reason": run.mode_reason,
        "verdict": verdict(run.results, objective),
        "notes": list(run.notes),
        **(extra or {}),
    }


def tune_document(result: TuneResult, *, model_path: str | os.PathLike[str], layout: ModelLayout,
                  hardware: Hardware, build: Any, cfg: BenchConfig, model_identity: dict[str, Any] | None = None,
                  extra: dict[str, Any] | None = None) -> dict[str, Any]:
    results = [result.winner]
    if result.plan.fs.name != result.winner.fs.name:
        results.append(result.plan)
    if result.defaults is not None:
        results.append(result.defaults)
    return {
        **_document_head("tune", model_path, layout, hardware, build, model_identity,
                         replace(cfg, depths=(result.depth,)), result.launches, results, result.samples),
        "tune": {
            "depth": result.depth,
            "objective": result.objective,
            "dimensions": [{"name": n, "values": list(v)} for n, v in result.dimensions],
            "grid_size": result.grid_size,
            "launches": len(result.launches),
            "trials": [t.to_dict() for t in result.trials],
        },
        "verdict": {
            "objective": result.objective,
            "winner": result.winner.fs.name,
            "winner_args": list(result.winner.fs.args),
            "ratio_to_plan": result.ratio(result.plan),
            "ratio_to_defaults": result.ratio(result.defaults),
            "ref_depth": result.winner.ref_depth,
            "search_best": result.search_best,
        },
        "notes": list(result.notes),
        **(extra or {}),
    }
