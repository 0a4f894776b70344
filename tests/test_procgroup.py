"""tuner.procgroup: real children in their own process group, stopped as a whole (POSIX). That a child started with
``die_with_parent`` dies with a parent killed outright is shown with llama-server in test_server.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tuner.procgroup import start_group, stop_group
from tuner.server import process_alive

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="process groups are POSIX")


def _gone(pid: int) -> bool:
    deadline = time.monotonic() + 10
    while process_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not process_alive(pid)


def _shell_with_grandchild(then: str, *, ignore_term: bool = False) -> tuple[subprocess.Popen[str], int]:
    """A shell that starts a grandchild which ignores SIGTERM, then runs ``then`` (ignoring SIGTERM itself too if
    ``ignore_term``); (the shell, the grandchild's pid), once both are set up."""
    reset = "" if ignore_term else "trap - TERM; "
    script = f"trap '' TERM; sleep 600 & pid=$!; {reset}echo $pid; {then}"
    proc = start_group(["sh", "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    return proc, int(proc.stdout.readline())


def test_child_leads_its_own_process_group_and_session() -> None:
    proc = start_group(["sleep", "600"])
    try:
        assert os.getpgid(proc.pid) == proc.pid
        assert os.getsid(proc.pid) == proc.pid
        assert os.getpgid(proc.pid) != os.getpgid(0)
    finally:
        stop_group(proc, grace_s=1)


def test_stop_takes_the_grandchildren_down_with_the_child() -> None:
    proc, grandchild = _shell_with_grandchild("wait")
    assert process_alive(grandchild)
    code = stop_group(proc, grace_s=5)
    assert code == -signal.SIGTERM
    assert _gone(grandchild), "a grandchild that ignores SIGTERM outlived stop_group"


def test_stop_escalates_to_sigkill_for_a_child_that_ignores_sigterm() -> None:
    proc, grandchild = _shell_with_grandchild("while :; do sleep 0.1; done", ignore_term=True)
    assert stop_group(proc, grace_s=0.5) == -signal.SIGKILL
    assert _gone(grandchild)


def test_stopping_a_child_that_has_exited_signals_nobody() -> None:
    proc, grandchild = _shell_with_grandchild("exit 3")
    try:
        proc.wait(timeout=10)
        assert stop_group(proc) == 3
        assert process_alive(grandchild), "the group of an exited child was signalled"
    finally:
        os.kill(grandchild, signal.SIGKILL)
    assert _gone(grandchild)
