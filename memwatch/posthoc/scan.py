"""Post-hoc checkpoint scanning: the same engine and history format as the live monitor, over saved models."""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Checkpoint", "ScanError", "find_checkpoints", "history_spec", "load_probes", "scan"]


class ScanError(ValueError):
    """A scan cannot start: the message names the file or argument and the fix."""


@dataclass(frozen=True)
class Checkpoint:
    label: str  # what the history records (a path, or model@revision)
    step: int
    path: str  # a directory or a hub model id
    revision: str | None = None


def _step_of(path: str) -> int | None:
    """The training step of a checkpoint: trainer_state.json's global_step, else a number in its name."""
    state = os.path.join(path, "trainer_state.json")
    if os.path.isfile(state):
        try:
            with open(state) as f:
                return int(json.load(f)["global_step"])
        except (ValueError, KeyError, OSError, TypeError):
            pass
    match = re.search(r"(?:checkpoint|step)[-_]?(\d+)", os.path.basename(os.path.normpath(path)))
    return int(match.group(1)) if match else None


def _is_model_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


def find_checkpoints(sources: Sequence[str], revisions: Sequence[str] | None = None) -> list[Checkpoint]:
    """Checkpoints to scan, sorted by step.

    sources: Trainer output directories (their checkpoint-* folders, steps from trainer_state.json), model
    directories, or with `revisions` one model id or directory loaded at each revision (e.g. Pythia's
    "step1000"; the step is the number in the revision name).
    """
    found: list[Checkpoint] = []
    if revisions:
        if len(sources) != 1:
            raise ScanError("--revisions takes exactly one model id or directory")
        for i, rev in enumerate(revisions):
            digits = re.findall(r"\d+", rev)
            found.append(Checkpoint(f"{sources[0]}@{rev}", int(digits[-1]) if digits else i, sources[0], rev))
        return sorted(found, key=lambda c: c.step)
    for source in sources:
        if not os.path.exists(source):
            raise ScanError(f"no such checkpoint or directory: {source}")
        if not os.path.isdir(source):
            raise ScanError(f"{source} is a file; give a model directory or a Trainer output directory")
        subs = sorted(
            os.path.join(source, d)
            for d in os.listdir(source)
            if d.startswith("checkpoint-") and _is_model_dir(os.path.join(source, d))
        )
        if subs:
            for sub in subs:
                step = _step_of(sub)
                found.append(Checkpoint(sub, step if step is not None else len(found), sub))
        elif _is_model_dir(source):
            step = _step_of(source)
            found.append(Checkpoint(source, step if step is not None else len(found), source))
        else:
            raise ScanError(f"{source} holds no model (no config.json) and no checkpoint-* folders")
    steps = [c.step for c in found]
    if len(set(steps)) != len(steps):
        raise ScanError(f"two checkpoints share a step ({sorted(steps)}); scan them into separate histories")
    return sorted(found, key=lambda c: c.step)


def _read_jsonl(path: str) -> list[dict[str, Any]]:
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ScanError(f"{path}, line {n}: not JSON ({exc.msg})") from exc
            if not isinstance(obj, dict):
                raise ScanError(
                    f'{path}, line {n}: expected an object like {{"text": ...}} or {{"input_ids": [...]}}'
                )
            rows.append(obj)
    return rows


def load_probes(path: str, *, tokenizer: Any = None, run: str | None = None) -> tuple[list[Any], Any]:
    """(probes, canary manifest or None) from a file: a history (a run's panel), a canary manifest, or JSONL.

    JSONL: one object per line, {"text": ...} or {"input_ids": [...]}, optional "group" (default "user") and "id".
    """
    from memwatch.canaries import CanaryError, CanaryManifest
    from memwatch.probes import Probe
    from memwatch.store.history import HistoryError, HistoryStore

    if not os.path.isfile(path):
        raise ScanError(f"no probe file at {path}")
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(b"SQLite format 3"):
        try:
            with HistoryStore(path, readonly=True) as h:
                panel = h.panel(_pick_run(h, run, path))
        except HistoryError as exc:
            raise ScanError(str(exc)) from exc
        return [Probe(tuple(p["tokens"]), p["group"], p["meta"]) for p in panel], None
    try:
        with open(path, encoding="utf-8") as f:
            whole = json.load(f)  # a manifest is one JSON object; JSONL with several lines is not
    except (json.JSONDecodeError, UnicodeDecodeError):
        whole = None
    if isinstance(whole, dict) and "canaries" in whole and "references" in whole:
        try:
            return [], CanaryManifest.from_dict(whole)
        except (CanaryError, KeyError, TypeError) as exc:
            raise ScanError(f"{path} is not a valid canary manifest: {exc}") from exc
    rows = _read_jsonl(path)
    items = []
    for n, row in enumerate(rows, 1):
        if "input_ids" not in row and "text" not in row:
            raise ScanError(f'{path}, line {n}: needs "text" or "input_ids"')
        if "text" in row and "input_ids" not in row and tokenizer is None:
            raise ScanError(f"{path} holds texts: give --tokenizer (or scan a model directory that has one)")
        items.append(row)
    return items, None


