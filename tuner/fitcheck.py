"""``tuner estimate --check``: llama.cpp's own dry run of a flag set, beside tuner's estimate.

``llama-fit-params -m MODEL --fit off --fit-print on <flags>`` loads the model and creates the context with
``no_alloc`` (no weights are read, nothing is allocated) and prints, per device, ``<dev> <model> <context> <compute>``
in MiB, rounded down, then a ``Host`` row (common/fit.cpp:1088-1113, tools/fit-params/fit-params.cpp).

It is not llama-server, and these differences matter (common/fit.cpp, tools/fit-params/fit-params.cpp):

* its ``n_outputs_max`` is ``n_batch``, not llama-server's one per slot, so its compute buffer holds the logits of a
  whole ubatch, ``n_ubatch * n_vocab * 4`` bytes (485 MiB at ub 512 for a 248k vocabulary);
* it has no ``--kv-unified`` (server-only), so with several slots it sizes one KV stream per slot, and its ``-np``
  default is 1 where llama-server's is 4 unified: tuner passes ``-np`` explicitly;
* it has no ``--spec-type``, so an MTP draft context is not part of its figures;
* it has no ``-md`` and no ``--mmproj`` (options of llama-server and a few other tools only: common/arg.cpp:60-64,
  2578-2584, 4241), so an MTP sidecar's or a vision projector's weights are not in its figures either.

The placement flags are common options that it parses as llama-server does (``common_params_parse`` with
``LLAMA_EXAMPLE_FIT_PARAMS``, tools/fit-params/fit-params.cpp:23; ``--rpc``, ``-dev``, ``-ot``, ``-sm``, ``-ts``,
``-mg``: common/arg.cpp:2680-2858): they are passed through, and it runs with llama-server's environment
(:data:`tuner.server.CHILD_ENV`: CUDA devices in PCI bus order). What it cannot take is named in the result's notes.
It runs as llama-server does, in a process group of its own that dies with tuner (:func:`tuner.procgroup.run_group`),
with a deadline and only the last :data:`MAX_OUTPUT_BYTES` of each output kept.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Any

from tuner.errors import TunerError
from tuner.estimate import ServerFlags, context_shape
from tuner.flags import FLAGS
from tuner.layout import ModelLayout
from tuner.procgroup import run_group
from tuner.server import CHILD_ENV
from tuner.units import MiB, fmt_bytes

FIT_PARAMS = "llama-fit-params"
_ROW_RE = re.compile(r"^(?P<dev>\S+) (?P<model>\d+) (?P<context>\d+) (?P<compute>\d+)\s*$")
TIMEOUT_S = 600
# What is kept of each of its outputs (the last bytes): the figures are a row per device, at the end of stdout; its
# log on stderr is tens of kB, the error that stopped it at its end.
MAX_OUTPUT_BYTES = 1 << 20
#: The placement flags llama-fit-params takes (common options, not llama-server's own), written in the table's order
#: (``--rpc`` before ``-dev``, which may name an RPC device) when off their defaults.
PLACEMENT_KEYS = frozenset({"rpc", "split_mode", "main_gpu", "device", "tensor_split", "override_tensor"})


def fit_params_args(flags: ServerFlags, *, draft_model: str | None = None,
                    mmproj: str | None = None) -> tuple[list[str], list[str]]:
    """The llama-fit-params arguments for ``flags``, and notes on what it cannot take: ``--kv-unified``,
    ``--spec-type``, the MTP sidecar ``draft_model`` and the vision projector ``mmproj`` given beside them."""
    args = [arg for key, value in (
        ("ctx_size", flags.ctx_size), ("parallel", flags.n_seq), ("cache_type_k", flags.cache_type_k),
        ("cache_type_v", flags.cache_type_v), ("batch_size", flags.batch_size), ("ubatch_size", flags.ubatch_size),
        ("flash_attn", flags.flash_attn), ("n_gpu_layers", flags.n_gpu_layers),  # None or negative: all
    ) for arg in FLAGS[key].to_args(value)]
    if flags.cpu_moe:
        args += FLAGS["cpu_moe"].to_args(True)
    elif flags.n_cpu_moe:
        args += FLAGS["n_cpu_moe"].to_args(flags.n_cpu_moe)
    if flags.no_kv_offload:
        args += FLAGS["no_kv_offload"].to_args(True)
    for row in FLAGS.planned:
        value = getattr(flags, row.key)
        if row.key in PLACEMENT_KEYS and value != row.default:
            args += row.to_args(value)
    notes: list[str] = []
    if flags.unified and flags.n_seq > 1:
        notes.append(f"llama-fit-params has no --kv-unified: it sized {flags.n_seq} per-slot KV streams, so its "
                     "n_ctx rounding and attention mask differ from llama-server's unified cache")
    if flags.spec_type:
        notes.append(f"llama-fit-params has no --spec-type: the {flags.spec_type} draft context and its snapshots "
                     "are not in its figures")
    if draft_model:
        notes.append(f"llama-fit-params has no -md: the weights of {Path(draft_model).name} are not in its figures")
    if mmproj:
        notes.append(f"llama-fit-params has no --mmproj: the vision projector {Path(mmproj).name} is not in its "
                     "figures")
    return args, notes


def find_fit_params(server_bin: str | Path | None = None) -> Path:
    """llama-fit-params beside ``server_bin``, else the one of tuner's own build of the PyPI llama.cpp."""
    if server_bin:
        path = Path(server_bin).expanduser()
        candidate = (path if path.is_dir() else path.parent) / FIT_PARAMS
        if candidate.is_file():
            return candidate
        raise TunerError(f"no {FIT_PARAMS} beside {path}: --check needs the llama.cpp tools of that build")
    from tuner.build import find_build, resolve_spec

    for cuda in (None, False):
        with contextlib.suppress(TunerError):
            build = find_build(resolve_spec("pypi", cuda=cuda))
            if build is not None and build.fit_params_bin is not None:
                return Path(build.fit_params_bin)
    raise TunerError(f"--check needs llama.cpp's {FIT_PARAMS} and there is no build yet: run `tuner build` first "
                     "(or pass --server-bin of a build that has it)")


