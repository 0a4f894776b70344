"""Get llama.cpp source and build ``llama-server``, ``llama-bench`` and ``llama-fit-params`` with CMake, cached.

What ``tuner build`` does (the command lives in ``tuner/cli/build.py``, over this API):

1. :func:`resolve_spec` turns ``--source``, ``--cuda/--no-cuda`` and the GPUs' compute capabilities into a
   :class:`BuildSpec` (:mod:`tuner.build.spec`).
2. :func:`ensure_build` returns the cached build for that spec at once (no pip, no git, no cmake) or gets the
   source (:mod:`tuner.build.source`, with :mod:`tuner.build.pypi` for the sdist), configures and builds the
   tools with CMake + Ninja (:mod:`tuner.build.cmake`), and publishes the result atomically
   (:mod:`tuner.build.cache`). ``--server-bin PATH`` skips all of that: :func:`build_from_binary`
   (:mod:`tuner.build.binaries`).
3. :func:`obtain_build` is the one call ``tuner build``, ``serve`` and ``bench`` make: steps 1 and 2 with the GPUs
   NVML sees, or ``--server-bin``; it also says whether the build was already there. :func:`current_build` is the
   build a command that does not build (``recommend``) would run with.

Nothing here prints or exits: progress goes to ``on_progress(stage, done, total, line)``
(:data:`~tuner.build.steps.ProgressFn`), failures are :class:`~tuner.errors.TunerError`. Tools run in their own
process group and are stopped as a whole when tuner is interrupted (:mod:`tuner.build.steps`).

Cache layout under :func:`tuner.paths.cache_dir`::

    src/<source-id>/llama.cpp/        extracted source (source-id: pypi-0.3.36, git-b11312)
    src/<source-id>/source.json       where it came from, its commit; written last
    work/<key>/build/                 the CMake build dir, kept so that a rebuild is incremental
    work/<key>/build.log              configure + build output of the last attempt
    builds/<key>/bin/llama-server     the published build: self-contained binaries (static libs) ...
    builds/<key>/build.json           ... and what they are; written last, then the directory is renamed in
    locks/<key>.lock                  one builder per key across processes (locks/src-<source-id>.lock: fetchers)

``<key>``: see :func:`build_key`. The rest of tuner imports from ``tuner.build``; the modules of this package import
from each other.
"""

from tuner.build.binaries import LlamaBuild, build_from_binary, llama_version
from tuner.build.cache import current_build, ensure_build, find_build, obtain_build
from tuner.build.source import DEFAULT_GIT_REF, DEFAULT_PYPI_VERSION, parse_source
from tuner.build.spec import BuildSpec, build_key, resolve_spec
from tuner.build.steps import ProgressFn

__all__ = [
    "DEFAULT_GIT_REF",
    "DEFAULT_PYPI_VERSION",
    "BuildSpec",
    "LlamaBuild",
    "ProgressFn",
    "build_from_binary",
    "build_key",
    "current_build",
    "ensure_build",
    "find_build",
    "llama_version",
    "obtain_build",
    "parse_source",
    "resolve_spec",
]
