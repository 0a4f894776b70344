"""``tuner serve`` as steps: plan → build → fetch → launch → verify → watch → stop. Each step is a function the CLI
(or a test, or another tool) can call on its own; :func:`run_serve` chains them. Nothing here prints or exits:
progress, results and warnings go to an ``on_event`` callback as small JSON-ready dicts (the CLI prints them as
tables, or as JSON lines with ``--json``), failures are :class:`~tuner.errors.TunerError`.

Events (each one dict; ``--json`` prints them one per line as they are):

* ``{"status": "planning" | "building" | "fetching" | "launching" | "loading" | "verifying" | "ready" | "stopping"
  | "stopped", ...}``; ``ready`` carries ``endpoint``, ``model`` (the alias), ``seconds_to_ready``, ``pid``,
  ``log`` and ``client`` (:func:`client_settings`).
* ``{"plan": {...}}``: the plan chosen (``Plan.to_dict()``) and the exact command line; once more, with
  ``"replanned": true``, when the downloaded file's header is not what the plan was sized for and the plan was made
  again from it (:mod:`tuner.replan`; a ``replan`` warning before it says what changed).
* ``{"memory_check": {"weights" | "kv" | "recurrent" | "compute": {"predicted_bytes", "reported_bytes",
  "diff_bytes", "diff_ratio", "tolerance_ratio", "tolerance_bytes", "within", "devices"}, "devices": [{"name",
  "weights" | "kv" | "recurrent" | "compute": {"predicted_bytes", "reported_bytes"}}], "nvml": {...}}}``
  (see :class:`MemoryCheck`; ``devices`` lists every device, ``RPC0[host:port]`` and ``CPU`` included).
* ``{"warning": "one line", "kind": "memory_check" | "spill" | "low_vram" | "pinned" | "replan" | "chat_template"
  | ..., ...}``.
* ``{"health": [{"kind", "severity", "message", "fix"}, ...]}``: :mod:`tuner.health`'s findings for the downloaded
  file; its warnings also come one by one as ``warning`` events. When the file's chat template is stale, the server
  gets the official one with ``--chat-template-file`` (unless the arguments already pass a template) and
  ``{"status": "chat_template", "file": …, "source": "official" | "user", "message": …}`` says which it got.

Launch rules (tools/server/server-context.cpp, common/arg.cpp): the plan's flags with ``--fit off`` (the plan
already fitted; llama.cpp's own fitting would change it) and an explicit ``--ctx-size``; ``--jinja``; ``-lv 4``
because the buffer-size lines :mod:`tuner.serverlog` reads are INFO lines (the log goes to a file, not the terminal;
measured on a tiny model: 13 kB at load, 3 kB per request, more when the prompt cache holds many prompts since each
request lists them, and ~90 B per /metrics poll of the watcher); ``--metrics`` for the watcher; ``--alias`` so
clients see a stable model name; the card's sampling preset. After ``/health`` answers 200, one real chat completion
must produce a token before the server is called ready. If the load fails and the log shows a pinned (page-locked)
host allocation failing, the launch is retried once with ``GGML_CUDA_NO_PINNED=1``
(:data:`tuner.server.NO_PINNED_ENV`).

Observations (for the profile store): after every successful launch, the memory check is written to
``tuner.paths.config_dir()/observations/<model stem>-<key>.json``, ``key`` = the first 16 hex digits of the sha256 of
``json.dumps([model file name, model file bytes, ServerFlags.to_args()])``, so the same model file with the same
memory-relevant flags overwrites its earlier observation. The file (format 1)::

    {"format": 1, "key": "…", "observed_at": "2026-…Z",
     "model": {"file": "x.gguf", "path": "/…/x.gguf", "bytes": N, "quant": "Q4_K_M", "arch": "qwen35moe",
               "source": "local", "repo": null},
     "flags": ["--ctx-size", "65536", …],            # ServerFlags.to_args() of the plan
     "command": ["llama-server", …],                  # the full launch command
     "build": {"key": "pypi-0.3.36-cuda-89", "commit": "…", "cuda": true},
     "gpus": [{"index": 0, "name": "NVIDIA …", "vram_total_bytes": N}],
     "memory_check": {…as the event…},
     "mismatches": ["compute"],                       # kinds beyond tolerance; [] when the estimate held
     "points": [{"kind": "memory", …}]}               # tuner.corrections.MemoryPoint.to_dict(), one per device

The points compare the *pure* estimate (:func:`tuner.corrections.corrected_estimate` without a calibration) with
what llama.cpp reported on each device, and, on a GPU, NVML's memory of the process there: they go into the profile
store at once (:meth:`tuner.profile_store.ProfileStore.add_points`), so the next plan or estimate for the same GPU
model (or CPU) and llama.cpp build is corrected by them (the correction model is :mod:`tuner.corrections`'s).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, cast

from tuner.build import LlamaBuild, obtain_build
from tuner.build import ProgressFn as BuildProgressFn
from tuner.cards import preset_args
from tuner.corrections import MEMORY_KINDS, Calibration, MemoryPoint, corrected_estimate, memory_points
from tuner.devices import CPU
from tuner.errors import TunerError
from tuner.estimate import MemoryEstimate
from tuner.fetch import FetchedModel, FetchProgressFn, fetch_candidate
from tuner.flags import FLAGS, flag_value, has_flag, set_flag, without_flags
from tuner.hardware import Gpu, Hardware, NvmlApi, gpu_process_memory_bytes, read_gpus
from tuner.health import Health
from tuner.layout import ModelLayout
from tuner.models import QuantCandidate
from tuner.paths import cache_dir, config_dir, write_atomic
from tuner.planner import Measured, Plan, Wishes, plan_for
from tuner.replan import replan_from_file
from tuner.rpc import unreachable
from tuner.server import (
    NO_PINNED_ENV,
    LlamaServer,
    check_bind,
    error_summary,
    exit_reason,
    pinned_memory_failure,
    ready_timeout_s,
)
from tuner.serverlog import ReportedMemory, parse_load_log
from tuner.units import MiB, fmt_bytes
from tuner.untrusted import has_control, shown

Event = dict[str, Any]
EventFn = Callable[[Event], None]

#: How far llama-server's own figures may be from the estimate before it is a warning (fraction of the reported).
TOLERANCE_RATIOS: Mapping[str, float] = {"weights": 0.01, "kv": 0.01, "recurrent": 0.01, "compute": 0.20,
                                          "vision": 0.05}
#: kinds checked only when the plan has them (a projector): no line for them is then no warning
_OPTIONAL_KINDS = ("vision",)
OBSERVATION_FORMAT = 1


def _emit(on_event: EventFn | None, event: Event) -> None:
    if on_event is not None:
        on_event(event)


# ------------------------------------------------------------------------------------------------------ options


@dataclass(frozen=True)
class ServeOptions:
    """Everything ``tuner serve`` takes besides the model and the planner's wishes."""

    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None
    source: str = "pypi"
    server_bin: str | None = None
    cuda: bool | None = None
    preset: str | None = None
    alias: str | None = None
    log_path: Path | None = None
    ready_timeout_s: float = 3600.0
    stop_grace_s: float = 15.0
    watch_interval_s: float = 5.0
    extra_env: Mapping[str, str] = field(default_factory=dict)


