"""Post-hoc checkpoint scanning: the same engine and history format as the live monitor, over saved models."""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from memwatch.config import MonitorConfig

__all__ = [
    "Checkpoint",
    "ScanError",
    "adapter_info",
    "find_checkpoints",
    "history_spec",
    "load_probes",
    "scan",
]

_T = TypeVar("_T")


class ScanError(ValueError):
    """A scan cannot start: the message names the file or argument and the fix."""


@dataclass(frozen=True)
class Checkpoint:
    label: str  # what the history records (a path, or model@revision)
    step: int
    path: str  # a directory or a hub model id
    revision: str | None = None
    adapter: bool = False  # a PEFT adapter (adapter_config.json), loaded on its base model


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


def _is_adapter_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "adapter_config.json"))


def _is_model_dir(path: str) -> bool:
    """A directory that holds something to scan: a saved model (config.json) or a PEFT adapter."""
    return os.path.isfile(os.path.join(path, "config.json")) or _is_adapter_dir(path)


def find_checkpoints(sources: Sequence[str], revisions: Sequence[str] | None = None) -> list[Checkpoint]:
    """Checkpoints to scan, sorted by step.

    sources: Trainer output directories (their checkpoint-* folders, steps from trainer_state.json), model
    directories, PEFT adapter directories (adapter_config.json; checkpoint-* folders of adapters too), or with
    `revisions` one model id or directory loaded at each revision (e.g. Pythia's "step1000"; the step is the number
    in the revision name).
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
        folders = sorted(
            os.path.join(source, d)
            for d in os.listdir(source)
            if d.startswith("checkpoint-") and os.path.isdir(os.path.join(source, d))
        )
        subs = [sub for sub in folders if _is_model_dir(sub)]
        if subs:
            for sub in subs:
                step = _step_of(sub)
                found.append(
                    Checkpoint(
                        sub, step if step is not None else len(found), sub, adapter=_is_adapter_dir(sub)
                    )
                )
        elif _is_model_dir(source):
            step = _step_of(source)
            found.append(
                Checkpoint(
                    source, step if step is not None else len(found), source, adapter=_is_adapter_dir(source)
                )
            )
        elif folders:
            raise ScanError(
                f"{source} holds no model: none of its {len(folders)} checkpoint-* folders has a config.json (a "
                "saved model) or an adapter_config.json (a PEFT adapter); were they saved with save_only_model or "
                "without the model weights?"
            )
        else:
            raise ScanError(
                f"{source} holds no model: no config.json (a saved model), no adapter_config.json (a PEFT adapter) "
                "and no checkpoint-* folders; give a model directory, an adapter directory or a Trainer output "
                "directory"
            )
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


_DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")  # from_pretrained's placement strategies


def _adapter_config(path: str) -> dict[str, Any]:
    file = os.path.join(path, "adapter_config.json")
    try:
        with open(file) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ScanError(f"cannot read {file} ({exc}); is the adapter saved completely?") from exc
    if not isinstance(config, dict):
        raise ScanError(f"{file} is not a PEFT adapter config (expected a JSON object)")
    return config


def _base_of(ckpt: Checkpoint, config: Mapping[str, Any], base_model: str | None) -> str:
    """The base model an adapter is loaded on: --base-model, else the adapter config's base_model_name_or_path."""
    if base_model:
        return base_model
    base = config.get("base_model_name_or_path")
    if not base:
        raise ScanError(
            f"the PEFT adapter at {ckpt.path} names no base model (adapter_config.json has no "
            "base_model_name_or_path); give it with --base-model PATH"
        )
    return str(base)


