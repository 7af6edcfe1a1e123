"""The framework-agnostic Monitor: when to run, build the panel once, extract, record, report (DESIGN.md §4)."""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import socket
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from memwatch.config import MonitorConfig
from memwatch.corpus.feed import NgramFeed
from memwatch.live import distributed
from memwatch.live.cadence import Cadence, embedding_due, exposure_due
from memwatch.live.measure import EvaluationError, Measure
from memwatch.live.reference import Reference
from memwatch.live.setup import (
    SetupError,
    build_panel,
    check_alert_groups,
    check_definitions,
    check_model,
    load_manifest,
    preflight_panel,
)
from memwatch.live.sinks import HistorySink, Sink, as_sink, open_alerts
from memwatch.probes import Panel, Probe
from memwatch.record import EvalRecord, ProbeTracker, build_record, products_of
from memwatch.signals.reference import REFERENCE_PRODUCTS

__all__ = ["Monitor", "SetupError"]

log = logging.getLogger("memwatch")

# Monitors with a run open in a history. A process that exits without closing one (Ctrl-C in a training loop, an
# exception out of trainer.train()) gets its run marked interrupted, said in the log, and its writers flushed.
_OPEN: weakref.WeakSet[Monitor] = weakref.WeakSet()


@atexit.register
def _close_interrupted() -> None:
    for monitor in list(_OPEN):
        history = monitor.history.path if monitor.history is not None else "the history"
        step = monitor.last_step
        log.warning(
            "memwatch: run %r ended before training finished (last step %s); its %d evaluation(s) are kept in %s, "
            "marked interrupted. Resume from a checkpoint to continue it, or start again.",
            monitor.run_name,
            step,
            len(monitor.evaluated_steps),
            history,
        )
        monitor.close(status="interrupted")


def _vocab_size(model: Any) -> int:
    """The model's vocabulary size (the n-gram index stores ids below it, and one separator id after them)."""
    from memwatch.engine.modeling import inspect_model

    return int(inspect_model(model).vocab_size)


