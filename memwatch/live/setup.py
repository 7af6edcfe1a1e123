"""Setup-time work: the probe panel built and checked against the model, the alert rules and a resumed run."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from memwatch.config import MonitorConfig
from memwatch.probes import Panel, Probe, probes_from_user, sample_windows

__all__ = [
    "SetupError",
    "build_panel",
    "canary_text",
    "check_alert_groups",
    "check_definitions",
    "check_model",
    "load_manifest",
    "preflight_panel",
]

log = logging.getLogger("memwatch")


class SetupError(ValueError):
    """memwatch cannot start: the message names the problem and the fix. Raised before the first training step."""


def _looks_like_token_lists(data: Any) -> bool:
    return isinstance(data, list | tuple) and (
        not data or isinstance(data[0], str | Mapping | list | tuple) or hasattr(data[0], "tolist")
    )


def _lengthen(need: int, position_limit: int | None) -> str:
    """The fix for rows shorter than the window, never past what the model can take (need <= position_limit:
    check_model ran first)."""
    longest = f" (the model takes up to {position_limit})" if position_limit is not None else ""
    return (
        f"Give rows of at least {need} tokens{longest}, or lower MonitorConfig.prefix_len / suffix_len to fit "
        "the rows you have."
    )


def build_panel(
    config: MonitorConfig,
    *,
    canaries: Any,
    manifest: Any,
    user_probes: list[Any],
    heldout: Any,
    tokenizer: Any,
    train_data: Any,
    collator: Any,
    position_limit: int | None = None,
) -> Panel:
    """Canaries, the user's probes, training windows and held-out windows, in that order, without duplicates and
    without anything shorter than prefix_len + suffix_len; a SetupError if nothing is left (its advice bounded by
    the model's `position_limit`, already checked to take prefix_len + suffix_len)."""
    cfg = config
    k, m = cfg.prefix_len, cfg.suffix_len
    panel = Panel()
    canary_probes = _canary_probes(config, canaries, manifest)
    for probe in canary_probes:
        panel.add(probe)
    try:
        for probe in probes_from_user(user_probes, tokenizer=tokenizer):
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
        exclude=canary_text(canary_probes, k, m),
    ):
        panel.add(probe)
    before = set(panel.ids)
    overlap = 0  # held-out windows whose tokens are already in the panel (training windows, canaries)
    if heldout is not None and cfg.heldout_probes:
        if _looks_like_token_lists(heldout):
            try:
                probes = probes_from_user(list(heldout), tokenizer=tokenizer, default_group="heldout")
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
                ("probes", bool(user_probes)),
                ("canaries", canaries is not None),
            )
            if present
        ]
        raise SetupError(
            f"memwatch has no probes to evaluate: {', '.join(given) or 'no data'} given, but nothing has a "
            f"window of prefix_len + suffix_len = {k + m} tokens (training windows also need their last {m} "
            f"tokens to receive loss){f'; {dropped} probe(s) were too short' if dropped else ''}. "
            + _lengthen(k + m, position_limit)
        )
    return panel


def canary_text(probes: list[Probe], k: int, m: int) -> list[tuple[int, ...]]:
    """Token sequences that mark canary text in the training data, so the train group never samples it (a
    canary inserted 64 times would otherwise inflate the train group's rate): each canary's secret, and the
    k - 1 tokens before it (also when packing or truncation cut the secret off; not the first context token,
    which can tokenize differently after a prompt or a chat template's markup)."""
    marks: list[tuple[int, ...]] = []
    for p in probes:
        if len(p.tokens) >= k + m:
            marks.append(tuple(p.tokens[k : k + m]))
            if k > 1:
                marks.append(tuple(p.tokens[1:k]))
    return marks


def load_manifest(canaries: Any) -> Any:
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


def _canary_probes(config: MonitorConfig, canaries: Any, manifest: Any) -> list[Probe]:
    if canaries is None:
        return []
    if manifest is not None:
        from memwatch.canaries import CanaryError

        try:
            return manifest.probes(config.prefix_len, config.suffix_len)
        except CanaryError as exc:
            raise SetupError(str(exc)) from exc
    return list(canaries)