def adapter_info(ckpt: Checkpoint, base_model: str | None = None) -> dict[str, Any] | None:
    """What a scan records of a PEFT adapter checkpoint: peft_type, r, lora_alpha, target_modules (sorted when a
    list; a regex stays a string), base_model (the one loaded: `base_model` when given); None for a full model."""
    if not ckpt.adapter:
        return None
    config = _adapter_config(ckpt.path)
    targets = config.get("target_modules")
    if isinstance(targets, list | tuple):
        targets = sorted(str(t) for t in targets)
    return {
        "peft_type": config.get("peft_type"),
        "r": config.get("r"),
        "lora_alpha": config.get("lora_alpha"),
        "target_modules": targets,
        "base_model": _base_of(ckpt, config, base_model),
    }


def _my_gpus(n_gpus: int, local_rank: int, local_world: int) -> list[int]:
    """The GPUs of one process among `local_world` on a machine with `n_gpus`: an equal contiguous share, so that
    device_map="auto" spreads each process's model over its own GPUs only."""
    if n_gpus < local_world:
        raise ScanError(
            f"--device-map with {local_world} processes on this machine needs at least one GPU per process and "
            f"{n_gpus} are visible: launch at most {n_gpus} process(es) per machine (--nproc_per_node), or drop "
            "--device-map to give each process a whole model on --device"
        )
    share = n_gpus // local_world
    return list(range(local_rank * share, (local_rank + 1) * share))


class _Loader:
    """Loads each checkpoint as a causal LM in eval mode on `device` (or placed by `device_map`).

    A PEFT adapter goes onto its base model. The base is loaded once and kept: a later adapter with the same base
    and configuration only swaps the adapter weights in (peft's load_adapter), the way a LoRA run's checkpoints
    differ, so a scan of N adapters reads the base once, not N times.
    """

    def __init__(self, device: str, dtype: str, device_map: str | None, base_model: str | None) -> None:
        self.device, self.dtype, self.device_map, self.base_model = device, dtype, device_map, base_model
        self._peft: Any = None  # the PeftModel kept for the next adapter
        self._peft_key: Any = None  # (base, adapter config) it was built for
        self._adapter_name: str | None = None

    def _kwargs(self) -> dict[str, Any]:
        import torch
        import transformers

        dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "auto": "auto"}
        key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
        kwargs: dict[str, Any] = {key: dtypes[self.dtype]}
        if self.device_map is not None:
            kwargs["device_map"] = self.device_map
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
            if local_world > 1 and torch.cuda.is_available():
                from accelerate.utils import get_max_memory

                mine = _my_gpus(
                    torch.cuda.device_count(), int(os.environ.get("LOCAL_RANK", "0")), local_world
                )
                # Devices left out of max_memory are not used: each process fills its own GPUs (then the CPU).
                kwargs["max_memory"] = {d: b for d, b in get_max_memory().items() if d in mine or d == "cpu"}
        return kwargs

    def _from_pretrained(self, path: str, what: str, fix: str, revision: str | None = None) -> Any:
        from transformers import AutoModelForCausalLM

        kwargs = self._kwargs()
        if revision is not None:
            kwargs["revision"] = revision
        try:
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        except ImportError as exc:  # device_map needs accelerate
            raise ScanError(
                f"cannot load {what}: {exc}; pip install accelerate, or drop --device-map"
            ) from exc
        except (OSError, ValueError) as exc:
            raise ScanError(f"cannot load {what} as a causal language model: {exc}{fix}") from exc
        return model if self.device_map is not None else model.to(self.device)

    def __call__(self, ckpt: Checkpoint) -> Any:
        if not ckpt.adapter:
            self.release()  # a full model next: the kept base is not needed
            return self._from_pretrained(ckpt.path, ckpt.label, "", ckpt.revision).eval()
        try:
            import peft
        except ImportError as exc:
            raise ScanError(
                f"{ckpt.label} is a PEFT adapter (adapter_config.json) and loading it needs peft: pip install peft"
            ) from exc
        config = _adapter_config(ckpt.path)
        base = _base_of(ckpt, config, self.base_model)
        key = (base, json.dumps({k: v for k, v in config.items() if k != "peft_version"}, sort_keys=True))
        name = f"step{ckpt.step}"
        # peft reads transformers' `is_gradient_checkpointing`, which transformers 5 deprecates: peft's call, not
        # ours, and nothing a user of memwatch can act on.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            try:
                if self._peft is not None and self._peft_key == key:
                    old = self._adapter_name
                    self._peft.load_adapter(ckpt.path, adapter_name=name)
                    self._peft.set_adapter(name)
                    self._peft.delete_adapter(old)
                else:
                    self.release()
                    where = (
                        "the --base-model given"
                        if self.base_model
                        else "base_model_name_or_path in its adapter_config.json"
                    )
                    model = self._from_pretrained(
                        base,
                        f"the base model {base} of the PEFT adapter at {ckpt.path}",
                        f" (from {where}); give the base model's directory with --base-model PATH",
                    )
                    self._peft = peft.PeftModel.from_pretrained(model, ckpt.path, adapter_name=name)
                    self._peft_key = key
            except ScanError:
                raise
            except (OSError, ValueError, KeyError, RuntimeError) as exc:
                self.release()
                raise ScanError(
                    f"cannot load the PEFT adapter at {ckpt.path} on {base}: {type(exc).__name__}: {exc}; is "
                    "--base-model (or the adapter's base_model_name_or_path) the model it was trained on?"
                ) from exc
        self._adapter_name = name
        return self._peft.eval()

    def release(self) -> None:
        """Let go of the kept base model."""
        self._peft = self._peft_key = self._adapter_name = None


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


