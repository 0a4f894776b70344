"""``tuner bench`` and ``tuner profile`` end to end: the real llama-server on the CPU, results on disk, the profile,
and ``tuner recommend`` showing the measured figure."""

from __future__ import annotations

import io
import json
import shlex
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest

from tuner.cli import main
from tuner.hardware import hardware_for
from tuner.planner import Wishes, plan_for
from tuner.synth import SynthSpec, write_synthetic_gguf


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("clibench") / "cli-qwen35moe.gguf"
    write_synthetic_gguf(path, SynthSpec(head_dim=32, name="cli-qwen35moe"))  # q8_0 blocks divide the head size
    return path


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TUNER_CONFIG_DIR", str(tmp_path / "config"))
    return tmp_path / "config"


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    assert main([*argv, "--json"]) == 0, capsys.readouterr().err
    return dict(json.loads(capsys.readouterr().out))


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and zlib.crc32(data[12:16 + length]) == struct.unpack(">I", data[16 + length:20 + length])[0]
    width, height = struct.unpack(">II", data[16:24])
    return width, height


@pytest.mark.server
def test_bench_two_kv_sets_saves_results_learns_them_and_recommend_shows_the_measured_speed(
        llama_build, model: Path, config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cpu = hardware_for(None)
    plan = plan_for(str(model), cpu, Wishes(ctx_size=2048, cache_type="q8_0")).plan
    q8 = shlex.join([*plan.flags.to_args(), "--fit", "off"])
    f16 = shlex.join([*plan.flags.with_(cache_type_k="f16", cache_type_v="f16").to_args(), "--fit", "off"])
    out = run_json(capsys, "bench", str(model), "--set", f"f16={f16}", "--set", f"q8={q8}", "--depths", "0,512",
                   "--repeat", "3", "--prompt-tokens", "32", "--gen-tokens", "8", "--out", str(tmp_path / "res"))

    assert [r["name"] for r in out["results"]] == ["f16", "q8"]
    for r in out["results"]:
        assert len(r["pp_samples"]) == len(r["tg_samples"]) == 3
        assert [d["depth"] for d in r["by_depth"]] == [0, 512]
        assert r["tg_tok_s"] == r["by_depth"][1]["tg_tok_s"]["median"] > 0
    saved = Path(out["saved_to"])
    assert saved.parent.parent.parent == tmp_path / "res" and saved.parent.parent.name == "cli-qwen35moe"
    doc = json.loads(saved.read_text())
    assert [(name, depth) for _, name, depth, _ in doc["order"]] == [
        (n, d) for d in (0, 512) for r in range(3) for n in (("f16", "q8") if r % 2 == 0 else ("q8", "f16"))], \
        "A B, B A, A B at each depth"
    comp = doc["verdict"]["comparisons"][0]
    assert (comp["set"], comp["reference"]) == ("q8", "f16") and [r["depth"] for r in comp["by_depth"]] == [0, 512]
    assert all(r["tg"]["n"] == 3 and r["predicted"]["tg"] > 0 for r in comp["by_depth"])
    assert doc["llama_cpp"]["commit"] and doc["hardware"]["cpu_model"]
    assert doc["results"][1]["commands"][0][-len(plan.flags.to_args()) - 2:] == [*plan.flags.to_args(), "--fit",
                                                                                 "off"]
    assert len(doc["results"][0]["samples"]) == 6 and doc["model"]["identity"]["header_sha256"]
    assert png_size(Path(out["plot"])) == (1200, 560) and Path(out["plot"]).parent == saved.parent

    assert out["profile"]["measurements"] == 4 and Path(out["profile"]["path"]).parent == config
    shown = run_json(capsys, "profile", "show")
    (entry,) = shown["entries"]
    assert entry["measurements"] == 4 and entry["model"]["name"] == model.name
    assert entry["best"]["depth"] == 512 and entry["tg_efficiency_median"] > 0

    q8_at_512 = next(r for r in out["results"] if r["name"] == "q8")["by_depth"][1]
    rec = run_json(capsys, "recommend", str(model), "--ctx-size", "2048", "--cache-type", "q8_0")
    assert rec["predicted"]["source"] == "measured"
    assert rec["predicted"]["tg_tok_s"] == pytest.approx(q8_at_512["tg_tok_s"]["median"], abs=0.05)
    assert rec["predicted"]["pp_tok_s"] == pytest.approx(q8_at_512["pp_tok_s"]["median"], abs=0.05)
    assert main(["recommend", str(model), "--ctx-size", "2048", "--cache-type", "q8_0"]) == 0
    assert "Speed, measured" in capsys.readouterr().out


@pytest.mark.server
def test_bench_without_sets_compares_the_plan_with_llama_server_defaults(
        llama_build, model: Path, config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", str(model), "--ctx-size", "1024", "--depths", "0,256", "--repeat", "1",
                 "--prompt-tokens", "16", "--gen-tokens", "4", "--out", str(tmp_path), "--no-profile"]) == 0
    captured = capsys.readouterr()
    assert "plan: llama-server --ctx-size 1024" in captured.out
    assert "defaults: llama-server --fit on" in captured.out
    assert "tok/s: median (min–max)" in captured.out
    assert not (config / "profiles.yaml").exists()
    (saved,) = tmp_path.glob("*/*/*.json")
    doc = json.loads(saved.read_text())
    assert [r["name"] for r in doc["results"]] == ["defaults", "plan"]
    assert doc["verdict"]["reference_set"] == "defaults"
    assert "plan vs defaults: tg ×" in captured.out