def preflight(options: ServeOptions) -> None:
    """What can be refused before any work: a public bind without an API key, a port already in use, an alias
    clients could not be shown, a ready timeout that is no number."""
    check_bind(options.host, options.port, options.api_key)
    if options.alias is not None and (not options.alias.strip() or len(options.alias) > 256
                                      or has_control(options.alias)):
        raise TunerError(f"--alias {shown(options.alias, 60)} is not a model name clients can be shown (1 to 256 "
                         "characters, no control characters)")
    ready_timeout_s(options.ready_timeout_s)


# ------------------------------------------------------------------------------------------------------ plan


def plan_serve(model_ref: str | None, hardware: Hardware, wishes: Wishes, measured: Measured | None = None,
               calibration: Calibration | None = None) -> Plan:
    """The plan ``tuner recommend`` would print for the same arguments (the planner's own entry point; None = the
    Qwen3.5-35B-A3B card; ``measured`` and ``calibration``: the profile's, as recommend passes them). TunerError
    when nothing fits, even at the smallest context."""
    return plan_for(model_ref, hardware, wishes, measured=measured, calibration=calibration).plan


# ------------------------------------------------------------------------------------------------------ build


def gpus_for_build(hardware: Hardware) -> list[Gpu]:
    """The GPUs a build for this plan must run on: none for a CPU plan (or one whose devices are all behind RPC),
    else the ones NVML sees (a ``--gpu`` catalog card is a what-if; the binary still runs on this machine's GPUs)."""
    if not hardware.local_gpus:
        return []
    detected = [g for g in hardware.local_gpus if g.source == "nvml"]
    return detected or list(read_gpus()[0])


# ------------------------------------------------------------------------------------------------------ launch args


def model_alias(candidate: QuantCandidate, model_path: Path, alias: str | None = None) -> str:
    """The model name clients see (``--alias``): given, else the card's key, else the file name without shard suffix."""
    if alias:
        return alias
    if candidate.card_key:
        return f"{candidate.card_key}:{candidate.quant}" if candidate.quant else candidate.card_key
    stem = model_path.name.removesuffix(".gguf")
    return re.sub(r"-\d{5}-of-\d{5}$", "", stem)


def sampling_args(candidate: QuantCandidate, preset: str | None) -> list[str]:
    """The card's sampling flags (``--temp`` …, and ``--reasoning off`` for presets without thinking) for ``preset``
    (default: the card's default preset); [] when the model matches no card and no preset was asked for."""
    return preset_args(candidate.card_key, candidate.layout, preset)


def server_args(plan_command: Sequence[str], estimate: MemoryEstimate, *, alias: str,
                mmproj_path: Path | None = None, sampling: Sequence[str] = (),
                chat_template_file: Path | None = None) -> list[str]:
    """llama-server's arguments after ``-m MODEL --host H --port P [--api-key K]`` for a plan.

    ``plan_command`` is ``Plan.command(server_bin, model_path)`` (its sampling preset included): its binary and the
    flags tuner sets itself (model, host, port, verbosity, alias, projector …, :data:`tuner.flags.FLAGS`'
    ``serve_owned`` rows) are dropped; ``--fit off`` and an explicit ``--ctx-size`` (the estimate's ``n_ctx`` when
    the plan says 0, the model's own) are made sure of; then ``--jinja``, verbosity 4, ``--metrics``, ``--alias``,
    ``--mmproj`` when there is one, ``--chat-template-file`` when the file's template is replaced (unless the plan
    already names a template), and any further ``sampling`` flags.
    """
    rest = list(plan_command)
    if rest and not rest[0].startswith("-"):
        rest = rest[1:]  # the binary
    rest = without_flags(rest, lambda row: not row.serve_owned)
    if flag_value(rest, "fit") != "off":
        rest = set_flag(rest, "fit", "off")
    if not flag_value(rest, "ctx_size"):
        rest = set_flag(rest, "ctx_size", estimate.n_ctx)
    rest += [*FLAGS["jinja"].to_args(True), *FLAGS["verbosity"].to_args(4), *FLAGS["metrics"].to_args(True),
             *FLAGS["alias"].to_args(alias)]
    if mmproj_path is not None:
        rest += FLAGS["mmproj"].to_args(str(mmproj_path))
    if chat_template_file is not None and not any(
            a.split("=", 1)[0] in FLAGS.spellings(lambda f: f.key in ("chat_template", "chat_template_file"))
            for a in rest):
        rest += FLAGS["chat_template_file"].to_args(str(chat_template_file))
    return rest + list(sampling)


