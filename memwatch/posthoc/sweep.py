"""Sweeps over prefix length k, continuation length m and model size: one greedy extraction per (model, k)."""

from __future__ import annotations

import html
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from memwatch.posthoc.scan import Checkpoint, ScanError
from memwatch.reporters.plot import nice_ticks, tick_label

__all__ = [
    "SweepModel",
    "SweepResult",
    "format_parameters",
    "render_sweep_html",
    "render_sweep_json",
    "render_sweep_text",
    "sweep",
]

# Alignment. Every probe is cut to its first K + M tokens (K = max prefix length, M = max continuation length) and
# the continuation always starts at token K: for prefix length k the model sees tokens [K - k, K) and must
# reproduce [K, K + m). All (k, m) cells thus score the same continuations, so a change across k is the context's
# effect alone, and a change across m is the same greedy path judged over more of its tokens.
#
# One pass per (model, k). Greedy decoding is deterministic given the prefix, so the first m tokens of an
# M-token greedy continuation are the m-token greedy continuation: exact at m iff prefix_match_len >= m, and the
# match count at m is the number of agreements among the first m generated tokens.


@dataclass(frozen=True)
class SweepModel:
    """One swept model: its label in tables, where it came from and its size (unique parameters, embeddings
    included, as model families count them)."""

    label: str
    path: str | None
    parameters: int

    @property
    def size(self) -> str:
        return format_parameters(self.parameters)


@dataclass
class SweepResult:
    """Per-probe outcomes of a sweep, models in order of size, lengths ascending.

    prefix_match_len[(label, k)]: int64 [N], leading generated tokens equal to the true continuation (of at most
    M tokens). match_count[(label, k)]: int64 [N, len(suffix_lens)], agreements among the first m generated tokens
    for each m (None in mode "exact", which decodes nothing). `extractions` logs every engine call: its length is
    the sweep's cost in extraction passes.
    """

    models: list[SweepModel]
    prefix_lens: tuple[int, ...]
    suffix_lens: tuple[int, ...]
    mode: str
    probe_ids: list[str]  # content ids of the K + M token windows
    groups: np.ndarray  # object [N]
    dropped: int  # probes shorter than K + M, left out
    prefix_match_len: dict[tuple[str, int], np.ndarray]
    match_count: dict[tuple[str, int], np.ndarray] | None
    extractions: list[dict[str, Any]] = field(default_factory=list)

    @property
    def continuation_start(self) -> int:
        """K: the token of each probe where every continuation starts."""
        return max(self.prefix_lens)

    def group_names(self) -> list[str]:
        from memwatch.probes import GROUP_ORDER

        present = list(dict.fromkeys(self.groups.tolist()))
        return [g for g in GROUP_ORDER if g in present] + [g for g in present if g not in GROUP_ORDER]

    def exact(self, model: str, k: int, m: int) -> np.ndarray:
        """bool [N]: the m-token greedy continuation from the k-token prefix equals the true one."""
        self._check(k, m)
        return self.prefix_match_len[(model, k)] >= m

    def match_ratio(self, model: str, k: int, m: int) -> np.ndarray | None:
        """float [N]: the share of the first m generated tokens equal to the true ones (None in mode "exact")."""
        self._check(k, m)
        if self.match_count is None:
            return None
        return self.match_count[(model, k)][:, self.suffix_lens.index(m)] / m

    def _check(self, k: int, m: int) -> None:
        if k not in self.prefix_lens or m not in self.suffix_lens:
            raise KeyError(
                f"(k={k}, m={m}) is not in the sweep (k in {self.prefix_lens}, m in {self.suffix_lens})"
            )

    def cells(self) -> list[dict[str, Any]]:
        """One row per group (and "all" with several groups), model, k and m: n, extracted, rate, mean match
        ratio."""
        names = self.group_names()
        scopes = [(g, self.groups == g) for g in names]
        if len(names) > 1:
            scopes.append(("all", np.ones(len(self.groups), bool)))
        rows = []
        for group, rows_in in scopes:
            n = int(rows_in.sum())
            for model in self.models:
                for k in self.prefix_lens:
                    for m in self.suffix_lens:
                        hit = self.exact(model.label, k, m)[rows_in]
                        ratio = self.match_ratio(model.label, k, m)
                        rows.append(
                            {
                                "group": group,
                                "model": model.label,
                                "parameters": model.parameters,
                                "prefix_len": k,
                                "suffix_len": m,
                                "n": n,
                                "extracted": int(hit.sum()),
                                "rate": float(hit.mean()) if n else None,
                                "mean_match_ratio": (
                                    float(ratio[rows_in].mean()) if ratio is not None and n else None
                                ),
                            }
                        )
        return rows

    def to_dict(self) -> dict[str, Any]:
        """Everything as JSON-ready values: spec, models, extraction log, rate cells and per-probe match lengths
        (probe ids and groups only; no text)."""
        return {
            "spec": {
                "prefix_lens": list(self.prefix_lens),
                "suffix_lens": list(self.suffix_lens),
                "continuation_start": self.continuation_start,
                "mode": self.mode,
                "memorized": "exact: prefix_match_len >= m",
            },
            "models": [{"label": m.label, "path": m.path, "parameters": m.parameters} for m in self.models],
            "probes": {"n": len(self.probe_ids), "dropped_short": self.dropped, "ids": self.probe_ids},
            "groups": self.groups.tolist(),
            "extractions": self.extractions,
            "cells": self.cells(),
            "prefix_match_len": {
                m.label: {str(k): self.prefix_match_len[(m.label, k)].tolist() for k in self.prefix_lens}
                for m in self.models
            },
        }


