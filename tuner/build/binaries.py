"""A usable set of llama.cpp binaries (:class:`LlamaBuild`), and what ``llama-server --version`` says about them.

``--server-bin PATH`` is :func:`build_from_binary`: an existing ``llama-server`` that must run ``--version``, with
``llama-bench`` / ``llama-fit-params`` / ``ggml-rpc-server`` picked up from beside it.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from tuner.build.source import is_commit_hash, short_hash
from tuner.build.steps import condense_output, exe
from tuner.errors import TunerError


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


def _version_output(server_bin: Path | str) -> str:
    try:
        proc = subprocess.run(
            [str(server_bin), "--version"], stdin=subprocess.DEVNULL, capture_output=True, text=True,
            errors="replace", timeout=60,
        )  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        raise TunerError(f"{server_bin} --version did not finish in 60 s") from exc
    except OSError as exc:
        raise TunerError(f"cannot run {server_bin}: {exc.strerror or exc}") from exc
    text = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise TunerError(
            f"{server_bin} --version failed (exit code {proc.returncode}): {condense_output(text.splitlines(), 8)}"
        )
    return text


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
    version_text, commit = parse_version_output(output)

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
