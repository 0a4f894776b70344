"""Pictures of a benchmark: tg and pp tok/s against context depth, one line per flag set.

* :func:`terminal_chart` draws the two panels for a terminal with plotext (its 6.x ``figure`` API, else the 5.x
  ``plot``/``build`` API); if neither works it returns None and :func:`bar_table` (a rich table of bars) is used.
* :func:`render_png` draws the same picture as a PNG with no plotting library: numpy rasterizes antialiased lines,
  markers and min–max whiskers, text comes from bitmaps of DejaVu Sans (Bitstream Vera licence: free to use and
  embed; rasterized at 13 and 17 px, ASCII only; other characters print as ``?``), and :func:`png_bytes` encodes it.

Input is a list of :class:`Series` (one per set), built from bench results with :func:`series_from_results`.
"""

from __future__ import annotations

import base64
import itertools
import math
import os
import re
import struct
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tuner.paths import write_atomic

_BACKGROUND_RE = re.compile(r"\x1b\[48;5;\d+m")  # plotext paints a background; the terminal's own reads better
PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))


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


def series_from_results(results: Iterable[dict[str, Any]]) -> list[Series]:
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


# --------------------------------------------------------------------------------------------- terminal


def terminal_chart(series: Sequence[Series], width: int = 100, height: int = 20) -> str | None:
    """The two panels as text (ANSI colours kept), or None when plotext is missing or fails."""
    if not series:
        return None
    try:
        import plotext as plt
    except ImportError:
        return None
    depths = sorted({d for s in series for d in s.depths})
    try:
        fig = plt.figure
        if hasattr(fig, "subplots") and hasattr(fig, "signal"):  # plotext 6.x
            fig.clear.all()
            fig.theme("simple")  # no painted background: readable on dark and light terminals
            fig.plot_size(width, height)
            fig.subplots(1, 2)
            for col, title in ((1, "tg tok/s vs depth"), (2, "pp tok/s vs depth")):
                sp = fig.subplot(1, col)
                sp.title(title)
                for s in series:
                    ys = s.tg_tok_s if col == 1 else s.pp_tok_s
                    sig = sp.signal(list(s.depths), list(ys))
                    sig.label(s.name)
                    sig.lines()
                    sp.draw(sig)
                sp.ruler("x").ticks(depths, [depth_label(d) for d in depths])
                top = max((v for s in series for v in (s.tg_tok_s if col == 1 else s.pp_tok_s)), default=1.0)
                yt = nice_ticks(top * 1.05, 4)
                sp.ruler("y").ticks(yt, [_fmt_tick(v) for v in yt])
                sp.ruler("y").lim(0, yt[-1])
            text = fig.build().string()
            fig.clear.all()
            return _BACKGROUND_RE.sub("", str(text))
        plt.clear_figure()  # plotext 5.x
        plt.plot_size(width, height)
        plt.subplots(1, 2)
        for col, title in ((1, "tg tok/s vs depth"), (2, "pp tok/s vs depth")):
            plt.subplot(1, col)
            plt.title(title)
            for s in series:
                plt.plot(list(s.depths), list(s.tg_tok_s if col == 1 else s.pp_tok_s), label=s.name, marker="dot")
            plt.xticks(depths, [depth_label(d) for d in depths])
        text = plt.build()
        plt.clear_figure()
        return str(text)
    except Exception:  # plotext's API has changed between major versions: fall back to the table of bars
        return None


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
            colour = "#{:02x}{:02x}{:02x}".format(*PALETTE[i % len(PALETTE)])
            table.add_row(depth_label(d), s.name, f"{s.tg_tok_s[k]:.1f}",
                          f"[{colour}]{_bar(s.tg_tok_s[k] / tg_max, width)}[/]", f"{s.pp_tok_s[k]:.1f}",
                          f"[{colour}]{_bar(s.pp_tok_s[k] / pp_max, width)}[/]")
    return table


def _bar(frac: float, width: int) -> str:
    eighths = max(0, round(frac * width * 8))
    full, part = divmod(eighths, 8)
    return "█" * full + (" ▏▎▍▌▋▊▉"[part] if part else "")


# --------------------------------------------------------------------------------------------- PNG


