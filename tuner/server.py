"""Running llama-server: start it, watch its log and /health, and stop it so that nothing is left behind.

* The child is started in its own session (a terminal's Ctrl-C reaches tuner only, which then stops the child in
  order) and with ``PR_SET_PDEATHSIG`` (Linux), so it dies with tuner even when tuner is killed outright.
* Its stdout and stderr go to a log file, which is what :mod:`tuner.serverlog` parses and what errors quote.
* The HTTP server comes up before the model is loaded and answers 503 while loading (llamacpp-memory.md §7); a
  process that exits while we wait is reported with the tail of its log, not as a timeout.
* ``stop()`` sends SIGTERM (llama-server prints its memory breakdown and exits), then SIGKILL after a grace period.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from tuner.errors import TunerError

PR_SET_PDEATHSIG = 1
_ERROR_LINE_RE = re.compile(r"(error|failed|fatal|abort|exception|terminate|cannot|unable)", re.IGNORECASE)
LOADING_PROGRESS_RE = re.compile(r"load_tensors|llama_kv_cache|llama_memory_recurrent|sched_reserve|model loaded")


def _set_pdeathsig() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def ensure_port_free(host: str, port: int) -> None:
    """TunerError if something already listens on host:port (checked before anything is launched)."""
    if not 0 < port < 65536:
        raise TunerError(f"port {port} is not a valid TCP port")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except PermissionError:
            raise TunerError(f"no permission to listen on {host}:{port} (ports below 1024 need root)") from None
        except OSError as exc:
            raise TunerError(f"port {port} on {host} is already in use ({exc.strerror}); "
                             f"pick another with --port") from None


def log_tail(text: str, n_lines: int = 12) -> list[str]:
    return [line for line in text.splitlines() if line.strip()][-n_lines:]


def error_summary(text: str) -> str:
    """The most telling line of a failed llama-server log: its last error-like line, else its last line."""
    lines = log_tail(text, 200)
    errors = [line for line in lines if _ERROR_LINE_RE.search(line)]
    chosen = errors[-1] if errors else (lines[-1] if lines else "no output")
    return " ".join(chosen.split())[:300]


class LlamaServer:
    """One llama-server process. Use as a context manager: leaving the block stops it."""

    def __init__(self, server_bin: str | os.PathLike[str], model_path: str | os.PathLike[str], args: Sequence[str] = (),
                 *, host: str = "127.0.0.1", port: int | None = None, log_path: str | os.PathLike[str] | None = None,
                 env: Mapping[str, str] | None = None, api_key: str | None = None) -> None:
        self.server_bin = Path(server_bin)
        self.model_path = Path(model_path)
        self.args = list(args)
        self.host = host
        self.port = port or free_port(host if host not in ("0.0.0.0", "::") else "127.0.0.1")
        self._own_log = log_path is None
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="llama-server-", suffix=".log")[1])
        self.env = dict(env or {})
        self.api_key = api_key
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    # --- lifecycle ----------------------------------------------------------------------------------------------
    @property
    def command(self) -> list[str]:
        cmd = [str(self.server_bin), "-m", str(self.model_path), "--host", self.host, "--port", str(self.port)]
        if self.api_key:
            cmd += ["--api-key", self.api_key]
        return cmd + self.args

    @property
    def base_url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{'[' + host + ']' if ':' in host else host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self) -> None:
        if not self.server_bin.is_file():
            raise TunerError(f"llama-server not found at {self.server_bin} (run `tuner build`)")
        ensure_port_free(self.host, self.port)
        env = {**os.environ, **self.env}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                start_new_session=True, preexec_fn=_set_pdeathsig,
            )
        self.started_at = time.monotonic()

    def poll(self) -> int | None:
        return self.proc.poll() if self.proc else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace_s: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after ``grace_s``. Returns the exit code (None if never started)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        return self.proc.returncode

    def cleanup_log(self) -> None:
        if self._own_log:
            with contextlib.suppress(OSError):
                self.log_path.unlink()

    def __enter__(self) -> LlamaServer:
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # --- the log --------------------------------------------------------------------------------------------------
    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def _raise_exited(self, what: str) -> None:
        code = self.poll()
        raise TunerError(f"llama-server exited with code {code} {what}: {error_summary(self.log_text())} "
                         f"(full log: {self.log_path})")

    def wait_for_log(self, pattern: str | re.Pattern[str], timeout_s: float = 120.0) -> re.Match[str]:
        """Wait until the log matches ``pattern``; TunerError if the process exits or time runs out."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout_s
        while True:
            m = regex.search(self.log_text())
            if m:
                return m
            if not self.running():
                self._raise_exited("before its log showed what was expected")
            if time.monotonic() > deadline:
                raise TunerError(f"llama-server did not log {regex.pattern!r} within {timeout_s:.0f} s "
                                 f"(log: {self.log_path})")
            time.sleep(0.1)

    def wait_ready(self, timeout_s: float = 600.0, on_progress: Callable[[str], None] | None = None) -> float:
        """Poll /health until 200. Returns seconds since start. Fails fast, with the log's error, on exit."""
        deadline = time.monotonic() + timeout_s
        last_stage = ""
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        with httpx.Client(timeout=2.0) as client:
            while True:
                if not self.running():
                    self._raise_exited("while loading the model")
                with contextlib.suppress(httpx.HTTPError):
                    r = client.get(f"{self.base_url}/health", headers=headers)
                    if r.status_code == 200:
                        return time.monotonic() - self.started_at
                if on_progress:
                    stages = LOADING_PROGRESS_RE.findall(self.log_text())
                    if stages and stages[-1] != last_stage:
                        last_stage = stages[-1]
                        on_progress(last_stage)
                if time.monotonic() > deadline:
                    raise TunerError(f"llama-server was not healthy after {timeout_s:.0f} s (log: {self.log_path})")
                time.sleep(0.2)

    # --- requests -------------------------------------------------------------------------------------------------
    def post(self, path: str, payload: dict[str, Any], timeout_s: float = 600.0) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        try:
            r = httpx.post(f"{self.base_url}{path}", json=payload, headers=headers, timeout=timeout_s)
        except httpx.HTTPError as exc:
            if not self.running():
                self._raise_exited(f"during a request to {path}")
            raise TunerError(f"request to llama-server {path} failed: {exc}") from None
        if r.status_code != 200:
            raise TunerError(f"llama-server answered {r.status_code} to {path}: {r.text[:200]}")
        return dict(r.json())

    def smoke_completion(self, max_tokens: int = 4) -> dict[str, Any]:
        """One real chat completion: configs have loaded at thin margins and then produced 0 tokens."""
        reply = self.post("/v1/chat/completions", {
            "messages": [{"role": "user", "content": "Say hello."}],
            "max_tokens": max_tokens, "temperature": 0.0,
        })
        usage = reply.get("usage") or {}
        if int(usage.get("completion_tokens", 0)) < 1:
            raise TunerError(f"llama-server loaded but produced no tokens (log: {self.log_path})")
        return reply


def process_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie (reads /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"