def default_log_path(alias: str, port: int) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", alias).strip("._") or "model"
    return cache_dir() / "logs" / f"llama-server-{safe}-{port}.log"


def check_served(plan: Plan, fetched: FetchedModel, header: ModelLayout, on_event: EventFn | None = None) -> Health:
    """:mod:`tuner.health`'s findings for the file about to be served (``header``: the downloaded file's layout, which
    a plan from a card is checked on), emitted as one ``health`` event and a ``warning`` per warning (which template
    is served is :func:`announce_template`'s, once the arguments are known)."""
    from tuner import health

    layout = header if plan.candidate.source == "card" else None
    found = health.check(plan.candidate, vision=plan.vision, layout=layout, mtp_blocked=plan.mtp_blocked,
                         model_paths=[str(p) for p in fetched.shard_paths] if plan.candidate.source != "hub" else ())
    _emit(on_event, {"health": found.to_list()})
    for f in found.findings:
        if f.severity == health.WARNING:
            _emit(on_event, {"warning": f"{f.message}" + (f" (fix: {f.fix})" if f.fix else ""), "kind": f.kind})
    return found


def template_served(args: Sequence[str], official: Path | None) -> dict[str, Any] | None:
    """The ``chat_template`` status for llama-server's arguments ``args`` (as :func:`server_args` returns them) when
    the file's template is stale and ``official`` is the official one fetched: the official template when the
    arguments pass it, else the one the user passed (``--chat-template[-file]``, which :func:`server_args` keeps and
    llama-server uses, common/arg.cpp:3750-3772); None when nothing replaces the file's template."""
    if official is None:
        return None
    given_file, given_text = flag_value(args, "chat_template_file"), flag_value(args, "chat_template")
    if given_file == str(official) and not given_text:
        return {"status": "chat_template", "file": str(official), "source": "official",
                "message": f"serving with the official chat template {official} (--chat-template-file) instead of "
                           "the file's stale one"}
    yours = f"{FLAGS['chat_template_file'].long} {given_file}" if given_file else FLAGS["chat_template"].long
    return {"status": "chat_template", "file": given_file or None, "source": "user",
            "message": f"serving with the chat template you passed ({yours}), not the official one tuner fetched "
                       f"({official}); the file's own template is stale (see the warning)"}


def announce_template(args: Sequence[str], found: Health, on_event: EventFn | None = None) -> None:
    """Emit :func:`template_served`'s status, if any: which template llama-server is about to be given."""
    status = template_served(args, found.chat_template_file)
    if status is not None:
        _emit(on_event, status)


# ------------------------------------------------------------------------------------------------------ launch


def launch(server_bin: Path, model_path: Path, args: Sequence[str], *, host: str = "127.0.0.1", port: int = 8080,
           api_key: str | None = None, log_path: Path | None = None, env: Mapping[str, str] | None = None,
           ready_timeout_s: float = 3600.0, stop_grace_s: float = 15.0,
           on_event: EventFn | None = None) -> LlamaServer:
    """Start llama-server, wait for /health, send one real completion; return the running server.

    Fails fast with llama-server's own error when it exits while loading. A load that fails with a pinned
    host-memory error is retried once with ``GGML_CUDA_NO_PINNED=1`` (the event says so). On any failure (and on
    KeyboardInterrupt) the process is stopped before the exception leaves.
    """
    env = dict(env or {})
    for attempt in (1, 2):
        server = LlamaServer(server_bin, model_path, args, host=host, port=port, log_path=log_path, env=env,
                             api_key=api_key)
        _emit(on_event, {"status": "launching", "command": server.command, "log": str(server.log_path),
                         **({"env": env} if env else {})})
        try:
            server.start()
            _emit(on_event, {"status": "loading", "stage": "starting", "pid": server.pid})
            seconds = server.wait_ready(ready_timeout_s,
                                        on_progress=lambda stage: _emit(on_event, {"status": "loading",
                                                                                   "stage": stage}))
            _emit(on_event, {"status": "verifying", "stage": "test completion", "seconds_to_health": round(seconds, 2)})
            server.smoke_completion()
            return server
        except TunerError:
            failure = None if server.running() else pinned_memory_failure(server.log_text())
            server.stop(stop_grace_s)
            if attempt == 2 or failure is None or "GGML_CUDA_NO_PINNED" in env:
                raise
            kept = server.log_path.with_suffix(".pinned-failure.log")
            with contextlib.suppress(OSError):
                os.replace(server.log_path, kept)
            _emit(on_event, {"warning": f"pinned host memory failed ({failure}); retrying once with "
                                        f"GGML_CUDA_NO_PINNED=1 (first log: {kept})", "kind": "pinned"})
            env = {**env, **NO_PINNED_ENV}
        except BaseException:
            server.stop(stop_grace_s)
            raise
    raise AssertionError("unreachable")  # pragma: no cover


