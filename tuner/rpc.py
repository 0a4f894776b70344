"""RPC workers as llama-server sees them: reachable or not, which devices and how much free memory they offer (asked
through llama.cpp itself), what llama.cpp's RPC failures mean (one line each), and the memory of a plan per machine.

* Reachability (:func:`probe_endpoint`): a TCP connect with a short timeout. llama.cpp's own ``connect()`` has none
  (a silent host blocks for the kernel's SYN timeout) and a failure aborts the process (ggml-rpc.cpp:535-550), so
  tuner checks first. A connection that is closed at once costs the worker nothing: it reads no command and goes
  back to ``accept`` (ggml-rpc.cpp:1820-1826).
* Devices (:func:`list_worker_devices`): ``llama-server --rpc HOST:PORT --list-devices`` registers the worker's
  devices while it parses its arguments (common/arg.cpp:2679-2689), prints ``  RPC0: HOST:PORT (T MiB, F MiB
  free)`` for each (common/arg.cpp:1141-1164, memory from the worker's ``GET_DEVICE_MEMORY``) and exits. One worker
  per call, so a worker that does not answer is named. A worker serves one client at a time (ggml-rpc.cpp:2143-2153):
  while a llama-server uses it the listing waits, and tuner gives up after :data:`LIST_TIMEOUT_S`.
* The device's model is not sent over RPC (its description is the endpoint, ggml-rpc.cpp:2353), so a live worker's
  device is planned as a generic GPU for speed unless ``--rpc-gpu`` names the card behind that endpoint
  (:func:`describe_remote_devices`).
* Failures (:func:`rpc_failure`): llama.cpp aborts on every RPC error (``GGML_ABORT``, a SIGABRT); with
  ``GGML_NO_BACKTRACE=1`` (ggml.c:159-166) it prints its message without a gdb backtrace, and the message maps to
  one line here.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tuner.build import ProgressFn as BuildProgressFn
from tuner.devices import CPU
from tuner.errors import TunerError
from tuner.estimate import MemoryEstimate
from tuner.flags import FLAGS
from tuner.hardware import (
    GENERIC_GPU_BANDWIDTH_BYTES_S,
    Gpu,
    Hardware,
    NetworkLink,
    parse_endpoints,
    parse_rpc_gpu_spec,
    rpc_endpoints,
    with_remote_devices,
)
from tuner.procgroup import start_group, stop_group
from tuner.units import MiB

PROBE_TIMEOUT_S = 3.0
LIST_TIMEOUT_S = 30.0
NO_BACKTRACE_ENV = {"GGML_NO_BACKTRACE": "1"}
"""llama.cpp's aborts print a gdb backtrace unless this is set (ggml.c:159-166): one message is what tuner reads."""
UNKNOWN_REMOTE_NAME = "device behind RPC"
"""The model name of a live worker's device: the RPC protocol does not carry it."""
HEAD = "this machine"
"""The host of the machine that runs llama-server, in :func:`memory_by_host`."""

_LIST_LINE_RE = re.compile(r"^\s*(?P<name>RPC\d+): (?P<desc>\S+) \((?P<total>\d+) MiB, (?P<free>\d+) MiB free\)")

ProgressFn = Callable[[str], None]


# ------------------------------------------------------------------------------------------------ reachability


