"""Configuring and compiling a llama.cpp tree with CMake (+ Ninja when there is one) into the tools tuner runs.

The build directory is ``work/<key>/build/`` under :func:`tuner.paths.cache_dir`, kept so that a rebuild is
incremental; ``work/<key>/build.log`` holds the configure + build output of the last attempt. What is built is
:data:`TARGET_OPTIONS`, one row per tool; the CMake options are :data:`BASE_CMAKE_OPTIONS` plus each target's own,
then the CUDA ones, then the user's extra options.
"""

from __future__ import annotations

import os
import shlex
import shutil
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path

from tuner.build.spec import BuildSpec
from tuner.build.steps import ProgressFn, condense_output, exe, parse_progress, report, run_logged
from tuner.errors import TunerError
from tuner.paths import cache_dir

#: What ``tuner build`` makes: each CMake target, and the ``-D`` options it needs on top of BASE_CMAKE_OPTIONS.
#: Every target here is built, published and required of a cached build.
TARGET_OPTIONS: Mapping[str, Mapping[str, str]] = {
    "llama-server": {"LLAMA_BUILD_SERVER": "ON"},  # tools/CMakeLists.txt:24-28
    "llama-bench": {},
    "llama-fit-params": {},
    # the RPC worker (tools/CMakeLists.txt:32-33, tools/rpc/CMakeLists.txt:1); GGML_RPC=ON also gives llama-server
    # its --rpc client (common/arg.cpp:2683-2685 refuses --rpc without it)
    "ggml-rpc-server": {"GGML_RPC": "ON"},
}
TARGETS = tuple(TARGET_OPTIONS)

# Verified here: Release, static libs (so the binaries in build/bin are self-contained), only what we need, and
# nothing that downloads at configure time (LLAMA_USE_PREBUILT_UI would fetch the web UI).
BASE_CMAKE_OPTIONS: Mapping[str, str] = {
    "CMAKE_BUILD_TYPE": "Release",
    "BUILD_SHARED_LIBS": "OFF",
    "LLAMA_BUILD_TESTS": "OFF",
    "LLAMA_BUILD_EXAMPLES": "OFF",
    "LLAMA_BUILD_TOOLS": "ON",
    "LLAMA_BUILD_APP": "OFF",
    "LLAMA_USE_PREBUILT_UI": "OFF",
    "LLAMA_OPENSSL": "OFF",
    "GGML_NATIVE": "ON",
}
#: compute capability used when CUDA is forced but the GPUs are unknown: llama.cpp's own portable list.
PORTABLE_CUDA_ARCHS = ("75-virtual", "80-virtual", "86-real", "89-real", "90-virtual")


def cmake_options(
    spec: BuildSpec, *, commit_id: str, build_number: int, cuda_compiler: str | None = None
) -> dict[str, str]:
    """Every ``-D`` option of the configure step, in order; the spec's extra options override ours.

    ``commit_id`` / ``build_number`` are what ``llama-server --version`` will print; ``cuda_compiler`` is only
    needed when ``nvcc`` is not on PATH.
    """
    options = dict(BASE_CMAKE_OPTIONS)
    for target_options in TARGET_OPTIONS.values():
        options.update(target_options)
    options["GGML_CUDA"] = "ON" if spec.cuda else "OFF"
    if spec.cuda:
        options["CMAKE_CUDA_ARCHITECTURES"] = ";".join(spec.cuda_archs or PORTABLE_CUDA_ARCHS)
        if cuda_compiler:
            options["CMAKE_CUDA_COMPILER"] = cuda_compiler
    options["LLAMA_BUILD_COMMIT"] = commit_id
    options["LLAMA_BUILD_NUMBER"] = str(build_number)
    options.update(dict(spec.extra_cmake_options))
    return options


def configure_command(
    source_dir: Path, build_dir: Path, options: Mapping[str, str], generator: str | None
) -> list[str]:
    cmd = ["cmake", "-S", str(source_dir), "-B", str(build_dir)]
    if generator:
        cmd += ["-G", generator]
    return cmd + [f"-D{k}={v}" for k, v in options.items()]


def build_command(build_dir: Path, jobs: int) -> list[str]:
    return ["cmake", "--build", str(build_dir), f"-j{jobs}", "--target", *TARGETS]


def work_dir(key: str) -> Path:
    return cache_dir() / "work" / key


def reset_stale_build_dir(build_dir: Path, source_dir: Path, generator: str | None) -> None:
    """CMake refuses a build dir made for another source dir or generator: start that one afresh."""
    cache = build_dir / "CMakeCache.txt"
    if not cache.is_file():
        return
    values = {}
    for line in cache.read_text(errors="replace").splitlines():
        name, sep, value = line.partition("=")
        if sep and ":" in name:
            values[name.split(":", 1)[0]] = value
    home = values.get("CMAKE_HOME_DIRECTORY")
    same_home = home is not None and Path(home).resolve() == source_dir.resolve()
    same_generator = generator is None or values.get("CMAKE_GENERATOR") == generator
    if not (same_home and same_generator):
        shutil.rmtree(build_dir)


def compile_tree(
    key: str, source_dir: Path, options: Mapping[str, str], spec: BuildSpec, on_progress: ProgressFn | None
) -> Path:
    """Configure + build in ``work/<key>/build``; the directory with the :data:`TARGETS` binaries."""
    work = work_dir(key)
    build_dir = work / "build"
    log_path = work / "build.log"
    work.mkdir(parents=True, exist_ok=True)
    generator = "Ninja" if shutil.which("ninja") else None
    reset_stale_build_dir(build_dir, source_dir, generator)
    hint = "to build for CPU instead, pass --no-cuda" if spec.cuda else None
    jobs = os.cpu_count() or 2
    with open(log_path, "w", encoding="utf-8", errors="replace") as log:
        log.write(f"# tuner build {key}, {datetime.now(timezone.utc).isoformat(timespec='seconds')}\n")
        steps = (
            ("configure", configure_command(source_dir, build_dir, options, generator)),
            ("build", build_command(build_dir, jobs)),
        )
        for stage, cmd in steps:
            report(on_progress, stage, None, None, shlex.join(cmd))

            def on_line(line: str, stage: str = stage) -> None:
                done, total = parse_progress(line)
                report(on_progress, stage, done, total, line)

            rc, tail = run_logged(cmd, log, on_line)
            if rc != 0:
                raise TunerError(
                    f"llama.cpp {stage} failed (exit code {rc}): {condense_output(tail)}; full log: {log_path}",
                    hint=hint,
                )
    bin_dir = build_dir / "bin"
    missing = [name for name in TARGETS if not (bin_dir / exe(name)).is_file()]
    if missing:
        raise TunerError(f"the build finished but {', '.join(missing)} is missing from {bin_dir}; full log: {log_path}")
    return bin_dir
