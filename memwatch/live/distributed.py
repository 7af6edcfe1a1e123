"""Rank and world helpers: shard the panel, gather results to rank 0 in probe order, broadcast decisions."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

__all__ = [
    "Sync",
    "all_gather",
    "broadcast",
    "host_group",
    "is_distributed",
    "is_main_process",
    "needs_synced_forward",
    "rank",
    "shard",
    "world_size",
]


def _dist() -> Any:
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch is a dependency
        return None
    return dist if dist.is_available() and dist.is_initialized() else None


def is_distributed() -> bool:
    dist = _dist()
    return dist is not None and dist.get_world_size() > 1


def rank() -> int:
    """This process's global rank (0 without torch.distributed; RANK from the launcher before init)."""
    dist = _dist()
    if dist is not None:
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    dist = _dist()
    if dist is not None:
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return rank() == 0


def shard(n: int, world: int, r: int) -> tuple[np.ndarray, int]:
    """Row indices for rank r: contiguous shards of equal size ceil(n / world), the last padded by repeating its
    final row (or row 0), so every rank runs the same number of forward calls. Returns (indices, real rows)."""
    size = -(-n // world) if n else 0
    start, stop = r * size, min(n, (r + 1) * size)
    idx = np.arange(start, max(start, stop))
    real = len(idx)
    if real < size:
        pad_row = idx[-1] if real else 0
        idx = np.concatenate([idx, np.full(size - real, pad_row)]).astype(np.int64)
    return idx, real


def broadcast(obj: Any, src: int = 0, group: Any = None) -> Any:
    """Rank src's object on every rank (identity without torch.distributed)."""
    dist = _dist()
    if dist is None or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def all_gather(obj: Any, group: Any = None) -> list[Any]:
    """Every rank's object on every rank, in rank order ([obj] without torch.distributed)."""
    dist = _dist()
    if dist is None or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=group)
    return out


# Long host-side work on rank 0 (indexing a training set before the first step) would outlast the default group's
# timeout (10 minutes under NCCL) while the other ranks wait; objects sent over NCCL also pass through GPU memory.
LONG_TIMEOUT_S = 6 * 3600


def host_group() -> Any:
    """A gloo process group with a long timeout for objects that live on the host (the n-gram index's batches and
    counts); None without torch.distributed, or where gloo is missing (the default group then). Collective: every
    rank calls it, at the same point."""
    dist = _dist()
    if dist is None or dist.get_world_size() == 1:
        return None
    import datetime

    try:
        return dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=LONG_TIMEOUT_S))
    except Exception:  # a build without gloo: the default group still works, with its own timeout
        return None


def needs_synced_forward(model: Any) -> bool:
    """True when every rank must take part in every forward: sharded parameters (FSDP 1/2, DeepSpeed ZeRO-3)."""
    if not is_distributed():
        return False
    for mod in model.modules() if hasattr(model, "modules") else []:
        name = type(mod).__name__
        if name == "FullyShardedDataParallel" or name.startswith(
            "FSDP"
        ):  # FSDP1 wrapper, FSDP2 FSDPModule classes
            return True
        if hasattr(mod, "ds_id") or any(hasattr(p, "ds_id") for p in mod.parameters(recurse=False)):  # ZeRO-3
            return True
    return False


class Sync:
    """Agreement between ranks for synced forwards: every rank runs the same number of forward calls.

    Under FSDP / ZeRO-3 each forward gathers parameters collectively, so a rank that stops early would leave the
    others waiting. Like `generate(synced_gpus=True)`, ranks agree on the largest count and the ones with less
    work run dummy forwards until everyone is done.
    """

    def __init__(self, device: Any) -> None:
        self.device = device

    def max(self, value: int) -> int:
        import torch
        import torch.distributed as dist

        t = torch.tensor([int(value)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def min(self, value: int) -> int:
        import torch
        import torch.distributed as dist

        t = torch.tensor([int(value)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())
