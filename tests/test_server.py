"""tuner.server: the real llama-server (CPU build) started, queried and stopped, and the checks made before a launch."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest

from tuner.errors import TunerError
from tuner.server import (
    LlamaServer,
    check_bind,
    ensure_port_free,
    error_summary,
    exit_reason,
    free_port,
    is_loopback,
    load_stage,
    parse_metrics,
    pinned_memory_failure,
    process_alive,
)

ARGS = ["--ctx-size", "4096", "--parallel", "1", "--fit", "off", "--jinja", "-lv", "4"]


def _listening_socket() -> tuple[socket.socket, int]:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    return s, int(s.getsockname()[1])


def _wait_gone(pid: int, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not process_alive(pid):
            return True
        time.sleep(0.05)
    return False


# ------------------------------------------------------------------------------------------- checks before launch


def test_loopback_addresses_are_recognised() -> None:
    assert all(is_loopback(h) for h in ("127.0.0.1", "localhost", "::1", "[::1]", "127.0.1.1"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "192.168.1.5", "example.com"))


def test_a_name_that_starts_like_a_loopback_address_is_not_one() -> None:
    """``127.0.0.1.example.com`` is a DNS name anyone can point anywhere: it needs an API key like any other."""
    assert not any(is_loopback(h) for h in ("127.0.0.1.example.invalid", "127.evil.example", "127.1", "::2"))
    with pytest.raises(TunerError, match="no --api-key"):
        check_bind("127.0.0.1.example.invalid", free_port(), None)


def test_an_unresolvable_host_is_reported_as_such_not_as_a_port_in_use() -> None:
    with pytest.raises(TunerError, match=r"cannot resolve --host 'nowhere\.invalid'"):
        ensure_port_free("nowhere.invalid", free_port())


def test_an_api_key_no_http_header_can_carry_is_refused_without_showing_it() -> None:
    for key in ("two words", "line\nbreak", "caf\u00e9", "x" * 5000, ""):
        with pytest.raises(TunerError, match="--api-key must be printable ASCII") as info:
            check_bind("127.0.0.1", free_port(), key)
        assert not key or key not in str(info.value)


def test_public_bind_without_api_key_is_refused() -> None:
    port = free_port()
    with pytest.raises(TunerError, match="api-key"):
        check_bind("0.0.0.0", port, None)
    check_bind("0.0.0.0", port, "secret")  # with a key it is allowed
    check_bind("127.0.0.1", port, None)


def test_port_in_use_is_refused() -> None:
    s, port = _listening_socket()
    with s:
        with pytest.raises(TunerError, match=f"port {port} on 127.0.0.1 is already in use"):
            ensure_port_free("127.0.0.1", port)
        with pytest.raises(TunerError, match="already in use"):
            check_bind("127.0.0.1", port, None)


def test_invalid_port_is_refused() -> None:
    with pytest.raises(TunerError, match="not a valid TCP port"):
        ensure_port_free("127.0.0.1", 70000)


# ------------------------------------------------------------------------------------------- reading logs


def test_error_summary_names_the_cause_not_the_consequence() -> None:
    log = textwrap.dedent("""\
        0.00.004.140 W srv  llama_server: security: no API key is set
        0.00.011.417 E llama_init_from_model: K cache type q8_0 with block size 32 does not divide n_embd_head_k=16
        0.00.011.434 E cmn  common_init_: failed to create context with model 'x.gguf'
        0.00.011.451 E srv    load_model: failed to create_context with model 'x.gguf'
        0.00.013.422 E srv  llama_server: exiting due to model loading error
        """)
    assert error_summary(log) == ("llama_init_from_model: K cache type q8_0 with block size 32 does not divide "
                                  "n_embd_head_k=16")
    cuda = "0.01.0 I load_tensors: x\nggml_cuda_error: CUDA error: out of memory\n  current device: 0\n"
    assert error_summary(cuda) == "CUDA error: out of memory"
    assert error_summary("") == "no output"


def test_pinned_memory_failures_are_recognised_in_ggml_cudas_words() -> None:
    debug = "ggml_cuda_host_malloc: failed to allocate 20480.00 MiB of pinned memory: out of memory"
    assert pinned_memory_failure(f"a\n{debug}\nb") == debug
    assert pinned_memory_failure("llama_model_load: error loading model: unable to allocate CUDA_Host buffer")
    assert pinned_memory_failure("CUDA error: out of memory\n  cudaMallocHost((void **) &ptr, size)")
    assert pinned_memory_failure("ggml_gallocr_reserve_n: failed to allocate CUDA_Host buffer of size 1234")
    assert pinned_memory_failure("CUDA error: out of memory\n  cudaMalloc((void **) &ptr, size)") is None
    assert pinned_memory_failure("load_tensors: CUDA_Host model buffer size = 1.00 MiB") is None


def test_exit_reason_names_signals() -> None:
    assert exit_reason(0) == "exit code 0"
    assert exit_reason(1) == "exit code 1"
    assert exit_reason(-9) == "killed by SIGKILL"
    assert exit_reason(None) == "still running"


# ------------------------------------------------------------------------------------------- the real server


@pytest.mark.server
def test_server_loads_answers_and_stops_cleanly_on_sigterm(server_bin: Path, tiny_moe_gguf: Path,
                                                           tmp_path: Path) -> None:
    stages: list[str] = []
    server = LlamaServer(server_bin, tiny_moe_gguf, [*ARGS, "--metrics"], log_path=tmp_path / "s.log")
    with server:
        seconds = server.wait_ready(120, on_progress=stages.append)
        pid = server.pid
        assert pid is not None and process_alive(pid)
        assert 0 < seconds < 120
        reply = server.smoke_completion(max_tokens=5)
        assert reply["usage"]["completion_tokens"] >= 1
        metrics = server.metrics()
        assert metrics is not None
        assert metrics["llamacpp:tokens_predicted_total"] >= 1
        assert metrics["llamacpp:tokens_predicted_seconds_total"] > 0
        assert load_stage(server.log_text()) == "model loaded"
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert b"CUDA_DEVICE_ORDER=PCI_BUS_ID" in env
        assert os.getsid(pid) == pid  # its own session: a terminal's Ctrl-C reaches tuner, not it
    assert server.poll() == 0  # SIGTERM: llama-server shut down by itself, no SIGKILL needed
    assert not process_alive(pid)
    # llama-server prints its memory breakdown on the way out
    assert "memory breakdown" in server.log_text() or "common_memory_breakdown_print" in server.log_text()


@pytest.mark.server
def test_server_without_metrics_flag_has_no_metrics(server_bin: Path, tiny_moe_gguf: Path, tmp_path: Path) -> None:
    with LlamaServer(server_bin, tiny_moe_gguf, ARGS, log_path=tmp_path / "s.log") as server:
        server.wait_ready(120)
        assert server.metrics() is None


@pytest.mark.server
def test_load_failure_is_reported_fast_with_llama_servers_own_error(server_bin: Path, bad_tokenizer_gguf: Path,
                                                                    tmp_path: Path) -> None:
    server = LlamaServer(server_bin, bad_tokenizer_gguf, ARGS, log_path=tmp_path / "bad.log")
    started = time.monotonic()
    with server, pytest.raises(TunerError) as info:
        server.wait_ready(120)
    assert time.monotonic() - started < 30
    message = info.value.one_line()
    assert "exit code 1" in message
    assert "unknown tokenizer: 'gpX2'" in message
    assert str(tmp_path / "bad.log") in message
    assert not process_alive(server.pid or 0)


@pytest.mark.server
def test_server_refuses_a_port_already_in_use(server_bin: Path, tiny_moe_gguf: Path) -> None:
    s, port = _listening_socket()
    with s:
        server = LlamaServer(server_bin, tiny_moe_gguf, ARGS, port=port)
        with pytest.raises(TunerError, match="already in use"):
            server.start()
        assert server.proc is None  # nothing was launched


@pytest.mark.server
def test_port_is_free_again_right_after_a_stop_with_keep_alive_clients(server_bin: Path, tiny_moe_gguf: Path,
                                                                        tmp_path: Path) -> None:
    """A client that keeps its connection open (OpenAI SDKs do) makes llama-server close it on the way out, which
    leaves the port's connection in TIME_WAIT for a minute: a restart on the same port must not be refused."""
    client = httpx.Client(timeout=60)
    try:
        with LlamaServer(server_bin, tiny_moe_gguf, ARGS, log_path=tmp_path / "1.log") as first:
            first.wait_ready(120)
            port = first.port
            r = client.post(f"{first.base_url}/v1/chat/completions",
                            json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 2})
            assert r.status_code == 200
        ensure_port_free("127.0.0.1", port)
        with LlamaServer(server_bin, tiny_moe_gguf, ARGS, port=port, log_path=tmp_path / "2.log") as second:
            second.wait_ready(120)
            assert second.smoke_completion()["usage"]["completion_tokens"] >= 1
    finally:
        client.close()


