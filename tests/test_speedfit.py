"""The speed model's coefficients against the published measurements they are fitted on (tuner.speedfit)."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from tuner import speed, speedfit
from tuner.errors import TunerError

DATA = Path(__file__).parent / "data" / "speed-measurements.yaml"

# |predicted / measured - 1| of the fitted records, per (class, metric): (records, median, worst). The table of the
# speed model's report; the CPU-only rows rest on one record that sets two coefficients, so they check nothing.
REPORTED = {
    ("moe_gpu", "tg"): (19, 0.081, 0.164),
    ("moe_gpu", "pp"): (18, 0.056, 0.159),
    ("dense_gpu", "tg"): (9, 0.039, 0.084),
    ("dense_gpu", "pp"): (5, 0.044, 0.080),
    ("experts_in_ram", "tg"): (4, 0.109, 0.154),
    ("experts_in_ram", "pp"): (2, 0.214, 0.260),
    ("cpu_only", "tg"): (1, 0.000, 0.000),
    ("cpu_only", "pp"): (1, 0.000, 0.000),
}


@pytest.fixture(scope="module")
def records() -> list[speedfit.SpeedRecord]:
    return speedfit.load_records(DATA)


def test_the_data_file_is_the_one_the_module_finds_in_a_checkout() -> None:
    assert speedfit.default_data_path() == DATA.resolve()


def test_shipped_coefficients_are_the_fit_of_the_data_file(records: list[speedfit.SpeedRecord]) -> None:
    fitted = speedfit.fit_coefficients(records)
    shipped = speedfit.shipped_coefficients()
    assert set(fitted) == set(shipped)
    for name, value in fitted.items():
        assert shipped[name] == pytest.approx(value, rel=1e-3), f"{name}: shipped {shipped[name]}, fit {value:.4g}"


def test_residuals_per_class_are_those_reported(records: list[speedfit.SpeedRecord]) -> None:
    table = speedfit.summary(speedfit.residuals(records))
    assert set(table) == set(REPORTED)
    for key, (n, median, worst) in REPORTED.items():
        got = table[key]
        assert (got["n"], round(got["median"], 3), round(got["worst"], 3)) == (n, median, worst), key


def test_fitted_records_are_mainline_llama_cpp_without_speculative_decoding() -> None:
    raw = yaml.safe_load(DATA.read_text())
    fitted = [r for r in raw if "fit" in (r["tuner"]["use_tg"], r["tuner"]["use_pp"])]
    assert len(fitted) == 36  # 33 with a generation speed, 25 with a prompt speed
    for r in fitted:
        assert "ik_llama" not in r["engine"] and "fork" not in r["engine"] and not r["mtp"], r["id"]
    forks = [r for r in raw if "ik_llama" in r["engine"] or r["mtp"]]
    assert forks and all("fit" not in (r["tuner"]["use_tg"], r["tuner"]["use_pp"]) for r in forks)


def test_every_record_keeps_its_source_and_says_why_it_is_not_fitted(records: list[speedfit.SpeedRecord]) -> None:
    raw = yaml.safe_load(DATA.read_text())
    assert [r["id"] for r in raw] == list(range(97))
    assert all(r["source"] for r in raw)
    for rec in records:
        if "fit" not in (rec.use_tg, rec.use_pp):
            assert rec.note, rec.id


def test_each_coefficient_rests_on_records_and_few_on_one(records: list[speedfit.SpeedRecord]) -> None:
    counts = speedfit.records_per_coefficient(records)
    assert set(counts) == set(speedfit.shipped_coefficients())
    assert sorted(n for n, c in counts.items() if c == 1) == ["CPU_LAYER_SECONDS", "CPU_PP_FLOPS_PER_CORE"]
    assert counts["GPU_LAYER_SECONDS.ada"] >= 20 and counts["GPU_TG_BANDWIDTH_EFFICIENCY"] >= 30


def test_a_coefficient_the_data_cannot_support_is_an_error_not_a_negative_number(
        records: list[speedfit.SpeedRecord]) -> None:
    # the one CPU-only record, made ten times faster than its bytes at RAM bandwidth allow, asks for a negative
    # per-layer CPU cost
    broken = [replace(r, tg_tok_s=(r.tg_tok_s or 0) * 10) if r.cls == "cpu_only" and r.use_tg == "fit" else r
              for r in records]
    with pytest.raises(TunerError, match="CPU_LAYER_SECONDS"):
        speedfit.fit_coefficients(broken)


def test_a_bad_tuner_block_is_one_line_error(tmp_path: Path) -> None:
    raw = yaml.safe_load(DATA.read_text())[:1]
    raw[0]["tuner"]["use_tg"] = "maybe"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(TunerError, match="record 0: use_tg must be one of fit, apart, excluded"):
        speedfit.load_records(path)


@pytest.mark.parametrize(("record_id", "metric"), [(9, "tg"), (15, "pp"), (84, "tg"), (41, "pp")])
def test_tuner_estimate_reports_the_prediction_the_residuals_use(records: list[speedfit.SpeedRecord], record_id: int,
                                                                 metric: str) -> None:
    """One record per class through ``tuner estimate … --depth D --json``, as a user would reproduce it."""
    rec = next(r for r in records if r.id == record_id)
    argv = speedfit.estimate_argv(rec, metric)
    done = subprocess.run([sys.executable, "-m", "tuner", *argv], capture_output=True, text=True, check=True)
    predicted = json.loads(done.stdout)["predicted"]
    assert predicted["depth_tokens"] == rec.depth(metric)
    library = speedfit.record_prediction(rec, metric)
    assert predicted[f"{metric}_tok_s"] == pytest.approx(getattr(library, f"{metric}_tok_s"), abs=0.01)
    assert predicted["tg_bound_tok_s"] == pytest.approx(library.tg_bound_tok_s, abs=0.01)


def test_the_estimate_json_predicts_at_the_planning_depth_by_default() -> None:
    done = subprocess.run([sys.executable, "-m", "tuner", "estimate", "qwen3.5-35b-a3b:Q4_K_M", "--gpu", "rtx-4090",
                           "-c", "32768", "--json"], capture_output=True, text=True, check=True)
    predicted = json.loads(done.stdout)["predicted"]
    assert predicted["depth_tokens"] == speed.PLANNING_DEPTH_TOKENS
    assert set(predicted) == {"depth_tokens", "tg_tok_s", "pp_tok_s", "tg_bound_tok_s"}
    assert 0 < predicted["tg_tok_s"] < predicted["tg_bound_tok_s"]
