"""Get llama.cpp source and build ``llama-server``, ``llama-bench`` and ``llama-fit-params`` with CMake, cached.

What ``tuner build`` does (the command lives in ``tuner/cli/build.py``, over this API):

1. ``resolve_spec(source, cuda, gpu_compute_capabilities)`` turns ``--source`` (``pypi[:VERSION]``, ``git[:REF]``
   or a local llama.cpp directory), ``--cuda/--no-cuda`` (default: CUDA only when NVML sees a GPU *and* ``nvcc``
   is found) and the GPUs' compute capabilities (the caller asks NVML) into a :class:`BuildSpec`.
2. ``ensure_build(spec, on_progress)`` returns the cached build for that spec at once (no pip, no git, no cmake)
   or fetches the source, configures and builds the three tools with CMake + Ninja, and publishes the result
   atomically. ``--server-bin PATH`` skips all of that: ``build_from_binary(PATH)`` checks that the binary runs
   ``--version`` and picks up ``llama-bench`` / ``llama-fit-params`` beside it.
3. ``obtain_build(source, cuda, server_bin, gpus, on_progress)`` is the one call ``tuner build``, ``serve`` and
   ``bench`` make: steps 1 and 2 with the GPUs NVML sees, or ``--server-bin``; it also says whether the build was
   already there. The CLI prints the build key, the three binaries and the ``llama-server --version`` text.

Compilers run in their own process group, which is stopped as a whole when tuner is interrupted (the CLI turns
SIGTERM into the same KeyboardInterrupt as Ctrl-C), so no ninja or compiler outlives an interrupted build.

Sources:

- ``pypi[:VERSION]`` (default version :data:`DEFAULT_PYPI_VERSION`): the ``llama-cpp-python`` sdist, which
  vendors llama.cpp. It is fetched from pip's configured index (``PIP_INDEX_URL``, else ``pip config``'s
  ``index-url``, else PyPI) through the index's JSON API and checked against the index's sha256 (and the pinned
  sha256 for the default version); only if that fails does it fall back to ``python -m pip download --no-deps
  --no-binary :all:``, which also builds the sdist's metadata and so takes several times longer. Only
  ``*/vendor/llama.cpp/`` is unpacked, without ``models/`` and ``docs/``.
- ``git[:REF]`` (default :data:`DEFAULT_GIT_REF`, the release tag of llama.cpp commit 0c1e570): a shallow
  clone of :data:`LLAMA_CPP_GIT_URL`.
- a directory: a llama.cpp checkout used in place (or a llama-cpp-python checkout, whose ``vendor/llama.cpp``
  is used). Local sources can change under us, so ``ensure_build`` always re-runs the (incremental) build for
  them and re-publishes; ``pypi`` and ``git`` builds are immutable and reused as they are.

Cache layout under :func:`tuner.paths.cache_dir`::

    src/<source-id>/llama.cpp/        extracted source (source-id: pypi-0.3.36, git-b11312)
    src/<source-id>/source.json       where it came from, its commit; written last
    work/<key>/build/                 the CMake build dir, kept so that a rebuild is incremental
    work/<key>/build.log              configure + build output of the last attempt
    builds/<key>/bin/llama-server     the published build: self-contained binaries (static libs) ...
    builds/<key>/build.json           ... and what they are; written last, then the directory is renamed in
    locks/<key>.lock                  one builder per key across processes

``<key>`` is ``<kind>-<ref>-cpu`` or ``<kind>-<ref>-cuda-<archs>`` (``pypi-0.3.36-cuda-89``, ``-cuda-86-89``,
``-cuda-portable`` when CUDA is forced without knowing the GPUs), plus ``-<hash>`` of any extra CMake options.
Nothing here prints or exits: progress goes to ``on_progress(stage, done, total, line)``, failures are
:class:`~tuner.errors.TunerError`.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import html
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import ssl
import subprocess
import sys
import tarfile
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, TYPE_CHECKING, Literal
from urllib.parse import urljoin

import httpx

from tuner.errors import TunerError
from tuner.paths import cache_dir, write_atomic

if TYPE_CHECKING:
    from tuner.hardware import Gpu

if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
    import msvcrt
else:
    import fcntl

ProgressFn = Callable[[str, int | None, int | None, str | None], None]
SourceKind = Literal["pypi", "git", "local"]

LLAMA_CPP_GIT_URL = "https://github.com/ggml-org/llama.cpp"
PYPI_PROJECT = "llama-cpp-python"
DEFAULT_PYPI_VERSION = "0.3.36"
#: llama.cpp tags every master build ``b<build number>``; build 11312 is commit 0c1e570 (2026-10-01), the tree
#: that llama-cpp-python 0.3.36 vendors and our reference docs describe.
DEFAULT_GIT_REF = "b11312"
#: sha256 of sdists we pin; anything else is checked against the index's own hash only.
KNOWN_SDIST_SHA256 = {
    "0.3.36": "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e",
}
TARGETS = ("llama-server", "llama-bench", "llama-fit-params")
#: compute capability used when CUDA is forced but the GPUs are unknown: llama.cpp's own portable list.
PORTABLE_CUDA_ARCHS = ("75-virtual", "80-virtual", "86-real", "89-real", "90-virtual")
BUILD_JSON = "build.json"
SOURCE_JSON = "source.json"
_SCHEMA = 1

# Verified here: Release, static libs (so the binaries in build/bin are self-contained), only what we need, and
# nothing that downloads at configure time (LLAMA_USE_PREBUILT_UI would fetch the web UI).
BASE_CMAKE_OPTIONS: Mapping[str, str] = {
    "CMAKE_BUILD_TYPE": "Release",
    "BUILD_SHARED_LIBS": "OFF",
    "LLAMA_BUILD_TESTS": "OFF",
    "LLAMA_BUILD_EXAMPLES": "OFF",
    "LLAMA_BUILD_SERVER": "ON",
    "LLAMA_BUILD_TOOLS": "ON",
    "LLAMA_BUILD_APP": "OFF",
    "LLAMA_USE_PREBUILT_UI": "OFF",
    "LLAMA_OPENSSL": "OFF",
    "GGML_NATIVE": "ON",
}

_VERSION_RE = re.compile(r"^[0-9]+(\.[0-9]+)*([a-z0-9.+!-]*)$", re.IGNORECASE)
_REF_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")
_SHA_RE = re.compile(r"^[0-9a-f]{7,40}$")
_OPTION_RE = re.compile(r"^(?:-D)?([A-Za-z_][A-Za-z0-9_]*)(?::[A-Za-z]+)?=(.*)$", re.DOTALL)


# --------------------------------------------------------------------------------------------- data


class _IntegrityError(TunerError):
    """A download whose hash is not the expected one: never retried another way."""


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


@dataclass(frozen=True)
class LlamaBuild:
    """A usable set of llama.cpp binaries. ``bench_bin`` / ``fit_params_bin`` are None when not found."""

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


@dataclass(frozen=True)
class SourceTree:
    """A llama.cpp source directory ready to configure, and what we know about it."""

    path: Path
    commit: str  # full or short hash, or "unknown"
    build_number: int
    origin: str  # URL / file / path it came from


# --------------------------------------------------------------------------------------------- pure parts


def parse_source(text: str) -> tuple[SourceKind, str]:
    """``pypi`` / ``pypi:0.3.36`` / ``git`` / ``git:b11312`` / a directory path → ``(kind, ref)``.

    Local paths come back absolute (not resolved further, not checked: see :func:`resolve_spec`). A directory
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