@dataclass(frozen=True)
class _ScanConfig(MonitorConfig):
    """The monitor's config plus what a scan knows of the model: the PEFT adapter (the run's config["adapter"])."""

    adapter: Mapping[str, Any] | None = None


def _start_distributed(device: str) -> tuple[bool, str]:
    """Under torchrun / accelerate launch (WORLD_SIZE > 1): the launcher's process group, started here when the
    caller has not (gloo on the CPU, nccl on CUDA), and this process's own GPU for a bare "cuda".
    Returns (whether the group was started here, the device)."""
    import torch
    import torch.distributed as dist

    if not dist.is_available():
        return False, device
    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return False, device
    if device == "cuda":  # one GPU per process, as torchrun numbers them
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    if dist.is_initialized():
        return False, device
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return True, device


def _agreed(fn: Callable[[], _T], group: Any) -> _T:
    """fn() on every rank; an error on any rank is raised on every rank (a ScanError), so that no rank is left
    waiting in the next collective. In one process, fn() as it is."""
    from memwatch.live import distributed

    if not distributed.is_distributed():
        return fn()
    value, error = None, None
    try:
        value = fn()
    except ScanError as exc:
        error = str(exc)
    except Exception as exc:
        error = f"on rank {distributed.rank()}: {type(exc).__name__}: {exc}"
    errors = [e for e in distributed.all_gather(error, group=group) if e is not None]
    if errors:
        raise ScanError(errors[0])
    return value  # type: ignore[return-value]


def _recorded_steps(history: str, name: str, spec: Mapping[str, Any]) -> set[int]:
    """The steps this scan's run already holds with this spec, read before any model is loaded so that a resumed
    scan loads none that it skips. A guess: the monitor's own answer after its setup is the one that counts."""
    from memwatch.store.history import HistoryStore

    if not os.path.isfile(history):
        return set()
    try:
        with HistoryStore(history, readonly=True) as h:
            run = h.find_run(name, "scan")
            return set() if run is None else {e["step"] for e in h.evals(run) if e["spec"] == spec}
    except Exception:  # a history that cannot be read: the setup opens it again and says what is wrong
        return set()


def _plan(ckpts: Sequence[Checkpoint], done: set[int], world: int) -> tuple[list[Checkpoint], bool]:
    """(checkpoints left to scan, whether the ranks split them): with at least one checkpoint per rank, each rank
    measures whole checkpoints; with fewer, every rank takes part in each checkpoint (the panel is sharded)."""
    pending = [c for c in ckpts if c.step not in done]
    return pending, world > 1 and len(pending) >= world


