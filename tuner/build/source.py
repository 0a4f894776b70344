"""Getting a llama.cpp source tree to build: from the ``llama-cpp-python`` sdist, a git ref, or a local directory.

Sources (``--source``):

- ``pypi[:VERSION]`` (default version :data:`DEFAULT_PYPI_VERSION`): the ``llama-cpp-python`` sdist, which
  vendors llama.cpp (fetched by :mod:`tuner.build.pypi`). Only ``*/vendor/llama.cpp/`` is unpacked, without
  ``models/`` and ``docs/``.
- ``git[:REF]`` (default :data:`DEFAULT_GIT_REF`, the release tag of llama.cpp commit 0c1e570): a shallow clone of
  :data:`LLAMA_CPP_GIT_URL`.
- a directory: a llama.cpp checkout used in place (or a llama-cpp-python checkout, whose ``vendor/llama.cpp`` is
  used). Local sources can change under us, so they are never cached here; ``pypi`` and ``git`` trees are
  immutable and fetched once.

Fetched trees live in ``src/<source-id>/llama.cpp/`` under :func:`tuner.paths.cache_dir`, with
``src/<source-id>/source.json`` (where it came from, its commit) written last; one fetcher per source across
processes (``locks/src-<source-id>.lock``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tuner import records as rec
from tuner.build.pypi import download_sdist
from tuner.build.steps import ProgressFn, cache_lock, condense_output, remove_leftovers, replacing, report, run_logged
from tuner.errors import TunerError
from tuner.paths import cache_dir, write_atomic

SourceKind = Literal["pypi", "git", "local"]

LLAMA_CPP_GIT_URL = "https://github.com/ggml-org/llama.cpp"
DEFAULT_PYPI_VERSION = "0.3.36"
#: llama.cpp tags every master build ``b<build number>``; build 11312 is commit 0c1e570 (2026-10-01), the tree
#: that llama-cpp-python 0.3.36 vendors.
DEFAULT_GIT_REF = "b11312"
SOURCE_JSON = "source.json"

_VERSION_RE = re.compile(r"^[0-9]+(\.[0-9]+)*([a-z0-9.+!-]*)$", re.IGNORECASE)
_REF_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")
_SHA_RE = re.compile(r"^[0-9a-f]{7,40}$")
_TREE_FILES = ("CMakeLists.txt", "src/llama.cpp", "include/llama.h")
_SKIPPED_TOP_DIRS = ("", "models", "docs", ".git")


@dataclass(frozen=True)
class SourceTree:
    """A llama.cpp source directory ready to configure, and what we know about it."""

    path: Path
    commit: str  # full or short hash, or "unknown"
    build_number: int
    origin: str  # URL / file / path it came from


# --------------------------------------------------------------------------------------------- names


def parse_source(text: str) -> tuple[SourceKind, str]:
    """``pypi`` / ``pypi:0.3.36`` / ``git`` / ``git:b11312`` / a directory path → ``(kind, ref)``.

    Local paths come back absolute (not resolved further, not checked: see :func:`validate_source_dir`). A directory
    that happens to be called ``pypi`` or ``git`` is written ``./pypi``.
    """
    text = text.strip()
    if not text:
        raise TunerError("empty build source", hint="use pypi[:VERSION], git[:REF] or a llama.cpp directory")
    head, sep, rest = text.partition(":")
    if head in ("pypi", "git"):
        ref = rest.strip()
        if sep and not ref:
            raise TunerError(f"build source {text!r} has an empty version after ':'")
        if head == "pypi":
            ref = ref or DEFAULT_PYPI_VERSION
            if not _VERSION_RE.match(ref):
                raise TunerError(f"{ref!r} is not a llama-cpp-python version (example: pypi:{DEFAULT_PYPI_VERSION})")
            return "pypi", ref
        ref = ref or DEFAULT_GIT_REF
        if not _REF_RE.match(ref) or ".." in ref:
            raise TunerError(f"{ref!r} is not a git tag, branch or commit (example: git:{DEFAULT_GIT_REF})")
        return "git", ref
    return "local", str(Path(text).expanduser().absolute())


def slug(text: str) -> str:
    """``text`` safe in a file name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "x"


def short_hash(text: str, n: int = 8) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def is_commit_hash(text: str) -> bool:
    """7 to 40 lowercase hex digits."""
    return bool(_SHA_RE.match(text))


