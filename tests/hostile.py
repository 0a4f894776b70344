"""The harness of the hostile-input suites (tests/test_hostile_inputs.py, tests/test_hostile_processes.py): run
``python -m tuner`` as a user would, under a memory limit and a timeout, in a folder of its own, and see what it
left behind.

* Every run gets HOME, the cache, the config, TMPDIR and the Hugging Face home inside its case folder, and a marker
  in its environment (``TUNER_HOSTILE_MARK``): every process tuner starts inherits it (llama-server, a wrapper's
  children, a watchdog, a download worker), so :func:`marked_processes` finds any of them still alive afterwards,
  whatever session or process group it moved to.
* :func:`snapshot` lists a folder's files (size and mtime) to show nothing changed outside tuner's folders.
"""

from __future__ import annotations

import contextlib
import os
import resource
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

MEMORY_LIMIT_BYTES = 1 << 30  # the failures issue 9 found took 1-3.6 GB; a bounded tuner needs a fraction of this
CASE_TIMEOUT_S = 60  # a bounded case takes a few seconds even on a busy machine
MARK_ENV = "TUNER_HOSTILE_MARK"


def snapshot(root: Path, skip: tuple[Path, ...] = ()) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``root`` (but ``skip``): size and modification time."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if here / d not in skip]
        for name in [*filenames, *dirnames]:
            p = here / name
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns if p.is_file() else 0)
    return out


def limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT_BYTES, MEMORY_LIMIT_BYTES))


def case_env(case_root: Path, endpoint: str, extra: dict[str, str], *, mark: str | None = None) -> dict[str, str]:
    """The environment of one run: everything tuner writes goes under ``case_root`` (see the module doc)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TUNER_", "XDG_"))}
    (case_root / "tmp").mkdir(parents=True, exist_ok=True)
    env.update({"HOME": str(case_root / "home"), "TUNER_CACHE_DIR": str(case_root / "cache"),
                "TUNER_CONFIG_DIR": str(case_root / "config"), "HF_HOME": str(case_root / "hf-home"),
                "HF_ENDPOINT": endpoint, "XDG_CACHE_HOME": str(case_root / "xdg-cache"),
                "XDG_CONFIG_HOME": str(case_root / "xdg-config"), "TMPDIR": str(case_root / "tmp"),
                "COLUMNS": "200", "OPENBLAS_NUM_THREADS": "1", MARK_ENV: mark or secrets.token_hex(8), **extra})
    return env


def marked_processes(mark: str) -> list[tuple[int, str]]:
    """Live (not zombie) processes whose environment holds ``TUNER_HOSTILE_MARK=mark``: (pid, command line)."""
    needle = f"{MARK_ENV}={mark}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if (entry / "stat").read_bytes().rsplit(b")", 1)[1].split()[0] == b"Z":
                continue
            if needle not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        found.append((int(entry.name), cmdline[:200]))
    return found


def kill_marked(mark: str) -> None:
    for pid, _ in marked_processes(mark):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def wait_until_none_marked(mark: str, within_s: float = 5.0) -> list[tuple[int, str]]:
    """The marked processes still alive after up to ``within_s`` (a watchdog's SIGTERM takes a moment)."""
    deadline = time.monotonic() + within_s
    while True:
        left = marked_processes(mark)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


@dataclass(frozen=True)
class Outcome:
    returncode: int
    stderr_lines: list[str]
    stdout: str
    seconds: float
    left_running: list[tuple[int, str]]
    after_signal_s: float | None = None  # from the first signal sent (``interrupt``) to tuner's end


def run_tuner(argv: list[str], case_root: Path, env: dict[str, str], *, timeout_s: float = CASE_TIMEOUT_S,
              interrupt: tuple[Callable[[], bool], tuple[signal.Signals, ...]] | None = None) -> Outcome:
    """``python -m tuner argv`` in its own session under the memory limit; which processes it started outlived it.

    ``interrupt``: (a condition, signals): once the condition holds, the signals are sent to tuner one after the
    other (0.3 s apart), as a user pressing Ctrl-C or a service manager stopping it would."""
    mark = env[MARK_ENV]
    t0 = time.monotonic()
    signalled_at: float | None = None
    proc = subprocess.Popen([sys.executable, "-m", "tuner", *argv], cwd=case_root, env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            errors="replace", preexec_fn=limit_memory, start_new_session=True)
    try:
        if interrupt is not None:
            ready, signals = interrupt
            while not ready():
                assert proc.poll() is None and time.monotonic() - t0 < timeout_s, \
                    "never reached the point to interrupt at"
                time.sleep(0.05)
            signalled_at = time.monotonic()
            for sig in signals:
                proc.send_signal(sig)
                time.sleep(0.3)
        stdout, stderr = proc.communicate(timeout=timeout_s)
        ended_at = time.monotonic()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        left = wait_until_none_marked(mark)
        kill_marked(mark)  # clean up whatever the assertions say next
    return Outcome(proc.returncode, [ln for ln in stderr.splitlines() if ln.strip()], stdout,
                   time.monotonic() - t0, left, None if signalled_at is None else ended_at - signalled_at)
