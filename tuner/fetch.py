"""Getting a planned quant's files onto this machine, so llama-server can open them.

* ``source == "local"``: the files are used where they are (checked to exist, nothing is copied).
* ``source == "hub"`` or ``"card"`` (a card resolves to its default repo and file names): every shard of the quant,
  plus the vision projector when vision is on and the MTP sidecar when the plan drafts with it, is downloaded with
  :func:`huggingface_hub.hf_hub_download` into the Hub's own cache (``HF_HOME`` / ``HF_HUB_CACHE``), so files
  already there are not fetched again and other tools share them. ``HF_ENDPOINT`` and ``HF_TOKEN`` (or the token
  ``hf auth login`` saved) are honoured, read when the download starts, as :mod:`tuner.remote` reads them (the Hub
  library itself reads ``HF_ENDPOINT`` only at import).
  Each file is downloaded by a child process (:mod:`tuner.fetch_worker`), so that a download that stalls is given
  up after ``TUNER_DOWNLOAD_STALL_S`` seconds without new bytes, and Ctrl-C or SIGTERM stop it at once, leaving no
  thread or process behind.

Progress goes to ``on_progress(file_name, done_bytes, total_bytes)``; nothing here prints. Failures a user can fix
(no network, a gated repo, a missing file) are :class:`~tuner.errors.TunerError`.
"""

from __future__ import annotations

import json
import math
import os
import selectors
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tuner.candidate import QuantCandidate
from tuner.errors import TunerError
from tuner.procgroup import start_group, stop_group
from tuner.remote import hub_endpoint, hub_token
from tuner.server import exit_reason
from tuner.untrusted import shown

FetchProgressFn = Callable[[str, int, int | None], None]


@dataclass(frozen=True)
class FetchedModel:
    """Local paths of a quant, ready for ``llama-server -m`` (the first shard) and ``--mmproj``."""

    model_path: Path  # the first shard; llama.cpp finds the others beside it
    shard_paths: tuple[Path, ...]
    mmproj_path: Path | None
    downloaded_bytes: int  # 0 when everything was local or already in the Hub cache
    mtp_path: Path | None = None  # the MTP sidecar (-md), when the plan drafts with one


def fetch_candidate(candidate: QuantCandidate, *, vision: bool = False, on_progress: FetchProgressFn | None = None,
                    cache_dir: Path | None = None, mtp_sidecar: bool = False) -> FetchedModel:
    """Local paths for every file of ``candidate`` (downloading what is not here), plus the mmproj if ``vision`` and
    its MTP sidecar if ``mtp_sidecar``. ``cache_dir``: the Hub cache to use (default: the Hub library's, from
    ``HF_HUB_CACHE`` / ``HF_HOME``)."""
    if not candidate.files:
        raise TunerError(f"quant {candidate.quant} lists no files")
    if mtp_sidecar and not candidate.mtp_sidecar:
        raise TunerError(f"quant {candidate.quant} has no MTP sidecar to draft with")
    if candidate.source == "local":
        fetched = _local(candidate, vision)
        if mtp_sidecar:
            path = Path(str(candidate.mtp_sidecar)).expanduser()
            if not path.is_file():
                raise TunerError(f"MTP sidecar {path} does not exist")
            fetched = replace(fetched, mtp_path=path)
        return fetched
    if candidate.source in ("hub", "card"):
        return _from_hub(candidate, vision, on_progress, cache_dir, mtp_sidecar)
    raise TunerError(f"quant {candidate.quant} comes from {candidate.source!r}, which tuner cannot fetch")


def _local(candidate: QuantCandidate, vision: bool) -> FetchedModel:
    paths = tuple(Path(f).expanduser() for f in candidate.files)
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise TunerError(f"model file {missing[0]} does not exist"
                         + (f" (and {len(missing) - 1} more shards)" if len(missing) > 1 else ""))
    mmproj = None
    if vision:
        if not candidate.mmproj:
            raise TunerError(f"vision is on but no mmproj file was found beside {paths[0]}",
                             hint="put the mmproj-*.gguf next to the model, or leave vision off")
        mmproj = Path(candidate.mmproj).expanduser()
        if not mmproj.is_file():
            raise TunerError(f"mmproj file {mmproj} does not exist")
    return FetchedModel(paths[0], paths, mmproj, 0)


