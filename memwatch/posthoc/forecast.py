"""Memorization forecast: which unmemorized probes become memorized within E evaluations, against naive baselines."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "BASELINES",
    "CORPUS_COUNTS",
    "CORPUS_PREFIXES",
    "MODELS",
    "ForecastError",
    "ForecastReport",
    "Prediction",
    "Scores",
    "Series",
    "Split",
    "fit_model",
    "forecast",
    "forecast_run",
    "labels",
    "predict_latest",
    "render_text",
    "time_split",
]

# The model kinds. Logistic regression is the default: a run yields a few hundred to a few thousand rows with a
# handful of positives, the features move monotonically towards memorization (match ratio up, NLL down), and a
# linear model on standardised features with balanced class weights neither overfits so few positives nor needs
# tuning; it is also fast enough to refit at every live evaluation. Gradient boosting is there for long runs.
MODELS = ("logistic", "boosting")
# Quantities whose recent trend (least-squares slope per evaluation over the last `window` ones) is a feature.
SLOPED = ("match_ratio", "suffix_nll", "exposure")
# Signals of the training-data n-gram index (signals/ngrams.py), used when a history has them: counts (dup_window,
# dup_suffix, times_seen, ...; log1p, they span decades) and the others as they are (suffix_ngram<n>, already a log
# count; ngram_logprob; ngram_rho).
CORPUS_COUNTS = ("dup_", "times_seen")
CORPUS_PREFIXES = (*CORPUS_COUNTS, "suffix_ngram", "ngram_")
# The naive baselines: (feature, sign, rule): a row is predicted positive when sign * feature >= sign * threshold,
# the threshold chosen on the training period (best F1), exactly as the model's decision threshold is.
BASELINES: tuple[tuple[str, int, str], ...] = (
    ("match_ratio", 1, "match ratio >= {:.3g}"),
    ("suffix_nll_slope", -1, "NLL slope <= {:.3g}"),
)
EXPECTED = ("match_ratio", "suffix_nll", "exposure", "boundary_jump", "dup_window", "times_seen")


class ForecastError(ValueError):
    """A forecast cannot be made (too few evaluations for the horizon); the message says what is needed."""


# --- what the features are made of ----------------------------------------------------------------------------


def _snapshot(record: Any, extra: Mapping[str, Any] | None, width: int) -> dict[str, np.ndarray]:
    """One evaluation's per-probe quantities [N] by name: only those measured (some finite value)."""
    from memwatch.signals import REGISTRY

    values = record.values
    n = len(record.probe_ids)
    out: dict[str, np.ndarray] = {}

    def put(name: str, v: Any, sign: float = 1.0) -> None:
        arr = np.asarray(v, dtype=np.float64).reshape(-1)
        if arr.shape == (n,) and np.isfinite(arr).any():
            out[name] = arr * sign

    for name in ("match_ratio", "suffix_nll", "edit_similarity", "exposure"):
        if name in values:
            put(name, values[name])
    m = int(record.spec["suffix_len"])
    if "prefix_match_len" in values and m:
        put("prefix_match", np.asarray(values["prefix_match_len"], dtype=np.float64) / m)
    result = getattr(record, "result", None)
    entropy = None if result is None else getattr(result, "entropy", None)
    w = int(record.spec.get("entropy_window", 0))
    j = min(width, w, m)
    if entropy is not None and j > 0:
        ent = np.asarray(entropy, dtype=np.float64)
        # The per-probe boundary jump (Chen et al.): memorized text keeps low entropy across the boundary.
        put("boundary_jump", ent[:, w : w + j].mean(axis=1) - ent[:, w - j : w].mean(axis=1))
    for signal in REGISTRY.signals.values():
        if signal.membership and signal.name in values and signal.name not in out:
            # Sign-normalised, higher = more member-like, as the contrasts read them.
            put(signal.name, values[signal.name], float(signal.direction or 1))
    for name, v in {**dict(extra or {}), **values}.items():
        if name.startswith(CORPUS_COUNTS):
            put(name, np.log1p(np.maximum(np.asarray(v, dtype=np.float64), 0.0)))
        elif name.startswith(CORPUS_PREFIXES):
            put(name, v)
    return out


