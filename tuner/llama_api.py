"""llama-server's HTTP answers, read with a size cap and an overall deadline and checked against one schema per
endpoint (:mod:`tuner.records`) before any field becomes a number.

A ``--server-bin`` can be anything: a wrapper, another build, a program that answers HTML, a gigabyte of JSON, or a
byte every few seconds. Each answer tuner reads goes through :func:`read_answer`: at most
:data:`MAX_ANSWER_BYTES`, within the request's deadline (per read *and* overall), JSON, and the fields tuner uses of
the right type and range; anything else is one :class:`~tuner.errors.TunerError` line naming the endpoint.

The fields are llama-server's (tools/server/server-context.cpp: ``/props`` at handle_props, ``/tokenize``,
``/completion``'s ``timings`` from server-common.cpp:84-105, the OpenAI ``usage`` of ``/v1/chat/completions``).
"""

from __future__ import annotations

import math
import time
from typing import Any

import httpx

from tuner import records as rec
from tuner.errors import TunerError
from tuner.untrusted import shown

MAX_ANSWER_BYTES = 64 << 20
"""The largest answer read: ``/tokenize`` of a 262,144-token prompt is ~2 MB, ``/props`` tens of kB."""
MAX_METRICS_BYTES = 4 << 20
"""``/metrics`` is a few kB of Prometheus text."""

_COUNT = rec.integer(0, (1 << 31) - 1)
_MS = rec.number(0.0, 1e12)
_RATE = rec.number(0.0, 1e12)
_maybe, _or = rec.maybe, rec.field

def _any_object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise rec.RecordError(where, f"{shown(value, 40)}, expected a JSON object")
    return dict(rec.json_value()(value, where))


ANY_OBJECT: rec.Check = _any_object
"""Any JSON object (bounded in depth and size), for an answer tuner passes on without reading fields."""

PROPS = rec.record(
    default_generation_settings=_or(rec.record(n_ctx=_or(_COUNT, 0)), {}),
    total_slots=_or(rec.integer(1, 1 << 16), 1),
    build_info=_or(rec.string(1024, control=True), ""))
"""``/props``: the context per slot, the slots, the build."""

TIMINGS = rec.record(
    prompt_n=_or(_COUNT, 0), cache_n=_or(_COUNT, 0), prompt_ms=_or(_MS, 0.0), predicted_n=_or(_COUNT, 0),
    predicted_ms=_or(_MS, 0.0), prompt_per_second=_or(_RATE, 0.0), predicted_per_second=_or(_RATE, 0.0),
    draft_n=_maybe(_COUNT), draft_n_accepted=_maybe(_COUNT))
COMPLETION = rec.record(timings=TIMINGS)
"""``/completion``: its ``timings`` (the figures bench reads)."""

TOKENIZE = rec.record(tokens=rec.seq_of(_COUNT, 1 << 24))
"""``/tokenize`` without pieces: token ids."""

CHAT_COMPLETION = rec.record(usage=_or(rec.record(completion_tokens=_or(_COUNT, 0)), {}))
"""``/v1/chat/completions``: how many tokens it generated."""


def read_body(response: httpx.Response, what: str, *, max_bytes: int = MAX_ANSWER_BYTES,
              deadline: float | None = None) -> bytes:
    """The body of a streamed ``response``, refused past ``max_bytes`` or past ``deadline`` (``time.monotonic``)."""
    chunks: list[bytes] = []
    size = 0
    for chunk in response.iter_bytes():
        size += len(chunk)
        if size > max_bytes:
            raise TunerError(f"llama-server's answer to {what} is larger than the limit of {max_bytes} bytes")
        if deadline is not None and time.monotonic() > deadline:
            raise TunerError(f"llama-server's answer to {what} took too long (it trickled in)")
        chunks.append(chunk)
    return b"".join(chunks)


def check_answer(body: bytes, schema: rec.Check, what: str) -> dict[str, Any]:
    """``body`` parsed as JSON and checked against ``schema``: the answer, with the fields tuner reads replaced by
    their checked values (defaults filled in); the others are passed on as they are, unread."""
    try:
        data = rec.parse_json(body, MAX_ANSWER_BYTES)
        checked = rec.validate(schema, data)
        return {**data, **checked} if isinstance(data, dict) else dict(checked)
    except rec.RecordError as error:
        start = " ".join(body[:60].decode("utf-8", "replace").split())
        raise TunerError(f"llama-server's answer to {what} is not what llama-server sends ({error}; it began "
                         f"{shown(start, 50)})") from None


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text from llama-server's ``/metrics`` (``--metrics``) → ``{"llamacpp:tokens_predicted_total": …}``;
    lines that are not ``name value`` with a finite value are skipped."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, rest = line.partition(" ")
        try:
            value = float(rest.split()[0])
        except (ValueError, IndexError):
            continue
        if math.isfinite(value) and len(name) <= 256:
            values[name.split("{", 1)[0]] = value
    return values
