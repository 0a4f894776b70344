"""Health findings over the loopback Hub: the chat template against the official repo's (fetched, cached, offline),
the file's date against the card's fix date, and ``serve`` passing the official template to a real llama-server.

Every template here is written by the test (``{# … #}`` variants of a ChatML template): tuner ships none."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import httpx
import pytest
from hubserver import FakeHub

from tuner import remote
from tuner.cards import load_card
from tuner.chat_template import effective_template, official_template, same_template
from tuner.cli import main
from tuner.errors import TunerError
from tuner.health import check_chat_template
from tuner.models import resolve_candidates
from tuner.server import free_port
from tuner.synth import CHATML_TEMPLATE, SynthSpec, spec_from_card, write_synthetic_gguf

OFFICIAL = "acme/Official"
OFFICIAL_TEXT = "{# official, fixed #}\n" + CHATML_TEMPLATE + "\n"
BEFORE_FIX = datetime(2026, 2, 13, 12, tzinfo=timezone.utc).timestamp()
AFTER_FIX = datetime(2026, 3, 2, 12, tzinfo=timezone.utc).timestamp()
QWEN_OFFICIAL = "Qwen/Qwen3.5-35B-A3B"  # the 35B-A3B card's official_repo; fix date 2026-02-27


def _model(path: Path, template: str | None, *, base: str | None = OFFICIAL, when: float | None = None) -> Path:
    written = write_synthetic_gguf(path, SynthSpec(name="tiny-health", chat_template=template,
                                                   base_model_repo=base))[0]
    if when is not None:
        os.utime(written, (when, when))
    return written


@pytest.fixture(scope="module")
def hub_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hub")
    official = root / OFFICIAL
    official.mkdir(parents=True)
    (official / "chat_template.jinja").write_text(OFFICIAL_TEXT, encoding="utf-8")
    (official / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 4096}), encoding="utf-8")
    (official / "config.json").write_text("{}\n", encoding="utf-8")
    _model(root / "acme/Stale-GGUF/Tiny-F16.gguf", CHATML_TEMPLATE, when=BEFORE_FIX)
    crlf = OFFICIAL_TEXT.replace("\n", "\r\n")  # the official template as a CRLF copy: llama.cpp reads it the same
    _model(root / "acme/Same-GGUF/Tiny-F16.gguf", crlf, when=BEFORE_FIX)
    # another official repo: its template in tokenizer_config.json (first in the converter's order), as a list
    listed = root / "acme/Listed"
    listed.mkdir(parents=True)
    (listed / "tokenizer_config.json").write_text(json.dumps({"chat_template": [
        {"name": "tool_use", "template": "{# tools #}"}, {"name": "default", "template": "{# listed default #}"}]}))
    (listed / "chat_template.jinja").write_text("{# not this one #}", encoding="utf-8")
    # the Qwen card's files: the same bytes in two repos, uploaded before and after the card's fix date
    qwen = QWEN_OFFICIAL
    (root / qwen).mkdir(parents=True)
    (root / qwen / "chat_template.jinja").write_text("{# qwen official #}" + CHATML_TEMPLATE, encoding="utf-8")
    # the card's shapes (a tiny vocabulary: matching a card does not look at it), sparse
    spec = replace(spec_from_card(load_card("qwen3.5-35b-a3b")), chat_template=CHATML_TEMPLATE,
                   types={"matrix": "q4_K", "experts": "q2_K", "embd": "q4_K", "output": "q6_K"})
    [old] = write_synthetic_gguf(root / "old/Qwen3.5-35B-A3B-GGUF/Qwen3.5-35B-A3B-Q2_K.gguf", spec)
    [new] = write_synthetic_gguf(root / "new/Qwen3.5-35B-A3B-GGUF" / old.name, spec)
    os.utime(old, (BEFORE_FIX, BEFORE_FIX))
    os.utime(new, (AFTER_FIX, AFTER_FIX))
    return root


@pytest.fixture(scope="module")
def hub(hub_root: Path) -> Iterator[FakeHub]:
    with FakeHub(hub_root) as server:
        yield server


@pytest.fixture(autouse=True)
def hub_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, hub: FakeHub) -> None:
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    monkeypatch.setenv("TUNER_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(remote, "hub_token", lambda: None)
    hub.reset_counters()


def _recommend(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    code = main(["recommend", *args, "--gpu", "rtx-4090", "--json"])  # a 12 GB Q2_K: on the GPU, any RAM
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def _template_findings(doc: dict) -> list[dict]:
    return [f for f in doc["health"] if f["kind"] == "chat_template"]


# ------------------------------------------------------------------------------------------------ the rules


def test_templates_compare_as_llama_cpps_lexer_reads_them() -> None:
    assert effective_template("a\r\nb\rc\n") == "a\nb\nc"
    assert effective_template("a\n\n") == "a\n" and effective_template("a") == "a"
    assert same_template("x\r\n", "x") and same_template("x\n", "x\r\n") and not same_template("x ", "x")
    assert not same_template(None, "x")


def test_the_official_template_follows_the_converters_file_order_and_is_cached(hub: FakeHub) -> None:
    got = official_template(OFFICIAL)
    assert got.source_file == "chat_template.jinja"  # tokenizer_config.json is there, without a template
    assert got.text == OFFICIAL_TEXT and got.path.read_text(encoding="utf-8") == OFFICIAL_TEXT
    assert got.commit == hub.commit(OFFICIAL) and not got.from_cache
    listed = official_template("acme/Listed")
    assert listed.source_file == "tokenizer_config.json" and listed.text == "{# listed default #}"
    hub.reset_counters()
    again = official_template(OFFICIAL)
    assert again.from_cache and again.text == OFFICIAL_TEXT
    assert not [r for r in hub.requests if "/resolve/" in r.path]  # one listing call, no file read
    with pytest.raises(TunerError, match="not found"):
        official_template("acme/Nobody")


@pytest.mark.parametrize("source_json", [b"[" * 100_000 + b"]" * 100_000, b'{"file": ["chat_template.jinja"]}',
                                         b'{"file": "../../etc/passwd"}', b'{"file": 1e400}', b"\xff", b"[]"],
                         ids=["nested", "file-a-list", "file-not-a-source", "number-1e400", "not-utf8", "a-list"])
def test_a_corrupt_cached_template_record_is_a_cache_miss_fetched_again(hub: FakeHub, source_json: bytes) -> None:
    first = official_template(OFFICIAL)
    (first.path.parent / "source.json").write_bytes(source_json)
    hub.reset_counters()
    again = official_template(OFFICIAL)
    assert not again.from_cache and again.text == OFFICIAL_TEXT and again.source_file == "chat_template.jinja"
    assert [r for r in hub.requests if "/resolve/" in r.path]  # read from the Hub again
    assert official_template(OFFICIAL).from_cache  # and the rewritten record is read back


def test_a_stale_template_is_a_warning_whose_fix_is_the_fetched_official_file(
        capsys: pytest.CaptureFixture[str], hub: FakeHub) -> None:
    doc = _recommend(capsys, "acme/Stale-GGUF")
    [finding] = _template_findings(doc)
    assert finding["severity"] == "warning" and "stale" in finding["message"]
    assert f"{OFFICIAL}/chat_template.jinja" in finding["message"] and "no fix date known" in finding["message"]
    assert "dated 2026-02-13" in finding["message"]  # the Hub's last commit of the file
    flag, path = finding["fix"].split(" ", 1)
    assert flag == "--chat-template-file" and Path(path).read_text(encoding="utf-8") == OFFICIAL_TEXT
    assert "--chat-template-file" not in doc["command"]  # recommend says so; serve passes it


def test_a_template_that_matches_the_official_one_gets_no_entry(capsys: pytest.CaptureFixture[str]) -> None:
    assert _template_findings(_recommend(capsys, "acme/Same-GGUF")) == []


def test_estimate_reports_the_same_finding(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["estimate", "acme/Stale-GGUF:F16", "-c", "2048", "--json"]) == 0
    [finding] = _template_findings(json.loads(capsys.readouterr().out))
    assert finding["severity"] == "warning" and finding["fix"].startswith("--chat-template-file ")
    assert main(["estimate", "acme/Stale-GGUF:F16", "-c", "2048"]) == 0
    out = capsys.readouterr().out
    assert "warning:" in out and "chat_template" in out


def test_the_file_date_against_the_cards_fix_date_decides_stale_or_the_uploaders_own(
        capsys: pytest.CaptureFixture[str]) -> None:
    [old] = _template_findings(_recommend(capsys, "old/Qwen3.5-35B-A3B-GGUF"))
    assert old["severity"] == "warning" and "dated 2026-02-13" in old["message"]
    assert "the fix of 2026-02-27" in old["message"] and f"{QWEN_OFFICIAL}/chat_template.jinja" in old["message"]
    [new] = _template_findings(_recommend(capsys, "new/Qwen3.5-35B-A3B-GGUF"))
    assert new["severity"] == "info" and "dated 2026-03-02" in new["message"] and "kept" in new["message"]


def test_without_the_official_template_the_date_alone_can_say_stale(capsys: pytest.CaptureFixture[str],
                                                                    hub_root: Path) -> None:
    moved = hub_root / "Qwen" / "moved-away"
    (hub_root / QWEN_OFFICIAL).rename(moved)
    try:
        [old] = _template_findings(_recommend(capsys, "old/Qwen3.5-35B-A3B-GGUF"))
        [new] = _template_findings(_recommend(capsys, "new/Qwen3.5-35B-A3B-GGUF"))
    finally:
        moved.rename(hub_root / QWEN_OFFICIAL)
    assert old["severity"] == "warning" and "stale by its date" in old["message"]
    assert new["severity"] == "warning" and new["message"].startswith("could not check") and new["fix"] is None


def test_offline_with_nothing_cached_is_a_warning_not_an_error(capsys: pytest.CaptureFixture[str],
                                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model(tmp_path / "m" / "Tiny-F16.gguf", CHATML_TEMPLATE)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    [finding] = _template_findings(_recommend(capsys, str(model)))
    assert finding["severity"] == "warning" and finding["message"].startswith("could not check")
    assert OFFICIAL in finding["message"] and "HF_HUB_OFFLINE" in finding["message"]
    # fetched once online, the cached template answers offline
    monkeypatch.delenv("HF_HUB_OFFLINE")
    official_template(OFFICIAL)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    [cached] = _template_findings(_recommend(capsys, str(model)))
    assert cached["severity"] == "warning" and cached["fix"].startswith("--chat-template-file")


def test_an_unreachable_hub_is_a_warning_and_no_retry_storm(tmp_path: Path) -> None:
    model = _model(tmp_path / "Tiny-F16.gguf", CHATML_TEMPLATE)
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}", "HF_HOME": str(tmp_path / "hf"),
           "TUNER_CACHE_DIR": str(tmp_path / "cache"), "TUNER_CONFIG_DIR": str(tmp_path / "config")}
    proc = subprocess.run([sys.executable, "-m", "tuner", "recommend", str(model), "--gpu", "none", "--json"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    [finding] = _template_findings(json.loads(proc.stdout))
    assert finding["severity"] == "warning" and "cannot reach" in finding["message"]


def test_a_card_plan_says_its_template_is_checked_once_the_file_is_downloaded(
        capsys: pytest.CaptureFixture[str], hub: FakeHub) -> None:
    doc = _recommend(capsys, "qwen3.5-35b-a3b")
    [finding] = _template_findings(doc)
    assert finding["severity"] == "info" and finding["fix"] is None
    assert "not checked yet" in finding["message"] and f"tuner serve checks the downloaded file's against " \
        f"{QWEN_OFFICIAL}'s" in finding["message"]
    assert hub.requests == []  # a card's plan stays offline: nothing fetched to say so


def test_no_official_repo_means_no_check(tmp_path: Path) -> None:
    [cand] = resolve_candidates(str(_model(tmp_path / "Tiny-F16.gguf", CHATML_TEMPLATE, base=None)))
    assert check_chat_template(cand).findings == ()
    assert cand.layout.base_model_repo is None
    with_base = replace(cand, layout=replace(cand.layout, base_model_repo=OFFICIAL))
    assert [f.kind for f in check_chat_template(with_base).findings] == ["chat_template"]


# ------------------------------------------------------------------------------------------------ the loopback Hub


def test_the_fake_hub_keeps_small_files_apart_and_dates_them_as_the_hub_does(hub: FakeHub, tmp_path: Path) -> None:
    from huggingface_hub import HfApi, hf_hub_download

    texts = {name: Path(hf_hub_download(OFFICIAL, name, endpoint=hub.endpoint, cache_dir=tmp_path / "hf"))
             .read_text(encoding="utf-8") for name in ("chat_template.jinja", "tokenizer_config.json")}
    assert texts["chat_template.jinja"] == OFFICIAL_TEXT and json.loads(texts["tokenizer_config.json"])
    infos = HfApi(endpoint=hub.endpoint).get_paths_info("acme/Stale-GGUF", ["Tiny-F16.gguf", "missing.gguf"],
                                                        expand=True)
    assert [i.path for i in infos] == ["Tiny-F16.gguf"]
    assert infos[0].last_commit is not None and infos[0].last_commit.date.date().isoformat() == "2026-02-13"
    assert remote.hub_file_dates("acme/Stale-GGUF", hub.commit("acme/Stale-GGUF"),
                                 ["Tiny-F16.gguf"])["Tiny-F16.gguf"] == infos[0].last_commit.date


# ------------------------------------------------------------------------------------------------ served


def test_serve_says_the_users_template_is_served_when_they_pass_one(tmp_path: Path) -> None:
    from tuner.hardware import hardware_for
    from tuner.planner import Wishes, plan_for
    from tuner.serve import server_args, template_served

    model = _model(tmp_path / "Tiny-F16.gguf", CHATML_TEMPLATE)
    plan = plan_for(str(model), hardware_for("none"), Wishes()).plan
    official, mine = tmp_path / "official.jinja", tmp_path / "mine.jinja"

    def args(*given: str) -> list[str]:
        return server_args([*plan.command("llama-server", str(model)), *given], plan.estimate, alias="tiny",
                           chat_template_file=official)

    ours = args()
    assert ours[ours.index("--chat-template-file") + 1] == str(official)
    said = template_served(ours, official)
    assert said is not None and said["source"] == "official" and "official chat template" in said["message"]
    theirs = args("--chat-template-file", str(mine))
    assert theirs.count("--chat-template-file") == 1 and str(official) not in theirs
    said = template_served(theirs, official)
    assert said is not None and said["source"] == "user" and said["file"] == str(mine)
    assert str(mine) in said["message"] and "not the official one" in said["message"]
    assert "serving with the official" not in said["message"] and "stale" in said["message"]
    inline = template_served(args("--chat-template", "chatml"), official)
    assert inline is not None and inline["source"] == "user" and inline["file"] is None
    assert template_served(ours, None) is None  # nothing stale, nothing replaced


@pytest.mark.server
def test_serve_passes_the_official_template_and_llama_server_uses_it(llama_build, hub: FakeHub,
                                                                    tmp_path: Path) -> None:
    from test_serve import ServeProcess

    env = {**os.environ, "TUNER_CONFIG_DIR": str(tmp_path / "config"), "HF_HUB_CACHE": str(tmp_path / "hf"),
           "PYTHONUNBUFFERED": "1"}
    serve = ServeProcess(["acme/Stale-GGUF:F16", "--gpu", "none", "--cache-type", "f16", "--port", str(free_port()),
                          "--server-bin", str(llama_build.server_bin), "--log-file", str(tmp_path / "s.log")], env)
    try:
        ready = serve.wait_for(lambda e: e.get("status") == "ready")
        [finding] = [f for e in serve.events if "health" in e for f in e["health"] if f["kind"] == "chat_template"]
        path = finding["fix"].split(" ", 1)[1]
        said = next(e for e in serve.events if e.get("status") == "chat_template")
        assert said["file"] == path and "official chat template" in said["message"] and said["source"] == "official"
        assert any(e.get("kind") == "chat_template" and "warning" in e for e in serve.events)
        command = next(e for e in serve.events if e.get("status") == "launching")["command"]
        assert command[command.index("--chat-template-file") + 1] == path
        assert Path(path).read_text(encoding="utf-8") == OFFICIAL_TEXT
        props = httpx.get(ready["endpoint"].removesuffix("/v1") + "/props", timeout=30).json()
        assert props["chat_template"] == effective_template(OFFICIAL_TEXT)
        reply = httpx.post(f"{ready['endpoint']}/chat/completions", timeout=60,
                           json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
        assert reply.status_code == 200
        serve.proc.send_signal(signal.SIGINT)
        assert serve.finish() == 0
    finally:
        serve.kill()
