"""Pictures of a benchmark: tg and pp tok/s against context depth, one line per flag set.

* :func:`render_png` draws the two panels as a PNG with matplotlib (the optional extra ``tuner[plot]``; imported
  only here and only when a chart is drawn, on the Agg backend, so no display is needed). Without it,
  :class:`PlotUnavailable` says how to get it. A run measured at one depth (``--tune``) is drawn as bars.
* :func:`bar_table` is the terminal view: a rich table of bars per depth and set.

Input is a list of :class:`Series` (one per set), built from bench results with :func:`series_from_results`;
:func:`render_document_png` draws a whole results file (its titles from the file itself).
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuner.errors import TunerError
from tuner.paths import write_atomic

PLOT_INSTALL = "pip install 'tuner[plot]'"
#: matplotlib's default colour cycle (tab10), so the terminal bars and the PNG lines agree.
PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))
PNG_WIDTH_PX, PNG_HEIGHT_PX, _DPI = 1200, 560, 100


class PlotUnavailable(TunerError):
    """matplotlib is not installed: the PNG cannot be drawn (the results are complete without it)."""


@dataclass(frozen=True)
class Series:
    """One set's medians (and min, max) per depth."""

    name: str
    depths: tuple[int, ...]
    tg_tok_s: tuple[float, ...]
    pp_tok_s: tuple[float, ...]
    tg_min: tuple[float, ...] = ()
    tg_max: tuple[float, ...] = ()
    pp_min: tuple[float, ...] = ()
    pp_max: tuple[float, ...] = ()


def series_from_results(results: Iterable[Mapping[str, Any]]) -> list[Series]:
    """From the ``results`` rows of a bench document (``SetResult.to_dict()``)."""
    out = []
    for r in results:
        rows = sorted(r.get("by_depth") or (), key=lambda d: d["depth"])
        if not rows:
            continue
        out.append(Series(
            str(r["name"]), tuple(int(d["depth"]) for d in rows),
            tuple(float(d["tg_tok_s"]["median"]) for d in rows), tuple(float(d["pp_tok_s"]["median"]) for d in rows),
            tuple(float(d["tg_tok_s"]["min"]) for d in rows), tuple(float(d["tg_tok_s"]["max"]) for d in rows),
            tuple(float(d["pp_tok_s"]["min"]) for d in rows), tuple(float(d["pp_tok_s"]["max"]) for d in rows)))
    return out


def depth_label(depth: int) -> str:
    if depth >= 1024 and depth % 1024 == 0:
        return f"{depth // 1024}k"
    if depth >= 1000:
        return f"{depth / 1024:.1f}k"
    return str(depth)