# ------------------------------------------------------------------------------------------------------ verify


@dataclass(frozen=True)
class KindCheck:
    """One memory kind: the estimate against llama-server's load log, in total and per device."""

    kind: str
    predicted_bytes: int
    reported_bytes: int | None  # None: the log has no line for it (llama-server run without -lv 4?)
    tolerance_ratio: float
    print_rounding_bytes: int  # the log prints MiB with two decimals: this much is rounding, not error
    devices: dict[str, tuple[int, int]] = field(default_factory=dict)  # device -> (predicted, reported)

    @property
    def diff_bytes(self) -> int | None:
        return None if self.reported_bytes is None else self.reported_bytes - self.predicted_bytes

    @property
    def diff_ratio(self) -> float | None:
        if self.reported_bytes is None:
            return None
        return abs(self.reported_bytes - self.predicted_bytes) / max(self.reported_bytes, 1)

    @property
    def tolerance_bytes(self) -> int:
        base = self.reported_bytes if self.reported_bytes is not None else self.predicted_bytes
        return max(round(self.tolerance_ratio * base), self.print_rounding_bytes)

    @property
    def within(self) -> bool | None:
        if self.reported_bytes is None:
            return None
        return abs(self.reported_bytes - self.predicted_bytes) <= self.tolerance_bytes

    def to_dict(self) -> dict[str, Any]:
        ratio = self.diff_ratio
        return {"predicted_bytes": self.predicted_bytes, "reported_bytes": self.reported_bytes,
                "diff_bytes": self.diff_bytes, "diff_ratio": None if ratio is None else round(ratio, 6),
                "tolerance_ratio": self.tolerance_ratio, "tolerance_bytes": self.tolerance_bytes,
                "within": self.within,
                "devices": {d: {"predicted_bytes": p, "reported_bytes": r} for d, (p, r) in self.devices.items()}}


@dataclass(frozen=True)
class MemoryCheck:
    kinds: tuple[KindCheck, ...]
    nvml: dict[str, Any] | None = None  # GPU only: NVML's view of the server process

    def kind(self, name: str) -> KindCheck:
        for k in self.kinds:
            if k.kind == name:
                return k
        raise KeyError(name)

    @property
    def mismatches(self) -> list[str]:
        return [k.kind for k in self.kinds if k.within is False]

    def warnings(self) -> list[str]:
        out = []
        for k in self.kinds:
            if k.within is False:
                out.append(f"{k.kind}: llama-server reports {fmt_bytes(k.reported_bytes or 0)}, the estimate said "
                           f"{fmt_bytes(k.predicted_bytes)} ({(k.diff_ratio or 0) * 100:.1f}% off, tolerance "
                           f"{k.tolerance_ratio * 100:.0f}%); remembered for the profile")
            elif k.within is None:
                out.append(f"{k.kind}: the load log has no size for it (was -lv 4 dropped?)")
        return out

    def devices(self) -> list[dict[str, Any]]:
        """Per device (``CUDA0``, ``RPC0[host:port]``, ``CPU``…, the estimate's order first): each kind's
        ``{predicted_bytes, reported_bytes}``."""
        names = list(dict.fromkeys(n for k in self.kinds for n in k.devices))
        return [{"name": n, **{k.kind: {"predicted_bytes": k.devices.get(n, (0, 0))[0],
                                        "reported_bytes": k.devices.get(n, (0, 0))[1]} for k in self.kinds}}
                for n in names]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {k.kind: k.to_dict() for k in self.kinds}
        out["devices"] = self.devices()
        if self.nvml is not None:
            out["nvml"] = self.nvml
        return out


def memory_check(estimate: MemoryEstimate, reported: ReportedMemory, nvml: dict[str, Any] | None = None,
                 tolerances: Mapping[str, float] = TOLERANCE_RATIOS) -> MemoryCheck:
    """Compare the estimate with what llama-server's load log says it allocated, kind by kind and device by device.

    A kind is within tolerance when ``|reported - predicted| <= max(ratio × reported, print rounding)``; the
    rounding term matters only for buffers of a few MiB, whose two-decimal MiB figures are coarse.
    """
    fields = {"weights": "weights_bytes", "kv": "kv_bytes", "recurrent": "recurrent_bytes",
              "compute": "compute_bytes", "vision": "vision_bytes"}
    checks = []
    for kind, ratio in tolerances.items():
        attr = fields[kind]
        predicted = {d.name: int(getattr(d, attr)) for d in estimate.devices if getattr(d, attr)}
        if kind in _OPTIONAL_KINDS and not predicted and not any(b.kind == kind for b in reported.buffers):
            continue
        per_device = dict(reported.by_kind(kind))
        reported_total = reported.total(kind)
        if kind == "weights" and reported.repacked_bytes:
            # CPU_REPACK buffers re-lay out weights that also stay mapped from the file: compare the tensor bytes
            # once (the copy is anonymous host memory on top, reported in the notes of the check).
            per_device[CPU] = per_device.get(CPU, 0) - reported.repacked_bytes
            reported_total -= reported.repacked_bytes
        names = list(dict.fromkeys([*predicted, *per_device]))
        has_lines = any(b.kind == kind for b in reported.buffers)
        checks.append(KindCheck(
            kind=kind,
            predicted_bytes=sum(predicted.values()),
            reported_bytes=reported_total if has_lines else None,
            tolerance_ratio=ratio,
            print_rounding_bytes=reported.tolerance_bytes(kind),
            devices={n: (predicted.get(n, 0), per_device.get(n, 0)) for n in names},
        ))
    return MemoryCheck(tuple(checks), nvml)