def _split(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    return host, int(port)


def probe_endpoint(endpoint: str, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """TunerError, one line, unless something accepts a TCP connection at ``endpoint`` within ``timeout_s``."""
    host, port = _split(endpoint)
    try:
        infos = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)
    except socket.gaierror:
        raise TunerError(f"RPC worker {endpoint}: the host {host!r} does not resolve to an IPv4 address") from None
    address = infos[0][4]
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(timeout_s)
            s.connect(address)
    except ConnectionRefusedError:
        raise TunerError(f"RPC worker {endpoint} is unreachable: the connection was refused (nothing listens on "
                         f"port {port} there)", hint=f"start `tuner worker --port {port}` on {host}") from None
    except TimeoutError:
        raise TunerError(f"RPC worker {endpoint} is unreachable: no answer within {timeout_s:g} s (the machine is "
                         "down, or a firewall drops the port)") from None
    except OSError as exc:
        raise TunerError(f"RPC worker {endpoint} is unreachable: {exc.strerror or exc}") from None


RPC_CMD_HELLO = 14
"""The handshake command, fixed across protocol versions (``static_assert(RPC_CMD_HELLO == 14)``,
ggml-rpc.cpp:84)."""
_HELLO_REQUEST = bytes([RPC_CMD_HELLO]) + (24).to_bytes(8, "little") + bytes(24)
_HELLO_REPLY_BYTES = 28  # major, minor, patch, padding, 24 bytes of transport capabilities (ggml-rpc.cpp:93-99)


def worker_protocol(endpoint: str, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """The RPC protocol version the worker at ``endpoint`` answers a handshake with (``7.0.0``), or None when it does
    not answer one. Only to say why llama.cpp's handshake failed: llama.cpp logs the version it got and aborts at
    once, so the line is usually lost (its log is written by a thread the abort does not wait for). The request is
    ``rpc_msg_hello_req`` with no transport capabilities (ggml-rpc.cpp:89-99, 307-340)."""
    host, port = _split(endpoint)
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as s:
            s.sendall(_HELLO_REQUEST)
            reply = b""
            while len(reply) < 8 + 4:
                chunk = s.recv(64)
                if not chunk:
                    break
                reply += chunk
    except OSError:
        return None
    if len(reply) < 12 or int.from_bytes(reply[:8], "little") != _HELLO_REPLY_BYTES:
        return None
    return f"{reply[8]}.{reply[9]}.{reply[10]}"


def unreachable(endpoints: Sequence[str], timeout_s: float = 1.0) -> list[str]:
    """The endpoints that refuse or do not answer a connection now."""
    out = []
    for endpoint in endpoints:
        try:
            probe_endpoint(endpoint, timeout_s)
        except TunerError:
            out.append(endpoint)
    return out


# ------------------------------------------------------------------------------------------------ devices


def parse_list_devices(text: str, endpoint: str) -> tuple[Gpu, ...]:
    """The devices of the worker at ``endpoint`` in ``llama-server --rpc ENDPOINT --list-devices`` output, in its
    order (their index on the worker), with the memory the worker reported (MiB, rounded down)."""
    devices: list[Gpu] = []
    for line in text.splitlines():
        m = _LIST_LINE_RE.match(line)
        if m is None or m.group("desc") != endpoint:
            continue
        total, free = int(m.group("total")) * MiB, int(m.group("free")) * MiB
        devices.append(Gpu(index=len(devices), name=UNKNOWN_REMOTE_NAME, vram_total_bytes=total,
                           vram_free_bytes=free, vram_used_bytes=max(total - free, 0),
                           mem_bandwidth_bytes_s=GENERIC_GPU_BANDWIDTH_BYTES_S, pcie_gen=None, pcie_width=None,
                           compute_capability=None, source="rpc", endpoint=endpoint))
    return tuple(devices)


def list_worker_devices(server_bin: Path | str, endpoint: str, timeout_s: float = LIST_TIMEOUT_S) -> tuple[Gpu, ...]:
    """The devices of the worker at ``endpoint``, as ``llama-server --list-devices`` reports them (see the module
    docstring). TunerError, one line, when the worker cannot be asked."""
    cmd = [str(server_bin), *FLAGS["rpc"].to_args((endpoint,)), *FLAGS["list_devices"].to_args(True)]
    try:
        proc = start_group(cmd, die_with_parent=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, env={**os.environ, **NO_BACKTRACE_ENV})
    except OSError as exc:
        raise TunerError(f"cannot run {server_bin}: {exc.strerror or exc}") from None
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        stop_group(proc, 1.0)
        raise TunerError(f"RPC worker {endpoint} accepted the connection but did not answer within {timeout_s:g} s",
                         hint="a worker serves one client at a time: is a llama-server using it?") from None
    finally:
        if proc.poll() is None:
            stop_group(proc, 1.0)
    text = out.decode(errors="replace")
    if proc.returncode != 0:
        if "RPC handshake failed" in text and "version mismatch" not in text:
            version = worker_protocol(endpoint)
            if version is not None:
                text += f"\nRPC server version mismatch: {version}\n"
        raise TunerError(rpc_failure(text) or f"llama-server could not list the devices of RPC worker {endpoint}: "
                         + _last_line(text))
    devices = parse_list_devices(text, endpoint)
    if not devices:
        raise TunerError(f"RPC worker {endpoint} offers no devices (llama-server --list-devices: {_last_line(text)})")
    return devices


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no output"


def discover(server_bin: Path | str, endpoints: Sequence[str], *, on_progress: ProgressFn | None = None
             ) -> tuple[Gpu, ...]:
    """Every worker's devices, in llama.cpp's device order. All endpoints are probed before any is asked, so the
    first failure is the one to fix and nothing waits on a dead host."""
    for endpoint in endpoints:
        probe_endpoint(endpoint)
    devices: list[Gpu] = []
    for endpoint in endpoints:
        if on_progress:
            on_progress(f"asking RPC worker {endpoint} for its devices")
        devices += list_worker_devices(server_bin, endpoint)
    return tuple(devices)


def describe_remote_devices(live: Sequence[Gpu], described: Sequence[Gpu]) -> tuple[tuple[Gpu, ...], list[str]]:
    """Live workers' devices with the card ``--rpc-gpu`` names at the same endpoint and index (bandwidth, compute
    capability, catalog name for the speed model; the memory stays what the worker reported), and notes: which
    devices stay generic. A ``--rpc-gpu`` entry for an endpoint not in ``--rpc`` is refused."""
    by_slot = {(g.endpoint, g.index): g for g in described}
    live_endpoints = set(rpc_endpoints(live))
    stray = [e for e in rpc_endpoints(described) if e not in live_endpoints]
    if stray:
        raise TunerError(f"--rpc-gpu names {', '.join(stray)}, which --rpc does not: with --rpc, --rpc-gpu only "
                         "says which cards the listed workers hold")
    out: list[Gpu] = []
    generic: list[str] = []
    for g in live:
        card = by_slot.get((g.endpoint, g.index))
        if card is None:
            out.append(g)
            generic.append(g.llama_name)
            continue
        out.append(replace(card, vram_total_bytes=g.vram_total_bytes, vram_free_bytes=g.vram_free_bytes,
                           vram_used_bytes=g.vram_used_bytes, source="rpc"))
    notes = []
    if generic:
        notes.append(f"{', '.join(generic)}: RPC does not say which device it is; speed assumes a generic GPU "
                     f"({GENERIC_GPU_BANDWIDTH_BYTES_S / 1e9:.0f} GB/s), or name it with --rpc-gpu CARD@HOST:PORT")
    return tuple(out), notes


def rpc_hardware(hardware: Hardware, *, rpc: str | None, rpc_gpu: str | None, link: NetworkLink | None,
                 server_bin: Callable[[], Path] | None = None, on_progress: ProgressFn | None = None) -> Hardware:
    """``hardware`` with the devices of ``--rpc`` workers (asked through ``server_bin()``, a llama-server built with
    RPC, called only when there are workers to ask) or of the ``--rpc-gpu`` what-if workers in front."""
    if not rpc and not rpc_gpu:
        if link is not None:
            raise TunerError("--link-gbit / --link-rtt-ms describe the network to RPC workers: add --rpc or --rpc-gpu")
        return hardware
    described = parse_rpc_gpu_spec(rpc_gpu) if rpc_gpu else ()
    if not rpc:
        what = ", ".join(f"{e} ({sum(1 for d in described if d.endpoint == e)} × {_card(described, e)})"
                         for e in rpc_endpoints(described))
        return with_remote_devices(hardware, described, link,
                                   [f"RPC workers from the catalog ({what}), not asked: all their memory counted free"])
    endpoints = parse_endpoints(rpc)
    if server_bin is None:
        raise TunerError("internal: --rpc needs a llama-server to ask the workers with")
    live = discover(server_bin(), endpoints, on_progress=on_progress)
    devices, notes = describe_remote_devices(live, described)
    return with_remote_devices(hardware, devices, link, notes)


def network_link(gbit_s: float | None, rtt_ms: float | None) -> NetworkLink | None:
    """``--link-gbit`` / ``--link-rtt-ms`` as a link (the default's value for the one not given); None for neither."""
    if gbit_s is None and rtt_ms is None:
        return None
    default = NetworkLink()
    return NetworkLink(gbit_s if gbit_s is not None else default.gbit_s,
                       rtt_ms / 1e3 if rtt_ms is not None else default.rtt_s)


def cluster_hardware(hardware: Hardware, *, rpc: str | None = None, rpc_gpu: str | None = None,
                     link_gbit: float | None = None, link_rtt_ms: float | None = None, source: str = "pypi",
                     cuda: bool | None = None, server_bin: str | None = None,
                     on_build_progress: BuildProgressFn | None = None,
                     on_progress: ProgressFn | None = None) -> Hardware:
    """What ``--rpc``, ``--rpc-gpu``, ``--link-gbit`` and ``--link-rtt-ms`` make of ``hardware`` (the one entry the
    commands share): live workers are asked through the llama-server ``tuner serve`` would run (built if needed)."""

    def ask_with() -> Path:
        from tuner.build import obtain_build

        local = [g for g in hardware.local_gpus if g.source == "nvml"]
        build, _ = obtain_build(source, cuda, server_bin, local or None, on_build_progress)
        return build.server_bin

    return rpc_hardware(hardware, rpc=rpc, rpc_gpu=rpc_gpu, link=network_link(link_gbit, link_rtt_ms),
                        server_bin=ask_with, on_progress=on_progress)


def _card(devices: Sequence[Gpu], endpoint: str) -> str:
    return next(d.name for d in devices if d.endpoint == endpoint)


# ------------------------------------------------------------------------------------------------ failures

_FAILURES: tuple[tuple[re.Pattern[str], Callable[[re.Match[str], str], str]], ...] = (
    (re.compile(r"RPC not supported in this build"),
     lambda m, t: "this llama-server was built without RPC (GGML_RPC=ON), so it cannot use --rpc: run tuner's own "
                  "build (`tuner build`) or give --server-bin one configured with -DGGML_RPC=ON"),
    (re.compile(r"RPC server version mismatch: (?P<v>\d+\.\d+\.\d+)"),
     lambda m, t: f"RPC worker {_handshake_endpoint(t)} runs RPC protocol {m.group('v')}, which this llama-server "
                  "does not speak (it takes its own major version, and a minor version no newer than its own): run "
                  "ggml-rpc-server from the same llama.cpp build as llama-server (`tuner worker` does)"),
    (re.compile(r"Failed to connect to (?P<e>\S+)"),
     lambda m, t: f"RPC worker {m.group('e')} is unreachable: nothing accepted the connection (start `tuner worker` "
                  "there; check the address, the port and the firewall)"),
    (re.compile(r"Cannot resolve host '(?P<h>[^']*)'"),
     lambda m, t: f"RPC worker host {m.group('h')!r} does not resolve"),
    (re.compile(r"RPC handshake failed for (?P<e>\S+)"),
     lambda m, t: f"RPC worker {m.group('e')} failed the handshake: run ggml-rpc-server from the same llama.cpp "
                  "build as llama-server (`tuner worker` does)"),
    (re.compile(r"Failed to parse endpoint: (?P<e>\S+)"),
     lambda m, t: f"llama.cpp could not read the RPC endpoint {m.group('e')!r} (HOST:PORT)"),
    (re.compile(r"Remote RPC server crashed or returned malformed response"),
     lambda m, t: "an RPC worker stopped answering (it crashed or was stopped, or the network dropped)"
                  if _loading_started(t) else
                  "an RPC worker closed the connection during the handshake: an older ggml-rpc-server (protocol "
                  "before 7.0) or not an RPC worker at all; run the worker from the same llama.cpp build"),
)


def _handshake_endpoint(text: str) -> str:
    m = re.search(r"RPC handshake failed for (\S+)", text)
    return m.group(1) if m else "(unknown)"


def _loading_started(text: str) -> bool:
    return bool(re.search(r"llama_model_loader|load_tensors|llama_prepare_model_devices|main: loading model", text))


def rpc_failure(text: str) -> str | None:
    """One line for the RPC failure llama-server's output shows (see the module docstring), or None."""
    for pattern, say in _FAILURES:
        m = pattern.search(text)
        if m:
            return say(m, text)
    return None


# ------------------------------------------------------------------------------------------------ per machine


@dataclass(frozen=True)
class HostMemory:
    """What a plan puts on one machine: the devices there (llama.cpp's names), their planned bytes and free bytes."""

    host: str  # the worker's host, or HEAD
    endpoints: tuple[str, ...]
    devices: tuple[str, ...]
    planned_bytes: int
    free_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {"host": self.host, "endpoints": list(self.endpoints), "devices": list(self.devices),
                "planned_bytes": self.planned_bytes, "free_bytes": self.free_bytes}


def memory_by_host(estimate: MemoryEstimate, hardware: Hardware) -> list[HostMemory]:
    """The estimate's device totals gathered per machine: each worker host's devices, then this machine's GPUs and
    its RAM (host buffers, checkpoints and a full prompt cache, at worst), each a row; empty without RPC workers."""
    if not hardware.remote_gpus:
        return []
    used = {d.name: d.total_bytes for d in estimate.devices}
    hosts: dict[str, list[Gpu]] = {}
    for g in hardware.remote_gpus:
        hosts.setdefault(g.host or "", []).append(g)
    out = [HostMemory(host, tuple(rpc_endpoints(gs)), tuple(g.llama_name for g in gs),
                      sum(used.get(g.llama_name, 0) for g in gs), sum(g.vram_free_bytes for g in gs))
           for host, gs in hosts.items()]
    local = hardware.local_gpus
    if local:
        out.append(HostMemory(HEAD, (), tuple(g.llama_name for g in local),
                              sum(used.get(g.llama_name, 0) for g in local), sum(g.vram_free_bytes for g in local)))
    out.append(HostMemory(HEAD, (), (f"{CPU} (RAM)",), estimate.host_total_bytes, hardware.ram_available_bytes))
    return out