def format_parameters(n: int) -> str:
    """A parameter count as model families name it: 70.4M, 1.4B, 12.0K."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def _lengths(values: Sequence[int], name: str) -> tuple[int, ...]:
    out = sorted(set(values))
    if not out or any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in out):
        raise ScanError(f"{name} must be one or more positive integers; got {list(values)!r}")
    return tuple(out)


def _count_parameters(model: Any) -> int:
    # parameters() yields a tied embedding once, so tied input/output embeddings are not double counted.
    return int(sum(p.numel() for p in model.parameters()))


def _labels(sources: Sequence[str | tuple[str, Any]]) -> list[str]:
    """Short, distinct labels: a directory's name or a hub id, numbered when two coincide."""
    raw = [
        s[0] if isinstance(s, tuple) else (os.path.basename(os.path.normpath(s)) if os.path.isdir(s) else s)
        for s in sources
    ]
    seen: dict[str, int] = {}
    out = []
    for label in raw:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if raw.count(label) == 1 else f"{label}#{seen[label]}")
    return out


def _probes(
    probes: str | Sequence[Any] | None,
    sample_from: str | None,
    samples: int,
    seed: int,
    tokenizer: Any,
    k_max: int,
    m_max: int,
) -> tuple[list[Any], int]:
    """(probes of at least K + M tokens, how many shorter ones were dropped), de-duplicated by content."""
    from memwatch.posthoc.scan import _dataset_file, load_probes
    from memwatch.probes import Panel, probes_from_user, sample_windows

    found: list[Any] = []
    if probes is not None:
        if isinstance(probes, str):
            items, manifest = load_probes(probes, tokenizer=tokenizer)
            if manifest is not None:
                raise ScanError(
                    f"{probes} is a canary manifest: its canaries fix their prefix and secret lengths, so they "
                    "cannot be swept; give a history, JSONL probes or --sample-from"
                )
        else:
            items = list(probes)
        try:
            found.extend(probes_from_user(items, tokenizer=tokenizer))
        except ValueError as exc:
            raise ScanError(str(exc)) from exc
    if sample_from is not None:
        # Windows of exactly K + M tokens whose continuation [K, K + M) lies in trained tokens.
        dataset = _dataset_file(sample_from, tokenizer)
        found.extend(
            sample_windows(dataset, samples, prefix_len=k_max, suffix_len=m_max, group="train", seed=seed)
        )
    panel = Panel(found)
    dropped = panel.filter_short(k_max + m_max)
    if not len(panel):
        raise ScanError(
            f"no probe has max(prefix lens) + max(suffix lens) = {k_max + m_max} tokens"
            + (f" ({dropped} shorter ones dropped)" if dropped else "")
            + "; use longer probes or smaller lengths"
        )
    return list(panel), dropped