def parse_fit_print(stdout: str) -> list[dict[str, Any]]:
    """``<dev> <model> <context> <compute>`` rows (MiB, rounded down) into bytes; ``Host`` is named ``CPU``."""
    rows: list[dict[str, Any]] = []
    for line in stdout.splitlines():
        m = _ROW_RE.match(line.strip())
        if not m:
            continue
        dev = m.group("dev")
        rows.append({"name": "CPU" if dev == "Host" else dev,
                     "model_bytes": int(m.group("model")) * MiB,
                     "context_bytes": int(m.group("context")) * MiB,
                     "compute_bytes": int(m.group("compute")) * MiB})
    return rows


def _last_error(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for line in reversed(lines):
        if re.search(r"error|failed|exception|cannot|unable", line, re.IGNORECASE):
            return " ".join(line.split())[:300]
    return " ".join(lines[-1].split())[:300] if lines else "no output"


def run_fit_check(layout: ModelLayout, flags: ServerFlags, server_bin: str | Path | None = None, *,
                  draft_model: str | None = None, mmproj: str | None = None) -> dict[str, Any]:
    """Run llama-fit-params on ``layout.source`` with ``flags`` (and llama-server's environment); its per-device
    figures in bytes, with notes (``draft_model``, ``mmproj``: files llama-server would load beside, named there)."""
    model = Path(layout.source) if layout.source else None
    if model is None or not model.is_file():
        raise TunerError("--check runs llama.cpp on the model file itself: give a local .gguf")
    binary = find_fit_params(server_bin)
    args, notes = fit_params_args(flags, draft_model=draft_model, mmproj=mmproj)
    cmd = [str(binary), *FLAGS["model"].to_args(str(model)), *FLAGS["fit"].to_args("off"),
           *FLAGS["fit_print"].to_args("on"), *args]
    try:
        run = run_group(cmd, timeout_s=TIMEOUT_S, max_output_bytes=MAX_OUTPUT_BYTES, env={**os.environ, **CHILD_ENV})
    except OSError as exc:
        raise TunerError(f"cannot run {binary}: {exc.strerror or exc}") from None
    if run.timed_out:
        raise TunerError(f"{FIT_PARAMS} did not finish within {TIMEOUT_S} s")
    stdout, stderr = (b.decode("utf-8", errors="replace") for b in (run.stdout, run.stderr))
    rows = parse_fit_print(stdout)
    if run.returncode != 0 or not rows:
        why = f"exit code {run.returncode}" if run.returncode else "it printed no figures"
        raise TunerError(f"{FIT_PARAMS} failed ({why}): {_last_error(stderr + stdout)}")
    shape = context_shape(layout, flags)
    logits = shape.n_ubatch * layout.n_vocab * 4
    notes.insert(0, f"{FIT_PARAMS} reserves logits for a whole ubatch (n_outputs = n_batch): its compute includes "
                    f"~{fmt_bytes(logits)} ({shape.n_ubatch} x {layout.n_vocab} x 4 B) that llama-server, with one "
                    "output per slot, does not allocate")
    notes.append(f"{FIT_PARAMS} prints whole MiB, rounded down")
    return {"tool": FIT_PARAMS, "command": cmd, "devices": rows, "notes": notes}