def _slopes(x: np.ndarray, window: int) -> np.ndarray:
    """Least-squares slope per evaluation of each column of x [T, N] over the last `window` evaluations up to and
    including each t (the past only); 0 where fewer than two evaluations exist (no trend seen yet)."""
    out = np.zeros_like(x, dtype=np.float64)
    for t in range(1, x.shape[0]):
        y = x[max(0, t - window + 1) : t + 1]
        xs = np.arange(len(y), dtype=np.float64)
        xs -= xs.mean()
        out[t] = (xs[:, None] * (y - y.mean(axis=0))).sum(axis=0) / (xs**2).sum()
    return out


class Series:
    """Per-probe quantities at each evaluation of one run, in panel order: what the forecast's features are made of.

    Built from EvalRecords (a replayed history, or the live monitor's records one at a time), so post-hoc and live
    forecasts see the same numbers; state() / from_state() keep it as plain lists (checkpoints load them with
    torch's weights_only)."""

    def __init__(
        self,
        ids: Sequence[str],
        groups: Sequence[str] | np.ndarray,
        metas: Sequence[Mapping[str, Any]],
        boundary_width: int = 4,
    ) -> None:
        self.ids = list(ids)
        self.groups = np.asarray(groups, dtype=object)
        self.metas = [dict(m) for m in metas]
        self.boundary_width = int(boundary_width)
        self.steps: list[int] = []
        self.memorized: list[np.ndarray] = []  # bool [N] per evaluation
        self.values: list[dict[str, np.ndarray]] = []  # name -> float [N] per evaluation

    def __len__(self) -> int:
        return len(self.steps)

    @classmethod
    def of_run(cls, run: Any) -> Series:
        """A RunData's evaluations, replayed through the live record building."""
        series = cls(run.ids, run.groups, run.metas, int(run.config.get("boundary_width", 4)))
        for e, record in enumerate(run.replayed()):
            # Stored signals the registry does not know (an n-gram index's counts read by an older memwatch).
            extra = {name: v[e] for name, v in run.signals.items() if name not in record.values}
            series.add(record, extra)
        return series

    def add(self, record: Any, extra: Mapping[str, Any] | None = None) -> None:
        """Append one evaluation's record (and stored values the record lacks)."""
        self.steps.append(int(record.step))
        self.memorized.append(np.asarray(record.values["memorized"], dtype=bool).copy())
        self.values.append(_snapshot(record, extra, self.boundary_width))

    def trim(self, max_evals: int) -> None:
        """Keep the last `max_evals` evaluations (a live rule's memory stays bounded)."""
        if len(self.steps) > max_evals:
            cut = len(self.steps) - max_evals
            del self.steps[:cut], self.memorized[:cut], self.values[:cut]

    def memorized_matrix(self) -> np.ndarray:
        """bool [T, N]: the run's own definition of memorized (exact, or memorized_threshold reached)."""
        return np.stack(self.memorized) if self.memorized else np.zeros((0, len(self.ids)), bool)

    def features(self, window: int = 3) -> tuple[list[str], np.ndarray]:
        """(names, X [T, N, F]): at each evaluation, every quantity's value, the slope of the sloped ones over the
        last `window` evaluations, whether the probe was memorized before (forgotten text comes back), and the
        known repetition count (meta "repetitions"); NaN where a quantity was not measured."""
        t_count, n = len(self.steps), len(self.ids)
        names = list(dict.fromkeys(name for v in self.values for name in v))
        missing = np.full(n, np.nan)
        cols: list[np.ndarray] = []
        out: list[str] = []
        for name in names:
            base = np.stack([v.get(name, missing) for v in self.values])
            cols.append(base)
            out.append(name)
            if name in SLOPED:
                cols.append(_slopes(base, window))
                out.append(f"{name}_slope")
        mem = self.memorized_matrix()
        if t_count:
            cols.append(np.maximum.accumulate(mem, axis=0).astype(np.float64))
            out.append("ever_memorized")
        # A probe's known repetition count in the training data (a canary's tier, or a user's meta) is its duplicate
        # count; a twin's tier says how often it was *not* inserted.
        reps = np.array(
            [
                math.log1p(float(m.get("repetitions") or 0)) if g != "canary_heldout" else 0.0
                for g, m in zip(self.groups, self.metas, strict=True)
            ]
        )
        if reps.any():
            cols.append(np.broadcast_to(reps, (t_count, n)).astype(np.float64))
            out.append("repetitions")
        x = np.stack(cols, axis=-1) if cols else np.zeros((t_count, n, 0))
        return out, x

    def state(self) -> dict[str, Any]:
        return {
            "ids": list(self.ids),
            "boundary_width": self.boundary_width,
            "steps": list(self.steps),
            "memorized": [m.tolist() for m in self.memorized],
            "values": [{k: v.tolist() for k, v in d.items()} for d in self.values],
        }

    @classmethod
    def from_state(
        cls, state: Mapping[str, Any], groups: Sequence[str] | np.ndarray, metas: Sequence[Mapping[str, Any]]
    ) -> Series:
        series = cls(state["ids"], groups, metas, int(state.get("boundary_width", 4)))
        series.steps = [int(s) for s in state["steps"]]
        series.memorized = [np.asarray(m, dtype=bool) for m in state["memorized"]]
        series.values = [{k: np.asarray(v, dtype=np.float64) for k, v in d.items()} for d in state["values"]]
        return series


