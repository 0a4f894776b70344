"""The cache of published builds: find one, or fetch + compile + publish it, under one lock per build key.

``builds/<key>/bin/`` holds the published binaries (self-contained: static libs) and ``builds/<key>/build.json``
what they are; ``build.json`` is written last, in a temporary directory that is then renamed into place, so a
build is either whole or absent. ``locks/<key>.lock`` lets one process build a key while others wait for it.
``pypi`` and ``git`` builds are immutable and reused as they are; a local source is rebuilt (incrementally) and
re-published every time, since it can change under us.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path

from tuner import records as rec
from tuner.build.binaries import LlamaBuild, build_from_binary, llama_version, short_commit
from tuner.build.cmake import TARGETS, cmake_options, compile_tree
from tuner.build.source import ensure_source, is_commit_hash, slug
from tuner.build.spec import BuildSpec, build_key, find_nvcc, resolve_spec
from tuner.build.steps import ProgressFn, cache_lock, exe, remove_leftovers, replacing, report
from tuner.errors import TunerError
from tuner.hardware import Gpu, read_gpus
from tuner.paths import cache_dir, write_atomic

BUILD_JSON = "build.json"
_SCHEMA = 1


def builds_dir() -> Path:
    return cache_dir() / "builds"


def publish_build(
    key: str, bin_dir: Path, meta: Mapping[str, object], on_progress: ProgressFn | None = None
) -> LlamaBuild:
    """Copy the :data:`~tuner.build.cmake.TARGETS` binaries from ``bin_dir`` into ``builds/<key>`` atomically.

    Everything goes into ``builds/.tmp-<key>-*`` first; ``llama-server --version`` must run; ``build.json`` is
    written last; then the directory is renamed into place (:func:`~tuner.build.steps.replacing`). If anything fails
    or we are interrupted, the temp dir is removed and ``builds/<key>`` is left as it was. The caller holds the key's
    lock.
    """
    report(on_progress, "publish", None, None, str(builds_dir() / key))
    final = builds_dir() / key
    with replacing(final) as tmp:
        (tmp / "bin").mkdir()
        for name in TARGETS:
            shutil.copy2(bin_dir / exe(name), tmp / "bin" / exe(name))
        version_text, binary_commit = llama_version(tmp / "bin" / exe("llama-server"))
        full_meta = {
            **meta,
            "key": key,
            "version_text": version_text,
            "binary_commit": binary_commit,
            "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        full_meta.setdefault("commit", binary_commit)
        write_atomic(tmp / BUILD_JSON, json.dumps(full_meta, indent=2) + "\n")
    published = _read_build(final)
    if published is None:  # pragma: no cover - we just wrote it
        raise TunerError(f"published build {final} cannot be read back")
    report(on_progress, "done", None, None, str(final))
    return published


# What _read_build takes from build.json (written by publish_build), checked: a corrupt file is no build.
BUILD_META = rec.record(key=rec.string(256), version_text=rec.string(64 << 10, control=True),
                        commit=rec.string(128), cuda=rec.boolean(),
                        cmake_options=rec.field(rec.map_of(rec.string(64 << 10, control=True), 4096), {}),
                        source=rec.field(rec.string(4096), ""))


def _read_build(entry: Path) -> LlamaBuild | None:
    """The published build in ``entry``, or None if absent, incomplete or its ``build.json`` does not pass
    :data:`BUILD_META` (then it is built again). Runs nothing."""
    try:
        meta = rec.validate(BUILD_META, rec.read_json_file(entry / BUILD_JSON, 1 << 20))
    except (OSError, ValueError):
        return None
    bins = {name: entry / "bin" / exe(name) for name in TARGETS}
    if not all(p.is_file() for p in bins.values()):
        return None
    return LlamaBuild(
        key=meta["key"],
        root=entry,
        server_bin=bins["llama-server"],
        bench_bin=bins["llama-bench"],
        fit_params_bin=bins["llama-fit-params"],
        rpc_server_bin=bins["ggml-rpc-server"],
        version_text=meta["version_text"],
        commit=short_commit(meta["commit"]),
        cuda=meta["cuda"],
        options=dict(meta["cmake_options"]),
        source=meta["source"],
    )


def find_build(spec: BuildSpec) -> LlamaBuild | None:
    """The published build for ``spec``, if there is a complete one. Instant: reads ``build.json`` only."""
    return _read_build(builds_dir() / build_key(spec))


def ensure_build(spec: BuildSpec, on_progress: ProgressFn | None = None) -> LlamaBuild:
    """The build for ``spec``: the cached one, or fetch + configure + build + publish it (see the module doc)."""
    key = build_key(spec)
    if spec.source_kind != "local":
        cached = find_build(spec)
        if cached is not None:
            report(on_progress, "cached", None, None, str(cached.root))
            return cached

    def waiting() -> None:
        report(on_progress, "wait", None, None, f"another tuner process is building {key}; waiting for it")

    with cache_lock(key, on_wait=waiting):
        if spec.source_kind != "local":
            cached = find_build(spec)  # built by the process we waited for
            if cached is not None:
                report(on_progress, "cached", None, None, str(cached.root))
                return cached
        remove_leftovers(builds_dir() / key)
        cmake = shutil.which("cmake")
        if cmake is None:
            raise TunerError("building llama.cpp needs CMake, and cmake was not found", hint="install cmake >= 3.18")
        nvcc = find_nvcc() if spec.cuda else None
        if spec.cuda and nvcc is None:
            raise TunerError("a CUDA build needs nvcc, and it was not found", hint="or build with --no-cuda")
        source = ensure_source(spec.source_kind, spec.source_ref, on_progress)
        if is_commit_hash(source.commit):
            commit_id = source.commit[:7]
        else:
            commit_id = "local" if spec.source_kind == "local" else f"{spec.source_kind}-{slug(spec.source_ref)}"
        compiler = nvcc if nvcc and shutil.which("nvcc") is None else None
        options = cmake_options(spec, commit_id=commit_id, build_number=source.build_number, cuda_compiler=compiler)
        started = time.time()
        bin_dir = compile_tree(key, source.path, options, spec, on_progress)
        meta = {
            "schema": _SCHEMA,
            "key": key,
            "source": f"{spec.source_kind}:{spec.source_ref}",
            "source_kind": spec.source_kind,
            "version": spec.source_ref if spec.source_kind != "local" else "local",
            "source_dir": str(source.path),
            "origin": source.origin,
            "commit": short_commit(source.commit),
            "source_commit": source.commit,
            "build_number": source.build_number,
            "cmake_options": options,
            "cuda": spec.cuda,
            "cuda_archs": list(spec.cuda_archs),
            "build_seconds": round(time.time() - started, 1),
        }
        return publish_build(key, bin_dir, meta, on_progress)


def obtain_build(
    source: str = "pypi",
    cuda: bool | None = None,
    server_bin: str | Path | None = None,
    gpus: Sequence[Gpu] | None = None,
    on_progress: ProgressFn | None = None,
) -> tuple[LlamaBuild, bool]:
    """The llama.cpp build to run, and whether it was already there (a cache hit, or an existing ``--server-bin``).

    What ``tuner build``, ``serve`` and ``bench`` share. CUDA: ``cuda`` if given, else only when there are GPUs
    (``gpus``; default: what NVML sees) and nvcc is found (:func:`~tuner.build.spec.resolve_spec`); the GPUs'
    compute capabilities pick the CUDA architectures.
    """
    if server_bin:
        return build_from_binary(server_bin), True
    capabilities: list[tuple[int, int]] = []
    if cuda is not False:
        if gpus is None:
            gpus = read_gpus()[0]
        capabilities = [g.compute_capability for g in gpus if g.compute_capability]
    spec = resolve_spec(source, cuda=cuda, gpu_compute_capabilities=capabilities)
    cached = False

    def progress(stage: str, done: int | None, total: int | None, line: str | None) -> None:
        nonlocal cached
        cached = cached or stage == "cached"
        report(on_progress, stage, done, total, line)

    build = ensure_build(spec, progress)
    return build, cached


def current_build(server_bin: str | Path | None = None) -> LlamaBuild | None:
    """The build a command that does not build would run with: ``--server-bin``'s, else the cached build of the
    default source for the GPUs NVML sees; None when there is none yet (or the default cannot be resolved)."""
    if server_bin:
        return build_from_binary(Path(server_bin))
    try:
        caps = [g.compute_capability for g in read_gpus()[0] if g.compute_capability]
        return find_build(resolve_spec("pypi", cuda=None, gpu_compute_capabilities=caps))
    except TunerError:
        return None
