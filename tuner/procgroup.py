"""Children that run in a process group of their own, stopped as a whole: the one way tuner starts and stops the
compilers of a build and llama-server.

* :func:`start_group` starts the child as the leader of a new session, so its process group is its own: a
  terminal's Ctrl-C reaches tuner only (which then stops the child in order), and everything the child starts
  (ninja's compilers, the llama-server a ``--server-bin`` wrapper script runs) can be signalled together.
* ``die_with_parent=True`` adds Linux's ``PR_SET_PDEATHSIG``: the child gets SIGKILL when tuner dies, even when
  tuner is killed outright and runs no cleanup code at all.
* :func:`stop_group` sends SIGTERM to the group, SIGKILL after a grace period, and SIGKILL to whatever is left of
  the group once the child has exited (a compiler may outlive ninja by a moment).

The standard library has the pieces (``start_new_session``, ``os.killpg``) but no "stop the whole group, then
escalate"; psutil only walks children, which misses those a child's exit re-parented. On Windows there are no
process groups to signal: the child alone is terminated, then killed.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Any

PR_SET_PDEATHSIG = 1
"""``prctl`` option (``<linux/prctl.h>``): the signal a process gets when its parent dies."""

KILL_WAIT_S = 10.0
"""How long to wait for a child to be reaped after SIGKILL (a process stuck in the kernel takes a while)."""


def _pdeathsig_preexec(parent_pid: int) -> Callable[[], None]:
    """Runs in the child between fork and exec: die with SIGKILL when tuner dies, and do not start at all if tuner
    died between the fork and here (the signal would never come)."""

    def preexec() -> None:
        with contextlib.suppress(Exception):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent_pid:
            os._exit(1)

    return preexec


def start_group(cmd: Sequence[str], *, die_with_parent: bool = False, **popen_kwargs: Any) -> subprocess.Popen[Any]:
    """``subprocess.Popen(cmd, **popen_kwargs)`` as the leader of a new session (its own process group), and with
    ``die_with_parent`` killed when this process dies. ``OSError`` when ``cmd`` cannot be run, as Popen's."""
    if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
        return subprocess.Popen(list(cmd), **popen_kwargs)
    preexec = _pdeathsig_preexec(os.getpid()) if die_with_parent else None
    return subprocess.Popen(list(cmd), start_new_session=True, preexec_fn=preexec, **popen_kwargs)


def _signal_group(proc: subprocess.Popen[Any], kill: bool) -> None:
    if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
        if kill:
            proc.kill()
        else:
            proc.terminate()
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL if kill else signal.SIGTERM)


def stop_group(proc: subprocess.Popen[Any], grace_s: float = 10.0) -> int | None:
    """Stop ``proc`` (started by :func:`start_group`) and its process group: SIGTERM, SIGKILL after ``grace_s``,
    and SIGKILL to whatever is left of the group once ``proc`` has exited. Returns ``proc``'s exit code.

    A ``proc`` that has exited already is only reaped: its group id may belong to someone else by now.
    """
    if proc.poll() is not None:
        return proc.returncode
    _signal_group(proc, kill=False)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        _signal_group(proc, kill=True)
        proc.wait(timeout=KILL_WAIT_S)
    if sys.platform != "win32":
        _signal_group(proc, kill=True)  # just reaped: the group id cannot have been reused yet
    return proc.returncode
