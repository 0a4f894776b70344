"""What llama-server says it allocated: its load log parsed into bytes per device.

Run the server with ``-lv 4`` (the buffer lines are INFO, which this llama.cpp prints only at verbosity 4); with
``--log-jsonl`` every line is a JSON object and the parser reads its ``msg``. The lines read (formats from the source,
paths relative to the llama.cpp tree):

* ``llama_context: n_seq_max = N`` / ``n_ctx = N`` / ``n_ctx_seq = N`` / ``n_ubatch`` … (llama-context.cpp:308-320)
* ``load_tensors: <buffer> model buffer size = X MiB`` (llama-model.cpp:1930)
* ``llama_kv_cache: <buffer> KV buffer size = X MiB`` and ``llama_kv_cache: size = X MiB (…)`` (llama-kv-cache.cpp:291,
  301)
* ``llama_memory_recurrent: <buffer> RS buffer size = X MiB`` and ``… size = X MiB (…)``
  (llama-memory-recurrent.cpp:124, 133)
* ``sched_reserve: <buffer> compute buffer size = X MiB`` (llama-context.cpp:740)
* ``llama_context: <buffer>  output buffer size = X MiB`` (llama-context.cpp:381)
* the JSON line ``{"type": "fit_memory_breakdown", …}`` (common/fit.cpp:1082, with ``--log-jsonl``); the server prints
  one on exit, so the last one describes the running context.
* the vision projector (``--mmproj``), kind ``vision``: ``clip_ctx: CLIP using <backend> backend`` (its device,
  tools/mtmd/clip.cpp:202, 207), ``load_hparams: model size: X MiB`` (its weights, clip.cpp:2125) and
  ``reserve_compute_meta: <buffer> compute buffer size = X MiB`` (its encoder's compute buffer, clip.cpp:3815; when
  flash attention falls back it reserves again, and the last line per buffer counts).

Every size is printed in MiB with two decimals (``%8.2f``), so each parsed figure is exact to within
:data:`MIB_PRINT_ROUNDING_BYTES`; :meth:`ReportedMemory.tolerance_bytes` gives the bound for a sum of lines.

Buffer names are normalised to devices: ``CPU``, ``CPU_Mapped`` (mmap'ed weights), ``CPU_REPACK`` (weights the CPU
backend re-lays out for its matmul kernels), ``CUDA_Host`` (pinned) and any other ``*_Host`` buffer are host memory,
``CPU``; ``CUDA0``, ``CUDA0_Split`` … are ``CUDA0``. The raw names stay available in :attr:`ReportedMemory.buffers`.

A log can hold several contexts: llama-server with ``--spec-type draft-mtp`` creates a second (draft) context after the
target one. Each ``llama_context: constructing`` line (or the first context line) starts a new
:class:`ContextReport`; the per-kind totals of :class:`ReportedMemory` add all of them up, as the estimate does.
A context that reserves its graph again (the draft context does) replaces its compute buffer, so only its last
``compute buffer size`` line per buffer counts. ``--fit`` probes log below ``-lv 4`` and add no lines (measured).
``CPU_REPACK`` buffers are copies of weights that also stay mapped: see :attr:`ReportedMemory.repacked_bytes`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from tuner import records as rec
from tuner.units import MiB

CPU = "CPU"
KINDS: tuple[str, ...] = ("weights", "kv", "recurrent", "compute", "output", "vision")
VISION_CONTEXT = -2  # the context index of the projector's buffers (it is no llama_context)
# "%8.2f MiB" is exact to half a hundredth of a MiB.
MIB_PRINT_ROUNDING_BYTES = -(-MiB // 200)

# Figures of at most 15 digits (a double holds them exactly): a longer one matches nothing, so no line of a hostile
# log becomes an infinity or an integer Python refuses to parse.
_SIZE = r"(?P<mib>\d{1,15}(?:\.\d{1,15})?) MiB"
_BUFFER_LINES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("weights", re.compile(rf"load_tensors:\s+(?P<buf>\S+) model buffer size\s*=\s*{_SIZE}")),
    ("kv", re.compile(rf"llama_kv_cache:\s+(?P<buf>\S+) KV buffer size\s*=\s*{_SIZE}")),
    ("recurrent", re.compile(rf"llama_memory_recurrent:\s+(?P<buf>\S+) RS buffer size\s*=\s*{_SIZE}")),
    ("compute", re.compile(rf"sched_reserve:\s+(?P<buf>\S+) compute buffer size\s*=\s*{_SIZE}")),
    # after the "llama_context:" of llama-context.cpp:381; a pattern that opens with \S+ would retry it at every
    # character of a long line (quadratic time on a hostile log)
    ("output", re.compile(rf":\s+(?P<buf>\S+)\s+output buffer size\s*=\s*{_SIZE}")),
)
_KV_SIZE_RE = re.compile(
    rf"llama_kv_cache: size =\s*{_SIZE} \(\s*(?P<cells>\d{{1,15}}) cells,\s*(?P<layers>\d{{1,15}}) layers,\s*"
    rf"(?P<seqs>\d+)/"
    rf"(?P<streams>\d+) seqs\), K \((?P<tk>\w+)\):\s*(?P<k>[\d.]+) MiB, V \((?P<tv>\w+)\):\s*(?P<v>[\d.]+) MiB")
_RS_SIZE_RE = re.compile(
    rf"llama_memory_recurrent: size =\s*{_SIZE} \(\s*(?P<cells>\d{{1,15}}) cells,\s*(?P<layers>\d+) layers,\s*"
    rf"(?P<seqs>\d+) seqs\s+(?P<rs_seq>\d+) rs_seq\)")
_CTX_PARAM_RE = re.compile(r"llama_context: (?P<key>n_seq_max|n_ctx|n_ctx_seq|n_batch|n_ubatch|flash_attn|kv_unified"
                           r"|n_rs_seq|n_outputs_max)\s+= (?P<value>\S{1,15})(?!\S)")
_CTX_START_RE = re.compile(r"llama_context: constructing llama_context")
_CLIP_BACKEND_RE = re.compile(r"clip_ctx: CLIP using (?P<buf>\S+) backend")
_CLIP_WEIGHTS_RE = re.compile(rf"load_hparams: model size:\s*{_SIZE}")
_CLIP_COMPUTE_RE = re.compile(rf"reserve_compute_meta:\s+(?P<buf>\S+) compute buffer size\s*=\s*{_SIZE}")
_DEVICE_RE = re.compile(r"^(?P<dev>[A-Za-z]+\d+)(?:_Split)?$")
# Lines that say the model did not load (llama-context.cpp:3838-3849, tools/server/server.cpp:475-480).
_ERROR_RES: tuple[re.Pattern[str], ...] = tuple(re.compile(p) for p in (
    r"quantized V cache requires flash_attn[^\n]*",
    r"failed to (?:load model|create context|initialize)[^\n]*",
    r"exiting due to model loading error",
    r"error loading model[^\n]*",
))


def device_of(buffer_name: str) -> str:
    """The device a llama.cpp buffer lives on: host buffers (CPU, CPU_Mapped, CPU_REPACK, CUDA_Host) are ``CPU``."""
    name = buffer_name.strip()
    if name.upper().startswith("CPU") or name.endswith("_Host"):
        return CPU
    m = _DEVICE_RE.match(name)
    return m.group("dev") if m else name


@dataclass(frozen=True)
class ReportedBuffer:
    """One ``… buffer size = X MiB`` line: its kind (weights, kv, recurrent, compute, output), buffer, bytes."""

    kind: str
    buffer: str  # as printed: CPU_Mapped, CPU_REPACK, CUDA0, CUDA_Host …
    bytes: int
    context: int  # index of the llama_context it belongs to (-1: the model, before any context; -2: the projector)
    part: str = ""  # vision: "weights" or "compute"

    @property
    def device(self) -> str:
        return device_of(self.buffer)


@dataclass(frozen=True)
class ContextReport:
    """The parameters of one llama_context as it printed them, and its ``size = …`` summary lines in bytes."""

    n_ctx: int | None = None
    n_ctx_seq: int | None = None
    n_seq: int | None = None
    n_batch: int | None = None
    n_ubatch: int | None = None
    flash_attn: str | None = None
    kv_unified: bool | None = None
    n_rs_seq: int | None = None
    n_outputs_max: int | None = None
    kv_size_bytes: int | None = None  # llama_kv_cache: size = …
    kv_cells: int | None = None
    kv_layers: int | None = None
    recurrent_size_bytes: int | None = None  # llama_memory_recurrent: size = …
    recurrent_cells: int | None = None


@dataclass(frozen=True)
class ReportedMemory:
    """llama-server's own account of its buffers. Figures of the first (target) context are the top-level fields;
    per-kind, per-device totals cover every buffer in the log (all contexts)."""

    n_ctx: int | None
    n_ctx_seq: int | None
    n_seq: int | None
    weights: dict[str, int] = field(default_factory=dict)  # device -> bytes
    kv: dict[str, int] = field(default_factory=dict)
    recurrent: dict[str, int] = field(default_factory=dict)
    compute: dict[str, int] = field(default_factory=dict)
    output: dict[str, int] = field(default_factory=dict)
    vision: dict[str, int] = field(default_factory=dict)  # the projector's weights and compute buffer
    buffers: tuple[ReportedBuffer, ...] = ()
    contexts: tuple[ContextReport, ...] = ()
    breakdown: dict[str, Any] | None = None  # the last fit_memory_breakdown JSON object's "data"
    errors: tuple[str, ...] = ()  # why the model did not load, if the log says so

    def by_kind(self, kind: str) -> dict[str, int]:
        if kind not in KINDS:
            raise ValueError(f"unknown memory kind {kind!r} (one of {', '.join(KINDS)})")
        return getattr(self, kind)

    def total(self, kind: str, device: str | None = None) -> int:
        """Bytes of ``kind`` (weights, kv, recurrent, compute, output) on ``device`` (default: all devices)."""
        per_device = self.by_kind(kind)
        if device is not None:
            return per_device.get(device, 0)
        return sum(per_device.values())

    def tolerance_bytes(self, kind: str, device: str | None = None) -> int:
        """How far :meth:`total` can be from the true byte count: half a printed hundredth of a MiB per line."""
        n = sum(1 for b in self.buffers if b.kind == kind and (device is None or b.device == device))
        return n * MIB_PRINT_ROUNDING_BYTES

    @property
    def devices(self) -> tuple[str, ...]:
        seen: dict[str, None] = {}
        for b in self.buffers:
            seen.setdefault(b.device, None)
        return tuple(seen)

    @property
    def repacked_bytes(self) -> int:
        """Weights the CPU backend copied into ``CPU_REPACK`` buffers to re-lay them out for its kernels. They are in
        :meth:`total` ``("weights")`` twice: once repacked (anonymous memory) and once as mapped file pages
        (``CPU_Mapped``, page cache the kernel can drop once they were read)."""
        return sum(b.bytes for b in self.buffers if b.kind == "weights" and b.buffer.upper() == "CPU_REPACK")

    @property
    def loaded(self) -> bool:
        """The log reached the compute buffers of a context and names no load error."""
        return not self.errors and any(b.kind == "compute" for b in self.buffers)

    def context_total(self, kind: str, context: int, device: str | None = None) -> int:
        """Bytes of ``kind`` in one context (0 = the target); weights belong to context -1."""
        return sum(b.bytes for b in self.buffers
                   if b.kind == kind and b.context == context and (device is None or b.device == device))

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_ctx": self.n_ctx,
            "n_ctx_seq": self.n_ctx_seq,
            "n_seq": self.n_seq,
            **{f"{k}_bytes": dict(self.by_kind(k)) for k in KINDS},
            "buffers": [{"kind": b.kind, "buffer": b.buffer, "device": b.device, "bytes": b.bytes,
                         "context": b.context} for b in self.buffers],
            "breakdown": self.breakdown,
            "errors": list(self.errors),
        }


def mib_text_to_bytes(text: str) -> int:
    """``"62.81"`` (MiB, as printed) to bytes, rounded to the nearest byte."""
    return round(float(text) * MiB)


# A --log-jsonl line is a message of a few hundred bytes, or the memory breakdown of a few kB per device
# (common/fit.cpp:1082): a longer or deeper line is no record of llama-server's, and is read as plain text.
MAX_JSON_LINE_CHARS = 1 << 20
MAX_JSON_LINE_DEPTH = 16
_JSON_LINE = rec.json_value(MAX_JSON_LINE_DEPTH, 100_000)


def _json_record(stripped: str) -> dict[str, Any] | None:
    """A ``--log-jsonl`` line as its object, parsed bounded in size and depth (tuner.records); None when it is not
    a JSON object within those bounds."""
    if not (stripped.startswith("{") and stripped.endswith("}")):
        return None
    try:
        obj = rec.validate(_JSON_LINE, rec.parse_json(stripped, MAX_JSON_LINE_CHARS))
    except rec.RecordError:
        return None
    return obj if isinstance(obj, dict) else None


def log_messages(text: str) -> Iterable[str]:
    """The message lines of a log: plain text lines as they are, ``--log-jsonl`` objects by their ``msg``."""
    for line in text.splitlines():
        obj = _json_record(line.strip())
        if obj is not None and isinstance(obj.get("msg"), str):
            yield from obj["msg"].splitlines()
            continue
        yield line


def _last_breakdown(text: str) -> dict[str, Any] | None:
    found: dict[str, Any] | None = None
    for line in text.splitlines():
        stripped = line.strip()
        if '"fit_memory_breakdown"' not in stripped:
            continue
        obj = _json_record(stripped)
        if obj is not None and obj.get("type") == "fit_memory_breakdown":
            data = obj.get("data")
            found = data if isinstance(data, dict) else obj
    return found


def _latest_reservations(buffers: list[ReportedBuffer]) -> list[ReportedBuffer]:
    """A context may reserve its compute graph again (the MTP draft context does): each reservation replaces the
    scheduler's buffers (llama-context.cpp:630), so only the last compute line per context and buffer counts."""
    last: dict[tuple[int, str], int] = {}
    for i, b in enumerate(buffers):
        if _is_reservation(b):
            last[(b.context, b.buffer)] = i
    return [b for i, b in enumerate(buffers) if not _is_reservation(b) or last[(b.context, b.buffer)] == i]


