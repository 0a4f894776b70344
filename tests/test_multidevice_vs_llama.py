"""Several devices against llama.cpp itself: two (or three) CPU ``ggml-rpc-server`` workers on loopback are devices
``RPC0``, ``RPC1`` … of a real llama-server (``--rpc``), which prints every buffer per device (``-lv 4``). Each
placement rule of :mod:`tuner.devices` and :mod:`tuner.estimate` — ``--tensor-split`` (float32 split points),
``--split-mode none`` with ``--main-gpu``, ``--device`` order, ``-ot`` rules, partial ``-ngl``, KV and recurrent
state with their layer's device, a compute buffer per device and the host's, pipeline parallelism's larger buffers —
is compared with the log, and a plan of :class:`tuner.placement.Placer` (a split and per-device spills) is loaded
and held to its budgets.

Weights, KV and recurrent state must match to the log's print rounding; compute buffers too, except where noted
(measured differences of a few MiB: the ``--device`` reorder with pipeline parallelism, ``-fa off`` on the host,
partial ``-ngl``; tuner errs high but for ``-fa off``'s host buffer). Host weights are compared with
``--load-mode none`` where CPU-resident layers sit between others in the file (with mmap llama.cpp maps the whole
file range, llama-model-loader.cpp:1449-1463).

Every worker and server the tests start is stopped when they end (module teardown; checked).
"""

from __future__ import annotations

import re
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from tuner.build import LlamaBuild
from tuner.devices import Device, slot_devices
from tuner.estimate import MemoryEstimate, ServerFlags, estimate_memory
from tuner.flags import flags_from_args
from tuner.models import local_layout
from tuner.placement import NO_PIPELINE_RULE, Placer, spill_rules
from tuner.serve import memory_check
from tuner.server import LlamaServer, free_port
from tuner.serverlog import MIB_PRINT_ROUNDING_BYTES, ReportedMemory, parse_load_log
from tuner.synth import SynthSpec, qwen35_35b_a3b_spec, write_synthetic_gguf
from tuner.units import MiB

pytestmark = pytest.mark.server

_DONE_RE = re.compile(r"model loaded|exiting due to model loading error|failed to load model|error loading model")
LOAD_TIMEOUT_S = 180.0
KINDS = ("weights", "kv", "recurrent", "compute")
COMPUTE_EXACT_BYTES = MiB // 10  # "exact" compute buffers: to 0.1 MiB (the per-token inputs are fitted, not derived)


@dataclass
class Workers:
    ports: list[int]
    procs: list[subprocess.Popen[bytes]]

    @property
    def rpc(self) -> str:
        return ",".join(f"127.0.0.1:{p}" for p in self.ports)

    @property
    def devices(self) -> list[Device]:
        """The workers' devices as llama.cpp names them: buffers ``RPC0[host:port]`` (index inside the worker),
        devices ``RPC<g>`` (global, in --rpc order); CPU workers: no CUDA padding, no op offload."""
        return [Device(f"RPC0[127.0.0.1:{p}]", f"RPC{i}", cuda=False, remote=True) for i, p in enumerate(self.ports)]


def _start_workers(rpc_server_bin: Path, n: int) -> Workers:
    ports = [free_port() for _ in range(n)]
    procs = []
    for port in ports:
        # SIGPIPE ignored (restore_signals=False): a probe that gives up while queued must not kill the worker
        procs.append(subprocess.Popen([str(rpc_server_bin), "-H", "127.0.0.1", "-p", str(port), "-t", "1"],
                                      stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      restore_signals=False, start_new_session=True))
    deadline = time.monotonic() + 30
    for port, proc in zip(ports, procs, strict=True):
        while True:
            assert proc.poll() is None, f"ggml-rpc-server on port {port} exited ({proc.returncode})"
            with socket.socket() as s:
                s.settimeout(0.2)
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert time.monotonic() < deadline, f"ggml-rpc-server on port {port} never listened"
            time.sleep(0.05)
    return Workers(ports, procs)


def _stop_workers(workers: Workers) -> None:
    for proc in workers.procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in workers.procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def rpc_server_bin(llama_build: LlamaBuild) -> Path:
    if llama_build.rpc_server_bin is None:
        pytest.skip("this llama.cpp build has no ggml-rpc-server (GGML_RPC=OFF)")
    return Path(llama_build.rpc_server_bin)


