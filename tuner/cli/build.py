"""``tuner build``: llama-server, llama-bench and llama-fit-params built from llama.cpp source, cached.

Examples:

    tuner build                                   # llama-cpp-python's llama.cpp from PyPI; CUDA if GPU + nvcc
    tuner build --source pypi:0.3.36 --no-cuda
    tuner build --source git:b11312 --cuda
    tuner build --source ~/src/llama.cpp          # a local checkout, rebuilt incrementally
    tuner build --server-bin /opt/llama/bin/llama-server --json   # check and use an existing binary

A build that is already in the cache returns at once. On failure the one-line error names the build log.
"""

from __future__ import annotations

import time
from types import TracebackType
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn

from tuner.build import LlamaBuild, obtain_build
from tuner.cli import _options as o
from tuner.cli import stop_signals
from tuner.cli._output import emit, err_console, text

_STAGE_LABELS = {
    "download": "downloading llama.cpp source",
    "extract": "unpacking source",
    "clone": "cloning llama.cpp",
    "wait": "waiting for another build",
    "configure": "configuring (cmake)",
    "build": "compiling",
    "publish": "publishing",
}


class BuildProgress:
    """Draws ``tuner.build``'s ``on_progress`` calls on stderr: a bar while compiling, a spinner otherwise. Not a
    terminal: one plain line per stage instead, so logs stay readable."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or err_console
        self.cached = False
        self._stage = ""
        self._live = self.console.is_terminal
        self._progress = Progress(
            SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TextColumn("[dim]{task.fields[line]}"), console=self.console, transient=True,
        )
        self._task: TaskID | None = None
        self._started = False

    def __enter__(self) -> BuildProgress:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        if self._started:
            self._progress.stop()
            self._started = False

    def __call__(self, stage: str, done: int | None, total: int | None, line: str | None) -> None:
        if stage == "cached":
            self.cached = True
            return
        if stage == "done":
            return
        label = _STAGE_LABELS.get(stage, stage)
        if stage != self._stage:
            self._stage = stage
            if not self._live:
                self.console.print(f"tuner build: {label}", highlight=False)
        if not self._live:
            return
        if not self._started:
            self._progress.start()
            self._started = True
        short = (line or "").strip()
        short = short if len(short) <= 60 else "…" + short[-59:]
        if self._task is None:
            self._task = self._progress.add_task(label, total=None, line=short)
        if stage == "download" and total:  # bytes: show MiB
            self._progress.update(self._task, description=label, completed=done // 2**20 if done else 0,
                                  total=max(1, total // 2**20), line="MiB")
        elif done is not None and total:
            self._progress.update(self._task, description=label, completed=done, total=total, line=short)
        else:
            self._progress.update(self._task, description=label, total=None, line=short)


def build_result(build: LlamaBuild, cached: bool, seconds: float) -> dict[str, Any]:
    return {
        "key": build.key,
        "server_bin": str(build.server_bin),
        "bench_bin": str(build.bench_bin) if build.bench_bin else None,
        "fit_params_bin": str(build.fit_params_bin) if build.fit_params_bin else None,
        "rpc_server_bin": str(build.rpc_server_bin) if build.rpc_server_bin else None,
        "version": build.version_text,
        "commit": build.commit,
        "cuda": build.cuda,
        "source": build.source,
        "cached": cached,
        "seconds": round(seconds, 2),
    }


def get_build(source: str, cuda: bool | None, server_bin: str | None,
              progress: BuildProgress | None = None) -> tuple[LlamaBuild, bool]:
    """The llama.cpp build to use, and whether it came from the cache (an existing ``--server-bin`` counts as such),
    with ``progress`` drawn meanwhile. CUDA by default only when NVML sees a GPU and nvcc exists:
    :func:`tuner.build.obtain_build`."""
    with progress or BuildProgress() as shown:
        return obtain_build(source, cuda, server_bin, on_progress=shown)


def render_build(console: Console, result: dict[str, Any]) -> None:
    where = "from the cache" if result["cached"] else f"built in {result['seconds']:.0f} s"
    console.print(f"[bold]llama-server[/bold] {text(result['server_bin'])}  ({where}; "
                  f"{'CUDA' if result['cuda'] else 'CPU'})",
                  highlight=False, soft_wrap=True)
    for name, key in (("llama-bench", "bench_bin"), ("llama-fit-params", "fit_params_bin"),
                      ("ggml-rpc-server", "rpc_server_bin")):
        if result[key]:
            console.print(f"{name} {text(result[key])}", highlight=False, soft_wrap=True)
    console.print(f"[dim]{text(result['version'])}[/dim]", highlight=False, soft_wrap=True)
    console.print(f"build key: {text(result['key'])}", highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    @app.command("build")
    def build_cmd(
        source: o.SourceOpt = "pypi",
        cuda: o.CudaOpt = None,
        server_bin: o.ServerBinOpt = None,
        as_json: o.JsonOpt = False,
    ) -> None:
        """Build llama-server (and llama-bench, llama-fit-params) from source, or reuse the cached build."""
        started = time.monotonic()
        with stop_signals():  # SIGTERM, like Ctrl-C, stops the compilers before tuner exits
            build, cached = get_build(source, cuda, server_bin)
        result = build_result(build, cached, time.monotonic() - started)
        emit(result, as_json=as_json, render=lambda c: render_build(c, result))
