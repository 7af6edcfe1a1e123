"""The fast extraction engine of DESIGN.md §3: batched greedy extraction with memorization and entropy metrics."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from memwatch.engine.modeling import (
    ModelInfo,
    generation_scope,
    inspect_model,
    output_cache,
    preserved_state,
    reusable_cache,
)
from memwatch.engine.result import ExtractionResult
from memwatch.signals import extraction as metrics

__all__ = ["ExtractionResult", "extract", "resolve_amp_dtype", "suffix_nll_after_prefix", "tie_threshold"]

MODES = ("full", "exact")
# How diverged rows were decoded (ExtractionResult.decoding), in the order ranks agree on under `sync`: a rank
# with nothing to decode joins the others' path, and one that cannot reuse its cache moves every rank to recompute.
PATHS = ("none", "cache-reuse", "recompute")
DEFAULT_ENTROPY_WINDOW = 16  # DESIGN.md §5; capped at prefix_len - 1 when the prefix is shorter
# A greedy step is a near tie when its top-1/top-2 logit margin is below this many units in the last place of the
# top logit in the compute dtype: a different but equally valid summation order (our single pass vs. `generate`'s
# step by step) moves logits by about that much, so it may then pick the other token.
TIE_ULPS = 4
_MANTISSA_BITS = {torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}
# CPU batches beyond this size stop paying off, and a training process's host memory is not ours to take.
_CPU_BUDGET_BYTES = 1 << 30
# On CPU, throughput drops once a layer's widest activation ([rows, k+m, MLP width]) outgrows the caches:
# measured 30-50% slower per token at 64 MiB than at 32 MiB for two GPT-2 sizes (benchmarks/README.md).
_CPU_ACTIVATION_BYTES = 32 << 20
# On CUDA, the share of free memory (driver-free plus the allocator's cached-but-unused) an extraction may use.
_CUDA_BUDGET_SHARE = 0.5
# fp32 working set for the statistics (shifted logits and their exponentials); logits are processed in row
# chunks of at most this size.
_STATS_BYTES = 256 << 20


def _empty(k: int, m: int, w: int, mode: str, token_stats: bool = False) -> ExtractionResult:
    full = mode == "full"
    per_token = np.zeros((0, k + m - 1), np.float32) if token_stats else None
    return ExtractionResult(
        prefix_len=k,
        suffix_len=m,
        entropy_window=w,
        mode=mode,
        generated=np.zeros((0, m), np.int64) if full else None,
        exact=np.zeros(0, bool),
        match_ratio=np.zeros(0, np.float32) if full else None,
        match_count=np.zeros(0, np.int64) if full else None,
        prefix_match_len=np.zeros(0, np.int64),
        edit_similarity=np.zeros(0, np.float32) if full else None,
        entropy=np.zeros((0, w + m), np.float32),
        suffix_nll=np.zeros(0, np.float32),
        near_tie=np.zeros(0, bool),
        decoding="none",
        token_logprobs=per_token,
        token_logp_mean=per_token,
        token_logp_var=per_token,
    )


def resolve_amp_dtype(amp_dtype: str | torch.dtype | None) -> torch.dtype | None:
    """Map "bf16"/"fp16"/"fp32"/None or a torch dtype to the autocast dtype (None: run in the model's dtype)."""
    names = {
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
        torch.bfloat16: torch.bfloat16,
        "fp16": torch.float16,
        "float16": torch.float16,
        torch.float16: torch.float16,
        "fp32": None,
        "float32": None,
        "none": None,
        torch.float32: None,
        None: None,
    }
    key = amp_dtype.lower() if isinstance(amp_dtype, str) else amp_dtype
    if key not in names:
        raise ValueError(
            f"amp_dtype must be None, 'bf16', 'fp16' or 'fp32' (or the torch dtype); got {amp_dtype!r}"
        )
    return names[key]


def _as_tensor(sequences: object, need: int) -> torch.Tensor:
    """[N, need] int64 CPU tensor of the first `need` tokens of each row; ValueError naming short rows."""
    if isinstance(sequences, torch.Tensor | np.ndarray):
        t = torch.as_tensor(sequences)
        if t.ndim != 2:
            raise ValueError(f"sequences must be 2-D [N, L] token ids; got shape {tuple(t.shape)}")
        if t.dtype.is_floating_point or t.dtype == torch.bool or t.is_complex():
            raise ValueError(f"sequences must hold integer token ids; got dtype {t.dtype}")
        if t.shape[0] and t.shape[1] < need:
            raise ValueError(
                f"every sequence needs at least prefix_len + suffix_len = {need} tokens; all {t.shape[0]} rows "
                f"have {t.shape[1]}. Use longer probes or a smaller prefix_len/suffix_len."
            )
        return t[:, :need].to(device="cpu", dtype=torch.long)
    try:
        rows = [list(r) for r in sequences]  # type: ignore[union-attr]
    except TypeError as exc:
        raise ValueError(
            "sequences must be a LongTensor [N, L], a numpy array or a list of token-id lists"
        ) from exc
    short = [(i, len(r)) for i, r in enumerate(rows) if len(r) < need]
    if short:
        shown = ", ".join(f"row {i} has {n}" for i, n in short[:10])
        more = f" (and {len(short) - 10} more)" if len(short) > 10 else ""
        raise ValueError(
            f"every sequence needs at least prefix_len + suffix_len = {need} tokens; {shown}{more}. "
            "Drop or lengthen those rows, or use a smaller prefix_len/suffix_len."
        )
    if not rows:
        return torch.zeros((0, need), dtype=torch.long)
    try:
        return torch.tensor([r[:need] for r in rows], dtype=torch.long)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"sequences must hold integer token ids: {exc}") from exc


