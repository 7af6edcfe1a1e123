"""A dependency-free line-chart rasterizer (numpy only) for the entropy-profile pictures."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["BUCKET_COLORS", "render_profiles"]

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


def _nice_max(value: float) -> float:
    if not math.isfinite(value) or value <= 0:
        return 1.0
    exp = 10 ** math.floor(math.log10(value))
    for mult in (1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10):
        if mult * exp >= value:
            return mult * exp
    return 10 * exp


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
    ymax = _nice_max(max((float(np.nanmax(v)) for v in profiles.values() if len(v)), default=1.0))

    def px(i: float) -> float:
        return left + (i / max(1, n - 1)) * pw

    def py(v: float) -> float:
        return top + ph - (v / ymax) * ph

    for frac in (0.0, 0.25, 0.5, 0.75, 1.0):  # horizontal grid and y ticks
        y = round(py(frac * ymax))
        img[y, left : left + pw + 1] = _GRID
        label = f"{frac * ymax:.3g}"
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