def _hex(rgb: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


# --------------------------------------------------------------------------------------------- terminal


def bar_table(series: Sequence[Series], width: int = 16) -> Any:
    """A rich table: per depth and set, tg and pp medians as bars scaled to the largest value."""
    from rich.table import Table

    table = Table(title="tok/s by context depth (median)", title_justify="left")
    table.add_column("depth", justify="right")
    table.add_column("set")
    table.add_column("tg tok/s", justify="right")
    table.add_column("")
    table.add_column("pp tok/s", justify="right")
    table.add_column("")
    tg_max = max((v for s in series for v in s.tg_tok_s), default=0.0) or 1.0
    pp_max = max((v for s in series for v in s.pp_tok_s), default=0.0) or 1.0
    depths = sorted({d for s in series for d in s.depths})
    for d in depths:
        for i, s in enumerate(series):
            if d not in s.depths:
                continue
            k = s.depths.index(d)
            colour = _hex(PALETTE[i % len(PALETTE)])
            table.add_row(depth_label(d), s.name, f"{s.tg_tok_s[k]:.1f}",
                          f"[{colour}]{_bar(s.tg_tok_s[k] / tg_max, width)}[/]", f"{s.pp_tok_s[k]:.1f}",
                          f"[{colour}]{_bar(s.pp_tok_s[k] / pp_max, width)}[/]")
    return table


def _bar(frac: float, width: int) -> str:
    eighths = max(0, round(frac * width * 8))
    full, part = divmod(eighths, 8)
    return "█" * full + (" ▏▎▍▌▋▊▉"[part] if part else "")


# --------------------------------------------------------------------------------------------- PNG


def _tick(v: float, _pos: object = None) -> str:
    if v >= 10000:
        return f"{v / 1000:.0f}k"
    if v >= 1000:
        return f"{v / 1000:.1f}k".replace(".0k", "k")
    return f"{v:g}"


def render_png(series: Sequence[Series], path: str | os.PathLike[str], *, title: str = "",
               subtitle: str = "") -> Path:
    """Write the two-panel chart (tg, pp against depth; min–max whiskers) to ``path``; returns it. Raises
    :class:`PlotUnavailable` without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import FuncFormatter
        from matplotlib.transforms import ScaledTranslation
    except ImportError:
        raise PlotUnavailable(f"the chart needs matplotlib: {PLOT_INSTALL}") from None

    fig = Figure(figsize=(PNG_WIDTH_PX / _DPI, PNG_HEIGHT_PX / _DPI), dpi=_DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    depths = sorted({d for s in series for d in s.depths}) or [0]
    one_depth = len(depths) == 1
    for ax, (label, what) in zip(axes, (("generation (tg)", "tg"), ("prompt processing (pp)", "pp")), strict=True):
        for i, s in enumerate(series):
            colour = _hex(PALETTE[i % len(PALETTE)])
            medians = s.tg_tok_s if what == "tg" else s.pp_tok_s
            lo, hi = (s.tg_min, s.tg_max) if what == "tg" else (s.pp_min, s.pp_max)
            err = None
            if lo and hi:
                err = ([m - v for m, v in zip(medians, lo, strict=True)],
                       [v - m for m, v in zip(medians, hi, strict=True)])
            if one_depth:  # one bar per set, whiskers on the bar
                ax.bar(i, medians[0], color=colour, label=s.name, yerr=[[e[0]] for e in err] if err else None,
                       capsize=4, ecolor="#404040")
                continue
            # whiskers side by side (a few points apart), not on top of each other
            dodge = ScaledTranslation((i - (len(series) - 1) / 2) * 5 / 72, 0, fig.dpi_scale_trans)
            ax.plot(s.depths, medians, color=colour, linewidth=2.2, marker="o", markersize=5, label=s.name)
            if err:
                ax.errorbar(s.depths, medians, yerr=err, fmt="none", ecolor=colour, elinewidth=1.1, capsize=3,
                            transform=ax.transData + dodge)
        if one_depth:
            ax.set_xticks(range(len(series)), [s.name for s in series])
            ax.set_xlabel(f"at context depth {depth_label(depths[0])} (tokens)")
        else:
            ax.set_xticks(depths, [depth_label(d) for d in depths])
            ax.set_xlabel("context depth (tokens)")
        ax.set_title(f"{label}, tok/s", fontsize=11)
        # the whiskers are drawn shifted, outside the data limits autoscale sees: make room for them by hand
        top = max((v for s in series for v in ((s.tg_max or s.tg_tok_s) if what == "tg" else (s.pp_max or s.pp_tok_s))),
                  default=1.0)
        ax.set_ylim(0, top * 1.08 or 1.0)
        ax.yaxis.set_major_formatter(FuncFormatter(_tick))
        ax.grid(axis="y", color="#e1e1e1")
        ax.set_axisbelow(True)
        ax.spines[["top", "right"]].set_visible(False)
    axes[0].set_ylabel("tokens per second")
    if title:
        fig.suptitle(title, fontsize=14, y=0.985)
    if subtitle:
        fig.text(0.5, 0.905, subtitle, ha="center", fontsize=10, color="#505050")
    rows = 0
    if not one_depth:  # bars are named on their axis
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5) or 1, frameon=False)
        rows = -(-len(labels) // 5)
    fig.subplots_adjust(left=0.07, right=0.98, top=0.82, bottom=0.13 + 0.05 * rows, wspace=0.18)
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=_DPI)
    return write_atomic(Path(path), out.getvalue())


def chart_titles(document: Mapping[str, Any]) -> tuple[str, str]:
    """The title (model on hardware) and subtitle (what a point is) of a results document's chart."""
    hw = document["hardware"]
    where = hw["gpus"][0]["name"] if hw["gpus"] else f"CPU {hw['cpu_model']}"
    cfg = document["config"]
    subtitle = (f"median of up to {cfg['repeat']} runs, whiskers min-max; {cfg['prompt_tokens']} prompt tokens, "
                f"{cfg['gen_tokens']} generated" + (f", {cfg['concurrency']} at once" if cfg["concurrency"] > 1
                                                    else ""))
    return f"{document['model']['name']} on {where}", subtitle


def render_document_png(document: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """The chart of a results document (``tuner bench``'s JSON) as a PNG at ``path``."""
    title, subtitle = chart_titles(document)
    return render_png(series_from_results(document["results"]), path, title=title, subtitle=subtitle)