def normalize_cmake_options(args: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """``-DKEY=VALUE`` / ``KEY=VALUE`` / ``-DKEY:BOOL=VALUE`` → sorted ``((KEY, VALUE), ...)``, last one wins."""
    options: dict[str, str] = {}
    for arg in args:
        match = _OPTION_RE.match(arg.strip())
        if not match:
            raise TunerError(f"extra CMake option {arg!r} is not of the form -DNAME=VALUE")
        options[match.group(1)] = match.group(2)
    return tuple(sorted(options.items()))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "x"


def _short_hash(text: str, n: int = 8) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def source_id(kind: SourceKind, ref: str) -> str:
    """``pypi-0.3.36``, ``git-b11312``, ``local-<dirname>-<hash of the path>``."""
    if kind == "local":
        return f"local-{_slug(Path(ref).name)}-{_short_hash(ref)}"
    return f"{kind}-{_slug(ref)}"


def build_key(spec: BuildSpec) -> str:
    """``pypi-0.3.36-cpu``, ``pypi-0.3.36-cuda-89``, ``git-b11312-cuda-86-89-1a2b3c4d`` (extra options hashed)."""
    if spec.cuda:
        variant = "cuda-" + ("-".join(_slug(a) for a in spec.cuda_archs) if spec.cuda_archs else "portable")
    else:
        variant = "cpu"
    key = f"{source_id(spec.source_kind, spec.source_ref)}-{variant}"
    if spec.extra_cmake_options:
        key += "-" + _short_hash(json.dumps(spec.extra_cmake_options))
    return key


def cmake_options(
    spec: BuildSpec, *, commit_id: str, build_number: int, cuda_compiler: str | None = None
) -> dict[str, str]:
    """Every ``-D`` option of the configure step, in order; the spec's extra options override ours.

    ``commit_id`` / ``build_number`` are what ``llama-server --version`` will print; ``cuda_compiler`` is only
    needed when ``nvcc`` is not on PATH.
    """
    options = dict(BASE_CMAKE_OPTIONS)
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


def pip_download_command(version: str, dest: Path, python: str = sys.executable) -> list[str]:
    """The slow but sure way to get the sdist: pip itself (it also builds the sdist's metadata)."""
    return [
        python, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--progress-bar", "off",
        "--dest", str(dest), f"{PYPI_PROJECT}=={version}",
    ]  # fmt: skip


def git_fetch_commands(ref: str, dest: Path, url: str = LLAMA_CPP_GIT_URL) -> list[list[str]]:
    """Shallow clone of one tag/branch, or for a commit hash a shallow fetch of that commit."""
    quiet = ["git", "-c", "advice.detachedHead=false"]
    if _SHA_RE.match(ref) and len(ref) == 40:
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


def parse_progress(line: str) -> tuple[int | None, int | None]:
    """Ninja's ``[12/214] ...`` → (12, 214); make's ``[ 45%] ...`` → (45, 100); anything else → (None, None)."""
    match = re.match(r"^\[(\d+)/(\d+)\]", line)
    if match:
        return int(match.group(1)), int(match.group(2))
    match = re.match(r"^\[\s*(\d+)%\]", line)
    if match:
        return int(match.group(1)), 100
    return None, None


_ANSI_RE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_ERROR_RE = re.compile(r"error|FAILED|fatal|undefined reference|not found", re.IGNORECASE)


def condense_output(lines: Sequence[str], max_lines: int = 20, width: int = 200) -> str:
    """The last ``max_lines`` informative lines of a build, as one line: progress lines and compiler command
    lines dropped, repeats merged, long lines cut, and the first error line kept even when it scrolled off."""
    kept: list[str] = []
    for raw in lines:
        line = _ANSI_RE.sub("", raw).strip()
        if not line or parse_progress(line) != (None, None):
            continue
        if " -c " in line and " -o " in line:  # a compiler command line (ninja prints it under FAILED:)
            continue
        if len(line) > width:
            line = line[: width - 1] + "…"
        if kept and kept[-1] == line:
            continue
        kept.append(line)
    tail = kept[-max_lines:]
    first_error = next((line for line in kept if _ERROR_RE.search(line)), None)
    if first_error is not None and first_error not in tail:
        tail = [first_error, "…", *tail[-(max_lines - 2) :]]
    return " | ".join(tail) if tail else "(no output)"


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


def sdist_filenames(version: str) -> tuple[str, ...]:
    return (f"llama_cpp_python-{version}.tar.gz", f"llama-cpp-python-{version}.tar.gz")


def find_sdist_in_index(page: str, content_type: str, page_url: str, version: str) -> tuple[str, str | None]:
    """The sdist's absolute URL and sha256 (None if the index gives none) from a PEP 691 (JSON) or PEP 503
    (HTML) simple-index page."""
    wanted = sdist_filenames(version)
    if "json" in content_type:
        for entry in json.loads(page).get("files", []):
            if entry.get("filename") in wanted and not entry.get("yanked"):
                return urljoin(page_url, entry["url"]), entry.get("hashes", {}).get("sha256")
    else:
        for href in re.findall(r"""<a\s[^>]*?href=["']([^"']+)["']""", page, re.IGNORECASE):
            url = html.unescape(href)
            name = url.split("#", 1)[0].rsplit("/", 1)[-1]
            if name in wanted:
                fragment = url.partition("#")[2]
                sha = fragment[len("sha256=") :] if fragment.startswith("sha256=") else None
                return urljoin(page_url, url.split("#", 1)[0]), sha
    raise TunerError(f"the package index has no {PYPI_PROJECT} {version} sdist")


def pip_setting(config_list: str, name: str) -> str | None:
    """A setting from ``pip config list`` output, pip's precedence: env, then download, then global."""
    values: dict[str, str] = {}
    for line in config_list.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key.strip()] = value.strip().strip("'\"")
    for section in (":env:", "download", "global"):
        if f"{section}.{name}" in values:
            return values[f"{section}.{name}"]
    return None


