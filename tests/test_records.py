"""tuner.records: the checks records are read with; tuner.paths.load_yaml: YAML without aliases; tuner.llama_api:
llama-server's answers checked per endpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tuner import records as rec
from tuner.errors import TunerError
from tuner.llama_api import CHAT_COMPLETION, PROPS, TIMINGS, check_answer, parse_metrics
from tuner.paths import YamlRefused, load_yaml, load_yaml_text
from tuner.profile_store import MEASUREMENT, Measurement, ProfileEntry, ProfileStore

POINT = rec.record(x=rec.integer(0, 10), label=rec.field(rec.string(8), "none"),
                   tags=rec.field(rec.seq_of(rec.string(8), 3), ()), ratio=rec.maybe(rec.number(0.0, 1.0)))


def test_a_record_fills_in_defaults_and_drops_keys_it_does_not_know() -> None:
    assert rec.validate(POINT, {"x": 3, "extra": [1, 2]}) == {"x": 3, "label": "none", "tags": (), "ratio": None}


@pytest.mark.parametrize(("data", "message"), [
    ({"x": "3"}, r"^x: '3', expected a whole number 0\.\.10$"),
    ({"x": True}, r"^x: True, expected a whole number"),
    ({"x": 11}, r"^x: 11, expected a whole number 0\.\.10$"),
    ({}, r"^x: missing$"),
    ({"x": 1, "label": "\x1b[31m"}, r"^label: '\\x1b\[31m', expected a string of at most 8 characters without "
                                    r"control characters$"),
    ({"x": 1, "tags": ["a", 5]}, r"^tags\[1\]: 5, expected a string"),
    ({"x": 1, "tags": ["a"] * 4}, r"^tags: a list of 4, expected a list of at most 3$"),
    ({"x": 1, "ratio": float("nan")}, r"^ratio: nan, expected a number 0\.\.1$"),
    ("x", r"^the top level: 'x', expected an object$"),
])
def test_a_bad_field_is_named_with_what_it_holds_and_what_was_expected(data: object, message: str) -> None:
    with pytest.raises(rec.RecordError, match=message):
        rec.validate(POINT, data)


def test_json_values_are_bounded_in_depth_and_count_and_must_be_finite() -> None:
    check = rec.json_value(max_depth=3, max_items=10)
    assert check({"a": [1, {"b": None}]}, "v") == {"a": [1, {"b": None}]}
    for bad, message in (([[[[[]]]]], "levels deep"), (list(range(20)), "more than 10 values"),
                         ({"a": float("inf")}, "expected a finite number"), ({1: 2}, "string keys")):
        with pytest.raises(rec.RecordError, match=message):
            check(bad, "v")


def test_json_files_are_refused_when_too_large_nested_too_deep_or_not_json(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    for data, message in ((b"[" * 100_000 + b"]" * 100_000, "nested too deep"), (b"\xff", "not UTF-8"),
                          (b"NaN", "not JSON"), (b"{", "not JSON"), (b"1" * 2000, "larger than the limit")):
        path.write_bytes(data)
        with pytest.raises(rec.RecordError, match=message):
            rec.read_json_file(path, max_bytes=1000 if len(data) == 2000 else 1 << 20)


@pytest.mark.parametrize("text", ["1e400", '{"data_offset": 1e400}', '[-1E999]', "NaN", '{"a": -Infinity}'])
def test_json_numbers_that_are_not_finite_are_refused_where_they_are_parsed(text: str) -> None:
    refused = r"^the top level: not JSON \((the number .* is out of range|.* is not JSON)\)$"
    with pytest.raises(rec.RecordError, match=refused):
        rec.parse_json(text)
    assert rec.parse_json("[1e308, -2.5e-300]") == [1e308, -2.5e-300]


def test_a_json_value_too_deep_is_named_where_it_is_too_deep() -> None:
    with pytest.raises(rec.RecordError, match=r"^v\.a\[0\]\[0\]: more than 10 values or 2 levels deep$"):
        rec.json_value(max_depth=2, max_items=10)({"a": [[1]]}, "v")


def test_a_tuple_of_checks_each_position_and_the_length() -> None:
    row = rec.tuple_of(rec.string(8), rec.integer(0, 9))
    assert row(["w", 3], "t") == ("w", 3)
    for bad, message in ((["w"], r"^t: a list of 1, expected a list of 2$"), (["w", 10], r"^t\[1\]: 10, expected"),
                         ("w3", r"^t: 'w3', expected a list of 2$")):
        with pytest.raises(rec.RecordError, match=message):
            row(bad, "t")


ALIAS_BOMB = ('a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
              + "".join(f"{n}: &{n} [{','.join(['*' + p] * 9)}]\n"
                        for p, n in zip("abcdefgh", "bcdefghi", strict=True)))


def test_yaml_aliases_are_refused_before_anything_is_expanded(tmp_path: Path) -> None:
    for text in (ALIAS_BOMB, "a: &x {k: 1}\nb: {<<: *x}\n", "a: &r [*r]\n", "a: &s word\nb: *s\n"):
        with pytest.raises(YamlRefused, match=r"uses a YAML alias \(\*name, anchored on line 1\)"):
            load_yaml_text(text, "test.yaml")
    assert load_yaml_text("a: [1, {b: 'c'}]\n", "test.yaml") == {"a": [1, {"b": "c"}]}
    assert isinstance(YamlRefused("x"), yaml.YAMLError), "callers that report bad YAML report these too"


def test_yaml_nested_past_the_recursion_limit_is_refused_by_any_loader(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pure-Python loader (no libyaml) recurses per nesting level: 5000 levels are one refusal, not a crash."""
    monkeypatch.delattr(yaml, "CSafeLoader", raising=False)
    with pytest.raises(YamlRefused, match="nested deeper"):
        load_yaml_text("entries: " + "[" * 5000 + "]" * 5000, "deep.yaml")


