"""``tuner worker``: llama.cpp's RPC server (``ggml-rpc-server``) in the foreground, so that a llama-server on another
machine can use this machine's devices (``--rpc HOST:PORT`` there).

What ``ggml-rpc-server`` does that tuner works around (tools/rpc/rpc-server.cpp, ggml/src/ggml-rpc/):

* It binds an IPv4 literal only (``inet_addr``; ``localhost`` is an invalid host address, transport.cpp:715-740):
  tuner takes ``localhost`` as 127.0.0.1 and refuses anything else that is not an IPv4 address.
* Any address but 127.0.0.1 exposes it: the protocol has no authentication and no encryption, so tuner refuses a
  non-loopback ``--host`` unless ``--allow-remote`` says the network is trusted (:data:`SECURITY_NOTE`).
* A port in use makes it print ``Failed to create server socket`` and exit with code **0** (ggml-rpc.cpp:2138-2141):
  tuner checks the port before starting it and reads that line if it still happens.
* It serves one client at a time, and writes its handshake reply to a client that may have gone: with SIGPIPE at its
  default that kills it, so it starts with SIGPIPE ignored, as tuner has it (``restore_signals=False``).
* Its stdout is block-buffered through a pipe (nothing shows until the first client): it writes to a pseudo-terminal
  instead, so its start-up lines (version, endpoint, devices and their memory) arrive as it prints them.
* Ctrl-C stops it with its process group (:mod:`tuner.procgroup`); it also dies with tuner if tuner is killed.

Nothing here prints or exits: events go to a callback as small JSON-ready dicts, failures are TunerError.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import select
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuner.errors import TunerError
from tuner.hardware import DEFAULT_RPC_PORT
from tuner.procgroup import start_group, stop_group
from tuner.server import ensure_port_free, exit_reason
from tuner.units import MiB

SECURITY_NOTE = ("llama.cpp's RPC has no authentication and no encryption: anyone who reaches this port can use this "
                 "machine's devices and memory, so expose it only on a trusted network, or reach it through an SSH "
                 "tunnel or a VPN")
START_TIMEOUT_S = 60.0

Event = dict[str, Any]
EventFn = Callable[[Event], None]

_VERSION_RE = re.compile(r"Starting RPC server v(?P<v>\d+\.\d+\.\d+)")
_ENDPOINT_RE = re.compile(r"^\s*endpoint\s*:\s*(?P<e>\S+)")
_CACHE_RE = re.compile(r"^\s*local cache\s*:\s*(?P<c>.+)$")
_DEVICE_RE = re.compile(r"^\s{2}(?P<name>[^\s:]+): (?P<desc>.*) \((?P<total>\d+) MiB, (?P<free>\d+) MiB free\)\s*$")
_TRANSPORT_RE = re.compile(r"^\s*transport\s*:\s*(?P<t>.+)$")


def _emit(on_event: EventFn | None, event: Event) -> None:
    if on_event is not None:
        on_event(event)


# ------------------------------------------------------------------------------------------------ options


@dataclass(frozen=True)
class WorkerOptions:
    """What ``tuner worker`` takes: where to listen, which devices to offer, CPU threads, the tensor cache."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_RPC_PORT
    devices: tuple[str, ...] = ()  # llama.cpp's device names (CUDA0, CPU …); none: every GPU, else the CPU
    threads: int | None = None  # CPU backend threads (ggml-rpc-server's default: half the hardware threads)
    cache: bool = False  # keep large tensors in a local file cache (ggml-rpc-server -c)
    allow_remote: bool = False

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"


def worker_address(host: str, port: int, allow_remote: bool) -> str:
    """The IPv4 address to bind, checked: ``localhost`` is 127.0.0.1; anything not loopback needs ``allow_remote``;
    the port must be free. TunerError (one line) otherwise."""
    text = host.strip()
    if text.lower() == "localhost":
        text = "127.0.0.1"
    try:
        address = ipaddress.IPv4Address(text)
    except ValueError:
        raise TunerError(f"--host {host!r}: ggml-rpc-server binds IPv4 addresses only, e.g. 127.0.0.1, 0.0.0.0 or "
                         "192.168.1.20") from None
    if not address.is_loopback and not allow_remote:
        raise TunerError(f"--host {text} would expose the RPC worker to the network, and {SECURITY_NOTE}",
                         hint="add --allow-remote on a trusted network, or keep 127.0.0.1 and forward the port "
                              "with ssh -L")
    if not 0 < port < 65536:
        raise TunerError(f"--port {port} is not a valid TCP port")
    ensure_port_free(text, port)
    return text