class _Font:
    def __init__(self, blob: str) -> None:
        data = zlib.decompress(base64.b64decode(blob))
        self.height, self.baseline = data[0], data[1]
        self.widths = list(data[2:2 + 95])
        self.glyphs: list[np.ndarray] = []
        pos = 2 + 95
        for w in self.widths:
            n = self.height * max(w, 1)
            self.glyphs.append(np.frombuffer(data[pos:pos + n], dtype=np.uint8).reshape(self.height, max(w, 1)))
            pos += n

    def index(self, ch: str) -> int:
        code = ord(ch)
        return code - 32 if 32 <= code < 127 else ord("?") - 32

    def width(self, text: str) -> int:
        return sum(self.widths[self.index(c)] for c in text)


_FONTS: dict[int, _Font] = {}


def _font(size: int) -> _Font:
    if size not in _FONTS:
        _FONTS[size] = _Font(_FONT_13 if size <= 13 else _FONT_17)
    return _FONTS[size]


class Canvas:
    """An RGB float image with antialiased drawing primitives."""

    def __init__(self, width: int, height: int, background: tuple[int, int, int] = (255, 255, 255)) -> None:
        self.w, self.h = width, height
        self.img = np.empty((height, width, 3), dtype=np.float32)
        self.img[:] = background

    def _blend(self, x0: int, y0: int, alpha: np.ndarray, colour: tuple[int, int, int]) -> None:
        h, w = alpha.shape
        xa, ya, xb, yb = max(x0, 0), max(y0, 0), min(x0 + w, self.w), min(y0 + h, self.h)
        if xa >= xb or ya >= yb:
            return
        a = alpha[ya - y0:yb - y0, xa - x0:xb - x0, None]
        region = self.img[ya:yb, xa:xb]
        region[:] = region * (1 - a) + np.asarray(colour, dtype=np.float32) * a

    def line(self, x0: float, y0: float, x1: float, y1: float, colour: tuple[int, int, int],
             width: float = 2.0) -> None:
        r = width / 2 + 1
        xa, ya = math.floor(min(x0, x1) - r), math.floor(min(y0, y1) - r)
        xb, yb = math.ceil(max(x0, x1) + r), math.ceil(max(y0, y1) + r)
        ys, xs = np.mgrid[ya:yb + 1, xa:xb + 1].astype(np.float32) + 0.5
        dx, dy = x1 - x0, y1 - y0
        length2 = dx * dx + dy * dy
        t = np.clip(((xs - x0) * dx + (ys - y0) * dy) / length2, 0, 1) if length2 else np.zeros_like(xs)
        dist = np.hypot(xs - (x0 + t * dx), ys - (y0 + t * dy))
        self._blend(xa, ya, np.clip(width / 2 + 0.5 - dist, 0, 1), colour)

    def disc(self, cx: float, cy: float, radius: float, colour: tuple[int, int, int]) -> None:
        xa, ya = math.floor(cx - radius - 1), math.floor(cy - radius - 1)
        size = math.ceil(2 * radius + 3)
        ys, xs = np.mgrid[ya:ya + size, xa:xa + size].astype(np.float32) + 0.5
        dist = np.hypot(xs - cx, ys - cy)
        self._blend(xa, ya, np.clip(radius + 0.5 - dist, 0, 1), colour)

    def text(self, x: float, y: float, text: str, colour: tuple[int, int, int] = (0, 0, 0), size: int = 13,
             anchor: str = "left", vertical: str = "top") -> int:
        """Draw ``text`` with its ``anchor`` (left, center, right) at x and its top (or middle) at y; returns the
        width in pixels."""
        font = _font(size)
        width = font.width(text)
        px = round(x - (width / 2 if anchor == "center" else width if anchor == "right" else 0))
        py = round(y - (font.height / 2 if vertical == "middle" else 0))
        for ch in text:
            i = font.index(ch)
            glyph = font.glyphs[i].astype(np.float32) / 255.0
            self._blend(px, py, glyph, colour)
            px += font.widths[i]
        return width

    def text_vertical(self, x: float, y: float, text: str, colour: tuple[int, int, int] = (0, 0, 0),
                      size: int = 13) -> None:
        """Text rotated 90° counter-clockwise, centred on (x, y)."""
        font = _font(size)
        width = font.width(text)
        strip = np.zeros((font.height, max(width, 1)), dtype=np.float32)
        px = 0
        for ch in text:
            i = font.index(ch)
            g = font.glyphs[i].astype(np.float32) / 255.0
            strip[:, px:px + g.shape[1]] = np.maximum(strip[:, px:px + g.shape[1]], g[:, : strip.shape[1] - px])
            px += font.widths[i]
        rot = np.rot90(strip)
        self._blend(round(x - rot.shape[1] / 2), round(y - rot.shape[0] / 2), rot, colour)

    def to_rgb8(self) -> np.ndarray:
        return np.clip(np.round(self.img), 0, 255).astype(np.uint8)


