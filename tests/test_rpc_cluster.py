"""RPC for real, on loopback: ``tuner worker`` runs llama.cpp's ``ggml-rpc-server`` (CPU backend), ``tuner serve --rpc``
plans over the workers' devices and runs llama-server against them; the estimate per device against llama.cpp's log,
a chat request, Ctrl-C, and every failure issue 11 names: one line, a non-zero exit, nothing left running."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tuner.server import free_port, process_alive
from tuner.serverlog import MIB_PRINT_ROUNDING_BYTES, parse_load_log
from tuner.synth import SynthSpec, write_synthetic_gguf
from tuner.worker import WorkerOptions, parse_banner, worker_address, worker_failure

pytestmark = pytest.mark.server

# 8 blocks (attention at 3 and 7), width 256, a recurrent state of a few MiB: every buffer is large enough that the
# log's two-decimal MiB figures pin it down.
CLUSTER_SPEC = SynthSpec(name="rpc-cluster", n_layer=8, n_embd=256, n_head=4, head_dim=64, ssm_d_state=128,
                         ssm_dt_rank=32, ssm_n_group=16)


@pytest.fixture(scope="module")
def cluster_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("rpc") / "rpc-cluster.gguf"
    write_synthetic_gguf(path, CLUSTER_SPEC)
    return path


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "TUNER_CONFIG_DIR": str(tmp_path / "config"), "PYTHONUNBUFFERED": "1"}


class Tuner:
    """``tuner COMMAND … --json`` in a subprocess: its JSON lines as events, stderr kept."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "tuner", *args, "--json"], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.events: list[dict[str, Any]] = []
        self.stderr: list[str] = []
        self._threads = [threading.Thread(target=self._pump, args=(self.proc.stdout, True), daemon=True),
                         threading.Thread(target=self._pump, args=(self.proc.stderr, False), daemon=True)]
        for t in self._threads:
            t.start()

    def _pump(self, stream: Any, is_stdout: bool) -> None:
        for line in stream:
            if is_stdout:
                self.lines.put(line)
            else:
                self.stderr.append(line)
        if is_stdout:
            self.lines.put(None)

    def wait_for(self, pred: Callable[[dict[str, Any]], bool], timeout_s: float = 180) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"timed out; events={self.events} stderr={self.stderr}") from None
            if line is None:
                raise AssertionError(f"tuner exited ({self.proc.wait()}); events={self.events} stderr={self.stderr}")
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                self.events.append(event)
                if pred(event):
                    return event

    def finish(self, timeout_s: float = 60) -> int:
        code = self.proc.wait(timeout=timeout_s)
        for t in self._threads:
            t.join(5)
        while True:
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


def _is(status: str) -> Callable[[dict[str, Any]], bool]:
    return lambda e: e.get("status") == status