def nvml_view(pid: int, gpu_indices: Sequence[int], free_before: Mapping[int, int],
              nvml: NvmlApi | None = None) -> dict[str, Any]:
    """What NVML says the server took: its per-process figure (0 inside containers, where NVML lists host PIDs)
    and the drop in free memory on each GPU since before the launch."""
    process_bytes = gpu_process_memory_bytes(pid, nvml)
    gpus, _ = read_gpus(nvml)
    now = {g.index: g.vram_free_bytes for g in gpus}
    drops = {i: free_before[i] - now[i] for i in gpu_indices if i in free_before and i in now}
    return {"process_bytes": process_bytes, "free_drop_bytes": sum(drops.values()),
            "free_drop_bytes_per_gpu": {str(i): b for i, b in drops.items()},
            "free_bytes_per_gpu": {str(i): now[i] for i in gpu_indices if i in now}}


def observation_key(model_file: Path, flags_args: Sequence[str]) -> str:
    size = model_file.stat().st_size if model_file.exists() else 0
    blob = json.dumps([model_file.name, size, list(flags_args)])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def observations_dir() -> Path:
    return config_dir() / "observations"


def observation_points(plan: Plan, hardware: Hardware, reported: ReportedMemory, view: Mapping[str, Any] | None,
                       build: LlamaBuild, key: str, observed_at: str) -> list[MemoryPoint]:
    """The calibration points of one launch (see the module doc): the pure estimate of the plan's flags against
    what llama.cpp reported per device (CPU_REPACK copies counted once, as :func:`memory_check` does) and, on a GPU,
    NVML's view of the process (its own figure with one GPU, else each GPU's drop in free memory)."""
    layout = plan.candidate.layout
    pure = corrected_estimate(layout, plan.flags, hardware)
    by_kind = {k: dict(reported.by_kind(k)) for k in MEMORY_KINDS}
    if reported.repacked_bytes:
        by_kind["weights"][CPU] = by_kind["weights"].get(CPU, 0) - reported.repacked_bytes
    return memory_points(id_prefix=f"serve:{key}", estimate=pure, reported=by_kind, layout=layout, flags=plan.flags,
                         hardware=hardware, build=build.commit, cuda=build.cuda,
                         process_bytes=gpu_process_bytes(view, hardware), source="serve", observed_at=observed_at)


def gpu_process_bytes(view: Mapping[str, Any] | None, hardware: Hardware) -> dict[str, int | None]:
    """GPU memory the server holds per llama.cpp device, from :func:`nvml_view`: NVML's per-process figure with one
    GPU (when NVML lists the process: not inside containers), else each GPU's drop in free memory since launch."""
    out: dict[str, int | None] = {}
    if not view:
        return out
    drops = view.get("free_drop_bytes_per_gpu") or {}
    own = view.get("process_bytes")
    local = hardware.local_gpus
    for g in local:
        if len(local) == 1 and own:
            out[g.llama_name] = int(own)
        elif str(g.index) in drops:
            out[g.llama_name] = int(drops[str(g.index)])
    return out


def record_observation(check: MemoryCheck, *, model_path: Path, flags_args: Sequence[str], command: Sequence[str],
                       candidate: QuantCandidate | None = None, build: LlamaBuild | None = None,
                       gpus: Sequence[Gpu] = (), points: Sequence[MemoryPoint] = ()) -> Path:
    """Write the memory check for the profile store (format in the module docstring); returns the file."""
    key = observation_key(model_path, flags_args)
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", model_path.name.removesuffix(".gguf"))
    path = observations_dir() / f"{stem}-{key}.json"
    data = {
        "format": OBSERVATION_FORMAT,
        "key": key,
        "observed_at": datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "model": {"file": model_path.name, "path": str(model_path),
                  "bytes": model_path.stat().st_size if model_path.exists() else None,
                  "quant": candidate.quant if candidate else None,
                  "arch": candidate.layout.arch if candidate else None,
                  "source": candidate.source if candidate else None,
                  "repo": candidate.repo if candidate else None},
        "flags": list(flags_args),
        "command": list(command),
        "build": {"key": build.key, "commit": build.commit, "cuda": build.cuda} if build else None,
        "gpus": [{"index": g.index, "name": g.name, "vram_total_bytes": g.vram_total_bytes} for g in gpus],
        "memory_check": check.to_dict(),
        "mismatches": check.mismatches,
        "points": [p.to_dict() for p in points],
    }
    return write_atomic(path, json.dumps(data, indent=2) + "\n")


# ------------------------------------------------------------------------------------------------------ watch


@dataclass(frozen=True)
class WatchSample:
    """One look at the running server: free memory per GPU it uses, and the generation counters of /metrics."""

    t_s: float
    gpu_free_bytes: dict[int, int] = field(default_factory=dict)
    gpu_total_bytes: dict[int, int] = field(default_factory=dict)
    tokens_predicted_total: float | None = None
    tokens_predicted_seconds_total: float | None = None


def take_sample(t_s: float, gpu_indices: Sequence[int], metrics: Mapping[str, float] | None,
                nvml: NvmlApi | None = None) -> WatchSample:
    """A :class:`WatchSample` from NVML (through :func:`tuner.hardware.read_gpus`) and a parsed /metrics."""
    free: dict[int, int] = {}
    total: dict[int, int] = {}
    if gpu_indices:
        gpus, _ = read_gpus(nvml)
        for g in gpus:
            if g.index in gpu_indices:
                free[g.index] = g.vram_free_bytes
                total[g.index] = g.vram_total_bytes
    metrics = metrics or {}
    return WatchSample(t_s, free, total, metrics.get("llamacpp:tokens_predicted_total"),
                       metrics.get("llamacpp:tokens_predicted_seconds_total"))


