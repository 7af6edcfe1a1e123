"""The framework-agnostic Monitor: when to run, build the panel once, extract, record, report (DESIGN.md §4)."""

from __future__ import annotations

import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from . import distributed
from .config import MonitorConfig
from .evaluation import EvalRecord, ProbeTracker, build_record
from .probes import Panel, Probe, probes_from_user, sample_windows

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
            return False
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


class Monitor:
    """Evaluates memorization on a fixed panel during training; integrations call it, users may too.

    Lifecycle: `setup(model, ...)` once (builds the panel, opens the history and reporters), then
    `on_step(model, step)` after every optimizer step (evaluates when the cadence says so), then
    `finish(model, step)`. `evaluate(model, step)` runs one evaluation now.
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
        self.output_dir: str | None = None
        self.amp_dtype: str | None = None
        self.is_main = True
        self.last_record: EvalRecord | None = None
        self.evaluated_steps: list[int] = []
        self._tokens: np.ndarray | None = None
        self._last_tick: float | None = None
        self._paused = 0.0
        self.ready = False

    # --- setup -------------------------------------------------------------------------------------------------

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
    ) -> None:
        """Build the panel and open the outputs. Raises SetupError (before training starts) for bad input."""
        cfg = self.config
        self.tokenizer = self.tokenizer or tokenizer
        self.is_main = distributed.is_main_process()
        self.amp_dtype = amp_dtype if cfg.amp_dtype == "auto" else cfg.amp_dtype
        if self.amp_dtype == "fp32":
            self.amp_dtype = None
        self.output_dir = os.fspath(cfg.output_dir or os.path.join(os.fspath(output_dir or "."), "memwatch"))
        self.panel = self._build_panel(train_data, eval_data, collator)
        if self.manifest is not None:
            self._preflight(train_data, collator)
        self._tokens = self.panel.tokens(cfg.prefix_len + cfg.suffix_len)
        self.tracker = ProbeTracker(len(self.panel))
        self._check_model(model)
        if self.is_main:
            self._open_outputs(run_name, model_name, start_step)
        self.ready = True

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
        if heldout is not None and cfg.heldout_probes:
            if _looks_like_token_lists(heldout):
                items = list(heldout)
                try:
                    probes = probes_from_user(items, tokenizer=self.tokenizer, default_group="heldout")
                except ValueError as exc:
                    raise SetupError(str(exc)) from exc
                rng = np.random.default_rng([cfg.seed, 0x686F])
                long_enough = [p for p in probes if len(p.tokens) >= k + m]
                for i in rng.permutation(len(long_enough))[: cfg.heldout_probes]:
                    p = long_enough[int(i)]
                    panel.add(Probe(p.tokens[: k + m], p.group, p.meta))
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
                    panel.add(probe)
        dropped = panel.filter_short(k + m)
        if dropped:
            log.warning(
                "memwatch: %d probe(s) shorter than prefix_len + suffix_len = %d tokens were left out",
                dropped,
                k + m,
            )
        if not len(panel):
            raise SetupError(
                "memwatch has no probes to evaluate: no training example has a window of prefix_len + suffix_len = "
                f"{k + m} tokens whose last {m} tokens receive loss, and no held-out data, probes or canaries were "
                "given. Use longer training sequences, smaller prefix_len/suffix_len, or pass probes=[...]."
            )
        return panel

    @staticmethod
    def _manifest(canaries: Any) -> Any:
        """A CanaryManifest (or a path to one) turns on pre-flight and exposure; plain Probes are used as given."""
        if canaries is None:
            return None
        from .canaries import CanaryError, CanaryManifest

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
            from .canaries import CanaryError

            try:
                return self.manifest.probes(self.config.prefix_len, self.config.suffix_len)
            except CanaryError as exc:
                raise SetupError(str(exc)) from exc
        return list(self.canaries)

    def _preflight(self, train_data: Any, collator: Any) -> None:
        """Inserted canaries must really be in the data the trainer uses, with their secrets trained."""
        from .canaries import CanaryError, preflight

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
        from .modeling import inspect_model

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

    def _open_outputs(self, run_name: str | None, model_name: str | None, start_step: int) -> None:
        cfg = self.config
        assert self.panel is not None
        name = (
            cfg.run_name
            or run_name
            or os.path.basename(os.path.abspath(os.path.dirname(self.output_dir)))
            or "run"
        )
        if cfg.history:
            from .history import HistoryError, HistoryStore

            path = cfg.history_path or os.path.join(self.output_dir, "history.sqlite")
            try:
                self.history = HistoryStore(path)
            except HistoryError as exc:
                raise SetupError(str(exc)) from exc
            self.run_id = self.history.find_run(name, "live") if start_step > 0 else None
            if self.run_id is not None:
                removed = self.history.truncate_after(self.run_id, start_step)
                if removed:
                    log.info(
                        "memwatch: resumed at step %d; replaced %d later evaluation(s)", start_step, removed
                    )
            else:
                self.run_id = self.history.add_run(
                    name, source="live", model=model_name, config=cfg.to_dict()
                )
            self.history.add_probes(
                self.run_id, [(p.id, p.tokens, p.group, p.meta) for p in self.panel.probes]
            )
        if cfg.tensorboard:
            tb_dir = cfg.tensorboard_dir or os.path.join(self.output_dir, "tb")
            from .reporters.tensorboard import TensorBoardReporter

            self.tensorboard = TensorBoardReporter(
                tb_dir, self.panel.group_names(), purge_step=start_step + 1 if start_step > 0 else None
            )
        if cfg.console:
            from .reporters.console import ConsoleReporter

            self.console = ConsoleReporter()

    # --- running -----------------------------------------------------------------------------------------------

    def on_step(self, model: Any, step: int) -> EvalRecord | None:
        """Call after every optimizer step: times the step and evaluates when due."""
        now = time.perf_counter()
        if self._last_tick is not None:
            self.cadence.add_step_time(now - self._last_tick - self._paused)
        self._last_tick, self._paused = now, 0.0
        if not self.ready or not self.cadence.due(step):
            return None
        return self.evaluate(model, step)

    def evaluate(self, model: Any, step: int) -> EvalRecord:
        """Run one evaluation of the panel at `step` now, record and report it."""
        if not self.ready or self.panel is None or self.tracker is None:
            raise RuntimeError("Monitor.evaluate called before Monitor.setup")
        from .extraction import extract

        cfg = self.config
        t0 = time.perf_counter()
        result = extract(
            model,
            self._tokens,
            prefix_len=cfg.prefix_len,
            suffix_len=cfg.suffix_len,
            entropy_window=cfg.entropy_window,
            batch_size=cfg.batch_size,
            mode=cfg.mode,
            amp_dtype=self.amp_dtype,
        )
        exposure = self._exposure(model, result) if self._exposure_due() else None
        record = build_record(
            exposure=exposure,
            step=step,
            wall_time=time.time(),
            duration=time.perf_counter() - t0,
            spec=cfg.spec(),
            probe_ids=self.panel.ids,
            groups=self.panel.groups,
            metas=[p.meta for p in self.panel.probes],
            result=result,
            tracker=self.tracker,
            memorized_threshold=cfg.memorized_threshold,
            boundary_width=cfg.boundary_width,
        )
        if self.is_main:
            self._write(record)
        record.duration = time.perf_counter() - t0
        self.cadence.evaluated(step, record.duration)
        self._paused += record.duration
        self.last_record = record
        self.evaluated_steps.append(step)
        return record

    def _exposure_due(self) -> bool:
        if self.manifest is None or not self.manifest.references or self.panel is None:
            return False
        every = self.config.exposure_every
        if every is None:
            n = sum(1 for p in self.panel.probes if p.meta.get("family") in self.manifest.references)
            every = max(1, math.ceil(n * self.config.exposure_references / 32768))
        return len(self.evaluated_steps) % every == 0

    def _exposure(self, model: Any, result: Any) -> np.ndarray:
        """Exposure of every canary and twin: its secret ranked among R references after the same prefix.

        The secret and its references are scored by one prefix-shared teacher-forced pass, so the ranking
        compares like with like.
        """
        from .extraction import suffix_nll_after_prefix
        from .metrics import exposure

        cfg = self.config
        k, m = cfg.prefix_len, cfg.suffix_len
        assert self.panel is not None and self._tokens is not None
        out = np.full(len(self.panel), np.nan)
        for i, probe in enumerate(self.panel.probes):
            refs = self.manifest.references.get(probe.meta.get("family", ""))
            if not refs or "canary_id" not in probe.meta:
                continue
            refs_arr = np.asarray(refs[: cfg.exposure_references], dtype=np.int64)[:, :m]
            candidates = np.concatenate([self._tokens[i : i + 1, k:], refs_arr])  # the secret first
            nll = suffix_nll_after_prefix(
                model, self._tokens[i, :k], candidates, batch_size=cfg.batch_size, amp_dtype=self.amp_dtype
            )
            out[i] = exposure(float(nll[0]), nll[1:])
        return out

    def _write(self, record: EvalRecord) -> None:
        if self.history is not None and self.run_id is not None:
            r = record.result
            self.history.add_evaluation(
                self.run_id,
                record.step,
                spec=record.spec,
                probe_ids=record.probe_ids,
                wall_time=record.wall_time,
                duration=record.duration,
                columns={
                    "exact": r.exact,
                    "match_ratio": r.match_ratio,
                    "prefix_match_len": r.prefix_match_len,
                    "edit_similarity": r.edit_similarity,
                    "suffix_nll": r.suffix_nll,
                    "near_tie": r.near_tie,
                    "exposure": record.exposure,
                    "generated": None if r.generated is None else r.generated.astype(np.int32),
                    "entropy": r.entropy,
                },
            )
        if self.tensorboard is not None:
            self.tensorboard.write(record)
        if self.console is not None:
            self.console.write(record)

    def finish(self, model: Any, step: int) -> EvalRecord | None:
        """End of training: a final evaluation (unless this step was just evaluated), then close the outputs."""
        record = None
        try:
            if self.ready and self.config.eval_on_end and step not in self.evaluated_steps[-1:]:
                record = self.evaluate(model, step)
        finally:
            self.close()
        return record

    def close(self) -> None:
        for sink in (self.tensorboard, self.history):
            if sink is not None:
                sink.close()
        self.tensorboard = self.history = None
        self.ready = False

    # --- summaries -----------------------------------------------------------------------------------------------

    def groups(self) -> Sequence[str]:
        return self.panel.group_names() if self.panel is not None else []