def _rpc_servers_on(port: int) -> list[int]:
    """Live ggml-rpc-server processes listening on ``port`` (by their command line)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmdline and cmdline[0].endswith(b"ggml-rpc-server") and str(port).encode() in cmdline \
                and process_alive(int(proc.name)):
            found.append(int(proc.name))
    return found


def _llama_servers_for(model: Path) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmdline and cmdline[0].endswith(b"llama-server") and str(model).encode() in cmdline \
                and process_alive(int(proc.name)):
            found.append(int(proc.name))
    return found


@contextlib.contextmanager
def workers(n: int, env: dict[str, str]) -> Iterator[list[tuple[Tuner, int, dict[str, Any]]]]:
    """``n`` ``tuner worker`` processes on free loopback ports; stopped with SIGINT (Ctrl-C) on the way out."""
    started: list[tuple[Tuner, int, dict[str, Any]]] = []
    try:
        for _ in range(n):
            port = free_port()
            w = Tuner(["worker", "--port", str(port), "--threads", "1"], env)
            started.append((w, port, w.wait_for(_is("listening"))))
        yield started
    finally:
        for w, _port, _ in started:
            if w.proc.poll() is None:
                w.proc.send_signal(signal.SIGINT)
        for w, _port, _ in started:
            try:
                w.finish(30)
            finally:
                w.kill()


# ------------------------------------------------------------------------------------------------ the worker


def test_a_non_loopback_worker_without_allow_remote_is_refused_in_one_line(env: dict[str, str]) -> None:
    proc = subprocess.run([sys.executable, "-m", "tuner", "worker", "--host", "0.0.0.0"], capture_output=True,
                          text=True, env=env, timeout=60)
    assert proc.returncode == 1 and proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("tuner: error: --host 0.0.0.0 would expose the RPC worker")
    assert "no authentication and no encryption" in lines[0] and "--allow-remote" in lines[0]


def test_worker_addresses_are_ipv4_and_localhost_is_loopback() -> None:
    port = free_port()
    assert worker_address("localhost", port, False) == "127.0.0.1"
    assert worker_address("0.0.0.0", port, True) == "0.0.0.0"
    with pytest.raises(Exception, match="IPv4 addresses only"):
        worker_address("::1", port, True)


def test_the_workers_start_lines_give_its_devices_and_failures_read_as_one_line() -> None:
    banner = ["Starting RPC server v7.0.0", "  endpoint       : 127.0.0.1:50052", "  local cache    : n/a",
              "Devices:", "  CUDA0: NVIDIA GeForce RTX 5090 (32109 MiB, 31588 MiB free)",
              "  CPU: AMD EPYC (24105 MiB, 24105 MiB free)"]
    assert parse_banner(banner) is None, "not listening before the transport line"
    info = parse_banner([*banner, "  transport      : TCP"])
    assert info is not None and info.version == "7.0.0" and info.endpoint == "127.0.0.1:50052"
    assert [(d.name, d.description, d.free_bytes // 2**20) for d in info.devices] == [
        ("CUDA0", "NVIDIA GeForce RTX 5090", 31588), ("CPU", "AMD EPYC", 24105)]
    opts = WorkerOptions(port=50052)
    assert "port is in use" in (worker_failure("Failed to create server socket\n", opts) or "")
    assert worker_failure("error: unknown device: CUDA3\navailable devices:\n  CPU: AMD EPYC (1 MiB, 1 MiB free)\n"
                          "No devices found\n", opts) == "--device CUDA3: no such device on this machine " \
                                                         "(available: CPU)"


def test_worker_shows_its_devices_and_ctrl_c_leaves_nothing(llama_build: Any, env: dict[str, str]) -> None:
    with workers(1, env) as started:
        w, port, listening = started[0]
        assert listening["endpoint"] == f"127.0.0.1:{port}" and listening["version"] == "7.0.0"
        assert listening["loopback_only"] is True and "no authentication" in listening["security"]
        cpu = listening["devices"][0]
        assert cpu["name"] == "CPU" and cpu["free_bytes"] > 0
        assert _rpc_servers_on(port) == [listening["pid"]]
    assert w.proc.returncode == 0, w.stderr
    assert w.events[-1]["status"] == "stopped"
    assert _rpc_servers_on(port) == []


def test_killing_tuner_worker_outright_takes_ggml_rpc_server_with_it(llama_build: Any, env: dict[str, str]) -> None:
    port = free_port()
    w = Tuner(["worker", "--port", str(port)], env)
    try:
        rpc_pid = w.wait_for(_is("listening"))["pid"]
        w.proc.send_signal(signal.SIGKILL)
        w.finish(30)
        deadline = time.monotonic() + 10
        while process_alive(rpc_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        w.kill()
    assert not process_alive(rpc_pid) and _rpc_servers_on(port) == []


def test_a_port_in_use_is_one_line_and_starts_nothing(llama_build: Any, env: dict[str, str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        w = Tuner(["worker", "--port", str(port)], env)
        code = w.finish(120)
    assert code == 1
    assert w.one_line_error() == (f"tuner: error: port {port} on 127.0.0.1 is already in use (Address already in "
                                  "use); pick another with --port")
    assert _rpc_servers_on(port) == []


def test_an_unknown_device_is_one_line_naming_the_ones_there_are(llama_build: Any, env: dict[str, str]) -> None:
    port = free_port()
    w = Tuner(["worker", "--port", str(port), "--device", "CUDA7"], env)
    code = w.finish(120)
    assert code == 1
    assert w.one_line_error().startswith("tuner: error: --device CUDA7: no such device on this machine (available: ")
    assert _rpc_servers_on(port) == []


# ------------------------------------------------------------------------------------------------ serving over RPC


def test_serve_over_two_workers_matches_llamas_log_per_device_answers_and_stops_cleanly(
        llama_build: Any, cluster_gguf: Path, env: dict[str, str], tmp_path: Path) -> None:
    """Issue 11's test: two CPU workers on loopback, tuner's plan for a synthetic qwen35moe, llama-server --rpc: the
    weights, KV cache and recurrent state of each RPC device and of the host equal llama.cpp's log to its rounding
    (compute buffers with several devices are issue 11 item 1's); a chat request answers; Ctrl-C leaves nothing."""
    with workers(2, env) as started:
        endpoints = [f"127.0.0.1:{port}" for _, port, _ in started]
        log = tmp_path / "server.log"
        serve = Tuner(["serve", str(cluster_gguf), "--gpu", "none", "--rpc", ",".join(endpoints), "--cache-type",
                       "f16", "--port", str(free_port()), "--log-file", str(log)], env)
        try:
            ready = serve.wait_for(_is("ready"), 300)
            command = next(e for e in serve.events if e.get("status") == "launching")["command"]
            assert command[command.index("--rpc") + 1] == ",".join(endpoints)
            reply = httpx.post(f"{ready['endpoint']}/chat/completions", timeout=120, json={
                "model": ready["model"], "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8})
            assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] >= 1

            check = next(e for e in serve.events if "memory_check" in e)["memory_check"]
            reported = parse_load_log(log.read_text())
            names = [f"RPC0[{e}]" for e in endpoints]
            for kind in ("weights", "kv", "recurrent"):
                devices = check[kind]["devices"]
                assert set(devices) == (set(names) | {"CPU"} if kind == "weights" else set(names)), devices
                for name, row in devices.items():
                    assert row["reported_bytes"] == reported.total(kind, name) > 0, (kind, name)
                    assert abs(row["predicted_bytes"] - row["reported_bytes"]) <= MIB_PRINT_ROUNDING_BYTES, \
                        (kind, name, row)
            # layers split by the workers' free memory (equal): RPC0 blocks 0-4, RPC1 blocks 5-7 and the output
            assert check["kv"]["devices"][names[0]]["reported_bytes"] == check["kv"]["devices"][names[1]][
                "reported_bytes"]
            assert check["recurrent"]["devices"][names[0]]["predicted_bytes"] == 2 * check["recurrent"]["devices"][
                names[1]]["predicted_bytes"]
            plan = next(e for e in serve.events if "plan" in e)["plan"]
            assert plan["args"][:2] == ["--rpc", ",".join(endpoints)]

            server_pid = ready["pid"]
            serve.proc.send_signal(signal.SIGINT)
            code = serve.finish()
        finally:
            serve.kill()
        assert code == 0, serve.stderr
        assert serve.events[-1] == {"status": "stopped", "reason": "exit code 0"}
        assert not process_alive(server_pid) and _llama_servers_for(cluster_gguf) == []
        for w, port, _ in started:
            assert w.proc.poll() is None, "a worker outlives the llama-server that used it"
            assert len(_rpc_servers_on(port)) == 1
    for _, port, _ in started:
        assert _rpc_servers_on(port) == []


def test_an_unreachable_worker_is_one_line_and_nothing_runs(llama_build: Any, cluster_gguf: Path,
                                                             env: dict[str, str]) -> None:
    port = free_port()
    serve = Tuner(["serve", str(cluster_gguf), "--gpu", "none", "--rpc", f"127.0.0.1:{port}", "--port",
                   str(free_port())], env)
    code = serve.finish(120)
    assert code == 1
    assert serve.one_line_error().startswith(f"tuner: error: RPC worker 127.0.0.1:{port} is unreachable: the "
                                             "connection was refused")
    assert not any(e.get("status") == "launching" for e in serve.events)
    assert _llama_servers_for(cluster_gguf) == []


def test_a_worker_of_another_protocol_version_is_one_line(llama_build: Any, cluster_gguf: Path,
                                                          env: dict[str, str]) -> None:
    """A worker that answers the handshake as protocol 6.0.0 (a ggml-rpc-server from an older llama.cpp)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(4)
        port = server.getsockname()[1]
        stop = threading.Event()

        def answer() -> None:
            server.settimeout(0.2)
            while not stop.is_set():
                try:
                    conn, _ = server.accept()
                except OSError:
                    continue
                with conn:
                    conn.settimeout(5)
                    with contextlib.suppress(OSError):
                        got = b""
                        while len(got) < 33:
                            chunk = conn.recv(64)
                            if not chunk:
                                break
                            got += chunk
                        conn.sendall((28).to_bytes(8, "little") + bytes([6, 0, 0, 0]) + bytes(24))

        thread = threading.Thread(target=answer, daemon=True)
        thread.start()
        try:
            serve = Tuner(["serve", str(cluster_gguf), "--gpu", "none", "--rpc", f"127.0.0.1:{port}", "--port",
                           str(free_port())], env)
            code = serve.finish(120)
        finally:
            stop.set()
            thread.join(5)
    assert code == 1
    assert serve.one_line_error().startswith(f"tuner: error: RPC worker 127.0.0.1:{port} runs RPC protocol 6.0.0, "
                                             "which this llama-server does not speak")
    assert _llama_servers_for(cluster_gguf) == []


def test_a_worker_that_dies_while_serving_is_one_line_and_leaves_nothing(
        llama_build: Any, cluster_gguf: Path, env: dict[str, str], tmp_path: Path) -> None:
    with workers(2, env) as started:
        endpoints = [f"127.0.0.1:{port}" for _, port, _ in started]
        serve = Tuner(["serve", str(cluster_gguf), "--gpu", "none", "--rpc", ",".join(endpoints), "--cache-type",
                       "f16", "--port", str(free_port()), "--log-file", str(tmp_path / "die.log")], env)
        try:
            ready = serve.wait_for(_is("ready"), 300)
            lost_worker, lost_port, listening = started[1]
            os.kill(listening["pid"], signal.SIGKILL)  # the worker's ggml-rpc-server
            with contextlib.suppress(httpx.HTTPError):  # the request that finds the worker gone: an empty reply
                httpx.post(f"{ready['endpoint']}/chat/completions", timeout=60, json={
                    "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8})
            code = serve.finish(60)
        finally:
            serve.kill()
        assert code == 1
        assert serve.one_line_error().startswith(
            "tuner: error: llama-server stopped unexpectedly (killed by SIGABRT): an RPC worker stopped answering "
            f"(it crashed or was stopped, or the network dropped); RPC worker {endpoints[1]} does not answer now")
        assert not process_alive(ready["pid"]) and _llama_servers_for(cluster_gguf) == []
        assert lost_worker.finish(30) == 1
        assert lost_worker.one_line_error() == "tuner: error: ggml-rpc-server stopped (killed by SIGKILL)"
        assert _rpc_servers_on(lost_port) == []
        survivor, port, _ = started[0]
        assert survivor.proc.poll() is None and len(_rpc_servers_on(port)) == 1, "the other worker keeps serving"