class SpillWatch:
    """Turns samples into warnings, each once until its condition clears.

    * ``low_vram``: a GPU's free memory fell under the buffer the plan keeps (another process took memory, or
      llama.cpp's pools grew): the next allocation may fail.
    * ``spill``: a GPU is at capacity (free under ``capacity_bytes``) while generation speed fell under
      ``drop_ratio`` of the best seen: the driver may be paging to system memory (Windows' sysmem fallback) or
      the server is thrashing.
    Speed is tokens generated per second of generation, from llama-server's /metrics counters, measured from the
    sample where the last speed was taken over at least ``min_tokens`` tokens (the counters count generation time
    only, so a slow or idle stretch accumulates into the next measurement instead of never giving one).
    """

    def __init__(self, buffer_bytes: int, *, advice: str = "", capacity_bytes: int = 256 * MiB,
                 drop_ratio: float = 0.6, min_tokens: int = 16) -> None:
        self.buffer_bytes = buffer_bytes
        self.advice = advice
        self.capacity_bytes = capacity_bytes
        self.drop_ratio = drop_ratio
        self.min_tokens = min_tokens
        self.best_tg_tok_s: float | None = None
        self.last_tg_tok_s: float | None = None
        self._prev: WatchSample | None = None
        self._active: set[str] = set()

    def _rate(self, sample: WatchSample) -> float | None:
        prev = self._prev
        if (prev is None or sample.tokens_predicted_total is None or prev.tokens_predicted_total is None
                or sample.tokens_predicted_seconds_total is None or prev.tokens_predicted_seconds_total is None):
            return None
        tokens = sample.tokens_predicted_total - prev.tokens_predicted_total
        seconds = sample.tokens_predicted_seconds_total - prev.tokens_predicted_seconds_total
        if tokens < self.min_tokens or seconds <= 0:
            return None
        return tokens / seconds

    def _restart_base(self, sample: WatchSample, rate: float | None) -> bool:
        """Whether ``sample`` becomes the base of the next speed: a speed was just taken, there was no base with
        counters yet, or the counters went backwards (llama-server restarted)."""
        prev = self._prev
        if rate is not None or prev is None or prev.tokens_predicted_total is None:
            return True
        if sample.tokens_predicted_total is None:
            return False
        return sample.tokens_predicted_total < prev.tokens_predicted_total or (
            (sample.tokens_predicted_seconds_total or 0.0) < (prev.tokens_predicted_seconds_total or 0.0))

    def update(self, sample: WatchSample) -> list[Event]:
        """The warnings that start with ``sample`` (each at most once until its condition clears)."""
        rate = self._rate(sample)
        if rate is not None:
            self.last_tg_tok_s = rate
            self.best_tg_tok_s = max(self.best_tg_tok_s or 0.0, rate)
        if self._restart_base(sample, rate):
            self._prev = sample
        events: list[Event] = []
        low = {i: f for i, f in sample.gpu_free_bytes.items() if f < self.buffer_bytes}
        events += self._edge("low_vram", bool(low), lambda: {
            "warning": "GPU memory is short: " + ", ".join(
                f"GPU {i} has {fmt_bytes(f)} free" for i, f in sorted(low.items()))
            + f", under the {fmt_bytes(self.buffer_bytes)} buffer the plan keeps; another process may be using it."
            + (f" {self.advice}" if self.advice else ""),
            "kind": "low_vram", "gpu_free_bytes": {str(i): f for i, f in low.items()}})
        full = [i for i, f in sample.gpu_free_bytes.items() if f < self.capacity_bytes]
        slow = (rate is not None and self.best_tg_tok_s is not None and rate < self.drop_ratio * self.best_tg_tok_s)
        if rate is not None or not full:  # without a new rate, a spill neither starts nor ends
            events += self._edge("spill", bool(full) and slow, lambda: {
                "warning": f"GPU {', '.join(map(str, full))} is at capacity and generation slowed to "
                           f"{rate:.1f} tok/s from {self.best_tg_tok_s:.1f}: memory is probably spilling."
                           + (f" {self.advice}" if self.advice else ""),
                "kind": "spill", "tg_tok_s": rate, "best_tg_tok_s": self.best_tg_tok_s})
        return events

    def _edge(self, name: str, on: bool, make: Callable[[], Event]) -> list[Event]:
        if on and name not in self._active:
            self._active.add(name)
            return [make()]
        if not on:
            self._active.discard(name)
        return []


def spill_advice(flags_args: Sequence[str], n_layer: int) -> str:
    """What to change when memory runs short: more experts on the CPU, or a smaller context."""
    now = flag_value(flags_args, "n_cpu_moe")
    ctx = flag_value(flags_args, "ctx_size")
    ncmoe, ctx_opt = FLAGS["n_cpu_moe"].long, FLAGS["ctx_size"].long
    parts = []
    if not has_flag(flags_args, "cpu_moe"):
        parts.append(f"{ncmoe} {min(n_layer, now + 4) if n_layer else now + 4} (now {now})")
    if ctx > 4096:
        parts.append(f"{ctx_opt} {ctx // 2} (now {ctx})")
    return ("Restart with " + " or ".join(parts) + ", or free the GPU.") if parts else "Free GPU memory."


