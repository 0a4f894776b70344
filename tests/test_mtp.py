"""The MTP head: found inside the GGUF or as an ``mtp-*.gguf`` sidecar (a folder, a loopback Hub repo), sized in the
estimate against llama-server's own log, drafted with only where the trunk is all on the GPU and the step model
(:mod:`tuner.mtp`) says it pays, and measured on and off by ``tuner bench`` with the server's acceptance counts."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from hubserver import FakeHub

from tuner import remote
from tuner.cards import card_layout, load_card
from tuner.cli import main
from tuner.errors import TunerError
from tuner.estimate import ServerFlags, estimate_memory
from tuner.flags import SPEC_MTP
from tuner.hardware import hardware_for
from tuner.layout import TensorClass
from tuner.local import dir_candidates, file_candidate
from tuner.models import local_layout
from tuner.mtp import (
    VERIFY_LAYER_OVERHEAD,
    distinct_experts,
    drafting_blocked,
    expected_tokens,
    fit_verify_layer_overhead,
    step_cost,
)
from tuner.planner import Wishes, plan_for, recommend
from tuner.quant_files import group_gguf_files
from tuner.remote import hub_candidates, hub_quant_labels
from tuner.speed import predict_on
from tuner.synth import SynthSpec, qwen35_35b_a3b_spec, write_mtp_sidecar, write_synthetic_gguf
from tuner.units import MiB

REPO = "acme/Head-A1B-GGUF"
HEAD_SPEC = SynthSpec(name="tuner-head", mtp=True)


def _pair(folder: Path, spec: SynthSpec, stem: str = "Head-A1B", quant: str = "F16") -> tuple[Path, Path]:
    """A model converted without its head (``--no-mtp``) and the head as a sidecar, as llama.cpp's converter writes
    them: ``<stem>-<quant>.gguf`` and ``mtp-<stem>-<quant>.gguf``."""
    model = write_synthetic_gguf(folder / f"{stem}-{quant}.gguf", replace(spec, mtp=False))[0]
    sidecar = write_mtp_sidecar(folder / f"mtp-{stem}-{quant}.gguf", spec)
    return model, sidecar


# ------------------------------------------------------------------------------------------------ found


def test_grouping_sets_mtp_and_other_draft_models_apart_and_picks_the_nearest_quant() -> None:
    grouped = group_gguf_files([("M-Q4_K_M.gguf", 10), ("M-Q8_0.gguf", 20), ("mtp-M-Q8_0.gguf", 2),
                                ("mtp-M-Q4_0.gguf", 1), ("mtp-M-BF16.gguf", 4), ("dflash-M-Q8_0.gguf", 3),
                                ("eagle3-M.gguf", 3), ("MTP/mtp-M-Q4_K_M.gguf", 1), ("mmproj-F16.gguf", 5)])
    assert [g.label for g in grouped.quants] == ["Q4_K_M", "Q8_0"]
    q4, q8 = grouped.quants
    assert grouped.pick_mtp(q8) == ("mtp-M-Q8_0.gguf", 2)  # a -Q8_0. name first
    assert grouped.pick_mtp(q4) == ("mtp-M-Q4_0.gguf", 1)  # in the model's folder, 4 bits: before MTP/'s exact one
    assert group_gguf_files([("M-Q4_K_M.gguf", 10)]).pick_mtp(q4) is None
    # llama.cpp matches "mtp-" case-sensitively: an upper-case name is neither a sidecar nor a quant to offer
    assert group_gguf_files([("M-MTP-BF16.gguf", 4)]).mtp == ()


def test_a_sidecar_beside_a_local_model_is_found_sized_and_checked(tmp_path: Path) -> None:
    model, sidecar = _pair(tmp_path, HEAD_SPEC)
    cand = file_candidate(str(model))
    assert not cand.layout.has_mtp and cand.has_mtp
    assert cand.mtp_sidecar == str(sidecar) and cand.mtp_draft is not None
    [from_dir] = dir_candidates(tmp_path)
    assert from_dir.mtp_sidecar == str(sidecar) and from_dir.quant == "F16"
    draft = cand.mtp_draft
    assert {t.cls for t in draft.tensors} == {TensorClass.TOKEN_EMBD, TensorClass.NORM, TensorClass.OUTPUT,
                                              TensorClass.MTP}
    flags = ServerFlags(ctx_size=4096, parallel=1)
    plain = estimate_memory(cand.layout, flags)
    drafting = estimate_memory(cand.layout, flags.with_(spec_type=SPEC_MTP), draft=draft)
    sidecar_bytes = sum(t.nbytes for t in draft.tensors)
    assert drafting.weights_bytes == plain.weights_bytes + sidecar_bytes  # a second model: token_embd again
    assert drafting.mtp_draft == str(sidecar) and drafting.mtp_bytes > sidecar_bytes
    with pytest.raises(TunerError, match="or its MTP sidecar"):
        estimate_memory(cand.layout, flags.with_(spec_type=SPEC_MTP))
    other = write_mtp_sidecar(tmp_path / "x" / "mtp-other.gguf", replace(HEAD_SPEC, n_embd=128, head_dim=32))
    with pytest.raises(TunerError, match="MTP head of another model"):
        estimate_memory(cand.layout, flags.with_(spec_type=SPEC_MTP), draft=local_layout(other))
    with pytest.raises(TunerError, match="is not an MTP sidecar"):
        estimate_memory(cand.layout, flags.with_(spec_type=SPEC_MTP), draft=cand.layout)


def test_the_sidecar_goes_to_the_gpu_but_its_token_embedding_stays_on_the_cpu(tmp_path: Path) -> None:
    cand = file_candidate(str(_pair(tmp_path, HEAD_SPEC)[0]))
    assert cand.mtp_draft is not None
    flags = ServerFlags(ctx_size=4096, parallel=1, n_cpu_moe=4, spec_type=SPEC_MTP)
    est = estimate_memory(cand.layout, flags, ["CUDA0"], draft=cand.mtp_draft)
    plain = estimate_memory(cand.layout, flags.with_(spec_type=None), ["CUDA0"])
    embd = sum(t.nbytes for t in cand.mtp_draft.tensors if t.cls is TensorClass.TOKEN_EMBD)
    rest = sum(t.nbytes for t in cand.mtp_draft.tensors) - embd
    assert est.host.weights_bytes == plain.host.weights_bytes + embd  # --n-cpu-moe does not apply to the draft
    assert est.device("CUDA0").weights_bytes == plain.device("CUDA0").weights_bytes + rest


# ------------------------------------------------------------------------------------------------ loopback Hub


@pytest.fixture(scope="module")
def head_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeHub]:
    root = tmp_path_factory.mktemp("hub")
    d = root / REPO
    _pair(d, HEAD_SPEC, quant="Q8_0")
    write_synthetic_gguf(d / "Head-A1B-F16.gguf", replace(HEAD_SPEC, mtp=False))
    (d / "dflash-Head-A1B-Q8_0.gguf").write_bytes((d / "mtp-Head-A1B-Q8_0.gguf").read_bytes())
    with FakeHub(root) as hub:
        yield hub


@pytest.fixture
def hub_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, head_hub: FakeHub) -> FakeHub:
    monkeypatch.setenv("HF_ENDPOINT", head_hub.endpoint)
    monkeypatch.setenv("TUNER_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(remote, "hub_token", lambda: None)
    return head_hub


def test_a_sidecar_in_a_hub_repo_is_found_and_sized_not_offered_as_a_quant(hub_env: FakeHub) -> None:
    assert sorted(hub_quant_labels(REPO)) == ["F16", "Q8_0"]
    cands = {c.quant: c for c in hub_candidates(REPO)}
    assert set(cands) == {"F16", "Q8_0"}
    for c in cands.values():  # one sidecar: both quants draft with it
        assert c.mtp_sidecar == "mtp-Head-A1B-Q8_0.gguf" and c.mtp_draft is not None
    local = local_layout(Path(hub_env.root) / REPO / "mtp-Head-A1B-Q8_0.gguf")
    assert cands["Q8_0"].mtp_draft.tensors == local.tensors
    flags = ServerFlags(ctx_size=2048, parallel=1, spec_type=SPEC_MTP)
    est = estimate_memory(cands["Q8_0"].layout, flags, draft=cands["Q8_0"].mtp_draft)
    plain = estimate_memory(cands["Q8_0"].layout, flags.with_(spec_type=None))
    assert est.weights_bytes - plain.weights_bytes == sum(t.nbytes for t in local.tensors)
    hub_env.reset_counters()
    hub_candidates(REPO)  # the sidecar's header is cached with the others: no file read the second time
    assert not [r for r in hub_env.requests if "/resolve/" in r.path or "/cdn-lfs/" in r.path]


def test_the_plan_drafts_with_a_hub_sidecar_and_names_it(hub_env: FakeHub) -> None:
    plan = plan_for(f"{REPO}:Q8_0", hardware_for("rtx-4090"), Wishes()).plan
    assert plan.flags.spec_type == SPEC_MTP and plan.uses_sidecar
    command = plan.command()  # -hf: llama-server fetches the repo's mtp-* sidecar itself
    assert command[command.index("--hf-repo") + 1] == f"{REPO}:Q8_0" and "--spec-draft-model" not in command
    assert command[command.index("--spec-draft-n-max") + 1] == str(plan.flags.spec_draft_n_max)
    local = plan.command(model_path="/m/Head-A1B-Q8_0.gguf", mtp_path="/m/mtp-Head-A1B-Q8_0.gguf")
    assert local[local.index("--spec-draft-model") + 1] == "/m/mtp-Head-A1B-Q8_0.gguf"
    with pytest.raises(TunerError, match="needs the head's file"):
        replace(plan, candidate=replace(plan.candidate, mtp_sidecar=None)).command(model_path="/m/x.gguf")
    assert plan.to_dict()["mtp_sidecar"] == "mtp-Head-A1B-Q8_0.gguf"
    assert plan.estimate.mtp_draft == "mtp-Head-A1B-Q8_0.gguf" or plan.estimate.mtp_draft.endswith(
        "mtp-Head-A1B-Q8_0.gguf")
    assert any(r.startswith("--spec-type draft-mtp") and "mtp-Head-A1B-Q8_0.gguf" in r for r in plan.reasons)


# ------------------------------------------------------------------------------------------------ sized


@pytest.fixture(scope="module")
def sidecar_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """The 35B-A3B widths (4 layers, 16 experts, a 16k vocabulary), sparse: the whole model with its head, the
    model without it, and the head as a sidecar."""
    d = tmp_path_factory.mktemp("mtp")
    spec = qwen35_35b_a3b_spec(n_layer=4, n_expert=16, mtp=True, extra_vocab=16_000)
    whole = write_synthetic_gguf(d / "whole.gguf", spec)[0]
    model, sidecar = _pair(d, spec, stem="model")
    return whole, model, sidecar


@pytest.mark.server
@pytest.mark.parametrize("args", [["-c", "4096", "-np", "1"], ["-c", "8192", "-np", "2", "--spec-draft-n-max", "2"]],
                         ids=["np1", "np2-n2"])
def test_drafting_with_a_sidecar_matches_llama_servers_log(server_bin: Path, sidecar_pair: tuple[Path, Path, Path],
                                                           args: list[str]) -> None:
    from test_estimate_vs_llama import COMPUTE_TOLERANCE, load_once

    _, model, sidecar = sidecar_pair
    load = load_once(server_bin, model, [*args, "--spec-type", SPEC_MTP, "-md", str(sidecar)])
    assert load.reported.loaded, load.log[-2000:]
    assert "loading draft model" in load.log
    n = int(args[args.index("-np") + 1])
    flags = ServerFlags(ctx_size=int(args[1]), parallel=n, kv_unified=False if n > 1 else None, spec_type=SPEC_MTP,
                        spec_draft_n_max=int(args[-1]) if "--spec-draft-n-max" in args else 3)
    est = estimate_memory(local_layout(model), flags, draft=local_layout(sidecar))
    r = load.reported
    assert len([b for b in r.buffers if b.kind == "weights"]) == 2  # the model, then the sidecar's own
    for kind in ("weights", "kv", "recurrent", "output"):
        assert abs(getattr(est, f"{kind}_bytes") - r.total(kind)) <= r.tolerance_bytes(kind), kind
    assert abs(est.compute_bytes / r.total("compute") - 1) <= COMPUTE_TOLERANCE


@pytest.mark.server
def test_the_head_in_the_model_and_as_a_sidecar_cost_the_same_but_the_sidecars_second_embedding(
        server_bin: Path, sidecar_pair: tuple[Path, Path, Path]) -> None:
    from test_estimate_vs_llama import load_once

    whole, model, sidecar = sidecar_pair
    args = ["-c", "4096", "-np", "1", "--spec-type", SPEC_MTP]
    inside = load_once(server_bin, whole, args).reported
    apart = load_once(server_bin, model, [*args, "-md", str(sidecar)]).reported
    flags = ServerFlags(ctx_size=4096, parallel=1, spec_type=SPEC_MTP)
    est_in = estimate_memory(local_layout(whole), flags)
    est_apart = estimate_memory(local_layout(model), flags, draft=local_layout(sidecar))
    draft = local_layout(sidecar)
    duplicated = sum(t.nbytes for t in draft.tensors if t.cls in (TensorClass.TOKEN_EMBD, TensorClass.OUTPUT,
                                                                   TensorClass.NORM))
    assert est_apart.weights_bytes - est_in.weights_bytes == duplicated
    assert abs((apart.total("weights") - inside.total("weights")) - duplicated) <= 2 * MiB // 100
    for kind in ("kv", "recurrent", "compute", "output"):
        assert apart.total(kind) == inside.total(kind), kind
        assert getattr(est_apart, f"{kind}_bytes") == getattr(est_in, f"{kind}_bytes"), kind


# ------------------------------------------------------------------------------------------------ pays


def test_the_step_model_reproduces_the_measured_mtp_record_it_was_fitted_on() -> None:
    """tests/data/speed-measurements.yaml id 37: Qwen3.6-35B-A3B Q4_K_M, RTX 4090, n-max 1 at 87.18 %, 213.87 tok/s
    (24-token prompt, 512 generated: a depth of ~280); VERIFY_LAYER_OVERHEAD alone is fitted on it."""
    records = yaml.safe_load((Path(__file__).parent / "data" / "speed-measurements.yaml").read_text())
    rec = next(r for r in records if r["id"] == 37)
    assert rec["mtp"] and rec["tg_tok_s"] == 213.87 and "87.18%" in rec["notes"]
    layout = card_layout(load_card("qwen3.6-35b-a3b"), "Q4_K_M", mtp=True)
    hw = hardware_for("rtx-4090")
    flags = ServerFlags(ctx_size=32768, parallel=1, cache_type_k="q4_0", cache_type_v="q4_0", flash_attn="on")
    drafting = flags.with_(spec_type=SPEC_MTP, spec_draft_n_max=1)
    fitted = fit_verify_layer_overhead(layout, drafting, hw, rec["tg_tok_s"], 0.8718, 280)
    assert abs(VERIFY_LAYER_OVERHEAD - fitted) < 5e-4, f"re-fit: VERIFY_LAYER_OVERHEAD = {fitted:.4f}"
    assert 0 < VERIFY_LAYER_OVERHEAD < 1
    plain = predict_on(layout, flags, hw, depth_tokens=280)
    cost = step_cost(layout, drafting, hw, acceptance=0.8718, depth_tokens=280)
    assert plain.tg_tok_s * cost.speedup == pytest.approx(rec["tg_tok_s"], rel=0.005)


def test_more_acceptance_or_fewer_experts_in_play_pay_more() -> None:
    assert expected_tokens(3, 0.8) == pytest.approx(1 + 0.8 + 0.64 + 0.512)
    assert distinct_experts(256, 8, 1) == pytest.approx(8) and 8 < distinct_experts(256, 8, 4) < 32
    layout = card_layout(load_card("qwen3.6-35b-a3b"), "Q4_K_M", mtp=True)
    hw = hardware_for("rtx-4090")
    flags = ServerFlags(ctx_size=32768, parallel=1, spec_type=SPEC_MTP, spec_draft_n_max=2)
    low, high = (step_cost(layout, flags, hw, acceptance=p).speedup for p in (0.5, 0.9))
    assert 1 < low < high
    dense = card_layout(load_card("qwen3.5-27b"), "Q4_K_M", mtp=True)  # no experts: verifying costs no more reads
    assert step_cost(dense, flags, hw, acceptance=0.8).speedup > step_cost(layout, flags, hw, acceptance=0.8).speedup


def test_the_head_drafts_on_the_device_holding_the_output_layer_in_devices_order() -> None:
    layout = card_layout(load_card("qwen3.6-35b-a3b"), "Q4_K_M", mtp=True)
    hw = hardware_for("rtx-3090,rtx-3060")
    flags = ServerFlags(ctx_size=32768, parallel=1, spec_type=SPEC_MTP, spec_draft_n_max=2,
                        tensor_split=(20.0, 21.0))
    natural = step_cost(layout, flags, hw, acceptance=0.8)  # the output layer on CUDA1, the 3060
    swapped = step_cost(layout, flags.with_(device=("CUDA1", "CUDA0")), hw, acceptance=0.8)  # on CUDA0, the 3090
    only_3090 = step_cost(layout, flags.with_(tensor_split=(1.0, 0.0)), hw, acceptance=0.8)
    only_3060 = step_cost(layout, flags.with_(tensor_split=(0.0, 1.0)), hw, acceptance=0.8)
    assert swapped.draft_s == pytest.approx(only_3090.draft_s) and natural.draft_s == pytest.approx(only_3060.draft_s)
    assert swapped.draft_s < natural.draft_s


def _mtp_ladder(key: str = "qwen3.6-35b-a3b") -> list:
    from tuner.cards import card_candidates

    card = load_card(key)
    return [replace(c, layout=card_layout(card, c.quant, mtp=True)) for c in card_candidates(card)]


def test_mtp_is_planned_with_every_layer_on_the_gpu_and_a_draft_length_that_pays() -> None:
    rec = recommend(_mtp_ladder(), hardware_for("rtx-4090"), Wishes())
    plan = rec.plan
    assert plan.flags.spec_type == SPEC_MTP and plan.flags.n_cpu_moe == 0 and plan.flags.n_gpu_layers is None
    assert plan.flags.spec_draft_n_max in (1, 2, 3) and not plan.uses_sidecar
    assert plan.estimate.mtp_bytes > 0 and "--spec-draft-model" not in plan.command()
    why = next(r for r in plan.reasons if r.startswith("--spec-type draft-mtp"))
    assert "every layer is on the GPU" in why and "assumed acceptance of 0.8" in why
    plain = recommend(_mtp_ladder(), hardware_for("rtx-4090"), Wishes(quant=plan.quant, parallel=2)).plan
    assert plain.flags.spec_type is None and plan.predicted.tg_tok_s > 1.05 * plain.predicted.tg_tok_s


@pytest.mark.parametrize(("gpu", "wishes", "why"), [
    ("rtx-3060-12gb", {}, "MTP off: experts of"),
    ("none", {}, "MTP off: no GPU"),
    ("rtx-4090", {"parallel": 2}, "MTP off: --parallel 2"),
    ("rtx-4090", {"vision": True}, "MTP off: not planned together with --vision"),
])
def test_mtp_is_not_planned_and_the_reason_says_why(gpu: str, wishes: dict, why: str) -> None:
    plan = recommend(_mtp_ladder(), hardware_for(gpu), Wishes(**wishes)).plan
    assert plan.flags.spec_type is None
    assert any(r.startswith(why) for r in plan.reasons), plan.reasons


def test_a_file_without_a_head_is_told_where_one_is(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["recommend", "qwen3.6-35b-a3b", "--gpu", "rtx-4090", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    [mtp] = [f for f in doc["health"] if f["kind"] == "mtp"]
    assert mtp["severity"] == "info" and "unsloth/Qwen3.6-35B-A3B-MTP-GGUF" in mtp["message"]
    assert "ggml-org/Qwen3.6-35B-A3B-GGUF (mtp-Qwen3.6-35B-A3B-<QUANT>.gguf)" in mtp["message"]
    assert not any(r.startswith(("MTP", "--spec-type")) for r in doc["reasons"])  # no head: nothing to plan


def test_the_head_elsewhere_is_reported_not_stated_and_its_fix_says_it_needs_the_hub(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    assert main(["recommend", "qwen3.5-35b-a3b", "--gpu", "rtx-4090", "--json"]) == 0
    [online] = [f for f in json.loads(capsys.readouterr().out)["health"] if f["kind"] == "mtp"]
    said = "reported (by tuner's model card, not checked) to be in unsloth/Qwen3.5-35B-A3B-MTP-GGUF"
    assert said in online["message"]
    assert online["fix"] == "tuner recommend unsloth/Qwen3.5-35B-A3B-MTP-GGUF"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["recommend", "qwen3.5-35b-a3b", "--gpu", "rtx-4090", "--json"]) == 0
    [offline] = [f for f in json.loads(capsys.readouterr().out)["health"] if f["kind"] == "mtp"]
    assert offline["fix"].startswith("tuner recommend unsloth/Qwen3.5-35B-A3B-MTP-GGUF (")
    assert "from the Hub" in offline["fix"] and "HF_HUB_OFFLINE" in offline["fix"]


@pytest.mark.parametrize("args", [["--gpu", "none"], ["--gpu", "rtx-3060-12gb"],
                                  ["--gpu", "rtx-4090", "--parallel", "2"]])
def test_the_head_elsewhere_is_told_only_where_drafting_could_be_planned(args: list[str],
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["recommend", "qwen3.6-35b-a3b", *args, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert not [f for f in doc["health"] if f["kind"] == "mtp"], doc["health"]


def test_the_plans_drafting_blocker_follows_the_planners_rules() -> None:
    drafting = recommend(_mtp_ladder(), hardware_for("rtx-4090"), Wishes()).plan
    assert drafting.flags.spec_type is not None and drafting.mtp_blocked is None
    for gpu, wishes, why in [("rtx-3060-12gb", {}, "experts of"), ("none", {}, "no GPU"),
                             ("rtx-4090", {"parallel": 2}, "--parallel 2"), ("rtx-4090", {"vision": True}, "--vision")]:
        plan = recommend(_mtp_ladder(), hardware_for(gpu), Wishes(**wishes)).plan
        assert plan.mtp_blocked is not None and plan.mtp_blocked.startswith(why), (gpu, plan.mtp_blocked)
    on_cpu = drafting_blocked(drafting.candidate.layout, drafting.flags.with_(n_cpu_moe=4), ["CUDA0"])
    assert on_cpu is not None and on_cpu.startswith("experts of 4 layer(s) in RAM")
    some_layers = drafting_blocked(drafting.candidate.layout, drafting.flags.with_(n_gpu_layers=3), ["CUDA0"])
    assert some_layers is not None and "on the CPU" in some_layers


# ------------------------------------------------------------------------------------------------ measured


@pytest.mark.server
def test_bench_measures_mtp_on_and_off_side_by_side_with_the_acceptance_rate(
        server_bin: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNER_CONFIG_DIR", str(tmp_path / "config"))
    model = write_synthetic_gguf(tmp_path / "head.gguf", HEAD_SPEC)[0]
    code = main(["bench", str(model), "--gpu", "none", "--server-bin", str(server_bin), "--depths", "0",
                 "--repeat", "1", "--prompt-tokens", "32", "--gen-tokens", "48", "--out", str(tmp_path / "out"),
                 "--no-profile", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    doc = json.loads(captured.out)
    rows = {r["name"]: r for r in doc["results"]}
    assert set(rows) == {"defaults", "plan", "plan-mtp"}, "no GPU: the plan does not draft, its MTP twin does"
    assert "--spec-type" in rows["plan-mtp"]["flags"] and "--spec-type" not in rows["plan"]["flags"]
    assert rows["plan"]["draft_acceptance"] is None and rows["defaults"]["draft_acceptance"] is None
    drafted = rows["plan-mtp"]["draft_acceptance"]
    assert drafted["drafted"] > 0 and 0 <= drafted["accepted"] <= drafted["drafted"]
    assert drafted["rate"] == round(drafted["accepted"] / drafted["drafted"], 4)
    assert rows["plan-mtp"]["by_depth"][0]["draft_acceptance"] == drafted
    assert rows["plan-mtp"]["tg_tok_s"] > 0 and rows["plan"]["tg_tok_s"] > 0
    saved = json.loads(Path(doc["saved_to"]).read_text())
    samples = next(r for r in saved["results"] if r["name"] == "plan-mtp")["samples"]
    assert sum(q["draft_n"] for s in samples for q in s["requests"]) == drafted["drafted"]


@pytest.mark.server
def test_bench_drafts_with_a_sidecar_given_in_a_set(server_bin: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNER_CONFIG_DIR", str(tmp_path / "config"))
    model, sidecar = _pair(tmp_path, HEAD_SPEC)
    base = "-c 2048 -np 1 --fit off"
    code = main(["bench", str(model), "--gpu", "none", "--server-bin", str(server_bin), "--depths", "0",
                 "--repeat", "1", "--prompt-tokens", "32", "--gen-tokens", "32", "--out", str(tmp_path / "out"),
                 "--no-profile", "--json", "--set", f"off={base}",
                 "--set", f"mtp={base} --spec-type draft-mtp --spec-draft-n-max 2 -md {sidecar}"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    rows = {r["name"]: r for r in json.loads(captured.out)["results"]}
    assert rows["off"]["draft_acceptance"] is None and rows["mtp"]["draft_acceptance"]["drafted"] > 0
    assert rows["mtp"]["estimate_bytes"]["CPU"] > rows["off"]["estimate_bytes"]["CPU"] + os.path.getsize(sidecar) // 2
