"""Alerts on memorization: rules with cooldown and hysteresis, sinks (console, log, JSONL, webhook, ...), actions."""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import math
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np

from memwatch.config import AlertConfig
from memwatch.record import EvalRecord

__all__ = [
    "Alert",
    "AlertEngine",
    "AlertSinks",
    "Flip",
    "Forecast",
    "ProbeThreshold",
    "Rule",
    "RuleContext",
    "RuleState",
    "Spike",
    "Threshold",
    "WebhookSink",
    "rules_of",
]

log = logging.getLogger("memwatch.alerts")


@dataclass
class Alert:
    """One alert. Probes are named by id, group and tier; text appears only when reveal_text is set."""

    step: int
    rule: str
    group: str | None
    probe_ids: list[str]
    message: str
    action: str | None = None  # "save_checkpoint", "stop_training" or both, comma-separated
    data: dict[str, Any] = field(default_factory=dict)
    wall_time: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _fmt_probe(pid: str, meta: dict[str, Any]) -> str:
    # The probe id first, as every report's probe column names it; a canary's manifest id beside it, so the
    # alert can be found in the timelines and in the canary manifest alike.
    tier = meta.get("repetitions")
    canary = meta.get("canary_id")
    detail = ", ".join(
        x
        for x in (
            f"canary {canary}" if canary else None,
            f"{tier}x" if tier is not None else None,
            meta.get("family"),
        )
        if x
    )
    return pid + (f" ({detail})" if detail else "")


class _Ema:
    """Exponential moving mean and variance of a series (the spike rule's baseline)."""

    def __init__(self, alpha: float = 0.3) -> None:
        self.alpha = alpha
        self.n = 0
        self.mean = 0.0
        self.var = 0.0

    def update(self, x: float) -> None:
        if self.n == 0:
            self.mean, self.var = x, 0.0
        else:
            d = x - self.mean
            self.mean += self.alpha * d
            self.var = (1 - self.alpha) * (self.var + self.alpha * d * d)
        self.n += 1


