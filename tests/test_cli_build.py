"""``tuner build`` as a user runs it: a subprocess, its output, its exit code."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest


def _tuner(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tuner", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def _error_lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("tuner: error:")]


@pytest.mark.server
def test_cached_pypi_build_returns_at_once(llama_build: Any) -> None:
    started = time.monotonic()
    proc = _tuner("build", "--source", "pypi", "--no-cuda", "--json")
    wall_s = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["cached"] is True
    assert result["server_bin"] == str(llama_build.server_bin) and Path(result["server_bin"]).is_file()
    assert result["version"].startswith("version:") and result["commit"] == llama_build.commit
    assert result["cuda"] is False and result["key"] == "pypi-0.3.36-cpu"
    print(f"cached tuner build: {result['seconds']:.2f} s inside, {wall_s:.2f} s as a command")


@pytest.mark.server
def test_build_output_for_people_names_binary_version_and_cache(llama_build: Any) -> None:
    proc = _tuner("build", "--no-cuda")
    assert proc.returncode == 0, proc.stderr
    assert f"llama-server {llama_build.server_bin}" in proc.stdout
    assert "from the cache" in proc.stdout
    assert "version:" in proc.stdout and "build key: pypi-0.3.36-cpu" in proc.stdout


def test_broken_source_dir_fails_with_one_line_naming_the_log(tmp_path: Path, processes_naming: Any,
                                                                broken_llama_source: Path) -> None:
    source = broken_llama_source
    cache = tmp_path / "cache"
    proc = _tuner("build", "--source", str(source), "--no-cuda", env={"TUNER_CACHE_DIR": str(cache)})
    assert proc.returncode != 0
    errors = _error_lines(proc)
    assert len(errors) == 1, proc.stderr
    assert "llama.cpp configure failed" in errors[0]
    log = next((cache / "work").glob("local-llama.cpp-*/build.log"))
    assert f"full log: {log}" in errors[0]
    assert "Configuring incomplete, errors occurred" in log.read_text()
    assert not (cache / "builds").exists() or not any((cache / "builds").iterdir())  # nothing published
    assert "Traceback" not in proc.stderr
    assert processes_naming(str(source)) == []  # no cmake left behind


def _slow_source(directory: Path) -> Path:
    """A "llama.cpp" whose three targets each run a script that never ends: a build that is always in progress."""
    (directory / "src").mkdir(parents=True)
    (directory / "include").mkdir()
    (directory / "src" / "llama.cpp").write_text("// not really\n")
    (directory / "include" / "llama.h").write_text("// not really\n")
    (directory / "compile.sh").write_text("#!/bin/sh\nwhile :; do sleep 0.2; done\n")
    (directory / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.14)\nproject(slow NONE)\n"
        "foreach(t llama-server llama-bench llama-fit-params ggml-rpc-server)\n"
        "  add_custom_target(${t} COMMAND /bin/sh ${CMAKE_SOURCE_DIR}/compile.sh ${t})\n"
        "endforeach()\n")
    return directory


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
def test_interrupted_build_stops_its_compilers_and_caches_nothing(tmp_path: Path, processes_naming: Any,
                                                                  stop_signal: signal.Signals) -> None:
    source = _slow_source(tmp_path / "llama.cpp")
    cache = tmp_path / "cache"
    proc = subprocess.Popen([sys.executable, "-m", "tuner", "build", "--source", str(source), "--no-cuda"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TUNER_CACHE_DIR": str(cache)})
    marker = str(source / "compile.sh")
    try:
        deadline = time.monotonic() + 120
        while not processes_naming(marker):  # ninja is running the "compilers"
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the build never started compiling"
            time.sleep(0.1)
        proc.send_signal(stop_signal)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, stderr
    assert "tuner: interrupted" in stderr and "Traceback" not in stderr
    deadline = time.monotonic() + 10  # killed, then reaped by init: allow a moment
    while processes_naming(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_naming(marker) == [] and processes_naming(str(source)) == []
    assert not (cache / "builds").exists() or not any((cache / "builds").iterdir())  # nothing published


def test_source_that_is_not_llama_cpp_is_refused(tmp_path: Path) -> None:
    proc = _tuner("build", "--source", str(tmp_path), "--no-cuda", env={"TUNER_CACHE_DIR": str(tmp_path / "c")})
    assert proc.returncode != 0
    assert "is not a llama.cpp source tree" in _error_lines(proc)[0]


@pytest.mark.server
def test_existing_server_bin_is_checked_and_used(llama_build: Any) -> None:
    proc = _tuner("build", "--server-bin", str(llama_build.server_bin), "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["server_bin"] == str(llama_build.server_bin)
    assert result["key"].startswith("external-") and result["cached"] is True
    assert result["bench_bin"] == str(llama_build.bench_bin)
    assert result["rpc_server_bin"] == str(llama_build.rpc_server_bin)


def test_usage_errors_are_one_line_with_clicks_exit_code() -> None:
    proc = _tuner("build", "--no-such-option")
    assert proc.returncode == 2
    [error] = _error_lines(proc)  # the wording is click's, and differs between typer releases
    assert error.startswith("tuner: error: No such option") and "--no-such-option" in error, proc.stderr
    assert "internal error" not in proc.stderr and "Traceback" not in proc.stderr


def test_missing_server_bin_is_one_line(tmp_path: Path) -> None:
    proc = _tuner("build", "--server-bin", str(tmp_path / "llama-server"))
    assert proc.returncode != 0
    assert "does not exist" in _error_lines(proc)[0]


def _progress_calls(progress: Any) -> None:
    progress("download", 1 << 20, 10 << 20, None)
    progress("extract", None, None, "llama_cpp_python-0.3.36.tar.gz")
    progress("configure", None, None, "cmake -S x -B y")
    for i in range(1, 4):
        progress("build", i, 3, f"[{i}/3] Building CXX object x{i}.o")
    progress("publish", None, None, "/cache/builds/k")
    progress("done", None, None, "/cache/builds/k")


def test_build_progress_without_a_terminal_is_one_line_per_stage() -> None:
    import io

    from rich.console import Console

    from tuner.cli.build import BuildProgress

    out = io.StringIO()
    with BuildProgress(Console(file=out, force_terminal=False)) as progress:
        _progress_calls(progress)
    assert out.getvalue().splitlines() == [
        "tuner build: downloading llama.cpp source", "tuner build: unpacking source",
        "tuner build: configuring (cmake)", "tuner build: compiling", "tuner build: publishing"]
    assert not progress.cached


def test_build_progress_on_a_terminal_draws_a_bar_and_notes_a_cache_hit() -> None:
    import io

    from rich.console import Console

    from tuner.cli.build import BuildProgress

    out = io.StringIO()
    with BuildProgress(Console(file=out, force_terminal=True, width=120)) as progress:
        _progress_calls(progress)
    assert "publishing" in out.getvalue() and "3/3" in out.getvalue()  # the last frame: stage, bar count
    cached = BuildProgress(Console(file=io.StringIO(), force_terminal=True))
    cached("cached", None, None, "/cache/builds/k")
    assert cached.cached
