"""The watchdog of a process group (see :mod:`tuner.procgroup`), run as ``python -I -S _watchdog.py GRACE_S`` with
its stdin the read end of a pipe only tuner writes to.

It reads ``pgid N`` (written by the group's leader between fork and exec), then waits. ``release`` means tuner
stopped the group itself: at EOF it exits quietly. EOF without ``release`` means tuner died (the kernel closed its
end of the pipe): it sends the group SIGTERM, waits up to GRACE_S seconds while a live (non-zombie) member is left,
then sends SIGKILL. SIGTERM to the watchdog does the same at once; SIGINT and SIGHUP are ignored. It imports nothing
beyond the standard library, so that it starts in milliseconds.
"""

import os
import signal
import sys
import time

pgid = 0
released = False


def alive() -> bool:
    """Whether a live process of group ``pgid`` is left (zombies do not count: PID 1 may never reap them)."""
    try:
        names = os.listdir("/proc")
    except OSError:
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


def stop(*_: object) -> None:
    if pgid and not released:
        try:
            os.killpg(pgid, signal.SIGTERM)
            end = time.monotonic() + float(sys.argv[1])
            while time.monotonic() < end and alive():
                time.sleep(0.05)
            os.killpg(pgid, signal.SIGKILL)
        except (OSError, ValueError, IndexError):
            pass
    os._exit(0)


signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGHUP, signal.SIG_IGN)
signal.signal(signal.SIGTERM, stop)
for line in sys.stdin.buffer:
    words = line.split()
    if words[:1] == [b"pgid"] and len(words) == 2 and words[1].isdigit():
        pgid = int(words[1])
    elif words[:1] == [b"release"]:
        released = True
stop()
