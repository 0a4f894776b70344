"""What to build: a source, CUDA or not and for which GPUs, extra CMake options → a :class:`BuildSpec` and its key.

:func:`resolve_spec` turns ``--source`` (see :mod:`tuner.build.source`), ``--cuda/--no-cuda`` (default: CUDA only
when NVML sees a GPU *and* ``nvcc`` is found) and the GPUs' compute capabilities into a :class:`BuildSpec`.

:func:`build_key` names the build in the cache: ``<kind>-<ref>-cpu`` or ``<kind>-<ref>-cuda-<archs>``
(``pypi-0.3.36-cuda-89``, ``-cuda-86-89``, ``-cuda-portable`` when CUDA is forced without knowing the GPUs), plus
``-<hash>`` of any extra CMake options.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tuner.build.source import SourceKind, parse_source, short_hash, slug, source_id, validate_source_dir
from tuner.build.steps import exe
from tuner.errors import TunerError

_OPTION_RE = re.compile(r"^(?:-D)?([A-Za-z_][A-Za-z0-9_]*)(?::[A-Za-z]+)?=(.*)$", re.DOTALL)


@dataclass(frozen=True)
class BuildSpec:
    """What to build. ``source_ref`` is a version (pypi), a tag/branch/commit (git) or an absolute path (local)."""

    source_kind: SourceKind
    source_ref: str
    cuda: bool
    cuda_archs: tuple[str, ...] = ()
    extra_cmake_options: tuple[tuple[str, str], ...] = ()

    @property
    def key(self) -> str:
        return build_key(self)


def build_key(spec: BuildSpec) -> str:
    """``pypi-0.3.36-cpu``, ``pypi-0.3.36-cuda-89``, ``git-b11312-cuda-86-89-1a2b3c4d`` (extra options hashed)."""
    if spec.cuda:
        variant = "cuda-" + ("-".join(slug(a) for a in spec.cuda_archs) if spec.cuda_archs else "portable")
    else:
        variant = "cpu"
    key = f"{source_id(spec.source_kind, spec.source_ref)}-{variant}"
    if spec.extra_cmake_options:
        key += "-" + short_hash(json.dumps(spec.extra_cmake_options))
    return key


def cuda_arch(capability: tuple[int, int]) -> str:
    """Compute capability → a ``CMAKE_CUDA_ARCHITECTURES`` entry, the way llama.cpp wants it.

    Plain ``<major><minor>`` (8.9 → ``89``, 9.0 → ``90``: ggml uses no sm_90a-only features), except Blackwell
    consumer/workstation 12.x → ``12xa``, the arch-specific target ggml's CUDA CMakeLists rewrites 12x to anyway
    (the FP4 MMA paths need it).
    """
    major, minor = capability
    if major < 5:
        raise TunerError(
            f"a GPU with compute capability {major}.{minor} is too old for llama.cpp's CUDA backend",
            hint="build without CUDA (--no-cuda)",
        )
    arch = f"{major}{minor}"
    return f"{arch}a" if major == 12 else arch


def cuda_archs(capabilities: Sequence[tuple[int, int]]) -> tuple[str, ...]:
    """One entry per distinct compute capability, sorted by capability."""
    return tuple(cuda_arch(cc) for cc in sorted(set(capabilities)))


def decide_cuda(requested: bool | None, capabilities: Sequence[tuple[int, int]], nvcc: str | None) -> bool:
    """``--cuda`` / ``--no-cuda`` win; auto (None) means CUDA only when there is a GPU *and* a CUDA compiler."""
    if requested is not None:
        return requested
    return bool(capabilities) and nvcc is not None


def find_nvcc() -> str | None:
    """``nvcc`` on PATH, else under ``$CUDA_HOME`` / ``$CUDA_PATH`` / ``/usr/local/cuda``."""
    found = shutil.which("nvcc")
    if found:
        return found
    for base in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if base:
            candidate = Path(base) / "bin" / exe("nvcc")
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    return None


def normalize_cmake_options(args: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """``-DKEY=VALUE`` / ``KEY=VALUE`` / ``-DKEY:BOOL=VALUE`` → sorted ``((KEY, VALUE), ...)``, last one wins."""
    options: dict[str, str] = {}
    for arg in args:
        match = _OPTION_RE.match(arg.strip())
        if not match:
            raise TunerError(f"extra CMake option {arg!r} is not of the form -DNAME=VALUE")
        options[match.group(1)] = match.group(2)
    return tuple(sorted(options.items()))


def resolve_spec(
    source: str = "pypi",
    cuda: bool | None = None,
    gpu_compute_capabilities: Sequence[tuple[int, int]] = (),
    extra_cmake_args: Sequence[str] = (),
) -> BuildSpec:
    """The :class:`BuildSpec` for a ``--source`` text, ``--cuda``/``--no-cuda``/auto and the GPUs NVML sees.

    Auto (``cuda=None``) builds for CUDA only when there is a GPU and ``nvcc``; ``cuda=True`` without ``nvcc`` is
    an error. The architectures are those of the GPUs given, or llama.cpp's portable list when none are.
    """
    kind, ref = parse_source(source)
    if kind == "local":
        ref = str(validate_source_dir(Path(ref)))
    nvcc = find_nvcc()
    use_cuda = decide_cuda(cuda, gpu_compute_capabilities, nvcc)
    if use_cuda and nvcc is None:
        raise TunerError(
            "a CUDA build needs the CUDA toolkit, and nvcc was not found",
            hint="install the CUDA toolkit (or set CUDA_HOME), or build for CPU with --no-cuda",
        )
    archs = cuda_archs(gpu_compute_capabilities) if use_cuda else ()
    return BuildSpec(kind, ref, use_cuda, archs, normalize_cmake_options(extra_cmake_args))
