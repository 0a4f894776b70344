"""tuner.flags: one row per llama-server flag; ServerFlags, to_args, command-line parsing and the owned and forbidden
sets derived from it; rows checked against llama.cpp's own source."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, fields
from pathlib import Path

import pytest

from tuner.bench import set_flags
from tuner.errors import TunerError
from tuner.flags import (
    AUTO_SLOTS,
    FLAGS,
    Flag,
    FlagTable,
    Kind,
    Occurrence,
    ServerFlags,
    flag_value,
    flags_from_args,
    scan,
    values_from,
)
from tuner.serve import server_args


def test_every_planned_row_is_a_server_flags_field_in_order_with_the_rows_default() -> None:
    assert [f.name for f in fields(ServerFlags)] == [row.key for row in FLAGS.planned]
    defaults = ServerFlags()
    for row in FLAGS.planned:
        assert getattr(defaults, row.key) == row.default, row.key
    assert defaults.n_seq == AUTO_SLOTS and defaults.unified


def test_each_spelling_belongs_to_one_row_and_a_table_refuses_two() -> None:
    spellings = [name for row in FLAGS for name in row.spellings]
    assert len(spellings) == len(set(spellings))
    assert all(name.startswith("-") for name in spellings)
    with pytest.raises(ValueError, match="-c is spelled by two"):
        FlagTable([FLAGS["ctx_size"], Flag("other", "--other", ("-c",), Kind.INT, 0, "x", "")])


def test_defaults_alone_write_only_the_explicit_rows_that_need_nothing_else() -> None:
    args = ServerFlags().to_args()
    written = [a for a in args if a.startswith("-")]
    assert written == [row.long for row in FLAGS.planned if row.explicit and row.needs is None]
    assert args[args.index("--n-gpu-layers") + 1] == "all"


@pytest.mark.parametrize("key", [row.key for row in FLAGS.planned if not row.explicit and row.kind is Kind.INT])
def test_a_value_off_its_default_is_written_and_read_back(key: str) -> None:
    row = FLAGS[key]
    changed = row.default + 2
    base = ServerFlags(spec_type="draft-mtp") if row.needs == "spec_type" else ServerFlags()
    flags = base.with_(**{key: changed})
    args = flags.to_args()
    assert args[args.index(row.long) + 1] == str(changed)
    assert flags_from_args(args) == (flags, [])


def test_a_flag_that_needs_another_is_written_only_with_it() -> None:
    assert "--kv-unified" not in ServerFlags(kv_unified=True).to_args(), "-np auto is unified whatever -kvu says"
    assert "--no-kv-unified" in ServerFlags(parallel=2, kv_unified=False).to_args()
    assert "--spec-draft-n-max" not in ServerFlags(spec_draft_n_max=5).to_args()
    mtp = ServerFlags(spec_type="draft-mtp").to_args()  # explicit: the draft length shows even at its default
    assert mtp[mtp.index("--spec-draft-n-max") + 1] == "3"
    cpu_moe = ServerFlags(cpu_moe=True, n_cpu_moe=3).to_args()
    assert "--cpu-moe" in cpu_moe and "--n-cpu-moe" not in cpu_moe, "all experts on the CPU says it all"


def test_a_pasted_command_line_reads_aliases_negations_equals_and_legacy_spellings() -> None:
    flags, extra = flags_from_args(["-c", "4096", "--parallel=2", "-no-kvu", "-ctk", "Q8_0", "-fa", "-ngl", "auto",
                                    "--draft-max", "5", "--spec-type", "draft-mtp", "-kvo", "-t", "4", "--jinja",
                                    "--temp", "0.6"])
    assert flags == ServerFlags(ctx_size=4096, parallel=2, kv_unified=False, cache_type_k="q8_0", flash_attn="on",
                                n_gpu_layers=None, spec_draft_n_max=5, spec_type="draft-mtp")
    assert extra == ["-t", "4", "--jinja", "--temp", "0.6"], "what is not planned passes through, as typed"
    assert flags_from_args(["-c", "1024", "-c", "2048"])[0].ctx_size == 2048, "the last occurrence wins"
    assert flags_from_args(["-ngl", "12"])[0].n_gpu_layers == 12


@pytest.mark.parametrize(("args", "message"), [
    (["-c"], "-c needs a value"),
    (["-c", "many"], "-c needs a number, got 'many'"),
    (["-ngl", "lots"], "-ngl must be a number, 'all' or 'auto'"),
    (["-ngl", "-5"], "-ngl must not be negative"),
    (["-fa", "maybe"], "--flash-attn must be one of on, off, auto"),
    # std::stof throws out_of_range past a C float's range, and the shares are summed in float
    (["-ts", "1e39,1"], "--tensor-split: the share 1e+39 is out of range"),
    (["-ts", "3.40282357e38"], "--tensor-split: the share 3.4028236e+38 is out of range"),
    (["-ts", "1e-40,1"], "--tensor-split: the share 1e-40 is out of range"),
    (["-ts", "3e38,3e38"], "--tensor-split: the shares add up past 3.4028235e+38"),
])
def test_a_bad_value_in_a_command_line_is_one_clear_error(args: list[str], message: str) -> None:
    with pytest.raises(TunerError, match=re.escape(message)):
        flags_from_args(args)


def test_tensor_split_shares_within_a_c_floats_range_are_taken() -> None:
    assert flags_from_args(["-ts", "3.4e38,0,1.2e-38"])[0].tensor_split == (3.4e38, 0.0, 1.2e-38)


def test_flag_value_reads_a_flag_that_is_not_planned_or_gives_its_default() -> None:
    assert flag_value(["-c", "1", "-lm", "none"], "load_mode") == "none"
    assert flag_value(["--load-mode=mmap"], "load_mode") == "mmap"
    assert flag_value(["-c", "1"], "load_mode") == FLAGS["load_mode"].default == "auto"
    assert flag_value(["--fit", "off"], "fit") == "off"


def test_a_switch_given_a_value_and_unknown_tokens_pass_through_scan() -> None:
    found = scan(["--cpu-moe=1", "--mirostat", "2", "-c", "8"])
    assert found[:3] == ["--cpu-moe=1", "--mirostat", "2"]
    assert isinstance(found[3], Occurrence) and found[3].tokens == ("-c", "8") and found[3].value() == 8


# ------------------------------------------------------------------------------------------------ rows to come


@dataclass(frozen=True)
class _Split:
    """Stands for ServerFlags once the split flags are rows: list-valued and repeatable fields."""

    tensor_split: tuple[float, ...] = ()
    override_tensor: tuple[str, ...] = ()
    rpc: tuple[str, ...] = ()
    lora: tuple[str, ...] = ()
    no_mmproj: bool = False


_FUTURE = FlagTable([
    FLAGS["tensor_split"], FLAGS["override_tensor"],
    Flag("rpc", "--rpc", (), Kind.TEXT, (), "common/arg.cpp:2680", "RPC servers.", list_sep=","),
    Flag("lora", "--lora", (), Kind.TEXT, (), "common/arg.cpp", "A LoRA adapter.", repeat=True),
    Flag("no_mmproj", "--no-mmproj", ("--no-mmproj-auto",), Kind.SWITCH, False, "common/arg.cpp:2594", "No mmproj.",
         negation=("--mmproj-auto",)),
])


def test_list_valued_and_repeatable_flags_fit_the_table_as_rows() -> None:
    args = ["-ts", "3,1", "-ot", "blk.0.ffn=CPU", "--override-tensor", "blk.1.ffn=CPU,blk.2.ffn=CUDA0",
            "--rpc", "10.0.0.2:50052,10.0.0.3:50052", "--lora", "a.gguf", "--lora", "b.gguf", "--no-mmproj", "-c", "9"]
    found = scan(args, _FUTURE)
    values = values_from(found, lambda row: True)
    split = _Split(**values)
    assert split == _Split(tensor_split=(3.0, 1.0), override_tensor=("blk.0.ffn=CPU", "blk.1.ffn=CPU",
                                                                      "blk.2.ffn=CUDA0"),
                           rpc=("10.0.0.2:50052", "10.0.0.3:50052"), lora=("a.gguf", "b.gguf"), no_mmproj=True)
    assert found[-2:] == ["-c", "9"], "a table knows only its rows"
    written = [a for row in _FUTURE for a in row.to_args(getattr(split, row.key))]
    assert written == ["--tensor-split", "3,1", "--override-tensor", "blk.0.ffn=CPU,blk.1.ffn=CPU,blk.2.ffn=CUDA0",
                       "--rpc", "10.0.0.2:50052,10.0.0.3:50052", "--lora", "a.gguf", "--lora", "b.gguf",
                       "--no-mmproj"]
    assert _Split(**values_from(scan(written, _FUTURE), lambda row: True)) == split


# ------------------------------------------------------------------------------------------------ roles


def test_serve_drops_every_flag_it_owns_from_a_plan_and_keeps_the_rest(tmp_path: Path) -> None:
    from tuner.estimate import estimate_memory
    from tuner.models import local_layout
    from tuner.synth import SynthSpec, write_synthetic_gguf

    write_synthetic_gguf(tmp_path / "m.gguf", SynthSpec())
    estimate = estimate_memory(local_layout(tmp_path / "m.gguf"), ServerFlags(ctx_size=1024))
    owned = [("-m", "x"), ("--verbosity", "1"), ("-a", "old"), ("-mm", "p.gguf"), ("--api-key", "k"),
             ("--no-jinja",), ("-v",), ("--log-verbose",)]
    plan = ["-c", "1024", *[t for pair in owned for t in pair], "-t", "4"]
    args = server_args(plan, estimate, alias="new")
    for gone in ("-m", "-a", "-mm", "--api-key", "--no-jinja", "-v", "--log-verbose", "x", "old", "k", "1"):
        assert gone not in args
    assert args.count("--verbosity") == 1 and flag_value(args, "verbosity") == 4  # serve's own, not the plan's
    assert args[:4] == ["-c", "1024", "-t", "4"]
    assert {row.key for row in FLAGS if row.serve_owned} >= {"model", "host", "port", "api_key", "verbosity",
                                                              "alias", "mmproj", "metrics", "jinja", "verbose"}


@pytest.mark.parametrize("option", [name for row in FLAGS if row.bench_forbidden for name in row.spellings])
def test_a_bench_set_refuses_every_spelling_of_a_forbidden_flag(option: str) -> None:
    row = FLAGS.lookup(option)
    assert row is not None
    with pytest.raises(TunerError, match="set by tuner itself"):
        set_flags([option, "x"] if row.takes_value else [option])


# ------------------------------------------------------------------------------------------------ llama.cpp's own


@pytest.mark.server
def test_each_row_cites_the_line_of_llama_cpp_that_defines_it(llama_build) -> None:
    """The cited ``path:line`` of the source llama-server is built from names the flag, or declares its default
    (and says the number, for a number)."""
    meta = json.loads((Path(llama_build.root) / "build.json").read_text())
    tree = Path(meta["source_dir"])
    if not (tree / "common" / "arg.cpp").is_file():
        pytest.skip(f"the llama.cpp source of the build is gone ({tree})")
    for row in FLAGS:
        path, _, line_no = row.source.partition(":")
        line = (tree / path).read_text().splitlines()[int(line_no) - 1]
        if any(f'"{name}"' in line for name in row.spellings):
            continue
        assert "=" in line, (row.key, line)
        if isinstance(row.default, int) and not isinstance(row.default, bool):
            assert re.search(rf"=\s*{row.default}\b", line), (row.key, line)


# ------------------------------------------------------------------------------------------------ one place


#: Where a string that spells a llama-server option may appear outside tuner/flags.py, and why.
_OTHER_PROGRAMS = {
    "tuner/build/": "command lines of cmake, git, pip and python, whose -m and -c are theirs, not llama-server's",
    "tuner/speedfit.py": "python -m tuner (the estimate CLI run as a child process)",
    "tuner/fetch.py": "python -m tuner.fetch_worker (each download's child process)",
    "tuner/worker.py": "ggml-rpc-server's command line: its --host, --port, --device, --threads are its own",
    "tuner/cli/worker.py": "tuner worker's options, which go to ggml-rpc-server, not to llama-server",
}


def test_no_llama_server_option_is_spelled_outside_the_flag_table() -> None:
    """Every llama-server option tuner writes comes from a :data:`FLAGS` row (``FLAGS[key].to_args``,
    ``flag_value``): no string literal anywhere in the package is one of their spellings, except in the command
    lines of other programs (:data:`_OTHER_PROGRAMS`). Prose that names an option is not a literal of it."""
    import ast

    root = Path(__file__).resolve().parent.parent
    spellings = {name for row in FLAGS for name in row.spellings}
    found = []
    for path in sorted((root / "tuner").rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel == "tuner/flags.py" or any(rel.startswith(p) for p in _OTHER_PROGRAMS):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in spellings:
                found.append(f"{rel}:{node.lineno}: {node.value}")
    assert not found, "\n".join(found)
    # the check sees what it should: the spellings it looks for are in use in the command lines tuner writes
    assert {"--ctx-size", "-c", "--n-cpu-moe", "--fit", "--jinja", "--temp", "--no-mmproj"} <= spellings