class RuleState:
    """What rules remember between evaluations (baselines, armed thresholds, cooldowns, per-probe states, flips
    waiting for confirmation), keyed by rule and subject; it round-trips through state_dict (checkpoints) and is
    rebuilt identically by replaying a history (a resumed run)."""

    def __init__(self, cooldown: int, hysteresis: float) -> None:
        self.cooldown = cooldown
        self.hysteresis = hysteresis
        self.evals = 0  # evaluations seen
        self.armed: dict[tuple[str, str], bool] = {}
        self.last_fired: dict[tuple[str, str], int] = {}
        self.ema: dict[tuple[str, str], _Ema] = {}
        self.previous: dict[str, list[bool]] = {}  # flip rules: the signal at the previous evaluation
        self.pending: dict[tuple[str, str], int] = {}  # flips on near-tie rows: (rule, probe) -> step seen
        # Per-rule memory across evaluations (the forecast rule's per-probe series): plain data, or an object whose
        # state() gives it (the rule rebuilds the object from that data after load_state_dict).
        self.series: dict[str, Any] = {}

    def cool(self, key: tuple[str, str]) -> bool:
        """True if the key may fire now (outside its cooldown); records the firing when it does."""
        last = self.last_fired.get(key)
        if last is not None and self.evals - last <= self.cooldown:
            return False
        self.last_fired[key] = self.evals
        return True

    def reached(self, key: tuple[str, str], value: float, threshold: float) -> bool:
        """True while armed and value >= threshold. A firing disarms the key (disarm); it re-arms once the value
        falls below threshold * (1 - hysteresis). A crossing held back by the cooldown stays armed."""
        armed = self.armed.get(key, True)
        if not armed and value < threshold * (1 - self.hysteresis):
            self.armed[key] = armed = True
        return armed and value >= threshold

    def disarm(self, key: tuple[str, str]) -> None:
        self.armed[key] = False

    def state_dict(self) -> dict[str, Any]:
        return {
            "evals": self.evals,
            "armed": [[list(k), v] for k, v in self.armed.items()],
            "last_fired": [[list(k), v] for k, v in self.last_fired.items()],
            "ema": [[list(k), e.n, e.mean, e.var] for k, e in self.ema.items()],
            "previous": dict(self.previous),
            "pending": [[list(k), v] for k, v in self.pending.items()],
            "series": {k: v.state() if hasattr(v, "state") else v for k, v in self.series.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.evals = state["evals"]
        self.armed = {tuple(k): v for k, v in state["armed"]}
        self.last_fired = {tuple(k): v for k, v in state["last_fired"]}
        self.ema = {}
        for k, n, mean, var in state["ema"]:
            e = _Ema()
            e.n, e.mean, e.var = n, mean, var
            self.ema[tuple(k)] = e
        previous = dict(state.get("previous") or {})
        if state.get("prev_exact") is not None:  # a 0.1.0 checkpoint's state
            previous = {"exact": list(state["prev_exact"])}
        self.previous = previous
        self.pending = {tuple(k): v for k, v in state.get("pending", [])}
        self.series = dict(state.get("series") or {})


class Rule(Protocol):
    """An alert rule: `name` (what `actions` and the history call it) and check(record, state, ctx) -> alerts."""

    name: str

    def check(self, record: EvalRecord, state: RuleState, ctx: RuleContext) -> list[Alert]: ...


@dataclass
class RuleContext:
    """What every rule shares: the action its firing asks for, probe descriptions (reveal_text), near-tie policy."""

    actions: Mapping[str, tuple[str, ...]]
    describe: Callable[[int], str | None] | None = None
    confirm_near_ties: bool = True

    def action(self, rule: str) -> str | None:
        acts = self.actions.get(rule, ())
        return ",".join(acts) if acts else None

    def names(self, record: EvalRecord, rows: Sequence[int]) -> str:
        text = ", ".join(
            _fmt_probe(record.probe_ids[i], dict(record.metas[i])) + self._text(i) for i in rows[:10]
        )
        return text + (f" and {len(rows) - 10} more" if len(rows) > 10 else "")

    def _text(self, i: int) -> str:
        if self.describe is None:
            return ""
        text = self.describe(i)
        return f" [{text}]" if text else ""


def _value(record: EvalRecord, key: str) -> float | None:
    value = record.scalars.get(key)
    return None if value is None or not math.isfinite(value) else float(value)


def _keys(record: EvalRecord, pattern: str) -> list[str]:
    """The record's statistics a key pattern names: a key (train/extraction_rate) or a shell pattern of keys whose
    wildcards stay within one "/" segment: */extraction_rate is every group's, canaries/*/extraction_rate every
    tier's."""
    if any(c in pattern for c in "*?["):
        parts = pattern.split("/")
        return [
            k
            for k in record.scalars
            if len(segments := k.split("/")) == len(parts)
            and all(fnmatch.fnmatchcase(s, p) for s, p in zip(segments, parts, strict=True))
        ]
    return [pattern] if pattern in record.scalars else []


@dataclass(frozen=True)
class Threshold:
    """A statistic reaching `value` fires; re-armed once it falls `hysteresis` below (RuleState.reached)."""

    key: str  # "train/extraction_rate", "train~heldout/loss_auc", or a pattern "*/extraction_rate"
    value: float
    name: str = "threshold"

    def check(self, record: EvalRecord, state: RuleState, ctx: RuleContext) -> list[Alert]:
        out = []
        for key in _keys(record, self.key):
            v = _value(record, key)
            subject = (self.name, key)
            if v is not None and state.reached(subject, v, self.value) and state.cool(subject):
                state.disarm(subject)
                scope, _, stat = key.rpartition("/")
                shown = f"{v:.1%}" if "rate" in stat else f"{v:.4g}"
                limit = f"{self.value:.1%}" if "rate" in stat else f"{self.value:.4g}"
                what = f"{scope} {stat.replace('_', ' ')}"
                out.append(
                    Alert(
                        record.step,
                        self.name,
                        scope,
                        [],
                        f"step {record.step}: {what} {shown} crossed the threshold {limit}",
                        ctx.action(self.name),
                        {"key": key, "value": v, "threshold": self.value, "rate": v},
                    )
                )
        return out


@dataclass(frozen=True)
class Spike:
    """A statistic jumping above its own EMA baseline by `z` deviations and at least `min_delta`, once
    `min_evals` evaluations built the baseline; `after_baseline`: not at the first evaluation."""

    key: str
    z: float
    min_delta: float
    min_evals: int
    after_baseline: bool = False
    name: str = "spike"

    def check(self, record: EvalRecord, state: RuleState, ctx: RuleContext) -> list[Alert]:
        if self.after_baseline and state.evals <= 1:
            return []
        out = []
        for key in _keys(record, self.key):
            v = _value(record, key)
            if v is None:
                continue
            scope, _, stat = key.rpartition("/")
            ema = state.ema.setdefault((scope, stat), _Ema())
            if ema.n >= self.min_evals:
                sd = math.sqrt(max(ema.var, 0.0))
                if (
                    v > ema.mean + self.z * sd
                    and v - ema.mean >= self.min_delta
                    and state.cool((self.name, key))
                ):
                    rate = "rate" in stat
                    shown = f"{v:.1%}" if rate else f"{v:.0f}"
                    base = f"{ema.mean:.1%} ± {sd:.1%}" if rate else f"{ema.mean:.1f} ± {sd:.1f}"
                    out.append(
                        Alert(
                            record.step,
                            self.name,
                            scope,
                            [],
                            f"step {record.step}: spike in {scope} {stat.replace('_', ' ')}: {shown} against a "
                            f"baseline of {base}",
                            ctx.action(self.name),
                            {"metric": stat, "value": v, "baseline": ema.mean, "sd": sd},
                        )
                    )
            ema.update(v)
        return out


@dataclass(frozen=True)
class Flip:
    """A per-probe flag turning on since the previous evaluation, for probes of `groups`: e.g. an inserted canary
    becoming extractable. `at_baseline`: the first evaluation counts (everything on is new); `min_values`: other
    signals a probe must reach (predictable suffixes are not leaks); `only`: a flag the probe must also have.

    A flip on a near-tie row may be rounding, not the model: with confirm_near_ties it waits for the next
    evaluation and fires there if the flag is still on (the message says it was confirmed)."""

    signal: str
    groups: tuple[str, ...]
    message: str  # format fields: step, n, names, kind
    name: str
    at_baseline: bool = True
    min_values: Mapping[str, float] = field(default_factory=dict)
    only: str | None = None

    def check(self, record: EvalRecord, state: RuleState, ctx: RuleContext) -> list[Alert]:
        flag = np.asarray(record.values.get(self.signal, np.zeros(len(record.groups))), dtype=bool)
        before = state.previous.get(self.name)
        state.previous[self.name] = flag.tolist()
        if before is None and not self.at_baseline:
            return []
        newly = flag & ~np.asarray(before, dtype=bool) if before is not None else flag.copy()
        for name, low in self.min_values.items():
            values = record.values.get(name)
            if values is not None:
                newly &= np.asarray(values, dtype=np.float64) >= low
        if self.only is not None:
            newly &= np.asarray(record.values.get(self.only, np.zeros(len(flag))), dtype=bool)
        near_tie = np.asarray(record.values.get("near_tie", np.zeros(len(flag))), dtype=bool)
        # Flips seen on a near-tie row at the previous evaluation: confirmed if the flag is still on.
        index = {pid: i for i, pid in enumerate(record.probe_ids)}
        waiting = [pid for rule, pid in state.pending if rule == self.name]
        for pid in waiting:
            del state.pending[(self.name, pid)]
        still_on = [index[pid] for pid in waiting if pid in index and flag[index[pid]]]
        out = []
        for g in self.groups:
            in_group = record.groups == g
            confirmed = [i for i in still_on if in_group[i]]
            rows = []
            for i in np.flatnonzero(newly & in_group).tolist():
                if ctx.confirm_near_ties and near_tie[i]:
                    state.pending[(self.name, record.probe_ids[i])] = record.step
                else:
                    rows.append(i)
            rows = [
                i for i in dict.fromkeys(rows + confirmed) if state.cool((self.name, record.probe_ids[i]))
            ]
            if not rows:
                continue
            kind = "never-inserted twin(s)" if g == "canary_heldout" else f"{g} probe(s)"
            message = self.message.format(
                step=record.step, n=len(rows), names=ctx.names(record, rows), kind=kind
            )
            if confirmed:
                message += " (after a near tie at the previous evaluation, confirmed now)"
            data: dict[str, Any] = {"uncertain_confirmed": [record.probe_ids[i] for i in confirmed]}
            tiers = {
                int(record.metas[i].get("repetitions", 0)) for i in rows if "repetitions" in record.metas[i]
            }
            if tiers:
                data["tiers"] = sorted(tiers)
            out.append(
                Alert(
                    record.step,
                    self.name,
                    g,
                    [record.probe_ids[i] for i in rows],
                    message,
                    ctx.action(self.name),
                    data,
                )
            )
        return out


@dataclass(frozen=True)
class ProbeThreshold:
    """A per-probe value reaching `value` (e.g. a canary's exposure in bits), each probe with its own hysteresis."""

    signal: str
    groups: tuple[str, ...]
    value: float
    message: str  # format fields: step, n, names, value
    name: str
    # At the run's first evaluation (the baseline) read this signal instead: exposure by rank alone, so that a
    # skew-normal extrapolation past what the references resolve never fires before training has done anything.
    baseline_signal: str | None = None

    def check(self, record: EvalRecord, state: RuleState, ctx: RuleContext) -> list[Alert]:
        signal = self.baseline_signal if self.baseline_signal and state.evals <= 1 else self.signal
        values = record.values.get(signal)
        if values is None or not np.isfinite(values).any():
            return []
        crossed = []
        for i in np.flatnonzero(np.isin(record.groups, self.groups)).tolist():
            v = float(values[i])
            if math.isfinite(v) and state.reached((self.name, record.probe_ids[i]), v, self.value):
                crossed.append(i)
        rows = [i for i in crossed if state.cool((self.name, record.probe_ids[i]))]
        if not rows:
            return []
        for i in rows:
            state.disarm((self.name, record.probe_ids[i]))
        message = self.message.format(
            step=record.step, n=len(rows), names=ctx.names(record, rows), value=self.value
        )
        data = {signal: {record.probe_ids[i]: float(values[i]) for i in crossed}}
        return [
            Alert(
                record.step,
                self.name,
                self.groups[0],
                [record.probe_ids[i] for i in rows],
                message,
                ctx.action(self.name),
                data,
            )
        ]


@dataclass(frozen=True)
class Forecast:
    """Probes forecast to be memorized within `horizon` evaluations: an early warning, before exposure or extraction.

    The rule keeps each probe's forecast quantities from the records it sees (RuleState.series: the last `max_evals`
    evaluations; a resumed run rebuilds them by replaying its history through the rules), refits at every
    evaluation a model on its own earlier evaluations (memwatch.posthoc.forecast.predict_latest: every label reads
    evaluations up to this one, nothing later), and fires for the probes of `groups` (every group when empty) that
    are not memorized now and reach the decision threshold (`min_probability`, or the training rows' best-F1 one),
    each probe with its own hysteresis and cooldown. Silent until `min_positives` rows of the run were memorized
    within `horizon` evaluations. Add it with AlertConfig(rules=(Forecast(horizon=3),))."""

    horizon: int = 3
    groups: tuple[str, ...] = ()
    min_probability: float | None = None
    min_positives: int = 3
    window: int = 3  # evaluations the slopes of match ratio, NLL and exposure are fitted over
    max_evals: int = 48  # evaluations remembered: bounds the rule's memory and each refit's cost
    boundary_width: int = 4
    model: str = "logistic"
    name: str = "forecast"

    def check(self, record: EvalRecord, state: RuleState, ctx: RuleContext) -> list[Alert]:
        # Imported here: scikit-learn loads only for runs that ask for a forecast.
        from memwatch.posthoc.forecast import Series, predict_latest

        if "memorized" not in record.values:  # switched off: there is nothing to forecast
            return []
        series = state.series.get(self.name)
        if isinstance(series, Mapping):  # as a checkpoint's state_dict left it
            series = Series.from_state(series, record.groups, record.metas)
        if series is None or series.ids != list(record.probe_ids):
            series = Series(record.probe_ids, record.groups, record.metas, self.boundary_width)
        series.add(record)
        series.trim(self.max_evals)
        state.series[self.name] = series
        prediction = predict_latest(
            series,
            self.horizon,
            window=self.window,
            model=self.model,
            min_positives=self.min_positives,
            min_probability=self.min_probability,
        )
        if prediction is None:
            return []
        for i in np.flatnonzero(np.isnan(prediction.probability)).tolist():
            # Memorized now: the episode is over, and a forecast after a forgetting warns again.
            state.armed.pop((self.name, record.probe_ids[i]), None)
        out = []
        for g in self.groups or tuple(dict.fromkeys(record.groups.tolist())):
            # Each probe with its own hysteresis (RuleState.reached): a probability hovering at the threshold
            # fires once, and again only after falling clearly below it.
            rows = [
                i
                for i in np.flatnonzero(record.groups == g).tolist()
                if np.isfinite(p := float(prediction.probability[i]))
                and state.reached((self.name, record.probe_ids[i]), p, prediction.threshold)
            ]
            rows = [i for i in rows if state.cool((self.name, record.probe_ids[i]))]
            if not rows:
                continue
            for i in rows:
                state.disarm((self.name, record.probe_ids[i]))
            rows.sort(key=lambda i: -prediction.probability[i])
            message = (
                f"step {record.step}: {len(rows)} {g} probe(s) forecast to be memorized within {self.horizon} "
                f"evaluation(s) (p >= {prediction.threshold:.2f}; not memorized yet): {ctx.names(record, rows)}"
            )
            data: dict[str, Any] = {
                "horizon": self.horizon,
                "threshold": prediction.threshold,
                "probabilities": {
                    record.probe_ids[i]: round(float(prediction.probability[i]), 4) for i in rows
                },
                "train_rows": prediction.train_rows,
                "train_positives": prediction.train_positives,
                "train_evals": prediction.train_evals,
            }
            tiers = {int(record.metas[i]["repetitions"]) for i in rows if "repetitions" in record.metas[i]}
            if tiers:
                data["tiers"] = sorted(tiers)
            out.append(
                Alert(
                    record.step,
                    self.name,
                    g,
                    [record.probe_ids[i] for i in rows],
                    message,
                    ctx.action(self.name),
                    data,
                )
            )
        return out


def rules_of(config: AlertConfig) -> list[Any]:
    """The rules an AlertConfig asks for: the built-in ones (today's names, as instances of the general rules),
    a Threshold per entry of `thresholds`, and your own `rules`."""
    rules: list[Any] = []
    if config.canary_extracted:
        rules.append(
            Flip(
                "exact",
                ("canary",),
                "step {step}: {n} inserted canary(ies) became extractable: {names}",
                "canary_extracted",
            )
        )
    if config.leak:
        rules.append(
            Flip(
                "exact",
                tuple(config.leak_groups),
                "step {step}: {n} {kind} became extractable: {names}. Held-out text should not be memorized: a "
                "leak into the training data, duplicated data, or a measurement fault.",
                "leak",
                at_baseline=False,
                min_values={"suffix_distinct": config.leak_min_distinct},
            )
        )
    rules += [
        Threshold(f"{g}/extraction_rate", t, "extraction_rate") for g, t in config.extraction_rate.items()
    ]
    if config.spike:
        rules.append(
            Spike("*/extraction_rate", config.spike_z, config.spike_min_rate, config.spike_min_evals)
        )
        rules.append(
            Spike(
                "*/newly_memorized",
                config.spike_z,
                float(config.spike_min_count),
                config.spike_min_evals,
                after_baseline=True,  # at the first evaluation everything memorized counts as "new"
            )
        )
    if config.exposure_bits is not None:
        rules.append(
            ProbeThreshold(
                "exposure",
                ("canary",),
                config.exposure_bits,
                "step {step}: {n} inserted canary(ies) reached an exposure of {value:g} bits or more (extraction "
                "may follow): {names}",
                "exposure",
                baseline_signal="exposure_rank",
            )
        )
    rules += [Threshold(key, value) for key, value in config.thresholds.items()]
    rules += list(config.rules)
    return rules


class AlertEngine:
    """Evaluates the rules on each EvalRecord and keeps their state (RuleState).

    describe(i) may return a text for probe i (only used when the monitor reveals text)."""

    def __init__(self, config: AlertConfig, describe: Callable[[int], str | None] | None = None) -> None:
        self.config = config
        self.rules = rules_of(config)
        self.state = RuleState(config.cooldown, config.hysteresis)
        self.ctx = RuleContext(config.actions, describe, config.confirm_near_ties)

    def evaluate(self, record: EvalRecord) -> list[Alert]:
        if not self.config.enabled:
            return []
        self.state.evals += 1
        alerts: list[Alert] = []
        for rule in self.rules:
            alerts += rule.check(record, self.state, self.ctx)
        return alerts

    def state_dict(self) -> dict[str, Any]:
        return self.state.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.state.load_state_dict(state)


class WebhookSink:
    """POSTs each alert as JSON from a background thread: bounded retries, a timeout per attempt, never blocking.

    The payload has Slack's "text" field plus the structured alert. close() waits at most `grace` seconds for
    posts still in flight.
    """

    def __init__(self, url: str, timeout: float = 3.0, retries: int = 2, run_name: str | None = None) -> None:
        self.url = url
        self.timeout = timeout
        self.retries = retries
        self.run_name = run_name
        self.threads: list[threading.Thread] = []
        self.failures = 0
        self.sent = 0
        self.abandoned = 0  # posts still in flight when close() gave up waiting

    def __call__(self, alert: Alert) -> None:
        payload = json.dumps(
            {"text": f"memwatch: {alert.message}", "run": self.run_name, "alert": alert.to_dict()},
            default=str,
        ).encode()
        thread = threading.Thread(target=self._post, args=(payload,), name="memwatch-webhook", daemon=True)
        thread.start()
        self.threads = [t for t in self.threads if t.is_alive()] + [thread]

    def _post(self, payload: bytes) -> None:
        for attempt in range(self.retries + 1):
            try:
                req = urllib.request.Request(
                    self.url, data=payload, headers={"Content-Type": "application/json"}, method="POST"
                )
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    if 200 <= resp.status < 300:
                        self.sent += 1
                        return
            except (urllib.error.URLError, OSError, ValueError) as exc:
                last = exc
            else:
                last = RuntimeError(f"HTTP {resp.status}")
            if attempt < self.retries:
                time.sleep(min(2.0, 0.25 * 2**attempt))
        self.failures += 1
        host = urllib.parse.urlsplit(self.url).netloc  # the path of a Slack-style URL is its secret
        log.warning("memwatch: webhook to %s failed after %d attempt(s): %s", host, self.retries + 1, last)

    def close(self, grace: float = 5.0) -> None:
        deadline = time.monotonic() + grace
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self.abandoned = sum(t.is_alive() for t in self.threads)
        self.threads = []
        if self.sent or self.failures or self.abandoned:
            level = logging.WARNING if self.failures or self.abandoned else logging.INFO
            log.log(
                level,
                "memwatch: webhook to %s: %d alert(s) sent, %d failed, %d abandoned at shutdown",
                urllib.parse.urlsplit(self.url).hostname,
                self.sent,
                self.failures,
                self.abandoned,
            )

    def undelivered(self) -> int:
        return self.failures + self.abandoned


class AlertSinks:
    """Delivers alerts everywhere configured; one failing sink never stops the others (or training)."""

    def __init__(self) -> None:
        self.sinks: list[tuple[str, Callable[[Alert], Any]]] = []
        self.closers: list[Callable[[], Any]] = []
        self._broken: set[str] = set()
        self.failed: dict[str, int] = {}  # sink -> alerts it failed to take
        self._pending: dict[str, Callable[[], int]] = {}  # sink -> how many it lost after taking them
        self._flushers: list[tuple[str, Callable[[], Any]]] = []

    def add(
        self,
        name: str,
        sink: Callable[[Alert], Any],
        close: Callable[[], Any] | None = None,
        undelivered: Callable[[], int] | None = None,
        flush: Callable[[], Any] | None = None,
    ) -> None:
        """A sink; `flush` (optional) is called once the alerts of an evaluation are all emitted."""
        self.sinks.append((name, sink))
        if close is not None:
            self.closers.append(close)
        if flush is not None:
            self._flushers.append((name, flush))
        if undelivered is not None:
            self._pending[name] = undelivered

    def undelivered(self) -> dict[str, int]:
        """Per sink, the alerts that did not get through (failed writes, webhook posts failed or abandoned)."""
        out = dict(self.failed)
        for name, count in self._pending.items():
            out[name] = out.get(name, 0) + count()
        return out

    def emit(self, alert: Alert, only: Sequence[str] | None = None) -> None:
        for name, sink in self.sinks:
            if only is not None and name not in only:
                continue
            try:
                sink(alert)
            except Exception:  # a sink must not take the run down
                self.failed[name] = self.failed.get(name, 0) + 1
                if name not in self._broken:
                    self._broken.add(name)
                    log.exception(
                        "memwatch: the %s alert sink failed; other sinks and training continue", name
                    )

    def flush(self) -> None:
        for name, flush in self._flushers:
            try:
                flush()
            except Exception:
                self.failed[name] = self.failed.get(name, 0) + 1
                log.exception("memwatch: the %s alert sink failed; other sinks and training continue", name)

    def close(self) -> None:
        for close in self.closers:
            with contextlib.suppress(Exception):
                close()


def jsonl_sink(path: str) -> Callable[[Alert], None]:
    """Append alerts as JSON lines to `path` (mode 0600, each record whole or not at all, never through a link)."""
    from memwatch.store.files import append_line, private_makedirs

    private_makedirs(os.path.dirname(os.path.abspath(path)))

    def write(alert: Alert) -> None:
        append_line(path, json.dumps(alert.to_dict(), default=str))

    return write