@pytest.fixture(scope="module")
def two_workers(rpc_server_bin: Path) -> Iterator[Workers]:
    workers = _start_workers(rpc_server_bin, 2)
    try:
        yield workers
    finally:
        _stop_workers(workers)
    assert all(p.poll() is not None for p in workers.procs)


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """qwen35moe at the 35B-A3B widths (n_embd 2048, head 256, the real DeltaNet, 8 experts used of 512 wide: the
    MoE block is the peak, as in every Qwen3.5 MoE), 8 blocks (attention 3 and 7), 8 experts in q8_0 (sparse)."""
    spec = qwen35_35b_a3b_spec(n_layer=8, n_expert=8, extra_vocab=4000,
                               types={"matrix": "f16", "experts": "q8_0", "embd": "f16", "output": "f16"})
    return write_synthetic_gguf(tmp_path_factory.mktemp("md") / "wide.gguf", spec)[0]


def load(server_bin: Path, model: Path, workers: Workers, args: list[str]) -> tuple[ReportedMemory, str]:
    """llama-server with ``--rpc`` (before any -ot: it registers the buffer types) until it has loaded; its log."""
    server = LlamaServer(server_bin, model, ["--rpc", workers.rpc, "--no-warmup", "-lv", "4", "--fit", "off",
                                             "-t", "1", *args], env={"GGML_NO_BACKTRACE": "1"})
    with server:
        deadline = time.monotonic() + LOAD_TIMEOUT_S
        while not _DONE_RE.search(server.log_text()) and server.running():
            if time.monotonic() > deadline:
                pytest.fail(f"llama-server did not finish loading within {LOAD_TIMEOUT_S} s: {server.log_tail()}")
            time.sleep(0.05)
    text = server.log_text()
    server.cleanup_log()
    return parse_load_log(text), text


def compare(est: MemoryEstimate, reported: ReportedMemory, compute_tolerance: float = 0.0) -> None:
    assert reported.loaded, reported.errors
    names = [d.name for d in est.devices]
    assert set(reported.devices) <= set(names), (reported.devices, names)
    for kind in KINDS:
        for d in est.devices:
            predicted = getattr(d, f"{kind}_bytes")
            got = reported.total(kind, d.name)
            rounding = max(reported.tolerance_bytes(kind, d.name), MIB_PRINT_ROUNDING_BYTES)
            slack = rounding if kind != "compute" else max(COMPUTE_EXACT_BYTES, compute_tolerance * got)
            assert abs(predicted - got) <= slack, (kind, d.name, predicted / MiB, got / MiB)


CASES: list[tuple[str, list[str], float]] = [
    ("pipeline-c4096", ["-c", "4096"], 0.0),
    ("pipeline-c32768", ["-c", "32768"], 0.0),
    ("pipeline-ts2,7-first-without-attention", ["-c", "16384", "-ts", "2,7"], 0.0),
    ("pipeline-ts8,1-output-only-device", ["-c", "16384", "-ts", "8,1"], 0.0),
    ("no-pipeline", ["-c", "16384", "-ot", NO_PIPELINE_RULE], 0.0),
    ("no-pipeline-ts2,7", ["-c", "16384", "-ts", "2,7", "-ot", NO_PIPELINE_RULE], 0.0),
    ("split-mode-none-main-gpu-1", ["-c", "16384", "-sm", "none", "-mg", "1"], 0.0),
    ("ubatch-1024", ["-c", "16384", "-ub", "1024"], 0.0),
    ("q8_0-cache", ["-c", "8192", "-ctk", "q8_0", "-ctv", "q8_0"], 0.0),
    ("ot-spill-block-3", ["-c", "16384", "-ot", r"blk\.3\.ffn_(up|down|gate)_exps=CPU", "--load-mode", "none"], 0.0),
    ("ot-to-the-other-device", ["-c", "8192", "-ot", r"blk\.1\.ffn_down_exps=RPC0[127.0.0.1:{p1}]",
                                "--load-mode", "none"], 0.0),
    ("device-order-reversed", ["-c", "16384", "--device", "RPC1,RPC0", "-ts", "6,3"], 0.05),
    ("fa-off-two-slots", ["-c", "16384", "-np", "2", "-fa", "off", "-ot", NO_PIPELINE_RULE], 0.10),
    ("partial-ngl-5", ["-c", "16384", "-ngl", "5", "--load-mode", "none"], 0.01),
    ("partial-ngl-7", ["-c", "16384", "-ngl", "7", "--load-mode", "none"], 0.06),
]


@pytest.mark.parametrize(("name", "args", "compute_tolerance"), CASES, ids=[c[0] for c in CASES])
def test_each_device_holds_what_the_estimate_says(server_bin: Path, wide_model: Path, two_workers: Workers,
                                                  name: str, args: list[str], compute_tolerance: float) -> None:
    args = [a.replace("{p1}", str(two_workers.ports[1])) for a in args]
    full = ["-np", "1", "-fa", "on", "-ngl", "all", *args]
    flags, _ = flags_from_args(full)
    layout = local_layout(wide_model)
    est = estimate_memory(layout, flags, two_workers.devices)
    reported, text = load(server_bin, wide_model, two_workers, full)
    assert ("pipeline parallelism enabled" in text) == est.pipeline_parallel
    compare(est, reported, compute_tolerance)
    # serve's memory_check lists every device, RPC buffers by their full name, each kind predicted vs reported
    rows = {row["name"]: row for row in memory_check(est, reported).to_dict()["devices"]}
    for d in est.gpu_devices:
        if d.total_bytes:
            assert rows[d.name]["weights"]["reported_bytes"] == reported.total("weights", d.name)
            assert rows[d.name]["weights"]["predicted_bytes"] == d.weights_bytes