def _row_bytes(info: ModelInfo, k: int, m: int, w: int, mode: str, act_bytes: int) -> int:
    """Rough peak device memory one row of a batch costs (no grad), for the automatic batch size."""
    seq = k + m - 1
    cache_len = seq + (m if mode == "full" else 0)
    kv = 2 * info.n_layers * cache_len * info.kv_dim * act_bytes if mode == "full" else 0
    # Inside one layer: residual, attention in/out and the MLP's widest activations, plus eager attention scores.
    act = seq * (4 * info.hidden_size + 2 * info.intermediate_size) * act_bytes + info.n_heads * seq * seq * 4
    n_logits = (w + m) if info.logits_kwarg else seq
    logits = n_logits * info.vocab_size * (act_bytes + 4)  # model-dtype logits and their fp32 copy
    return int(1.5 * (kv + act + logits)) + 1


def _auto_batch_size(
    info: ModelInfo, n: int, k: int, m: int, w: int, mode: str, act_bytes: int, budget: int | None
) -> int:
    if budget is None:
        if info.device.type == "cuda":
            free, _total = torch.cuda.mem_get_info(info.device)
            cached = torch.cuda.memory_reserved(info.device) - torch.cuda.memory_allocated(info.device)
            budget = int(_CUDA_BUDGET_SHARE * (free + cached))
        else:
            budget = _CPU_BUDGET_BYTES
    rows = budget // _row_bytes(info, k, m, w, mode, act_bytes)
    if info.device.type == "cpu":
        width = max(info.intermediate_size, 4 * info.hidden_size, 1)
        rows = min(rows, _CPU_ACTIVATION_BYTES // ((k + m - 1) * width * act_bytes))
    return max(1, min(n, rows))


def tie_threshold(top: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The default near-tie threshold for top-1 logits `top` [...] computed in `dtype`, as float32 [...].

    TIE_ULPS units in the last place of max(|top|, 1) in that format: TIE_ULPS * 2**(floor(log2 x) - mantissa
    bits). Relative, because a format's resolution is (bf16 logits in [32, 64) lie 0.25 apart); floored at
    magnitude 1, because a logit near zero is a sum of larger terms and carries their rounding error.
    """
    bits = _MANTISSA_BITS.get(dtype, _MANTISSA_BITS[torch.float32])
    # frexp is exact: x = f * 2**e with f in [0.5, 1), so floor(log2 x) = e - 1 (log2 may round up below 2**n).
    _, exponent = torch.frexp(top.float().abs().clamp(min=1.0))
    return TIE_ULPS * torch.exp2((exponent - 1 - bits).float())


@dataclass(frozen=True)
class _TieRule:
    """Which top-1/top-2 margins are near ties: below `margin` when the caller set one, else tie_threshold."""

    dtype: torch.dtype
    margin: float | None = None

    def __call__(self, margin: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
        limit = self.margin if self.margin is not None else tie_threshold(top, self.dtype)
        return margin < limit


class _Stats(NamedTuple):
    """fp32 statistics of a next-token distribution, one value per position."""

    entropy: torch.Tensor  # nats
    argmax: torch.Tensor  # first maximal index, as `generate`'s torch.argmax
    margin: torch.Tensor  # top-1 minus top-2 logit (inf for a one-token vocabulary)
    top: torch.Tensor  # top-1 logit
    nll: torch.Tensor | None  # -log p(target), when targets were given
    logp_var: torch.Tensor | None = None  # variance of log p under p itself, when moments were asked for


def _forward(
    info: ModelInfo,
    n_keep: int | None,
    cache: object = None,
    hidden: list[torch.Tensor] | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, object]:
    """Call the model, passing `cache` under the name this transformers version takes; return the logits for the
    last `n_keep` positions (all if None) and the cache the model returned (None if it returned none). With a
    `hidden` list, the last layer's hidden states [B, T, H] are appended to it."""
    if n_keep is not None and info.logits_kwarg is not None:
        kwargs[info.logits_kwarg] = n_keep
    if cache is not None:
        kwargs[str(info.cache_kwarg)] = cache
    if hidden is not None:
        kwargs["output_hidden_states"] = True
    out = info.call(return_dict=True, **kwargs)
    if hidden is not None:
        hidden.append(out.hidden_states[-1])
    logits = out.logits
    if n_keep is not None and logits.shape[1] != n_keep:
        logits = logits[:, -n_keep:]
    return logits, output_cache(out, info.model)


def _stats(
    logits: torch.Tensor,
    targets: torch.Tensor | None = None,
    *,
    consume: bool = False,
    moments: bool = False,
) -> _Stats:
    """fp32 statistics of logits [..., V] (and the NLL of `targets` [...]), with no host sync.

    consume: the caller no longer needs `logits`, so fp32 logits may be overwritten (one [..., V] allocation
    fewer, which is much of the cost on CPU); other dtypes are copied to fp32 anyway.
    """
    with torch.autocast(device_type=logits.device.type, enabled=False):  # fp32 even inside an autocast region
        lf = logits.float()
        return _stats_fp32(lf, targets, in_place=consume or lf is not logits, moments=moments)


def _stats_fp32(
    lf: torch.Tensor, targets: torch.Tensor | None, in_place: bool, moments: bool = False
) -> _Stats:
    """Everything from max-shifted logits z = logits - max <= 0: log-sum-exp minus max is log sum(e^z) in
    [0, log V], entropy = log sum(e^z) - sum(e^z z) / sum(e^z) and NLL = log sum(e^z) - z_target. Unshifted,
    lse - sum(p * logits) subtracts two numbers of the logits' size and loses 1e-3 nats at |logits| ~ 50 in fp32."""
    top, argmax = lf.max(dim=-1)  # first maximal index, as `generate`'s torch.argmax
    z = lf.sub_(top.unsqueeze(-1)) if in_place else lf - top.unsqueeze(-1)  # [..., V]
    z_target = None if targets is None else z.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    # z's top entry is exactly 0, so minus its second is the top-1/top-2 margin, rounded as top - second would be.
    margin = -z.topk(2, dim=-1).values[..., 1] if z.shape[-1] >= 2 else torch.full_like(top, math.inf)
    e = z.exp()  # [..., V], in [0, 1]
    sum_e = e.sum(dim=-1)
    log_sum = sum_e.log()
    # A masked entry (-inf logit) has e = 0; a finite stand-in for its z makes its e * z term 0 rather than nan.
    # sum(e * z) in place and by torch's cascaded sum: a batched dot product accumulates 1e-4 nats of fp32 error
    # over a 32k vocabulary.
    z = z.clamp_(min=torch.finfo(z.dtype).min)
    logp_var = None
    if moments:
        # Var_p(log p) = Var_p(z) = E_p[z^2] - E_p[z]^2 (log p and z differ by a constant); z <= 0 is bounded by
        # the logits' spread, so the difference loses nothing that matters next to the floor min-k%++ clamps at.
        ez_t = z * e  # [..., V]
        ez = ez_t.sum(dim=-1)
        mean_z = ez / sum_e
        logp_var = (ez_t.mul_(z).sum(dim=-1) / sum_e - mean_z * mean_z).clamp_(min=0.0)
        del ez_t
    else:
        ez = z.mul_(e).sum(dim=-1)
    entropy = log_sum - ez / sum_e
    nll = None if z_target is None else log_sum - z_target
    return _Stats(entropy, argmax, margin, top, nll, logp_var)


class _Batch:
    """The fp32 outcome of one batch, on device until the end of the batch (one host sync per batch)."""

    def __init__(self, x: torch.Tensor, m: int, w: int, t: int = 0) -> None:
        b = x.shape[0]
        dev = x.device
        # Per-token statistics over the whole window (t = k + m - 1 positions; 0 when not asked for): log p of
        # each true token, and the mean and variance of log p under the model's own distribution there.
        self.tokens = (
            (torch.zeros(b, t, device=dev), torch.zeros(b, t, device=dev), torch.zeros(b, t, device=dev))
            if t
            else None
        )
        self.hidden_prefix: torch.Tensor | None = None  # [B, H] when asked for
        self.entropy = torch.zeros(b, w + m, device=dev)
        self.nll = torch.zeros(b, m, device=dev)
        self.tf_argmax = torch.zeros(b, m, dtype=torch.long, device=dev)
        self.tf_tie = torch.zeros(b, m, dtype=torch.bool, device=dev)
        self.cache: object = None  # the teacher-forced pass's cache, handed to decoding (which drops it)


def _teacher_forced(
    info: ModelInfo,
    x: torch.Tensor,
    k: int,
    m: int,
    w: int,
    tie: _TieRule,
    use_cache: bool,
    token_stats: bool = False,
    hidden_prefix: bool = False,
) -> _Batch:
    """One teacher-forced pass over x[:, :k+m-1]: logits only for the last w+m positions (all k+m-1 with
    token_stats); with hidden_prefix, the last layer's hidden state mean-pooled over the k prefix positions.
    x: [B, k+m]."""
    keep = k + m - 1 if token_stats else w + m
    hidden: list[torch.Tensor] | None = [] if hidden_prefix else None
    logits, cache = _forward(
        info, keep, hidden=hidden, input_ids=x[:, : k + m - 1], use_cache=use_cache
    )  # [B, keep, V]
    out = _Batch(x, m, w, keep if token_stats else 0)
    out.cache = cache
    if hidden:
        out.hidden_prefix = hidden[0][:, :k].float().mean(dim=1).half()  # [B, H], float16 to keep it small
        del hidden
    b, p, v = logits.shape
    # fp32 shifted logits and their exponentials (and z * e for the moments)
    chunk = max(1, _STATS_BYTES // max(1, (3 if token_stats else 2) * 4 * p * v))
    targets = x[:, k + m - keep :]  # [B, keep]: the token each scored position predicts
    ent, suf = (
        keep - (w + m),
        keep - m,
    )  # where the entropy profile and the suffix start among the kept positions
    for s in range(0, b, chunk):
        sl = slice(s, s + chunk)
        st = _stats(logits[sl], targets[sl], consume=True, moments=token_stats)
        out.entropy[sl] = st.entropy[:, ent:]
        out.tf_argmax[sl] = st.argmax[:, suf:]
        out.tf_tie[sl] = tie(st.margin[:, suf:], st.top[:, suf:])
        out.nll[sl] = st.nll[:, suf:]  # type: ignore[index]
        if out.tokens is not None:
            logp, mean, var = out.tokens
            logp[sl] = -st.nll  # type: ignore[operator]
            mean[sl] = -st.entropy  # sum_v p log p = -H
            var[sl] = st.logp_var
        del st
    del logits
    return out


def _select_cache_rows(cache: object, rows: torch.Tensor) -> object:
    """Keep only `rows` (batch indices) of a plain KV cache (see modeling.reusable_cache)."""
    if isinstance(cache, tuple | list):  # legacy ((k, v), ...) per layer
        return tuple(tuple(t.index_select(0, rows) for t in layer) for layer in cache)
    cache.batch_select_indices(rows)  # type: ignore[attr-defined]
    return cache


def _crop_cache(cache: object, n_remove: int) -> object:
    """Drop the last `n_remove` slots of a plain KV cache."""
    if n_remove <= 0:
        return cache
    if isinstance(cache, tuple | list):
        return tuple(tuple(t[..., :-n_remove, :] for t in layer) for layer in cache)
    cache.crop(-n_remove)  # type: ignore[attr-defined]  # negative: "remove this many", in every version
    return cache


def _choose_path(info: ModelInfo, cache: object, steps: list[int], k: int, m: int) -> str:
    """How to decode rows needing `steps` (ascending) greedy steps: "none", "cache-reuse" or "recompute".

    Reusing the teacher-forced cache needs a plain append buffer (cropped to the latest divergence, rows selected,
    then extended to the slot count below) passed back under a known name. Rows diverging at different points
    leave stale slots that are masked out, which keeps positions right only if the model takes position ids
    (ALiBi models such as MPT otherwise measure distances from physical slots). Anything else is recomputed.
    """
    if not steps:
        return "none"
    d_max = m - 1 - steps[0]
    slots = k + d_max + steps[-1]  # cropped to k + d_max, then one slot per step
    reusable = (
        cache is not None and info.cache_kwarg is not None and reusable_cache(cache, info.config, slots)
    )
    if reusable and (steps[0] == steps[-1] or info.takes_position_ids):
        return "cache-reuse"
    return "recompute"


def _require_generate(info: ModelInfo, cache: object) -> None:
    """Refuse, naming the architecture, a model that can neither reuse its cache nor `generate`."""
    can_generate = getattr(info.model, "can_generate", None)
    if not (callable(can_generate) and can_generate()):
        why = "returns no cache" if cache is None else f"returns a {type(cache).__name__} it cannot reuse"
        raise TypeError(
            f"memwatch cannot decode {info.class_name}: it {why} (cropped, row-selected and extended in "
            "place), and has no `generate` to recompute the continuations with."
        )


def _decode_from_cache(
    info: ModelInfo,
    cache: object,
    order: torch.Tensor,
    steps: list[int],
    first_miss: torch.Tensor,
    gen: torch.Tensor,
    out: _Batch,
    k: int,
    w: int,
    tie: _TieRule,
    near_tie: torch.Tensor,
) -> None:
    """The fast path: greedy decoding of rows `order` from their divergence points, on the teacher-forced cache.

    The cache holds k+m-1 slots of the true sequence. A row that first misses at suffix index d is valid on slots
    [0, k+d); the cache is cropped to k + max(d) and, where rows diverged at different points, the stale slots
    [k+d, k+max(d)) are masked out while decoding appends after them with position ids that continue from k+d.
    When every row diverged at the same point (the common case) there is no mask at all and each step is exactly
    `generate`'s step. Rows come ordered by how many steps they need (`steps`, ascending), so finished rows drop
    off the front without a host sync. Makes steps[-1] forward calls.
    """
    m = gen.shape[1]
    cache = _select_cache_rows(cache, order)
    rows = order  # batch indices of live rows, fewest steps first
    d = first_miss[rows]
    d_max = m - 1 - steps[0]  # fewest steps = latest divergence
    cache = _crop_cache(cache, m - 1 - d_max)
    slots = k + d_max
    n_steps = steps[-1]
    mask = None
    if steps[0] != n_steps:
        # Attention mask over physical cache slots: [k+d, slots) holds the true suffix, not the greedy path.
        slot_idx = torch.arange(slots + n_steps, device=gen.device)
        mask = ((slot_idx < (k + d).unsqueeze(1)) | (slot_idx >= slots)).long()  # [R, slots + n_steps]
    token = gen[rows, d]  # the divergent greedy token, fed first
    pos = k + d
    dropped = 0
    for t in range(n_steps):
        extra = {"position_ids": pos.unsqueeze(1)} if info.takes_position_ids else {}
        logits, cache = _forward(
            info,
            1,
            cache=cache,
            input_ids=token.unsqueeze(1),
            attention_mask=None if mask is None else mask[:, : slots + t + 1],
            use_cache=True,
            **extra,
        )
        st = _stats(logits[:, -1], consume=True)
        col = d + t + 1  # suffix index this step predicts, [R]
        gen[rows, col] = st.argmax
        out.entropy[rows, w + col] = st.entropy
        near_tie[rows] |= tie(st.margin, st.top)
        token, pos = st.argmax, pos + 1
        # Rows whose last suffix token was just produced leave; they are at the front by construction.
        done = 0
        while dropped + done < len(steps) and steps[dropped + done] == t + 1:
            done += 1
        if done and t + 1 < n_steps:
            keep = torch.arange(done, rows.shape[0], device=gen.device)
            cache = _select_cache_rows(cache, keep)
            rows, d, token, pos = rows[done:], d[done:], token[done:], pos[done:]
            if mask is not None:
                mask = mask[done:]
        dropped += done


class _StepStats:
    """A logits processor for `generate` that records each step's fp32 statistics and leaves the scores as
    they are (never keeping [N, m, V] logits)."""

    def __init__(self, tie: _TieRule) -> None:
        self.tie = tie
        self.entropy: list[torch.Tensor] = []  # per step, [R]
        self.ties: list[torch.Tensor] = []  # per step, [R]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        st = _stats(scores)
        self.entropy.append(st.entropy)
        self.ties.append(self.tie(st.margin, st.top))
        return scores


def _generate(
    info: ModelInfo, start: torch.Tensor, n_new: int, recorder: _StepStats | None, synced: bool
) -> torch.Tensor:
    """Plain greedy `generate` of n_new tokens after `start` [R, L]: no EOS stop, no processor but `recorder`.
    Returns [R, L + n_new]."""
    from transformers import LogitsProcessorList

    with generation_scope(info, max_new_tokens=n_new, do_sample=False, num_beams=1, use_cache=True) as config:
        return info.model.generate(  # type: ignore[operator]
            start,
            attention_mask=torch.ones_like(start),
            generation_config=config,
            logits_processor=LogitsProcessorList([recorder] if recorder is not None else []),
            synced_gpus=synced,
        )


def _decode_by_generate(
    info: ModelInfo,
    x: torch.Tensor,
    order: torch.Tensor,
    points: list[int],
    first_miss: torch.Tensor,
    gen: torch.Tensor,
    out: _Batch,
    k: int,
    w: int,
    tie: _TieRule,
    near_tie: torch.Tensor,
    synced: bool,
) -> None:
    """The slower path, for caches that cannot be cropped or row-selected: for each divergence point d in `points`,
    `generate` itself continues x[:, :k+d] plus the divergent greedy token for the remaining m-1-d tokens."""
    m = gen.shape[1]
    d_rows = first_miss[order]
    for d in points:
        rows = order[d_rows == d]
        start = torch.cat([x[rows, : k + d], gen[rows, d : d + 1]], dim=1)  # [R, k+d+1]
        n_new = m - 1 - d
        recorder = _StepStats(tie)
        seqs = _generate(info, start, n_new, recorder, synced)
        gen[rows, d + 1 :] = seqs[:, k + d + 1 :]
        out.entropy[rows, w + d + 1 :] = torch.stack(recorder.entropy[:n_new], dim=1)
        near_tie[rows] |= torch.stack(recorder.ties[:n_new], dim=1).any(dim=1)


def _decode(
    info: ModelInfo,
    x: torch.Tensor,
    first_miss: torch.Tensor,
    gen: torch.Tensor,
    out: _Batch,
    k: int,
    w: int,
    tie: _TieRule,
    near_tie: torch.Tensor,
    sync: Any,
) -> str:
    """Greedy decoding of the rows that diverged before the last token; returns the path taken for this batch.

    gen: [B, m] greedy tokens, filled up to each row's divergence point on entry and completed here. Under
    `sync`, ranks agree on the path and pad to the same number of forward (or `generate`) calls.
    """
    m = gen.shape[1]
    cache, out.cache = out.cache, None  # ours alone now, so the slower path can free it
    need = (m - 1 - first_miss).clamp(min=0)  # [B] decoding steps per row
    todo = torch.nonzero(need > 0).flatten()
    order = todo[torch.argsort(need[todo], stable=True)]  # fewest steps first
    steps = need[order].tolist()  # one host sync per batch: the step counts decide the loop shape
    path = _choose_path(info, cache, steps, k, m)
    # Under sync, ranks agree on the path and on the number of calls before any call: a collective of our own
    # issued while another rank is inside a forward (or `generate`'s synced loop) would not line up with it.
    agreed = PATHS[sync.max(PATHS.index(path))] if sync is not None else path
    if agreed == "cache-reuse":
        calls = steps[-1] if steps else 0
        padding = (sync.max(calls) if sync is not None else calls) - calls
        if steps:
            _decode_from_cache(info, cache, order, steps, first_miss, gen, out, k, w, tie, near_tie)
        for _ in range(padding):
            _dummy_forward(info)
    elif agreed == "recompute":
        _require_generate(info, cache)  # after the agreement, so that every rank refuses alike
        del cache
        points = sorted({m - 1 - s for s in steps})  # one `generate` call per divergence point
        padding = (sync.max(len(points)) if sync is not None else len(points)) - len(points)
        _decode_by_generate(
            info, x, order, points, first_miss, gen, out, k, w, tie, near_tie, sync is not None
        )
        for _ in range(padding):
            _generate(info, torch.zeros((1, 1), dtype=torch.long, device=info.device), 1, None, True)
    return agreed if steps else "none"


def _dummy_forward(info: ModelInfo) -> None:
    """A forward call that only keeps a synced rank in step with the others (FSDP / ZeRO-3 gather in forward)."""
    info.call(
        input_ids=torch.zeros((1, 1), dtype=torch.long, device=info.device), use_cache=False, return_dict=True
    )


def _run_batch(
    info: ModelInfo,
    x: torch.Tensor,
    k: int,
    m: int,
    w: int,
    mode: str,
    tie: _TieRule,
    sync: Any = None,
    token_stats: bool = False,
    hidden_prefix: bool = False,
) -> tuple[dict[str, np.ndarray], str]:
    full = mode == "full"
    out = _teacher_forced(
        info, x, k, m, w, tie, use_cache=full, token_stats=token_stats, hidden_prefix=hidden_prefix
    )
    suffix = x[:, k:]
    hit = out.tf_argmax == suffix  # [B, m] teacher-forced argmax equals the true token
    all_hit = hit.all(dim=1)
    first_miss = torch.where(all_hit, m, (~hit).long().argmax(dim=1))  # [B] = prefix_match_len
    cols = torch.arange(m, device=x.device)
    # Greedy steps up to and including the divergence are exactly the teacher-forced argmaxes.
    greedy_known = cols.unsqueeze(0) <= first_miss.unsqueeze(1)  # [B, m]
    near_tie = (out.tf_tie & greedy_known).any(dim=1)
    result = {
        "exact": all_hit,
        "prefix_match_len": first_miss,
        "suffix_nll": out.nll.mean(dim=1),
    }
    decoding = "none"
    if full:
        gen = torch.where(cols.unsqueeze(0) < first_miss.unsqueeze(1), suffix, out.tf_argmax)
        decoding = _decode(info, x, first_miss, gen, out, k, w, tie, near_tie, sync)
        result["generated"] = gen
    result["entropy"] = out.entropy
    result["near_tie"] = near_tie
    if out.tokens is not None:
        result["token_logprobs"], result["token_logp_mean"], result["token_logp_var"] = out.tokens
    if out.hidden_prefix is not None:
        result["hidden_prefix"] = out.hidden_prefix
    return {name: t.cpu().numpy() for name, t in result.items()}, decoding


def extract(
    model: nn.Module,
    sequences: torch.Tensor | np.ndarray | Sequence[Sequence[int]],
    *,
    prefix_len: int = 32,
    suffix_len: int = 32,
    entropy_window: int | None = None,
    batch_size: int | None = None,
    mode: str = "full",
    amp_dtype: str | torch.dtype | None = None,
    tie_margin: float | None = None,
    memory_budget: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    sync: Any = None,
    token_stats: bool = False,
    hidden_prefix: bool = False,
) -> ExtractionResult:
    """Greedy extraction of each sequence's suffix from its prefix, with memorization and entropy metrics.

    Args:
        model: a Hugging Face causal LM (possibly wrapped by DDP, torch.compile or Accelerate). Left as found.
        sequences: LongTensor [N, L], numpy array or list of token-id lists with L >= prefix_len + suffix_len;
            the first prefix_len + suffix_len tokens of each row are used.
        prefix_len: k, the tokens given to the model.
        suffix_len: m, the tokens it must reproduce greedily.
        entropy_window: w <= k - 1, prefix positions in the entropy profile before the boundary; None gives
            min(16, k - 1) (DESIGN.md §5: w = 16).
        batch_size: rows per forward; None picks one from a memory budget.
        mode: "full" (everything) or "exact" (one teacher-forced pass; no `generated`, `match_ratio`,
            `edit_similarity`).
        amp_dtype: None (the model's dtype), "bf16" or "fp16": autocast for the forward passes. Log-softmax and
            all statistics are computed in fp32 regardless.
        tie_margin: an absolute top-1/top-2 logit margin under which a greedy step counts as a near tie; None
            (default) uses `tie_threshold`: TIE_ULPS units in the last place of the top logit in the compute dtype.
        memory_budget: bytes the automatic batch size may plan for (default: 1 GiB on CPU, half the free
            memory on CUDA).
        progress: called as progress(rows_done, rows_total) after each batch.
        sync: a memwatch.live.distributed.Sync when parameters are sharded (FSDP, ZeRO-3): ranks agree on the batch
            size and on the number of forward calls, padding with dummy forwards, like generate(synced_gpus=True).
        token_stats: also the per-token statistics of the whole window from the same teacher-forced pass (logits
            kept at all k + m - 1 positions): `token_logprobs`, `token_logp_mean`, `token_logp_var` (the
            membership signals' product).
        hidden_prefix: also the last layer's hidden state mean-pooled over each prefix, from the same pass
            (`hidden_prefix`, float16 [N, H]: the embedding view).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
    if entropy_window is None and isinstance(prefix_len, int):
        entropy_window = max(0, min(DEFAULT_ENTROPY_WINDOW, prefix_len - 1))
    for name, value, low in (
        ("prefix_len", prefix_len, 1),
        ("suffix_len", suffix_len, 1),
        ("entropy_window", entropy_window, 0),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}; got {value!r}")
    k, m, w = prefix_len, suffix_len, entropy_window
    if w > k - 1:
        raise ValueError(
            f"entropy_window must be at most prefix_len - 1 = {k - 1} (the first token has no prediction); got {w}"
        )
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be None (automatic) or a positive integer; got {batch_size!r}")
    amp = resolve_amp_dtype(amp_dtype)
    info = inspect_model(model)
    if info.position_limit is not None and k + m > info.position_limit:
        raise ValueError(
            f"prefix_len + suffix_len = {k + m} exceeds {info.class_name}'s position limit of "
            f"{info.position_limit} tokens; use a smaller prefix_len/suffix_len."
        )
    x_all = _as_tensor(sequences, k + m)
    n = x_all.shape[0]
    if n == 0:
        return _empty(k, m, w, mode, token_stats)
    lo, hi = int(x_all.min()), int(x_all.max())
    if lo < 0 or hi >= info.vocab_size:
        raise ValueError(
            f"token ids must lie in [0, {info.vocab_size}) for {info.class_name} (vocab_size {info.vocab_size}); "
            f"got values from {lo} to {hi}. Were the probes tokenized with another tokenizer?"
        )
    compute_dtype = amp or info.param_dtype
    tie = _TieRule(compute_dtype, None if tie_margin is None else float(tie_margin))
    act_bytes = torch.finfo(compute_dtype).bits // 8 if compute_dtype.is_floating_point else 4
    # With token statistics, logits are kept at every position: plan memory as for the widest entropy window.
    planned_w = k - 1 if token_stats else w
    bs = batch_size or _auto_batch_size(info, n, k, m, planned_w, mode, act_bytes, memory_budget)
    extra_batches = 0
    if sync is not None:  # every rank runs the same batches and forward calls
        bs = sync.min(bs)
        extra_batches = sync.max(-(-n // bs)) - (-(-n // bs))
    autocast = (
        torch.autocast(device_type=info.device.type, dtype=amp)
        if amp is not None
        else contextlib.nullcontext()
    )
    parts: list[dict[str, np.ndarray]] = []
    paths: list[str] = []
    with preserved_state(model), autocast:
        for start in range(0, n, bs):
            x = x_all[start : start + bs].to(info.device, non_blocking=True)
            part, path = _run_batch(info, x, k, m, w, mode, tie, sync, token_stats, hidden_prefix)
            parts.append(part)
            paths.append(path)
            if progress is not None:
                progress(min(start + bs, n), n)
        for _ in range(extra_batches):  # another rank has more batches: join its forward calls, keep nothing
            _run_batch(info, x_all[:1].to(info.device), k, m, w, mode, tie, sync, token_stats, hidden_prefix)
    return _assemble(parts, paths, x_all[:, k:].numpy(), k, m, w, mode)


def _repeat_cache(cache: object, n: int) -> object:
    """A fresh copy of a batch-1 KV cache repeated n times along the batch (the original is left intact)."""
    import copy

    if isinstance(cache, tuple | list):
        return tuple(tuple(t.expand(n, *t.shape[1:]).contiguous() for t in layer) for layer in cache)
    fresh = copy.deepcopy(cache)
    fresh.batch_repeat_interleave(n)
    return fresh


def suffix_nll_after_prefix(
    model: nn.Module,
    prefix: Sequence[int] | np.ndarray | torch.Tensor,
    suffixes: Sequence[Sequence[int]] | np.ndarray | torch.Tensor,
    *,
    batch_size: int | None = None,
    amp_dtype: str | torch.dtype | None = None,
    sync: Any = None,
) -> np.ndarray:
    """Mean teacher-forced NLL of each suffix [R, m] after one shared prefix [k]. float32 [R].

    The same teacher-forced pass as `extract`, with the prefix computed once: each suffix costs m tokens instead
    of k + m (exposure ranks a canary's secret among many references after the same prefix). Leaves the model
    as found.
    """
    info = inspect_model(model)
    p = torch.as_tensor(np.asarray(prefix), dtype=torch.long).reshape(1, -1)
    sfx = torch.as_tensor(np.asarray(suffixes), dtype=torch.long)
    if sfx.ndim != 2 or p.shape[1] < 1 or sfx.shape[1] < 1:
        raise ValueError(
            f"need a prefix of >= 1 token and suffixes [R, m >= 1]; got {tuple(p.shape)}, {tuple(sfx.shape)}"
        )
    k, m, r = p.shape[1], sfx.shape[1], sfx.shape[0]
    if info.position_limit is not None and k + m > info.position_limit:
        raise ValueError(
            f"prefix + suffix = {k + m} tokens exceeds the position limit of {info.position_limit}"
        )
    if r == 0:
        return np.zeros(0, np.float32)
    amp = resolve_amp_dtype(amp_dtype)
    compute_dtype = amp or info.param_dtype
    act_bytes = torch.finfo(compute_dtype).bits // 8 if compute_dtype.is_floating_point else 4
    bs = batch_size or _auto_batch_size(info, r, k, m, 0, "exact", act_bytes, None)
    extra_chunks = 0
    if sync is not None:  # equal forward counts on every rank (see extract)
        bs = sync.min(bs)
        extra_chunks = sync.max(-(-r // bs)) - (-(-r // bs)) if m > 1 else 0
    autocast = (
        torch.autocast(device_type=info.device.type, dtype=amp)
        if amp is not None
        else contextlib.nullcontext()
    )
    out = []
    with preserved_state(model), autocast:
        prefix_dev = p.to(info.device)
        logits, cache = _forward(info, 1, input_ids=prefix_dev, use_cache=True)
        first = torch.log_softmax(logits[0, -1].float(), dim=-1)  # [V]: predicts every suffix's first token
        # The prefix's cache serves every suffix when it is a plain buffer the suffixes can extend; otherwise
        # (recurrent state, a window the suffix would slide) each row runs prefix + suffix, at the same call count.
        if info.cache_kwarg is None or cache is None or not reusable_cache(cache, info.config, k + m - 1):
            cache = None
        for start in range(0, r, bs):
            chunk = sfx[start : start + bs].to(info.device)
            nll = -first[chunk[:, 0]]
            if m > 1:
                if cache is not None:
                    logits, _ = _forward(
                        info,
                        m - 1,
                        cache=_repeat_cache(cache, len(chunk)),
                        input_ids=chunk[:, :-1],
                        use_cache=True,
                    )
                else:
                    rows = torch.cat([prefix_dev.expand(len(chunk), -1), chunk[:, :-1]], dim=1)
                    logits, _ = _forward(info, m - 1, input_ids=rows, use_cache=False)
                nll = nll + _stats(logits, chunk[:, 1:], consume=True).nll.sum(dim=1)  # type: ignore[union-attr]
            out.append((nll / m).cpu())
        for _ in range(extra_chunks):
            _dummy_forward(info)
    return torch.cat(out).numpy().astype(np.float32)


def _assemble(
    parts: list[dict[str, np.ndarray]],
    paths: list[str],
    suffix: np.ndarray,
    k: int,
    m: int,
    w: int,
    mode: str,
) -> ExtractionResult:
    cat = {name: np.concatenate([p[name] for p in parts], axis=0) for name in parts[0]}
    generated = cat.get("generated")
    if generated is not None:
        generated = generated.astype(np.int64)
        count = metrics.match_count(generated, suffix)
        ratio = (count / m).astype(np.float32)
        similarity = metrics.edit_similarity(generated, suffix)
    else:
        ratio = count = similarity = None
    return ExtractionResult(
        prefix_len=k,
        suffix_len=m,
        entropy_window=w,
        mode=mode,
        generated=generated,
        exact=cat["exact"].astype(bool),
        match_ratio=ratio,
        match_count=count,
        prefix_match_len=cat["prefix_match_len"].astype(np.int64),
        edit_similarity=similarity,
        entropy=cat["entropy"].astype(np.float32),
        suffix_nll=cat["suffix_nll"].astype(np.float32),
        near_tie=cat["near_tie"].astype(bool),
        decoding=ExtractionResult.combine_decodings(paths),
        **{name: cat[name].astype(np.float32) for name in ExtractionResult.TOKEN_FIELDS if name in cat},
        hidden_prefix=cat.get("hidden_prefix"),
    )
