"""tuner.serverlog on logs a hostile ``--server-bin`` could write: lines that are no record are read as text or
skipped, never an exception, and the real lines around them still count."""

from __future__ import annotations

import json

from tuner.serverlog import MAX_JSON_LINE_CHARS, log_messages, parse_load_log
from tuner.units import MiB

GOOD = ("llama_context: n_seq_max     = 1\nllama_context: n_ctx         = 4096\n"
        "load_tensors:   CPU_Mapped model buffer size =    62.81 MiB\n"
        "sched_reserve:        CPU compute buffer size =   300.00 MiB\n")
BREAKDOWN = json.dumps({"type": "fit_memory_breakdown", "data": {"CPU": {"model": 62}}})


def test_a_json_line_nested_past_the_parsers_depth_is_text_not_a_recursion_error() -> None:
    deep = "{" + '"a":[' * 100_000 + "]" * 100_000 + "}"
    log = f"{deep}\n{GOOD}{deep}\n"
    assert list(log_messages(deep)) == [deep]
    reported = parse_load_log(log)
    assert reported.n_ctx == 4096 and reported.total("weights") == round(62.81 * MiB) and reported.loaded
    assert reported.breakdown is None


def test_a_breakdown_line_too_deep_or_too_long_is_skipped_and_the_last_good_one_counts() -> None:
    too_deep = json.dumps({"type": "fit_memory_breakdown", "data": {"x": [[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]}})
    too_long = json.dumps({"type": "fit_memory_breakdown", "data": {"x": "y" * MAX_JSON_LINE_CHARS}})
    deep_text = '{"type": "fit_memory_breakdown", "data": ' + "[" * 5000 + "]" * 5000 + "}"
    assert parse_load_log(f"{BREAKDOWN}\n{too_deep}\n{too_long}\n{deep_text}\n").breakdown == {"CPU": {"model": 62}}


def test_a_jsonl_message_that_is_not_a_string_is_read_as_the_line_itself() -> None:
    line = json.dumps({"msg": {"load_tensors": 1}})
    assert list(log_messages(line)) == [line]
    assert list(log_messages(json.dumps({"msg": "a\nb"}))) == ["a", "b"]


def test_figures_no_double_or_python_int_holds_are_not_read() -> None:
    nines = "9" * 5000
    log = (f"load_tensors:   CPU_Mapped model buffer size = {'9' * 400} MiB\n"
           f"llama_kv_cache: size = {nines}.00 MiB ({nines} cells, {nines} layers, 1/1 seqs), K (f16): 1.00 MiB, "
           "V (f16): 1.00 MiB\n"
           f"llama_context: n_ctx         = {nines}\nllama_context: n_ctx_seq     = many\n" + GOOD)
    reported = parse_load_log(log)
    assert reported.n_ctx == 4096 and reported.n_ctx_seq is None
    assert reported.total("weights") == round(62.81 * MiB)
    assert all(c.kv_cells is None for c in reported.contexts)


def test_the_kv_and_recurrent_summary_lines_are_read() -> None:
    """The "size = …" summaries llama.cpp prints per context (llama-kv-cache.cpp, llama-memory-recurrent.cpp) are
    read with their cell and layer counts (their patterns are f-strings: a repeat count must be doubled braces)."""
    log = "\n".join([
        "llama_context: constructing llama_context",
        "llama_context: n_seq_max     = 1",
        "llama_context: n_ctx         = 4096",
        "llama_kv_cache: size =  384.00 MiB (  4096 cells,  10 layers,  1/1 seqs), K (f16):  192.00 MiB, "
        "V (f16):  192.00 MiB",
        "llama_memory_recurrent: size =   62.81 MiB (     1 cells,  40 layers,  1 seqs   0 rs_seq)",
    ])
    ctx = parse_load_log(log).contexts[0]
    assert ctx.kv_size_bytes == 384 * MiB
    assert ctx.kv_cells == 4096
    assert ctx.recurrent_size_bytes == round(62.81 * MiB)
    assert ctx.kv_layers == 10