def preflight_panel(
    panel: Panel, manifest: Any, config: MonitorConfig, train_data: Any, collator: Any, tokenizer: Any = None
) -> tuple[Panel, Any]:
    """Inserted canaries must really be in the data the trainer uses, with their secrets trained."""
    from memwatch.canaries import CanaryError, preflight

    try:
        report = preflight(
            manifest,
            train_data,
            prefix_len=config.prefix_len,
            suffix_len=config.suffix_len,
            collator=collator,
            tokenizer=tokenizer,
        )
    except CanaryError as exc:
        raise SetupError(str(exc)) from exc
    for message in report.warnings:
        log.warning("memwatch: %s", message)
    # Probe each inserted canary exactly as it appears in the training data.
    replaced = []
    for probe in panel.probes:
        window = report.windows.get(probe.meta.get("canary_id", ""))
        replaced.append(
            probe if window is None or window == probe.tokens else Probe(window, probe.group, probe.meta)
        )
    return Panel(replaced), report


def check_model(config: MonitorConfig, model: Any, tokens: np.ndarray | None) -> int | None:
    """The model can take prefix_len + suffix_len positions and the probes' token ids (when given); returns the
    model's position limit (None: unlimited)."""
    from memwatch.engine.modeling import inspect_model

    try:
        info = inspect_model(model)
    except TypeError as exc:
        raise SetupError(str(exc)) from exc
    need = config.prefix_len + config.suffix_len
    if info.position_limit is not None and need > info.position_limit:
        raise SetupError(
            f"prefix_len + suffix_len = {need} exceeds the model's position limit of {info.position_limit}; "
            "lower MonitorConfig.prefix_len / suffix_len."
        )
    if tokens is not None and tokens.size and int(tokens.max()) >= info.vocab_size:
        raise SetupError(
            f"probe token ids reach {int(tokens.max())} but the model's vocabulary has {info.vocab_size} "
            "entries: the probes were tokenized with another tokenizer."
        )
    return info.position_limit


def check_alert_groups(config: MonitorConfig, panel: Panel | None) -> None:
    """A rule you configured for a group the panel does not have could never fire: say so at setup."""
    from memwatch.config import AlertConfig

    acfg, default = config.alerts, AlertConfig()
    if not acfg.enabled or panel is None:
        return
    named = set(acfg.extraction_rate) if acfg.extraction_rate != default.extraction_rate else set()
    if acfg.leak_groups != default.leak_groups:
        named |= set(acfg.leak_groups)
    unknown = sorted(named - set(panel.group_names()))
    if unknown:
        raise SetupError(
            f"AlertConfig names group(s) {unknown} that the panel does not have, so those rules could never "
            f"fire; the panel's groups are {panel.group_names()}"
        )
    from memwatch.record import scopes_of

    scopes = [s.key for s in scopes_of(panel.groups, [p.meta for p in panel.probes], config.pairs)]
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
    bits = acfg.exposure_bits
    if bits is not None and "canary" in panel.group_names():
        resolved = math.log2(config.exposure_references)
        if bits > resolved:
            # Beyond log2 R exposure is the skew-normal extrapolation alone (exposure by rank stops there): a
            # warning that can rest on a fitted tail; never fired at the baseline, where nothing was trained yet.
            log.warning(
                "memwatch: AlertConfig.exposure_bits=%g exceeds what %d reference secrets resolve by rank "
                "(log2 %d = %.1f bits): the exposure alert can fire only on the skew-normal extrapolation, and not at "
                "the step-0 baseline. Raise MonitorConfig.exposure_references to %d or more, or lower exposure_bits "
                "to %.1f or less.",
                bits,
                config.exposure_references,
                config.exposure_references,
                resolved,
                2 ** math.ceil(bits),
                resolved,
            )


def check_definitions(config: MonitorConfig, stored: Mapping[str, Any], run_name: str | None) -> None:
    """A resumed run measures what it measured before: refuse a config that changes a definition."""
    changed = [
        f"{name}={value!r} (recorded with {stored[name]!r})"
        for name, value in config.definitions().items()
        if name in stored and stored[name] != value
    ]
    if changed:
        raise SetupError(
            f"resuming run {run_name!r} with {', '.join(changed)} would change what its numbers mean; "
            "resume with the settings it was recorded with, or record into a new run (run_name=... or a new "
            "output_dir)"
        )
