"""Children that run in a process group of their own, stopped as a whole: the one way tuner starts and stops the
compilers of a build and llama-server.

* :func:`start_group` starts the child as the leader of a new session, so its process group is its own: a
  terminal's Ctrl-C reaches tuner only (which then stops the child in order), and everything the child starts
  (ninja's compilers, the llama-server a ``--server-bin`` wrapper script runs) can be signalled together.
* ``die_with_parent=True`` makes the whole group die with tuner, even when tuner is killed outright (SIGKILL, the
  OOM killer) and runs no cleanup code at all:

  - the child gets Linux's ``PR_SET_PDEATHSIG`` (SIGKILL when tuner dies). That reaches the child only: a wrapper
    script's own children would be left running, holding the GPU and the port;
  - so a **watchdog** process watches a pipe whose only write end tuner holds. The kernel closes it when tuner
    dies, however it dies; the watchdog reads EOF and stops the group: SIGTERM, then SIGKILL after a grace period.
    The child tells the watchdog its group id itself, between fork and exec, so there is no moment in which the
    group runs unwatched. On an orderly stop tuner releases the watchdog first, and it exits without a signal.
    The watchdog is a few lines of Python in a session of its own (a terminal's Ctrl-C does not reach it); it
    ignores SIGINT and SIGHUP, and stops the group too if it is itself sent SIGTERM.

  A cgroup would also catch a process that leaves the group with ``setsid``; it needs a delegated cgroup v2
  subtree, which most desktops and containers do not give a user process, so tuner does not rely on one.
* :func:`run_group` runs a tool to its end that way (llama-fit-params), keeping only the last bytes of its output
  and stopping the whole group at a deadline or when tuner is interrupted.
* :func:`stop_group` sends SIGTERM to the group, SIGKILL after a grace period, and SIGKILL to whatever is left of
  the group once the child has exited (a compiler may outlive ninja by a moment). A child that has already exited
  may have left processes in its group (a ``--server-bin`` that forks llama-server and exits): they are stopped the
  same way. The group id is the child's pid, which the kernel cannot hand out again while a member of the group
  lives, and pids are handed out in increasing order up to ``pid_max`` before one is reused: a group that emptied
  a moment ago does not come back as someone else's.

The standard library has the pieces (``start_new_session``, ``os.killpg``) but no "stop the whole group, then
escalate"; psutil only walks children, which misses those a child's exit re-parented. On Windows there are no
process groups to signal: the child alone is terminated, then killed.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import selectors
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PR_SET_PDEATHSIG = 1
"""``prctl`` option (``<linux/prctl.h>``): the signal a process gets when its parent dies."""

KILL_WAIT_S = 10.0
"""How long to wait for a child to be reaped after SIGKILL (a process stuck in the kernel takes a while)."""

WATCHDOG_GRACE_S = 5.0
"""How long the watchdog gives a group between SIGTERM and SIGKILL once tuner has died."""

WATCHDOG_SCRIPT = Path(__file__).with_name("_watchdog.py")
"""The watchdog's program: run as ``python -I -S`` (no site, no tuner: ~15 ms to start)."""


@dataclass
class _Watchdog:
    proc: subprocess.Popen[bytes]
    write_fd: int


_WATCHDOGS: dict[int, _Watchdog] = {}  # child pid -> its watchdog


def _preexec(parent_pid: int, watchdog_fd: int | None) -> Callable[[], None]:
    """Runs in the child between fork and exec: die with SIGKILL when tuner dies, tell the watchdog its group id
    (its own pid: it leads a new session), and do not start at all if tuner died between the fork and here."""

    def preexec() -> None:
        with contextlib.suppress(Exception):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if watchdog_fd is not None:
            try:
                os.write(watchdog_fd, f"pgid {os.getpid()}\n".encode())
            except OSError:
                os._exit(1)
        if os.getppid() != parent_pid:
            os._exit(1)

    return preexec


def _start_watchdog() -> _Watchdog | None:
    """A watchdog process and the write end of its pipe (close-on-exec: no other child holds it), or None where
    one cannot be started (the group then has PDEATHSIG only)."""
    read_fd, write_fd = os.pipe()
    try:
        proc = subprocess.Popen([sys.executable, "-I", "-S", str(WATCHDOG_SCRIPT), str(WATCHDOG_GRACE_S)],
                                stdin=read_fd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    except OSError:
        os.close(write_fd)
        return None
    finally:
        os.close(read_fd)
    return _Watchdog(proc, write_fd)


def _release_watchdog(pid: int) -> None:
    """Tell the watchdog of ``pid``'s group that tuner stopped the group itself, and reap it."""
    dog = _WATCHDOGS.pop(pid, None)
    if dog is None:
        return
    with contextlib.suppress(OSError):
        os.write(dog.write_fd, b"release\n")
    with contextlib.suppress(OSError):
        os.close(dog.write_fd)
    try:
        dog.proc.wait(timeout=KILL_WAIT_S)
    except subprocess.TimeoutExpired:  # pragma: no cover - it exits at once on EOF
        dog.proc.kill()
        dog.proc.wait()


def start_group(cmd: Sequence[str], *, die_with_parent: bool = False, **popen_kwargs: Any) -> subprocess.Popen[Any]:
    """``subprocess.Popen(cmd, **popen_kwargs)`` as the leader of a new session (its own process group), and with
    ``die_with_parent`` stopped, group and all, when this process dies (see the module doc). ``OSError`` when
    ``cmd`` cannot be run, as Popen's."""
    if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
        return subprocess.Popen(list(cmd), **popen_kwargs)
    dog = _start_watchdog() if die_with_parent else None
    preexec = _preexec(os.getpid(), dog.write_fd if dog else None) if die_with_parent else None
    try:
        proc = subprocess.Popen(list(cmd), start_new_session=True, preexec_fn=preexec, **popen_kwargs)
    except BaseException:
        if dog is not None:
            os.close(dog.write_fd)  # EOF before any group id: it exits without signalling anyone
            dog.proc.wait()
        raise
    if dog is not None:
        _WATCHDOGS[proc.pid] = dog
    return proc


def _signal_group(proc: subprocess.Popen[Any], kill: bool) -> None:
    if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
        if kill:
            proc.kill()
        else:
            proc.terminate()
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL if kill else signal.SIGTERM)