def _from_hub(candidate: QuantCandidate, vision: bool, on_progress: FetchProgressFn | None,
              cache_dir: Path | None, mtp_sidecar: bool = False) -> FetchedModel:
    if not candidate.repo:
        raise TunerError(f"quant {candidate.quant} has no Hugging Face repo to download it from")
    wanted = list(candidate.files)
    if vision:
        if not candidate.mmproj:
            raise TunerError(f"vision is on but {candidate.repo} has no mmproj file for {candidate.quant}",
                             hint="leave vision off, or pick a repo that ships an mmproj-*.gguf")
        wanted.append(candidate.mmproj)
    if mtp_sidecar:
        wanted.append(str(candidate.mtp_sidecar))
    local: list[Path] = []
    downloaded = 0
    for name in wanted:
        path, n_bytes = download_file(candidate.repo, name, revision=candidate.revision, on_progress=on_progress,
                                      cache_dir=cache_dir)
        local.append(path)
        downloaded += n_bytes
    shards = tuple(local[: len(candidate.files)])
    return FetchedModel(shards[0], shards, local[len(shards)] if vision else None, downloaded,
                        local[-1] if mtp_sidecar else None)


STALL_ENV = "TUNER_DOWNLOAD_STALL_S"
DEFAULT_STALL_S = 300.0
"""A download that reports no new bytes for this long is given up. The Hub library reports progress per 10 MB
chunk (huggingface_hub's DOWNLOAD_CHUNK_SIZE), so this is also the slowest rate accepted: ~35 kB/s."""
_MAX_LINE_BYTES = 64 << 10
_STOP_GRACE_S = 2.0


def stall_s() -> float:
    """:data:`DEFAULT_STALL_S`, or ``TUNER_DOWNLOAD_STALL_S`` (seconds) when set."""
    text = os.environ.get(STALL_ENV, "").strip()
    if not text:
        return DEFAULT_STALL_S
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise TunerError(f"{STALL_ENV} must be a positive number of seconds, got {shown(text)}")
    return value


def download_file(repo: str, file_name: str, *, revision: str | None = None,
                  on_progress: FetchProgressFn | None = None, cache_dir: Path | None = None) -> tuple[Path, int]:
    """One file of a Hub repo in the Hub cache: (local path, bytes downloaded now; 0 if it was cached).

    The download runs in a child process (:mod:`tuner.fetch_worker`, in a process group of its own that dies with
    tuner): given up when no bytes arrive for :func:`stall_s` seconds, and stopped at once by Ctrl-C or SIGTERM
    (a KeyboardInterrupt here). What is left is the Hub cache's own ``.incomplete`` file, which the next download
    of the same file resumes.
    """
    where = f"{repo}/{file_name}" + (f"@{revision}" if revision else "")
    stall = stall_s()
    job = {"repo": repo, "file": file_name, "revision": revision, "endpoint": hub_endpoint(),
           "cache_dir": str(cache_dir) if cache_dir is not None else None}
    env = dict(os.environ)
    token = hub_token()
    if token:
        env["HF_TOKEN"] = token
    try:
        proc = start_group([sys.executable, "-m", "tuner.fetch_worker"], die_with_parent=True, env=env,
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    except OSError as exc:
        raise TunerError(f"cannot start the download of {where}: {exc.strerror or exc}") from None
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(json.dumps(job).encode())
        proc.stdin.close()
        result = _follow(proc, file_name, where, stall, on_progress)
    finally:
        stop_group(proc, _STOP_GRACE_S)
    if "error" in result:
        raise TunerError(str(result["error"]))
    return Path(str(result["path"])), int(result.get("downloaded") or 0)


def _follow(proc: subprocess.Popen[bytes], file_name: str, where: str, stall: float,
            on_progress: FetchProgressFn | None) -> dict[str, Any]:
    """Read the worker's JSON lines until its result; progress goes to ``on_progress``. TunerError when it stalls
    or ends without a result."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buf = b""
    done_bytes = -1
    last_news = time.monotonic()
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while True:
            if not sel.select(timeout=min(1.0, stall)):
                if time.monotonic() - last_news > stall:
                    raise TunerError(f"downloading {where} stalled: no data for {stall:g} s (set {STALL_ENV} to "
                                     "wait longer; the next try resumes it)")
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                raise TunerError(f"downloading {where} failed: the download process ended without a result "
                                 f"({exit_reason(proc.wait())})")
            buf += chunk
            if len(buf) > _MAX_LINE_BYTES and b"\n" not in buf:
                raise TunerError(f"downloading {where} failed: the download process wrote nonsense")
            *lines, buf = buf.split(b"\n")
            for line in lines:
                try:
                    msg = json.loads(line)
                except ValueError:
                    continue
                if not isinstance(msg, dict):
                    continue
                if "progress" in msg:
                    done, total = msg["progress"]
                    if done > done_bytes:
                        done_bytes, last_news = done, time.monotonic()
                    if on_progress is not None:
                        on_progress(file_name, int(done), None if total is None else int(total))
                elif "path" in msg or "error" in msg:
                    return msg