def source_id(kind: SourceKind, ref: str) -> str:
    """``pypi-0.3.36``, ``git-b11312``, ``local-<dirname>-<hash of the path>``."""
    if kind == "local":
        return f"local-{slug(Path(ref).name)}-{short_hash(ref)}"
    return f"{kind}-{slug(ref)}"


def source_root(kind: SourceKind, ref: str) -> Path:
    return cache_dir() / "src" / source_id(kind, ref)


def git_fetch_commands(ref: str, dest: Path, url: str = LLAMA_CPP_GIT_URL) -> list[list[str]]:
    """Shallow clone of one tag/branch, or for a commit hash a shallow fetch of that commit."""
    quiet = ["git", "-c", "advice.detachedHead=false"]
    if is_commit_hash(ref) and len(ref) == 40:
        return [
            ["git", "init", "--quiet", str(dest)],
            ["git", "-C", str(dest), "fetch", "--depth", "1", url, ref],
            [*quiet, "-C", str(dest), "checkout", "--quiet", "FETCH_HEAD"],
        ]
    return [[*quiet, "clone", "--depth", "1", "--single-branch", "--branch", ref, url, str(dest)]]


def build_number_from_ref(ref: str) -> int:
    """llama.cpp release tags are ``b<build number>``; anything else is build 0."""
    match = re.fullmatch(r"b(\d+)", ref)
    return int(match.group(1)) if match else 0


# --------------------------------------------------------------------------------------------- trees


def looks_like_llama_cpp(path: Path) -> bool:
    return all((path / name).is_file() for name in _TREE_FILES)


def validate_source_dir(path: Path) -> Path:
    """The llama.cpp tree at ``path`` (or at ``path/vendor/llama.cpp``), or TunerError saying what is missing."""
    if not path.is_dir():
        raise TunerError(f"build source {path} is not a directory", hint="use pypi[:VERSION], git[:REF] or a dir")
    for candidate in (path, path / "vendor" / "llama.cpp"):
        if looks_like_llama_cpp(candidate):
            return candidate
    missing = [name for name in _TREE_FILES if not (path / name).is_file()]
    raise TunerError(f"{path} is not a llama.cpp source tree: no {', '.join(missing)}")