def test_split_points_are_float32_on_a_real_server(server_bin: Path, rpc_server_bin: Path,
                                                   tmp_path: Path) -> None:
    """49 blocks, ``-ts 2,0.7,0.3``: block 45 (a DeltaNet block) lands on the second device in float32, on the third
    in double arithmetic; its recurrent state says where it went."""
    model = write_synthetic_gguf(tmp_path / "deep.gguf", SynthSpec(n_layer=49, fill="zeros"))[0]
    workers = _start_workers(rpc_server_bin, 3)
    try:
        layout = local_layout(model)
        full = ["-c", "4096", "-np", "1", "-fa", "on", "-ngl", "all", "-ts", "2,0.7,0.3"]
        flags, _ = flags_from_args(full)
        assert slot_devices(layout, flags, workers.devices)[45] == workers.devices[1].name
        est = estimate_memory(layout, flags, workers.devices)
        reported, _ = load(server_bin, model, workers, full)
    finally:
        _stop_workers(workers)
    assert all(p.poll() is not None for p in workers.procs)
    compare(est, reported, compute_tolerance=0.25)  # compute: tiny widths, fitted at real ones
    for d in workers.devices:
        assert reported.total("recurrent", d.name) == pytest.approx(est.device(d.name).recurrent_bytes,
                                                                    abs=MIB_PRINT_ROUNDING_BYTES)


def test_a_placement_plan_loads_with_every_device_in_its_budget(server_bin: Path, wide_model: Path,
                                                               two_workers: Workers) -> None:
    """Budgets that make each device send some expert tensors to RAM: the plan's -ts and -ot, run by llama-server,
    give every device what the estimate says, within its budget, and one spill less would not have fitted."""
    layout = local_layout(wide_model)
    devices = two_workers.devices
    flags = ServerFlags(ctx_size=8192, parallel=1, flash_attn="on", batch_size=2048, ubatch_size=512)
    whole = estimate_memory(layout, flags.with_(tensor_split=(5.0, 4.0), override_tensor=(NO_PIPELINE_RULE,)),
                            devices)
    expert = max(t.nbytes for t in layout.tensors if t.is_expert)
    budgets = [whole.device(d.name).total_bytes - int(2.5 * expert) for d in devices]
    # the first worker "faster", and the workers taken as local (the search keeps RPC devices in llama.cpp's order;
    # remote or not changes nothing else for CPU-backend devices): it also tries --device RPC1,RPC0, so that the
    # faster device holds the output layer, and here that order wins
    local = [replace(d, remote=False) for d in devices]
    got = Placer(local, budgets, bandwidths=[2.0, 1.0]).place(layout, flags, speed=True)
    assert got is not None and got.n_spilled >= 2 and got.flags.override_tensor
    assert got.flags.device == ("RPC1", "RPC0")
    full = [*got.flags.to_args(), "--load-mode", "none"]
    reported, _ = load(server_bin, wide_model, two_workers, full)
    # CPU workers cannot multiply the spilled experts for the host (no op offload, ggml-rpc.cpp:2262), so the host
    # runs them: its compute buffer is then fitted (within 6 % here), unlike a CUDA box's
    compare(got.estimate, reported, compute_tolerance=0.06)
    for d, budget in zip(devices, budgets, strict=True):
        used = sum(reported.total(kind, d.name) for kind in KINDS)
        assert used <= budget + 4 * MIB_PRINT_ROUNDING_BYTES, (d.name, used / MiB, budget / MiB)
    spilled = [t for ts in got.spilled for t in ts]
    for t in spilled:
        fewer = got.flags.with_(override_tensor=spill_rules([x for x in spilled if x is not t]) or ())
        est = estimate_memory(layout, fewer, devices)
        assert any(est.device(d.name).total_bytes > b for d, b in zip(devices, budgets, strict=True))


def test_no_worker_or_server_is_left_running(two_workers: Workers,
                                             processes_naming: Callable[[str], list[int]]) -> None:
    # the module's workers are still up (module scope); every llama-server of this module is gone
    assert all(p.poll() is None for p in two_workers.procs)
    assert processes_naming(two_workers.rpc) == []