def png_bytes(rgb: np.ndarray) -> bytes:
    """Encode an (h, w, 3) uint8 array as a PNG (8-bit RGB, no filter)."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def nice_ticks(upper: float, n: int = 5) -> list[float]:
    """0 and round steps (1, 2, 2.5, 5 × 10^k) up to at least ``upper``."""
    if upper <= 0:
        return [0.0, 1.0]
    raw = upper / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    count = math.ceil(upper / step - 1e-9)
    return [round(i * step, 10) for i in range(count + 1)]


def _fmt_tick(v: float) -> str:
    if v >= 10000:
        return f"{v / 1000:.0f}k"
    if v >= 1000:
        return f"{v / 1000:.1f}k".replace(".0k", "k")
    if v == int(v):
        return str(int(v))
    return f"{v:g}"


def render_png(series: Sequence[Series], path: str | os.PathLike[str], *, title: str = "",
               subtitle: str = "", width: int = 1200, height: int = 560) -> Path:
    """Write the two-panel chart (tg, pp against depth; min–max whiskers) to ``path``; returns it."""
    c = Canvas(width, height)
    grey, axis, ink = (225, 225, 225), (90, 90, 90), (30, 30, 30)
    top = 16
    if title:
        c.text(width / 2, top, title, ink, 17, "center")
        top += 26
    if subtitle:
        c.text(width / 2, top, subtitle, axis, 13, "center")
        top += 20
    legend_h = 28 * math.ceil(len(series) / 4) + 18
    panel_top, panel_bottom = top + 18, height - legend_h - 44
    depths = sorted({d for s in series for d in s.depths}) or [0]
    x_lo, x_hi = min(depths), max(depths)
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    gap = 70
    panel_w = (width - 2 * 70 - gap - 20) / 2
    for p in range(2):
        left = 70 + p * (panel_w + gap)
        right = left + panel_w
        label = ("generation (tg)", "prompt processing (pp)")[p]
        values = [v for s in series for v in (s.tg_max or s.tg_tok_s if p == 0 else s.pp_max or s.pp_tok_s)]
        ticks = nice_ticks(max(values, default=1.0) * 1.05)
        y_hi = ticks[-1] or 1.0

        def X(d: float, left: float = left, right: float = right) -> float:
            return left + 8 + (d - x_lo) / (x_hi - x_lo) * (right - left - 16)

        def Y(v: float, y_hi: float = y_hi) -> float:
            return panel_bottom - v / y_hi * (panel_bottom - panel_top)

        for t in ticks:
            c.line(left, Y(t), right, Y(t), grey, 1.0)
            c.text(left - 6, Y(t), _fmt_tick(t), axis, 13, "right", "middle")
        last_x = -1e9
        for d in depths:
            c.line(X(d), panel_bottom, X(d), panel_bottom + 5, axis, 1.0)
            lbl = depth_label(d)
            w = _font(13).width(lbl)
            if X(d) - w / 2 > last_x + 6:
                c.text(X(d), panel_bottom + 8, lbl, axis, 13, "center")
                last_x = X(d) + w / 2
        c.line(left, panel_bottom, right, panel_bottom, axis, 1.2)
        c.line(left, panel_top, left, panel_bottom, axis, 1.2)
        c.text((left + right) / 2, panel_top - 20, f"{label}, tok/s", ink, 13, "center")
        c.text((left + right) / 2, panel_bottom + 26, "context depth (tokens)", axis, 13, "center")
        if p == 0:
            c.text_vertical(18, (panel_top + panel_bottom) / 2, "tokens per second", axis, 13)
        for i, s in enumerate(series):
            colour = PALETTE[i % len(PALETTE)]
            ys = s.tg_tok_s if p == 0 else s.pp_tok_s
            lo = s.tg_min if p == 0 else s.pp_min
            hi = s.tg_max if p == 0 else s.pp_max
            pts = [(X(d), Y(v)) for d, v in zip(s.depths, ys, strict=True)]
            for (xa, ya), (xb, yb) in itertools.pairwise(pts):
                c.line(xa, ya, xb, yb, colour, 2.4)
            dodge = (i - (len(series) - 1) / 2) * 7  # whiskers side by side, not on top of each other
            for k, (x, y) in enumerate(pts):
                if lo and hi:
                    wx = x + dodge
                    c.line(wx, Y(lo[k]), wx, Y(hi[k]), colour, 1.2)
                    c.line(wx - 3, Y(lo[k]), wx + 3, Y(lo[k]), colour, 1.2)
                    c.line(wx - 3, Y(hi[k]), wx + 3, Y(hi[k]), colour, 1.2)
                c.disc(x, y, 4.0, colour)
    # legend
    x0, y = 70.0, height - legend_h + 4
    for i, s in enumerate(series):
        colour = PALETTE[i % len(PALETTE)]
        if i and i % 4 == 0:
            x0, y = 70.0, y + 28
        c.line(x0, y + 8, x0 + 28, y + 8, colour, 2.4)
        c.disc(x0 + 14, y + 8, 4.0, colour)
        w = c.text(x0 + 36, y + 8, s.name, ink, 13, "left", "middle")
        x0 += 36 + max(w, 150) + 30
    return write_atomic(Path(path), png_bytes(c.to_rgb8()))


# DejaVu Sans, ASCII 32-126: height, baseline, 95 advance widths, then 8-bit coverage rows (zlib, base64).
_FONT_13 = (
    "eNrdWumR5KgS5kf1THX3TgTrASZgAiZgAibIBDzABEzAhDQBEzABE9g8QFXds32pqmdfPEWVQBKSkjy+PNDff50efjyf/3o6PWB7ejidzvt2Oj0/"
    "P//89fj4+HT++fR0Oj3+fH56Oj89nvH/6/H8+HB6eP7x43z+eT4/0PDz6Rfd9/ATj57p9On8rO68RYO74d7bvRr3mS0YE5QC5+Dl/hs3Y5Ux0k1R"
    "5SDd6lSnsxZg8E8p7WJ1uTj3YmiMLdMPBzs3XGjOaTztQYX821PvtbkopG+FXhZ6gYJnmpfzLUpr22ibZrYC1HkfiiLiTELXKrUxqrt63t5+bbM5"
    "0Vs2nKTufkNWmYYnSG5DqUJzl/6UZNsSqCY813HTMWpowISaqoldG/WLR+GrWObtyMNE5NGNtgE12grV92Kr3iAKWRV8EpkNu662bQ2rY8oTsqfu"
    "sGYYFUawTVnsYZcG16yVBhpgYdSRNjYDc5DcYMgYLv+jqkNaCURTJ93kI2arp2mHdchsN52Ewspr8ntYQOS4xkxy66mBNM6NtSO1UDnhrltSSDqy"
    "H84ZyTQqKm9yLKhIzHlfTNyIvGkE3wUMVzwe73VdjHHg373ofnjbN28OeRdBRB0PPmKM8X2EfSh5YpRHJSI0QCxG21IJ9adZVt0Ndaz6zxi/TZl0"
    "26IBduREwRt93/2UkTY4aePuvxqSYND6Y9UqE/xDb81Oj3Fo4hvLIfa6FOdQG8e4SS42lkRT7DkmwiYy8dTk2iatbqIxuc5G/96ocSMdDukgKacU"
    "U09yzs/nBaLDxFItt6lviwPTa6B8SKYZ5YhObLBctDsKBV5Q3zSJU8BzixhFrUZPQ23ZWC1sd+jnN4OBAcYFdTqJZfDuFn4IcESY7bTamJwVvQGe"
    "J3Jfl7b4offWk2NCPe3ID2C+OX3MC4ac+GE1Eg2xTvcXDDN4lAZoJmqgHji0jxHFN7bZRvT9geSUe+3MHn2IK5E3wy10mUoRL2SmU47thWf2kxu5"
    "TCXx10p9eAspUxQVe9yIvzRPcvI1Cd9tS5GwIlCL52jOmvjCOOJVyxQPIGi1xQ97TEtCzuxc+7bhc3h2oYsKIHjxMSluqd5XbHWE4qZCeuSfoegK"
    "ad9QP9JxsUyW/I7hn8P1zz3jBqf1AurmDM0mnNehjMJKgSFzmNbhW0v2Esr2uu0w4svYLmbxbYHGZ4xB0JZszTjZzItuANnCf0ikvXAoIBv1jifI"
    "9XCJsacVkGPunH6YuESw9exXWqbvSxy6G6KoYb4GDKLT1xS4ODUvMDO10oXrJt4pC72AssOkp07oCsIIxjeHtCB2W50jR/qh4zCnEcXwh8BDzq9S"
    "SsTpFA7A0xXPYrLROVmuRqWKmMnukyJt9G/BT2g0nHTp6WZRY3q8mMuhwMbOnEllwRUkJfY5K9X5vXVTqXAMpvmPAQeiOnl1jEJiRHfmu9xpJ8SX"
    "fCujAz6YTRnQoVZKOjixIQi8dPASFC2dtI+hcIg7YUjHEvADGWC+h1qGBJE8eW30Vje1Txu98soV5+yhH3JtoXVb8vIMTpslCBttgMQwTt/Is8DP"
    "Yc7wbJkRhjwb93aeCE3S03uPKJdenkx0mTwTMa9lexcTCjMyIBq5nRzZWz5/1b6+vtoFqcepCPKSsJ65GrgQaF5fe9Ec3jzGiV5NJYq17IG52wOf"
    "Kz1aiTgG7FOT6ESLqye6RKIlZepjwpI5HFJf2OTWXmYM8Y0eC6u97L1/R7ydj4uuj/73eAYCTsE8NtqP+WURoBl3yFViJwwpzEiroHZBA1iVqMul"
    "y2AlvQlk4XYhvqvI7zY3popBPAzbMvuY0AmEKPtDR8F4VL0y3XM3FLVlx110is1JV2UEpNn1aPSzS/7Y7Yh2wVt1J6TSS0EYZ0TRu15KAXn1Fm4y"
    "oatnhlnKk2H1TO9LKeOId6Q1c4AkgALkCwVQ0DlPv2SGW4DS4+JUjcs14SABFI+DuC5qOa/3rbcVZBxMfa4x1wu+Yuw4+bF8D0KYKL1VGFk1UhTI"
    "Uq1/ywP8D3Nsidb6vodCFuxxnjHTWlWLa36yYWKEjrTewZbqZIzOa7DuC0fiiox0vzXTCKkQXZlioLb7LLN8Vx5FkDLkOmA5sbDLL2g5rqN1KR8d"
    "il7jZWvA0cLb4cIn21thNu6+csQv99BvQ5oRGaZThuoFXOHDCLFNBt3q1Kc38CHVVRniggzVX/jlOXNpQoSqMQWQEkwuHHRzuWJaRetTtNsI94My"
    "TtkkLYmW8zyudCKVzJa66KtU0jNNKkaYoDhelqLYB9MR1IUiE8OsBLOsLYcuucygBSgpMjEKqS7hkmffVIZV37JFKYZqqchBkRxmY/Ha4SXTQp8g"
    "1S+c8nRp6Ba5PEq1ObozgdzpeIHT3UjuxsrgN86d0QWrUoQ4WgpsklXPaKXmbzUgM+3YSKd2UTE7kUq3tNKDyaA2s+BuZ4o1By5ntYouh33WIOB6"
    "f4389Y7SOYD0pg5oWVANxGBSbFoCoaUQQ7pJBk5LJLRUoujEW6KFMdT14tzHO0tan+ALRRC7B7q2w2IxyiIy2y2VTFWoWv1fbVKE+zczYQZYUTkP"
    "f54yI5FQqdCI6WQbhWMNDF2oZgTc2iGlLouooKlQlgc0LpEdXPRaK9WXVpZpIDWg+g80zdV0mJ4XZvAhJZqNr3NsvDWY9ulu1xkumdqGvHBcn1fa"
    "ytrBjNHmESOWRgKhw5AllUMwcNVqjFIGm0RNQ1YuytjNTF4/5P0rQy88vjbOzu8x+8kCMcMKhI9Eh+vIBSondwxaWY/t4oNAt+NFUOjtSKEJo0lQ"
    "G33lQUFWag2CLHG9uTu+zZVAP5lMepYmc+2/MBmy1jBocmMyWVaIw+YC+QKboISDuk5aA1sFDsxw9pyi0sMoS5mw/1b7ZVuLe2x2uJjx2WfgHCis"
    "AP8lfuytJoUCZzkehK3PsobAIzjJo2BWRum+fMBTfKYoc59M8IXiWbYMSCh0nyujLSFsJBUgOyPxsw7O+r4cxM8f/IHtzyrueyglYUPlAj5xLzZZ"
    "8sSgfBqyY0OmSJ2gnJJW29r8VMPaOwr2sNPC605fGUCyN4nlNu8xXnkl+PzLmQFopqTR25rPq92xzbKggdajZBoaBSpVP19GCzNH1PSlJk4PJyTR"
    "wFfqSbw8uUSGmVvDMHs/vN5RWOTauEOQJjH92y0lRhRyUc6UWVCt39fNS4bDn9MMrcmIaCGOEmD64M/1ufDWAn+ah6GfpINm1O8HGU9fdOH7kApN"
    "H1RQgkrJY8DUscg3AMUX3ekiDkobZq0cewycRxqcTUJXUjn7bkBkWyskLitp7daEVXoqCmSuAsSqHc/Jcv/edLAoycBJdeg7S/pTH8XL11TZQKoR"
    "bQZvLc+0VtZ98iL3KAjJl0/8MPlATKYpabRlpsycO96UPmcucaAlSh6/FuBftiZUnq1L1al3xom2iSRb+oTjga//30zaa5kVt5Lep9F1yRPNDDjX"
    "t1evx/EHtpg9d6f+1GZh9OwdxR/BY3IPNX5f7v4PbOiDZA=="
)

_FONT_17 = (
    "eNrdHNt13KpWP05OPLYv5+P+UwIlUAIlqASVQAcqgRJUAiVQAiVQAne/eNhxjseJNfa5WsnMRiMQsN8P/F919/2vp4t6vPsO33ff7r5d+vXt29PT"
    "04+/Hx4eHi/3j493d5cf/3l8vH98uNw/PPz9cP/w/dv3p7/+ur/8uNxDt7u7+7u/L/eXy/cf3y/3T/f3Py7fLk/LJ1/Wa/zy1V75ZduX+nmw50/+"
    "/qU9/NP4En7dr76VhX9q+WqX1dO0FEzU1fYTQntqrT0uS9oFjCXHWOE/tFa/1+CP6r0/pRtcycPU3M33Jv4MmqPUGjfEez1csnsgGlLtgQm0Nfuk"
    "WrcK3UxbzpqLbuO6usLGCwhr9Mdq4YEMt0zIteagfj0d3McPXbLzzGPLRpPdij9oqmumWWTP/1VhbCBhIzZ3mRAuIIbF1La8A+B1ib4xS6p1XzYY"
    "bPXMd4oHS3kv7aGAOwFP1LaPevERN9w2Ylh8ht2pPEXaKYB9ofF4ZntNDGhhb31b3lOr96u8UaUKlC+rWysQj9KDWgYnVj/1L7UjVqUUqLVGBV3M"
    "Qq0dlptx2yO0MpBhifyuAzefsQYtpE9T86qMLzymBaKqxcNvhjfGfNyytaeF/Pyh7Dn77EqnS9xb2td00FRwo1GsiJgX1THv+8q/Gdlq3ET8sQgG"
    "+C6SGi3gOvoRRpEZAQMpngwPxlMDBM7T6JrIMOUy57AorPu0sBgaP+CQ70ObFnKykUjA2qiAaU1MmWYKRLGrRYe4RZ9WeBieoy5WOFuZ5Wte6/5M"
    "q8d3t2ztl0cKhitm/LS/P+aXumpEzR6QF4By9vCxgs7CpWgP7aeuksTnMxl6Jf0QY5Rtkf0RIyTvS1MxLAFSID52xNR44zjIYiLBTIx8EPY3+yfi"
    "029K1ESOpRiSQyD1VcY5bPx23OijsuTyQ1IE0QeM8DiBrBhRlASaqEXRSHYH3MAlg65UG6mKRUXA5KGa0tRnoEo74S1TmOkQDNs2kGdPAb0PNbKB"
    "Iwx/Jska30wAMP5irploicllyIlYXwHBtuy6v1mK8HMTwaHbBq9BYPqg9PLUha8zDR2wGP2meZ9LTJXUJhk4OpeX3hbNtAhtuTZnD1PsVq5aSxrM"
    "Oaz+CaEe74YNBA+slVZcxwjGnoVU5fsM9r6nth4CKlAaAu65WRro+jGoUKIw6NFGIFDXHVYRKthgXQ3Fvspp914Dz+BMohziTttVYnOjl5/AZjrS"
    "s2zhmt1ZF+s+UbUe2LSvgPQAYtMd1I2wWWQAexY2XVPwCh3SUplPkdpsE6wN1XoRMQiWNggs4mMQzqt1BZkzyh7tCNomdP0A7XgA+q3KMU+TpM2m"
    "SdoT7CvL2ESB518KvJy7nBrICh1XqsSBqu6JxKK6hApjg/rUSx6xg62BRz3d8+rIBAwkELWBpu3p5aYZ/0S6rEJXvAtulbNrCc0vZa1nSrKAIXTc"
    "j6EsZ20qdz0uMpnFJRp9Q1WWXaNac9IyxTw4YJkla5IHMD1N2Eq5uxEsRGjqOfFdj+jFOFSu5MDX4HOiPQJHIPpJvG6dStjsMCCjHHuLpLAbzRp7"
    "rk8Q97bnsBTzloXbPj/p7WRgNwsyLLe/zN7ZVG+ihlGbgvFxMFm6UGpsQQkQ2fsw7vT8EzE9dptCSwqHDNM26D0/N7W/Xmjz2o2L/Vpftl7xdfjS"
    "L/3G/4fLhDnGasBk3c38a6lpmxwCsN+ARtREI2XsBP3IcsRSR3pO7ThoG8OWYD+PgBxrRpKlFV0tXJvplneKz+1OI2YpfCtRluqF3b7/JID6T7F+"
    "HlothpHj1g3sWIKzdssSw1WpuXusHDFo2+KmFL6y8KFAHhQMWyVQKSFglMzCD5VjHsgq5DBvciNbjg1T8K89QT42RnWjjBFg13WuKqT2FjSJQjPl"
    "aR7Gqh5600Vmqhpr6ljA3rR7zp0u3ZFrOdYP3kPtx4hbHSatqFAmlPXIw8dpFq4CC0OxlcH3AhtRMXMfMqbIYxNfhmQPGRWsutFJGPYUKPluUG03"
    "yImQR7CaOVKWTHcENmIXcQpiHXDi1bFVv46+u2rPKEcMJc/TUnq6znd45/vBo++e+jgjKXK2SMTl0+qRAyI4Chxy94pivc3MZPEVJ0u3ppfmyc/w"
    "sMHFNuvGtYgYDhbk1aJLRVuTCAGu6yN1Muq3Zy5ec/IYOYDZCYOwgm00FP7UnUWc/BUNjBe0hkXKkgZY57ZTQZnIKe76NmQgfrG3Q+37f/CLB7iR"
    "taBGN3tVtwkM9OJ1jBDPXeN4U5xn8jq0PV+dfbvHP0GnYnCDtYnCI04GLeEGK+vDT7z8kpmfcXPzCXivuOF5uzpDYyM0vxgbprE0Pc88bb2MlDji"
    "oTpX6/PpWUuEYEKAr+9pMGWHusyW8G+P9qvGKQu3nVDf/3GzF2EAiSKoFQWe0+9GrvabTNlgJoFAgggEM1aCIlYMWhA1jUjtiBQBojkPQc8agXmE"
    "0g2BMe78NoJPpN6BkRMAlrudts9VLo0bmR1FDCXhJ47rmFqE8WiOITdzixJTZWtNNNnXqlsTE1THMWyzI2IuujddxTqCYbkVDGOMpvP6uV23vN68"
    "/aUlGC8SjGOUIj8K5eClQZGvLlkogtkaFOXtMgft8t7A+OaQRqHq0dAlTHLK1zAaqswi0Ncbb83IOKEnRckYwyhC58EkbDUdZ0Ysk3xgPXQcpldq"
    "nNIuvYHFK13HoYAKw3RTqOPELdnp2eQMJmjoFS7PKg68S3siYYCdpieXo+ENrUgrXuneMAZrYwg3BrWa2zGqz30P89XMmK+O4jqheKtzHHR91jJ/"
    "7rkMRM+oHsheO1IMvZphPXmsG20aivo9tYh5irEOHYf51+6xSgqne7t68ljDIIAp4XVm6IoK9FTCakqSM5xMpchIGtbqyNgAMnOvTfBFqJtF6DEl"
    "hlyPgEnliPhzSEvBGeMSuuQbITuvJ1msvl91ti0nZXML6IxYnKj61Y+cOL7wTDjlxgKStgOfxxrJ6KhAiOxS7DzfY/WdcW3PGYJm7anE0mtVOOco"
    "icejUI3o0afPacqtsd42/C74Ni1QtlXT05nA9KVT9VFHQtPVsnzCZZgKLEeWgCYk3yx5c6wo4Pxr5RAgNg62LKjUiB6nDfCZCqMJ5mqgQHXTXJSA"
    "/WCxWNHE4x2VygddVfJG6IjlTTDI1oohPZUZpl2KFKEn7deepLoIN1DT3jV3eauZZcQnl4BtPB+Ffrnjye00JcoCs/QGSkqY11SCf7/3SR91ZMJB"
    "oXTBmUZaA/TmIaSLmQIlOQFSEk4MTde0bcslTLn0Mxa9Ncki4WCcVCxalk2pYZ4aqLs2lVii1BXp0jP1X0xUdhWw9nKtOfiVRtnBqH2arQwzHlYl"
    "9+xHKq/122bU936wObtMYk73nbFYHhZEtl2mMuUP/aI36KsqariagiocKafTKh+5ClIKIKUAnxI/WPK09NpkyvQsITGLqaXVSS7r1QkLCUEou704"
    "yvNhX/0Nfx5F37yaI/ktjEINv7aEIdNbyyOunKE3XHXe1O5XPCL0b7labv5NNjW+WR8NM1GkhvL/2u3Xq8S3LbgEiUhQm+VZ3SRVMbkjxlioQg2L"
    "7jDNzSSIv5IUZFu/WHAnKXSNpv7OFVDmo8nzzSJHAI1k4DwYPzGLlsWEb+A4Kfk9KPflkEeMfQQGqXeKUgVF+VQcYUV/WdMD4A51tXBeaOLVpARV"
    "BZMnj9E4KjLXUsq1cFU3Aw2L3T07mmsHEsUB+o2gihfy4cVZ/5iqcn7TDAasTCObamVphyA7pHSX9SydyuElUTdeJqXHOYceJeOnlS8cngEUJcmp"
    "K3vzwyiAqU0O64DphJkjsqkUIoFXh2FVqbzGeEpuNUTDIOkIY4wpi9Uvhmq0k5ao2B+yFx5PxLqBFSOYHqddA+aZSBy2OtRrP8+/kGxY48VONn6Q"
    "TZ7IZqKVl2TDByKKamQDu7u6I3HoJ9Wyu0GvG1dvEg7Ew8ITqcwy2ziz97ESTEt5KkmwIhIMcU6lHOwySNJn+UPwo8SynWv26fDkuHfFx81eRGfo"
    "8MxcIqm+vhtrv4bw9AtBVCSMEHsXAO0t3xDaKcHa/AqYkIDwnIDYV6FGlZEnx+MjcPSbH59tsFjU7JoCuWbiDsefvKl09Cm1A1BebruGIzlPUdXL"
    "G8tH3viqFp/99wmW96c7WCIHkNMkpim5QT4U20gbWHct7r913eDFTML6OtYMGAu09dCKS9bQnGgnhuytfS6m/FvZtNhNbNrXFZQ9TdkP/X4rs/DN"
    "gqpeO/CbWCOMpSLYauG+fpL7zTDMuc6EU3x0lM4kUcgbT+L12FaoB/9dByzn7+c4XMkTUQQYw2Kol6qS6G9WfFR+59lOaKB04DwvhWNXbN3GRG/Q"
    "pFWcw7I3Y9gWm/kjQeoY1Ivwua5R60bJuNvucxwc+eMYympJnyBHMXci3204Y/In6BAxNekHzgi46tqfUChBqpuBq6XmGfD1BYyNHgmmlZI4hEUr"
    "OjxVuwl50DkuxxDeOY64L4qPS9ulrD4DgGfHqjcVPF7Nh1lj3GA3ypoPsQUDngbnreTalF4zXjl/k79IyMw09FO1IiULVMqKMxogpo+WHll7tgfw"
    "ydSpckocVz+KMYUP3dFaV+wpPyyfRMl6UHLkA/xZVAnTOM43iOGopEAf+qyyuCO3LLob+cLcPPhW0N+F0rLH5uivVzshVwY01fPT6lriyVKagKE6"
    "I9LdyZRWQdneOtjxVxpOOvXuYstyqRpH0bi9KnzEAkN0TEylZaR8KGHSHvrqwew4GaFK6ggxIe7vWRT/3aKzP6+8aj56iNKl/J4AhBr7Mmhzr20z"
    "wDVthwfd2Lip2xuv8L5bEPFmJfm/a5FykFw7qhHCKvDg+eQCVi6ZPbXTkp94/Q8Vy+wR"
)