@pytest.mark.server
def test_bench_tune_reports_launches_grid_and_ratios(llama_build, model: Path, config: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = run_json(capsys, "bench", str(model), "--tune", "--dims", "kv,threads", "--ctx-size", "1024",
                   "--repeat", "2", "--prompt-tokens", "16", "--gen-tokens", "4", "--out", str(tmp_path))
    tune = out["tune"]
    values = {d["name"]: d["values"] for d in tune["dimensions"]}
    assert set(values) <= {"kv", "threads"} and sorted(values["kv"]) == ["f16", "q8_0"]
    assert tune["grid_size"] == len(values["kv"]) * len(values.get("threads", [None]))
    # defaults, the plan, and each other value of each dimension at most once (the machine's cores set threads')
    assert tune["launches"] == out["launches"] <= 2 + sum(len(v) - 1 for v in values.values())
    assert tune["depth"] == 1024 - (16 + 4 + 16)
    saved = json.loads(Path(out["saved_to"]).read_text())
    # the search at the depth the plan serves; the verdict there and at each shallower --depths depth (0 here)
    assert saved["config"]["depths"] == [0, tune["depth"]], "the file says the depths that were measured"
    assert {s["depth"] for r in saved["results"] for s in r["samples"]} == {0, tune["depth"]}
    assert out["verdict"]["ratio_to_defaults"]["tg"] > 0 and out["verdict"]["ratio_to_plan"] is not None
    vs_defaults = out["verdict"]["comparisons"][0]
    assert vs_defaults["reference"] == "defaults" and [r["depth"] for r in vs_defaults["by_depth"]] == [
        0, tune["depth"]]
    assert out["profile"]["measurements"] >= 2


def test_bench_refuses_a_set_that_does_not_fit_before_building_or_launching(
        model: Path, config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["bench", str(model), "--set", "big=-c 4096 -np 1", "--buffer", "100000G", "--out", str(tmp_path)])
    assert code == 1
    err = capsys.readouterr().err
    assert err.startswith("tuner: error: set 'big' does not fit: RAM is") and err.count("\n") == 1
    assert not list(tmp_path.glob("**/*.json"))


def test_bench_rejects_tune_with_sets_and_bad_objectives(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "x.gguf", "--tune", "--set", "a=-c 1024"]) == 1
    assert "--tune searches around the plan" in capsys.readouterr().err
    assert main(["bench", "x.gguf", "--objective", "fast"]) == 1
    assert "--objective must be one of" in capsys.readouterr().err
    assert main(["bench", "x.gguf", "--set", "a=-c 1024 -np 1", "--concurrency", "2"]) == 1
    assert "set 'a' has 1 slot(s); --concurrency 2 needs -np 2" in capsys.readouterr().err
    assert main(["bench", "x.gguf", "--gpu", "rtx-4090"]) == 1
    assert "measures this machine" in capsys.readouterr().err


