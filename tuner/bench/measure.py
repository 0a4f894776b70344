"""One bench measurement: fill a slot to a depth, send fresh prompt tokens, read llama-server's own timings.

What one measurement is (paths in llama.cpp's tree):

* **Prompts are token ids** from :class:`tuner.bench.prompts.PromptSource`: a prefix that fills the context to a
  depth, and a fresh slice per measurement key.
* **At depth D** a set's slot is first filled with ``prefix[:D]`` (``n_predict`` 1, cached prompt: the first time
  it processes D tokens, later only the few tokens after the last context checkpoint), then the measured request
  sends ``prefix[:D] + fresh`` with ``n_predict`` = the generation length and ``ignore_eos``: the server restores
  the checkpoint just before D (tools/server/server-context.cpp:3326-3350; checkpoints are made 4 + n_ubatch and
  4 tokens before a prompt's end, :3540-3558) and evaluates the fresh tokens plus the ~4 it always re-evaluates.
* **Figures are the server's** ``timings`` (tools/server/server-common.cpp:84-105, server-common.h:442-449):
  ``prompt_per_second`` (prompt_n over prompt_ms, which runs to the first sampled token, so it is prompt
  processing including the first token's sampling) and ``predicted_per_second`` ((predicted_n − 1) /
  predicted_ms: generation after the first token). Each sample keeps ``prompt_n``, ``cache_n`` and
  ``predicted_n``, so a cache miss (the depth re-processed) is visible.
* **Concurrency N** fills slots 0..N-1 and then sends N requests at once (threads): per-request figures are each
  request's own timings; the aggregate is Σ prompt_n / max prompt_ms and Σ (predicted_n − 1) / max predicted_ms.
"""

from __future__ import annotations

import math
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

from tuner.bench.flagsets import FlagSet
from tuner.bench.prompts import PromptSource
from tuner.bench.servers import LiveServer, ServerPool, tokenizer_of
from tuner.errors import TunerError
from tuner.flags import FLAGS, INT32_MAX, ServerFlags
from tuner.llama_api import COMPLETION
from tuner.records import RecordError, validate
from tuner.untrusted import shown

DEFAULT_DEPTHS: tuple[int, ...] = (0, 8192, 32768)
#: room kept free at the end of a slot beyond prompt + generation (the ~4 re-evaluated tokens, rounding).
CTX_MARGIN_TOKENS = 16
#: tokens a slot re-evaluates before the end of a cached prompt (the last checkpoint's offset, see the module doc)
_CHECKPOINT_TAIL_TOKENS = 4


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
            tokens = float(part.rstrip("k")) * scale
        except ValueError:
            raise TunerError(f"--depths: cannot read {shown(part, 40)} as a token count") from None
        if not math.isfinite(tokens) or tokens > INT32_MAX:  # "inf", 400 digits: no context is that long
            raise TunerError(f"--depths: {shown(part, 40)} is more tokens than a context holds ({INT32_MAX})")
        out.add(int(tokens))
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
        """From a ``/completion`` answer (checked against :data:`tuner.llama_api.COMPLETION`, which fills in the
        defaults of missing figures)."""
        try:
            t = validate(COMPLETION, reply)["timings"]
        except RecordError as error:
            raise TunerError(f"llama-server's /completion answer: {error}") from None
        return cls(
            prompt_n=t["prompt_n"], cache_n=t["cache_n"], prompt_ms=t["prompt_ms"], predicted_n=t["predicted_n"],
            predicted_ms=t["predicted_ms"], pp_tok_s=t["prompt_per_second"], tg_tok_s=t["predicted_per_second"],
            draft_n=t["draft_n"], draft_n_accepted=t["draft_n_accepted"],
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


def ready(pool: ServerPool, prompts: PromptSource, cfg: BenchConfig, fs: FlagSet) -> LiveServer:
    """``fs``'s server, launched if it is not up, tokenizing for ``prompts`` and warmed up (once per launch)."""
    live = pool.up(fs)
    prompts.bind(tokenizer_of(live.server))
    if cfg.warmup:
        warm_up(live, prompts, cfg)
    return live


def measure_once(live: LiveServer, prompts: PromptSource, cfg: BenchConfig, *, depth: int, repeat: int, seq: int,
                 key: tuple[Any, ...], round_no: int = 0) -> Sample:
    """Fill to ``depth`` (cached after the first time), then measure fresh prompt tokens and generation."""
    if cfg.concurrency > live.total_slots:
        raise TunerError(f"set {live.fs.name!r} has {live.total_slots} slot(s); --concurrency {cfg.concurrency} "
                         f"needs {FLAGS['parallel'].aliases[0]} {cfg.concurrency} or more")
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
    ubatch = (live.fs.flags or ServerFlags()).ubatch_size
    slack = _CHECKPOINT_TAIL_TOKENS + ubatch + CTX_MARGIN_TOKENS
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
