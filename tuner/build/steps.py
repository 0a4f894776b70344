"""What every step of getting and building llama.cpp shares: progress reports, the cache's cross-process locks,
cache entries replaced whole (:func:`replacing`), and external tools (pip, git, CMake) run with their output logged,
their progress read and a failure condensed to one line.

A tool runs in its own process group (:func:`tuner.procgroup.start_group`), and if tuner is interrupted (Ctrl-C, or
SIGTERM that the CLI turns into the same KeyboardInterrupt) the whole group is stopped, so no ninja or compiler
outlives an interrupted build; if tuner is killed outright, the group's watchdog stops it (``die_with_parent``).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO

import filelock

from tuner.errors import TunerError
from tuner.paths import cache_dir
from tuner.procgroup import start_group, stop_group

ProgressFn = Callable[[str, int | None, int | None, str | None], None]
"""``on_progress(stage, done, total, line)``: stages are ``cached``, ``wait``, ``download``, ``extract``,
``clone``, ``configure``, ``build``, ``publish`` and ``done``; ``done``/``total`` are known while downloading and
compiling."""


def report(on_progress: ProgressFn | None, stage: str, done: int | None, total: int | None, line: str | None) -> None:
    if on_progress is not None:
        on_progress(stage, done, total, line)


def exe(name: str) -> str:
    """A program's file name on this platform."""
    return f"{name}.exe" if sys.platform == "win32" else name


def lock_path(name: str) -> Path:
    return cache_dir() / "locks" / f"{name}.lock"


@contextlib.contextmanager
def cache_lock(name: str, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """``locks/<name>.lock`` held exclusively between processes while the block runs; ``on_wait`` is called once
    if another process holds it and we must wait."""
    path = lock_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(path)
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        if on_wait is not None:
            on_wait()
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


@contextlib.contextmanager
def replacing(final: Path) -> Iterator[Path]:
    """A fresh directory beside ``final`` (``.tmp-<name>-*``) for the block to fill. When the block ends normally it
    replaces ``final`` by a rename (an existing ``final`` is moved aside to ``.old-<name>-*`` first, then removed);
    when it raises, or we are interrupted, it is removed and ``final`` is left as it was."""
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        tmp.mkdir(parents=True)
        yield tmp
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
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def remove_leftovers(final: Path) -> None:
    """What a :func:`replacing` of ``final`` killed too hard to clean up left behind (the caller holds its lock)."""
    if final.parent.is_dir():
        for stale in [*final.parent.glob(f".tmp-{final.name}-*"), *final.parent.glob(f".old-{final.name}-*")]:
            shutil.rmtree(stale, ignore_errors=True)


def run_logged(
    cmd: Sequence[str],
    log: IO[str],
    on_line: Callable[[str], None] | None = None,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> tuple[int, list[str]]:
    """Run ``cmd``, copying its output (stdout + stderr) into ``log`` line by line and to ``on_line``.

    Returns the exit code and the last few hundred lines. If we are interrupted the child's whole process group is
    stopped, SIGTERM then SIGKILL: ``cmake --build`` leaves ninja and the compilers running when only it is
    signalled.
    """
    log.write(f"$ {shlex.join(cmd)}\n")
    log.flush()
    tail: deque[str] = deque(maxlen=400)
    try:
        proc = start_group(
            cmd, cwd=cwd, env=None if env is None else dict(env), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, errors="replace", bufsize=1, die_with_parent=True,
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
        stop_group(proc)  # interrupted: the whole group; done: what it left behind, and its watchdog
        log.flush()
    log.write(f"[exit code {rc}]\n")
    return rc, list(tail)


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
    """The last ``max_lines`` informative lines of a tool's output, as one line: progress lines and compiler command
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