class _OneProcess:
    """memwatch.live.distributed as one process sees it: Measure then measures every row itself."""

    def __init__(self, real: Any) -> None:
        self._real = real

    def is_distributed(self) -> bool:
        return False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


@contextlib.contextmanager
def _one_process() -> Any:
    """Measure's panel sharding off while this rank measures a whole checkpoint of its own (the other ranks are
    measuring theirs). Measure decides by memwatch.live.distributed.is_distributed(), which is swapped here."""
    from memwatch.live import measure

    real = measure.distributed
    measure.distributed = _OneProcess(real)  # type: ignore[assignment]
    try:
        yield
    finally:
        measure.distributed = real


_FLAGS = ("entropy_window", "token_stats", "hidden_prefix", "exposure")


def _measure_args(monitor: Any, n_evaluated: int) -> dict[str, Any]:
    """The arguments Monitor.evaluate gives its measurement when `n_evaluated` evaluations precede it (exposure
    and the embedding view follow the count), so that a rank can take the measurement ahead of rank 0's turn."""
    cfg = monitor.config
    saved = monitor.evaluated_steps
    monitor.evaluated_steps = [None] * n_evaluated
    try:
        return {
            "metas": [p.meta for p in monitor.panel.probes],
            "references": None if monitor.manifest is None else monitor.manifest.references,
            "entropy_window": int(cfg.spec()["entropy_window"]),
            "token_stats": "token_logprobs" in monitor._needs(),
            "hidden_prefix": monitor._embedding_due(),
            "exposure": monitor._exposure_due(),
        }
    finally:
        monitor.evaluated_steps = saved