def sweep(
    models: Sequence[str | tuple[str, Any]],
    *,
    prefix_lens: Sequence[int],
    suffix_lens: Sequence[int],
    probes: str | Sequence[Any] | None = None,
    sample_from: str | None = None,
    samples: int = 512,
    seed: int = 0,
    tokenizer: str | None = None,
    device: str = "cpu",
    dtype: str = "fp32",
    batch_size: int | None = None,
    mode: str = "full",
    on_extract: Callable[[str, int, Any], None] | None = None,
    on_batch: Callable[[int, int], None] | None = None,
) -> SweepResult:
    """Extraction rates over every prefix length k, continuation length m and model, one extraction per (model, k).

    models: model directories or hub ids (loaded one at a time, in `dtype` on `device`), or (label, model) pairs of
        loaded models (used where they are). Results list them by parameter count.
    probes: a probe file as `scan` takes (a history's panel or JSONL; not a canary manifest), or a list of token
        lists / Probes / dicts; sample_from: a dataset file to sample `samples` windows of K + M tokens from.
    Every probe needs K + M tokens (K = max(prefix_lens), M = max(suffix_lens)); shorter ones are dropped and
    counted. The continuation starts at token K for every k, so all cells score the same continuations.
    mode: "full" (greedy decoding; match ratios too) or "exact" (one teacher-forced pass; exactness only, which
        teacher forcing gives exactly: greedy agrees with its argmax up to the first divergence).
    on_extract(label, k, result) is called after each engine call with its ExtractionResult.
    """
    from memwatch.engine import (
        extraction as engine,
    )  # looked up per call, so a wrapped engine.extract is used
    from memwatch.posthoc.scan import _Loader, _tokenizer

    ks, ms = _lengths(prefix_lens, "prefix lengths"), _lengths(suffix_lens, "suffix lengths")
    k_max, m_max = ks[-1], ms[-1]
    if not models:
        raise ScanError("give at least one model")
    if probes is None and sample_from is None:
        raise ScanError("give --probes FILE (a history or JSONL) or --sample-from DATASET")
    if mode not in engine.MODES:
        raise ScanError(f"mode must be one of {engine.MODES}; got {mode!r}")
    first = models[0]
    tok = _tokenizer(tokenizer or (first if isinstance(first, str) and os.path.isdir(first) else None))
    panel, dropped = _probes(probes, sample_from, samples, seed, tok, k_max, m_max)
    # [N, K + M]: each probe's first K + M tokens; the continuation is columns [K, K + M).
    tokens = np.array([p.tokens[: k_max + m_max] for p in panel], dtype=np.int64)
    truth = tokens[:, k_max:]  # [N, M]
    labels = _labels(models)
    swept: list[SweepModel] = []
    pml: dict[tuple[str, int], np.ndarray] = {}
    counts: dict[tuple[str, int], np.ndarray] | None = {} if mode == "full" else None
    log: list[dict[str, Any]] = []
    for source, label in zip(models, labels, strict=True):
        if isinstance(source, tuple):
            model, path = source[1], None
        else:
            # a model directory, or a PEFT adapter on its base, as scan loads them
            model, path = _Loader(device, dtype, None, None)(Checkpoint(source, 0, source)), source
        swept.append(SweepModel(label, path, _count_parameters(model)))
        for k in ks:
            # [N, k + M]: the k tokens before the continuation, then the M of it
            window = np.ascontiguousarray(tokens[:, k_max - k :])
            started = time.perf_counter()
            try:
                res = engine.extract(
                    model,
                    window,
                    prefix_len=k,
                    suffix_len=m_max,
                    batch_size=batch_size,
                    mode=mode,
                    progress=on_batch,
                )
            except ValueError as exc:
                raise ScanError(f"{label}, prefix length {k}: {exc}") from exc
            log.append(
                {
                    "model": label,
                    "prefix_len": k,
                    "suffix_len": m_max,
                    "rows": len(res),
                    "seconds": round(time.perf_counter() - started, 4),
                    "decoding": res.decoding,
                    "near_ties": int(res.near_tie.sum()),
                }
            )
            pml[(label, k)] = res.prefix_match_len.astype(np.int64)
            if counts is not None:
                agree = np.asarray(res.generated) == truth  # [N, M]
                counts[(label, k)] = np.stack([agree[:, :m].sum(1) for m in ms], axis=1).astype(np.int64)
            if on_extract is not None:
                on_extract(label, k, res)
        if path is not None:
            del model  # one model in memory at a time: a family's largest may barely fit
            _free(device)
    order = sorted(range(len(swept)), key=lambda i: swept[i].parameters)
    return SweepResult(
        models=[swept[i] for i in order],
        prefix_lens=ks,
        suffix_lens=ms,
        mode=mode,
        probe_ids=[p.id for p in panel],
        groups=np.array([p.group for p in panel], dtype=object),
        dropped=dropped,
        prefix_match_len=pml,
        match_count=counts,
        extractions=log,
    )