def watch_until_stopped(server: LlamaServer, watch: SpillWatch, *, gpu_indices: Sequence[int] = (),
                        nvml: NvmlApi | None = None, interval_s: float = 2.0,
                        on_event: EventFn | None = None, max_seconds: float | None = None) -> None:
    """Poll until interrupted (KeyboardInterrupt, which the caller turns SIGTERM into) or ``max_seconds``.

    Each interval: is llama-server alive (if not: TunerError with its log's error, after a ``server_exited``
    event carrying the log's tail), what NVML and /metrics say (warnings from ``watch``). NVML stays initialised
    for the whole loop.
    """
    api = nvml
    opened = False
    if gpu_indices:
        if api is None:
            import pynvml

            api = cast(NvmlApi, pynvml)
        try:
            api.nvmlInit()
            opened = True
        except Exception as exc:  # NVML gone since planning: watch the process only
            _emit(on_event, {"warning": f"NVML unavailable ({exc}); not watching GPU memory", "kind": "nvml"})
            gpu_indices = ()
    started = time.monotonic()
    try:
        while True:
            if not server.running():
                code = server.poll()
                tail = server.log_tail(15)
                _emit(on_event, {"status": "server_exited", "reason": exit_reason(code), "log_tail": tail,
                                 "log": str(server.log_path)})
                raise TunerError(f"llama-server stopped unexpectedly ({exit_reason(code)}): "
                                 f"{error_summary(server.log_text())}{_workers_gone(server.args)} "
                                 f"(log: {server.log_path})")
            metrics = server.metrics()
            sample = take_sample(time.monotonic() - started, gpu_indices, metrics, api if opened else None)
            for event in watch.update(sample):
                _emit(on_event, event)
            if max_seconds is not None and time.monotonic() - started >= max_seconds:
                return
            server.wait_exit(interval_s)  # sleeps, but wakes the moment llama-server exits
    finally:
        if opened and api is not None:
            with contextlib.suppress(Exception):
                api.nvmlShutdown()


def _workers_gone(args: Sequence[str]) -> str:
    """``; RPC worker H:P does not answer now`` for the ``--rpc`` workers of ``args`` that refuse a connection now
    (after llama-server died: which worker it lost); empty without workers or when all answer."""
    endpoints = flag_value(args, "rpc")
    gone = unreachable(endpoints) if endpoints else []
    if not gone:
        return ""
    return f"; RPC worker {', '.join(gone)} {'does' if len(gone) == 1 else 'do'} not answer now"


# ------------------------------------------------------------------------------------------------------ clients


def client_settings(base_url: str, alias: str, api_key: str | None) -> dict[str, Any]:
    """Ready-to-paste settings: an OpenAI-compatible client, and a claude-code-router provider block."""
    key = api_key or "sk-no-key-required"
    return {
        "openai": {"base_url": f"{base_url}/v1", "api_key": key, "model": alias},
        "env": {"OPENAI_BASE_URL": f"{base_url}/v1", "OPENAI_API_KEY": key},
        "claude_code_router": {
            "Providers": [{"name": "llama-server", "api_base_url": f"{base_url}/v1/chat/completions",
                           "api_key": key, "models": [alias]}],
            "Router": {"default": f"llama-server,{alias}"},
        },
    }


# ------------------------------------------------------------------------------------------------------ all of it


@dataclass(frozen=True)
class Serving:
    """A server that passed its checks: what the CLI shows and what the watch loop needs."""

    server: LlamaServer
    plan: Plan
    build: LlamaBuild
    fetched: FetchedModel
    alias: str
    seconds_to_ready: float  # since start_serving was called
    seconds_to_load: float  # since llama-server was started
    check: MemoryCheck
    observation_path: Path | None
    gpu_indices: tuple[int, ...]
    advice: str
    api_key: str | None = None

    def ready_event(self) -> Event:
        """The ``ready`` event: endpoint, alias, pid, timings, log, observation file and client settings."""
        base = self.server.base_url
        return {"status": "ready", "endpoint": f"{base}/v1", "model": self.alias, "pid": self.server.pid,
                "seconds_to_ready": round(self.seconds_to_ready, 2), "seconds_to_load": round(self.seconds_to_load, 2),
                "log": str(self.server.log_path),
                "observation": str(self.observation_path) if self.observation_path else None,
                "client": client_settings(base, self.alias, self.api_key)}


