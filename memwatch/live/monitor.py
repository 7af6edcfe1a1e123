"""The framework-agnostic Monitor: when to run, build the panel once, extract, record, report (DESIGN.md §4)."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from memwatch.config import MonitorConfig
from memwatch.live import distributed
from memwatch.probes import Panel, Probe, probes_from_user, sample_windows
from memwatch.record import EvalRecord, ProbeTracker, build_record, products_of

__all__ = ["Cadence", "Monitor", "SetupError"]

log = logging.getLogger("memwatch")


class SetupError(ValueError):
    """memwatch cannot start: the message names the problem and the fix. Raised before the first training step."""


def nice_ceil(x: float) -> int:
    """Smallest 1, 2 or 5 times a power of ten that is >= x (readable evaluation intervals)."""
    if x <= 1:
        return 1
    exp = 10 ** math.floor(math.log10(x))
    for mult in (1, 2, 5, 10):
        if mult * exp >= x:
            return int(mult * exp)
    return int(10 * exp)  # pragma: no cover


class Cadence:
    """Decides at which optimizer steps to evaluate.

    Fixed: every `every_n_steps` steps. Adaptive (every_n_steps=None): after each evaluation the interval is
    set to the smallest 1/2/5 x 10^k steps for which evaluation time / training time <= max_overhead, using
    the measured evaluation cost and the median training step time; until a step time is known, the first
    `warmup_steps` steps are timed.
    """

    def __init__(self, every_n_steps: int | None, max_overhead: float, warmup_steps: int = 10) -> None:
        self.fixed = every_n_steps
        self.max_overhead = max_overhead
        self.warmup_steps = warmup_steps
        self.interval: int | None = every_n_steps
        self.last_step: int | None = None
        self.eval_cost: float | None = None
        self.step_times: list[float] = []

    def add_step_time(self, seconds: float) -> None:
        if seconds <= 0:
            return
        self.step_times.append(seconds)
        del self.step_times[:-200]  # a recent window
        if self.interval is None and len(self.step_times) >= self.warmup_steps:
            self._update_interval()  # the first adaptive interval, once the warm-up steps are timed

    def _update_interval(self) -> None:
        if (
            self.fixed is not None
            or self.eval_cost is None
            or len(self.step_times) < min(3, self.warmup_steps)
        ):
            return
        step_time = statistics.median(self.step_times)
        self.interval = nice_ceil(self.eval_cost / (self.max_overhead * step_time))

    def due(self, step: int) -> bool:
        if self.interval is None:
            # Adaptive with no known evaluation cost (no baseline, or nothing to go by after a resume): evaluate
            # once right after the warm-up, which measures it.
            ready = (
                self.fixed is None and self.eval_cost is None and len(self.step_times) >= self.warmup_steps
            )
            return ready and step != self.last_step
        return step % self.interval == 0 and step != self.last_step

    def evaluated(self, step: int, seconds: float) -> None:
        self.last_step = step
        # The smoothed cost decides the next interval; a single slow evaluation (e.g. a first-call warm-up) does
        # not lock in a long interval.
        self.eval_cost = seconds if self.eval_cost is None else 0.5 * (self.eval_cost + seconds)
        self._update_interval()

    def state_dict(self) -> dict[str, Any]:
        return {"interval": self.interval, "last_step": self.last_step, "eval_cost": self.eval_cost}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self.fixed is None:
            self.interval = state.get("interval")
        self.last_step = state.get("last_step")
        self.eval_cost = state.get("eval_cost")


def _looks_like_token_lists(data: Any) -> bool:
    return isinstance(data, list | tuple) and (
        not data or isinstance(data[0], str | Mapping | list | tuple) or hasattr(data[0], "tolist")
    )


def _is_oom(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    if isinstance(exc, MemoryError):  # Python's own (numpy, host allocations): whatever its message
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def write_history(history: Any, run_id: int, record: EvalRecord, reveal_text: bool) -> None:
    """One evaluation into the history: the typed columns, and every other stored signal through the catalog."""
    from memwatch.signals import REGISTRY
    from memwatch.store.history import RESULT_COLUMNS

    r = record.result
    assert r is not None
    columns: dict[str, Any] = {name: record.values.get(name) for name in RESULT_COLUMNS}
    columns["exposure"] = record.exposure
    columns["generated"] = None if r.generated is None else r.generated.astype(np.int32)
    columns["entropy"] = r.entropy
    signals = {
        name: (REGISTRY.signals[name], values)
        for name, values in record.values.items()
        if name not in RESULT_COLUMNS and REGISTRY.signals[name].stored and np.isfinite(values).any()
    }
    history.add_evaluation(
        run_id,
        record.step,
        spec=record.spec,
        probe_ids=record.probe_ids,
        wall_time=record.wall_time,
        duration=record.duration,
        label=record.label,
        reveal_generated=reveal_text,
        columns=columns,
        signals=signals,
    )


class EvaluationError(RuntimeError):
    """An evaluation failed on some rank (the message says which and why)."""


class Monitor:
    """Evaluates memorization on a fixed panel during training; integrations call it, users may too.

    Lifecycle: `setup(model, ...)` once (builds the panel, opens the history and reporters), then
    `on_step(model, step)` after every optimizer step (evaluates when the cadence says so), then
    `finish(model, step)`. `evaluate(model, step)` runs one evaluation now.

    It never takes the training run down: an exception inside an evaluation is caught, logged once with its
    traceback, recorded, and training goes on; after `max_failures` failures in a row the monitor switches itself
    off with a visible warning (`strict=True` re-raises instead). Bad input is a SetupError at setup, before the
    first step. Under torch.distributed every rank computes a shard of the panel; rank 0 writes.
    """

    def __init__(
        self,
        config: MonitorConfig | None = None,
        *,
        probes: Iterable[Any] | None = None,
        heldout: Any = None,
        tokenizer: Any = None,
        canaries: Any = None,
    ) -> None:
        if config is not None and not isinstance(config, MonitorConfig):
            raise TypeError(f"config must be a memwatch.MonitorConfig; got {type(config).__name__}")
        self.config = config or MonitorConfig()
        self.user_probes = list(probes) if probes is not None else []
        self.heldout = heldout
        self.tokenizer = tokenizer
        self.canaries = canaries
        self.manifest = self._manifest(canaries)
        self.preflight_report = None
        self.panel: Panel | None = None
        self.tracker: ProbeTracker | None = None
        self.cadence = Cadence(self.config.every_n_steps, self.config.max_overhead)
        self.history = None
        self.tensorboard = None
        self.console = None
        self.run_id: int | None = None
        self.run_name: str | None = None
        self.output_dir: str | None = None
        self.amp_dtype: str | None = None
        self.is_main = True
        self.alert_engine = None
        self.alert_sinks = None
        self.alerts: list[Any] = []
        self.last_record: EvalRecord | None = None
        self.evaluated_steps: list[int] = []
        self.last_step: int | None = (
            None  # the last step seen (saved with the state: a resume continues from it)
        )
        self.failures: list[str] = []  # every failure, as "step N: Type: message"
        # What each writer lost: name -> {"count", "first_step", "last_step", "last_error"}; summarized at the end.
        self.losses: dict[str, dict[str, Any]] = {}
        self._incidents: dict[str, int] = {}  # repeated incidents are counted, not re-announced
        self.consecutive_failures = 0
        self.disabled = False
        self.batch_size: int | None = self.config.batch_size  # lowered on out-of-memory, then remembered
        self.history_timeout = 10.0  # seconds to wait for a history locked by another writer
        self._warned: set[str] = set()
        self._tokens: np.ndarray | None = None
        self._window_text: list[bytes] | None = None
        self._final = False  # finish() is evaluating the model that ships (the embedding view is due)
        self._last_tick: float | None = None
        self._paused = 0.0
        self.ready = False

    # --- setup -------------------------------------------------------------------------------------------------

    def contain(self, exc: Exception, where: str) -> None:
        """An unexpected error in an integration's hook: re-raised under strict=True, else logged; training
        goes on (call it from the hook's `except Exception`)."""
        if self.config.strict:
            raise exc
        log.error("memwatch: unexpected error %s; training continues", where, exc_info=exc)

    def guarded_setup(self, setup: Callable[[], Any]) -> bool:
        """Run `setup` (which calls self.setup) the way integrations must: bad input (SetupError) still raises
        before the first step; any other failure switches memwatch off with a logged error (strict=True
        re-raises), so the training run goes on. True if memwatch is on."""
        try:
            setup()
        except SetupError:
            raise
        except Exception as exc:
            self.contain(exc, "at setup: memwatch is switched off")
            self.disabled = True
            return False
        return True

    def setup(
        self,
        model: Any,
        *,
        output_dir: str | os.PathLike[str] | None = None,
        train_data: Any = None,
        eval_data: Any = None,
        collator: Callable[[list[Any]], Any] | None = None,
        tokenizer: Any = None,
        start_step: int = 0,
        amp_dtype: str | None = None,
        run_name: str | None = None,
        model_name: str | None = None,
        source: str = "live",
    ) -> None:
        """Build the panel and open the outputs. Raises SetupError (before training starts) for bad input.

        start_step > 0 resumes: the run of the same name continues with its recorded panel, evaluations after
        start_step are replaced, and the per-probe state is rebuilt from the history. source="scan" (post-hoc
        checkpoints): the run of that name is continued, and canaries are not pre-flighted (there is no training
        dataset to look in). Under torch.distributed, rank 0 builds the panel and every rank receives it.
        """
        cfg = self.config
        self.tokenizer = self.tokenizer or tokenizer
        self.is_main = distributed.is_main_process()
        self.amp_dtype = amp_dtype if cfg.amp_dtype == "auto" else cfg.amp_dtype
        if self.amp_dtype == "fp32":
            self.amp_dtype = None
        self.output_dir = os.fspath(cfg.output_dir or os.path.join(os.fspath(output_dir or "."), "memwatch"))
        self.run_name = (
            cfg.run_name
            or run_name
            or os.path.basename(os.path.abspath(os.path.dirname(self.output_dir)))
            or "run"
        )
        state = None
        from memwatch.store.history import HistoryError

        try:
            if self.is_main:
                try:
                    state = self._setup_main(
                        model, train_data, eval_data, collator, model_name, start_step, source
                    )
                except HistoryError as exc:  # corrupt, newer, locked or unwritable: bad input, said at setup
                    raise SetupError(str(exc)) from exc
        except SetupError as exc:
            state = {"error": str(exc)}
            self.close()  # nothing stays open behind a failed setup
            raise
        except Exception as exc:
            state = {"error": f"memwatch could not start: {type(exc).__name__}: {exc}"}
            self.close()
            raise
        finally:
            # Every rank learns the outcome, so no rank waits forever for a panel that will not come.
            state = distributed.broadcast(state)
        if "error" in state:
            raise SetupError(state["error"])
        if not self.is_main:
            self.panel = Panel(Probe(tuple(t), g, m) for t, g, m in state["panel"])
            self._tokens = self.panel.tokens(cfg.prefix_len + cfg.suffix_len)
            self.tracker = ProbeTracker(len(self.panel))
            self._check_model(model)
        self.tracker.load_state_dict(state["tracker"])
        self.cadence.load_state_dict(state["cadence"])
        self.evaluated_steps = list(state["evaluated_steps"])
        self.last_step = start_step
        self.ready = True

    def _setup_main(
        self,
        model: Any,
        train_data: Any,
        eval_data: Any,
        collator: Any,
        model_name: str | None,
        start_step: int,
        source: str,
    ) -> dict[str, Any]:
        cfg = self.config
        resume = start_step > 0 or source == "scan"  # a scan continues its run; a resumed training too
        new_run = None  # the run this setup adds, removed again if the setup fails
        if cfg.history:
            from memwatch.store.history import HistoryStore

            path = cfg.history_path or os.path.join(self.output_dir, "history.sqlite")
            self.history = HistoryStore(path, timeout=self.history_timeout)
            self.run_id = self.history.find_run(self.run_name, source) if resume else None
            if self.run_id is not None and source == "live":
                self._check_definitions(self.history.run_config(self.run_id))
        stored = self.history.panel(self.run_id) if self.run_id is not None and source == "live" else []
        if stored:  # a resumed run keeps the probes it started with
            self.panel = Panel(Probe(tuple(p["tokens"]), p["group"], p["meta"]) for p in stored)
        else:
            self.panel = self._build_panel(train_data, eval_data, collator)
            if self.manifest is not None and source == "live":
                self._preflight(train_data, collator)
        self._tokens = self.panel.tokens(cfg.prefix_len + cfg.suffix_len)
        self.tracker = ProbeTracker(len(self.panel))
        self._check_model(model)
        self._check_alert_groups()
        if self.history is not None:
            if self.run_id is not None and source == "live":
                removed = self.history.truncate_after(self.run_id, start_step)
                if removed:
                    log.info(
                        "memwatch: resumed at step %d; replaced %d later evaluation(s)", start_step, removed
                    )
            elif self.run_id is None:
                self.run_id = self.history.add_run(
                    self.run_name, source=source, model=model_name, config=cfg.to_dict()
                )
                new_run = self.run_id
            self.history.add_probes(
                self.run_id, [(p.id, p.tokens, p.group, p.meta) for p in self.panel.probes]
            )
        try:
            self._open_reporters(start_step if resume and source == "live" else 0)
            if self.run_id is not None and source == "live" and resume:
                self._replay()
        except Exception:
            if new_run is not None and self.history is not None:  # no empty run left for every report to list
                self.history.delete_empty_run(new_run)
            raise
        return {
            "panel": [(p.tokens, p.group, dict(p.meta)) for p in self.panel.probes],
            "tracker": self.tracker.state_dict(),
            "cadence": self.cadence.state_dict(),
            "evaluated_steps": self.evaluated_steps,
        }

    def _check_alert_groups(self) -> None:
        """A rule you configured for a group the panel does not have could never fire: say so at setup."""
        from memwatch.config import AlertConfig

        acfg, default = self.config.alerts, AlertConfig()
        if not acfg.enabled or self.panel is None:
            return
        named = set(acfg.extraction_rate) if acfg.extraction_rate != default.extraction_rate else set()
        if acfg.leak_groups != default.leak_groups:
            named |= set(acfg.leak_groups)
        unknown = sorted(named - set(self.panel.group_names()))
        if unknown:
            raise SetupError(
                f"AlertConfig names group(s) {unknown} that the panel does not have, so those rules could never "
                f"fire; the panel's groups are {self.panel.group_names()}"
            )
        from memwatch.record import scopes_of

        scopes = [
            s.key
            for s in scopes_of(self.panel.groups, [p.meta for p in self.panel.probes], self.config.pairs)
        ]
        missing = [
            key
            for key in acfg.thresholds
            if not any(c in key for c in "*?[") and key.rpartition("/")[0] not in scopes
        ]
        if missing:
            raise SetupError(
                f"AlertConfig.thresholds names {missing}, whose group, tier or pair the panel does not have, so "
                f"those rules could never fire; the panel has {scopes}"
            )

    def _check_definitions(self, stored: Mapping[str, Any]) -> None:
        """A resumed run measures what it measured before: refuse a config that changes a definition."""
        changed = [
            f"{name}={value!r} (recorded with {stored[name]!r})"
            for name, value in self.config.definitions().items()
            if name in stored and stored[name] != value
        ]
        if changed:
            raise SetupError(
                f"resuming run {self.run_name!r} with {', '.join(changed)} would change what its numbers mean; "
                "resume with the settings it was recorded with, or record into a new run (run_name=... or a new "
                "output_dir)"
            )

    def _replay(self) -> None:
        """Rebuild per-probe and alert state from the evaluations already in the history (a resumed run)."""
        from memwatch.store.runs import History

        assert self.history is not None and self.panel is not None
        with History(self.history.path) as h:
            run = h.run(self.run_id, spec=self.config.spec())
        if run.ids != self.panel.ids:
            return
        for _e, record in run.records(self.tracker):
            if self.alert_engine is not None:
                self.alert_engine.evaluate(record)  # state only: these alerts were delivered before
            self.evaluated_steps.append(record.step)
            self.cadence.last_step = record.step
            self.last_record = record
        # The cost of an evaluation, so the adaptive cadence can pick an interval without measuring again.
        durations = [d for d in run.durations.tolist() if d > 0] if run.durations is not None else []
        if durations:
            self.cadence.eval_cost = float(np.mean(durations[-3:]))

    def _build_panel(self, train_data: Any, eval_data: Any, collator: Any) -> Panel:
        cfg = self.config
        k, m = cfg.prefix_len, cfg.suffix_len
        panel = Panel()
        for probe in self._canary_probes():
            panel.add(probe)
        try:
            for probe in probes_from_user(self.user_probes, tokenizer=self.tokenizer):
                panel.add(probe)
        except ValueError as exc:
            raise SetupError(str(exc)) from exc
        for probe in sample_windows(
            train_data,
            cfg.train_probes,
            prefix_len=k,
            suffix_len=m,
            group="train",
            seed=cfg.seed,
            collator=collator,
            window=cfg.window,
        ):
            panel.add(probe)
        heldout = self.heldout if self.heldout is not None else eval_data
        before = set(panel.ids)
        overlap = 0  # held-out windows whose tokens are already in the panel (training windows, canaries)
        if heldout is not None and cfg.heldout_probes:
            if _looks_like_token_lists(heldout):
                try:
                    probes = probes_from_user(
                        list(heldout), tokenizer=self.tokenizer, default_group="heldout"
                    )
                except ValueError as exc:
                    raise SetupError(str(exc)) from exc
                rng = np.random.default_rng([cfg.seed, 0x686F])
                long_enough = [p for p in probes if len(p.tokens) >= k + m]
                for i in rng.permutation(len(long_enough))[: cfg.heldout_probes]:
                    p = long_enough[int(i)]
                    window_probe = Probe(p.tokens[: k + m], p.group, p.meta)
                    overlap += not panel.add(window_probe) and window_probe.id in before
            else:
                for probe in sample_windows(
                    heldout,
                    cfg.heldout_probes,
                    prefix_len=k,
                    suffix_len=m,
                    group="heldout",
                    seed=cfg.seed + 1,
                    collator=collator,
                    window=cfg.window,
                ):
                    overlap += not panel.add(probe) and probe.id in before
        if overlap:
            log.warning(
                "memwatch: %d held-out window(s) have the same tokens as a training window or canary and were "
                "left out of the heldout group: the held-out data overlaps the training data",
                overlap,
            )
        dropped = panel.filter_short(k + m)
        if dropped:
            log.warning(
                "memwatch: %d probe(s) shorter than prefix_len + suffix_len = %d tokens were left out",
                dropped,
                k + m,
            )
        if not len(panel):
            given = [
                name
                for name, present in (
                    ("training data", train_data is not None),
                    ("held-out data", heldout is not None and cfg.heldout_probes),
                    ("probes", bool(self.user_probes)),
                    ("canaries", self.canaries is not None),
                )
                if present
            ]
            raise SetupError(
                f"memwatch has no probes to evaluate: {', '.join(given) or 'no data'} given, but nothing has a "
                f"window of prefix_len + suffix_len = {k + m} tokens (training windows also need their last {m} "
                f"tokens to receive loss){f'; {dropped} probe(s) were too short' if dropped else ''}. Use longer "
                "sequences or smaller prefix_len / suffix_len."
            )
        return panel

    @staticmethod
    def _manifest(canaries: Any) -> Any:
        """A CanaryManifest (or a path to one) turns on pre-flight and exposure; plain Probes are used as given."""
        if canaries is None:
            return None
        from memwatch.canaries import CanaryError, CanaryManifest

        if isinstance(canaries, str | os.PathLike):
            try:
                return CanaryManifest.load(canaries)
            except CanaryError as exc:
                raise SetupError(str(exc)) from exc
        return canaries if isinstance(canaries, CanaryManifest) else None

    def _canary_probes(self) -> list[Probe]:
        if self.canaries is None:
            return []
        if self.manifest is not None:
            from memwatch.canaries import CanaryError

            try:
                return self.manifest.probes(self.config.prefix_len, self.config.suffix_len)
            except CanaryError as exc:
                raise SetupError(str(exc)) from exc
        return list(self.canaries)

    def _preflight(self, train_data: Any, collator: Any) -> None:
        """Inserted canaries must really be in the data the trainer uses, with their secrets trained."""
        from memwatch.canaries import CanaryError, preflight

        assert self.panel is not None
        try:
            report = preflight(
                self.manifest,
                train_data,
                prefix_len=self.config.prefix_len,
                suffix_len=self.config.suffix_len,
                collator=collator,
            )
        except CanaryError as exc:
            raise SetupError(str(exc)) from exc
        for message in report.warnings:
            log.warning("memwatch: %s", message)
        # Probe each inserted canary exactly as it appears in the training data.
        replaced = []
        for probe in self.panel.probes:
            window = report.windows.get(probe.meta.get("canary_id", ""))
            replaced.append(
                probe if window is None or window == probe.tokens else Probe(window, probe.group, probe.meta)
            )
        self.panel = Panel(replaced)
        self.preflight_report = report

    def _check_model(self, model: Any) -> None:
        from memwatch.engine.modeling import inspect_model

        try:
            info = inspect_model(model)
        except TypeError as exc:
            raise SetupError(str(exc)) from exc
        need = self.config.prefix_len + self.config.suffix_len
        if info.position_limit is not None and need > info.position_limit:
            raise SetupError(
                f"prefix_len + suffix_len = {need} exceeds the model's position limit of {info.position_limit}; "
                "lower MonitorConfig.prefix_len / suffix_len."
            )
        if self._tokens is not None and self._tokens.size and int(self._tokens.max()) >= info.vocab_size:
            raise SetupError(
                f"probe token ids reach {int(self._tokens.max())} but the model's vocabulary has {info.vocab_size} "
                "entries: the probes were tokenized with another tokenizer."
            )

    def _open_reporters(self, purge_from: int) -> None:
        cfg = self.config
        assert self.panel is not None
        if cfg.tensorboard:
            tb_dir = cfg.tensorboard_dir or os.path.join(self.output_dir, "tb")
            from memwatch.reporters.tensorboard import TensorBoardReporter

            try:
                # A resumed run drops the events the interrupted one wrote after its checkpoint.
                self.tensorboard = TensorBoardReporter(
                    tb_dir, purge_step=purge_from + 1 if purge_from > 0 else None
                )
            except OSError as exc:
                raise SetupError(
                    f"cannot write TensorBoard logs to {tb_dir}: {exc.strerror or exc}; choose a writable "
                    "tensorboard_dir or output_dir, or set tensorboard=False"
                ) from exc
        if cfg.console:
            from memwatch.reporters.console import ConsoleReporter

            self.console = ConsoleReporter()
        self._open_alerts()

    def _open_alerts(self) -> None:
        """The alert engine and its sinks (rank 0): console, log, JSONL, history, TensorBoard, callable, webhook."""
        from memwatch.alerts import AlertEngine, AlertSinks, WebhookSink, jsonl_sink

        acfg = self.config.alerts
        if not acfg.enabled:
            return
        self.alert_engine = AlertEngine(acfg, describe=self._describe if self.config.reveal_text else None)
        sinks = AlertSinks()
        if self.console is not None:
            sinks.add("console", self.console.alert)
        level = logging.INFO if self.console is not None else logging.WARNING  # the console already shows it
        sinks.add(
            "logging",
            lambda a: logging.getLogger("memwatch.alerts").log(level, "memwatch alert: %s", a.message),
        )
        if acfg.jsonl:  # beside the history
            where = (
                os.path.dirname(os.path.abspath(self.history.path))
                if self.history is not None
                else self.output_dir
            )
            sinks.add("jsonl", jsonl_sink(os.path.join(where, "alerts.jsonl")))
        if self.history is not None and self.run_id is not None:
            history, run_id = self.history, self.run_id
            sinks.add(
                "history",
                lambda a: history.add_alert(
                    run_id,
                    a.step,
                    rule=a.rule,
                    message=a.message,
                    group=a.group,
                    probe_ids=a.probe_ids,
                    action=a.action,
                    data=a.data,
                    wall_time=a.wall_time,
                ),
            )
        if self.tensorboard is not None:
            tb = self.tensorboard
            # Buffered: TensorBoard keeps one text entry per tag and step, so all of a step's alerts go in one.
            sinks.add("tensorboard", tb.add_alert, flush=tb.flush_alerts)
        if acfg.on_alert is not None:
            sinks.add("on_alert", acfg.on_alert)
        if acfg.webhook_url:
            hook = WebhookSink(acfg.webhook_url, acfg.webhook_timeout, acfg.webhook_retries, self.run_name)
            grace = min(10.0, acfg.webhook_timeout * (acfg.webhook_retries + 1) + 1)
            sinks.add("webhook", hook, close=lambda: hook.close(grace), undelivered=hook.undelivered)
        self.alert_sinks = sinks

    def _describe(self, i: int) -> str | None:
        """Probe i's text (or token ids) and what the model generated: only with reveal_text=True."""
        assert self.panel is not None and self._tokens is not None
        k = self.config.prefix_len
        tokens = self._tokens[i].tolist()
        generated = None
        if self.last_record is not None and self.last_record.result.generated is not None:
            generated = self.last_record.result.generated[i].tolist()
        decode = getattr(self.tokenizer, "decode", None)
        show = (lambda ids: repr(decode(ids))) if callable(decode) else (lambda ids: str(ids))
        text = f"prefix {show(tokens[:k])}, suffix {show(tokens[k:])}"
        return text + (f", generated {show(generated)}" if generated is not None else "")

    # --- running -----------------------------------------------------------------------------------------------

    def on_step(self, model: Any, step: int) -> EvalRecord | None:
        """Call after every optimizer step: times the step and evaluates when due. Never raises (unless strict)."""
        self.last_step = step
        now = time.perf_counter()
        had_interval = self.cadence.interval is not None
        if self._last_tick is not None:
            self.cadence.add_step_time(now - self._last_tick - self._paused)
        self._last_tick, self._paused = now, 0.0
        if not had_interval and self.cadence.interval is not None and distributed.is_distributed():
            # Every rank reaches the warm-up count at the same step: agree on rank 0's interval.
            self.cadence.interval = distributed.broadcast(self.cadence.interval)
        if not self.ready or self.disabled or not self.cadence.due(step):
            return None
        return self.evaluate(model, step)

    def recorded_steps(self) -> set[int]:
        """Steps this run already holds in the history with the current spec (a scan skips them)."""
        if self.history is None or self.run_id is None:
            return set()
        spec = self.config.spec()
        return {e["step"] for e in self.history.evals(self.run_id) if e["spec"] == spec}

    def evaluate(
        self,
        model: Any,
        step: int,
        *,
        label: str | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> EvalRecord | None:
        """Evaluate the panel at `step` now, record and report it. Returns the record (its `actions` say what the
        alerts asked for), or None if the monitor is off or the evaluation failed (the failure is recorded)."""
        if not self.ready or self.panel is None or self.tracker is None:
            raise RuntimeError("Monitor.evaluate called before Monitor.setup")
        if self.disabled:
            return None
        cfg = self.config
        t0 = time.perf_counter()
        record = None
        error: Exception | None = None
        # Per-probe state advances only with an evaluation the history holds, so that a resumed run's replay
        # and the live run agree on every transition.
        before = self.tracker.snapshot()
        recorded = True
        try:
            result, extra = self._measure(model, progress)
            record = build_record(
                step=step,
                wall_time=time.time(),
                duration=time.perf_counter() - t0,
                spec=cfg.spec(),
                probe_ids=self.panel.ids,
                groups=self.panel.groups,
                metas=[p.meta for p in self.panel.probes],
                tokens=self._tokens,
                products={**products_of(result, extra), "window_bytes": self._window_bytes()},
                tracker=self.tracker,
                settings=cfg.definitions(),
                pairs=cfg.pairs,
                overrides=cfg.signals,
                label=label,
                result=result,
            )
            self.last_record = record
            if self.is_main:
                recorded = self._write(record, label)
                self._alert(record)
            self.consecutive_failures = 0
        except Exception as exc:
            error = exc
            self._failed(exc, step)
            record = None
            recorded = False
        duration = time.perf_counter() - t0
        self.cadence.evaluated(step, duration)
        # Rank 0 decides for every rank: whether the evaluation counts, what the alerts asked for, the next
        # interval, and (strict) the error. Ranks that acted on their own would part ways at the next collective.
        decided = distributed.broadcast(
            {
                "ok": record is not None,
                "actions": sorted(record.actions) if record is not None else [],
                "disabled": self.disabled,
                "duration": duration,
                "interval": self.cadence.interval,
                "eval_cost": self.cadence.eval_cost,
                "error": None if error is None else f"{type(error).__name__}: {error}",
                "recorded": recorded,
            }
        )
        if not decided["recorded"]:
            self.tracker.restore(before)
        self.cadence.interval, self.cadence.eval_cost = decided["interval"], decided["eval_cost"]
        self.disabled = self.disabled or decided["disabled"]
        self._paused += duration
        if cfg.strict and decided["error"] is not None:
            raise error if error is not None else EvaluationError(f"on rank 0: {decided['error']}")
        if not decided["ok"]:
            return None
        self.evaluated_steps.append(step)
        if record is not None:
            record.actions = set(decided["actions"])
            record.duration = decided["duration"]
        return record

    def _extract(self, model: Any, tokens: np.ndarray, progress: Any, sync: Any) -> Any:
        """memwatch.extract at the remembered batch size (see _backoff)."""
        from memwatch.engine.extraction import extract

        cfg = self.config
        return self._backoff(
            model,
            len(tokens),
            lambda bs: extract(
                model,
                tokens,
                prefix_len=cfg.prefix_len,
                suffix_len=cfg.suffix_len,
                entropy_window=self._entropy_window(),
                batch_size=bs,
                mode=cfg.mode,
                amp_dtype=self.amp_dtype,
                progress=progress,
                sync=sync,
                token_stats="token_logprobs" in self._needs(),
                hidden_prefix=self._embedding_due(),
            ),
            "extraction",
            local=sync is None,
        )

    def _backoff(
        self, model: Any, rows: int, run: Callable[[int | None], Any], what: str, local: bool
    ) -> Any:
        """run(batch_size), halving the batch on out-of-memory down to 1 and remembering the size that worked.

        local=False (synced forwards: FSDP, ZeRO-3): one rank cannot retry alone, the others would wait in a
        collective; the error goes to every rank (_measure), which retries together when all ran out of memory."""
        while True:
            try:
                return run(self.batch_size)
            except Exception as exc:
                if not local or not self._halve_batch(model, rows, exc, what):
                    raise

    def _halve_batch(self, model: Any, rows: int, exc: BaseException, what: str) -> bool:
        """After an out-of-memory error: halve the batch size (from the automatic one if none was set yet) and
        free memory. False if the error is no out-of-memory or the batch is already 1 (give up)."""
        if not _is_oom(exc):
            return False
        if self.batch_size is None:
            from memwatch.engine.extraction import _auto_batch_size
            from memwatch.engine.modeling import inspect_model

            cfg = self.config
            k, m, w = cfg.prefix_len, cfg.suffix_len, self._entropy_window()
            self.batch_size = _auto_batch_size(inspect_model(model), rows, k, m, w, cfg.mode, 4, None)
        if self.batch_size <= 1:
            return False
        self.batch_size = max(1, self.batch_size // 2)
        log.warning("memwatch: out of memory during %s; retrying with batch_size=%d", what, self.batch_size)
        self._free_memory()
        return True

    @staticmethod
    def _free_memory() -> None:
        import gc

        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _measure(self, model: Any, progress: Any) -> tuple[Any, dict[str, np.ndarray]]:
        """The ExtractionResult of the whole panel and what the measurement adds (exposure, when due); under torch.distributed each rank computes a
        shard with the same number of forward calls and every rank receives all of it, in probe order."""
        from memwatch.engine.extraction import ExtractionResult

        assert self._tokens is not None and self.panel is not None
        due = self._exposure_due()
        world = distributed.world_size() if distributed.is_distributed() else 1
        if world == 1:
            result = self._extract(model, self._tokens, progress, None)
            return result, self._exposure(model, result, np.arange(len(self.panel))) if due else {}
        rank = distributed.rank()
        idx, real = distributed.shard(len(self.panel), world, rank)
        sync = None
        if distributed.needs_synced_forward(model):
            from memwatch.engine.modeling import inspect_model

            sync = distributed.Sync(inspect_model(model).device)
        while True:
            payload: Any
            error: Exception | None = None
            try:
                part = self._extract(model, self._tokens[idx], progress, sync)
                exp = self._exposure(model, part, idx, sync=sync) if due else {}
                payload = (part.select(slice(0, real)), {k: v[:real] for k, v in exp.items()})
            except Exception as exc:  # this rank still joins the gather, so no rank is left waiting
                error = exc
                kind = "oom" if _is_oom(exc) else "error"
                payload = (kind, f"rank {rank}: {type(exc).__name__}: {exc}")
            parts = distributed.all_gather(payload)
            failed = [p for p in parts if isinstance(p[0], str)]
            if not failed:
                break
            # Out of memory on every rank (synced forwards fail together): all halve the batch and retry together.
            every_rank_oom = len(failed) == len(parts) and all(p[0] == "oom" for p in parts)
            if (
                sync is not None
                and every_rank_oom
                and self._halve_batch(model, len(idx), error, "extraction")
            ):
                continue
            raise EvaluationError("; ".join(p[1] for p in failed)) from error
        result = ExtractionResult.concat([p[0] for p in parts])
        extra = {k: np.concatenate([p[1][k] for p in parts]) for k in parts[0][1]}
        return result, extra

    def _alert(self, record: EvalRecord) -> None:
        if self.alert_engine is None:
            return
        alerts = self.alert_engine.evaluate(record)
        for alert in alerts:
            if self.alert_sinks is not None:
                self.alert_sinks.emit(alert)
            if alert.action:
                record.actions.update(alert.action.split(","))
        if self.alert_sinks is not None:
            self.alert_sinks.flush()
        record.alerts = alerts
        self.alerts.extend(alerts)

    def _failed(self, exc: Exception, step: int) -> None:
        """Log once with the traceback, record, count; switch off after max_failures in a row; strict re-raises."""
        cfg = self.config
        self.consecutive_failures += 1
        what = f"step {step}: {type(exc).__name__}: {exc}"
        self.failures.append(what)
        kind = type(exc).__name__
        if kind not in self._warned:
            self._warned.add(kind)
            log.error("memwatch: evaluation failed at step %d; training continues", step, exc_info=exc)
        else:
            log.warning("memwatch: evaluation failed again (%s)", what)
        self._record_incident(step, "monitor_error", f"memwatch evaluation failed at {what}")
        if cfg.strict:
            return  # evaluate re-raises once every rank knows
        if self.consecutive_failures >= cfg.max_failures:
            self.disabled = True
            message = (
                f"memwatch switched itself off after {self.consecutive_failures} failed evaluations in a row "
                f"(last: {what}); training continues without it. Set MonitorConfig(strict=True) to fail instead."
            )
            log.warning(message)
            if self.console is not None:
                self.console.warn(message)
            self._record_incident(step, "monitor_disabled", message)

    def _record_incident(self, step: int, rule: str, message: str, key: str | None = None) -> None:
        """A monitor failure is an alert of its own: in the history, the JSONL file and the logs. An incident
        with the same `key` as an earlier one is only counted (the end-of-run summary reports it)."""
        if key is not None:
            self._incidents[key] = self._incidents.get(key, 0) + 1
            if self._incidents[key] > 1:
                return
        if not self.is_main or self.alert_sinks is None:
            return
        from memwatch.alerts import Alert

        self.alert_sinks.emit(Alert(step, rule, None, [], message))
        self.alert_sinks.flush()

    def _lost(self, writer: str, step: int, error: str) -> None:
        entry = self.losses.setdefault(writer, {"count": 0, "first_step": step, "last_step": step})
        entry["count"] += 1
        entry["last_step"] = step
        entry["last_error"] = error

    def loss_summary(self) -> str | None:
        """One paragraph: what each writer and alert sink lost during the run; None if nothing was lost."""
        parts = []
        total = len(self.evaluated_steps)
        for writer, e in self.losses.items():
            span = (
                f"step {e['first_step']}"
                if e["first_step"] == e["last_step"]
                else (f"steps {e['first_step']}-{e['last_step']}")
            )
            parts.append(
                f"{writer}: {e['count']} of {total} evaluation(s) not written ({span}; last error: {e['last_error']})"
            )
        if self.alert_sinks is not None:
            for sink, n in self.alert_sinks.undelivered().items():
                if n:
                    parts.append(f"alerts not delivered to {sink}: {n}")
        if not parts:
            return None
        return "memwatch lost data during this run: " + "; ".join(parts)

    def _window_bytes(self) -> list[bytes] | None:
        """Each probe window's decoded text as UTF-8 (the zlib ratio compresses it), once per panel; None without
        a tokenizer (the signal then compresses the token ids)."""
        decode = getattr(self.tokenizer, "decode", None)
        if decode is None or self.panel is None:
            return None
        if self._window_text is None or len(self._window_text) != len(self._tokens):
            k_m = self.config.prefix_len + self.config.suffix_len
            self._window_text = [str(decode(list(map(int, row[:k_m])))).encode() for row in self._tokens]
        return self._window_text

    def _embedding_due(self) -> bool:
        """The embedding view at the first, the last (finish) and every embedding_every-th evaluation; only when
        TensorBoard, its one writer, is on."""
        every = self.config.embedding_every
        if every is None or not self.config.tensorboard:
            return False
        return self._final or len(self.evaluated_steps) % every == 0

    def _needs(self) -> frozenset[str]:
        """The products the enabled signals and group statistics need (the engine computes no more)."""
        from memwatch.signals import REGISTRY

        return REGISTRY.products(self.config.signals, self.config.mode)

    def _entropy_window(self) -> int:
        """w: the prefix positions of the entropy profile, 0 (logits for the m suffix positions only) when no
        enabled statistic reads the profile."""
        return int(self.config.spec()["entropy_window"])

    def _exposure_due(self) -> bool:
        if self.manifest is None or not self.manifest.references or self.panel is None:
            return False
        if "exposure" not in self._needs():  # every exposure signal switched off: no scoring pass
            return False
        every = self.config.exposure_every
        if every is None:
            n = sum(1 for p in self.panel.probes if p.meta.get("family") in self.manifest.references)
            every = max(1, math.ceil(n * self.config.exposure_references / 32768))
        return len(self.evaluated_steps) % every == 0

    def _exposure(self, model: Any, result: Any, rows: np.ndarray, sync: Any = None) -> dict[str, np.ndarray]:
        """Exposure of every canary and twin among `rows` (panel indices, in the order of `result`): its secret
        ranked among R references after the same prefix, all scored by one prefix-shared teacher-forced pass."""
        return self._backoff(
            model,
            self.config.exposure_references + 1,
            lambda bs: self._score_exposure(model, rows, bs, sync),
            "exposure scoring",
            local=sync is None,
        )

    def _score_exposure(
        self, model: Any, rows: np.ndarray, batch_size: int | None, sync: Any
    ) -> dict[str, np.ndarray]:
        from memwatch.engine.extraction import _auto_batch_size, suffix_nll_after_prefix
        from memwatch.engine.modeling import inspect_model
        from memwatch.signals.exposure import exposure, exposure_extrapolated, exposure_rank

        cfg = self.config
        k, m = cfg.prefix_len, cfg.suffix_len
        assert self.panel is not None and self._tokens is not None
        # One batch size for the whole pass, planned for R + 1 candidates, so that the rows a synced rank only pads
        # (no canary of its own) run the same batches as the canaries on other ranks.
        bs = batch_size or _auto_batch_size(
            inspect_model(model),
            cfg.exposure_references + 1,
            k,
            m,
            w=0,  # no entropies: the pass scores suffixes only
            mode="exact",  # no decoding, so no decode cache
            act_bytes=4,  # fp32 sizing: safe under autocast too
            budget=None,
        )
        forms = {
            "exposure": exposure,
            "exposure_rank": exposure_rank,
            "exposure_extrapolated": exposure_extrapolated,
        }
        out = {name: np.full(len(rows), np.nan) for name in forms}
        for j, i in enumerate(rows.tolist()):
            probe = self.panel.probes[i]
            refs = self.manifest.references.get(probe.meta.get("family", ""))
            if not refs or "canary_id" not in probe.meta:
                if sync is not None:  # keep the forward count equal across ranks
                    suffix_nll_after_prefix(
                        model, self._tokens[i, :k], self._tokens[i : i + 1, k:], sync=sync, batch_size=bs
                    )
                continue
            refs_arr = np.asarray(refs[: cfg.exposure_references], dtype=np.int64)[:, :m]
            candidates = np.concatenate([self._tokens[i : i + 1, k:], refs_arr])  # the secret first
            nll = suffix_nll_after_prefix(
                model, self._tokens[i, :k], candidates, batch_size=bs, amp_dtype=self.amp_dtype, sync=sync
            )
            for name, form in forms.items():
                out[name][j] = form(float(nll[0]), nll[1:])
        return out

    def _write(self, record: EvalRecord, label: str | None = None) -> bool:
        """History, TensorBoard and console, each on its own: one failing writer does not stop the others.
        True unless the history failed to record the evaluation."""
        writers: list[tuple[str, Callable[[], Any]]] = []
        if self.history is not None and self.run_id is not None:
            history, run_id = self.history, self.run_id
            writers.append(
                ("history", lambda: write_history(history, run_id, record, self.config.reveal_text))
            )
        if self.tensorboard is not None:
            writers.append(("tensorboard", lambda: self.tensorboard.write(record)))
        if self.console is not None:
            writers.append(("console", lambda: self.console.write(record)))
        recorded = True
        for name, write in writers:
            try:
                write()
            except Exception as exc:
                recorded = recorded and name != "history"
                key = f"writer:{name}"
                what = f"{type(exc).__name__}: {exc}"
                self.failures.append(f"step {record.step}: {name} writer: {what}")
                self._lost(name, record.step, what)
                if key not in self._warned:
                    self._warned.add(key)
                    log.error(
                        "memwatch: writing the %s failed at step %d; measurements go on",
                        name,
                        record.step,
                        exc_info=exc,
                    )
                    if self.console is not None and name != "console":
                        self.console.warn(f"memwatch: writing the {name} failed: {what}")
                if name != "history":
                    self._record_incident(
                        record.step,
                        "monitor_error",
                        f"memwatch could not write the {name}: {what} (repeats are counted in the summary at the end)",
                        key=f"{key}:{type(exc).__name__}",
                    )
                if self.config.strict:
                    raise
        return recorded

    def finish(self, model: Any, step: int) -> EvalRecord | None:
        """End of training: a final evaluation (unless this step was just evaluated), then close the outputs."""
        record = None
        try:
            if (
                self.ready
                and not self.disabled
                and self.config.eval_on_end
                and step not in self.evaluated_steps[-1:]
            ):
                self._final = True
                record = self.evaluate(model, step)
        finally:
            self.close()
        return record

    def close(self) -> None:
        if self.alert_sinks is not None:
            self.alert_sinks.close()  # waits a bounded time for webhook posts in flight
        if self.ready:
            self._report_losses()
        for sink in (self.tensorboard, self.history):
            if sink is not None:
                try:
                    sink.close()
                except Exception as exc:  # closing must not take the run down either
                    log.warning("memwatch: closing %s failed: %s", type(sink).__name__, exc)
        self.tensorboard = self.history = self.alert_sinks = None
        self.ready = False

    def _report_losses(self) -> None:
        """At the end of a run, say what was lost (writers that failed, alerts not delivered): in the log, the
        console, the failures list and, where they still work, the history's incidents and the JSONL file."""
        summary = self.loss_summary()
        if summary is None or not self.is_main:
            return
        self.failures.append(summary)
        log.warning(summary)
        if self.console is not None:
            with contextlib.suppress(Exception):
                self.console.warn(summary)
        if self.alert_sinks is not None:
            from memwatch.alerts import Alert

            step = self.last_step if self.last_step is not None else 0
            self.alert_sinks.emit(Alert(step, "monitor_losses", None, [], summary), only=("history", "jsonl"))

    # --- state for framework checkpoints (Accelerate, Lightning) ------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "cadence": self.cadence.state_dict(),
            "tracker": None if self.tracker is None else self.tracker.state_dict(),
            "alerts": None if self.alert_engine is None else self.alert_engine.state_dict(),
            "evaluated_steps": list(self.evaluated_steps),
            "step": self.last_step,
            "batch_size": self.batch_size,
            "disabled": self.disabled,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.cadence.load_state_dict(state["cadence"])
        if state.get("tracker") is not None and self.tracker is not None:
            self.tracker.load_state_dict(state["tracker"])
        if state.get("alerts") is not None and self.alert_engine is not None:
            self.alert_engine.load_state_dict(state["alerts"])
        self.evaluated_steps = list(state["evaluated_steps"])
        self.batch_size = state.get("batch_size", self.batch_size)
        self.disabled = bool(state.get("disabled", False))

    # --- summaries -----------------------------------------------------------------------------------------------