def _load_model(ckpt: Checkpoint, device: str, dtype: str) -> Any:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "auto": "auto"}
    key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    kwargs: dict[str, Any] = {key: dtypes[dtype]}
    if ckpt.revision is not None:
        kwargs["revision"] = ckpt.revision
    try:
        model = AutoModelForCausalLM.from_pretrained(ckpt.path, **kwargs)
    except (OSError, ValueError) as exc:
        raise ScanError(f"cannot load {ckpt.label} as a causal language model: {exc}") from exc
    return model.to(device).eval()


def _tokenizer(path: str | None) -> Any:
    if path is None:
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        return None


def _pick_run(store: Any, run: str | None, path: str) -> int:
    """The id of the run named or numbered `run` in an open HistoryStore (default: the latest)."""
    chosen = [r for r in store.runs() if run in (None, r["name"], str(r["run_id"]))]
    if not chosen:
        raise ScanError(f"no run {run!r} in {path}")
    return int(chosen[-1]["run_id"])


def history_spec(path: str, run: str | None = None) -> dict[str, Any] | None:
    """prefix_len, suffix_len and entropy_window of a history run's last evaluation; None for other files."""
    from memwatch.store.history import HistoryError, HistoryStore

    with open(path, "rb") as f:
        if not f.read(16).startswith(b"SQLite format 3"):
            return None
    try:
        with HistoryStore(path, readonly=True) as h:
            evals = h.evals(_pick_run(h, run, path))
    except (HistoryError, ScanError):
        return None
    if not evals:
        return None
    last = evals[-1]
    return {key: last[key] for key in ("prefix_len", "suffix_len", "entropy_window")}


