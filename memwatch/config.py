"""Frozen, validated configuration: MonitorConfig and AlertConfig, each default with its reason."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

__all__ = ["ACTIONS", "RULES", "AlertConfig", "ConfigError", "MonitorConfig"]

RULES = ("canary_extracted", "extraction_rate", "spike", "leak", "exposure", "threshold")
ACTIONS = ("save_checkpoint", "stop_training")


class ConfigError(ValueError):
    """A configuration value is out of range; the message says what is allowed."""


def _check_int(name: str, value: Any, low: int, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        allowed = f"an integer >= {low}" + (" or None" if optional else "")
        raise ConfigError(f"MonitorConfig.{name} must be {allowed}; got {value!r}")


def _check_fraction(name: str, value: Any, *, low_open: bool = True) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    ok = ok and (0 < value <= 1 if low_open else 0 <= value <= 1)
    if not ok:
        interval = "(0, 1]" if low_open else "[0, 1]"
        raise ConfigError(f"MonitorConfig.{name} must be a number in {interval}; got {value!r}")


def _check_signals(signals: Any) -> None:
    from memwatch.signals import REGISTRY

    if not isinstance(signals, Mapping) or not all(isinstance(v, bool) for v in signals.values()):
        raise ConfigError(
            f"MonitorConfig.signals must map signal names to True or False, e.g. {{'edit_similarity': False}}; got {signals!r}"
        )
    unknown = sorted(set(signals) - set(REGISTRY.switches()))
    if unknown:
        raise ConfigError(
            f"MonitorConfig.signals: unknown signal(s) {unknown}; registered signals and group statistics: "
            f"{REGISTRY.switches()}"
        )
    import importlib.util

    for name, on in signals.items():
        signal = REGISTRY.signals.get(name)
        if on and signal is not None and signal.requires is not None:
            module, extra = signal.requires
            if importlib.util.find_spec(module) is None:
                raise ConfigError(
                    f"MonitorConfig.signals: {name!r} needs the optional package {module!r}, which is not "
                    f"installed; pip install 'memwatch[{extra}]', or leave {name!r} off"
                )


def _check_ngrams(config: Any) -> None:
    """MonitorConfig.ngrams is "off", "stream" or "dataset"; when on, the n-gram signals are on unless `signals`
    switches one off; when off, none may be switched on (nothing would count for it)."""
    from memwatch.signals.ngrams import NGRAM_SIGNALS

    modes = ("off", "stream", "dataset")
    if config.ngrams not in modes:
        raise ConfigError(
            f"MonitorConfig.ngrams must be one of {modes} ('stream': count the batches as they pass, 'dataset': "
            f"index the training set at setup); got {config.ngrams!r}"
        )
    if config.ngrams == "off":
        asked = sorted(n for n in NGRAM_SIGNALS if config.signals.get(n))
        if asked:
            raise ConfigError(
                f"MonitorConfig.signals switches on {asked}, which count n-grams of the training data: set "
                "MonitorConfig.ngrams='stream' or 'dataset' (pip install 'memwatch[ngrams]')"
            )
        return
    object.__setattr__(config, "signals", {**dict.fromkeys(NGRAM_SIGNALS, True), **config.signals})


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"MonitorConfig.{name} must be True or False; got {value!r}")


def _check_str(name: str, value: Any, *, optional: bool = True) -> None:
    if (value is None and optional) or (isinstance(value, str) and value):
        return
    raise ConfigError(
        f"MonitorConfig.{name} must be a non-empty string{' or None' if optional else ''}; got {value!r}"
    )


MAX_WEBHOOK_TIMEOUT = 300.0  # seconds per attempt: longer is a hung server, not a slow one
MAX_WEBHOOK_RETRIES = 10


def _finite_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_webhook_url(url: Any) -> None:
    """An http(s) URL with a host and no whitespace. The error never repeats the URL: its path is a secret."""
    from urllib.parse import urlsplit

    problem = None
    if not isinstance(url, str):
        problem = f"a string, not {type(url).__name__}"
    elif any(c.isspace() for c in url):
        problem = "without spaces or line breaks"
    else:
        try:
            parts = urlsplit(url)
            host = parts.hostname
        except ValueError:
            parts, host = None, None
        if parts is None or parts.scheme not in ("http", "https"):
            problem = "an http:// or https:// URL"
        elif not host:
            problem = "a URL with a host name (http://host/path)"
    if problem:
        raise ConfigError(
            f"AlertConfig.webhook_url must be {problem} (the URL is not repeated here: it may hold a token)"
        )


@dataclass(frozen=True)
class AlertConfig:
    """Which memorization events raise an alert, where alerts go, and what they make the trainer do."""

    enabled: bool = True
    # --- rules ---
    canary_extracted: bool = True  # an inserted canary becomes extractable: the unambiguous signal
    extraction_rate: Mapping[str, float] = field(default_factory=lambda: {"train": 0.10})  # group -> rate
    spike: bool = True  # extraction rate or newly memorized count jumps above its own recent baseline
    spike_z: float = 3.0  # standard deviations above the EMA baseline
    spike_min_evals: int = 5  # evaluations of history before a spike may fire (a baseline needs data)
    spike_min_rate: float = 0.02  # and the rate must exceed its baseline by at least this much...
    spike_min_count: int = 3  # ...or the newly memorized count by at least this many probes
    leak: bool = True  # a held-out probe or a twin becomes extractable: leak, duplicates, or a fault
    leak_groups: tuple[str, ...] = ("heldout", "canary_heldout")
    leak_min_distinct: int = (
        3  # suffixes of fewer distinct tokens (runs of spaces, "=====") are predictable text
    )
    exposure_bits: float | None = 8.0  # canary exposure early warning (top ~0.4% of its reference secrets)
    cooldown: int = 3  # evaluations before the same rule may fire again for the same group or probe
    hysteresis: float = 0.2  # a threshold re-arms once the value falls this fraction below it
    actions: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # rule -> ("save_checkpoint", ...)
    # Any statistic a record holds, by key, and the value that fires (rule "threshold"), e.g.
    # {"canary/extraction_rate": 0.25, "train~heldout/loss_auc": 0.75}; "*" patterns name several keys.
    thresholds: Mapping[str, float] = field(default_factory=dict)
    rules: tuple[
        Any, ...
    ] = ()  # your own rules (memwatch.alerts.Rule: a `name` and check(record, state, ctx))
    # A flip (canary extracted, leak) on a row whose greedy step was a near tie may be rounding: it waits for the
    # next evaluation and fires only if it holds there.
    confirm_near_ties: bool = True
    # --- sinks (console, logging, the history and TensorBoard follow MonitorConfig's own switches) ---
    jsonl: bool = True  # <output_dir>/alerts.jsonl, mode 0600
    webhook_url: str | None = None  # HTTP POST of JSON (Slack-style {"text": ...}); no connection without it
    webhook_timeout: float = (
        3.0  # seconds per attempt; sent from a background thread, never blocking training
    )
    webhook_retries: int = 2  # further attempts after a failure (bounded)
    on_alert: Callable[[Any], Any] | None = None  # your function, called with each Alert

    def __post_init__(self) -> None:
        for name in ("enabled", "canary_extracted", "spike", "leak", "jsonl", "confirm_near_ties"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"AlertConfig.{name} must be True or False; got {getattr(self, name)!r}")
        if not isinstance(self.extraction_rate, Mapping) or not all(
            isinstance(g, str) and isinstance(v, int | float) and 0 < v <= 1
            for g, v in self.extraction_rate.items()
        ):
            raise ConfigError(
                "AlertConfig.extraction_rate must map group names to rates in (0, 1], e.g. {'train': 0.1}; "
                f"got {self.extraction_rate!r}"
            )
        for name, low in (
            ("spike_z", 0.0),
            ("spike_min_rate", 0.0),
            ("hysteresis", 0.0),
        ):
            value = getattr(self, name)
            if not _finite_number(value) or value < low:
                raise ConfigError(f"AlertConfig.{name} must be a finite number >= {low}; got {value!r}")
        if not _finite_number(self.webhook_timeout) or not 0 < self.webhook_timeout <= MAX_WEBHOOK_TIMEOUT:
            # 0 fails every post, even to a healthy server; an unbounded wait holds a thread forever
            raise ConfigError(
                f"AlertConfig.webhook_timeout must be seconds in (0, {MAX_WEBHOOK_TIMEOUT:g}]; "
                f"got {self.webhook_timeout!r}"
            )
        if self.hysteresis >= 1:
            raise ConfigError(f"AlertConfig.hysteresis must be below 1; got {self.hysteresis!r}")
        for name in (
            "spike_min_evals",
            "spike_min_count",
            "cooldown",
            "webhook_retries",
            "leak_min_distinct",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"AlertConfig.{name} must be an integer >= 0; got {value!r}")
        if self.webhook_retries > MAX_WEBHOOK_RETRIES:
            raise ConfigError(
                f"AlertConfig.webhook_retries must be at most {MAX_WEBHOOK_RETRIES} (each retry holds a thread); "
                f"got {self.webhook_retries!r}"
            )
        if self.exposure_bits is not None and (
            not _finite_number(self.exposure_bits) or self.exposure_bits <= 0
        ):
            raise ConfigError(
                f"AlertConfig.exposure_bits must be a positive number of bits or None; got {self.exposure_bits!r}"
            )
        if not isinstance(self.leak_groups, tuple) or not all(isinstance(g, str) for g in self.leak_groups):
            raise ConfigError(
                f"AlertConfig.leak_groups must be a tuple of group names; got {self.leak_groups!r}"
            )
        if not isinstance(self.thresholds, Mapping) or not all(
            isinstance(k, str) and k.count("/") >= 1 and _finite_number(v) for k, v in self.thresholds.items()
        ):
            raise ConfigError(
                "AlertConfig.thresholds must map statistic keys ('<group>/<stat>', e.g. 'train/extraction_rate' or "
                f"'train~heldout/loss_auc') to finite numbers; got {self.thresholds!r}"
            )
        if not isinstance(self.rules, tuple) or not all(
            isinstance(getattr(r, "name", None), str) and callable(getattr(r, "check", None))
            for r in self.rules
        ):
            raise ConfigError(
                "AlertConfig.rules must be a tuple of rules, each with a `name` and a check(record, state, ctx) "
                f"method (see memwatch.alerts); got {self.rules!r}"
            )
        names = RULES + tuple(r.name for r in self.rules)
        for rule, acts in self.actions.items():
            if rule not in names:
                raise ConfigError(f"AlertConfig.actions: unknown rule {rule!r}; rules are {names}")
            if isinstance(acts, str) or not all(a in ACTIONS for a in acts):
                raise ConfigError(f"AlertConfig.actions[{rule!r}] must be a tuple of {ACTIONS}; got {acts!r}")
        if self.webhook_url is not None:
            _check_webhook_url(self.webhook_url)
        if self.on_alert is not None and not callable(self.on_alert):
            raise ConfigError("AlertConfig.on_alert must be callable")


@dataclass(frozen=True)
class MonitorConfig:
    """How often and how memwatch probes a training run, and where it writes.

    `MonitorConfig()` keeps the monitor under `max_overhead` of training time; `MonitorConfig(every_n_steps=50)`
    evaluates every 50 optimizer steps instead. Every field is checked at construction.
    """

    # --- when ---
    every_n_steps: int | None = None  # None: adaptive, chosen from measured costs to stay under max_overhead
    max_overhead: float = 0.02  # the project's overhead goal: 2% of training time (benchmarks/overhead.py)
    eval_on_start: bool = True  # a baseline before training makes "newly memorized" meaningful
    eval_on_end: bool = True  # the final model is the one that ships

    # --- what: the extraction spec (DESIGN.md §5) ---
    prefix_len: int = 32  # k = m = 32 is Pythia's convention, so numbers compare with published ones
    suffix_len: int = 32
    entropy_window: int | None = (
        None  # w prefix positions before the boundary: None = min(16, prefix_len - 1)
    )
    boundary_width: int = (
        4  # j: the boundary jump compares the first j generated with the last j prefix positions
    )
    mode: str = "full"  # "exact" skips free decoding (cheaper, no match ratio / edit similarity)
    batch_size: int | None = None  # None: from a memory budget (see memwatch.extract)
    amp_dtype: str | None = (
        "auto"  # "auto": the trainer's bf16/fp16 setting; None: the model's dtype; "bf16"/"fp16"
    )
    memorized_threshold: float = 1.0  # match ratio that counts as memorized; 1.0 means exact extraction
    # Signals switched on or off by name (memwatch.signals.REGISTRY holds them; each has a default): a number that
    # is not needed costs nothing, since the engine computes only what the enabled signals need.
    signals: Mapping[str, bool] = field(default_factory=dict)
    # Member groups against their controls: contrasts (e.g. membership AUCs) are computed for each pair present.
    pairs: tuple[tuple[str, str], ...] = (("train", "heldout"), ("canary", "canary_heldout"))
    # min-k% prob and min-k%++ average the lowest k of the token scores: 20%, the value Shi et al. 2024 and Zhang
    # et al. 2024 found best across models and report by default.
    min_k: float = 0.2
    # The training-data n-gram index (memwatch.corpus; its dup_window, suffix_ngram<n>, ngram_logprob, ngram_rho
    # signals and the ngram_boundary, dup_extraction, distributional statistics): "dataset" indexes the tokenized
    # training set once at setup (cached under <output_dir>/corpus by a hash of the data, reused on resume and by
    # scan), "stream" indexes the batches as they pass (Monitor.observe_batch; counts "seen so far"), "off" none.
    # Off by default: it needs the optional package tokengrams (pip install 'memwatch[ngrams]'), about 10 bytes of
    # disk a training token, and time at setup ("dataset") or at each evaluation ("stream").
    ngrams: str = "off"
    # Chen et al.'s context and continuation sweep, live: the exact-extraction rate at each prefix length k <=
    # prefix_len and continuation length m <= suffix_len (the continuation always starts at token prefix_len, so
    # every cell scores the same tokens), per group at every evaluation (sweep_rate/k<k>_m<m>). Each k below
    # prefix_len costs one teacher-forced pass (no decoding: greedy reproduces the true tokens exactly as long as
    # each argmax does); m is free (exact at m iff the prefix match is at least m). Empty: prefix_len / suffix_len
    # alone; both empty: no sweep. A sweep past the configured lengths: memwatch sweep on saved checkpoints.
    sweep_prefix_lens: tuple[int, ...] = ()
    sweep_suffix_lens: tuple[int, ...] = ()

    # --- the panel (DESIGN.md §5) ---
    train_probes: int = 512  # enough for a rate to move in steps of 0.2%, small enough to be cheap
    heldout_probes: int = 256  # the control group: its extraction rate is the baseline for "memorized"
    seed: int = 0  # panel sampling uses a private RNG seeded here; the training RNG is never touched
    window: str = (
        "first"  # which window of a training example: "first" (as trained, Pythia's convention) or "random"
    )

    # --- canaries (see memwatch.canaries) ---
    exposure_references: int = (
        1000  # R reference secrets per canary: exposure resolves up to log2 R ~ 10 bits by rank
    )
    exposure_every: int | None = None  # None: every evaluation while canaries x references <= 32768 sequences
    # The embedding view (TensorBoard's projector): the first, the last and every Nth evaluation; it costs one
    # panel-sized float16 matrix each time, so a handful of snapshots show memorized probes separating. None: off.
    embedding_every: int | None = 5
    # The reference model that calibrates the membership signals (loss_calibrated, min_k_plus_calibrated, ...) and
    # tells "memorized by this run" from "known before it": "auto" uses a PEFT model's base (adapters disabled; the
    # base is frozen, so it is measured once, free thereafter) and nothing for a full fine-tune; a path names a model
    # with the same tokenizer (loaded once, measured once, freed); None: off.
    reference: str | None = "auto"

    # --- where ---
    output_dir: str | None = None  # default: <trainer output_dir>/memwatch
    history: bool = True  # the per-probe SQLite history (post-hoc analysis needs it)
    history_path: str | None = None  # default: <output_dir>/history.sqlite
    tensorboard: bool = True
    tensorboard_dir: str | None = None  # default: <output_dir>/tb, beside the trainer's own runs
    console: bool = True  # a compact table after each evaluation (rank 0)
    reveal_text: bool = False  # secrets and training text never leave memwatch unless asked (DESIGN.md §5)
    run_name: str | None = None  # default: the trainer's run name or a timestamp
    strict: bool = False  # re-raise memwatch's own errors (for your CI); by default they never stop training
    max_failures: int = 3  # failed evaluations in a row before memwatch switches itself off (with a warning)
    alerts: AlertConfig = field(default_factory=AlertConfig)  # memorization alerts (see memwatch.alerts)
    # memwatch's numbers beside the loss, in the trackers the training framework reports to (the Trainer's report_to
    # W&B / MLflow / ..., Accelerate's trackers, Lightning's loggers; its own TensorBoard is memwatch's tb/):
    # "headline" forwards the short set a dashboard can hold (per group extraction rate, memorized rate and suffix
    # NLL, per tier extraction rate and exposure, the member/control AUCs, alerts), "all" every group statistic,
    # "off" nothing. Alerts go where the tracker has them (W&B alerts, MLflow tags); at train end the history and
    # its HTML report go as artifacts.
    trackers: str = "headline"

    def __post_init__(self) -> None:
        _check_int("every_n_steps", self.every_n_steps, 1, optional=True)
        _check_fraction("max_overhead", self.max_overhead)
        _check_int("max_failures", self.max_failures, 1)
        for name in (
            "eval_on_start",
            "eval_on_end",
            "history",
            "tensorboard",
            "console",
            "reveal_text",
            "strict",
        ):
            _check_bool(name, getattr(self, name))
        _check_int("prefix_len", self.prefix_len, 1)
        _check_int("suffix_len", self.suffix_len, 1)
        if self.entropy_window is None and isinstance(self.prefix_len, int):
            object.__setattr__(self, "entropy_window", max(0, min(16, self.prefix_len - 1)))
        _check_int("entropy_window", self.entropy_window, 0)
        if self.entropy_window > self.prefix_len - 1:
            raise ConfigError(
                f"MonitorConfig.entropy_window must be at most prefix_len - 1 = {self.prefix_len - 1}; "
                f"got {self.entropy_window}"
            )
        _check_int("boundary_width", self.boundary_width, 1)
        if self.boundary_width > max(self.entropy_window, self.suffix_len):
            # each side is clipped to the positions it has; beyond both, the number means nothing
            raise ConfigError(
                "MonitorConfig.boundary_width (positions averaged on each side of the boundary) must be at most "
                f"max(entropy_window, suffix_len) = {max(self.entropy_window, self.suffix_len)}; "
                f"got {self.boundary_width}"
            )
        if self.mode not in ("full", "exact"):
            raise ConfigError(f"MonitorConfig.mode must be 'full' or 'exact'; got {self.mode!r}")
        _check_int("batch_size", self.batch_size, 1, optional=True)
        if self.amp_dtype not in (None, "auto", "bf16", "fp16", "fp32"):
            raise ConfigError(
                f"MonitorConfig.amp_dtype must be 'auto', None, 'bf16', 'fp16' or 'fp32'; got {self.amp_dtype!r}"
            )
        _check_fraction("memorized_threshold", self.memorized_threshold)
        _check_fraction("min_k", self.min_k)
        _check_signals(self.signals)
        _check_ngrams(self)
        if self.trackers not in ("headline", "all", "off"):
            raise ConfigError(
                "MonitorConfig.trackers must be 'headline' (the short set), 'all' (every group statistic) or 'off'; "
                f"got {self.trackers!r}"
            )
        for name, most in (("sweep_prefix_lens", self.prefix_len), ("sweep_suffix_lens", self.suffix_len)):
            value = getattr(self, name)
            if (
                not isinstance(value, tuple)
                or not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= most for v in value)
                or len(set(value)) != len(value)
            ):
                raise ConfigError(
                    f"MonitorConfig.{name} must be a tuple of distinct lengths from 1 to "
                    f"{'prefix_len' if name.startswith('sweep_prefix') else 'suffix_len'} = {most} (raise that to "
                    f"sweep further, or sweep saved checkpoints with `memwatch sweep`); got {value!r}"
                )
        if not isinstance(self.pairs, tuple) or not all(
            isinstance(p, tuple) and len(p) == 2 and all(isinstance(g, str) and g for g in p) and p[0] != p[1]
            for p in self.pairs
        ):
            raise ConfigError(
                "MonitorConfig.pairs must be a tuple of (member group, control group) pairs of two different group "
                f"names, e.g. (('train', 'heldout'),); got {self.pairs!r}"
            )
        if self.mode == "exact" and self.memorized_threshold < 1:
            raise ConfigError(
                "MonitorConfig.memorized_threshold below 1 needs the match ratio, which mode='exact' does not compute "
                f"(got memorized_threshold={self.memorized_threshold!r}): use mode='full', or leave it at 1.0"
            )
        _check_int("train_probes", self.train_probes, 0)
        _check_int("heldout_probes", self.heldout_probes, 0)
        _check_int("seed", self.seed, 0)
        _check_int("exposure_references", self.exposure_references, 1)
        _check_int("exposure_every", self.exposure_every, 1, optional=True)
        _check_int("embedding_every", self.embedding_every, 1, optional=True)
        if self.embedding_every is None:
            from memwatch.signals import REGISTRY

            readers = [
                s.name for s in REGISTRY.enabled(self.signals, self.mode) if "hidden_prefix" in s.needs
            ]
            if readers:
                raise ConfigError(
                    f"MonitorConfig.signals switches on {readers}, which read the hidden states of the embedding "
                    "view's evaluations, but embedding_every=None never computes them; set embedding_every (e.g. 5) "
                    "or switch them off"
                )
        if self.reference is not None and (not isinstance(self.reference, str) or not self.reference):
            raise ConfigError(
                f"MonitorConfig.reference must be 'auto', a path or name of a model with the trained model's tokenizer, or None; "
                f"got {self.reference!r}"
            )
        if self.window not in ("first", "random"):
            raise ConfigError(f"MonitorConfig.window must be 'first' or 'random'; got {self.window!r}")
        for name in ("output_dir", "history_path", "tensorboard_dir", "run_name"):
            _check_str(name, getattr(self, name))
        if not isinstance(self.alerts, AlertConfig):
            raise ConfigError(
                f"MonitorConfig.alerts must be a memwatch.AlertConfig; got {type(self.alerts).__name__}"
            )

    def spec(self) -> dict[str, Any]:
        """The extraction spec recorded with every evaluation. Its entropy_window is the one measured: 0 when no
        enabled signal or statistic reads the prefix's entropies (the engine then keeps only the suffix's logits)."""
        from memwatch.signals import REGISTRY

        needs = REGISTRY.products(self.signals, self.mode)
        return {
            "prefix_len": self.prefix_len,
            "suffix_len": self.suffix_len,
            "entropy_window": self.entropy_window if "entropy" in needs else 0,
            "mode": self.mode,
        }

    # Fields that define what a recorded number means: a resumed run may not change them.
    DEFINITIONS = (
        "prefix_len",
        "suffix_len",
        "entropy_window",
        "mode",
        "memorized_threshold",
        "boundary_width",
        "min_k",
        "reference",
        "ngrams",  # a duplicate count of the whole dataset and one "seen so far" are different numbers
    )

    def sweep(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The live sweep's prefix and continuation lengths, ascending; ((), ()) when off."""
        if not self.sweep_prefix_lens and not self.sweep_suffix_lens:
            return (), ()
        return (
            tuple(sorted(self.sweep_prefix_lens or (self.prefix_len,))),
            tuple(sorted(self.sweep_suffix_lens or (self.suffix_len,))),
        )

    def definitions(self) -> dict[str, Any]:
        """The fields that define the run's numbers (see DEFINITIONS)."""
        return {name: getattr(self, name) for name in self.DEFINITIONS}

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly: nested configs as dicts, callables by name."""

        def plain(value: Any) -> Any:
            if isinstance(value, AlertConfig):
                out = {f.name: plain(getattr(value, f.name)) for f in fields(value)}
                if value.webhook_url:  # webhook URLs carry their own secret token: never stored
                    out["webhook_url"] = "<set>"
                return out
            if callable(value):
                return getattr(value, "__qualname__", repr(value))
            if isinstance(value, Mapping):
                return {k: plain(v) for k, v in value.items()}
            return value

        return {f.name: plain(getattr(self, f.name)) for f in fields(self)}