def _is_reservation(b: ReportedBuffer) -> bool:
    return b.kind == "compute" or (b.kind == "vision" and b.part == "compute")


def _ctx_value(key: str, value: str) -> Any:
    """A context parameter as printed; None for a count that is not a number (then the line counts for nothing)."""
    if key == "flash_attn":
        return value
    if key == "kv_unified":
        return value == "true"
    return int(value) if value.isascii() and value.isdigit() else None


def parse_load_log(text: str) -> ReportedMemory:
    """Parse llama-server's (or llama-cli's) load log, plain or ``--log-jsonl``, into :class:`ReportedMemory`."""
    buffers: list[ReportedBuffer] = []
    contexts: list[dict[str, Any]] = []
    errors: list[str] = []
    current = -1  # no context yet: model buffers
    clip_backend = CPU

    def ctx() -> dict[str, Any]:
        return contexts[current]

    def start_context() -> None:
        nonlocal current
        contexts.append({})
        current = len(contexts) - 1

    for msg in log_messages(text):
        if _CTX_START_RE.search(msg):
            start_context()
            continue
        m = _CLIP_BACKEND_RE.search(msg)
        if m:
            clip_backend = m.group("buf")
            continue
        m = _CLIP_WEIGHTS_RE.search(msg) or _CLIP_COMPUTE_RE.search(msg)
        if m:
            compute = "buf" in m.groupdict()
            buffers.append(ReportedBuffer("vision", m.group("buf") if compute else clip_backend,
                                          mib_text_to_bytes(m.group("mib")), VISION_CONTEXT,
                                          "compute" if compute else "weights"))
            continue
        m = _CTX_PARAM_RE.search(msg)
        if m:
            key, value = m.group("key"), _ctx_value(m.group("key"), m.group("value"))
            if value is None:
                continue
            # a context's parameter block starts with n_seq_max; a repeat without "constructing" is a new context
            if current < 0 or (key == "n_seq_max" and "n_seq" in ctx()):
                start_context()
            ctx()["n_seq" if key == "n_seq_max" else key] = value
            continue
        m = _KV_SIZE_RE.search(msg)
        if m:
            if current < 0:
                start_context()
            ctx().update(kv_size_bytes=mib_text_to_bytes(m.group("mib")), kv_cells=int(m.group("cells")),
                         kv_layers=int(m.group("layers")))
            continue
        m = _RS_SIZE_RE.search(msg)
        if m:
            if current < 0:
                start_context()
            ctx().update(recurrent_size_bytes=mib_text_to_bytes(m.group("mib")),
                         recurrent_cells=int(m.group("cells")))
            continue
        for kind, pattern in _BUFFER_LINES:
            m = pattern.search(msg)
            if m:
                if kind != "weights" and current < 0:
                    start_context()
                buffers.append(ReportedBuffer(kind, m.group("buf"), mib_text_to_bytes(m.group("mib")),
                                              -1 if kind == "weights" else current))
                break
        else:
            for err in _ERROR_RES:
                e = err.search(msg)
                if e and e.group(0) not in errors:
                    errors.append(e.group(0).strip())

    buffers = _latest_reservations(buffers)
    per_kind: dict[str, dict[str, int]] = {k: {} for k in KINDS}
    for b in buffers:
        per_kind[b.kind][b.device] = per_kind[b.kind].get(b.device, 0) + b.bytes
    reports = tuple(ContextReport(**c) for c in contexts)
    first = reports[0] if reports else ContextReport()
    return ReportedMemory(
        n_ctx=first.n_ctx,
        n_ctx_seq=first.n_ctx_seq,
        n_seq=first.n_seq,
        weights=per_kind["weights"],
        kv=per_kind["kv"],
        recurrent=per_kind["recurrent"],
        compute=per_kind["compute"],
        output=per_kind["output"],
        vision=per_kind["vision"],
        buffers=tuple(buffers),
        contexts=reports,
        breakdown=_last_breakdown(text),
        errors=tuple(errors),
    )
