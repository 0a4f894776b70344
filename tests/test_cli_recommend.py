"""``tuner recommend`` end to end: the JSON document, the report, errors, through the real entry points.

In-process runs pin the host (64 GiB of RAM, 8 cores) so plans do not depend on the machine running the tests, and
point the cache at an empty folder so no measured profile of this machine replaces the roofline."""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tuner import hardware
from tuner.cards import load_card
from tuner.cli import main
from tuner.cli.recommend import wishes_from_options
from tuner.hardware import machine
from tuner.units import GiB, MiB

HOST_RAM = 64 * GiB


@pytest.fixture(autouse=True)
def pinned_host(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    host = hardware.HostInfo(HOST_RAM, HOST_RAM, 8, 16, "Test CPU")
    monkeypatch.setattr(machine, "read_host_noted", lambda: (host, ()))
    monkeypatch.setenv("TUNER_CACHE_DIR", str(tmp_path / "cache"))


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tuner", "recommend", *args], capture_output=True, text=True,
                          timeout=120, check=False, env={**os.environ, **(env or {})})


def recommend_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    code = main(["recommend", *args, "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def test_json_document_through_a_subprocess() -> None:
    proc = run_cli("--gpu", "rtx-4090", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    plan = doc["plan"]
    for key in ("model", "quant", "file", "cache_type_k", "cache_type_v", "n_cpu_moe", "n_gpu_layers", "ctx_size",
                "parallel", "batch_size", "ubatch_size", "flash_attn", "kv_unified"):
        assert key in plan, key
    assert plan["model"] == "qwen3.5-35b-a3b" and plan["parallel"] == 1
    assert set(doc["budget"]) >= {"device", "vram_total_bytes", "vram_free_bytes", "buffer_bytes"}
    assert doc["budget"]["device"] == "CUDA0" and doc["budget"]["buffer_bytes"] == 1280 * MiB
    assert set(doc["predicted"]) >= {"tg_tok_s", "pp_tok_s", "tg_bound_tok_s"}
    assert 0 < doc["predicted"]["tg_tok_s"] < doc["predicted"]["tg_bound_tok_s"]
    cuda0 = next(d for d in doc["memory"]["devices"] if d["name"] == "CUDA0")
    assert cuda0["total_bytes"] + doc["budget"]["buffer_bytes"] <= doc["budget"]["vram_free_bytes"]
    command = doc["command"]
    # runs as printed: llama-server fetches the planned file from its repo itself, with the card's sampling preset
    assert command[:3] == ["llama-server", "--hf-repo", f"{plan['repo']}:{plan['quant']}"]
    assert command[-14:] == ["--fit", "off", "--jinja", "--no-mmproj", *load_card(plan["model"]).sampling_args()]
    assert command[command.index("--ctx-size") + 1] == str(plan["ctx_size"])
    assert 2 <= len(doc["alternatives"]) <= 4
    assert all(a["why_not"] and "predicted" in a for a in doc["alternatives"])


def test_report_shows_plan_memory_speed_alternatives_and_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["recommend", "--gpu", "rtx-5080", "--quant", "Q4_K_M"]) == 0
    out = capsys.readouterr().out
    for text in ("NVIDIA GeForce RTX 5080", "Plan:", "Q4_K_M", "--n-cpu-moe", "the fewest expert layers in RAM",
                 "Memory (estimate)", "buffer 1.25 GiB kept", "Speed, predicted", "(bound", "Alternatives", "why not",
                 "Command:", "llama-server --hf-repo unsloth/Qwen3.5-35B-A3B-GGUF:Q4_K_M"):
        assert text in out, text


def test_cpu_only_json(capsys: pytest.CaptureFixture[str]) -> None:
    doc = recommend_json(capsys, "--gpu", "none", "--ctx-size", "8192")
    assert doc["budget"]["device"] == "CPU" and doc["budget"]["gpus"] == []
    assert doc["budget"]["ram_available_bytes"] == HOST_RAM and doc["budget"]["buffer_bytes"] == 1 * GiB
    assert doc["plan"]["ctx_size"] == 8192 and doc["plan"]["n_gpu_layers"] == 0
    assert all(d["name"] == "CPU" for d in doc["memory"]["devices"])
    assert doc["memory"]["host"]["total_bytes"] + doc["budget"]["buffer_bytes"] <= HOST_RAM
    assert "--n-gpu-layers" in doc["command"] and doc["command"][doc["command"].index("--n-gpu-layers") + 1] == "0"


def test_no_model_plans_offline_from_the_card(capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*_args: object, **_kwargs: object) -> None:
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    doc = recommend_json(capsys, "--gpu", "rtx-3090")
    assert doc["plan"]["model"] == "qwen3.5-35b-a3b" and doc["plan"]["source"] == "card"
    assert doc["plan"]["repo"] == "unsloth/Qwen3.5-35B-A3B-GGUF"


def test_vram_overrides_the_gpu_memory_and_the_buffer_is_kept(capsys: pytest.CaptureFixture[str]) -> None:
    doc = recommend_json(capsys, "--gpu", "rtx-4090", "--vram", "12G", "--buffer", "2G")
    budget = doc["budget"]
    assert budget["vram_total_bytes"] == budget["vram_free_bytes"] == 12 * GiB
    assert budget["buffer_bytes"] == 2 * GiB
    cuda0 = next(d for d in doc["memory"]["devices"] if d["name"] == "CUDA0")
    assert cuda0["total_bytes"] + 2 * GiB <= 12 * GiB
    assert doc["headroom_bytes"]["CUDA0"] == 12 * GiB - 2 * GiB - cuda0["total_bytes"] >= 0
    assert doc["plan"]["n_cpu_moe"] > 0  # 10 GiB cannot hold a 4-bit 35B-A3B whole
    assert any("--buffer" in r for r in doc["reasons"])


def test_vision_counts_the_projector_on_the_gpu_and_loads_it(capsys: pytest.CaptureFixture[str]) -> None:
    plain = recommend_json(capsys, "--gpu", "rtx-3090", "--quant", "Q4_K_M")
    vision = recommend_json(capsys, "--gpu", "rtx-3090", "--quant", "Q4_K_M", "--vision")
    assert vision["plan"]["vision"] and vision["plan"]["mmproj"] == "mmproj-F16.gguf"
    # -hf fetches and loads the repo's projector by itself; without vision the command says not to
    assert "--no-mmproj" in plain["command"] and "--no-mmproj" not in vision["command"]
    assert not any("mmproj" in a for a in vision["command"])
    cuda0 = next(d for d in vision["memory"]["devices"] if d["name"] == "CUDA0")
    seen = vision["memory"]["vision"]
    assert seen["device"] == "CUDA0" and seen["weights_bytes"] == 899_283_648  # the card's file, no header read
    assert cuda0["vision_bytes"] == seen["weights_bytes"] + seen["compute_bytes"] > 899_283_648 + 200 * MiB
    assert vision["memory"]["vision_bytes"] == cuda0["vision_bytes"] and plain["memory"]["vision_bytes"] == 0
    assert vision["budget"]["reserved_bytes"] == seen["growth_bytes"] > 0 and plain["budget"]["reserved_bytes"] == 0
    assert vision["plan"]["ctx_size"] < plain["plan"]["ctx_size"]
    budget = vision["budget"]
    assert cuda0["total_bytes"] + budget["reserved_bytes"] + budget["buffer_bytes"] <= budget["vram_free_bytes"]


@pytest.mark.parametrize("gpus", ["2xrtx-3090", "rtx-3090,rtx-3060"])
def test_vision_on_several_gpus_counts_the_projector_on_the_first_device_within_every_budget(
        capsys: pytest.CaptureFixture[str], gpus: str) -> None:
    got = recommend_json(capsys, "--gpu", gpus, "--vision")
    command, seen, budget = got["command"], got["memory"]["vision"], got["budget"]
    # llama.cpp puts the projector on --device's first entry (common/arg.cpp:889-893), else on the first GPU
    first = command[command.index("--device") + 1].split(",")[0] if "--device" in command else "CUDA0"
    if gpus == "rtx-3090,rtx-3060":
        assert first == "CUDA1"  # the slower card first, so the 3090 holds the output layer
    assert seen is not None and seen["device"] == first == budget["reserved_on"]
    held = {d["name"]: d for d in got["memory"]["devices"]}
    assert held[first]["vision_bytes"] == seen["weights_bytes"] + seen["compute_bytes"] == got["memory"]["vision_bytes"]
    assert got["memory"]["vision_bytes"] > 899_283_648 and budget["reserved_bytes"] == seen["growth_bytes"] > 0
    assert all(left >= 0 for left in got["headroom_bytes"].values())
    shares = {p["name"]: p for p in got["placement"]}
    for name, share in shares.items():
        assert share["total_bytes"] == held[name]["total_bytes"] <= share["budget_bytes"]
    free = dict((g["name"], g["vram_free_bytes"]) for g in budget["gpus"])
    assert shares[first]["budget_bytes"] == free[first] - budget["buffer_bytes"] - budget["reserved_bytes"]


def test_on_several_gpus_the_reasons_name_expert_layers_in_ram_not_n_cpu_moe(
        capsys: pytest.CaptureFixture[str]) -> None:
    got = recommend_json(capsys, "--gpu", "2xrtx-3060")
    needs = [r for r in got["reasons"] if "would need" in r]
    context = next(r for r in needs if r.startswith("context "))
    assert re.search(r"; \d+ would need experts of \d+ layers in RAM \(--override-tensor\) and predict", context)
    assert not any("--n-cpu-moe" in r for r in got["reasons"]) and "--n-cpu-moe" not in got["command"]


def test_prefer_changes_the_plan_and_the_reason_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    speed = recommend_json(capsys, "--gpu", "rtx-5080", "--prefer", "speed")
    context = recommend_json(capsys, "--gpu", "rtx-5080", "--prefer", "context")
    assert context["plan"]["ctx_size"] == 262_144 > speed["plan"]["ctx_size"]
    assert "--prefer context" in context["reasons"][0] and "--prefer speed" in speed["reasons"][0]
    assert (speed["policy"]["name"], context["policy"]["name"]) == ("speed", "context")
    assert speed["policy"]["rule"] in speed["reasons"][0]


COMMON_CARDS = ("rtx-3060", "rtx-5060-ti", "rtx-5080", "rtx-3090", "rtx-4090")


@pytest.mark.parametrize("gpu", COMMON_CARDS)
def test_default_plans_on_a_64g_host_keep_q4_k_m_and_64k_tokens(capsys: pytest.CaptureFixture[str], gpu: str) -> None:
    doc = recommend_json(capsys, "--gpu", gpu, "--ram", "64G")
    plan, policy = doc["plan"], doc["policy"]
    assert plan["quant"] in ("Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "BF16"), plan["quant"]
    assert plan["ctx_per_slot"] >= 65_536
    assert policy["name"] == "balanced" and doc["wishes"]["prefer"] == "balanced"
    assert policy["quality_floor_met"] and policy["ctx_floor_met"] and doc["warnings"] == []
    assert doc["predicted"]["tg_tok_s"] >= policy["window_tg_tok_s"] - 0.1  # within 10% of the fastest such plan
    assert policy["window_tg_tok_s"] == pytest.approx(0.9 * policy["reference_tg_tok_s"], abs=0.2)
    assert "--prefer balanced keeps Q4_K_M-class quality and 65536 tokens per slot" in doc["reasons"][0]
    assert doc["hardware"]["ram_total_bytes"] == 64 * GiB and doc["hardware"]["host_source"] == "given"


def test_the_report_names_the_policy_and_warns_when_a_floor_is_given_up(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["recommend", "--gpu", "rtx-5080", "--ram", "8G"]) == 0
    out = capsys.readouterr().out
    assert "Policy: balanced" in out
    assert "warning: no Q4_K_M-class quant fits with 65536 tokens of context" in " ".join(out.split())
    doc = recommend_json(capsys, "--gpu", "rtx-5080", "--ram", "8G")
    assert doc["warnings"] and not doc["policy"]["quality_floor_met"] and doc["policy"]["ctx_floor_met"]
    assert doc["plan"]["ctx_per_slot"] >= 65_536  # context kept, quality given up to fit


def test_a_catalog_gpu_without_ram_plans_on_an_assumed_desktop_and_says_so(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    small = hardware.HostInfo(16 * GiB, 12 * GiB, 2, 2, "Small CPU")  # this machine: too small for a 4090 box
    monkeypatch.setattr(machine, "read_host_noted", lambda: (small, ()))
    doc = recommend_json(capsys, "--gpu", "rtx-4090")
    hw = doc["hardware"]
    assert hw["host_source"] == "assumed"
    assert (hw["ram_total_bytes"], hw["ram_available_bytes"], hw["cpu_physical_cores"]) == (64 * GiB, 60 * GiB, 8)
    assert doc["budget"]["ram_available_bytes"] == 60 * GiB
    assert any(n.startswith("host assumed: 64.00 GiB of RAM") and "not this machine (16.00 GiB" in n
               for n in hw["notes"])
    assert main(["recommend", "--gpu", "rtx-4090"]) == 0
    assert "host assumed:" in capsys.readouterr().out
    # this machine's GPUs (none here) stay on this machine's host
    here = machine.hardware_for("none")
    assert (here.host_source, here.ram_total_bytes) == ("detected", 16 * GiB)


def test_ram_bandwidth_and_cores_describe_the_host(capsys: pytest.CaptureFixture[str]) -> None:
    doc = recommend_json(capsys, "--gpu", "none", "--ram", "32G", "--ram-bandwidth", "80", "--cpu-cores", "4",
                         "--ctx-size", "8192")
    hw = doc["hardware"]
    assert (hw["ram_total_bytes"], hw["ram_available_bytes"]) == (32 * GiB, 28 * GiB)
    assert (hw["ram_bandwidth_bytes_s"], hw["cpu_physical_cores"], hw["host_source"]) == (80_000_000_000, 4, "given")
    assert doc["budget"]["ram_available_bytes"] == 28 * GiB
    faster = recommend_json(capsys, "--gpu", "none", "--ram", "32G", "--ram-bandwidth", "160", "--cpu-cores", "4",
                            "--ctx-size", "8192")
    assert faster["predicted"]["tg_tok_s"] > doc["predicted"]["tg_tok_s"]  # the speed model reads the bandwidth


def test_nothing_fits_is_one_line_on_stderr_and_a_failing_exit() -> None:
    proc = run_cli("--gpu", "none", "--buffer", "4096G")
    assert proc.returncode != 0
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tuner: error: nothing fits")


def test_bad_preference_is_a_user_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["recommend", "--gpu", "rtx-3090", "--prefer", "fast"]) != 0
    assert "--prefer must be one of balanced, speed, quality, context" in capsys.readouterr().err


def test_planner_options_become_wishes() -> None:
    w = wishes_from_options(ctx_size=0, parallel=2, prefer="Quality", vision=True, buffer="1.5G", quant="Q4_K_M",
                            cache_type="Q8_0", allow_yarn=False)
    assert (w.ctx_size, w.parallel, w.prefer, w.vision, w.buffer_bytes, w.quant, w.cache_type) == \
        (None, 2, "quality", True, int(1.5 * GiB), "Q4_K_M", "q8_0")


def test_planner_option_help_states_the_planner_defaults() -> None:
    from typing import get_args

    from tuner.cli import _options as o
    from tuner.planner import DEFAULT_RAM_BUFFER_BYTES, DEFAULT_VRAM_BUFFER_BYTES, WORKING_CTX
    from tuner.policy import CTX_FLOOR

    buffer_help = get_args(o.BufferOpt)[1].help
    assert f"default {DEFAULT_VRAM_BUFFER_BYTES / GiB:g}G" in buffer_help
    assert f"RAM when CPU only: {DEFAULT_RAM_BUFFER_BYTES / GiB:g}G" in buffer_help
    ctx_help = get_args(o.PlanCtxOpt)[1].help
    assert f"at least {CTX_FLOOR} if it can" in ctx_help and f"{WORKING_CTX} with --prefer speed" in ctx_help


@pytest.mark.parametrize("gpus", ["rtx-3090,rtx-3060", "rtx-4090,rtx-4060-ti"])
def test_mixed_gpus_json_has_a_tensor_split_and_every_device_within_its_budget(gpus: str) -> None:
    proc = run_cli("--gpu", gpus, "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    split = doc["plan"]["tensor_split"]
    assert len(split) == 2 and all(n == int(n) >= 0 for n in split)
    command = doc["command"]
    assert command[command.index("--tensor-split") + 1] == ",".join(str(int(n)) for n in split)
    assert doc["env"] == {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    budget = doc["budget"]
    assert [d["device"] for d in budget["devices"]] == ["CUDA0", "CUDA1"]
    totals = {d["name"]: d["total_bytes"] for d in doc["memory"]["devices"]}
    rows = {row["name"]: row for row in doc["placement"]}  # in the split's order (--device's, when given)
    assert [row["slots"] for row in doc["placement"]] == split
    for device in budget["devices"]:
        row = rows[device["device"]]
        assert totals[device["device"]] + device["buffer_bytes"] <= device["vram_free_bytes"]
        assert row["total_bytes"] <= row["budget_bytes"]
        assert doc["headroom_bytes"][device["device"]] >= 0
    # the faster card (CUDA0) holds the output layer: --device puts it last when the slower one holds layers too
    assert rows["CUDA0"]["output_layer"]
    if split[0] and split[1]:
        assert command[command.index("--device") + 1] == "CUDA1,CUDA0"


def test_mixed_gpus_report_names_each_devices_layers_and_spills(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["recommend", "--gpu", "rtx-3090,rtx-3060", "--quant", "Q8_0", "--ctx-size", "65536"]) == 0
    out = capsys.readouterr().out
    assert "--tensor-split" in out and "--override-tensor" in out and "CUDA_DEVICE_ORDER=PCI_BUS_ID" in out
    assert "CUDA0 (" in out and "CUDA1 (" in out and "expert tensors in RAM" in out


def test_the_default_plan_is_sized_for_the_file_it_names(capsys: pytest.CaptureFixture[str]) -> None:
    """Offline, on the default card: the weights in ``memory`` are the tensors of the file in ``plan.file`` (the
    repo's own mix, as the card records it), the buffer is kept; for unsloth's Q4_K_M, whose size the card lists,
    within 0.5% of that size."""
    from tuner.cards import card_layout

    for args in ((), ("--quant", "Q4_K_M")):
        doc = recommend_json(capsys, "--gpu", "rtx-4090", *args)
        plan, memory = doc["plan"], doc["memory"]
        card = load_card(plan["model"])
        named = card_layout(card, plan["quant"], repo=plan["repo"])
        assert plan["file"] == card.repo(plan["repo"]).files_for(plan["quant"], named.file_bytes)[0]
        assert memory["weights_bytes"] == sum(d["weights_bytes"] for d in memory["devices"]) == named.weights_bytes
        assert plan["file_bytes"] == named.file_bytes
        assert all(left >= 0 for left in doc["headroom_bytes"].values())  # the 1.25 GiB buffer is still kept
        assert doc["budget"]["buffer_bytes"] == 1280 * MiB
    assert plan["quant"] == "Q4_K_M" and plan["repo"] == "unsloth/Qwen3.5-35B-A3B-GGUF"
    known = next(k.file_bytes for k in card.known_sizes if k.repo == plan["repo"] and k.quant == "Q4_K_M")
    assert known == 22_016_023_168
    assert abs((memory["weights_bytes"] + card.header_bytes) / known - 1) <= 0.005


def test_report_at_80_columns_fits_them_and_its_reasons_quote_the_alternatives_table(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The narrow layout: no line over 80 columns (the command in continued lines that paste as one), and every
    figure a reason quotes about an alternative is the one the alternatives table shows for it."""
    from tuner.cli._output import console

    monkeypatch.setattr(console, "width", 80)
    assert main(["recommend", "--gpu", "rtx-5080", "--prefer", "speed"]) == 0  # its bullets quote alternatives
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 80, max(lines, key=len)
    flat = " ".join(out.split())
    generation = re.search(r"Speed, predicted \(roofline\): generation (\d+) tok/s", flat)
    better = re.search(r"(\S+), the next better quant, would need --n-cpu-moe (\d+) here: (\d+) vs (\d+) tok/s", flat)
    assert generation and better, flat
    quant, n_cpu_moe, its_tg, plan_tg = better.groups()
    row = re.search(rf"\d\. {re.escape(quant)} · KV \S+ · --n-cpu-moe (\d+) · context \d+ · ubatch \d+ · "
                    r"([\d,]+) tok/s generation", flat)
    assert row, flat
    assert (row.group(1), row.group(2)) == (n_cpu_moe, its_tg) and plan_tg == generation.group(1)
    kv = re.search(r"q8_0 KV would be only \S+ in speed \((\d+) vs (\d+) tok/s", flat)
    kv_row = re.search(r"1\. \S+ · KV q8_0 · --n-cpu-moe \d+ · context \d+ · ubatch \d+ · ([\d,]+) tok/s", flat)
    assert kv and kv_row and kv.group(1) == kv_row.group(1) and kv.group(2) == generation.group(1)
    # the command, continued with backslashes, is the JSON's command
    start = lines.index("Command:") + 1
    pasted = []
    for line in lines[start:]:
        pasted.append(line.rstrip(" \\").strip())
        if not line.endswith("\\"):
            break
    assert shlex.split(" ".join(pasted)) == recommend_json(capsys, "--gpu", "rtx-5080", "--prefer", "speed")["command"]


def test_a_narrow_terminal_gets_the_narrow_layout_from_the_command_line() -> None:
    proc = run_cli("--gpu", "rtx-4090", env={"COLUMNS": "80"})
    assert proc.returncode == 0, proc.stderr
    assert max(len(line) for line in proc.stdout.splitlines()) <= 80
    assert "┃" not in proc.stdout and "Alternatives" in proc.stdout  # no wide tables
    wide = run_cli("--gpu", "rtx-4090", env={"COLUMNS": "160"})
    assert "┃ why not" in wide.stdout


def test_alternatives_name_ot_spills_on_several_devices_not_n_cpu_moe() -> None:
    from tuner.cli.recommend import _experts_setting
    from tuner.placement import NO_PIPELINE_RULE

    rules = [r"blk\.(28|36)\.ffn_(down)_(ch|)exps=CPU", r"blk\.(3)\.ffn_(up|down|gate|gate_up)_(ch|)exps=CPU"]
    assert _experts_setting({"override_tensor": rules, "n_cpu_moe": 0, "tensor_split": [30, 31]}) == \
        "-ot: experts of 3 layers in RAM"
    assert _experts_setting({"override_tensor": [NO_PIPELINE_RULE], "n_cpu_moe": 0, "tensor_split": [30, 31]}) == \
        "-ot: none in RAM"
    assert _experts_setting({"override_tensor": [], "n_cpu_moe": 4, "tensor_split": []}) == "--n-cpu-moe 4"