# --- labels and the time split ---------------------------------------------------------------------------------


def labels(memorized: np.ndarray, horizon: int) -> np.ndarray:
    """int8 [T, N]: 1 if probe i, not memorized at evaluation t, is memorized at one of t+1..t+horizon; 0 if it is
    not; -1 where there is no row (memorized at t, or fewer than `horizon` evaluations after t: censored)."""
    mem = np.asarray(memorized, dtype=bool)
    y = np.full(mem.shape, -1, dtype=np.int8)
    for t in range(mem.shape[0] - horizon):
        eligible = ~mem[t]
        y[t, eligible] = mem[t + 1 : t + horizon + 1, eligible].any(axis=0)
    return y


@dataclass(frozen=True)
class Split:
    """A time split with a purge. Training rows sit at evaluations `train` (t + horizon <= cutoff: their labels read
    evaluations up to `cutoff`), test rows at `test` (t >= cutoff: their labels read evaluations after it). The
    horizon - 1 evaluations between are in neither, so no label of the test period is seen in training; this is
    also the live situation at evaluation `cutoff`."""

    horizon: int
    n_evals: int
    cutoff: int
    train: tuple[int, ...]
    test: tuple[int, ...]

    def label_evals(self, evals: Sequence[int]) -> set[int]:
        """The evaluations the labels of rows at `evals` read."""
        return {u for t in evals for u in range(t + 1, t + self.horizon + 1)}

    def to_dict(self) -> dict[str, Any]:
        return {
            "horizon": self.horizon,
            "cutoff": self.cutoff,
            "train_evals": list(self.train),
            "test_evals": list(self.test),
        }


def time_split(n_evals: int, horizon: int, test_fraction: float = 0.3, min_train_evals: int = 2) -> Split:
    """The split of a run's labelled evaluations (t <= n_evals - 1 - horizon): the last `test_fraction` of them (at
    least one) to test, the earlier ones to train, with the purge gap between (Split). ForecastError if fewer
    than `min_train_evals` remain to train."""
    if horizon < 1:
        raise ForecastError(f"the horizon is a number of evaluations >= 1; got {horizon}")
    if not 0 < test_fraction < 1:
        raise ForecastError(f"test_fraction must be in (0, 1); got {test_fraction}")
    labelled = n_evals - horizon
    n_test = max(1, round(test_fraction * labelled))
    cutoff = n_evals - horizon - n_test
    train = tuple(range(0, cutoff - horizon + 1))
    if len(train) < min_train_evals:
        need = 2 * horizon + n_test + min_train_evals - 1
        raise ForecastError(
            f"{n_evals} evaluation(s) are too few to forecast {horizon} evaluation(s) ahead and test it: a time "
            f"split needs at least {need} ({min_train_evals} to train, {horizon - 1} left out between, "
            f"{n_test} to test, {horizon} after the last test row for its label); evaluate more often or use a "
            "shorter --horizon"
        )
    return Split(horizon, n_evals, cutoff, train, tuple(range(cutoff, n_evals - horizon)))


# --- models, thresholds, scores -----------------------------------------------------------------------------------


