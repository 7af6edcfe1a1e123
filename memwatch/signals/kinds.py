"""The kind of each memorization: recitation (duplicated), reconstruction (predictable) or recollection (rare)."""

from __future__ import annotations

from typing import Any

import numpy as np

from memwatch.signals.registry import Aggregate, GroupStat, Signal, register_group_stat, register_signal

__all__ = [
    "CONTROL_EXTRACTED",
    "DUPLICATED",
    "RECITATION_REPETITIONS",
    "REFERENCE_KNOWN",
    "TEMPLATE",
    "evidence",
    "kind_of",
]

# Evidence bits (the kind_evidence signal): why a memorized probe got its kind.
DUPLICATED = (
    1  # its window occurs more than once in the panel, or it is a canary inserted RECITATION_REPETITIONS+
)
TEMPLATE = 2  # its suffix is template-like: under 3 distinct tokens, an arithmetic run, or periodic
CONTROL_EXTRACTED = (
    4  # text it cannot be told from is extracted too: a control with its suffix, or its tier's twin
)
REFERENCE_KNOWN = 8  # the reference model (a PEFT model's base, or the one you name) reproduces it already
# Prashanth et al. 2024 call a sequence highly duplicated (recitation) above 5 copies in the training data.
RECITATION_REPETITIONS = 6
CONTROLS = ("heldout", "canary_heldout")


