"""Running llama-server: start it, watch its log and /health, and stop it so that nothing is left behind.

* The child is started in its own session (a terminal's Ctrl-C reaches tuner only, which then stops the child in
  order) and with ``PR_SET_PDEATHSIG`` (Linux), so it dies with tuner even when tuner is killed outright
  (:func:`tuner.procgroup.start_group`).
* Its stdout and stderr go to a log file, which is what :mod:`tuner.serverlog` parses and what errors quote; it is
  read incrementally and bounded (:mod:`tuner.growing_log`), never whole.
* The HTTP server comes up before the model is loaded (tools/server/server.cpp:461-483) and answers 503 while
  loading (tools/server/server-http.cpp:307-326); a process that exits while we wait is reported with the tail of
  its log, not as a timeout.
* ``stop()`` sends SIGTERM (llama-server prints its memory breakdown and exits), then SIGKILL after a grace period,
  to the child's whole process group (:func:`tuner.procgroup.stop_group`), so a wrapper script given as
  ``--server-bin`` leaves nothing behind either.
* ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` is set for the child (unless the caller's ``env`` says otherwise), so llama.cpp's
  ``CUDAn`` is NVML's GPU ``n`` (see :mod:`tuner.hardware`); so is ``GGML_NO_BACKTRACE=1``: llama.cpp aborts on
  every RPC failure and would attach gdb to print a backtrace first (ggml.c:159-166), which floods the log and can
  hang; its one abort message is what :func:`error_summary` needs (RPC failures: :func:`tuner.rpc.rpc_failure`).
* CPU-resident weights of a CUDA build go into pinned host memory (``CUDA_Host``) when mmap is off, and a few
  pinned buffers exist always; ``ggml_cuda_host_malloc`` falls back to pageable memory when ``cudaMallocHost`` fails
  (ggml-cuda.cu:1271-1297, logged only at debug level), but a pinned allocation can still take the process down (a
  CUDA error, the OOM killer). :func:`pinned_memory_failure` recognises that in a log, and
  :data:`NO_PINNED_ENV` is what a caller sets to retry without pinned memory (ggml-cuda.cu:1272, 5116).
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import math
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
from tuner.flags import FLAGS
from tuner.growing_log import GrowingLog
from tuner.llama_api import ANY_OBJECT, CHAT_COMPLETION, MAX_METRICS_BYTES, check_answer, parse_metrics, read_body
from tuner.paths import cache_dir
from tuner.procgroup import start_group, stop_group
from tuner.records import Check
from tuner.untrusted import has_control, shown

NO_PINNED_ENV = {"GGML_CUDA_NO_PINNED": "1"}
CHILD_ENV = {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "GGML_NO_BACKTRACE": "1"}
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
# What a failed pinned (page-locked) host allocation leaves in a log: ggml-cuda.cu's debug lines (1281, 4934), a
# CUDA_CHECK of cudaMallocHost/cudaHostRegister/cudaFreeHost, "unable to allocate CUDA_Host buffer"
# (llama-model.cpp:1870) or "failed to allocate CUDA_Host buffer of size" (ggml-alloc.c:941, 1134).
PINNED_FAILURE_RE = re.compile(
    r"(failed to (?:allocate|register) [\d.]+ MiB of pinned memory"
    r"|cudaMallocHost|cudaHostRegister|cudaHostAlloc|cudaFreeHost"
    r"|(?:unable|failed) to allocate \w*_Host buffer)", re.IGNORECASE)
_ERROR_LINE_RE = re.compile(r"(error|failed|fatal|abort|exception|terminate|cannot|unable)", re.IGNORECASE)
# Causes, most specific first (llama-model-loader / llama.cpp / ggml-cuda messages); the generic follow-up lines
# ("failed to load model", "exiting due to model loading error") say nothing the cause does not.
_CAUSE_RES: tuple[re.Pattern[str], ...] = tuple(re.compile(p) for p in (
    r"error loading model: .*",
    r"CUDA error: .*",
    r"quantized V cache requires .*",
    r"(?:unable|failed) to allocate .*",
    r"cudaMalloc[^\n]*failed.*",
    r"out of memory.*",
    r"couldn't bind HTTP server socket.*",
    r"(?:invalid argument|error while handling argument|unknown argument): .*",
))
_GENERIC_ERROR_RE = re.compile(r"failed to load model|exiting due to model loading error|encountered an error while "
                               r"trying to fit")
_LOG_PREFIX_RE = re.compile(r"^\s*\d+\.\d+\.\d+\.\d+ [A-Z] ")
_ERROR_LEVEL_RE = re.compile(r"^\s*\d+\.\d+\.\d+\.\d+ E ")
# Load stages as the log shows them, in order, and how to say them.
LOAD_STAGES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"llama_model_loader: loaded meta data"), "reading the model"),
    (re.compile(r"load_tensors: loading model tensors"), "loading weights"),
    (re.compile(r"llama_context: constructing llama_context|llama_context: n_seq_max"), "creating the context"),
    (re.compile(r"llama_kv_cache: "), "allocating the KV cache"),
    (re.compile(r"llama_memory_recurrent: "), "allocating the recurrent state"),
    (re.compile(r"sched_reserve: "), "reserving compute buffers"),
    (re.compile(r"warming up the model"), "warming up"),
    (re.compile(r"model loaded"), "model loaded"),
)


def is_loopback(host: str) -> bool:
    """True if binding ``host`` exposes the server to this machine only: ``localhost``, or an address (parsed, not
    matched as text: ``127.0.0.1.example.com`` is a name anyone can point anywhere) in 127.0.0.0/8 or ``::1``."""
    h = host.strip().strip("[]").lower()
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


MAX_API_KEY_CHARS = 4096
_API_KEY_RE = re.compile(r"[\x21-\x7e]+")  # printable ASCII without spaces: it travels in an HTTP header


def check_bind(host: str, port: int, api_key: str | None) -> None:
    """Refuse what must not be launched: a host that is no host name or address, a public bind without an API key,
    an API key no HTTP header can carry, or a port already taken."""
    if not host.strip():
        raise TunerError("--host is empty")
    if len(host) > 255 or has_control(host) or any(c.isspace() for c in host) or host.startswith("-"):
        raise TunerError(f"--host {shown(host, 60)} is not a host name or address")
    if api_key is not None and not (0 < len(api_key) <= MAX_API_KEY_CHARS and _API_KEY_RE.fullmatch(api_key)):
        raise TunerError("--api-key must be printable ASCII without spaces (clients send it in an HTTP header), "
                         f"1 to {MAX_API_KEY_CHARS} characters")  # never shown: it is a secret
    if not is_loopback(host) and not api_key:
        raise TunerError(f"--host {host} makes the server reachable from other machines, and there is no --api-key",
                         hint="add --api-key SECRET, or keep the default --host 127.0.0.1")
    ensure_port_free(host, port)


def pinned_memory_failure(log_text: str) -> str | None:
    """The log line that says a pinned host allocation failed, or None."""
    for line in log_text.splitlines():
        if PINNED_FAILURE_RE.search(line):
            return " ".join(line.split())[:300]
    return None


def load_stage(log_text: str) -> str | None:
    """The furthest load stage the log has reached (see :data:`LOAD_STAGES`), or None before the first one."""
    reached = None
    for pattern, label in LOAD_STAGES:
        if pattern.search(log_text):
            reached = label
    return reached


def exit_reason(returncode: int | None) -> str:
    """``exit code 1`` / ``killed by SIGKILL`` / ``still running``."""
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def ensure_port_free(host: str, port: int) -> None:
    """TunerError if something already listens on host:port (checked before anything is launched).

    The test bind uses ``SO_REUSEADDR`` as llama-server's HTTP library does: connections of a server that just
    stopped linger in TIME_WAIT for a minute (always when it closed keep-alive connections itself), and llama-server
    binds over them, so they must not count as "in use". On Linux a listening socket still does.
    """
    if not 0 < port < 65536:
        raise TunerError(f"port {port} is not a valid TCP port")
    try:  # llama-server resolves --host the same way (getaddrinfo, tools/server/server-http.cpp)
        family, _, _, _, address = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, socket.gaierror) else "not a valid host name"
        raise TunerError(f"cannot resolve --host {shown(host, 60)}: {reason}") from None
    with socket.socket(family, socket.SOCK_STREAM) as s:
        if os.name != "nt":  # on Windows SO_REUSEADDR would let us bind over a live listener
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except PermissionError:
            raise TunerError(f"no permission to listen on {host}:{port} (ports below 1024 need root)") from None
        except OSError as exc:
            if exc.errno == errno.EADDRNOTAVAIL:  # a name that resolves to another machine's address
                raise TunerError(f"{host} is not an address of this machine, so nothing can listen on it") from None
            raise TunerError(f"port {port} on {host} is already in use ({exc.strerror}); "
                             f"pick another with --port") from None


READY_TIMEOUT_ENV = "TUNER_READY_TIMEOUT_S"


def ready_timeout_s(default: float) -> float:
    """How long to wait for llama-server to load: ``TUNER_READY_TIMEOUT_S`` (seconds) when set, else ``default``."""
    text = os.environ.get(READY_TIMEOUT_ENV, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise TunerError(f"{READY_TIMEOUT_ENV} must be a positive number of seconds, got {shown(text)}")
    return value


LOG_LINE_CHARS = 2000  # a log line quoted or searched for a cause is cut here (errors show 300 characters)


def log_tail(text: str, n_lines: int = 12) -> list[str]:
    """The last ``n_lines`` non-blank lines of ``text``, each cut to :data:`LOG_LINE_CHARS`."""
    return [line[:LOG_LINE_CHARS] for line in text.splitlines() if line.strip()][-n_lines:]


def error_summary(text: str) -> str:
    """The most telling line of a failed llama-server log: the cause if a known one is there (``error loading
    model: …``, a CUDA error, an allocation that failed …), else the first error-level (``E``) line that is not a
    generic consequence ("failed to load model" …), else the last error-like line, else the last line. The log's
    timestamp/level prefix is dropped. An RPC failure (a worker unreachable, of another protocol version, gone
    while serving) is said in one line of its own (:func:`tuner.rpc.rpc_failure`)."""
    from tuner.rpc import rpc_failure  # the RPC layer sits above this module

    rpc = rpc_failure(text)
    if rpc is not None:
        return rpc
    lines = log_tail(text, 400)
    for pattern in _CAUSE_RES:
        for line in reversed(lines):
            m = pattern.search(line)
            if m:
                return " ".join(m.group(0).split())[:300]
    specific = [line for line in lines if not _GENERIC_ERROR_RE.search(line)]
    first_error_level = next((line for line in specific if _ERROR_LEVEL_RE.match(line)), None)
    if first_error_level is not None:  # llama.cpp logs the cause first, then what failed because of it
        return " ".join(_LOG_PREFIX_RE.sub("", first_error_level).split())[:300]
    errors = [line for line in specific if _ERROR_LINE_RE.search(line)]
    chosen = errors[-1] if errors else (lines[-1] if lines else "no output")
    return " ".join(_LOG_PREFIX_RE.sub("", chosen).split())[:300]


def _temp_log_path() -> Path:
    """A fresh log file in tuner's cache (``logs/``), not the system's temporary folder: a log a failed launch
    leaves behind (its error names it) stays among tuner's files."""
    folder = cache_dir() / "logs"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix="llama-server-", suffix=".log", dir=folder)
    except OSError as exc:
        raise TunerError(f"cannot write llama-server's log in {folder}: {exc.strerror or exc}") from None
    os.close(fd)
    return Path(name)


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
        self.log_path = Path(log_path) if log_path else _temp_log_path()
        self._log = GrowingLog(self.log_path)
        self.env = dict(env or {})
        self.api_key = api_key
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    # --- lifecycle ----------------------------------------------------------------------------------------------
    @property
    def command(self) -> list[str]:
        cmd = [str(self.server_bin), *FLAGS["model"].to_args(str(self.model_path)), *FLAGS["host"].to_args(self.host),
               *FLAGS["port"].to_args(self.port)]
        if self.api_key:
            cmd += FLAGS["api_key"].to_args(self.api_key)
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
        env = {**os.environ, **CHILD_ENV, **self.env}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = GrowingLog(self.log_path)
        with open(self.log_path, "wb") as log:
            try:
                self.proc = start_group(self.command, die_with_parent=True, stdin=subprocess.DEVNULL, stdout=log,
                                        stderr=subprocess.STDOUT, env=env)
            except OSError as exc:
                raise TunerError(f"cannot run {self.server_bin}: {exc.strerror or exc}") from None
        self.started_at = time.monotonic()

    def poll(self) -> int | None:
        return self.proc.poll() if self.proc else None

    def wait_exit(self, timeout_s: float) -> int | None:
        """Block up to ``timeout_s`` for the process to exit (returns at once when it does): its code, or None."""
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace_s: float = 10.0) -> int | None:
        """SIGTERM to its process group, SIGKILL after ``grace_s``, and SIGKILL to whatever is left of the group
        once it has exited (a ``--server-bin`` wrapper script's children). Returns the exit code (None if never
        started). Calling it again is harmless."""
        return None if self.proc is None else stop_group(self.proc, grace_s)

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
        """The log so far, read incrementally and bounded (:class:`tuner.growing_log.GrowingLog`: its first and
        last 4 MiB, a line saying how much lies between): a ``--server-bin`` that floods its log costs neither
        memory nor time in proportion to what it wrote."""
        return self._log.text()

    def log_tail(self, n_lines: int = 12) -> list[str]:
        return log_tail(self.log_text(), n_lines)

    def _raise_exited(self, what: str) -> None:
        code = self.poll()
        hint = ("; a --server-bin must keep llama-server in the foreground (a wrapper script: exec it)"
                if code == 0 and what == "while loading the model" else "")
        raise TunerError(f"llama-server stopped ({exit_reason(code)}) {what}: {error_summary(self.log_text())}"
                         f" (full log: {self.log_path}{hint})")

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
        """Poll /health until 200 (its body is not read). Returns seconds since start. Fails fast, with the log's
        error, on exit. ``TUNER_READY_TIMEOUT_S`` overrides ``timeout_s`` (:func:`ready_timeout_s`)."""
        timeout_s = ready_timeout_s(timeout_s)
        deadline = time.monotonic() + timeout_s
        last_stage: str | None = None
        seen_bytes = -1
        with httpx.Client(timeout=2.0) as client:
            while True:
                if not self.running():
                    self._raise_exited("while loading the model")
                with contextlib.suppress(httpx.HTTPError), \
                        client.stream("GET", f"{self.base_url}/health", headers=self._headers()) as r:
                    if r.status_code == 200:
                        return time.monotonic() - self.started_at
                if on_progress and self._log.grew_since(seen_bytes):  # has it reached another stage?
                    seen_bytes = self._log.read_bytes
                    stage = load_stage(self.log_text())
                    if stage and stage != last_stage:
                        last_stage = stage
                        on_progress(stage)
                if time.monotonic() > deadline:
                    raise TunerError(f"llama-server was not healthy after {timeout_s:.0f} s (log: {self.log_path})")
                time.sleep(0.05 if time.monotonic() - self.started_at < 2.0 else 0.2)

    # --- requests -------------------------------------------------------------------------------------------------
    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def get_text(self, path: str, timeout_s: float = 10.0, max_bytes: int = MAX_METRICS_BYTES) -> str | None:
        """GET ``path``; its body on 200, None on any other answer, when the server does not answer in time, or
        when the answer is larger than ``max_bytes``."""
        try:
            with httpx.stream("GET", f"{self.base_url}{path}", headers=self._headers(), timeout=timeout_s) as r:
                if r.status_code != 200:
                    return None
                body = read_body(r, path, max_bytes=max_bytes, deadline=time.monotonic() + timeout_s)
        except (httpx.HTTPError, TunerError):
            return None
        return body.decode("utf-8", errors="replace")

    def metrics(self) -> dict[str, float] | None:
        """``/metrics`` parsed (:func:`parse_metrics`); None when the server runs without ``--metrics``."""
        text = self.get_text("/metrics")
        return parse_metrics(text) if text is not None else None

    def request(self, method: str, path: str, schema: Check, payload: dict[str, Any] | None = None,
                timeout_s: float = 600.0) -> dict[str, Any]:
        """``method path`` (with ``payload`` as JSON), its answer bounded in size and time and checked against
        ``schema`` (:mod:`tuner.llama_api`): the fields tuner reads. TunerError (one line) otherwise; the log's
        error when the server died meanwhile."""
        what = f"{method} {path}"
        try:
            with httpx.stream(method, f"{self.base_url}{path}", json=payload, headers=self._headers(),
                              timeout=timeout_s) as r:
                body = read_body(r, what, deadline=time.monotonic() + timeout_s)
        except httpx.HTTPError as exc:
            if not self.running():
                self._raise_exited(f"during a request to {path}")
            raise TunerError(f"request to llama-server {path} failed: {type(exc).__name__} "
                             f"{' '.join(str(exc).split())[:200]}") from None
        if r.status_code != 200:
            start = " ".join(body[:200].decode("utf-8", "replace").split())
            raise TunerError(f"llama-server answered {r.status_code} to {path}: {shown(start, 200)}")
        return check_answer(body, schema, what)

    def post(self, path: str, payload: dict[str, Any], timeout_s: float = 600.0, *,
             schema: Check | None = None) -> dict[str, Any]:
        """POST ``payload`` to ``path``: :meth:`request`; without a ``schema``, any JSON object."""
        return self.request("POST", path, schema or ANY_OBJECT, payload, timeout_s)

    def smoke_completion(self, max_tokens: int = 4) -> dict[str, Any]:
        """One real chat completion: configs have loaded at thin margins and then produced 0 tokens."""
        reply = self.post("/v1/chat/completions", {
            "messages": [{"role": "user", "content": "Say hello."}],
            "max_tokens": max_tokens, "temperature": 0.0,
        }, schema=CHAT_COMPLETION)
        if reply["usage"]["completion_tokens"] < 1:
            raise TunerError(f"llama-server loaded but produced no tokens (log: {self.log_path})")
        return reply


def process_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie (reads /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"