def _free(device: str) -> None:
    import gc

    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


# --- rendering ------------------------------------------------------------------------------------------------------


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _tables(result: SweepResult) -> list[tuple[str, list[str], list[list[str]]]]:
    """(caption, headers, rows) per group and statistic: rows model x k, columns m."""
    cells = {(c["group"], c["model"], c["prefix_len"], c["suffix_len"]): c for c in result.cells()}
    groups = list(dict.fromkeys(c[0] for c in cells))
    stats = [("rate", "extraction rate (exact at m)")]
    if result.match_count is not None:
        stats.append(("mean_match_ratio", "mean match ratio over the first m tokens"))
    out = []
    for group in groups:
        for stat, what in stats:
            n = cells[(group, result.models[0].label, result.prefix_lens[0], result.suffix_lens[0])]["n"]
            rows = [
                [model.label, model.size, str(k)]
                + [_rate(cells[(group, model.label, k, m)][stat]) for m in result.suffix_lens]
                for model in result.models
                for k in result.prefix_lens
            ]
            out.append((f"{group} ({n} probes): {what}", ["model", "params", "k"], rows))
    return out


def _header(result: SweepResult) -> str:
    n = len(result.probe_ids)
    dropped = f", {result.dropped} shorter dropped" if result.dropped else ""
    return (
        f"{n} probes{dropped}; continuation at token {result.continuation_start} of each (prefix: the k tokens "
        f"before it); mode {result.mode}; {len(result.extractions)} extraction(s), one per model and k"
    )


def render_sweep_text(result: SweepResult) -> str:
    """Plain-text tables: per group, rows model x k, columns m."""
    lines = [f"memwatch sweep: {_header(result)}", ""]
    for caption, head, rows in _tables(result):
        head = head + [f"m={m}" for m in result.suffix_lens]
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        lines.append(caption)
        for r in [head, *rows]:
            # model name left-aligned, numbers right-aligned so their digits line up
            lines.append(
                "  ".join(
                    c.ljust(w) if i == 0 else c.rjust(w)
                    for i, (c, w) in enumerate(zip(r, widths, strict=True))
                )
            )
        lines.append("")
    return "\n".join(lines)


def render_sweep_json(result: SweepResult) -> str:
    """SweepResult.to_dict as indented JSON."""
    return json.dumps(result.to_dict(), indent=1, allow_nan=False) + "\n"