def git_commit(path: Path) -> str:
    """HEAD of the git checkout that is exactly ``path`` (not of some repository that happens to contain it)."""
    try:
        proc = subprocess.run(
            ["git", "-C", str(path), "rev-parse", "--show-toplevel", "HEAD"], capture_output=True, text=True,
            timeout=30, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    lines = proc.stdout.split()
    if proc.returncode != 0 or len(lines) != 2 or not is_commit_hash(lines[1]):
        return "unknown"
    return lines[1] if Path(lines[0]).resolve() == path.resolve() else "unknown"


def unpack_sdist(tarball: Path, dest: Path) -> str | None:
    """Extract ``*/vendor/llama.cpp/`` (without ``models/``, ``docs/`` and its ``.git`` pointer) of a
    llama-cpp-python sdist into ``dest/llama.cpp``. Returns the vendored commit if the sdist records it."""
    out = dest / "llama.cpp"
    commit: str | None = None
    try:
        with tarfile.open(tarball, "r:*") as archive:
            selected: list[tarfile.TarInfo] = []
            for member in archive:
                parts = member.name.split("/")
                if parts[1:] == [".git", "modules", "vendor", "llama.cpp", "HEAD"] and member.isfile():
                    head = archive.extractfile(member)
                    text = head.read(100).decode(errors="replace").strip() if head else ""
                    commit = text if is_commit_hash(text) else None
                    continue
                if len(parts) < 4 or parts[1:3] != ["vendor", "llama.cpp"] or parts[3] in _SKIPPED_TOP_DIRS:
                    continue
                if member.issym() or member.islnk() or not (member.isfile() or member.isdir()):
                    continue  # the tree has no links; refuse them rather than reason about where they point
                rel = "/".join(parts[3:])
                if rel.startswith("/") or ".." in rel.split("/"):
                    raise TunerError(f"{tarball.name} has an unsafe path {member.name!r}")
                renamed = copy.copy(member)
                renamed.name = rel
                selected.append(renamed)
            if not selected:
                raise TunerError(f"{tarball.name} has no vendor/llama.cpp directory")
            out.mkdir(parents=True, exist_ok=True)
            extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            archive.extractall(out, members=selected, **extra)  # type: ignore[arg-type]
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise TunerError(f"cannot unpack {tarball}: {exc}") from exc
    if not looks_like_llama_cpp(out):
        raise TunerError(f"{tarball.name}: vendor/llama.cpp is not a complete llama.cpp tree")
    return commit


# --------------------------------------------------------------------------------------------- fetching


def ensure_source(kind: SourceKind, ref: str, on_progress: ProgressFn | None = None) -> SourceTree:
    """The llama.cpp tree of a source: a local directory as it is, a fetched one from the cache, or fetched now."""
    if kind == "local":
        path = validate_source_dir(Path(ref))
        return SourceTree(path, git_commit(path), 0, str(path))
    sid = source_id(kind, ref)
    root = source_root(kind, ref)
    with cache_lock(f"src-{sid}"):
        existing = read_source(root)
        if existing is not None:
            return existing
        remove_leftovers(root)  # of a fetch killed too hard to clean up after itself
        with replacing(root) as tmp:  # replaces an unfinished earlier attempt (no source.json)
            info = _fetch_pypi(ref, tmp, on_progress) if kind == "pypi" else _fetch_git(ref, tmp, on_progress)
            write_atomic(tmp / SOURCE_JSON, json.dumps(info, indent=2) + "\n")
    source = read_source(root)
    if source is None:  # pragma: no cover - we just wrote it
        raise TunerError(f"llama.cpp source in {root} cannot be read back")
    return source


# What read_source takes from source.json, checked.
SOURCE_META = rec.record(commit=rec.field(rec.string(128), "unknown"),
                         build_number=rec.field(rec.integer(0, (1 << 31) - 1), 0),
                         origin=rec.field(rec.string(4096), ""))


def read_source(root: Path) -> SourceTree | None:
    """The fetched tree in ``root`` (``src/<source-id>``), or None if it is absent or unfinished."""
    try:  # a corrupt source.json is an unfinished fetch: fetched again
        info = rec.validate(SOURCE_META, rec.read_json_file(root / SOURCE_JSON, 1 << 20))
    except (OSError, ValueError):
        return None
    path = root / "llama.cpp"
    if not looks_like_llama_cpp(path):
        return None
    return SourceTree(path, info["commit"], info["build_number"], info["origin"])


def _fetch_git(ref: str, dest: Path, on_progress: ProgressFn | None) -> dict[str, object]:
    if shutil.which("git") is None:
        raise TunerError("a git source needs git, and it was not found", hint="or use --source pypi")
    tree = dest / "llama.cpp"
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_LFS_SKIP_SMUDGE": "1"}
    log_path = dest.parent / f"{dest.name}.log"
    try:
        with open(log_path, "w", encoding="utf-8", errors="replace") as log:
            for cmd in git_fetch_commands(ref, tree):
                report(on_progress, "clone", None, None, shlex.join(cmd))
                rc, tail = run_logged(cmd, log, lambda line: report(on_progress, "clone", None, None, line), env=env)
                if rc != 0:
                    raise TunerError(f"fetching llama.cpp {ref} with git failed: {condense_output(tail, 6)}")
    finally:
        log_path.unlink(missing_ok=True)
    for unneeded in ("models", "docs"):
        shutil.rmtree(tree / unneeded, ignore_errors=True)
    if not looks_like_llama_cpp(tree):
        raise TunerError(f"git ref {ref} of {LLAMA_CPP_GIT_URL} does not look like llama.cpp")
    return {
        "kind": "git",
        "ref": ref,
        "origin": f"{LLAMA_CPP_GIT_URL}@{ref}",
        "commit": git_commit(tree),
        "build_number": build_number_from_ref(ref),
    }


def _fetch_pypi(version: str, dest: Path, on_progress: ProgressFn | None) -> dict[str, object]:
    download = dest / "download"
    download.mkdir()
    tarball, origin, sha256 = download_sdist(version, download, on_progress)
    report(on_progress, "extract", None, None, tarball.name)
    commit = unpack_sdist(tarball, dest)
    shutil.rmtree(download, ignore_errors=True)
    return {
        "kind": "pypi",
        "ref": version,
        "origin": origin,
        "sdist_sha256": sha256,
        "commit": commit or "unknown",
        "build_number": 0,
    }
