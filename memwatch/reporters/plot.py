"""A dependency-free line-chart rasterizer (numpy only) for the entropy-profile pictures."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["BUCKET_COLORS", "nice_ticks", "render_profiles", "tick_label"]

# 3x5 glyphs, rows top to bottom, "#" on. Upper case is drawn as lower case.
_GLYPHS = {
    "0": "### #.# #.# #.# ###",
    "1": ".#. ##. .#. .#. ###",
    "2": "### ..# ### #.. ###",
    "3": "### ..# ### ..# ###",
    "4": "#.# #.# ### ..# ..#",
    "5": "### #.. ### ..# ###",
    "6": "### #.. ### #.# ###",
    "7": "### ..# ..# ..# ..#",
    "8": "### #.# ### #.# ###",
    "9": "### #.# ### ..# ###",
    ".": "... ... ... ... .#.",
    "-": "... ... ### ... ...",
    "+": "... .#. ### .#. ...",
    "%": "#.# ..# .#. #.. #.#",
    ":": "... .#. ... .#. ...",
    "(": ".#. #.. #.. #.. .#.",
    ")": ".#. ..# ..# ..# .#.",
    "/": "..# ..# .#. #.. #..",
    "_": "... ... ... ... ###",
    "=": "... ### ... ### ...",
    " ": "... ... ... ... ...",
    "a": ".#. #.# ### #.# #.#",
    "b": "##. #.# ##. #.# ##.",
    "c": ".## #.. #.. #.. .##",
    "d": "##. #.# #.# #.# ##.",
    "e": "### #.. ##. #.. ###",
    "f": "### #.. ##. #.. #..",
    "g": ".## #.. #.# #.# .##",
    "h": "#.# #.# ### #.# #.#",
    "i": "### .#. .#. .#. ###",
    "j": "..# ..# ..# #.# .#.",
    "k": "#.# #.# ##. #.# #.#",
    "l": "#.. #.. #.. #.. ###",
    "m": "#.# ### ### #.# #.#",
    "n": "##. #.# #.# #.# #.#",
    "o": ".#. #.# #.# #.# .#.",
    "p": "##. #.# ##. #.. #..",
    "q": ".#. #.# #.# ##. .##",
    "r": "##. #.# ##. #.# #.#",
    "s": ".## #.. .#. ..# ##.",
    "t": "### .#. .#. .#. .#.",
    "u": "#.# #.# #.# #.# ###",
    "v": "#.# #.# #.# #.# .#.",
    "w": "#.# #.# ### ### #.#",
    "x": "#.# #.# .#. #.# #.#",
    "y": "#.# #.# .#. .#. .#.",
    "z": "### ..# .#. #.. ###",
    "?": "### ..# .#. ... .#.",
}
_FONT = {
    ch: np.array([[c == "#" for c in row] for row in rows.split()], dtype=bool)
    for ch, rows in _GLYPHS.items()
}

# One color per bucket (metrics.BUCKET_NAMES order): cool for unmemorized, hot for memorized.
BUCKET_COLORS = {
    "0-20": (70, 110, 180),
    "20-40": (60, 160, 170),
    "40-60": (90, 170, 80),
    "60-80": (225, 160, 40),
    "80-99": (225, 95, 40),
    "exact": (190, 30, 60),
}
_FALLBACK = [(120, 120, 120), (150, 80, 160), (40, 40, 40)]
_INK = np.array((40, 40, 40), dtype=np.uint8)
_GRID = np.array((225, 225, 225), dtype=np.uint8)


def _text(
    img: np.ndarray, x: int, y: int, text: str, color: Sequence[int] = (40, 40, 40), scale: int = 2
) -> int:
    """Draw text with its top-left at (x, y); returns the x after it."""
    col = np.array(color, dtype=np.uint8)
    for ch in text:
        glyph = _FONT.get(ch.lower(), _FONT["?"])
        big = np.kron(glyph, np.ones((scale, scale), dtype=bool))
        h, w = big.shape
        y0, x0 = max(0, y), max(0, x)
        y1, x1 = min(img.shape[0], y + h), min(img.shape[1], x + w)
        if y1 > y0 and x1 > x0:
            region = img[y0:y1, x0:x1]
            region[big[y0 - y : y1 - y, x0 - x : x1 - x]] = col
        x += w + scale
    return x


def _text_width(text: str, scale: int = 2) -> int:
    return len(text) * 4 * scale - scale


def _line(
    img: np.ndarray, x0: float, y0: float, x1: float, y1: float, color: np.ndarray, width: int = 2
) -> None:
    n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
    xs = np.rint(np.linspace(x0, x1, n)).astype(int)
    ys = np.rint(np.linspace(y0, y1, n)).astype(int)
    for dx in range(width):
        for dy in range(width):
            xx, yy = xs + dx - width // 2, ys + dy - width // 2
            ok = (xx >= 0) & (xx < img.shape[1]) & (yy >= 0) & (yy < img.shape[0])
            img[yy[ok], xx[ok]] = color


def nice_ticks(
    lo: float, hi: float, target: int = 5, *, integer: bool = False, cover: bool = True
) -> list[float]:
    """Axis ticks at a 1, 2 or 5 x 10^k step giving about `target` intervals over [lo, hi].

    cover: from the tick at or below lo to the one at or above hi (a y axis spans them); else only the ticks
    inside [lo, hi] (an x axis keeps the data's range). integer: no step below 1 (training steps, positions)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [0.0, 1.0]
    lo, hi = min(lo, hi), max(lo, hi)
    span = hi - lo
    if span <= 0:  # one value: an axis of one unit (or of the value's size) above it, never a zero scale
        if not cover:
            return [lo]
        span = abs(hi) or 1.0
        hi = lo + span
    raw = span / max(1, target)
    mag = 10.0 ** math.floor(math.log10(raw))
    eps = 1e-9  # float noise must not add or drop a tick at a value that is a multiple of the step

    def bounds(step: float) -> tuple[int, int]:
        if cover:
            return math.floor(lo / step + eps), math.ceil(hi / step - eps)
        return math.ceil(lo / step - eps), math.floor(hi / step + eps)

    if cover:  # the smallest step giving at most `target` intervals: the axis ends close above the data
        step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw * (1 - 1e-9))
    else:
        # Ticks only inside the range can be far fewer than the intervals (-16..15 by 10: three), so the step
        # whose tick count comes closest to target + 1, the larger on a tie.
        steps = [m * mag * f for f in (0.1, 1, 10) for m in (1, 2, 5)]
        step = min(steps, key=lambda s: (abs(bounds(s)[1] - bounds(s)[0] - target), -s))
    if integer:
        step = max(step, 1.0)
    first, last = bounds(step)
    # k * step, rounded, so that 3 x 0.2 reads 0.6 and not 0.6000000000000001.
    return [round(k * step, 12) + 0.0 for k in range(first, last + 1)]


