"""tuner.bench.plot: the bench chart as a PNG (matplotlib, the optional ``tuner[plot]`` extra) and the terminal bars."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from tuner import bench as b
from tuner.bench import plot as bp
from tuner.errors import TunerError

REPO = Path(__file__).resolve().parent.parent


def _series(depths: tuple[int, ...] = (0, 4096)) -> list[bp.Series]:
    figures = {("flat", 0): (100.0, 10.0), ("flat", 4096): (98.0, 9.8), ("drop", 0): (120.0, 12.0),
               ("drop", 4096): (60.0, 6.0)}
    samples = [b.Sample(i, name, depth, 0, *figures[name, depth], 32, depth, 8)
               for i, (name, depth) in enumerate((n, d) for n in ("flat", "drop") for d in depths)]
    return bp.series_from_results(b.summarize(b.parse_set(f"{n}=-c 8192"), samples, max(depths)).to_dict()
                                  for n in ("flat", "drop"))


def _pixels(path: Path) -> np.ndarray:
    from matplotlib.image import imread

    rgba = imread(path)
    return np.round(rgba[..., :3] * 255).astype(np.uint8)


def _count(pixels: np.ndarray, colour: tuple[int, int, int]) -> int:
    return int((pixels == np.array(colour, dtype=np.uint8)).all(axis=2).sum())


def test_series_come_from_the_results_rows() -> None:
    flat, drop = _series()
    assert (flat.name, flat.depths, flat.tg_tok_s, flat.pp_tok_s) == ("flat", (0, 4096), (10.0, 9.8), (100.0, 98.0))
    assert drop.tg_min == drop.tg_max == (12.0, 6.0)


def test_bar_table_draws_a_bar_per_set_and_depth_scaled_to_the_fastest() -> None:
    console = Console(record=True, width=100)
    console.print(bp.bar_table(_series()))
    lines = console.export_text().splitlines()
    cells = [[c.strip() for c in line.split("│")[1:-1]] for line in lines if "█" in line]
    rows = {(c[0], c[1]): "".join(c) for c in cells}
    assert set(rows) == {("0", "flat"), ("0", "drop"), ("4k", "flat"), ("4k", "drop")}
    assert rows["0", "drop"].count("█") > rows["4k", "drop"].count("█"), "drop halves from 0 to 4k"
    assert rows["0", "drop"].count("█") >= 2 * 16 - 1, "the fastest tg and pp fill their columns"


def test_png_draws_a_line_per_set_in_its_own_colour(tmp_path: Path) -> None:
    path = bp.render_png(_series(), tmp_path / "chart.png", title="bench", subtitle="median")
    assert path == tmp_path / "chart.png" and [p.name for p in tmp_path.iterdir()] == ["chart.png"]
    pixels = _pixels(path)
    assert pixels.shape == (bp.PNG_HEIGHT_PX, bp.PNG_WIDTH_PX, 3)
    assert _count(pixels, bp.PALETTE[0]) > 200 and _count(pixels, bp.PALETTE[1]) > 200, "both sets are drawn"
    assert _count(pixels, bp.PALETTE[2]) == 0, "and nothing else in a series colour"


def test_one_depth_is_drawn_as_a_bar_per_set(tmp_path: Path) -> None:
    pixels = _pixels(bp.render_png(_series((4096,)), tmp_path / "tune.png"))
    flat, drop = _count(pixels, bp.PALETTE[0]), _count(pixels, bp.PALETTE[1])
    assert flat > 10_000 and drop > 10_000, "filled bars, not thin lines"
    assert flat > drop, "flat is faster at 4k in both panels: its bars are taller"


def test_without_matplotlib_the_chart_says_how_to_get_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(bp.PlotUnavailable, match=r"pip install 'tuner\[plot\]'") as caught:
        bp.render_png(_series(), tmp_path / "chart.png")
    assert isinstance(caught.value, TunerError) and "\n" not in str(caught.value)
    assert not list(tmp_path.iterdir())


def test_a_committed_results_file_has_its_chart_and_titles_from_itself(tmp_path: Path) -> None:
    results = sorted((REPO / "bench_results").glob("*/*/*.json"))
    assert results, "bench_results holds measured runs"
    for path in results:
        assert path.with_suffix(".png").is_file(), f"{path.name} has its chart beside it"
    document = json.loads(results[0].read_text())
    title, subtitle = bp.chart_titles(document)
    assert title == f"{document['model']['name']} on CPU {document['hardware']['cpu_model']}"
    assert f"{document['config']['prompt_tokens']} prompt tokens" in subtitle
    drawn = _pixels(bp.render_document_png(document, tmp_path / "again.png"))
    assert drawn.shape == (bp.PNG_HEIGHT_PX, bp.PNG_WIDTH_PX, 3)
