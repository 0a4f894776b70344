"""The typer options of llama-server's flags are the flag table's (tuner.flags): names, short aliases, negations,
defaults and help; and the planner options that list their choices."""

from __future__ import annotations

from typing import Any

import click
import pytest
import typer.main

from tuner.cli import _options as o
from tuner.cli import _register, app, main
from tuner.flags import FLAGS, ServerFlags


def _options(command: str) -> dict[str, click.Option]:
    _register([command])
    group = typer.main.get_command(app)
    assert isinstance(group, click.Group)
    return {p.name: p for p in group.commands[command].params if isinstance(p, click.Option) and p.name}


@pytest.mark.parametrize("row", FLAGS.planned, ids=lambda row: row.key)
def test_each_estimate_option_is_spelled_and_defaulted_as_its_row(row: Any) -> None:
    opt = _options("estimate")[row.key]
    assert opt.opts == list(row.names)
    assert opt.secondary_opts == list(row.negation)
    assert opt.default == getattr(o.SERVER_DEFAULTS, row.key)
    assert opt.help == row.help
    assert ServerFlags.from_values({row.key: opt.default}) == ServerFlags(), "the default is llama-server's"


def test_every_option_of_estimate_that_a_row_spells_is_that_rows() -> None:
    for name, opt in _options("estimate").items():
        for spelling in [*opt.opts, *opt.secondary_opts]:
            row = FLAGS.lookup(spelling)
            assert row is None or row.key == name, spelling


@pytest.mark.parametrize("command", ["recommend", "serve", "bench"])
def test_planner_options_take_llama_servers_spellings_from_the_table(command: str) -> None:
    options = _options(command)
    assert options["ctx_size"].opts == list(FLAGS["ctx_size"].names)
    assert options["parallel"].opts == list(FLAGS["parallel"].names)


def test_prefer_lists_the_planners_choices_in_help(capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from tuner.planner import PREFERENCES

    assert o.PREFER_CHOICES == PREFERENCES
    assert _options("recommend")["prefer"].metavar == "[balanced|speed|quality|context]"
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["recommend", "--help"]) == 0
    out = capsys.readouterr().out
    assert "[balanced|speed|quality|context]" in out and "balanced (default)" in out


@pytest.mark.parametrize("command", ["recommend", "estimate", "serve", "bench"])
def test_every_planning_command_takes_the_what_if_host_options(command: str) -> None:
    options = _options(command)
    assert [options[k].opts for k in ("ram", "ram_bandwidth", "cpu_cores")] == \
        [["--ram"], ["--ram-bandwidth"], ["--cpu-cores"]]


def test_estimate_reads_an_option_as_llama_server_does(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["estimate", "qwen3.5-35b-a3b:Q4_K_M", "--gpu", "none", "--gpu-layers", "auto", "-fa", "ON",
                 "-no-kvu", "-np", "2", "--json"]) == 0
    out = capsys.readouterr().out
    assert '"--n-gpu-layers",\n    "all"' in out and '"--flash-attn",\n    "on"' in out and "--no-kv-unified" in out