def test_yaml_files_are_read_bounded_and_as_utf8(tmp_path: Path) -> None:
    path = tmp_path / "x.yaml"
    path.write_bytes(b"a: \xff\n")
    with pytest.raises(YamlRefused, match=r"x\.yaml is not UTF-8 text \(byte 3 is 0xff\)"):
        load_yaml(path)
    path.write_text("a: " + "x" * 100 + "\n")
    with pytest.raises(YamlRefused, match="larger than the limit of 50 bytes"):
        load_yaml(path, max_bytes=50)


def test_a_profile_measurement_round_trips_through_its_schema() -> None:
    m = Measurement("a", ("-c", "1024"), {"ctx_size": 1024}, (), 0, 10.0, 2.0, 3, "bench", "2026-01-01")
    assert Measurement.from_dict(m.to_dict()) == m
    with pytest.raises(rec.RecordError, match=r"^measurement\.depth: -1"):
        Measurement.from_dict({**m.to_dict(), "depth": -1})
    assert set(rec.validate(MEASUREMENT, m.to_dict())) == set(m.to_dict())


def test_a_profile_that_fails_its_schema_names_the_field_and_how_to_reset(tmp_path: Path) -> None:
    store = ProfileStore(tmp_path / "profiles.yaml")
    store.path.write_text("format: 1\nentries: [{key: {hardware: {gpus: [1, 2]}}}]\n")
    with pytest.raises(TunerError, match=r"profiles\.yaml is not valid \(entries\[0\]\.key\.hardware\.gpus\[0\]: 1, "
                                         r"expected a string.*`tuner profile reset --yes` starts a new one"):
        store.load()
    store.path.write_text("format: 1\nentries: [{updated_at: '2026'}]\n")
    (entry,) = store.load()
    assert isinstance(entry, ProfileEntry) and entry.key.model.file_bytes == 0 and entry.measurements == ()


def test_llama_server_answers_are_checked_per_endpoint() -> None:
    props = check_answer(b'{"total_slots": 2, "default_generation_settings": {"n_ctx": 8192}}', PROPS, "GET /props")
    assert props == {"total_slots": 2, "default_generation_settings": {"n_ctx": 8192}, "build_info": ""}
    reply = check_answer(b'{"choices": [1], "usage": {}}', CHAT_COMPLETION, "POST /v1/chat/completions")
    assert reply == {"choices": [1], "usage": {"completion_tokens": 0}}, "unread fields passed on as they are"
    with pytest.raises(TunerError, match=r"answer to GET /props is not what llama-server sends \(total_slots: 0"):
        check_answer(b'{"total_slots": 0}', PROPS, "GET /props")
    with pytest.raises(TunerError, match=r"usage\.completion_tokens: -1"):
        check_answer(b'{"usage": {"completion_tokens": -1}}', CHAT_COMPLETION, "POST /v1/chat/completions")
    with pytest.raises(TunerError, match=r"not JSON.*it began '<html>'"):
        check_answer(b"<html>", CHAT_COMPLETION, "POST /v1/chat/completions")
    timings = rec.validate(TIMINGS, json.loads('{"prompt_n": 5, "predicted_per_second": 12.5}'))
    assert timings["prompt_n"] == 5 and timings["cache_n"] == 0 and timings["draft_n"] is None


def test_metrics_lines_that_are_not_finite_numbers_are_skipped() -> None:
    text = "# HELP x\nllamacpp:a 1\nllamacpp:b nan\nllamacpp:c inf\nllamacpp:d x\nbroken\nllamacpp:e{l=\"1\"} 2.5\n"
    assert parse_metrics(text) == {"llamacpp:a": 1.0, "llamacpp:e": 2.5}