class _Measured:
    """Monitor.measure's stand-in when each rank measured whole checkpoints: gives the monitor the measurement of
    the checkpoint it evaluates now (`next`), after checking that it was taken with the arguments asked for."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.next: tuple[dict[str, Any], Any, dict[str, Any], float] | None = None
        self.seconds = 0.0  # how long the measurement handed over last took, on its rank

    @property
    def batch_size(self) -> int | None:
        return self.real.batch_size

    @batch_size.setter
    def batch_size(self, value: int | None) -> None:
        self.real.batch_size = value

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def __call__(self, model: Any, tokens: Any, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
        if self.next is None:
            raise RuntimeError(
                "memwatch scan: an evaluation without a measurement (a bug in memwatch, please report)"
            )
        flags, result, extra, self.seconds = self.next
        self.next = None
        asked = {k: kwargs[k] for k in _FLAGS}
        if asked != flags:
            raise RuntimeError(
                f"memwatch scan measured the checkpoint with {flags} and the monitor asks for {asked} (a bug in "
                "memwatch, please report; a scan in one process is not affected)"
            )
        return result, extra


class _MeasuredTime:
    """The first of rank 0's sinks when each rank measured whole checkpoints: the recorded duration is the
    measurement's own, on the rank that took it, plus rank 0's bookkeeping, as a one-process scan records it."""

    name = "scan timing"

    def __init__(self, measured: _Measured) -> None:
        self.measured = measured

    def write(self, record: Any) -> None:
        record.duration = self.measured.seconds + record.duration

    def close(self) -> None:
        pass


class _Held:
    """The model a rank holds: the last checkpoint it loaded (one at a time, the previous one let go first)."""

    def __init__(self, loader: _Loader) -> None:
        self.loader = loader
        self.ckpt: Checkpoint | None = None
        self.model: Any = None

    def get(self, ckpt: Checkpoint) -> Any:
        if self.ckpt != ckpt:
            self.ckpt = self.model = None
            self.model = self.loader(ckpt)
            self.ckpt = ckpt
        return self.model


def _evaluate(
    monitor: Any, model: Any, ckpt: Checkpoint, progress: Callable[[int, int], None] | None
) -> None:
    try:
        monitor.evaluate(model, ckpt.step, label=ckpt.label, progress=progress)
    except Exception as exc:
        raise ScanError(
            f"evaluating {ckpt.label} (step {ckpt.step}) failed: {type(exc).__name__}: {exc}"
        ) from exc


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
    base_model: str | None = None,
    device: str = "cpu",
    device_map: str | None = None,
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
    PEFT adapters load on `base_model`, else on their adapter_config's base_model_name_or_path; the run's config
    records the adapter ("adapter": peft_type, r, lora_alpha, target_modules, base_model). device_map ("auto", ...)
    places each model with accelerate over the GPUs (then the CPU) instead of on `device`.
    Under torchrun / accelerate launch (WORLD_SIZE > 1; the process group is started here if needed) the ranks
    split the work: whole checkpoints per rank when there are at least as many as ranks, else the panel of each
    checkpoint. Rank 0 alone writes the history, in step order, and the numbers are the one-process scan's.
    on_checkpoint(checkpoint, "start" | "skip" | "done") and on_batch(rows_done, rows_total) report progress (on
    rank 0).
    """
    from memwatch.config import AlertConfig
    from memwatch.live.monitor import Monitor, SetupError

    ckpts = find_checkpoints(sources, revisions)
    if not ckpts:
        raise ScanError("nothing to scan")
    if probes is None and sample_from is None:
        raise ScanError("give --probes FILE (a history, a canary manifest or JSONL) or --sample-from DATASET")
    if device_map is not None and device_map not in _DEVICE_MAPS:
        raise ScanError(f"--device-map {device_map!r}: give one of {', '.join(_DEVICE_MAPS)}")
    adapter = adapter_info(ckpts[0], base_model)
    tok = _tokenizer(tokenizer or (ckpts[0].path if ckpts[0].revision is None else None))
    if tok is None and tokenizer is None and adapter is not None:  # an adapter saved without one: its base's
        tok = _tokenizer(adapter["base_model"])
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
    config = _ScanConfig(
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
        adapter=adapter,
    )
    name = run_name or os.path.basename(os.path.normpath(sources[0])) or "scan"
    started, device = _start_distributed(device)
    try:
        return _scan(
            ckpts,
            config,
            Monitor(config, probes=items, canaries=manifest, tokenizer=tok),
            SetupError,
            name=name,
            train_data=train_data,
            loader=_Loader(device, dtype, device_map, base_model),
            on_checkpoint=on_checkpoint,
            on_batch=on_batch,
        )
    finally:
        if started:
            import torch.distributed as dist

            dist.destroy_process_group()