def _template(suffix: np.ndarray) -> np.ndarray:
    """[N, m] -> [N] bool: fewer than 3 distinct tokens, a constant step (1 2 3 4 ...), or a period of at most m/3."""
    n, m = suffix.shape
    if not n or not m:
        return np.zeros(n, bool)
    s = np.sort(suffix, axis=1)
    few = 1 + (np.diff(s, axis=1) != 0).sum(axis=1) < 3
    steps = np.diff(suffix, axis=1)
    arithmetic = (steps == steps[:, :1]).all(axis=1) if m > 1 else np.zeros(n, bool)
    periodic = np.zeros(n, bool)
    for p in range(1, m // 3 + 1):
        periodic |= (suffix[:, p:] == suffix[:, :-p]).all(axis=1)
    return few | arithmetic | periodic


def evidence(
    tokens: np.ndarray,
    k: int,
    m: int,
    groups: np.ndarray,
    metas: list[dict[str, Any]],
    memorized: np.ndarray,
    reference_memorized: np.ndarray | None = None,
) -> np.ndarray:
    """The evidence bits [N] of every probe (the kind is read from them for memorized probes); reference_memorized
    [N] (NaN where not measured): the reference model reproduces the suffix too."""
    tokens = np.asarray(tokens)[:, : k + m]
    n = len(tokens)
    groups = np.asarray(groups, dtype=object)
    memorized = np.asarray(memorized, dtype=bool)
    bits = np.zeros(n, np.int64)
    if not n:
        return bits
    # Duplicated: the same window more than once in the panel; a canary inserted many times.
    _, inverse, counts = np.unique(tokens, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    reps = np.array([int(meta.get("repetitions", 0) or 0) for meta in metas])
    canary = groups == "canary"
    bits |= np.where((counts[inverse] > 1) | (canary & (reps >= RECITATION_REPETITIONS)), DUPLICATED, 0)
    suffix = tokens[:, k : k + m]
    bits |= np.where(_template(suffix), TEMPLATE, 0)
    # A control extracted with the same suffix (another probe than itself), or the tier's twin extracted.
    _, suffix_id = np.unique(suffix, axis=0, return_inverse=True)
    suffix_id = suffix_id.reshape(-1)
    control = np.isin(groups, CONTROLS)
    extracted_controls = np.bincount(suffix_id[control & memorized], minlength=int(suffix_id.max()) + 1)
    same_suffix = extracted_controls[suffix_id] - (control & memorized) > 0
    twin_tiers = {
        int(r) for r, g, mem in zip(reps, groups, memorized, strict=True) if g == "canary_heldout" and mem
    }
    twin = canary & np.isin(reps, list(twin_tiers))
    bits |= np.where(same_suffix | twin, CONTROL_EXTRACTED, 0)
    if reference_memorized is not None:
        known = np.nan_to_num(np.asarray(reference_memorized, dtype=np.float64), nan=0.0) > 0
        bits |= np.where(known, REFERENCE_KNOWN, 0)
    return bits


def kind_of(bits: np.ndarray, memorized: np.ndarray) -> np.ndarray:
    """[N] strings: "" (not memorized), "recitation", "reconstruction" or "recollection", in that precedence."""
    bits = np.asarray(bits, dtype=np.int64)
    memorized = np.asarray(memorized, dtype=bool)
    kind = np.where(
        bits & DUPLICATED,
        "recitation",
        np.where(bits & (TEMPLATE | CONTROL_EXTRACTED | REFERENCE_KNOWN), "reconstruction", "recollection"),
    )
    return np.where(memorized, kind, "")


def _evidence(ctx: Any) -> np.ndarray:
    return evidence(
        ctx.tokens,
        ctx.k,
        ctx.m,
        ctx.groups,
        list(ctx.metas),
        ctx.values["memorized"],
        ctx.values.get("reference_memorized"),
    )


register_signal(
    Signal(
        "kind_evidence",
        f"why a memorization has its kind, as bits: {DUPLICATED} duplicated (in the panel, or a canary inserted "
        f"{RECITATION_REPETITIONS}+ times), {TEMPLATE} template-like suffix, {CONTROL_EXTRACTED} a control with "
        f"the same suffix or the tier's twin extracted too, {REFERENCE_KNOWN} the reference model reproduces it",
        "bits",
        _evidence,
        after=("memorized", "reference_memorized"),
    )
)

_KINDS = {
    "recitation": "memorized and duplicated (Prashanth et al. 2024): boilerplate seen many times",
    "reconstruction": "memorized and predictable: template-like, its control is extracted too, or the reference "
    "model already produces it",
    "recollection": "memorized, neither duplicated nor predictable: rare text remembered (the privacy-relevant kind)",
}
for _name, _meaning in _KINDS.items():

    def _is(ctx: Any, name: str = _name) -> np.ndarray:
        return kind_of(ctx.values["kind_evidence"], ctx.values["memorized"]) == name

    register_signal(
        Signal(
            _name,
            _meaning,
            "bool",
            _is,
            after=("kind_evidence", "memorized"),
            stored=False,  # derived from kind_evidence and memorized, both recomputed or stored
            aggregates=(
                Aggregate(
                    f"{_name}_count",
                    "sum",
                    scopes=("group", "tier"),
                    label={
                        "recitation": "recited",
                        "reconstruction": "reconstr",
                        "recollection": "recollected",
                    }[_name],
                    fmt=".0f",
                    meaning=f"probes memorized by {_name}",
                ),
            ),
        )
    )


def _boundary_by_kind(ctx: Any, scope: Any) -> dict[str, float]:
    """Per kind of memorization present in the scope (and for its probes not memorized): the entropy jump across
    the boundary of their mean profile, first j generated positions minus last j prefix positions."""
    from memwatch.signals.entropy import boundary_stats

    entropy = ctx.products.get("entropy")
    if entropy is None or ctx.w <= 0:
        return {}
    rows = np.asarray(scope.rows)
    entropy = np.asarray(entropy, dtype=np.float64)[rows]
    width = int(ctx.settings.get("boundary_width", 4))
    memorized = np.asarray(ctx.values["memorized"], dtype=bool)[rows]
    masks = {name: np.asarray(ctx.values[name], dtype=bool)[rows] for name in _KINDS if name in ctx.values}
    masks["unmemorized"] = ~memorized
    out = {}
    for name, mask in masks.items():
        if mask.any():
            out[f"boundary_jump_kind/{name}"] = boundary_stats(entropy[mask].mean(axis=0), ctx.w, width)[2]
    return out


_BY_KIND = (
    "entropy jump across the boundary (nats; the first j generated positions minus the last j prefix positions of "
    "the mean profile) of the probes memorized by each kind, and of those not memorized (<kind>: recitation, "
    "reconstruction, recollection, unmemorized)"
)
register_group_stat(
    GroupStat(
        # Switched with the other boundary statistics (signals={"boundary": False}): it reads the same prefix
        # entropies, which the engine then no longer computes.
        "boundary/<kind>",
        _BY_KIND,
        "nats",
        _boundary_by_kind,
        scopes=("group", "tier"),
        needs=frozenset({"entropy"}),
        after=("memorized", *_KINDS),
        modes=("full",),
        outputs=(("boundary_jump_kind/<kind>", "scalar", _BY_KIND),),
    )
)