def fit_model(x: np.ndarray, y: np.ndarray, kind: str = "logistic", seed: int = 0) -> Any:
    """A fitted classifier of rows x [R, F] (NaN where not measured) and labels y [R] in {0, 1}; both classes
    present. Balanced class weights: memorization is rare, and unweighted fits predict "never"."""
    if kind == "logistic":
        from sklearn.impute import SimpleImputer
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        model = make_pipeline(
            # A missing value (exposure of a non-canary) becomes the median plus an indicator column.
            SimpleImputer(strategy="median", add_indicator=True, keep_empty_features=True),
            StandardScaler(),
            # Newton-Cholesky: exact and fast for many rows and few features (lbfgs took ~10x longer here).
            LogisticRegression(class_weight="balanced", solver="newton-cholesky", max_iter=200),
        )
    elif kind == "boosting":
        from sklearn.ensemble import HistGradientBoostingClassifier

        model = HistGradientBoostingClassifier(  # NaN handled natively
            class_weight="balanced", max_iter=200, learning_rate=0.05, min_samples_leaf=10, random_state=seed
        )
    else:
        raise ForecastError(f"unknown model {kind!r}; choose one of {MODELS}")
    return model.fit(x, y)


def _probability(model: Any, x: np.ndarray) -> np.ndarray:
    return model.predict_proba(x)[:, 1] if len(x) else np.zeros(0)