# --------------------------------------------------------------------------------------------- locations


def _exe(name: str) -> str:
    return f"{name}.exe" if sys.platform == "win32" else name


def builds_dir() -> Path:
    return cache_dir() / "builds"


def work_dir(key: str) -> Path:
    return cache_dir() / "work" / key


def source_root(kind: SourceKind, ref: str) -> Path:
    return cache_dir() / "src" / source_id(kind, ref)


def _lock_path(name: str) -> Path:
    return cache_dir() / "locks" / f"{name}.lock"


# --------------------------------------------------------------------------------------------- edges


def find_nvcc() -> str | None:
    """``nvcc`` on PATH, else under ``$CUDA_HOME`` / ``$CUDA_PATH`` / ``/usr/local/cuda``."""
    found = shutil.which("nvcc")
    if found:
        return found
    for base in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if base:
            candidate = Path(base) / "bin" / _exe("nvcc")
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    return None


def validate_source_dir(path: Path) -> Path:
    """The llama.cpp tree at ``path`` (or at ``path/vendor/llama.cpp``), or TunerError saying what is missing."""
    if not path.is_dir():
        raise TunerError(f"build source {path} is not a directory", hint="use pypi[:VERSION], git[:REF] or a dir")
    for candidate in (path, path / "vendor" / "llama.cpp"):
        if _looks_like_llama_cpp(candidate):
            return candidate
    missing = [name for name in ("CMakeLists.txt", "src/llama.cpp", "include/llama.h") if not (path / name).is_file()]
    raise TunerError(f"{path} is not a llama.cpp source tree: no {', '.join(missing)}")


