"""tuner.procgroup: real children in their own process group, stopped as a whole (POSIX). That a child started with
``die_with_parent`` dies with a parent killed outright is shown with llama-server in test_server.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tuner.procgroup import group_alive, run_group, start_group, stop_group
from tuner.server import process_alive

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="process groups are POSIX")
CASE_S = 60  # generous: the machine running the tests may be loaded; a run that hangs takes 600 s


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


def test_stopping_a_child_that_has_exited_stops_what_it_left_in_its_group() -> None:
    """A ``--server-bin`` that forks llama-server and exits: the forked process is still in the group, and goes."""
    proc, grandchild = _shell_with_grandchild("exit 3")
    proc.wait(timeout=10)
    assert process_alive(grandchild)
    assert stop_group(proc, grace_s=0.5) == 3
    assert _gone(grandchild), "what an exited child left in its group outlived stop_group"


def test_stopping_an_exited_child_with_an_empty_group_signals_nobody() -> None:
    proc = start_group(["sh", "-c", "exit 4"])
    proc.wait(timeout=10)
    started = time.monotonic()
    assert stop_group(proc, grace_s=30) == 4
    assert time.monotonic() - started < 10, "waited out the grace period for an empty group"


def _tuner_like_parent(tmp_path: Path, script: str) -> subprocess.Popen[str]:
    """A Python process that starts ``sh -c script`` with ``start_group(die_with_parent=True)``, prints the
    child's pid, and sleeps: to be killed outright."""
    code = ("import subprocess, sys, time\n"
            "from tuner.procgroup import start_group\n"
            f"p = start_group(['sh', '-c', {script!r}], die_with_parent=True, stdout=subprocess.PIPE, text=True)\n"
            "print(p.pid, p.stdout.readline().strip(), flush=True)\n"
            "time.sleep(600)\n")
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=tmp_path)


def test_a_parent_killed_outright_takes_its_childs_whole_group_with_it(tmp_path: Path) -> None:
    """SIGKILL leaves tuner no chance to clean up: PDEATHSIG kills the child (a wrapper script), the watchdog the
    wrapper's own children, which PDEATHSIG does not reach."""
    parent = _tuner_like_parent(tmp_path, "sleep 600 & echo $!; wait")
    assert parent.stdout is not None
    child, grandchild = map(int, parent.stdout.readline().split())
    assert process_alive(child) and process_alive(grandchild)
    parent.kill()
    parent.wait()
    assert _gone(child) and _gone(grandchild)
    assert not group_alive(child)


def test_a_grandchild_that_ignores_sigterm_is_killed_after_the_watchdogs_grace(tmp_path: Path) -> None:
    parent = _tuner_like_parent(tmp_path, "trap '' TERM; sleep 600 & echo $!; wait")
    assert parent.stdout is not None
    _child, grandchild = map(int, parent.stdout.readline().split())
    parent.kill()
    parent.wait()
    assert _gone(grandchild)


def test_an_orderly_stop_releases_the_watchdog() -> None:
    proc = start_group(["sleep", "600"], die_with_parent=True)
    watchdogs = [p for p in _children_of(os.getpid()) if "_watchdog.py" in _cmdline(p)]
    assert len(watchdogs) == 1
    assert stop_group(proc, grace_s=5) == -signal.SIGTERM
    assert _gone(watchdogs[0]), "the watchdog outlived an orderly stop"


def _children_of(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                out.append(int(entry.name))
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_run_group_keeps_only_the_last_bytes_of_each_output_however_much_it_prints() -> None:
    script = ("head -c 50000000 /dev/zero | tr '\\0' o; echo END-OUT; "
              "head -c 5000000 /dev/zero | tr '\\0' e >&2; echo END-ERR >&2; exit 3")
    run = run_group(["sh", "-c", script], timeout_s=CASE_S, max_output_bytes=1000)
    assert run.returncode == 3 and not run.timed_out
    assert len(run.stdout) == 1000 and run.stdout.endswith(b"o" * 100 + b"END-OUT\n")
    assert len(run.stderr) == 1000 and run.stderr.endswith(b"e" * 100 + b"END-ERR\n")


def test_run_group_stops_the_whole_group_at_its_deadline() -> None:
    started = time.monotonic()
    run = run_group(["sh", "-c", "trap '' TERM; sleep 600 & echo $!; wait"], timeout_s=1.0, max_output_bytes=100)
    assert run.timed_out and run.returncode is None
    assert time.monotonic() - started < CASE_S
    assert _gone(int(run.stdout))


def test_run_group_returns_when_the_child_exits_though_a_grandchild_holds_its_output() -> None:
    started = time.monotonic()
    run = run_group(["sh", "-c", "sleep 600 & echo $!"], timeout_s=600, max_output_bytes=100)
    assert run.returncode == 0 and not run.timed_out
    assert time.monotonic() - started < CASE_S, "waited for the grandchild to close its output"
    assert _gone(int(run.stdout)), "the grandchild outlived run_group"