def worker_command(rpc_server_bin: Path | str, options: WorkerOptions) -> list[str]:
    """``ggml-rpc-server``'s command line (tools/rpc/rpc-server.cpp:93-159)."""
    cmd = [str(rpc_server_bin), "--host", options.host, "--port", str(options.port)]
    if options.devices:
        cmd += ["--device", ",".join(options.devices)]
    if options.threads is not None:
        cmd += ["--threads", str(options.threads)]
    if options.cache:
        cmd.append("--cache")
    return cmd


# ------------------------------------------------------------------------------------------------ its output


@dataclass(frozen=True)
class WorkerDevice:
    name: str  # llama.cpp's device name on the worker: CUDA0, CPU …
    description: str  # the card (or CPU) as the backend names it
    total_bytes: int
    free_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "total_bytes": self.total_bytes,
                "free_bytes": self.free_bytes}


@dataclass(frozen=True)
class WorkerInfo:
    """What ``ggml-rpc-server`` says when it starts (ggml-rpc.cpp:2095-2133); memory in whole MiB as it prints it."""

    version: str
    endpoint: str
    devices: tuple[WorkerDevice, ...]
    transport: str = ""
    cache: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "endpoint": self.endpoint, "devices": [d.to_dict() for d in self.devices],
                "transport": self.transport, "cache": self.cache}


def parse_banner(lines: Sequence[str]) -> WorkerInfo | None:
    """The start-up lines read so far as :class:`WorkerInfo`, or None until the ``transport`` line (the last one
    printed before it listens) has come."""
    version = endpoint = cache = ""
    devices: list[WorkerDevice] = []
    for line in lines:
        if m := _VERSION_RE.search(line):
            version = m.group("v")
        elif m := _ENDPOINT_RE.match(line):
            endpoint = m.group("e")
        elif m := _CACHE_RE.match(line):
            cache = m.group("c").strip()
        elif m := _DEVICE_RE.match(line):
            devices.append(WorkerDevice(m.group("name"), m.group("desc"), int(m.group("total")) * MiB,
                                        int(m.group("free")) * MiB))
        elif (m := _TRANSPORT_RE.match(line)) and version:
            return WorkerInfo(version, endpoint, tuple(devices), m.group("t").strip(), cache)
    return None


def worker_failure(text: str, options: WorkerOptions) -> str | None:
    """One line for why ``ggml-rpc-server`` stopped, from its output; None when the output says nothing known."""
    if "Failed to create server socket" in text:
        return (f"ggml-rpc-server could not listen on {options.endpoint}: the port is in use (or the address is not "
                "one of this machine's); pick another with --port")
    if m := re.search(r"Invalid host address: (\S+)", text):
        return f"ggml-rpc-server cannot bind {m.group(1)!r}: give --host an IPv4 address"
    if m := re.search(r"unknown device: (\S+)", text):
        available = re.findall(r"^\s+(\S+?):\s", text.split("available devices:", 1)[-1], re.MULTILINE)
        return (f"--device {m.group(1)}: no such device on this machine"
                + (f" (available: {', '.join(available)})" if available else ""))
    if m := re.search(r"Failed to create backend for device (\S+)", text):
        return f"ggml-rpc-server could not start a backend for {m.group(1)}"
    if m := re.search(r"error: unknown argument: (\S+)", text):
        return f"this ggml-rpc-server does not know the argument {m.group(1)} (an older llama.cpp?)"
    if "No devices found" in text:
        return "ggml-rpc-server found no device to offer"
    return None


# ------------------------------------------------------------------------------------------------ the process