@pytest.mark.server
def test_child_dies_when_the_parent_is_killed_outright(server_bin: Path, tiny_moe_gguf: Path, tmp_path: Path) -> None:
    """kill -9 on tuner runs no cleanup code at all: PR_SET_PDEATHSIG must take llama-server down with it."""
    script = textwrap.dedent(f"""\
        import sys, time
        from tuner.server import LlamaServer
        s = LlamaServer({str(server_bin)!r}, {str(tiny_moe_gguf)!r}, {ARGS!r}, log_path={str(tmp_path / "o.log")!r})
        s.start()
        s.wait_ready(120)
        print(s.pid, flush=True)
        time.sleep(600)
        """)
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        child_pid = int(parent.stdout.readline())
        assert process_alive(child_pid)
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        assert _wait_gone(child_pid), f"llama-server {child_pid} outlived its killed parent"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


def test_stop_escalates_to_sigkill_when_sigterm_is_ignored(tmp_path: Path) -> None:
    """A stand-in for a llama-server stuck in a driver call: a script that ignores SIGTERM (the real server never
    does on this CPU build, so its SIGKILL path can only be shown with a process that does)."""
    stuck = tmp_path / "stuck-server"
    stuck.write_text("#!/bin/sh\ntrap '' TERM\necho started\nwhile :; do sleep 0.1; done\n")
    stuck.chmod(stuck.stat().st_mode | stat.S_IXUSR)
    server = LlamaServer(stuck, tmp_path / "unused.gguf", log_path=tmp_path / "stuck.log")
    server.start()
    server.wait_for_log("started", timeout_s=10)
    started = time.monotonic()
    code = server.stop(grace_s=0.5)
    assert code == -signal.SIGKILL
    assert time.monotonic() - started < 10
    assert not process_alive(server.pid or 0)


def test_missing_binary_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TunerError, match="run `tuner build`"):
        LlamaServer(tmp_path / "llama-server", tmp_path / "m.gguf").start()


def test_metrics_text_is_parsed_by_name() -> None:
    text = ("# HELP llamacpp:tokens_predicted_total x\n# TYPE llamacpp:tokens_predicted_total counter\n"
            "llamacpp:tokens_predicted_total 20\nllamacpp:predicted_tokens_seconds 1729.47\n"
            'llamacpp:labelled{slot="0"} 3\n')
    assert parse_metrics(text) == {"llamacpp:tokens_predicted_total": 20.0,
                                   "llamacpp:predicted_tokens_seconds": 1729.47, "llamacpp:labelled": 3.0}


@pytest.mark.server
def test_health_is_public_but_completions_need_the_api_key(server_bin: Path, tiny_moe_gguf: Path,
                                                           tmp_path: Path) -> None:
    with LlamaServer(server_bin, tiny_moe_gguf, ARGS, api_key="k3y", log_path=tmp_path / "k.log") as server:
        server.wait_ready(120)
        server.smoke_completion()  # sends the key
        r = httpx.post(f"{server.base_url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]},
                       timeout=30)
        assert r.status_code == 401