class Monitor:
    """Evaluates memorization on a fixed panel during training; integrations call it, users may too.

    Lifecycle: `setup(model, ...)` once (builds the panel, opens the history and reporters), then
    `on_step(model, step)` after every optimizer step (evaluates when the cadence says so), then
    `finish(model, step)`. `evaluate(model, step)` runs one evaluation now.

    It never takes the training run down: an exception inside an evaluation is caught, logged once with its
    traceback, recorded, and training goes on; after `max_failures` failures in a row the monitor switches itself
    off with a visible warning (`strict=True` re-raises instead). Bad input is a SetupError at setup, before the
    first step. Under torch.distributed every rank computes a shard of the panel; rank 0 writes.

    Each record goes to the sinks in order (rank 0): the history, TensorBoard, the console, the alert rules, then
    `sinks`, yours: functions of the EvalRecord, or objects with name, write(record) and close() (memwatch.Sink).
    """

    def __init__(
        self,
        config: MonitorConfig | None = None,
        *,
        probes: Iterable[Any] | None = None,
        heldout: Any = None,
        tokenizer: Any = None,
        canaries: Any = None,
        sinks: Iterable[Any] = (),
        reference: Any = None,
        corpus: Any = None,
    ) -> None:
        if config is not None and not isinstance(config, MonitorConfig):
            raise TypeError(f"config must be a memwatch.MonitorConfig; got {type(config).__name__}")
        self.config = config or MonitorConfig()
        self.user_probes = list(probes) if probes is not None else []
        self.heldout = heldout
        self.tokenizer = tokenizer
        self.canaries = canaries
        self.manifest = load_manifest(canaries)
        self.user_sinks: list[Sink] = [as_sink(s) for s in sinks]
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
        self.alerting = None  # the AlertsSink (rules and delivery) when alerts are on
        self.alert_engine = None  # kept after close: the alert state goes into state_dict
        self.sinks: list[Sink] = []  # where each record goes, in order (rank 0)
        self.history_sink: HistorySink | None = None
        self.measure = Measure(self.config)
        self.reference_measure = Measure(
            self.config
        )  # its own batch size: an OOM there never shrinks training's
        # A model object given here, else MonitorConfig.reference ("auto": a PEFT model's base).
        self.reference = Reference(reference if reference is not None else self.config.reference)
        # The training-data n-gram index (MonitorConfig.ngrams): `corpus` (a memwatch.corpus.NgramSource, e.g. an
        # InfiniGramIndex) serves the counts as given, else the dataset is indexed at setup or the batches streamed.
        self.ngram_feed = NgramFeed(
            self.config.ngrams, comm=distributed, corpus=corpus, strict=self.config.strict
        )
        self.alerts: list[Any] = []
        self.history_path: str | None = None  # where the history and TensorBoard went (kept after close)
        self.tensorboard_dir: str | None = None
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
        self.measure.amp_dtype = self.reference_measure.amp_dtype = self.amp_dtype
        self._setup_everywhere(model)
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
            self.close(status="failed")  # nothing stays open behind a failed setup
            raise
        except Exception as exc:
            state = {"error": f"memwatch could not start: {type(exc).__name__}: {exc}"}
            self.close(status="failed")
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
            check_model(cfg, model, self._tokens)
        self.tracker.load_state_dict(state["tracker"])
        self.cadence.load_state_dict(state["cadence"])
        self.evaluated_steps = list(state["evaluated_steps"])
        self.last_step = start_step
        try:
            self.ngram_feed.setup(
                vocab_size=_vocab_size(model),
                train_data=train_data,
                directory=os.path.join(self.output_dir, "corpus"),
                run_name=self.run_name,
                start_step=start_step,
                source=source,
                progress=cfg.console,
                error=SetupError,
            )
        except SetupError:
            self.close(status="failed")  # nothing stays open behind a failed setup
            raise
        self.ready = True

    def _setup_everywhere(self, model: Any) -> None:
        """What every rank checks and loads for itself before anything is opened: the optional packages of the
        enabled signals, and the reference model. Every rank learns every rank's outcome, so none waits alone."""
        import importlib

        from memwatch.signals import REGISTRY

        error = None
        try:
            for signal in REGISTRY.enabled(self.config.signals, self.config.mode):
                if signal.requires is not None:
                    module, extra = signal.requires
                    try:
                        importlib.import_module(module)
                    except Exception as exc:
                        raise SetupError(
                            f"the {signal.name!r} signal needs {module!r}, which failed to import ({exc}); "
                            f"pip install 'memwatch[{extra}]', or switch it off: signals={{{signal.name!r}: False}}"
                        ) from exc
            if REFERENCE_PRODUCTS & self._needs():
                described = self.reference.setup(model, self.config.prefix_len + self.config.suffix_len)
                if described is not None and self.is_main:
                    log.info("memwatch: membership signals are calibrated by %s", described)
        except SetupError as exc:
            error = str(exc)
        except Exception as exc:
            error = f"memwatch could not set up the reference model: {type(exc).__name__}: {exc}"
        errors = [e for e in distributed.all_gather(error) if e is not None]
        if errors:
            self.reference.close()
            raise SetupError(errors[0])

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
            self.history_path = path
            self.history = HistoryStore(path, timeout=self.history_timeout)
            self.run_id = self.history.find_run(self.run_name, source) if resume else None
            self._concurrent = self._check_writers(source)
            if self.run_id is not None and source == "live":
                check_definitions(cfg, self.history.run_config(self.run_id), self.run_name)
        stored = self.history.panel(self.run_id) if self.run_id is not None and source == "live" else []
        if stored:  # a resumed run keeps the probes it started with
            self.panel = Panel(Probe(tuple(p["tokens"]), p["group"], p["meta"]) for p in stored)
        else:
            position_limit = check_model(cfg, model, None)  # before the panel, so its advice fits the model
            self.panel = build_panel(
                cfg,
                canaries=self.canaries,
                manifest=self.manifest,
                user_probes=self.user_probes,
                heldout=self.heldout if self.heldout is not None else eval_data,
                tokenizer=self.tokenizer,
                train_data=train_data,
                collator=collator,
                position_limit=position_limit,
            )
            if self.manifest is not None and source == "live":
                # Probe each inserted canary exactly as it appears in the training data.
                self.panel, self.preflight_report = preflight_panel(
                    self.panel, self.manifest, cfg, train_data, collator, self.tokenizer
                )
        self._tokens = self.panel.tokens(cfg.prefix_len + cfg.suffix_len)
        self.tracker = ProbeTracker(len(self.panel))
        check_model(cfg, model, self._tokens)
        check_alert_groups(cfg, self.panel)
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
            holder = self.history.claim_run(self.run_id)  # checked and marked at once: no race with a twin
            if holder is not None:
                raise self._second_writer(holder)
            _OPEN.add(self)  # from here on this process writes the run, and says how it ended
        try:
            self._open_reporters(start_step if resume and source == "live" else 0)
            if self.run_id is not None and source == "live" and resume:
                self._replay()
        except Exception:
            if new_run is not None and self.history is not None:  # no empty run left for every report to list
                _OPEN.discard(self)  # and no state recorded for it
                self.history.delete_empty_run(new_run)
            raise
        return {
            "panel": [(p.tokens, p.group, dict(p.meta)) for p in self.panel.probes],
            "tracker": self.tracker.state_dict(),
            "cadence": self.cadence.state_dict(),
            "evaluated_steps": self.evaluated_steps,
        }

    def _check_writers(self, source: str) -> list[dict[str, Any]]:
        """Another process writing this run now is refused (two writers would replace each other's evaluations);
        another run of the same name being written is allowed, said, and kept apart in TensorBoard."""
        assert self.history is not None
        others = self.history.live_writers(self.run_name)
        here = socket.gethostname()
        # Refused only where the writer is seen alive (this host); another host's "running" may be a job that was
        # killed there (preempted, then requeued here): said, and taken over.
        same = [r for r in others if r["run_id"] == self.run_id and r["host"] == here]
        for r in others:
            if r["run_id"] == self.run_id and r["host"] != here:
                log.warning(
                    "memwatch: run %r is recorded as being written by process %s on %s, which cannot be checked "
                    "from here; if that process still runs, the two will overwrite each other's evaluations",
                    self.run_name,
                    r["pid"],
                    r["host"],
                )
        if same:
            raise self._second_writer(same[0])
        if others and source == "live":
            r = others[-1]
            log.warning(
                "memwatch: another process (pid %s on %s) is writing a run named %r into %s right now; this run is "
                "recorded beside it as a separate run and its TensorBoard events go to their own folder. Give each "
                "training its own output_dir or run_name to keep them apart.",
                r["pid"],
                r["host"],
                self.run_name,
                self.history.path,
            )
        return others

    def _second_writer(self, writer: Mapping[str, Any]) -> SetupError:
        assert self.history is not None
        return SetupError(
            f"run {self.run_name!r} (run {writer['run_id']}) in {self.history.path} is being written right now by "
            f"process {writer['pid']} on {writer['host']}: two writers of one run would overwrite each other. Wait "
            "for it to finish, or give this run another run_name or output_dir."
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

    def _open_reporters(self, purge_from: int) -> None:
        cfg = self.config
        assert self.panel is not None
        if cfg.tensorboard:
            tb_dir = cfg.tensorboard_dir or os.path.join(self.output_dir, "tb")
            if getattr(self, "_concurrent", None) and self.run_id is not None:
                tb_dir = os.path.join(
                    tb_dir, f"run-{self.run_id}"
                )  # never mixed into another live run's events
            from memwatch.reporters.tensorboard import TensorBoardReporter

            try:
                # A resumed run drops the events the interrupted one wrote after its checkpoint.
                self.tensorboard_dir = tb_dir
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
        self.alerting = open_alerts(
            cfg,
            run_name=self.run_name,
            output_dir=self.output_dir,
            history=self.history,
            run_id=self.run_id,
            tensorboard=self.tensorboard,
            console=self.console,
            describe=self._describe,
            delivered=self.alerts,
        )
        if self.alerting is not None:
            self.alert_engine = self.alerting.engine
        self.history_sink = (
            HistorySink(self.history, self.run_id, cfg.reveal_text)
            if self.history is not None and self.run_id is not None
            else None
        )
        builtin = [self.history_sink, self.tensorboard, self.console, self.alerting]
        self.sinks = [s for s in builtin if s is not None] + self.user_sinks

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

    def on_step(self, model: Any, step: int, *, last: bool = False) -> EvalRecord | None:
        """Call after every optimizer step: times the step and evaluates when due. Never raises (unless strict).
        last=True says this is the run's last step (an evaluation due now is the final one: the embedding view is
        written with it, as it would be by finish)."""
        self.last_step = step
        self._final = self._final or last
        self.ngram_feed.end_step(step)  # a step boundary: streamed batches may be sealed into the index
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

    def observe_batch(self, input_ids: Any, attention_mask: Any = None) -> None:
        """A micro-batch the model trains on, for the streamed n-gram index (MonitorConfig.ngrams="stream"; a no-op
        otherwise): input_ids [B, T] and attention_mask [B, T] (padding never counted), tensors, arrays or lists.
        Call it for every micro-batch (every gradient-accumulation step), on every rank. Never raises (unless
        strict): a failure switches the n-gram signals off with a logged error."""
        if not self.disabled:
            self.ngram_feed.observe(input_ids, attention_mask)

    def add_sink(self, sink: Any) -> None:
        """One more sink (as `sinks=`), before or after setup: the integrations add the run's trackers this way."""
        sink = as_sink(sink)
        self.user_sinks.append(sink)
        if self.sinks:
            self.sinks.append(sink)

    def checkpoint(self, step: int) -> None:
        """A training checkpoint of optimizer step `step` is being saved: the streamed n-gram index writes what it
        holds in memory, so a run resumed from that checkpoint counts every batch once. Call it on every rank (the
        integrations do, when the framework saves). Never raises (unless strict)."""
        if self.disabled:
            return
        try:
            self.ngram_feed.checkpoint(step)
        except Exception as exc:
            self.contain(exc, f"saving the n-gram index at step {step}")

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
        # Measured once, before the clock starts: the cadence and the history time the evaluation itself.
        reference = self._reference(model) if REFERENCE_PRODUCTS & self._needs() else None
        t0 = time.perf_counter()
        record = None
        error: Exception | None = None
        # Per-probe state advances only with an evaluation the history holds, so that a resumed run's replay
        # and the live run agree on every transition.
        before = self.tracker.snapshot()
        recorded = True
        try:
            result, extra = self.measure(
                model,
                self._tokens,
                metas=[p.meta for p in self.panel.probes],
                references=None if self.manifest is None else self.manifest.references,
                entropy_window=int(cfg.spec()["entropy_window"]),
                token_stats="token_logprobs" in self._needs(),
                hidden_prefix=self._embedding_due(),
                exposure=self._exposure_due(),
                progress=progress,
            )
            record = build_record(
                step=step,
                wall_time=time.time(),
                duration=time.perf_counter() - t0,
                spec=cfg.spec(),
                probe_ids=self.panel.ids,
                groups=self.panel.groups,
                metas=[p.meta for p in self.panel.probes],
                tokens=self._tokens,
                products={
                    **products_of(result, extra),
                    **(reference or {}),
                    "window_bytes": self._window_bytes(),
                    **self.ngram_feed.products(self._tokens, cfg.prefix_len, cfg.suffix_len, step),
                },
                tracker=self.tracker,
                settings={**cfg.definitions(), "sweep": cfg.sweep()},
                pairs=cfg.pairs,
                overrides=cfg.signals,
                label=label,
                result=result,
            )
            self.last_record = record
            if self.is_main:
                recorded = self._write(record)
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
        """The embedding view (see cadence.embedding_due), when TensorBoard (its projector) or a signal of the
        hidden states (lid) reads it."""
        if not self.config.tensorboard and "hidden_prefix" not in self._needs():
            return False
        return embedding_due(self.config.embedding_every, len(self.evaluated_steps), self._final)

    def _needs(self) -> frozenset[str]:
        """The products the enabled signals and group statistics need (the engine computes no more)."""
        from memwatch.signals import REGISTRY

        return REGISTRY.products(self.config.signals, self.config.mode)

    def _reference(self, model: Any) -> dict[str, np.ndarray] | None:
        """The reference products (measured at the first evaluation, then cached): the same panel through the
        same teacher-forced pass and greedy decoding, on the reference model. A failure switches the reference
        off for the run (the calibrated signals stay absent, the rest goes on; strict=True raises): every rank
        fails alike, since the measurement shares its errors."""
        assert self._tokens is not None and self.panel is not None
        metas = [p.meta for p in self.panel.probes]

        def run(reference_model: Any) -> Any:
            result, _ = self.reference_measure(
                reference_model,
                self._tokens,
                metas=metas,
                references=None,
                entropy_window=0,  # no entropy profile of the reference
                token_stats=True,
                hidden_prefix=False,
                exposure=False,
            )
            return result

        try:
            return self.reference.measure(model, run)
        except Exception as exc:
            if self.config.strict:
                raise
            what = f"{type(exc).__name__}: {exc}"
            message = (
                f"memwatch: measuring the reference ({self.reference.description}) failed; the calibrated signals "
                f"are off for this run, everything else goes on: {what}"
            )
            self.reference.disable()
            self.failures.append(message)
            log.error(message, exc_info=exc)
            self._record_incident(self.last_step or 0, "monitor_error", message)
            return None

    def _exposure_due(self) -> bool:
        """Exposure scoring this evaluation: canaries with references, an exposure signal on, and the cadence."""
        if self.manifest is None or not self.manifest.references or self.panel is None:
            return False
        if "exposure" not in self._needs():  # every exposure signal switched off: no scoring pass
            return False
        scored = sum(1 for p in self.panel.probes if p.meta.get("family") in self.manifest.references)
        return exposure_due(
            self.config.exposure_every, scored, self.config.exposure_references, len(self.evaluated_steps)
        )

    def _write(self, record: EvalRecord) -> bool:
        """Every sink in order (history, TensorBoard, console, alerts, yours), each on its own: one failing sink does
        not stop the others. True unless the history failed to record the evaluation."""
        recorded = True
        for sink in self.sinks:
            name = sink.name
            if sink is self.alerting:
                # A rule that cannot be evaluated fails the evaluation (counted, and the monitor switches itself
                # off after max_failures): its actions (stop, save) must never be lost in silence.
                sink.write(record)
                continue
            try:
                sink.write(record)
            except Exception as exc:
                recorded = recorded and sink is not self.history_sink
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
                    if self.console is not None and sink is not self.console:
                        self.console.warn(f"memwatch: writing the {name} failed: {what}")
                if sink is not self.history_sink:
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

    def print_closing(self, beside: str | None = None) -> None:
        """On rank 0 with the console on: where the history and TensorBoard went and the commands that open them.
        `beside`: the trainer's own log directory, so one `tensorboard --logdir` shows both runs."""
        if not (self.config.console and self.is_main) or (
            self.history_path is None and self.tensorboard_dir is None
        ):
            return
        from rich.console import Console

        from memwatch.reporters.console import closing_lines

        logdir = self.tensorboard_dir
        if logdir is not None and beside is not None:
            with contextlib.suppress(ValueError):  # different drives: memwatch's own directory then
                logdir = os.path.commonpath([os.path.abspath(logdir), os.path.abspath(beside)])
        with contextlib.suppress(Exception):  # a summary never fails a run
            console = Console(stderr=True)
            console.rule("memwatch", align="left")
            for line in closing_lines(self.history_path, logdir, len(self.evaluated_steps), len(self.alerts)):
                console.print(line, soft_wrap=True, highlight=False, markup=False)

    def close(self, status: str = "finished") -> None:
        """Close every sink: alert delivery first (bounded wait for webhook posts in flight), then what was lost is
        reported, then yours, the console, TensorBoard and the history last, the run marked `status` in it
        ("finished"; "interrupted" when the process exits without closing). Idempotent; never raises."""
        writing = self in _OPEN  # a setup refused before it took the run over leaves its state alone
        _OPEN.discard(self)
        if writing and self.history is not None and self.run_id is not None:
            with contextlib.suppress(Exception):
                self.history.set_run_status(self.run_id, status, self.last_step)
        if self.alerting is not None:
            with contextlib.suppress(Exception):
                self.alerting.close()
        if self.ready:
            self._report_losses()
        closing: list[Any] = [s for s in reversed(self.sinks) if s is not self.alerting]
        # Yours on every rank (rank 0 alone writes to them), and what was opened before the sink list existed (a
        # setup that failed half-way): each closed once.
        closing = [s for s in reversed(self.user_sinks) if s not in closing] + closing
        closing += [s for s in (self.tensorboard, self.history) if s is not None]
        closed: set[int] = set()
        for sink in closing:
            target = sink.store if isinstance(sink, HistorySink) else sink
            if id(target) in closed:
                continue
            closed.add(id(target))
            try:
                sink.close()
            except Exception as exc:  # closing must not take the run down either
                log.warning(
                    "memwatch: closing %s failed: %s", getattr(sink, "name", type(sink).__name__), exc
                )
        self.reference.close()
        self.ngram_feed.close()
        self.tensorboard = self.history = self.alerting = self.history_sink = None
        self.sinks, self.user_sinks = [], []
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

    @property
    def alert_sinks(self) -> Any:
        """Where alerts go (AlertSinks), while the alerts sink is open; None otherwise."""
        return None if self.alerting is None else self.alerting.delivery

    @property
    def batch_size(self) -> int | None:
        """The extraction batch size: MonitorConfig.batch_size, halved on out-of-memory and remembered."""
        return self.measure.batch_size

    @batch_size.setter
    def batch_size(self, value: int | None) -> None:
        self.measure.batch_size = value

    # --- state for framework checkpoints (Accelerate, Lightning) ------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "cadence": self.cadence.state_dict(),
            "tracker": None if self.tracker is None else self.tracker.state_dict(),
            "alerts": None if self.alert_engine is None else self.alert_engine.state_dict(),
            "evaluated_steps": list(self.evaluated_steps),
            "step": self.last_step,
            "batch_size": self.measure.batch_size,
            "disabled": self.disabled,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.cadence.load_state_dict(state["cadence"])
        if state.get("tracker") is not None and self.tracker is not None:
            self.tracker.load_state_dict(state["tracker"])
        if state.get("alerts") is not None and self.alert_engine is not None:
            self.alert_engine.load_state_dict(state["alerts"])
        self.evaluated_steps = list(state["evaluated_steps"])
        self.measure.batch_size = state.get("batch_size", self.measure.batch_size)
        self.disabled = bool(state.get("disabled", False))

    # --- summaries -----------------------------------------------------------------------------------------------