_COLORS = ["#3b6fb6", "#d9622b", "#3c9d5d", "#a23b72", "#8c6d1f", "#5b5b5b", "#1f8a8a", "#b8860b"]
_DASHES = ["", "6 4", "2 3", "9 3 2 3"]


def _svg_chart(
    title: str,
    x_label: str,
    x_names: Sequence[str],
    lines: Sequence[tuple[str, int, int, Sequence[float | None]]],
    colors: Sequence[str],
    dashes: Sequence[str],
) -> str:
    """An SVG line chart over categorical x positions (equally spaced: k and m usually double, model sizes grow
    geometrically, so equal spacing reads as a log axis). lines: (tooltip, colour index, dash index, y per x);
    the legend names the colours, then the dash styles, when there is more than one."""
    w, h, left, right, top, bottom = 560, 260, 52, 150, 28, 36
    ys = [y for *_, values in lines for y in values if y is not None]
    yticks = nice_ticks(0.0, max([*ys, 0.0]) or 1.0, 5)  # rates read against zero
    y0, y1 = yticks[0], yticks[-1]
    n = len(x_names)
    sx = lambda i: left + (i + 0.5) / n * (w - left - right)  # noqa: E731
    sy = lambda y: top + (y1 - y) / ((y1 - y0) or 1) * (h - top - bottom)  # noqa: E731
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img" aria-label="{html.escape(title)}">',
        f'<text x="{left}" y="16" class="t">{html.escape(title)}</text>',
    ]
    for value in yticks:
        y = sy(value)
        parts.append(
            f'<line x1="{left}" x2="{w - right}" y1="{y:.1f}" y2="{y:.1f}" class="g"/>'
            f'<text x="{left - 6}" y="{y:.1f}" class="a" text-anchor="end" dominant-baseline="middle">'
            f"{tick_label(value, yticks, percent=True)}</text>"
        )
    for i, name in enumerate(x_names):
        parts.append(
            f'<line x1="{sx(i):.1f}" x2="{sx(i):.1f}" y1="{h - bottom}" y2="{h - bottom + 4}" class="k"/>'
            f'<text x="{sx(i):.1f}" y="{h - bottom + 16}" class="a" text-anchor="middle">{html.escape(name)}</text>'
        )
    parts.append(
        f'<line x1="{left}" x2="{w - right}" y1="{h - bottom}" y2="{h - bottom}" class="k"/>'
        f'<text x="{(left + w - right) / 2}" y="{h - 4}" class="a" text-anchor="middle">{html.escape(x_label)}</text>'
    )
    for name, c, d, values in lines:
        color, dash = _COLORS[c % len(_COLORS)], _DASHES[d % len(_DASHES)]
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        points = [(sx(i), sy(y)) for i, y in enumerate(values) if y is not None and math.isfinite(y)]
        pts = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
        parts.append(
            f'<polyline fill="none" stroke="{color}" stroke-width="2"{dash_attr} points="{pts}">'
            f"<title>{html.escape(name)}</title></polyline>"
        )
        parts.extend(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{color}"/>' for x, y in points)
    ly = top
    legend = [(name, _COLORS[i % len(_COLORS)], "") for i, name in enumerate(colors)]
    if len(dashes) > 1:
        legend += [(name, "#444", _DASHES[i % len(_DASHES)]) for i, name in enumerate(dashes)]
    for i, (name, color, dash) in enumerate(legend):
        ly += 4 if i == len(colors) else 0  # a gap between the colours' entries and the dash styles'
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        parts.append(
            f'<line x1="{w - right + 10}" x2="{w - right + 32}" y1="{ly + 5}" y2="{ly + 5}" stroke="{color}" '
            f'stroke-width="3"{dash_attr}/><text x="{w - right + 38}" y="{ly + 9}" class="a">{html.escape(name)}</text>'
        )
        ly += 14
    parts.append("</svg>")
    return "<figure>" + "".join(parts) + "</figure>"


def _charts(result: SweepResult, group: str) -> list[str]:
    """Chen et al.'s three views of one group's extraction rate: against k (colour: m, dash: model), against m
    (colour: k, dash: model) and, with several models, against model size (colour: k, dash: m)."""
    rate = {
        (c["model"], c["prefix_len"], c["suffix_len"]): c["rate"]
        for c in result.cells()
        if c["group"] == group
    }
    ks, ms, models = result.prefix_lens, result.suffix_lens, result.models
    names = [f"{m.label} ({m.size})" for m in models]
    charts = [
        _svg_chart(
            f"{group}: extraction rate vs prefix length k",
            "k (tokens of context)",
            [str(k) for k in ks],
            [
                (f"{model.label}, m={m}", j, i, [rate[(model.label, k, m)] for k in ks])
                for i, model in enumerate(models)
                for j, m in enumerate(ms)
            ],
            [f"m={m}" for m in ms],
            names,
        ),
        _svg_chart(
            f"{group}: extraction rate vs continuation length m",
            "m (tokens to reproduce)",
            [str(m) for m in ms],
            [
                (f"{model.label}, k={k}", j, i, [rate[(model.label, k, m)] for m in ms])
                for i, model in enumerate(models)
                for j, k in enumerate(ks)
            ],
            [f"k={k}" for k in ks],
            names,
        ),
    ]
    if len(models) > 1:
        charts.append(
            _svg_chart(
                f"{group}: extraction rate vs model size",
                "parameters",
                [m.size for m in models],
                [
                    (f"k={k}, m={m}", j, i, [rate[(model.label, k, m)] for model in models])
                    for i, m in enumerate(ms)
                    for j, k in enumerate(ks)
                ],
                [f"k={k}" for k in ks],
                [f"m={m}" for m in ms],
            )
        )
    return charts


def render_sweep_html(result: SweepResult) -> str:
    """One self-contained HTML page (inline CSS and SVG, no scripts): per group the three charts, then the
    tables."""
    body = [f"<h1>memwatch sweep</h1><p>{html.escape(_header(result))}.</p>"]
    body.append(
        "<table><caption>Models</caption><thead><tr><th>model</th><th>parameters</th><th>source</th></tr></thead>"
        "<tbody>"
        + "".join(
            f"<tr><td>{html.escape(m.label)}</td><td>{m.parameters:,}</td><td>{html.escape(m.path or '-')}</td></tr>"
            for m in result.models
        )
        + "</tbody></table>"
    )
    tables = _tables(result)
    for group in dict.fromkeys(c["group"] for c in result.cells()):
        body.append(f"<h2>{html.escape(group)}</h2><div class=charts>{''.join(_charts(result, group))}</div>")
        for caption, head, rows in tables:
            if not caption.startswith(f"{group} ("):
                continue
            cols = head + [f"m={m}" for m in result.suffix_lens]
            body.append(
                f"<table><caption>{html.escape(caption)}</caption><thead><tr>"
                + "".join(f"<th>{html.escape(c)}</th>" for c in cols)
                + "</tr></thead><tbody>"
                + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
                + "</tbody></table>"
            )
    style = (
        "body{font:14px/1.45 system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}"
        "h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ddd}"
        "table{border-collapse:collapse;margin:14px 0}"
        "caption{text-align:left;font-weight:600;padding:4px 0;white-space:nowrap}"
        "th,td{border:1px solid #ddd;padding:3px 8px;text-align:right}th{background:#f4f4f4}"
        "tr>:first-child{text-align:left}.charts{display:flex;flex-wrap:wrap;gap:8px}figure{margin:0}"
        ".t{font-weight:600;font-size:13px}.a{font-size:11px;fill:#444}.g{stroke:#e6e6e6}.k{stroke:#999}"
    )
    return (
        f"<!doctype html><html lang=en><head><meta charset=utf-8><title>memwatch sweep</title><style>{style}</style>"
        f"</head><body>{''.join(body)}</body></html>"
    )