def group_alive(pgid: int) -> bool:
    """Whether a live process (not a zombie: where PID 1 does not reap, as in some containers, orphans stay zombies
    for ever) is left in process group ``pgid``. Reads /proc; without it, whether the group exists at all."""
    if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
        return False
    try:
        names = os.listdir("/proc")
    except OSError:
        names = None
    if names is None or not os.path.exists("/proc/self/stat"):
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                state, _ppid, pgrp = fh.read().rsplit(b")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue
        if state != b"Z" and int(pgrp) == pgid:
            return True
    return False


def stop_group(proc: subprocess.Popen[Any], grace_s: float = 10.0) -> int | None:
    """Stop ``proc`` (started by :func:`start_group`) and its process group: SIGTERM, SIGKILL after ``grace_s``,
    and SIGKILL to whatever is left of the group once ``proc`` has exited. Returns ``proc``'s exit code.

    When ``proc`` has exited already, what it left in its group (a forked llama-server) gets the same SIGTERM,
    then SIGKILL after ``grace_s``; an empty group is not signalled.
    """
    try:
        if proc.poll() is None:
            _signal_group(proc, kill=False)
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                _signal_group(proc, kill=True)
                proc.wait(timeout=KILL_WAIT_S)
        elif sys.platform != "win32" and group_alive(proc.pid):
            _signal_group(proc, kill=False)
            end = time.monotonic() + grace_s
            while group_alive(proc.pid) and time.monotonic() < end:
                time.sleep(0.05)
        if sys.platform != "win32":
            _signal_group(proc, kill=True)  # the leader just reaped, or members still alive: the id is still ours
    finally:
        _release_watchdog(proc.pid)
    return proc.returncode


@dataclass(frozen=True)
class GroupRun:
    """What :func:`run_group` kept of a run: the exit code (None when it was stopped at the deadline), and the last
    bytes of stdout and of stderr."""

    returncode: int | None
    stdout: bytes
    stderr: bytes
    timed_out: bool


def run_group(cmd: Sequence[str], *, timeout_s: float, max_output_bytes: int, **popen_kwargs: Any) -> GroupRun:
    """Run ``cmd`` to its end in a process group of its own that dies with tuner (:func:`start_group`), keeping the
    last ``max_output_bytes`` of its stdout and of its stderr (read as they come: a tool that floods its output
    costs no more memory), and stop the whole group when ``timeout_s`` has passed or this process is interrupted.
    ``OSError`` when ``cmd`` cannot be run."""
    proc = start_group(cmd, die_with_parent=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, **popen_kwargs)
    assert proc.stdout is not None and proc.stderr is not None
    out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
    kept: dict[int, deque[bytes]] = {out_fd: deque(), err_fd: deque()}
    sizes = {out_fd: 0, err_fd: 0}
    deadline = time.monotonic() + timeout_s
    timed_out = False
    try:
        with selectors.DefaultSelector() as sel:
            for fd in kept:
                sel.register(fd, selectors.EVENT_READ)
            while sel.get_map():
                left = deadline - time.monotonic()
                if left <= 0:
                    timed_out = True
                    break
                events = sel.select(timeout=min(left, 0.2))
                if not events and proc.poll() is not None:  # exited; what holds its pipes open is left behind
                    break
                for key, _ in events:
                    chunk = os.read(key.fd, 1 << 16)
                    if not chunk:
                        sel.unregister(key.fd)
                        continue
                    chunks = kept[key.fd]
                    chunks.append(chunk)
                    sizes[key.fd] += len(chunk)
                    while sizes[key.fd] - len(chunks[0]) >= max_output_bytes:
                        sizes[key.fd] -= len(chunks.popleft())
        if not timed_out:
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:  # closed its output but runs on
                timed_out = True
    finally:
        stop_group(proc, grace_s=1.0)  # interrupted or out of time: the whole group; done: what it left behind
        proc.stdout.close()
        proc.stderr.close()
    out, err = (b"".join(kept[fd])[-max_output_bytes:] for fd in (out_fd, err_fd))
    return GroupRun(None if timed_out else proc.returncode, out, err, timed_out)