def scan(
    sources: Sequence[str],
    *,
    history: str,
    probes: str | None = None,
    sample_from: str | None = None,
    samples: int = 512,
    revisions: Sequence[str] | None = None,
    run_name: str | None = None,
    tokenizer: str | None = None,
    device: str = "cpu",
    dtype: str = "fp32",
    batch_size: int | None = None,
    prefix_len: int | None = None,
    suffix_len: int | None = None,
    entropy_window: int | None = None,
    mode: str = "full",
    exposure_references: int = 1000,
    seed: int = 0,
    on_checkpoint: Callable[[Checkpoint, str], None] | None = None,
    on_batch: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Evaluate every checkpoint on one probe panel and append the results to `history` (run `run_name`).

    Checkpoints already in the history with the same spec are skipped, so an interrupted scan resumes.
    prefix_len / suffix_len / entropy_window left None: those of the probe history's last evaluation when
    `probes` is a history (so the scan measures what the live run measured), the manifest's prefix_len and
    secret_len when it is a canary manifest, else 32 / 32 / min(16, k - 1).
    on_checkpoint(checkpoint, "start" | "skip" | "done") and on_batch(rows_done, rows_total) report progress.
    """
    from memwatch.config import AlertConfig, MonitorConfig
    from memwatch.live.monitor import Monitor, SetupError

    ckpts = find_checkpoints(sources, revisions)
    if not ckpts:
        raise ScanError("nothing to scan")
    if probes is None and sample_from is None:
        raise ScanError("give --probes FILE (a history, a canary manifest or JSONL) or --sample-from DATASET")
    tok = _tokenizer(tokenizer or (ckpts[0].path if ckpts[0].revision is None else None))
    items, manifest = load_probes(probes, tokenizer=tok) if probes else ([], None)
    train_data = _dataset_file(sample_from, tok) if sample_from else None
    spec = history_spec(probes) if probes else None
    if spec is not None:  # each length not given: the live run's
        prefix_len = spec["prefix_len"] if prefix_len is None else prefix_len
        suffix_len = spec["suffix_len"] if suffix_len is None else suffix_len
        if entropy_window is None and prefix_len == spec["prefix_len"]:
            entropy_window = spec["entropy_window"]
    if manifest is not None:  # a canary manifest knows the lengths its canaries were made for
        prefix_len = manifest.prefix_len if prefix_len is None else prefix_len
        suffix_len = manifest.secret_len if suffix_len is None else suffix_len
    prefix_len = 32 if prefix_len is None else prefix_len  # Pythia's convention
    suffix_len = 32 if suffix_len is None else suffix_len
    config = MonitorConfig(
        every_n_steps=1,
        eval_on_start=False,
        eval_on_end=False,
        prefix_len=prefix_len,
        suffix_len=suffix_len,
        entropy_window=entropy_window,
        mode=mode,
        batch_size=batch_size,
        amp_dtype=None,
        train_probes=samples if sample_from else 0,
        heldout_probes=0,
        seed=seed,
        history_path=history,
        strict=True,  # a checkpoint that cannot be evaluated fails the scan rather than leaving a silent gap
        output_dir=os.path.dirname(os.path.abspath(history)),
        tensorboard=False,
        console=False,
        exposure_references=exposure_references,
        alerts=AlertConfig(enabled=False),
        run_name=run_name,
    )
    monitor = Monitor(config, probes=items, canaries=manifest, tokenizer=tok)
    name = run_name or os.path.basename(os.path.normpath(sources[0])) or "scan"
    model = _load_model(ckpts[0], device, dtype)
    created = not os.path.exists(history)
    try:
        monitor.setup(model, train_data=train_data, run_name=name, model_name=ckpts[0].label, source="scan")
    except SetupError as exc:
        monitor.close()
        if created:  # leave no empty history behind for `report` to find
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(OSError):
                    os.remove(history + suffix)
        raise ScanError(str(exc)) from exc
    done = monitor.recorded_steps()
    scanned, skipped = [], []
    try:
        for i, ckpt in enumerate(ckpts):
            if ckpt.step in done:
                skipped.append(ckpt.step)
                if on_checkpoint:
                    on_checkpoint(ckpt, "skip")
                continue
            if on_checkpoint:
                on_checkpoint(ckpt, "start")
            if i > 0 or model is None:
                model = _load_model(ckpt, device, dtype)
            try:
                monitor.evaluate(model, ckpt.step, label=ckpt.label, progress=on_batch)
            except Exception as exc:
                raise ScanError(
                    f"evaluating {ckpt.label} (step {ckpt.step}) failed: {type(exc).__name__}: {exc}"
                ) from exc
            model = None
            scanned.append(ckpt.step)
            if on_checkpoint:
                on_checkpoint(ckpt, "done")
    finally:
        monitor.close()
    return {
        "history": history,
        "run": name,
        "scanned": scanned,
        "skipped": skipped,
        "probes": len(monitor.panel),
    }


def _dataset_file(path: str, tokenizer: Any) -> list[dict[str, Any]]:
    """Rows of a dataset file to sample windows from: .jsonl ({"text"} or {"input_ids"}) or plain text."""
    if not os.path.isfile(path):
        raise ScanError(f"no dataset file at {path}")
    if path.endswith(".jsonl"):
        rows = _read_jsonl(path)
    else:
        with open(path, encoding="utf-8", errors="replace") as f:
            rows = [{"text": t} for t in f.read().split("\n\n") if t.strip()]
    out = []
    for row in rows:
        if "input_ids" in row:
            out.append({"input_ids": list(row["input_ids"])})
        elif "text" in row:
            if tokenizer is None:
                raise ScanError(f"{path} holds text: give --tokenizer to sample windows from it")
            out.append({"input_ids": list(tokenizer(row["text"], add_special_tokens=False)["input_ids"])})
    return out
