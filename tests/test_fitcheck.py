"""tuner.fitcheck: llama-fit-params run as llama-server is, in a process group of its own, with a deadline and
bounded output (fake tools here; tests/test_cli_estimate.py runs the real one)."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import pytest
from hubserver import LADDER_SPEC

from tuner import fitcheck
from tuner.errors import TunerError
from tuner.flags import FLAGS, ServerFlags, flags_from_args
from tuner.local import local_layout
from tuner.server import process_alive
from tuner.synth import write_synthetic_gguf
from tuner.units import MiB


def _tools(tmp_path: Path, fit_params: str) -> Path:
    """A folder with a llama-server (never run here) and a llama-fit-params running ``fit_params`` (sh)."""
    folder = tmp_path / "bin"
    folder.mkdir()
    for name, body in (("llama-server", "exit 0"), ("llama-fit-params", fit_params)):
        (folder / name).write_text(f"#!/bin/sh\n{body}\n")
        (folder / name).chmod(0o755)
    return folder / "llama-server"


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("fit") / "tiny-Q4_K_M.gguf"
    write_synthetic_gguf(path, replace(LADDER_SPEC, fill="zeros"))
    return path


def test_a_fit_check_that_floods_its_log_keeps_the_figures_and_a_bounded_tail(model: Path, tmp_path: Path) -> None:
    server = _tools(tmp_path, "head -c 30000000 /dev/zero | tr '\\0' x >&2; echo 'Host 10 20 30'")
    result = fitcheck.run_fit_check(local_layout(model), ServerFlags(), server_bin=server)
    assert result["devices"] == [{"name": "CPU", "model_bytes": 10 * MiB, "context_bytes": 20 * MiB,
                                  "compute_bytes": 30 * MiB}]


def test_a_failed_fit_check_quotes_the_end_of_its_log(model: Path, tmp_path: Path) -> None:
    server = _tools(tmp_path, "head -c 30000000 /dev/zero | tr '\\0' x >&2; echo >&2; "
                              "echo 'error: failed to load model' >&2; exit 2")
    with pytest.raises(TunerError, match=r"llama-fit-params failed \(exit code 2\): error: failed to load model$"):
        fitcheck.run_fit_check(local_layout(model), ServerFlags(), server_bin=server)


def test_a_fit_check_past_its_deadline_is_stopped_group_and_all(model: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fitcheck, "TIMEOUT_S", 1)
    pid_file = tmp_path / "grandchild.pid"
    server = _tools(tmp_path, f"trap '' TERM; sleep 600 & echo $! > {pid_file}; wait")
    with pytest.raises(TunerError, match=r"llama-fit-params did not finish within 1 s"):
        fitcheck.run_fit_check(local_layout(model), ServerFlags(), server_bin=server)
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while process_alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not process_alive(grandchild), "a process the tool started outlived the check"


def test_a_fit_check_gets_the_placement_flags_and_llama_servers_environment(model: Path, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
    seen = tmp_path / "seen"
    server = _tools(tmp_path, f"printf '%s\\n' \"$@\" > {seen}.args; echo \"$CUDA_DEVICE_ORDER\" > {seen}.env; "
                              "echo 'Host 10 20 30'")
    flags = ServerFlags(rpc=("127.0.0.1:50052",), device=("RPC0", "CPU"), split_mode="none", main_gpu=1,
                        tensor_split=(3.0, 1.0), override_tensor=(r"blk\.0\.ffn=CPU",), ctx_size=2048, parallel=1)
    result = fitcheck.run_fit_check(local_layout(model), flags, server_bin=server, draft_model="/m/mtp-Head.gguf",
                                    mmproj="/m/mmproj-F16.gguf")
    args = seen.with_suffix(".args").read_text().splitlines()
    passed, _ = flags_from_args(args)
    assert args.index(FLAGS["rpc"].long) < args.index(FLAGS["device"].long)  # -dev may name an RPC device
    for key in fitcheck.PLACEMENT_KEYS:
        assert getattr(passed, key) == getattr(flags, key), key
    assert seen.with_suffix(".env").read_text().strip() == "PCI_BUS_ID"
    assert any("mtp-Head.gguf are not in its figures" in n for n in result["notes"])
    assert any("mmproj-F16.gguf is not in its figures" in n for n in result["notes"])
