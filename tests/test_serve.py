"""tuner serve: the steps of tuner.serve one by one, then the whole command in a subprocess against the real
llama-server (CPU build), its failures, and what is (not) left running afterwards."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from tunerproc import TunerProcess, status_is

from tuner.errors import TunerError
from tuner.fetch import fetch_candidate
from tuner.hardware import hardware_for
from tuner.hardware.snapshot import SnapshotNvml
from tuner.models import QuantCandidate, local_layout
from tuner.planner import Plan, Wishes, plan_for
from tuner.serve import (
    MemoryCheck,
    SpillWatch,
    WatchSample,
    client_settings,
    launch,
    memory_check,
    model_alias,
    nvml_view,
    observation_key,
    obtain_build,
    record_observation,
    sampling_args,
    server_args,
    spill_advice,
    take_sample,
    watch_until_stopped,
)
from tuner.server import LlamaServer, free_port, process_alive
from tuner.serverlog import parse_load_log
from tuner.synth import SynthSpec, qwen35_35b_a3b_spec, write_synthetic_gguf
from tuner.units import GiB, MiB

NVML_DATA = Path(__file__).parent / "data" / "nvml"
# A hybrid qwen35moe whose recurrent state is a few MiB (d_inner 4096, 16 K heads of 128, like the real model), so the
# log's two-decimal MiB figures are exact to 0.1%: "within 1%" then means what it says.
STATE_SPEC = SynthSpec(name="tiny-hybrid-state", ssm_d_state=128, ssm_dt_rank=32, ssm_n_group=16)


@pytest.fixture(scope="module")
def hybrid_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("models") / "tiny-hybrid-state.gguf"
    write_synthetic_gguf(path, STATE_SPEC)
    return path


@pytest.fixture
def config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "config"
    monkeypatch.setenv("TUNER_CONFIG_DIR", str(path))
    return path


def _cpu_plan(model: Path, **wishes: Any) -> Plan:
    """The plan for the CPU (the planner skips the quantized KV types the tiny models' 16-wide heads cannot hold)."""
    return plan_for(str(model), hardware_for("none"), Wishes(**wishes)).plan


def _llama_servers_for(model: Path) -> list[int]:
    """PIDs of live llama-server processes whose command line names ``model``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        named = cmdline and cmdline[0].endswith(b"llama-server") and str(model).encode() in cmdline
        if named and process_alive(int(proc.name)):
            found.append(int(proc.name))
    return found


# ------------------------------------------------------------------------------------------------ launch arguments


def test_server_args_keep_the_plan_and_add_what_serving_needs(hybrid_gguf: Path) -> None:
    plan = _cpu_plan(hybrid_gguf)
    args = server_args(plan.command("/bin/llama-server", str(hybrid_gguf)), plan.estimate, alias="tiny",
                       sampling=["--temp", "0.6"])
    assert "-m" not in args and "/bin/llama-server" not in args and str(hybrid_gguf) not in args
    for flag_pair in (["--fit", "off"], ["--verbosity", "4"], ["--alias", "tiny"], ["--temp", "0.6"],
                      ["--ctx-size", str(plan.estimate.n_ctx)]):
        i = args.index(flag_pair[0])
        assert args[i:i + 2] == flag_pair
    assert "--jinja" in args and "--metrics" in args
    assert args.count("--jinja") == 1
    for name in ("--cache-type-k", "--flash-attn", "--n-gpu-layers", "--parallel"):
        assert name in args  # the plan's own flags survive


def test_server_args_make_the_models_context_explicit_and_replace_owned_flags(hybrid_gguf: Path) -> None:
    plan_cmd = ["llama-server", "-m", "x.gguf", "--ctx-size", "0", "--host", "0.0.0.0", "--port", "1", "-lv", "1",
                "--alias", "old", "--fit", "on"]
    estimate = replace(_cpu_plan(hybrid_gguf).estimate, n_ctx=65536)
    args = server_args(plan_cmd, estimate, alias="new")
    assert args[args.index("--ctx-size") + 1] == "65536"
    assert args[args.index("--fit") + 1] == "off"
    assert "--host" not in args and "--port" not in args and "old" not in args
    assert args[args.index("--verbosity") + 1] == "4" and args.count("--verbosity") == 1 and "-lv" not in args


def test_alias_is_the_card_or_the_file_without_shard_suffix(hybrid_gguf: Path) -> None:
    cand = QuantCandidate(quant="Q4_K_M", layout=local_layout(hybrid_gguf), files=(str(hybrid_gguf),),
                          file_bytes=1, source="local")
    assert model_alias(cand, Path("/m/Qwen3.5-35B-A3B-Q4_K_M-00001-of-00002.gguf")) == "Qwen3.5-35B-A3B-Q4_K_M"
    assert model_alias(replace(cand, card_key="qwen3.5-35b-a3b"), Path("/m/x.gguf")) == "qwen3.5-35b-a3b:Q4_K_M"
    assert model_alias(cand, Path("/m/x.gguf"), "mine") == "mine"


def test_sampling_comes_from_the_card_and_a_preset_needs_one(hybrid_gguf: Path) -> None:
    from tuner.cards import load_card

    card = load_card("qwen3.5-35b-a3b")
    cand = QuantCandidate(quant="Q4_K_M", layout=local_layout(hybrid_gguf), files=("x",), file_bytes=1,
                          source="card", card_key=card.key)
    assert sampling_args(cand, None) == card.sampling_args(None) + card.reasoning_args(None)
    assert "--temp" in sampling_args(cand, None)
    synthetic = replace(cand, card_key=None, source="local")
    assert sampling_args(synthetic, None) == []
    with pytest.raises(TunerError, match="--preset coding needs a model tuner has a card for"):
        sampling_args(synthetic, "coding")


def test_client_settings_are_ready_to_paste() -> None:
    settings = client_settings("http://127.0.0.1:8080", "qwen", None)
    assert settings["openai"] == {"base_url": "http://127.0.0.1:8080/v1", "api_key": "sk-no-key-required",
                                  "model": "qwen"}
    provider = settings["claude_code_router"]["Providers"][0]
    assert provider["api_base_url"] == "http://127.0.0.1:8080/v1/chat/completions"
    assert provider["models"] == ["qwen"]
    assert settings["claude_code_router"]["Router"]["default"] == "llama-server,qwen"
    assert client_settings("http://h:1", "m", "k")["openai"]["api_key"] == "k"


# ------------------------------------------------------------------------------------------------ the memory check


def _load_log_of(plan: Any, server_bin: Path, model: Path, tmp_path: Path) -> Any:  # -> ReportedMemory
    """Launch ``plan`` as serve does, read what llama-server reported at load, stop it."""
    args = server_args(plan.command(str(server_bin), str(model)), plan.estimate, alias="t")
    server = launch(server_bin, model, args, port=free_port(), log_path=tmp_path / "l.log")
    try:
        return parse_load_log(server.log_text())
    finally:
        server.stop()


@pytest.mark.server
def test_memory_check_against_a_real_load_log(server_bin: Path, hybrid_gguf: Path, tmp_path: Path) -> None:
    plan = _cpu_plan(hybrid_gguf, cache_type="f16")
    reported = _load_log_of(plan, server_bin, hybrid_gguf, tmp_path)
    check = memory_check(plan.estimate, reported)
    for kind in ("kv", "recurrent", "weights"):
        k = check.kind(kind)
        assert k.reported_bytes == reported.total(kind)
        assert k.within, k.to_dict()
    assert check.kind("recurrent").reported_bytes > 6 * MiB  # big enough that 1% is more than print rounding
    for kind in ("kv", "recurrent"):
        ratio = check.kind(kind).diff_ratio
        assert ratio is not None and ratio <= 0.01

    # the same log against an estimate that is 5% off on KV: a warning, and the kind is named as a mismatch
    est = plan.estimate
    wrong = replace(est, devices=tuple(replace(d, kv_bytes=int(d.kv_bytes * 1.05)) for d in est.devices))
    bad = memory_check(wrong, reported)
    assert "kv" in bad.mismatches
    assert any(w.startswith("kv: llama-server reports") for w in bad.warnings())
    assert bad.to_dict()["kv"]["within"] is False


@pytest.mark.server
def test_memory_check_counts_repacked_cpu_weights_once(server_bin: Path, tmp_path: Path) -> None:
    model = tmp_path / "q4.gguf"
    write_synthetic_gguf(model, SynthSpec(types={"matrix": "q4_0", "experts": "q4_0", "embd": "f16",
                                                 "output": "f16"}))
    plan = _cpu_plan(model)
    reported = _load_log_of(plan, server_bin, model, tmp_path)
    weights = memory_check(plan.estimate, reported).kind("weights")
    assert weights.reported_bytes == reported.total("weights") - reported.repacked_bytes
    assert weights.within, weights.to_dict()


def test_missing_log_lines_are_unknown_not_a_match(hybrid_gguf: Path) -> None:
    plan = _cpu_plan(hybrid_gguf)
    check = memory_check(plan.estimate, parse_load_log("srv  llama_server: model loaded\n"))
    assert all(k.within is None and k.reported_bytes is None for k in check.kinds)
    assert check.mismatches == []
    assert any("no size" in w for w in check.warnings())


def test_observation_is_keyed_by_model_file_and_flags(config_dir: Path, hybrid_gguf: Path) -> None:
    plan = _cpu_plan(hybrid_gguf)
    check = MemoryCheck(memory_check(plan.estimate, parse_load_log("")).kinds)
    flags = plan.flags.to_args()
    first = record_observation(check, model_path=hybrid_gguf, flags_args=flags, command=["llama-server"],
                               candidate=plan.candidate)
    assert first.parent == config_dir / "observations"
    assert first.name == f"tiny-hybrid-state-{observation_key(hybrid_gguf, flags)}.json"
    data = json.loads(first.read_text())
    assert data["format"] == 1
    assert data["model"]["file"] == hybrid_gguf.name and data["model"]["bytes"] == hybrid_gguf.stat().st_size
    assert data["flags"] == flags
    assert set(data["memory_check"]) == {"weights", "kv", "recurrent", "compute", "devices"}
    again = record_observation(check, model_path=hybrid_gguf, flags_args=flags, command=[])
    assert again == first  # same file + flags: overwritten, not duplicated
    other = record_observation(check, model_path=hybrid_gguf, flags_args=[*flags, "--n-cpu-moe", "2"], command=[])
    assert other != first
    assert len(list((config_dir / "observations").iterdir())) == 2


@pytest.mark.server
def test_a_serve_observation_corrects_the_next_estimate(server_bin: Path, hybrid_gguf: Path, config_dir: Path,
                                                        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 10 item 6: a compute term deliberately 30% too large, served once on the real CPU llama-server; its
    load log (parsed) lands in the profile, and the next estimate and plan for the same shape and build use it."""
    import tuner.estimate as estimate_module
    from tuner.cli.estimate import estimate_result
    from tuner.profile_store import load_calibration
    from tuner.serve import ServeOptions, start_serving

    true_compute = estimate_module.compute_bytes_cpu
    monkeypatch.setattr(estimate_module, "compute_bytes_cpu", lambda *a, **k: int(true_compute(*a, **k) * 1.3))
    hardware = hardware_for("none")
    wishes = Wishes(cache_type="f16")
    serving = start_serving(str(hybrid_gguf), hardware, wishes,
                            ServeOptions(port=free_port(), server_bin=str(server_bin), log_path=tmp_path / "s.log"))
    try:
        reported = parse_load_log(serving.server.log_text()).total("compute", "CPU")
    finally:
        serving.server.stop()
    assert serving.observation_path is not None and json.loads(serving.observation_path.read_text())["points"]
    layout, flags = serving.plan.candidate.layout, serving.plan.flags
    before = estimate_result(layout, flags, hardware)["memory"]["compute_bytes"]
    assert before > 1.2 * reported, "the biased term, uncorrected"
    cal = load_calibration(hardware, serving.build)
    after = estimate_result(layout, flags, hardware, calibration=cal)
    assert abs(after["memory"]["compute_bytes"] - reported) <= 2, "corrected to what llama.cpp reported"
    assert after["calibration"]["line"] == "calibrated on this machine by 1 run"
    replanned = plan_for(str(hybrid_gguf), hardware, wishes, calibration=cal)
    assert replanned.plan.estimate.compute_bytes == after["memory"]["compute_bytes"]
    assert replanned.to_dict()["calibration"]["devices"]["CPU"]["scope"] == "this shape and ubatch"


# ------------------------------------------------------------------------------------------------ NVML and the watch


def _snapshot(name: str) -> dict[str, Any]:
    return json.loads((NVML_DATA / name).read_text())


def _with_free(snapshot: dict[str, Any], free_bytes: int) -> SnapshotNvml:
    data = copy.deepcopy(snapshot)
    mem = data["devices"][0]["memory"]
    mem["free"], mem["used"] = free_bytes, mem["total"] - free_bytes
    return SnapshotNvml(data)


def test_samples_and_the_process_view_come_from_nvml() -> None:
    nvml = SnapshotNvml(NVML_DATA / "rtx4090_driver550.json")
    sample = take_sample(1.0, [0], {"llamacpp:tokens_predicted_total": 10.0}, nvml)
    assert sample.gpu_free_bytes == {0: 4881121280}
    assert sample.gpu_total_bytes == {0: 25757220864}
    assert sample.tokens_predicted_total == 10.0 and sample.tokens_predicted_seconds_total is None
    view = nvml_view(48213, [0], {0: 25_000_000_000}, nvml)
    assert view["process_bytes"] == 20418920448
    assert view["free_drop_bytes"] == 25_000_000_000 - 4881121280
    assert nvml.open_sessions == 0


def test_low_vram_warns_once_and_rearms_after_it_clears() -> None:
    snap = _snapshot("rtx4090_driver550.json")
    watch = SpillWatch(int(1.25 * GiB), advice="Restart with --n-cpu-moe 4 (now 0).")

    def at(free: int) -> list[dict[str, Any]]:
        return watch.update(take_sample(0.0, [0], None, _with_free(snap, free)))

    assert at(4 * GiB) == []
    warned = at(1 * GiB)
    assert [e["kind"] for e in warned] == ["low_vram"]
    assert "GPU 0 has 1.00 GiB free" in warned[0]["warning"] and "--n-cpu-moe 4" in warned[0]["warning"]
    assert at(int(0.9 * GiB)) == []  # still low: said once
    assert at(3 * GiB) == []
    assert [e["kind"] for e in at(1 * GiB)] == ["low_vram"]  # low again: said again


def test_spill_needs_full_memory_and_a_throughput_drop() -> None:
    watch = SpillWatch(0, capacity_bytes=256 * MiB)

    def sample(t: float, free: int, tokens: float, seconds: float) -> WatchSample:
        return WatchSample(t, {0: free}, {0: 24 * GiB}, tokens, seconds)

    assert watch.update(sample(0, 100 * MiB, 0, 0.0)) == []
    assert watch.update(sample(2, 100 * MiB, 200, 2.0)) == []  # 100 tok/s, full but fast: fine
    assert watch.last_tg_tok_s == pytest.approx(100.0)
    events = watch.update(sample(4, 100 * MiB, 300, 4.0))  # 50 tok/s while full
    assert [e["kind"] for e in events] == ["spill"]
    assert events[0]["tg_tok_s"] == pytest.approx(50.0) and events[0]["best_tg_tok_s"] == pytest.approx(100.0)
    assert watch.update(sample(6, 100 * MiB, 300, 4.0)) == []  # idle: no new rate, no new event

    calm = SpillWatch(0, capacity_bytes=256 * MiB)
    calm.update(sample(0, 8 * GiB, 0, 0.0))
    calm.update(sample(2, 8 * GiB, 200, 2.0))
    assert calm.update(sample(4, 8 * GiB, 300, 4.0)) == []  # slower, but memory is not full: not a spill


def test_slow_generation_is_measured_over_several_polls() -> None:
    """Fewer than ``min_tokens`` tokens per poll (a spilled model on a short interval) still gives a speed: the
    counters accumulate from the sample where the last speed was taken."""
    watch = SpillWatch(0, capacity_bytes=256 * MiB, min_tokens=16)

    def sample(tokens: float, seconds: float) -> WatchSample:
        return WatchSample(0, {0: 100 * MiB}, {0: 24 * GiB}, tokens, seconds)

    watch.update(sample(0, 0.0))
    watch.update(sample(100, 1.0))  # 100 tok/s
    assert watch.best_tg_tok_s == pytest.approx(100.0)
    assert watch.update(sample(110, 2.0)) == []  # 10 tokens: not enough yet
    events = watch.update(sample(120, 3.0))  # 20 tokens in 2 s of generation: 10 tok/s
    assert watch.last_tg_tok_s == pytest.approx(10.0)
    assert [e["kind"] for e in events] == ["spill"]
    watch.update(sample(5, 0.5))  # counters went backwards (llama-server restarted): a new base
    watch.update(sample(105, 1.5))
    assert watch.last_tg_tok_s == pytest.approx(100.0)


def test_spill_advice_names_more_cpu_experts_and_less_context() -> None:
    text = spill_advice(["--ctx-size", "65536", "--n-cpu-moe", "10"], 40)
    assert "--n-cpu-moe 14 (now 10)" in text and "--ctx-size 32768 (now 65536)" in text
    assert "--n-cpu-moe" not in spill_advice(["--cpu-moe", "--ctx-size", "4096"], 40)


@pytest.mark.server
def test_watch_loop_polls_nvml_and_metrics_of_a_live_server(server_bin: Path, tiny_moe_gguf: Path,
                                                            tmp_path: Path) -> None:
    """The real server (CPU) with NVML replayed from a recorded RTX 4090 whose free memory is under the buffer:
    one low_vram warning however many polls, and NVML opened once and closed."""
    nvml = _with_free(_snapshot("rtx4090_driver550.json"), 512 * MiB)
    events: list[dict[str, Any]] = []
    args = ["--ctx-size", "4096", "--parallel", "1", "--fit", "off", "--metrics"]
    with LlamaServer(server_bin, tiny_moe_gguf, args, log_path=tmp_path / "w.log") as server:
        server.wait_ready(120)
        watch = SpillWatch(int(1.25 * GiB))
        watch_until_stopped(server, watch, gpu_indices=(0,), nvml=nvml, interval_s=0.1, on_event=events.append,
                            max_seconds=1.0)
    assert [e["kind"] for e in events] == ["low_vram"]
    assert nvml.open_sessions == 0


@pytest.mark.server
def test_watch_loop_reports_a_server_that_died(server_bin: Path, tiny_moe_gguf: Path, tmp_path: Path) -> None:
    events: list[dict[str, Any]] = []
    with LlamaServer(server_bin, tiny_moe_gguf, ["--ctx-size", "4096", "--fit", "off"],
                     log_path=tmp_path / "d.log") as server:
        server.wait_ready(120)
        os.kill(server.pid or 0, signal.SIGKILL)
        with pytest.raises(TunerError, match=r"llama-server stopped unexpectedly \(killed by SIGKILL\)"):
            watch_until_stopped(server, SpillWatch(0), interval_s=0.05, on_event=events.append, max_seconds=30)
    exited = [e for e in events if e.get("status") == "server_exited"]
    assert exited and exited[0]["log_tail"] and exited[0]["reason"] == "killed by SIGKILL"


# ------------------------------------------------------------------------------------------------ launch rules


def _pinned_failing_wrapper(tmp_path: Path, server_bin: Path) -> Path:
    """The real llama-server behind a wrapper that, without GGML_CUDA_NO_PINNED, fails the way a CUDA build does
    when pinned host memory cannot be had (ggml-cuda.cu's message, then an abort). No CUDA here, so the failure is
    staged; the retry, its environment and the server it ends with are real."""
    wrapper = tmp_path / "llama-server"
    wrapper.write_text(
        "#!/bin/sh\n"
        'if [ -z "$GGML_CUDA_NO_PINNED" ]; then\n'
        "  echo 'ggml_cuda_host_malloc: failed to allocate 20480.00 MiB of pinned memory: out of memory'\n"
        "  echo 'CUDA error: out of memory'\n"
        "  exit 134\n"
        "fi\n"
        f'exec {server_bin} "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    return wrapper


@pytest.mark.server
def test_pinned_memory_failure_is_retried_once_without_pinned_memory(server_bin: Path, tiny_moe_gguf: Path,
                                                                     tmp_path: Path) -> None:
    events: list[dict[str, Any]] = []
    wrapper = _pinned_failing_wrapper(tmp_path, server_bin)
    server = launch(wrapper, tiny_moe_gguf, ["--ctx-size", "4096", "--fit", "off"], port=free_port(),
                    log_path=tmp_path / "p.log", on_event=events.append)
    try:
        environ = Path(f"/proc/{server.pid}/environ").read_bytes().split(b"\0")
        assert b"GGML_CUDA_NO_PINNED=1" in environ
        assert server.smoke_completion()["usage"]["completion_tokens"] >= 1
    finally:
        server.stop()
    warnings = [e for e in events if e.get("kind") == "pinned"]
    assert len(warnings) == 1 and "retrying once with GGML_CUDA_NO_PINNED=1" in warnings[0]["warning"]
    assert [e["status"] for e in events if e.get("status") == "launching"] == ["launching", "launching"]
    assert (tmp_path / "p.pinned-failure.log").read_text().count("pinned memory") == 1


def _zero_token_server(tmp_path: Path) -> Path:
    """A stand-in llama-server that loads (``/health`` says ok) but whose completions produce no tokens, as configs
    loaded at thin margins have done; llama.cpp has no switch for that, so a small HTTP server plays it."""
    script = tmp_path / "zero-token-server"
    script.write_text(f"""#!{sys.executable}
import json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Handler(BaseHTTPRequestHandler):
    def _send(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._send(200 if self.path == "/health" else 404, {{"status": "ok"}})

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self._send(200, {{"choices": [{{"message": {{"role": "assistant", "content": ""}}}}],
                         "usage": {{"prompt_tokens": 5, "completion_tokens": 0, "total_tokens": 5}}}})

    def log_message(self, *args):
        pass

port = int(sys.argv[sys.argv.index("--port") + 1])
print("main: server is listening", flush=True)
ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
""")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def test_a_server_that_loads_but_produces_no_tokens_is_not_ready(tmp_path: Path, hybrid_gguf: Path) -> None:
    events: list[dict[str, Any]] = []
    with pytest.raises(TunerError, match="loaded but produced no tokens"):
        launch(_zero_token_server(tmp_path), hybrid_gguf, [], port=free_port(), log_path=tmp_path / "z.log",
               ready_timeout_s=60, stop_grace_s=5, on_event=events.append)
    statuses = [e["status"] for e in events if "status" in e]
    assert "verifying" in statuses and "ready" not in statuses
    pid = next(e["pid"] for e in events if e.get("status") == "loading" and "pid" in e)
    assert not process_alive(pid)  # stopped before the error left launch()


@pytest.mark.server
def test_other_load_failures_are_not_retried(server_bin: Path, bad_tokenizer_gguf: Path, tmp_path: Path) -> None:
    events: list[dict[str, Any]] = []
    with pytest.raises(TunerError, match="unknown tokenizer"):
        launch(server_bin, bad_tokenizer_gguf, ["--ctx-size", "4096", "--fit", "off"], port=free_port(),
               log_path=tmp_path / "b.log", on_event=events.append)
    assert [e["status"] for e in events if e.get("status") == "launching"] == ["launching"]
    assert _llama_servers_for(bad_tokenizer_gguf) == []


# ------------------------------------------------------------------------------------------------ build and fetch


@pytest.mark.server
def test_cached_build_is_reused_at_once(llama_build: Any) -> None:
    started = time.monotonic()
    build, cached = obtain_build("pypi", cuda=False)
    assert cached and build.server_bin == llama_build.server_bin
    print(f"cached obtain_build: {time.monotonic() - started:.2f} s")
    external, cached = obtain_build(server_bin=str(llama_build.server_bin))
    assert cached and external.server_bin == Path(llama_build.server_bin)


def test_local_model_is_used_in_place(hybrid_gguf: Path) -> None:
    cand = QuantCandidate(quant="F16", layout=local_layout(hybrid_gguf), files=(str(hybrid_gguf),), file_bytes=1,
                          source="local")
    got = fetch_candidate(cand)
    assert got.model_path == hybrid_gguf and got.downloaded_bytes == 0 and got.mmproj_path is None
    with pytest.raises(TunerError, match="no mmproj"):
        fetch_candidate(cand, vision=True)
    with pytest.raises(TunerError, match="does not exist"):
        fetch_candidate(replace(cand, files=(str(hybrid_gguf.with_name("gone.gguf")),)))


@pytest.fixture
def fake_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """tests/hubserver.py's loopback Hub serving a small ladder (sparse quants, one split in 3, an mmproj)."""
    sys.path.insert(0, str(Path(__file__).parent))
    try:
        import hubserver
    finally:
        sys.path.pop(0)

    root = tmp_path / "hub"
    hubserver.write_ladder(root / "acme" / "Tiny-GGUF")
    (root / "acme" / "Tiny-GGUF" / "Tiny-A1B-Q8_0.gguf").unlink()  # keep the sparse ladder small
    with hubserver.FakeHub(root, tokens={}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("TUNER_CACHE_DIR", str(tmp_path / "tuner-cache"))
        yield hub


def test_hub_quant_is_downloaded_once_with_all_shards_and_the_mmproj(fake_hub: Any, tmp_path: Path) -> None:
    files = tuple(sorted(f for f, _ in fake_hub.files("acme/Tiny-GGUF") if f.startswith("F16/")))
    assert len(files) == 3
    cand = QuantCandidate(quant="F16", layout=local_layout(fake_hub.root / "acme/Tiny-GGUF" / files[0]), files=files,
                          file_bytes=0, source="hub", repo="acme/Tiny-GGUF", mmproj="mmproj-F16.gguf")
    progress: list[tuple[str, int, int | None]] = []
    got = fetch_candidate(cand, vision=True, on_progress=lambda *a: progress.append(a), cache_dir=tmp_path / "hf")
    sizes = dict(fake_hub.files("acme/Tiny-GGUF"))
    expected = sum(sizes[f] for f in files) + sizes["mmproj-F16.gguf"]
    assert got.downloaded_bytes == expected
    assert [p.name for p in got.shard_paths] == [Path(f).name for f in files]
    assert got.model_path == got.shard_paths[0] and got.mmproj_path is not None
    for name, path in zip([*files, "mmproj-F16.gguf"], [*got.shard_paths, got.mmproj_path], strict=True):
        assert path.read_bytes() == (fake_hub.root / "acme/Tiny-GGUF" / name).read_bytes()
    assert progress[-1] == ("mmproj-F16.gguf", sizes["mmproj-F16.gguf"], sizes["mmproj-F16.gguf"])
    sent = fake_hub.total_bytes_sent()
    again = fetch_candidate(cand, vision=True, cache_dir=tmp_path / "hf")
    assert again.downloaded_bytes == 0 and fake_hub.total_bytes_sent() == sent  # from the Hub cache
    with pytest.raises(TunerError, match="has no file"):
        fetch_candidate(replace(cand, files=("nope.gguf",)), cache_dir=tmp_path / "hf")
    with pytest.raises(TunerError, match="does not exist or is private"):
        fetch_candidate(replace(cand, repo="acme/missing"), cache_dir=tmp_path / "hf")


# ------------------------------------------------------------------------------------------------ the command


class ServeProcess(TunerProcess):
    """``tuner serve … [--json]`` in a subprocess (:class:`tunerproc.TunerProcess`)."""

    def __init__(self, args: list[str], env: dict[str, str], as_json: bool = True) -> None:
        super().__init__(["serve", *args], env, as_json)


@pytest.fixture
def serve_env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "TUNER_CONFIG_DIR": str(tmp_path / "config"), "PYTHONUNBUFFERED": "1"}


@pytest.mark.server
@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM], ids=["sigint", "sigterm"])
def test_serve_becomes_ready_answers_checks_memory_and_stops_cleanly(
        llama_build: Any, hybrid_gguf: Path, serve_env: dict[str, str], tmp_path: Path,
        stop_signal: signal.Signals) -> None:
    port = free_port()
    serve = ServeProcess([str(hybrid_gguf), "--gpu", "none", "--cache-type", "f16", "--port", str(port),
                          "--log-file", str(tmp_path / "server.log")], serve_env)
    try:
        ready = serve.wait_for(status_is("ready"))
        server_pid = ready["pid"]
        assert process_alive(server_pid)
        assert psutil.Process(server_pid).ppid() == serve.proc.pid
        assert ready["endpoint"] == f"http://127.0.0.1:{port}/v1"
        assert ready["model"] == "tiny-hybrid-state"
        assert ready["client"]["claude_code_router"]["Providers"][0]["models"] == ["tiny-hybrid-state"]

        reply = httpx.post(f"{ready['endpoint']}/chat/completions", timeout=60, json={
            "model": ready["model"], "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8})
        assert reply.status_code == 200
        assert reply.json()["usage"]["completion_tokens"] >= 1

        statuses = [e["status"] for e in serve.events if "status" in e]
        assert statuses.index("verifying") < statuses.index("ready")  # a real completion came first
        command = next(e for e in serve.events if e.get("status") == "launching")["command"]
        assert command[command.index("--fit") + 1] == "off" and "--jinja" in command
        assert command[command.index("--ctx-size") + 1] == "4096"
        assert command[command.index("--verbosity") + 1] == "4"

        check = next(e for e in serve.events if "memory_check" in e)["memory_check"]
        reported = parse_load_log((tmp_path / "server.log").read_text())
        for kind in ("kv", "recurrent"):
            row = check[kind]
            assert row["reported_bytes"] == reported.total(kind) > 0
            assert abs(row["predicted_bytes"] - row["reported_bytes"]) <= 0.01 * row["reported_bytes"], row
        assert {"weights", "kv", "recurrent", "compute"} <= set(check)
        observations = list((tmp_path / "config" / "observations").glob("tiny-hybrid-state-*.json"))
        assert len(observations) == 1 and ready["observation"] == str(observations[0])

        serve.proc.send_signal(stop_signal)
        code = serve.finish()
    finally:
        serve.kill()
    assert code == 0, serve.stderr
    assert serve.events[-1] == {"status": "stopped", "reason": "exit code 0"}
    assert not process_alive(server_pid)
    assert _llama_servers_for(hybrid_gguf) == []

    # the closed loop: what this launch reported now calibrates the next estimate of the same shape and build
    est = subprocess.run([sys.executable, "-m", "tuner", "estimate", str(hybrid_gguf), "--gpu", "none", "-c", "4096",
                          "-np", "1", "-ctk", "f16", "-ctv", "f16", "--json"], env=serve_env, capture_output=True,
                         text=True, timeout=120, check=True)
    cal = json.loads(est.stdout)["calibration"]
    assert cal["line"] == "calibrated on this machine by 1 run" and cal["devices"]["CPU"]["compute_runs"] == 1
    assert cal["devices"]["CPU"]["scope"] == "this shape and ubatch"


@pytest.mark.server
def test_time_to_healthy_against_llama_server_started_by_hand(
        llama_build: Any, hybrid_gguf: Path, serve_env: dict[str, str], tmp_path: Path,
        record_property: Callable[[str, object], None]) -> None:
    """The overhead tuner adds with the build cached (Python start-up, planning, the build check, the test
    completion and the memory check) against the same llama-server command run by hand until /health says 200."""
    started = time.monotonic()
    serve = ServeProcess([str(hybrid_gguf), "--gpu", "none", "--cache-type", "f16", "--port", str(free_port()),
                          "--log-file", str(tmp_path / "tuner.log")], serve_env)
    try:
        serve.wait_for(status_is("ready"))
        tuner_s = time.monotonic() - started
        command = next(e for e in serve.events if e.get("status") == "launching")["command"]
        serve.proc.send_signal(signal.SIGINT)
        assert serve.finish() == 0
    finally:
        serve.kill()
    port = free_port()
    command[command.index("--port") + 1] = str(port)
    with open(tmp_path / "hand.log", "wb") as log:
        started = time.monotonic()
        hand = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = started + 120
        while True:
            assert hand.poll() is None, (tmp_path / "hand.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "llama-server by hand was not healthy in 120 s"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            time.sleep(0.05)
        hand_s = time.monotonic() - started
    finally:
        hand.terminate()
        hand.wait(timeout=30)
    record_property("tuner_serve_to_ready_s", round(tuner_s, 2))
    record_property("llama_server_by_hand_to_healthy_s", round(hand_s, 2))
    print(f"tuner serve → ready {tuner_s:.2f} s; llama-server by hand → healthy {hand_s:.2f} s; "
          f"overhead {tuner_s - hand_s:.2f} s")


@pytest.mark.server
def test_serve_prints_endpoint_and_client_settings_for_people(llama_build: Any, tiny_moe_gguf: Path,
                                                              serve_env: dict[str, str], tmp_path: Path) -> None:
    port = free_port()
    serve = ServeProcess([str(tiny_moe_gguf), "--gpu", "none", "--cache-type", "f16", "--port", str(port),
                          "--log-file", str(tmp_path / "s.log")], serve_env, as_json=False)
    try:
        deadline = time.monotonic() + 120
        while not any("Ctrl-C stops it" in line for line in serve.stdout):
            assert serve.proc.poll() is None, serve.stderr
            assert time.monotonic() < deadline, serve.stdout
            time.sleep(0.1)
        serve.proc.send_signal(signal.SIGINT)
        code = serve.finish()
    finally:
        serve.kill()
    text = "".join(serve.stdout)
    assert code == 0, serve.stderr
    assert f"http://127.0.0.1:{port}/v1" in text
    assert "tiny-qwen35moe" in text  # the alias
    assert f'"api_base_url": "http://127.0.0.1:{port}/v1/chat/completions"' in text
    assert "Memory: estimate vs llama-server" in text
    assert "llama-server stopped (exit code 0)." in text
    # -lv 4 goes to the log file, not the terminal
    assert "load_tensors" not in text + "".join(serve.stderr)
    assert "load_tensors" in (tmp_path / "s.log").read_text()
    assert _llama_servers_for(tiny_moe_gguf) == []


def test_download_progress_is_a_bar_on_a_terminal_and_a_line_per_file_otherwise() -> None:
    import io

    from rich.console import Console

    from tuner.cli.serve import FetchProgress

    plain = io.StringIO()
    progress = FetchProgress(Console(file=plain, force_terminal=False))
    for done in (0, 1 << 20, 2 << 20):
        progress("Q4_K_M/m-00001-of-00002.gguf", done, 2 << 20)
    progress("mmproj-F16.gguf", 5 << 20, 5 << 20)  # already in the cache: reported complete at once
    progress.close()
    assert plain.getvalue().splitlines() == [
        "tuner serve: Q4_K_M/m-00001-of-00002.gguf (2.0 MiB) is in the Hugging Face cache",
        "tuner serve: mmproj-F16.gguf (5.0 MiB) is in the Hugging Face cache"]
    term = io.StringIO()
    progress = FetchProgress(Console(file=term, force_terminal=True, width=120))
    progress("m.gguf", 1 << 20, 2 << 20)
    progress.close()
    assert "m.gguf" in term.getvalue() and "1.0/2.1 MB" in term.getvalue()


def _one_line_error(serve: ServeProcess) -> str:
    errors = [line for line in serve.stderr if line.startswith("tuner: error:")]
    assert len(errors) == 1, serve.stderr
    return errors[0]


@pytest.mark.server
def test_port_in_use_is_refused_before_anything_runs(tiny_moe_gguf: Path, serve_env: dict[str, str],
                                                     tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        serve = ServeProcess([str(tiny_moe_gguf), "--gpu", "none", "--port", str(port), "--log-file",
                              str(tmp_path / "never.log")], serve_env)
        code = serve.finish()
    assert code != 0
    assert "already in use" in _one_line_error(serve)
    assert not (tmp_path / "never.log").exists()
    assert serve.events == []  # refused before planning
    assert _llama_servers_for(tiny_moe_gguf) == []


def test_public_bind_without_api_key_is_refused(tiny_moe_gguf: Path, serve_env: dict[str, str]) -> None:
    serve = ServeProcess([str(tiny_moe_gguf), "--gpu", "none", "--host", "0.0.0.0", "--port", str(free_port())],
                         serve_env)
    assert serve.finish() != 0
    assert "--api-key" in _one_line_error(serve)
    assert _llama_servers_for(tiny_moe_gguf) == []


def test_model_larger_than_this_machines_ram_is_refused_before_launch(tmp_path: Path,
                                                                      serve_env: dict[str, str]) -> None:
    """A sparse file shaped like Qwen3.5-35B-A3B, with as many layers as it takes to be twice the available RAM:
    it takes no disk, and no plan can hold it without a GPU."""
    available = psutil.virtual_memory().available
    per_layer = 0.85 * GiB  # Q8_0 35B-A3B: 33.4 GiB over 40 layers
    n_layer = max(40, 4 * int(2 * available / per_layer / 4 + 1))
    big = tmp_path / "huge-Q8_0.gguf"
    write_synthetic_gguf(big, qwen35_35b_a3b_spec(n_layer=n_layer, types={
        "matrix": "q8_0", "experts": "q8_0", "embd": "q8_0", "output": "q8_0"}))
    assert big.stat().st_size > available
    serve = ServeProcess([str(big), "--gpu", "none", "--port", str(free_port()), "--log-file",
                          str(tmp_path / "never.log")], serve_env)
    assert serve.finish() != 0
    error = _one_line_error(serve)
    assert "nothing fits" in error and "RAM" in error
    assert not (tmp_path / "never.log").exists()
    assert not any(e.get("status") == "launching" for e in serve.events)
    assert _llama_servers_for(big) == []


def test_build_failure_from_a_broken_source_dir_is_one_line_and_leaves_nothing(
        tiny_moe_gguf: Path, serve_env: dict[str, str], tmp_path: Path, processes_naming: Any,
        broken_llama_source: Path) -> None:
    source = broken_llama_source
    cache = tmp_path / "cache"
    serve = ServeProcess([str(tiny_moe_gguf), "--gpu", "none", "--source", str(source), "--port", str(free_port()),
                          "--log-file", str(tmp_path / "never.log")], {**serve_env, "TUNER_CACHE_DIR": str(cache)})
    assert serve.finish() != 0
    error = _one_line_error(serve)
    assert "llama.cpp configure failed" in error and str(cache / "work") in error and "build.log" in error
    assert [e["status"] for e in serve.events if "status" in e] == ["planning", "building"]
    assert not (tmp_path / "never.log").exists()
    assert not (cache / "builds").exists() or not any((cache / "builds").iterdir())
    assert processes_naming(str(source)) == [] and _llama_servers_for(tiny_moe_gguf) == []


@pytest.mark.server
@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM], ids=["sigint", "sigterm"])
def test_stopping_tuner_while_the_model_loads_leaves_nothing(
        llama_build: Any, tiny_moe_gguf: Path, serve_env: dict[str, str], tmp_path: Path, processes_naming: Any,
        stop_signal: signal.Signals) -> None:
    """A --server-bin wrapper that takes its time before it becomes llama-server (a slow load, as a 20 GB model
    has): stopping tuner then stops the wrapper and its child too, and tuner says it was interrupted."""
    marker = tmp_path / "slow-start-marker"
    wrapper = tmp_path / "llama-server"
    wrapper.write_text(
        "#!/bin/sh\n"
        f'[ "$1" = --version ] && exec {llama_build.server_bin} "$@"\n'
        f"{sys.executable} -c 'import time; time.sleep(120)' {marker}\n"
        f'exec {llama_build.server_bin} "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    serve = ServeProcess([str(tiny_moe_gguf), "--gpu", "none", "--cache-type", "f16", "--port", str(free_port()),
                          "--server-bin", str(wrapper), "--log-file", str(tmp_path / "slow.log")], serve_env)
    try:
        pid = serve.wait_for(lambda e: e.get("status") == "loading" and "pid" in e)["pid"]
        deadline = time.monotonic() + 60
        while not processes_naming(str(marker)):
            assert time.monotonic() < deadline, "the wrapper never started its slow step"
            time.sleep(0.05)
        serve.proc.send_signal(stop_signal)
        code = serve.finish()
    finally:
        serve.kill()
    assert code == 130, serve.stderr
    assert any(line.startswith("tuner: interrupted") for line in serve.stderr), serve.stderr
    assert not process_alive(pid)
    assert processes_naming(str(marker)) == [] and _llama_servers_for(tiny_moe_gguf) == []


@pytest.mark.server
def test_llama_server_crashing_at_load_is_one_line_and_leaves_nothing(
        llama_build: Any, bad_tokenizer_gguf: Path, serve_env: dict[str, str], tmp_path: Path) -> None:
    serve = ServeProcess([str(bad_tokenizer_gguf), "--gpu", "none", "--cache-type", "f16", "--port",
                          str(free_port()), "--log-file", str(tmp_path / "crash.log")], serve_env)
    started = time.monotonic()
    code = serve.finish()
    assert code != 0
    assert time.monotonic() - started < 60
    error = _one_line_error(serve)
    assert "unknown tokenizer: 'gpX2'" in error and str(tmp_path / "crash.log") in error
    launched = [e for e in serve.events if e.get("status") == "loading" and "pid" in e]
    assert launched and not process_alive(launched[0]["pid"])
    assert _llama_servers_for(bad_tokenizer_gguf) == []


@pytest.mark.server
def test_llama_server_dying_while_serving_is_reported_with_its_log(
        llama_build: Any, tiny_moe_gguf: Path, serve_env: dict[str, str], tmp_path: Path) -> None:
    serve = ServeProcess([str(tiny_moe_gguf), "--gpu", "none", "--cache-type", "f16", "--port", str(free_port()),
                          "--log-file", str(tmp_path / "die.log")], serve_env)
    try:
        ready = serve.wait_for(status_is("ready"))
        os.kill(ready["pid"], signal.SIGKILL)
        code = serve.finish()
    finally:
        serve.kill()
    assert code != 0
    assert "llama-server stopped unexpectedly (killed by SIGKILL)" in _one_line_error(serve)
    exited = [e for e in serve.events if e.get("status") == "server_exited"]
    assert exited and exited[0]["log_tail"] and exited[0]["log"] == str(tmp_path / "die.log")


@pytest.mark.server
def test_killing_tuner_outright_takes_llama_server_with_it(llama_build: Any, tiny_moe_gguf: Path,
                                                           serve_env: dict[str, str], tmp_path: Path) -> None:
    serve = ServeProcess([str(tiny_moe_gguf), "--gpu", "none", "--cache-type", "f16", "--port", str(free_port()),
                          "--log-file", str(tmp_path / "k.log")], serve_env)
    try:
        server_pid = serve.wait_for(status_is("ready"))["pid"]
        serve.proc.send_signal(signal.SIGKILL)
        serve.finish()
        deadline = time.monotonic() + 10
        while process_alive(server_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        serve.kill()
    assert not process_alive(server_pid)
    assert _llama_servers_for(tiny_moe_gguf) == []


@pytest.mark.server
def test_hub_model_is_planned_downloaded_and_served(llama_build: Any, fake_hub: Any, tmp_path: Path) -> None:
    """Over HTTP from the loopback Hub into a fresh Hub cache; the fixture points TUNER_CACHE_DIR at a temp dir (the
    Hub header cache), so the build comes in as --server-bin."""
    env = {**os.environ, "TUNER_CONFIG_DIR": str(tmp_path / "config"), "HF_HUB_CACHE": str(tmp_path / "hf"),
           "PYTHONUNBUFFERED": "1"}
    serve = ServeProcess(["acme/Tiny-GGUF:F16", "--gpu", "none", "--cache-type", "f16", "--port", str(free_port()),
                          "--server-bin", str(llama_build.server_bin), "--log-file", str(tmp_path / "hub.log")], env)
    try:
        ready = serve.wait_for(status_is("ready"))
        plan = next(e for e in serve.events if "plan" in e)["plan"]
        assert plan["source"] == "hub" and len(plan["files"]) == 3
        model_path = next(e for e in serve.events if e.get("status") == "launching")["command"][2]
        assert model_path.startswith(str(tmp_path / "hf")) and model_path.endswith("-00001-of-00003.gguf")
        sizes = dict(fake_hub.files("acme/Tiny-GGUF"))
        assert fake_hub.total_bytes_sent() >= sum(sizes[f] for f in plan["files"])
        reply = httpx.post(f"{ready['endpoint']}/chat/completions", timeout=60,
                           json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
        assert reply.status_code == 200
        serve.proc.send_signal(signal.SIGINT)
        assert serve.finish() == 0
    finally:
        serve.kill()


@pytest.mark.server
def test_unreachable_hub_is_one_line_on_stderr_without_the_hub_librarys_retry_chatter(
        llama_build: Any, serve_env: dict[str, str], tmp_path: Path) -> None:
    closed_port = free_port()  # nothing listens there: every request is refused, and huggingface_hub retries
    env = {**serve_env, "HF_ENDPOINT": f"http://127.0.0.1:{closed_port}", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run([sys.executable, "-m", "tuner", "serve", "qwen3.5-35b-a3b:Q2_K", "--gpu", "none",
                           "--port", str(free_port())], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("tuner: error: cannot download"), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


# ----------------------------------------------------------------------------------------- the file, not the card


def test_a_plan_is_kept_when_the_header_agrees_and_made_again_when_it_does_not(card_hub: Any) -> None:
    from tuner.replan import replan_from_file

    real_file = card_hub.file
    real = local_layout(real_file).weights_bytes
    hw, wishes = hardware_for("none"), Wishes(ctx_size=1024)
    plan = plan_for(card_hub.card, hw, wishes).plan
    assert plan.candidate.source == "card" and plan.candidate.layout.weights_bytes < real
    again = replan_from_file(plan, real_file, hw, wishes)
    assert again.replanned and again.plan.candidate.layout.weights_bytes == real
    assert again.plan.candidate.repo == card_hub.repo and again.plan.candidate.quant == "Q8_0"
    message = again.message()
    assert "is not the file the plan was sized for" in message and "re-planned from its header" in message
    from_file = plan_for(str(real_file), hw, wishes).plan
    kept = replan_from_file(from_file, real_file, hw, wishes)
    assert not kept.replanned and kept.plan is from_file


@pytest.mark.server
def test_serve_replans_from_the_downloaded_header_when_it_differs_from_the_card(
        llama_build: Any, card_hub: Any, tmp_path: Path) -> None:
    """The card says Q8_0 experts, the file has f16 ones: serve says so, plans again from the header, and the
    estimate it launches with is the file's (llama-server's own load log agrees on the weights)."""
    env = {**os.environ, "TUNER_CONFIG_DIR": str(tmp_path / "config"), "HF_HUB_CACHE": str(tmp_path / "hf"),
           "PYTHONUNBUFFERED": "1"}
    serve = ServeProcess([card_hub.card, "--gpu", "none", "--ctx-size", "1024", "--port", str(free_port()),
                          "--server-bin", str(llama_build.server_bin), "--log-file", str(tmp_path / "s.log")], env)
    try:
        serve.wait_for(status_is("ready"))
        warning = next(e for e in serve.events if e.get("kind") == "replan")
        assert "Tiny-Q8_0.gguf is not the file the plan was sized for" in warning["warning"]
        plans = [e for e in serve.events if "plan" in e]
        assert len(plans) == 2 and plans[1]["replanned"] and plans[1]["plan"]["quant"] == "Q8_0"
        weights = next(e for e in serve.events if "memory_check" in e)["memory_check"]["weights"]
        assert weights["within"], weights  # sized for the file on disk, not for the card's mix
        serve.proc.send_signal(signal.SIGINT)
        assert serve.finish() == 0
    finally:
        serve.kill()


@pytest.mark.server
def test_serve_stops_with_one_line_when_the_downloaded_file_no_longer_fits(
        llama_build: Any, card_hub: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """RAM (pinned) holds the card's plan but not the real file even without prompt cache and checkpoints: serve
    downloads it, reads its header, and stops before launching anything."""
    import huggingface_hub.constants

    from tuner import hardware
    from tuner.cli import main as cli_main
    from tuner.hardware import machine
    from tuner.planner import estimate_on

    real_file = card_hub.file
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TUNER_CONFIG_DIR", str(tmp_path / "config"))
    wishes = Wishes(ctx_size=1024, buffer_bytes=0)
    big = replace(hardware_for("none"), ram_available_bytes=64 << 30)
    plan = plan_for(card_hub.card, big, wishes).plan
    lean = plan.flags.with_(cache_ram_mib=0, ctx_checkpoints=0)
    card_need = estimate_on(plan.candidate.layout, lean, big).host_total_bytes
    file_need = estimate_on(local_layout(real_file), lean, big).host_total_bytes
    assert file_need > card_need
    ram = (card_need + file_need) // 2
    host = hardware.HostInfo(ram, ram, 2, 2, "Test CPU")
    monkeypatch.setattr(machine, "read_host_noted", lambda: (host, ()))
    code = cli_main(["serve", card_hub.card, "--gpu", "none", "--ctx-size", "1024", "--buffer", "0", "--port",
                     str(free_port()), "--server-bin", str(llama_build.server_bin)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]  # the download's line, then the error's
    errors = [line for line in lines if line.startswith("tuner: error:")]
    assert code != 0 and errors == lines[-1:] and "Traceback" not in err, err
    assert "Tiny-Q8_0.gguf is not the file the plan was sized for" in errors[0]
    assert "it no longer fits" in errors[0] and "nothing fits" in errors[0]
    assert _llama_servers_for(real_file) == []  # nothing was launched
