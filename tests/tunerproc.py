"""Test support for tuner run as a real process: its JSON events as they come, live processes read from /proc, and
a fake RPC worker that answers llama.cpp's handshake with another protocol version."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tuner.server import process_alive


class TunerProcess:
    """``tuner ARGS [--json]`` in a subprocess; its stdout JSON lines as events and its stderr, collected as they
    come."""

    def __init__(self, args: list[str], env: dict[str, str], as_json: bool = True) -> None:
        cmd = [sys.executable, "-m", "tuner", *args, *(["--json"] if as_json else [])]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self.events: list[dict[str, Any]] = []
        self._threads = [threading.Thread(target=self._pump, args=(self.proc.stdout, True), daemon=True),
                         threading.Thread(target=self._pump, args=(self.proc.stderr, False), daemon=True)]
        for t in self._threads:
            t.start()

    def _pump(self, stream: Any, is_stdout: bool) -> None:
        for line in stream:
            (self.stdout if is_stdout else self.stderr).append(line)
            if is_stdout:
                self.lines.put(line)
        if is_stdout:
            self.lines.put(None)

    def wait_for(self, pred: Callable[[dict[str, Any]], bool], timeout_s: float = 180) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"timed out; stdout={self.stdout} stderr={self.stderr}") from None
            if line is None:
                raise AssertionError(f"tuner exited ({self.proc.wait()}); stdout={self.stdout} stderr={self.stderr}")
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                self.events.append(event)
                if pred(event):
                    return event

    def finish(self, timeout_s: float = 60) -> int:
        code = self.proc.wait(timeout=timeout_s)
        for t in self._threads:
            t.join(timeout=5)
        while True:  # the events printed after the last wait_for
            try:
                line = self.lines.get_nowait()
            except queue.Empty:
                break
            if line is not None:
                with contextlib.suppress(ValueError):
                    self.events.append(json.loads(line))
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def one_line_error(self) -> str:
        errors = [line for line in self.stderr if line.startswith("tuner: error:")]
        assert len(errors) == 1, self.stderr
        return errors[0].rstrip("\n")


def status_is(status: str) -> Callable[[dict[str, Any]], bool]:
    return lambda e: e.get("status") == status


def live_cmdlines() -> Iterator[tuple[int, list[bytes]]]:
    """``(pid, argv)`` of every live (not zombie) process other than this one (reads /proc)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0] and process_alive(int(entry.name)):
            yield int(entry.name), argv


def programs_running(program: str, arg: str) -> list[int]:
    """Live processes of ``program`` (the end of their argv[0]) with ``arg`` as one of their arguments."""
    return [pid for pid, argv in live_cmdlines() if argv[0].endswith(program.encode()) and arg.encode() in argv]


@contextlib.contextmanager
def other_protocol_worker(version: tuple[int, int, int] = (6, 0, 0)) -> Iterator[str]:
    """A TCP server on loopback that answers llama.cpp's RPC hello as a worker of protocol ``version`` would (an
    older ggml-rpc-server); yields its ``HOST:PORT``."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            with conn, contextlib.suppress(OSError):
                conn.settimeout(5)
                got = b""
                while len(got) < 1 + 8 + 24:  # the command byte, its size, the hello's version
                    chunk = conn.recv(64)
                    if not chunk:
                        break
                    got += chunk
                conn.sendall((28).to_bytes(8, "little") + bytes([*version, 0]) + bytes(24))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(5)
        server.close()