def test_profile_export_and_reset(config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_json(capsys, "profile", "show")["entries"] == []
    assert main(["profile", "export", str(tmp_path / "p.yaml")]) == 0
    assert (tmp_path / "p.yaml").read_text().startswith("format: 2")
    assert main(["profile", "reset"]) == 1, "not a terminal and no --yes: refuse"
    assert "add --yes" in capsys.readouterr().err
    config.mkdir(parents=True, exist_ok=True)
    (config / "profiles.yaml").write_text("format: 1\nentries: []\n")
    assert main(["profile", "reset", "--yes"]) == 0
    assert not (config / "profiles.yaml").exists()


def test_without_matplotlib_bench_says_in_one_line_how_to_get_the_chart() -> None:
    from rich.console import Console

    from tuner.bench.plot import PLOT_INSTALL
    from tuner.cli.bench import render_bench

    row = {"name": "a", "flags": ["-c", "1024"], "by_depth": [
        {"depth": 0, "pp_tok_s": {"median": 10.0, "min": 9.0, "max": 11.0, "n": 3},
         "tg_tok_s": {"median": 2.0, "min": 1.5, "max": 2.5, "n": 3}}]}
    console = Console(record=True, width=200)
    render_bench(console, {"results": [row], "saved_to": "/r/x.json", "plot": None, "notes": [], "verdict": {},
                           "plot_problem": f"the chart needs matplotlib: {PLOT_INSTALL}"})
    text = console.export_text()
    (line,) = [t for t in text.splitlines() if t.startswith("chart:")]
    assert line == "chart:   not drawn: the chart needs matplotlib: pip install 'tuner[plot]'"
    assert "results: /r/x.json" in text


def _trial_rows(tune: dict[str, Any]) -> dict[str, list[str]]:
    """The ``--tune`` trials table as rendered: configuration → its cells."""
    from rich.console import Console

    from tuner.cli.bench import render_bench

    row = {"name": "plan", "flags": ["-c", "1024"], "by_depth": [
        {"depth": 0, "pp_tok_s": {"median": 10.0, "min": 9.0, "max": 11.0, "n": 1},
         "tg_tok_s": {"median": 2.0, "min": 1.5, "max": 2.5, "n": 1}}]}
    console = Console(record=True, width=200, file=io.StringIO())
    render_bench(console, {"results": [row], "saved_to": "/r/x.json", "plot": None, "notes": [], "verdict": {},
                           "plot_problem": "none", "tune": tune})
    text = console.export_text()
    table = text[text.index("--tune at depth"):].splitlines()
    cells = [[c.strip() for c in line.strip()[1:-1].split(line[0])] for line in table if line.startswith(("│", "┃"))]
    return {c[2]: c for c in cells}


def test_the_tune_report_shows_the_acceptance_rate_of_the_trials_that_drafted() -> None:
    trial = {"round": 0, "dimension": "mtp", "fits": True, "reason": "", "dropped_after": None, "pp_tok_s": 10.0,
             "tg_tok_s": 2.0, "n_samples": 2}
    rows = _trial_rows({"depth": 988, "launches": 3, "grid_size": 2, "trials": [
        {**trial, "name": "plan", "draft_acceptance": None},
        {**trial, "name": "mtp", "draft_acceptance": {"drafted": 16, "accepted": 9, "rate": 0.5625}}]})
    assert rows["configuration"][-1] == "draft accepted"
    assert rows["mtp"][-1] == "56.2% (9/16)" and rows["plan"][-1] == "-"
    # a results file written before trials kept the counts: no column
    old = _trial_rows({"depth": 988, "launches": 2, "grid_size": 2, "trials": [{**trial, "name": "plan"}]})
    assert old["configuration"][-1] == "note" and len(old["plan"]) == 7