def tick_label(value: float, ticks: Sequence[float], *, percent: bool = False) -> str:
    """A tick's label with as many decimals as the ticks' step needs (0.5, 1.0, 1.5 -> "0.5", "1.0", "1.5")."""
    step = abs(ticks[1] - ticks[0]) if len(ticks) > 1 else abs(value) or 1.0
    if percent:
        value, step = value * 100, step * 100
    decimals = max(0, -math.floor(math.log10(step) + 1e-9)) if step > 0 else 0
    return f"{value:.{decimals}f}" + ("%" if percent else "")


def render_profiles(
    profiles: Mapping[str, Sequence[float]],
    entropy_window: int,
    *,
    title: str = "",
    counts: Mapping[str, int] | None = None,
    width: int = 560,
    height: int = 320,
) -> np.ndarray:
    """Mean entropy profile per bucket as lines across the prefix/continuation boundary. uint8 [H, W, 3].

    x: position relative to the boundary (-w .. m-1; the dashed line is where generation starts);
    y: entropy in nats.
    """
    img = np.full((height, width, 3), 255, dtype=np.uint8)
    left, right, top, bottom = 46, 120, 28, 34
    pw, ph = width - left - right, height - top - bottom
    lengths = [len(v) for v in profiles.values()]
    n = max(lengths) if lengths else entropy_window + 1
    finite = [float(x) for v in profiles.values() for x in v if math.isfinite(x)]
    yticks = nice_ticks(min(0.0, *finite) if finite else 0.0, max(finite, default=1.0), 4)
    ymin, ymax = yticks[0], yticks[-1]

    def px(i: float) -> float:
        return left + (i / max(1, n - 1)) * pw

    def py(v: float) -> float:
        return top + ph - (v - ymin) / (ymax - ymin) * ph

    for value in yticks:  # horizontal grid and y ticks, at 1/2/5 steps
        y = round(py(value))
        img[y, left : left + pw + 1] = _GRID
        label = tick_label(value, yticks)
        _text(img, left - 6 - _text_width(label), y - 5, label)
    img[top : top + ph + 1, left] = _INK
    img[top + ph, left : left + pw + 1] = _INK
    bx = round(
        px(entropy_window - 0.5)
    )  # the boundary sits between the last prefix and first generated position
    for y in range(top, top + ph, 6):
        img[y : y + 3, bx] = _INK
    for i, label in ((0, f"-{entropy_window}"), (entropy_window, "0"), (n - 1, f"+{n - 1 - entropy_window}")):
        x = round(px(i))
        img[top + ph : top + ph + 4, x] = _INK
        _text(img, x - _text_width(label) // 2, top + ph + 7, label)
    _text(
        img,
        left + pw // 2 - _text_width("position vs boundary") // 2,
        height - 12,
        "position vs boundary",
        scale=2,
    )
    _text(img, 4, 6, title[:60])
    _text(img, left + pw - _text_width("nats"), 6, "nats")

    ly = top
    for j, (name, values) in enumerate(profiles.items()):
        color = np.array(BUCKET_COLORS.get(name, _FALLBACK[j % len(_FALLBACK)]), dtype=np.uint8)
        v = np.asarray(values, dtype=float)
        for i in range(len(v) - 1):
            if np.isfinite(v[i]) and np.isfinite(v[i + 1]):
                _line(img, px(i), py(v[i]), px(i + 1), py(v[i + 1]), color)
        img[ly : ly + 10, left + pw + 12 : left + pw + 26] = color
        label = name + (f" ({counts[name]})" if counts and name in counts else "")
        _text(img, left + pw + 30, ly, label)
        ly += 18
    return img