def _scan(
    ckpts: list[Checkpoint],
    config: _ScanConfig,
    monitor: Any,
    setup_error: type[Exception],
    *,
    name: str,
    train_data: Any,
    loader: _Loader,
    on_checkpoint: Callable[[Checkpoint, str], None] | None,
    on_batch: Callable[[int, int], None] | None,
) -> dict[str, Any]:
    from memwatch.live import distributed

    world = distributed.world_size() if distributed.is_distributed() else 1
    rank = distributed.rank() if world > 1 else 0
    main = rank == 0
    history = str(config.history_path)
    group = distributed.host_group()  # objects go over gloo, with a long timeout (None in one process)
    # What is left to scan decides how the ranks split it, and so which model each loads for the setup.
    guess = _recorded_steps(history, name, config.spec()) if main else None
    pending, by_checkpoint = _plan(ckpts, distributed.broadcast(guess, group=group), world)
    first = pending[rank] if by_checkpoint else (pending or ckpts)[0]
    held = _Held(loader)
    created = main and not os.path.exists(history)
    try:
        model = _agreed(lambda: held.get(first), group)
        monitor.setup(model, train_data=train_data, run_name=name, model_name=ckpts[0].label, source="scan")
    except setup_error as exc:
        monitor.close()
        loader.release()
        if created:  # leave no empty history behind for `report` to find
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(OSError):
                    os.remove(history + suffix)
        raise ScanError(str(exc)) from exc
    except BaseException:
        monitor.close()
        loader.release()
        raise
    del model
    # Rank 0 alone holds the history: its answer is every rank's.
    done = distributed.broadcast(monitor.recorded_steps() if main else None, group=group)
    pending, by_checkpoint = _plan(ckpts, done, world)
    skipped = [c.step for c in ckpts if c.step in done]
    if main and on_checkpoint:
        for ckpt in ckpts:
            if ckpt.step in done:
                on_checkpoint(ckpt, "skip")
    scanned: list[int] = []
    try:
        if not by_checkpoint:  # one process, or fewer checkpoints than ranks: every rank measures each one
            for ckpt in pending:
                if main and on_checkpoint:
                    on_checkpoint(ckpt, "start")
                _evaluate(
                    monitor, _agreed(lambda c=ckpt: held.get(c), group), ckpt, on_batch if main else None
                )
                scanned.append(ckpt.step)
                if main and on_checkpoint:
                    on_checkpoint(ckpt, "done")
        else:
            _split_checkpoints(
                monitor, config, pending, held, rank, world, group, scanned, on_checkpoint, on_batch
            )
    finally:
        monitor.close()
        held.ckpt = held.model = None
        loader.release()
    return {
        "history": history,
        "run": name,
        "scanned": scanned,
        "skipped": skipped,
        "probes": len(monitor.panel),
        "processes": world,
        # How the processes shared the work: None in one process (or with nothing left to scan).
        "split": None if world == 1 or not pending else "checkpoints" if by_checkpoint else "probes",
    }


def _split_checkpoints(
    monitor: Any,
    config: _ScanConfig,
    pending: list[Checkpoint],
    held: _Held,
    rank: int,
    world: int,
    group: Any,
    scanned: list[int],
    on_checkpoint: Callable[[Checkpoint, str], None] | None,
    on_batch: Callable[[int, int], None] | None,
) -> None:
    """Each rank measures whole checkpoints, `world` at a time (rank r the r-th of each round); the measurements
    go to every rank, and the monitor records them in step order (rank 0 writes), as one process would."""
    from memwatch.live import distributed

    main = rank == 0
    real = monitor.measure
    measured = _Measured(real)
    monitor.measure = measured
    if main:
        monitor.sinks.insert(0, _MeasuredTime(measured))
    tokens = monitor.panel.tokens(config.prefix_len + config.suffix_len)
    for start in range(0, len(pending), world):
        batch = pending[start : start + world]
        mine = batch[rank] if rank < len(batch) else None

        def measure_mine(mine: Checkpoint | None = mine) -> Any:
            if mine is None:  # the last round has fewer checkpoints than ranks
                return None
            if main and on_checkpoint:
                on_checkpoint(mine, "start")
            args = _measure_args(monitor, len(monitor.evaluated_steps) + rank)
            model = held.get(mine)
            t0 = time.perf_counter()
            try:
                with _one_process():
                    result, extra = real(model, tokens, **args, progress=on_batch if main else None)
            except Exception as exc:
                raise ScanError(
                    f"evaluating {mine.label} (step {mine.step}) failed: {type(exc).__name__}: {exc}"
                ) from exc
            return {k: args[k] for k in _FLAGS}, result, extra, time.perf_counter() - t0

        parts = distributed.all_gather(_agreed(measure_mine, group), group=group)
        for ckpt, part in zip(batch, parts, strict=False):
            measured.next = part
            # The model matters only to the first evaluation's reference measurement (a PEFT model's base, the
            # same on every rank), which every rank takes part in, each with the model it holds.
            _evaluate(monitor, held.model, ckpt, None)
            scanned.append(ckpt.step)
            if main and on_checkpoint:
                on_checkpoint(ckpt, "done")


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