def _looks_like_llama_cpp(path: Path) -> bool:
    return all((path / name).is_file() for name in ("CMakeLists.txt", "src/llama.cpp", "include/llama.h"))


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


def _report(on_progress: ProgressFn | None, stage: str, done: int | None, total: int | None, line: str | None) -> None:
    if on_progress is not None:
        on_progress(stage, done, total, line)


@contextlib.contextmanager
def _file_lock(path: Path, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """An exclusive lock between processes, held while the block runs; ``on_wait`` is called if we must wait."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        if not _try_lock(handle):
            if on_wait is not None:
                on_wait()
            while not _try_lock(handle, block=True):
                time.sleep(0.5)
        try:
            yield
        finally:
            _unlock(handle)


def _try_lock(handle: IO[bytes], block: bool = False) -> bool:
    try:
        if sys.platform == "win32":  # pragma: no cover
            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
        else:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | (0 if block else fcntl.LOCK_NB))
    except OSError:
        return False
    return True


def _unlock(handle: IO[bytes]) -> None:
    if sys.platform == "win32":  # pragma: no cover
        handle.seek(0)
        msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)
    else:
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _run_logged(
    cmd: Sequence[str],
    log: IO[str],
    on_line: Callable[[str], None] | None = None,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> tuple[int, list[str]]:
    """Run ``cmd``, copying its output (stdout + stderr) into ``log`` line by line and to ``on_line``.

    Returns the exit code and the last few hundred lines. The child runs in its own process group (session), and
    if we are interrupted (Ctrl-C, or SIGTERM that the CLI turns into KeyboardInterrupt) the whole group is stopped,
    SIGTERM then SIGKILL: ``cmake --build`` leaves ninja and the compilers running when only it is signalled.
    """
    log.write(f"$ {shlex.join(cmd)}\n")
    log.flush()
    tail: deque[str] = deque(maxlen=400)
    try:
        proc = subprocess.Popen(
            list(cmd), cwd=cwd, env=None if env is None else dict(env), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace", bufsize=1,
            start_new_session=sys.platform != "win32",
        )  # fmt: skip
    except OSError as exc:
        raise TunerError(f"cannot run {cmd[0]}: {exc}") from exc
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            text = line.rstrip("\r\n")
            tail.append(text)
            if on_line is not None:
                on_line(text)
        rc = proc.wait()
    finally:
        if proc.poll() is None:
            _stop_group(proc)
        log.flush()
    log.write(f"[exit code {rc}]\n")
    return rc, list(tail)


def _stop_group(proc: subprocess.Popen[str], grace_s: float = 10.0) -> None:
    """SIGTERM to ``proc``'s process group (it leads one), SIGKILL to the group after ``grace_s``."""
    if sys.platform == "win32":  # pragma: no cover
        proc.terminate()
    else:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        if sys.platform == "win32":  # pragma: no cover
            proc.kill()
        else:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    if sys.platform != "win32":  # ninja's compilers may outlive ninja by a moment: the group goes too
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def llama_version(server_bin: Path | str) -> tuple[str, str]:
    """Run ``server_bin --version``: (version text, commit). TunerError if it does not run or is not llama.cpp."""
    text = _version_output(server_bin)
    return parse_version_output(text)


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
        path = path / _exe("llama-server")
    if not path.is_file():
        raise TunerError(f"llama-server binary {path} does not exist")
    if not os.access(path, os.X_OK):
        raise TunerError(f"{path} is not executable")
    output = _version_output(path)
    version_text, commit = parse_version_output(output)

    def sibling(name: str) -> Path | None:
        candidate = path.parent / _exe(name)
        return candidate if candidate.is_file() and os.access(candidate, os.X_OK) else None

    # a CUDA build says so when it starts (ggml_cuda_init ...), or ships its CUDA backend beside it
    cuda = "cuda" in output.lower() or any(path.parent.glob("*ggml-cuda*"))
    return LlamaBuild(
        key=f"external-{_short_hash(str(path))}",
        root=path.parent,
        server_bin=path,
        bench_bin=sibling("llama-bench"),
        fit_params_bin=sibling("llama-fit-params"),
        version_text=version_text,
        commit=commit,
        cuda=cuda,
        options={},
        source=str(path),
    )


def _read_build(entry: Path) -> LlamaBuild | None:
    """The published build in ``entry``, or None if absent or incomplete. Runs nothing."""
    try:
        meta = json.loads((entry / BUILD_JSON).read_text())
        bins = {name: entry / "bin" / _exe(name) for name in TARGETS}
        if not all(p.is_file() for p in bins.values()):
            return None
        return LlamaBuild(
            key=meta["key"],
            root=entry,
            server_bin=bins["llama-server"],
            bench_bin=bins["llama-bench"],
            fit_params_bin=bins["llama-fit-params"],
            version_text=meta["version_text"],
            commit=_short_commit(meta["commit"]),
            cuda=bool(meta["cuda"]),
            options=dict(meta.get("cmake_options", {})),
            source=meta.get("source", ""),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _short_commit(commit: str) -> str:
    """Commits the way ``--version`` prints them: 7 hex digits."""
    return commit[:7] if _SHA_RE.match(commit) else commit


def find_build(spec: BuildSpec) -> LlamaBuild | None:
    """The published build for ``spec``, if there is a complete one. Instant: reads ``build.json`` only."""
    return _read_build(builds_dir() / build_key(spec))


def ensure_build(spec: BuildSpec, on_progress: ProgressFn | None = None) -> LlamaBuild:
    """The build for ``spec``: the cached one, or fetch + configure + build + publish it (see the module doc)."""
    key = build_key(spec)
    if spec.source_kind != "local":
        cached = find_build(spec)
        if cached is not None:
            _report(on_progress, "cached", None, None, str(cached.root))
            return cached

    def waiting() -> None:
        _report(on_progress, "wait", None, None, f"another tuner process is building {key}; waiting for it")

    with _file_lock(_lock_path(key), on_wait=waiting):
        if spec.source_kind != "local":
            cached = find_build(spec)  # built by the process we waited for
            if cached is not None:
                _report(on_progress, "cached", None, None, str(cached.root))
                return cached
        _remove_leftovers(key)
        cmake = shutil.which("cmake")
        if cmake is None:
            raise TunerError("building llama.cpp needs CMake, and cmake was not found", hint="install cmake >= 3.18")
        nvcc = find_nvcc() if spec.cuda else None
        if spec.cuda and nvcc is None:
            raise TunerError("a CUDA build needs nvcc, and it was not found", hint="or build with --no-cuda")
        source = _ensure_source(spec, on_progress)
        if _SHA_RE.match(source.commit):
            commit_id = source.commit[:7]
        else:
            commit_id = "local" if spec.source_kind == "local" else f"{spec.source_kind}-{_slug(spec.source_ref)}"
        compiler = nvcc if nvcc and shutil.which("nvcc") is None else None
        options = cmake_options(spec, commit_id=commit_id, build_number=source.build_number, cuda_compiler=compiler)
        started = time.time()
        bin_dir = _compile(key, source.path, options, spec, on_progress)
        meta = {
            "schema": _SCHEMA,
            "key": key,
            "source": f"{spec.source_kind}:{spec.source_ref}",
            "source_kind": spec.source_kind,
            "version": spec.source_ref if spec.source_kind != "local" else "local",
            "source_dir": str(source.path),
            "origin": source.origin,
            "commit": _short_commit(source.commit),
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
    (``gpus``; default: what NVML sees) and nvcc is found (:func:`resolve_spec`); the GPUs' compute capabilities
    pick the CUDA architectures.
    """
    if server_bin:
        return build_from_binary(server_bin), True
    capabilities: list[tuple[int, int]] = []
    if cuda is not False:
        if gpus is None:
            from tuner.hardware import read_gpus

            gpus = read_gpus()[0]
        capabilities = [g.compute_capability for g in gpus if g.compute_capability]
    spec = resolve_spec(source, cuda=cuda, gpu_compute_capabilities=capabilities)
    cached = False

    def progress(stage: str, done: int | None, total: int | None, line: str | None) -> None:
        nonlocal cached
        cached = cached or stage == "cached"
        _report(on_progress, stage, done, total, line)

    build = ensure_build(spec, progress)
    return build, cached


def _remove_leftovers(key: str) -> None:
    """Temp dirs of a publish that was killed too hard to clean up (we hold the key's lock)."""
    root = builds_dir()
    if root.is_dir():
        for stale in [*root.glob(f".tmp-{key}-*"), *root.glob(f".old-{key}-*")]:
            shutil.rmtree(stale, ignore_errors=True)


def _compile(
    key: str, source_dir: Path, options: Mapping[str, str], spec: BuildSpec, on_progress: ProgressFn | None
) -> Path:
    """Configure + build in ``work/<key>/build``; the directory with the three binaries."""
    work = work_dir(key)
    build_dir = work / "build"
    log_path = work / "build.log"
    work.mkdir(parents=True, exist_ok=True)
    generator = "Ninja" if shutil.which("ninja") else None
    _reset_stale_build_dir(build_dir, source_dir, generator)
    hint = "to build for CPU instead, pass --no-cuda" if spec.cuda else None
    jobs = os.cpu_count() or 2
    with open(log_path, "w", encoding="utf-8", errors="replace") as log:
        log.write(f"# tuner build {key}, {datetime.now(timezone.utc).isoformat(timespec='seconds')}\n")
        steps = (
            ("configure", configure_command(source_dir, build_dir, options, generator)),
            ("build", build_command(build_dir, jobs)),
        )
        for stage, cmd in steps:
            _report(on_progress, stage, None, None, shlex.join(cmd))

            def on_line(line: str, stage: str = stage) -> None:
                done, total = parse_progress(line)
                _report(on_progress, stage, done, total, line)

            rc, tail = _run_logged(cmd, log, on_line)
            if rc != 0:
                raise TunerError(
                    f"llama.cpp {stage} failed (exit code {rc}): {condense_output(tail)}; full log: {log_path}",
                    hint=hint,
                )
    bin_dir = build_dir / "bin"
    missing = [name for name in TARGETS if not (bin_dir / _exe(name)).is_file()]
    if missing:
        raise TunerError(f"the build finished but {', '.join(missing)} is missing from {bin_dir}; full log: {log_path}")
    return bin_dir


def _reset_stale_build_dir(build_dir: Path, source_dir: Path, generator: str | None) -> None:
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


def publish_build(
    key: str, bin_dir: Path, meta: Mapping[str, object], on_progress: ProgressFn | None = None
) -> LlamaBuild:
    """Copy the three binaries from ``bin_dir`` into ``builds/<key>`` atomically.

    Everything goes into ``builds/.tmp-<key>-*`` first; ``llama-server --version`` must run; ``build.json`` is
    written last; then the directory is renamed into place. If anything fails or we are interrupted, the temp dir
    is removed and ``builds/<key>`` is left as it was. The caller holds the key's lock.
    """
    _report(on_progress, "publish", None, None, str(builds_dir() / key))
    root = builds_dir()
    root.mkdir(parents=True, exist_ok=True)
    final = root / key
    tmp = root / f".tmp-{key}-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        (tmp / "bin").mkdir(parents=True)
        for name in TARGETS:
            shutil.copy2(bin_dir / _exe(name), tmp / "bin" / _exe(name))
        version_text, binary_commit = llama_version(tmp / "bin" / _exe("llama-server"))
        full_meta = {
            **meta,
            "key": key,
            "version_text": version_text,
            "binary_commit": binary_commit,
            "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        full_meta.setdefault("commit", binary_commit)
        _write_json(tmp / BUILD_JSON, full_meta)
        _swap_in(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    published = _read_build(final)
    if published is None:  # pragma: no cover - we just wrote it
        raise TunerError(f"published build {final} cannot be read back")
    _report(on_progress, "done", None, None, str(final))
    return published


def _write_json(path: Path, data: Mapping[str, object]) -> None:
    write_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def _swap_in(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; an existing ``final`` (a local rebuild, a broken entry) is moved aside first."""
    if not final.exists():
        os.replace(tmp, final)
        return
    old = final.with_name(f".old-{final.name}-{secrets.token_hex(4)}")
    os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        os.replace(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------------- sources


def _ensure_source(spec: BuildSpec, on_progress: ProgressFn | None) -> SourceTree:
    if spec.source_kind == "local":
        path = validate_source_dir(Path(spec.source_ref))
        return SourceTree(path, _git_commit(path), 0, str(path))
    sid = source_id(spec.source_kind, spec.source_ref)
    root = source_root(spec.source_kind, spec.source_ref)
    with _file_lock(_lock_path(f"src-{sid}")):
        existing = _read_source(root)
        if existing is not None:
            return existing
        root.parent.mkdir(parents=True, exist_ok=True)
        for stale in root.parent.glob(f".tmp-{sid}-*"):  # a fetch killed too hard to clean up after itself
            shutil.rmtree(stale, ignore_errors=True)
        tmp = root.parent / f".tmp-{sid}-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            tmp.mkdir()
            if spec.source_kind == "pypi":
                info = _fetch_pypi(spec.source_ref, tmp, on_progress)
            else:
                info = _fetch_git(spec.source_ref, tmp, on_progress)
            _write_json(tmp / SOURCE_JSON, info)
            if root.exists():
                shutil.rmtree(root)  # an unfinished earlier attempt (no source.json)
            os.replace(tmp, root)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    source = _read_source(root)
    if source is None:  # pragma: no cover - we just wrote it
        raise TunerError(f"llama.cpp source in {root} cannot be read back")
    return source


def _read_source(root: Path) -> SourceTree | None:
    try:
        info = json.loads((root / SOURCE_JSON).read_text())
    except (OSError, ValueError):
        return None
    path = root / "llama.cpp"
    if not _looks_like_llama_cpp(path):
        return None
    return SourceTree(
        path, str(info.get("commit", "unknown")), int(info.get("build_number", 0)), str(info.get("origin", ""))
    )


def _git_commit(path: Path) -> str:
    """HEAD of the git checkout that is exactly ``path`` (not of some repository that happens to contain it)."""
    try:
        proc = subprocess.run(
            ["git", "-C", str(path), "rev-parse", "--show-toplevel", "HEAD"], capture_output=True, text=True,
            timeout=30, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    lines = proc.stdout.split()
    if proc.returncode != 0 or len(lines) != 2 or not _SHA_RE.match(lines[1]):
        return "unknown"
    return lines[1] if Path(lines[0]).resolve() == path.resolve() else "unknown"


def _fetch_git(ref: str, dest: Path, on_progress: ProgressFn | None) -> dict[str, object]:
    if shutil.which("git") is None:
        raise TunerError("a git source needs git, and it was not found", hint="or use --source pypi")
    tree = dest / "llama.cpp"
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_LFS_SKIP_SMUDGE": "1"}
    log_path = dest.parent / f"{dest.name}.log"
    try:
        with open(log_path, "w", encoding="utf-8", errors="replace") as log:
            for cmd in git_fetch_commands(ref, tree):
                _report(on_progress, "clone", None, None, shlex.join(cmd))
                rc, tail = _run_logged(cmd, log, lambda line: _report(on_progress, "clone", None, None, line), env=env)
                if rc != 0:
                    raise TunerError(f"fetching llama.cpp {ref} with git failed: {condense_output(tail, 6)}")
    finally:
        log_path.unlink(missing_ok=True)
    for unneeded in ("models", "docs"):
        shutil.rmtree(tree / unneeded, ignore_errors=True)
    if not _looks_like_llama_cpp(tree):
        raise TunerError(f"git ref {ref} of {LLAMA_CPP_GIT_URL} does not look like llama.cpp")
    return {
        "kind": "git",
        "ref": ref,
        "origin": f"{LLAMA_CPP_GIT_URL}@{ref}",
        "commit": _git_commit(tree),
        "build_number": build_number_from_ref(ref),
    }


def _fetch_pypi(version: str, dest: Path, on_progress: ProgressFn | None) -> dict[str, object]:
    download = dest / "download"
    download.mkdir()
    tarball, origin = _download_sdist(version, download, on_progress)
    sha256 = _sha256(tarball)
    pinned = KNOWN_SDIST_SHA256.get(version)
    if pinned is not None and sha256 != pinned:
        raise _IntegrityError(f"{tarball.name} has sha256 {sha256}, expected {pinned}: refusing to build it")
    _report(on_progress, "extract", None, None, tarball.name)
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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _download_sdist(version: str, dest: Path, on_progress: ProgressFn | None) -> tuple[Path, str]:
    """The sdist in ``dest`` and where it came from: straight from the index if we can, else via pip."""
    try:
        return _download_sdist_from_index(version, dest, on_progress)
    except _IntegrityError:
        raise
    except TunerError as exc:
        fallback_reason = str(exc)
    except (httpx.HTTPError, OSError, ValueError, KeyError) as exc:
        fallback_reason = f"{type(exc).__name__}: {exc}"
    _report(on_progress, "download", None, None, f"index lookup failed ({fallback_reason}); using pip download")
    for leftover in dest.iterdir():
        leftover.unlink()
    cmd = pip_download_command(version, dest)
    log_path = dest / "pip.log"
    with open(log_path, "w", encoding="utf-8", errors="replace") as log:
        rc, tail = _run_logged(cmd, log, lambda line: _report(on_progress, "download", None, None, line))
    if rc != 0:
        raise TunerError(f"pip download of {PYPI_PROJECT}=={version} failed: {condense_output(tail, 8)}")
    found = [p for p in dest.iterdir() if p.name in sdist_filenames(version)]
    if not found:
        raise TunerError(f"pip download did not leave {sdist_filenames(version)[0]} in {dest}")
    return found[0], "pip download"


def _pip_config() -> str:
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, timeout=60,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return proc.stdout if proc.returncode == 0 else ""


def _download_sdist_from_index(version: str, dest: Path, on_progress: ProgressFn | None) -> tuple[Path, str]:
    config = "" if os.environ.get("PIP_INDEX_URL") else _pip_config()
    index = os.environ.get("PIP_INDEX_URL") or pip_setting(config, "index-url") or "https://pypi.org/simple"
    cert = os.environ.get("PIP_CERT") or pip_setting(config, "cert")
    verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=cert) if cert and Path(cert).is_file() else True
    page_url = index.rstrip("/") + f"/{PYPI_PROJECT}/"
    headers = {"Accept": "application/vnd.pypi.simple.v1+json, text/html;q=0.1"}
    with httpx.Client(follow_redirects=True, timeout=httpx.Timeout(60.0, connect=20.0), verify=verify) as client:
        _report(on_progress, "download", None, None, f"looking up {PYPI_PROJECT} {version} in {index}")
        response = client.get(page_url, headers=headers)
        response.raise_for_status()
        url, expected = find_sdist_in_index(
            response.text, response.headers.get("content-type", ""), str(response.url), version
        )
        target = dest / url.rsplit("/", 1)[-1]
        digest = hashlib.sha256()
        with client.stream("GET", url) as stream:
            stream.raise_for_status()
            total = int(stream.headers["content-length"]) if "content-length" in stream.headers else None
            done = 0
            with open(target, "wb") as out:
                for chunk in stream.iter_bytes(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    done += len(chunk)
                    _report(on_progress, "download", done, total, None)
    if expected is not None and digest.hexdigest() != expected:
        raise _IntegrityError(f"{target.name} from {url} has sha256 {digest.hexdigest()}, the index says {expected}")
    return target, url


_SKIPPED_TOP_DIRS = ("", "models", "docs", ".git")


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
                    commit = text if _SHA_RE.match(text) else None
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
    if not _looks_like_llama_cpp(out):
        raise TunerError(f"{tarball.name}: vendor/llama.cpp is not a complete llama.cpp tree")
    return commit
