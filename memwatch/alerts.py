"""Alerts on memorization: rules with cooldown and hysteresis, sinks (console, log, JSONL, webhook, ...), actions."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .config import AlertConfig
from .evaluation import EvalRecord

__all__ = ["Alert", "AlertEngine", "AlertSinks", "WebhookSink"]

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
    tier = meta.get("repetitions")
    family = meta.get("family")
    detail = ", ".join(x for x in (f"{tier}x" if tier is not None else None, family) if x)
    return f"{meta.get('canary_id', pid)}" + (f" ({detail})" if detail else "")


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


class AlertEngine:
    """Evaluates the rules on each EvalRecord; keeps the state they need (baselines, armed thresholds, cooldowns).

    describe(i) may return a text for probe i (only used when the monitor reveals text).
    """

    def __init__(
        self,
        config: AlertConfig,
        describe: Callable[[int], str | None] | None = None,
        suffix_distinct: np.ndarray | None = None,
    ) -> None:
        self.config = config
        self.describe = describe
        # int [N]: distinct tokens in each probe's true suffix; a leak needs at least leak_min_distinct of them.
        self.suffix_distinct = suffix_distinct
        self.evals = 0  # evaluations seen
        self.prev_exact: np.ndarray | None = None
        self.armed: dict[tuple[str, str], bool] = {}
        self.last_fired: dict[tuple[str, str], int] = {}
        self.ema: dict[tuple[str, str], _Ema] = {}

    # --- helpers ---------------------------------------------------------------------------------------------

    def _cool(self, key: tuple[str, str]) -> bool:
        """True if the key may fire now (outside its cooldown); records the firing when it does."""
        last = self.last_fired.get(key)
        if last is not None and self.evals - last <= self.config.cooldown:
            return False
        self.last_fired[key] = self.evals
        return True

    def _action(self, rule: str) -> str | None:
        acts = self.config.actions.get(rule, ())
        return ",".join(acts) if acts else None

    def _text(self, i: int) -> str:
        if self.describe is None:
            return ""
        text = self.describe(i)
        return f" [{text}]" if text else ""

    def _reached(self, key: tuple[str, str], value: float, threshold: float) -> bool:
        """True while armed and value >= threshold. An alert that fires disarms the key (see _disarm); it re-arms
        once the value falls below threshold * (1 - hysteresis). A crossing held back by the cooldown stays armed."""
        armed = self.armed.get(key, True)
        if not armed and value < threshold * (1 - self.config.hysteresis):
            self.armed[key] = armed = True
        return armed and value >= threshold

    def _disarm(self, key: tuple[str, str]) -> None:
        self.armed[key] = False

    # --- rules -----------------------------------------------------------------------------------------------

    def evaluate(self, record: EvalRecord) -> list[Alert]:
        cfg = self.config
        if not cfg.enabled:
            return []
        self.evals += 1
        exact = np.asarray(record.result.exact, dtype=bool)
        newly = exact & ~self.prev_exact if self.prev_exact is not None else exact.copy()
        baseline = self.prev_exact is None
        groups = record.groups
        alerts: list[Alert] = []
        step = record.step

        def probes_alert(
            rule: str, rows: Sequence[int], message: str, group: str | None, data: dict[str, Any]
        ) -> list[int]:
            """One alert for the rows outside their cooldown; returns the rows it names."""
            rows = [i for i in rows if self._cool((rule, record.probe_ids[i]))]
            if not rows:
                return []
            names = ", ".join(
                _fmt_probe(record.probe_ids[i], record.metas[i]) + self._text(i) for i in rows[:10]
            )
            more = f" and {len(rows) - 10} more" if len(rows) > 10 else ""
            alerts.append(
                Alert(
                    step,
                    rule,
                    group,
                    [record.probe_ids[i] for i in rows],
                    message.format(names=names + more, n=len(rows)),
                    self._action(rule),
                    data,
                )
            )
            return rows

        if cfg.canary_extracted:
            rows = np.flatnonzero(newly & (groups == "canary")).tolist()
            probes_alert(
                "canary_extracted",
                rows,
                f"step {step}: {{n}} inserted canary(ies) became extractable: {{names}}",
                "canary",
                {"tiers": sorted({int(record.metas[i].get("repetitions", 0)) for i in rows})},
            )
        if cfg.leak and not baseline:
            for g in cfg.leak_groups:
                candidates = newly & (groups == g)
                if self.suffix_distinct is not None:  # predictable text is recited, not leaked
                    candidates &= self.suffix_distinct >= cfg.leak_min_distinct
                rows = np.flatnonzero(candidates).tolist()
                kind = "never-inserted twin(s)" if g == "canary_heldout" else f"{g} probe(s)"
                probes_alert(
                    "leak",
                    rows,
                    f"step {step}: {{n}} {kind} became extractable: {{names}}. Held-out text should not be memorized: "
                    "a leak into the training data, duplicated data, or a measurement fault.",
                    g,
                    {},
                )
        for g, threshold in cfg.extraction_rate.items():
            st = record.stats.get(g)
            if st is None or not st.n:
                continue
            rate = st.extraction_rate
            if self._reached(("extraction_rate", g), rate, threshold) and self._cool(("extraction_rate", g)):
                self._disarm(("extraction_rate", g))
                alerts.append(
                    Alert(
                        step,
                        "extraction_rate",
                        g,
                        [],
                        f"step {step}: {g} extraction rate {rate:.1%} crossed the threshold {threshold:.1%}",
                        self._action("extraction_rate"),
                        {"rate": rate, "threshold": threshold},
                    )
                )
        if cfg.spike:
            for g, st in record.stats.items():
                series = {"extraction_rate": (st.extraction_rate, cfg.spike_min_rate)}
                if not baseline:  # at the first evaluation everything memorized counts as "new"
                    series["newly_memorized"] = (float(st.newly_memorized), float(cfg.spike_min_count))
                for metric, (value, min_delta) in series.items():
                    if value is None or not math.isfinite(value):
                        continue
                    ema = self.ema.setdefault((g, metric), _Ema())
                    if ema.n >= cfg.spike_min_evals:
                        sd = math.sqrt(max(ema.var, 0.0))
                        if (
                            value > ema.mean + cfg.spike_z * sd
                            and value - ema.mean >= min_delta
                            and self._cool(("spike", f"{g}/{metric}"))
                        ):
                            shown = f"{value:.1%}" if metric == "extraction_rate" else f"{value:.0f}"
                            base = (
                                f"{ema.mean:.1%} ± {sd:.1%}"
                                if metric == "extraction_rate"
                                else f"{ema.mean:.1f} ± {sd:.1f}"
                            )
                            alerts.append(
                                Alert(
                                    step,
                                    "spike",
                                    g,
                                    [],
                                    f"step {step}: spike in {g} {metric.replace('_', ' ')}: {shown} against a baseline of {base}",
                                    self._action("spike"),
                                    {"metric": metric, "value": value, "baseline": ema.mean, "sd": sd},
                                )
                            )
                    ema.update(value)
        if cfg.exposure_bits is not None and record.exposure is not None:
            crossed = []
            for i in np.flatnonzero(groups == "canary"):
                value = float(record.exposure[i])
                if math.isfinite(value) and self._reached(
                    ("exposure", record.probe_ids[i]), value, cfg.exposure_bits
                ):
                    crossed.append(int(i))
            fired = probes_alert(
                "exposure",
                crossed,
                f"step {step}: {{n}} inserted canary(ies) reached an exposure of {cfg.exposure_bits:g} bits or more "
                "(extraction may follow): {names}",
                "canary",
                {"exposure": {record.probe_ids[i]: float(record.exposure[i]) for i in crossed}},
            )
            for i in fired:
                self._disarm(("exposure", record.probe_ids[i]))
        self.prev_exact = exact.copy()
        return alerts

    def state_dict(self) -> dict[str, Any]:
        return {
            "evals": self.evals,
            "prev_exact": None if self.prev_exact is None else self.prev_exact.tolist(),
            "armed": [[list(k), v] for k, v in self.armed.items()],
            "last_fired": [[list(k), v] for k, v in self.last_fired.items()],
            "ema": [[list(k), e.n, e.mean, e.var] for k, e in self.ema.items()],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.evals = state["evals"]
        self.prev_exact = None if state["prev_exact"] is None else np.asarray(state["prev_exact"], dtype=bool)
        self.armed = {tuple(k): v for k, v in state["armed"]}
        self.last_fired = {tuple(k): v for k, v in state["last_fired"]}
        self.ema = {}
        for k, n, mean, var in state["ema"]:
            e = _Ema()
            e.n, e.mean, e.var = n, mean, var
            self.ema[tuple(k)] = e


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
    from .files import append_line, private_makedirs

    private_makedirs(os.path.dirname(os.path.abspath(path)))

    def write(alert: Alert) -> None:
        append_line(path, json.dumps(alert.to_dict(), default=str))

    return write