@dataclass
class WorkerProcess:
    """One ``ggml-rpc-server``, its output read line by line through a pseudo-terminal."""

    command: list[str]
    proc: subprocess.Popen[bytes] | None = None
    lines: list[str] = field(default_factory=list)
    _fd: int | None = None
    _partial: str = ""

    def start(self) -> None:
        master, slave = os.openpty()
        try:
            # restore_signals=False: the child keeps Python's SIGPIPE = ignored (see the module docstring)
            self.proc = start_group(self.command, die_with_parent=True, stdin=subprocess.DEVNULL, stdout=slave,
                                    stderr=slave, restore_signals=False)
        except OSError as exc:
            os.close(master)
            raise TunerError(f"cannot run {self.command[0]}: {exc.strerror or exc}") from None
        finally:
            os.close(slave)
        self._fd = master

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def read(self, timeout_s: float) -> list[str]:
        """Lines printed within ``timeout_s`` (returns early when some arrive); [] at the end of its output."""
        if self._fd is None:
            return []
        ready, _, _ = select.select([self._fd], [], [], timeout_s)
        if not ready:
            return []
        try:
            chunk = os.read(self._fd, 65536).decode(errors="replace")
        except OSError:  # EIO: the child has closed the terminal
            chunk = ""
        if not chunk:
            self._close_fd()
            new = [self._partial] if self._partial.strip() else []
            self._partial = ""
        else:
            text = (self._partial + chunk).replace("\r\n", "\n").replace("\r", "\n")
            *new, self._partial = text.split("\n")
        self.lines += new
        return new

    def drain(self, timeout_s: float = 1.0) -> None:
        """Read what is left of its output (after it exited)."""
        deadline = time.monotonic() + timeout_s
        while self._fd is not None and time.monotonic() < deadline:
            self.read(0.1)

    def _close_fd(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    def stop(self, grace_s: float = 5.0) -> int | None:
        code = None if self.proc is None else stop_group(self.proc, grace_s)
        self._close_fd()
        return code


def run_worker(rpc_server_bin: Path | str, options: WorkerOptions, *, on_event: EventFn | None = None,
               start_timeout_s: float = START_TIMEOUT_S, max_seconds: float | None = None) -> WorkerInfo:
    """Start ``ggml-rpc-server``, report what it offers, relay its clients until KeyboardInterrupt (Ctrl-C; the CLI
    turns SIGTERM into it too) or ``max_seconds``, then stop it. Returns what it offered after a requested stop;
    TunerError (one line) when it cannot start or stops on its own. Nothing is left running either way."""
    host = worker_address(options.host, options.port, options.allow_remote)
    opts = WorkerOptions(host, options.port, options.devices, options.threads, options.cache, options.allow_remote)
    worker = WorkerProcess(worker_command(rpc_server_bin, opts))
    _emit(on_event, {"status": "starting", "command": worker.command})
    worker.start()
    try:
        info = _wait_listening(worker, opts, start_timeout_s)
        _emit(on_event, {"status": "listening", "pid": worker.pid, **info.to_dict(),
                         "loopback_only": ipaddress.IPv4Address(host).is_loopback,
                         "security": SECURITY_NOTE})
        _relay(worker, opts, on_event, max_seconds)
    except KeyboardInterrupt:
        _emit(on_event, {"status": "stopping", "pid": worker.pid})
        code = worker.stop()
        _emit(on_event, {"status": "stopped", "reason": exit_reason(code)})
        return info
    finally:
        worker.stop()
    return info


_ROUTINE_RE = re.compile(r"Accepted client connection|Client connection closed|^\s*(endpoint|local cache|transport)\s*:"
                         r"|Starting RPC server|^Devices:|MiB free\)")


def _exited(worker: WorkerProcess, options: WorkerOptions) -> TunerError:
    worker.drain()
    text = "\n".join(worker.lines)
    reason = exit_reason(worker.proc.poll() if worker.proc else None)
    said = [line.strip() for line in worker.lines if line.strip() and not _ROUTINE_RE.search(line)]
    return TunerError(worker_failure(text, options) or f"ggml-rpc-server stopped ({reason})"
                      + (f": {said[-1][:300]}" if said else ""))


def _wait_listening(worker: WorkerProcess, options: WorkerOptions, timeout_s: float) -> WorkerInfo:
    deadline = time.monotonic() + timeout_s
    while True:
        worker.read(0.2)
        info = parse_banner(worker.lines)
        if info is not None:
            # it prints the banner, then binds: a bind failure follows at once (ggml-rpc.cpp:2133-2141)
            worker.read(0.2)
            if not worker.running() or "Failed to create server socket" in "\n".join(worker.lines):
                raise _exited(worker, options)
            return info
        if not worker.running():
            raise _exited(worker, options)
        if time.monotonic() > deadline:
            raise TunerError(f"ggml-rpc-server did not start within {timeout_s:g} s")


def _relay(worker: WorkerProcess, options: WorkerOptions, on_event: EventFn | None,
           max_seconds: float | None) -> None:
    started = time.monotonic()
    seen = len(worker.lines)
    while True:
        worker.read(0.5)
        for line in worker.lines[seen:]:
            event = _line_event(line)
            if event is not None:
                _emit(on_event, event)
        seen = len(worker.lines)
        if not worker.running():
            raise _exited(worker, options)
        if max_seconds is not None and time.monotonic() - started >= max_seconds:
            return


def _line_event(line: str) -> Event | None:
    text = line.strip()
    if not text:
        return None
    if text == "Accepted client connection":
        return {"client": "connected"}
    if text == "Client connection closed":
        return {"client": "closed"}
    if "HELLO request size mismatch" in text or "Expected HELLO command" in text:
        return {"warning": "a client with an older RPC protocol connected and was dropped: build its llama-server "
                           "from the same llama.cpp as this worker", "kind": "protocol", "line": text}
    return {"log": text}