def _best_threshold(score: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(threshold, F1) maximising F1 of `score >= threshold` on (score, y); among equal F1 the highest threshold
    (the fewest alarms). NaN scores never predict positive; (inf, 0) when nothing can be chosen."""
    s = np.asarray(score, dtype=np.float64)
    truth = np.asarray(y) == 1
    finite = np.isfinite(s)
    positives = int(truth.sum())
    if not positives or not finite.any():
        return math.inf, 0.0
    order = np.argsort(-s[finite], kind="stable")
    ranked, hits = s[finite][order], truth[finite][order]
    tp = np.cumsum(hits)
    predicted = np.arange(1, len(ranked) + 1)
    # One threshold per distinct score: the last row of each run of equal scores.
    last = np.r_[ranked[1:] != ranked[:-1], True]
    f1 = 2 * tp[last] / (predicted[last] + positives)
    best = int(np.argmax(f1))  # the first maximum in descending order: the highest threshold
    if f1[best] == 0:  # no threshold catches a positive: predict none
        return math.inf, 0.0
    return float(ranked[last][best]), float(f1[best])


@dataclass
class Scores:
    """One predictor on the test rows: counts, precision, recall and F1 (None where undefined: no predicted
    positive for precision, no actual positive for recall, neither for F1), and its threshold from the training
    period."""

    name: str
    rule: str
    threshold: float | None = None
    train_f1: float | None = None
    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0
    fitted: bool = True
    note: str = ""

    @classmethod
    def of(cls, name: str, rule: str, pred: np.ndarray, y: np.ndarray, **kw: Any) -> Scores:
        pred, truth = np.asarray(pred, dtype=bool), np.asarray(y) == 1
        return cls(
            name,
            rule,
            tp=int((pred & truth).sum()),
            fp=int((pred & ~truth).sum()),
            fn=int((~pred & truth).sum()),
            tn=int((~pred & ~truth).sum()),
            **kw,
        )

    @property
    def support(self) -> int:
        return self.tp + self.fn

    @property
    def predicted(self) -> int:
        return self.tp + self.fp

    @property
    def precision(self) -> float | None:
        return self.tp / self.predicted if self.fitted and self.predicted else None

    @property
    def recall(self) -> float | None:
        return self.tp / self.support if self.fitted and self.support else None

    @property
    def f1(self) -> float | None:
        # 2TP / (2TP + FP + FN): sklearn's F1, and 0 when there are positives but none is predicted.
        denominator = 2 * self.tp + self.fp + self.fn
        return 2 * self.tp / denominator if self.fitted and denominator else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "rule": self.rule,
            "threshold": _finite(self.threshold),
            "precision": self.precision,
            "recall": self.recall,
            "f1": self.f1,
            "support": self.support,
            "predicted": self.predicted,
            "tp": self.tp,
            "fp": self.fp,
            "fn": self.fn,
            "tn": self.tn,
            "train_f1": self.train_f1,
            "fitted": self.fitted,
            "note": self.note,
        }


def _finite(value: float | None) -> float | None:
    """JSON has no infinity: a threshold that predicts nothing (inf) is null there."""
    return None if value is None or not math.isfinite(value) else float(value)


def _usable(x: np.ndarray) -> np.ndarray:
    """bool [F]: columns with at least one finite value (a quantity never measured in these rows is dropped)."""
    return np.isfinite(x).any(axis=0) if len(x) else np.zeros(x.shape[1], bool)


def _evaluate(
    x: np.ndarray,
    y: np.ndarray,
    names: list[str],
    train: np.ndarray,
    test: np.ndarray,
    kind: str,
    horizon: int,
) -> tuple[Scores | None, list[Scores], Any, dict[str, np.ndarray], list[str]]:
    """The model and the baselines, thresholds and fit from the `train` rows, scored on the `test` rows."""
    notes: list[str] = []
    xtr, ytr, xte, yte = x[train], y[train].astype(np.int64), x[test], y[test].astype(np.int64)
    positives = int(ytr.sum())
    degenerate = ""
    if positives == 0:
        degenerate = (
            f"no probe became memorized within {horizon} evaluation(s) of a training-period evaluation "
            f"({len(ytr)} rows): nothing to learn from, and no baseline threshold can be chosen"
        )
    elif positives == len(ytr):
        degenerate = f"every training row ({len(ytr)}) is a positive: no threshold can be chosen"
    if degenerate:
        notes.append(degenerate)
    test_rows: dict[str, np.ndarray] = {"y": yte}
    baselines = []
    for feature, sign, rule in BASELINES:
        if feature not in names or not np.isfinite(x[..., names.index(feature)][train | test]).any():
            notes.append(
                f"no baseline on {feature}: it was not measured (a run in mode 'exact' has no match ratio)"
            )
            continue
        col = names.index(feature)
        if degenerate:
            baselines.append(Scores(feature, rule.replace("{:.3g}", "t"), fitted=False, note=degenerate))
            continue
        thr, f1 = _best_threshold(sign * xtr[:, col], ytr)
        score = np.where(np.isfinite(xte[:, col]), sign * xte[:, col], -np.inf)
        pred = score >= thr
        test_rows[feature] = pred
        baselines.append(
            Scores.of(feature, rule.format(sign * thr), pred, yte, threshold=sign * thr, train_f1=f1)
        )
    model_name = {"logistic": "logistic regression", "boosting": "gradient boosting"}[kind]
    if degenerate:
        return Scores("model", model_name, fitted=False, note=degenerate), baselines, None, test_rows, notes
    keep = _usable(xtr)
    estimator = fit_model(xtr[:, keep], ytr, kind)
    train_p = _probability(estimator, xtr[:, keep])
    thr, f1 = _best_threshold(train_p, ytr)
    p = _probability(estimator, xte[:, keep])
    test_rows["model"] = p >= thr
    test_rows["probability"] = p
    model = Scores.of("model", f"{model_name}, p >= {thr:.3g}", p >= thr, yte, threshold=thr, train_f1=f1)
    estimator.memwatch_features = [n for n, k in zip(names, keep, strict=True) if k]  # what it was fitted on
    return model, baselines, estimator, test_rows, notes


@dataclass
class Prediction:
    """A model fitted on every labelled row of a series (their labels read evaluations up to the latest) and its
    forecast at the latest evaluation: probability [N] (NaN for probes memorized now), flagged [N]."""

    step: int
    probability: np.ndarray
    flagged: np.ndarray
    threshold: float
    train_rows: int
    train_positives: int
    train_evals: int
    estimator: Any = field(default=None, repr=False)


def predict_latest(
    series: Series,
    horizon: int,
    *,
    window: int = 3,
    model: str = "logistic",
    min_positives: int = 2,
    min_probability: float | None = None,
) -> Prediction | None:
    """Fit on every labelled row of the series and forecast the probes not memorized at its latest evaluation;
    None while the series holds fewer than `min_positives` positive (or no negative) rows. The decision threshold
    is `min_probability`, or by default the one of best F1 on the training rows."""
    names, x = series.features(window)
    mem = series.memorized_matrix()
    y = labels(mem, horizon)
    rows = y >= 0
    positives = int((y[rows] == 1).sum())
    if positives < max(1, min_positives) or positives == int(rows.sum()):
        return None
    xtr, ytr = x[rows], y[rows].astype(np.int64)
    keep = _usable(xtr)
    estimator = fit_model(xtr[:, keep], ytr, model)
    thr = (
        float(min_probability)
        if min_probability is not None
        else _best_threshold(_probability(estimator, xtr[:, keep]), ytr)[0]
    )
    now = ~mem[-1]
    p = np.full(len(series.ids), np.nan)
    if now.any():
        p[now] = _probability(estimator, x[-1][now][:, keep])
    estimator.memwatch_features = [n for n, k in zip(names, keep, strict=True) if k]
    return Prediction(
        step=series.steps[-1],
        probability=p,
        flagged=np.nan_to_num(p, nan=-1.0) >= thr,
        threshold=thr,
        train_rows=int(rows.sum()),
        train_positives=positives,
        train_evals=int(rows.any(axis=1).sum()),
        estimator=estimator,
    )


# --- the report ---------------------------------------------------------------------------------------------------


@dataclass
class ForecastReport:
    """A run's memorization forecast: the model against the naive baselines on a time split, and the probes forecast
    to be memorized within `horizon` evaluations of the last one. `test` holds the test rows (evaluation, probe,
    label, each predictor's predictions) and `estimator` the model fitted on the training period, for checks."""

    run: str
    run_id: int
    horizon: int
    model_kind: str
    steps: list[int]
    split: Split | None
    features: list[str]
    absent: list[str]
    model: Scores | None
    baselines: list[Scores]
    train_rows: int = 0
    train_positives: int = 0
    test_rows: int = 0
    test_positives: int = 0
    flagged: list[dict[str, Any]] = field(default_factory=list)
    flagged_step: int | None = None
    flag_threshold: float | None = None
    weights: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    test: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    # [R, 2] (evaluation, probe) of the training rows of the time split
    train_index: np.ndarray | None = field(default=None, repr=False)
    estimator: Any = field(default=None, repr=False)

    def best_baseline(self) -> Scores | None:
        """The baseline of highest test F1 (None if no baseline has one)."""
        scored = [b for b in self.baselines if b.f1 is not None]
        return max(scored, key=lambda b: b.f1 or 0.0) if scored else None

    def beats_baselines(self) -> bool | None:
        """Whether the model's test F1 is above every baseline's; None when it cannot be said."""
        best = self.best_baseline()
        if self.model is None or self.model.f1 is None or best is None or best.f1 is None:
            return None
        return self.model.f1 > best.f1

    def to_dict(self) -> dict[str, Any]:
        split = self.split
        return {
            "run": self.run,
            "run_id": self.run_id,
            "horizon": self.horizon,
            "model_kind": self.model_kind,
            "evaluations": len(self.steps),
            "split": None
            if split is None
            else {
                **split.to_dict(),
                "train_steps": [self.steps[t] for t in split.train],
                "test_steps": [self.steps[t] for t in split.test],
                "cutoff_step": self.steps[split.cutoff],
            },
            "features": list(self.features),
            "absent": list(self.absent),
            "rows": {
                "train": self.train_rows,
                "train_positives": self.train_positives,
                "test": self.test_rows,
                "test_positives": self.test_positives,
            },
            "model": None if self.model is None else self.model.to_dict(),
            "baselines": [b.to_dict() for b in self.baselines],
            "beats_baselines": self.beats_baselines(),
            "weights": dict(self.weights),
            "forecast": {
                "step": self.flagged_step,
                "threshold": _finite(self.flag_threshold),
                "probes": [dict(p) for p in self.flagged],
            },
            "notes": list(self.notes),
        }


def _weights(estimator: Any) -> dict[str, float]:
    """A logistic model's coefficients per feature (standardised units: comparable); {} for other models."""
    names = getattr(estimator, "memwatch_features", [])
    coef = getattr(getattr(estimator, "steps", [[None, None]])[-1][1], "coef_", None)
    if coef is None:
        return {}
    return {n: round(float(c), 4) for n, c in zip(names, coef[0][: len(names)], strict=True)}


def forecast_run(
    run: Any,
    horizon: int = 3,
    *,
    test_fraction: float = 0.3,
    window: int = 3,
    model: str = "logistic",
    reveal_text: bool = False,
    decode: Callable[[list[int]], str] | None = None,
) -> ForecastReport:
    """The forecast of a RunData: features from its evaluations, the model against the baselines on a time split
    (Split), then the model refit on every labelled evaluation and the probes it flags at the last one (ids,
    group, tier; text only with reveal_text, decoded with `decode` when given, token ids otherwise)."""
    if model not in MODELS:
        raise ForecastError(f"unknown model {model!r}; choose one of {MODELS}")
    if horizon < 1:
        raise ForecastError(f"the horizon is a number of evaluations >= 1; got {horizon}")
    series = Series.of_run(run)
    names, x = series.features(window)
    mem = series.memorized_matrix()
    y = labels(mem, horizon)
    absent = [n for n in EXPECTED if n not in names]
    if not any(_membership(n) and n != "suffix_nll" for n in names):
        absent.append("membership signals (loss, min-k%, zlib ratio)")
    report = ForecastReport(
        run=run.name,
        run_id=run.run_id,
        horizon=horizon,
        model_kind=model,
        steps=[int(s) for s in run.steps],
        split=None,
        features=names,
        absent=absent,
        model=None,
        baselines=[],
    )
    if not any(n.startswith(CORPUS_PREFIXES) for n in names):
        report.notes.append(
            "no n-gram index signals (duplicate counts, times seen) in this history: forecast without them"
        )
    try:
        split = time_split(len(series), horizon, test_fraction)
    except ForecastError as exc:
        split = None
        report.notes.append(f"{exc}. The forecast of the last evaluation is untested")
    if split is not None:
        _test(report, split, x, y, names)
    prediction = predict_latest(series, horizon, window=window, model=model, min_positives=1)
    if prediction is None:
        report.notes.append("no forecast for the last evaluation: no positive row to fit the model on")
        return report
    report.flagged_step, report.flag_threshold = prediction.step, prediction.threshold
    k = int(run.specs[-1]["prefix_len"]) if run.specs else 0
    m = int(run.specs[-1]["suffix_len"]) if run.specs else 0
    values = series.values[-1]
    for i in np.argsort(-np.nan_to_num(prediction.probability, nan=-1.0), kind="stable").tolist():
        if not prediction.flagged[i]:
            continue
        meta = series.metas[i]
        entry: dict[str, Any] = {
            "id": series.ids[i],
            "group": str(series.groups[i]),
            "tier": meta.get("repetitions"),
            "probability": round(float(prediction.probability[i]), 4),
            "match_ratio": _num(values.get("match_ratio"), i),
            "suffix_nll": _num(values.get("suffix_nll"), i),
        }
        if "canary_id" in meta:
            entry["canary_id"] = meta["canary_id"]
        if reveal_text:
            tokens = list(run.tokens[i])
            show = decode or (lambda ids: " ".join(map(str, ids)))
            entry["text"] = {"prefix": show(tokens[:k]), "suffix": show(tokens[k : k + m])}
        report.flagged.append(entry)
    return report


def _test(report: ForecastReport, split: Split, x: np.ndarray, y: np.ndarray, names: list[str]) -> None:
    """The model against the baselines on the time split, into the report."""
    horizon = report.horizon
    report.split = split
    t_index = np.repeat(np.arange(y.shape[0])[:, None], y.shape[1], axis=1)
    rows = y >= 0
    train = rows & np.isin(t_index, split.train)
    test = rows & np.isin(t_index, split.test)
    report.train_rows, report.test_rows = int(train.sum()), int(test.sum())
    report.train_positives, report.test_positives = int((y[train] == 1).sum()), int((y[test] == 1).sum())
    report.train_index = np.argwhere(train)
    scores, baselines, estimator, test_rows, notes = _evaluate(
        x, y, names, train, test, report.model_kind, horizon
    )
    report.model, report.baselines, report.estimator = scores, baselines, estimator
    report.weights = _weights(estimator)
    report.test = {"index": np.argwhere(test), **test_rows}
    report.notes += notes
    if report.test_rows and not report.test_positives:
        report.notes.append(
            f"no probe became memorized within {horizon} evaluation(s) in the test period ({report.test_rows} "
            "rows): recall and F1 are undefined; precision counts false alarms only"
        )


def _membership(name: str) -> bool:
    from memwatch.signals import REGISTRY

    signal = REGISTRY.signals.get(name)
    return bool(signal is not None and signal.membership)


def _num(values: np.ndarray | None, i: int) -> float | None:
    if values is None or not math.isfinite(float(values[i])):
        return None
    return round(float(values[i]), 4)


def forecast(
    path: str | os.PathLike[str], run: int | str | None = None, horizon: int = 3, **options: Any
) -> ForecastReport:
    """forecast_run on a run (default: the latest) of the history at `path` (a file or an output directory)."""
    from memwatch.store.runs import History

    with History(path) as history:
        data = history.run(run)
    return forecast_run(data, horizon, **options)


# --- text ---------------------------------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=True)]
    line = lambda cells: "  ".join(  # noqa: E731 - a one-line formatter
        str(c).ljust(w) if j == 0 else str(c).rjust(w)
        for j, (c, w) in enumerate(zip(cells, widths, strict=True))
    )
    return [line(headers), line(["-" * w for w in widths]), *[line(r) for r in rows]]


def render_text(report: ForecastReport) -> str:
    """The report for people: the split, the model against the baselines, the probes forecast to be memorized."""
    out = [
        f"memwatch forecast: run {report.run!r} (id {report.run_id}), {len(report.steps)} evaluations, horizon "
        f"{report.horizon} evaluation(s), model: {report.model_kind}"
    ]
    split = report.split
    if split is not None:
        st = report.steps
        out.append(
            f"time split: train on rows at evaluations {split.train[0]}-{split.train[-1]} (steps {st[split.train[0]]}-"
            f"{st[split.train[-1]]}; labels read evaluations up to {split.cutoff}, step {st[split.cutoff]}), test on "
            f"rows at {split.test[0]}-{split.test[-1]} (steps {st[split.test[0]]}-{st[split.test[-1]]}; labels read "
            f"evaluations after {split.cutoff}); {report.horizon - 1} evaluation(s) between are in neither"
        )
        out.append(
            f"rows (probe not memorized at the evaluation): train {report.train_rows} ({report.train_positives} "
            f"memorized within {report.horizon}), test {report.test_rows} ({report.test_positives})"
        )
    out.append("features: " + (", ".join(report.features) or "none"))
    if report.absent:
        out.append("absent: " + ", ".join(report.absent))
    if report.model is not None:
        out.append("")
        headers = [
            "predictor",
            "precision",
            "recall",
            "F1",
            "support",
            "predicted",
            "train evals",
            "test evals",
        ]
        n_train = len(split.train) if split else 0
        n_test = len(split.test) if split else 0
        rows = [
            [
                s.rule if s.name != "model" else f"model ({s.rule})",
                _fmt(s.precision),
                _fmt(s.recall),
                _fmt(s.f1),
                str(s.support),
                str(s.predicted) if s.fitted else "-",
                str(n_train),
                str(n_test),
            ]
            for s in [report.model, *report.baselines]
        ]
        out += _table(headers, rows)
        verdict = report.beats_baselines()
        best = report.best_baseline()
        if verdict is not None and best is not None:
            out.append(
                f"the model {'beats' if verdict else 'does not beat'} the best baseline ({best.rule}): F1 "
                f"{_fmt(report.model.f1)} against {_fmt(best.f1)}"
            )
    if report.weights:
        top = sorted(report.weights.items(), key=lambda kv: -abs(kv[1]))[:6]
        out.append(
            "strongest features (standardised logistic weights): "
            + ", ".join(f"{n} {w:+.2f}" for n, w in top)
        )
    if report.flagged_step is not None:
        out.append("")
        out.append(
            f"probes forecast to be memorized within {report.horizon} evaluation(s) of step {report.flagged_step} "
            f"(model refit on every labelled evaluation, p >= {report.flag_threshold:.3g}): {len(report.flagged)}"
        )
        if report.flagged:
            reveal = any("text" in p for p in report.flagged)
            headers = ["probe", "group", "tier", "p", "match ratio", "suffix NLL"] + (
                ["text"] if reveal else []
            )
            rows = [
                [
                    p["id"] + (f" (canary {p['canary_id']})" if p.get("canary_id") else ""),
                    p["group"],
                    "-" if p["tier"] is None else f"{p['tier']}x",
                    f"{p['probability']:.2f}",
                    _fmt(p["match_ratio"], ".2f"),
                    _fmt(p["suffix_nll"], ".2f"),
                ]
                + ([f"prefix {p['text']['prefix']!r} suffix {p['text']['suffix']!r}"] if reveal else [])
                for p in report.flagged
            ]
            out += _table(headers, rows)
    if report.notes:
        out.append("")
        out += [f"note: {n}" for n in report.notes]
    return "\n".join(out) + "\n"