def start_serving(model_ref: str | None, hardware: Hardware, wishes: Wishes, options: ServeOptions, *,
                  on_event: EventFn | None = None, on_build_progress: BuildProgressFn | None = None,
                  on_fetch_progress: FetchProgressFn | None = None,
                  nvml: NvmlApi | None = None, measured: Measured | None = None,
                  calibration: Calibration | None = None) -> Serving:
    """Plan, build, fetch, launch and verify, with their events up to the memory check (the ``ready`` event is
    :meth:`Serving.ready_event`, which :func:`run_serve` emits). The returned server runs until the caller stops it
    (``serving.server.stop()``); on failure nothing is left running."""
    t0 = time.monotonic()
    preflight(options)
    _emit(on_event, {"status": "planning", "model": model_ref})
    plan = plan_serve(model_ref, hardware, wishes, measured, calibration)
    _emit(on_event, {"plan": plan.to_dict()})

    _emit(on_event, {"status": "building", "source": options.server_bin or options.source})
    build, cached = obtain_build(options.source, options.cuda, options.server_bin, gpus_for_build(hardware),
                                 on_build_progress)
    _emit(on_event, {"status": "built", "server_bin": str(build.server_bin), "cached": cached, "cuda": build.cuda,
                     "version": build.version_text})
    if hardware.local_gpus and not build.cuda:
        _emit(on_event, {"warning": f"the plan uses the GPU but {build.server_bin} was built without CUDA (no nvcc?), "
                                    "so it runs on the CPU; install the CUDA toolkit and run `tuner build --cuda`",
                         "kind": "build"})

    candidate = plan.candidate
    _emit(on_event, {"status": "fetching", "quant": candidate.quant, "source": candidate.source,
                     "repo": candidate.repo})
    fetched = fetch_candidate(candidate, vision=plan.vision, on_progress=on_fetch_progress,
                              mtp_sidecar=plan.uses_sidecar)
    replanned = replan_from_file(plan, fetched.model_path, hardware, wishes, measured=measured)
    if replanned.replanned:
        plan = replanned.plan
        candidate = plan.candidate
        _emit(on_event, {"warning": replanned.message(), "kind": "replan", "changes": list(replanned.changes)})
        _emit(on_event, {"plan": plan.to_dict(), "replanned": True})
        if plan.uses_sidecar and fetched.mtp_path is None:  # the file's header let it draft with the sidecar
            fetched = fetch_candidate(candidate, vision=plan.vision, on_progress=on_fetch_progress, mtp_sidecar=True)
    health = check_served(plan, fetched, replanned.header, on_event)

    alias = model_alias(candidate, fetched.model_path, options.alias)
    mmproj = str(fetched.mmproj_path) if fetched.mmproj_path else None
    mtp = str(fetched.mtp_path) if fetched.mtp_path else None
    args = server_args(plan.command(str(build.server_bin), str(fetched.model_path), mmproj, mtp,
                                    preset=options.preset),
                       plan.estimate, alias=alias, mmproj_path=fetched.mmproj_path,
                       chat_template_file=health.chat_template_file)
    announce_template(args, health, on_event)
    log_path = options.log_path or default_log_path(alias, options.port)
    gpu_indices = tuple(g.index for g in hardware.gpus if g.source == "nvml") if build.cuda else ()
    free_before = {g.index: g.vram_free_bytes for g in read_gpus(nvml)[0]} if gpu_indices else {}
    launch_started = time.monotonic()
    server = launch(build.server_bin, fetched.model_path, args, host=options.host, port=options.port,
                    api_key=options.api_key, log_path=log_path, env=options.extra_env,
                    ready_timeout_s=options.ready_timeout_s, stop_grace_s=options.stop_grace_s, on_event=on_event)
    try:
        ready_s = time.monotonic() - launch_started
        reported = parse_load_log(server.log_text())
        view = nvml_view(server.pid or 0, gpu_indices, free_before, nvml) if gpu_indices else None
        check = memory_check(plan.estimate, reported, view)
        _emit(on_event, {"memory_check": check.to_dict()})
        for text in check.warnings():
            _emit(on_event, {"warning": text, "kind": "memory_check"})
        flags_args = plan.flags.to_args()
        observation = None
        try:
            key = observation_key(fetched.model_path, flags_args)
            stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
            points = observation_points(plan, hardware, reported, view, build, key, stamp) if reported.loaded else []
            observation = record_observation(check, model_path=fetched.model_path, flags_args=flags_args,
                                             command=server.command, candidate=candidate, build=build,
                                             gpus=[g for g in hardware.local_gpus if g.index in gpu_indices],
                                             points=points)
            from tuner.profile_store import ProfileStore  # the store is an edge: only once there is something to add

            ProfileStore().add_points(points)
        except (OSError, TunerError) as exc:
            _emit(on_event, {"warning": f"could not record the observation: {exc}", "kind": "observation"})
        advice = spill_advice(args, candidate.layout.n_layer)
        return Serving(server, plan, build, fetched, alias, time.monotonic() - t0, ready_s, check, observation,
                       gpu_indices, advice, options.api_key)
    except BaseException:
        server.stop(options.stop_grace_s)
        raise


def run_serve(model_ref: str | None, hardware: Hardware, wishes: Wishes, options: ServeOptions, *,
              on_event: EventFn | None = None, on_build_progress: BuildProgressFn | None = None,
              on_fetch_progress: FetchProgressFn | None = None,
              nvml: NvmlApi | None = None, measured: Measured | None = None,
              calibration: Calibration | None = None) -> None:
    """:func:`start_serving`, the ``ready`` event, then watch until KeyboardInterrupt (Ctrl-C; the CLI maps SIGTERM
    to it too), then stop llama-server (SIGTERM, SIGKILL after the grace period). Returns normally after a requested
    stop, however soon after ``ready`` it comes; an interruption before that propagates (nothing is left running);
    raises TunerError if llama-server dies on its own."""
    serving: Serving | None = None
    try:
        serving = start_serving(model_ref, hardware, wishes, options, on_event=on_event,
                                on_build_progress=on_build_progress, on_fetch_progress=on_fetch_progress, nvml=nvml,
                                measured=measured, calibration=calibration)
        _emit(on_event, serving.ready_event())
        watch = SpillWatch(serving.plan.budget.buffer_bytes, advice=serving.advice)
        watch_until_stopped(serving.server, watch, gpu_indices=serving.gpu_indices, nvml=nvml,
                            interval_s=options.watch_interval_s, on_event=on_event)
    except KeyboardInterrupt:
        if serving is None:
            raise
        _emit(on_event, {"status": "stopping", "pid": serving.server.pid})
        code = serving.server.stop(options.stop_grace_s)
        _emit(on_event, {"status": "stopped", "reason": exit_reason(code)})
    finally:
        if serving is not None:
            serving.server.stop(options.stop_grace_s)
