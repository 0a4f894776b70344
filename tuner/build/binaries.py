"""A usable set of llama.cpp binaries (:class:`LlamaBuild`), and what ``llama-server --version`` says about them.

``--server-bin PATH`` is :func:`build_from_binary`: an existing ``llama-server`` that must run ``--version``, with
``llama-bench`` / ``llama-fit-params`` / ``ggml-rpc-server`` picked up from beside it.
"""

from __future__ import annotations

import os
import re
import selectors
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tuner.build.source import is_commit_hash, short_hash
from tuner.build.steps import condense_output, exe
from tuner.errors import TunerError
from tuner.procgroup import start_group, stop_group


@dataclass(frozen=True)
class LlamaBuild:
    """A usable set of llama.cpp binaries. ``bench_bin`` / ``fit_params_bin`` / ``rpc_server_bin`` are None when not
    found."""

    key: str
    root: Path
    server_bin: Path
    bench_bin: Path | None
    fit_params_bin: Path | None
    version_text: str
    commit: str
    cuda: bool
    options: dict[str, str] = field(default_factory=dict, hash=False)
    source: str = ""
    rpc_server_bin: Path | None = None


def short_commit(commit: str) -> str:
    """Commits the way ``--version`` prints them: 7 hex digits."""
    return commit[:7] if is_commit_hash(commit) else commit


def parse_version_output(text: str) -> tuple[str, str]:
    """``llama-server --version`` output → (version text, commit).

    Current llama.cpp prints ``version: 0.5.0-dev (build 0, commit 0c1e570)`` and ``built with ...``; older ones
    ``version: 4567 (abc1234)``. Device lines that CUDA builds add are left out of the version text.
    """
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    version_lines = [line for line in lines if line.startswith(("version:", "built with"))]
    if not any(line.startswith("version:") for line in version_lines):
        raise TunerError("the binary did not print a llama.cpp 'version:' line for --version")
    joined = "\n".join(version_lines)
    match = re.search(r"commit ([^\s)]+)\)", joined) or re.search(r"version: \S+ \(([0-9A-Za-z._-]+)\)", joined)
    return joined, match.group(1) if match else "unknown"


def llama_version(server_bin: Path | str) -> tuple[str, str]:
    """Run ``server_bin --version``: (version text, commit). TunerError if it does not run or is not llama.cpp."""
    return parse_version_output(_version_output(server_bin))


VERSION_TIMEOUT_S = 60.0
MAX_VERSION_OUTPUT_BYTES = 1 << 20  # llama-server --version prints a few lines (a CUDA build: one per device)


def _version_output(server_bin: Path | str) -> str:
    """What ``server_bin --version`` prints (stdout and stderr), at most :data:`MAX_VERSION_OUTPUT_BYTES`, within
    :data:`VERSION_TIMEOUT_S`; run in a process group of its own, stopped whole however it ends (a binary given as
    ``--server-bin`` may be anything)."""
    try:
        proc = start_group([str(server_bin), "--version"], die_with_parent=True, stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    except OSError as exc:
        raise TunerError(f"cannot run {server_bin}: {exc.strerror or exc}") from exc
    try:
        data, complete = _read_bounded(proc, MAX_VERSION_OUTPUT_BYTES, VERSION_TIMEOUT_S)
        if not complete:
            raise TunerError(f"{server_bin} --version did not finish in {VERSION_TIMEOUT_S:.0f} s")
        if len(data) > MAX_VERSION_OUTPUT_BYTES:
            raise TunerError(f"{server_bin} --version printed more than {MAX_VERSION_OUTPUT_BYTES} bytes: not "
                             "llama-server")
        returncode = proc.wait(timeout=VERSION_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise TunerError(f"{server_bin} --version did not finish in {VERSION_TIMEOUT_S:.0f} s") from None
    finally:
        stop_group(proc, grace_s=1.0)
    text = data.decode("utf-8", errors="replace")
    if returncode != 0:
        raise TunerError(
            f"{server_bin} --version failed (exit code {returncode}): {condense_output(text.splitlines(), 8)}"
        )
    return text


def _read_bounded(proc: subprocess.Popen[bytes], max_bytes: int, timeout_s: float) -> tuple[bytes, bool]:
    """``proc``'s output until EOF (True) or until ``max_bytes`` + 1 bytes or ``timeout_s`` (False: cut short)."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    chunks: list[bytes] = []
    size = 0
    deadline = time.monotonic() + timeout_s
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while size <= max_bytes:
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(timeout=left):
                return b"".join(chunks), False
            chunk = os.read(fd, 65536)
            if not chunk:
                return b"".join(chunks), True
            chunks.append(chunk)
            size += len(chunk)
    return b"".join(chunks), True


def build_from_binary(server_bin: Path | str) -> LlamaBuild:
    """An existing ``llama-server`` (``--server-bin``): check it runs, and take the other tools from beside it."""
    path = Path(server_bin).expanduser().absolute()
    if path.is_dir():
        path = path / exe("llama-server")
    if not path.is_file():
        raise TunerError(f"llama-server binary {path} does not exist")
    if not os.access(path, os.X_OK):
        raise TunerError(f"{path} is not executable")
    output = _version_output(path)
    try:
        version_text, commit = parse_version_output(output)
    except TunerError as error:
        raise TunerError(f"{path}: {error}") from None

    def sibling(name: str) -> Path | None:
        candidate = path.parent / exe(name)
        return candidate if candidate.is_file() and os.access(candidate, os.X_OK) else None

    # a CUDA build says so when it starts (ggml_cuda_init ...), or ships its CUDA backend beside it
    cuda = "cuda" in output.lower() or any(path.parent.glob("*ggml-cuda*"))
    return LlamaBuild(
        key=f"external-{short_hash(str(path))}",
        root=path.parent,
        server_bin=path,
        bench_bin=sibling("llama-bench"),
        fit_params_bin=sibling("llama-fit-params"),
        rpc_server_bin=sibling("ggml-rpc-server"),
        version_text=version_text,
        commit=commit,
        cuda=cuda,
        options={},
        source=str(path),
    )
