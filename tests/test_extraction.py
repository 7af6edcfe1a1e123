"""The extraction engine against a naive reference: per-row HF generate and a plain forward."""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch
from _models import (
    ARCHS,
    VOCAB,
    assert_matches,
    generate_row,
    memorizing_panel,
    reference,
    tiny_model,
    trained_model,
    wide_llama,
)

import memwatch
from memwatch.engine.extraction import ExtractionResult, suffix_nll_after_prefix

K, M, W = 16, 16, 8


def _dtypes(res: ExtractionResult, n: int) -> None:
    assert res.generated.dtype == np.int64 and res.generated.shape == (n, M)
    assert res.exact.dtype == np.bool_ and res.exact.shape == (n,)
    assert res.match_ratio.dtype == np.float32
    assert res.prefix_match_len.dtype == np.int64
    assert res.edit_similarity.dtype == np.float32
    assert res.entropy.dtype == np.float32 and res.entropy.shape == (n, W + M)
    assert res.suffix_nll.dtype == np.float32
    assert res.near_tie.dtype == np.bool_


@pytest.mark.parametrize("arch", ARCHS)
def test_random_models_match_generate(arch):
    model = tiny_model(arch)
    seqs = torch.randint(0, VOCAB, (10, K + M + 5), generator=torch.Generator().manual_seed(3))
    res = memwatch.extract(model, seqs, prefix_len=K, suffix_len=M, entropy_window=W, batch_size=4)
    _dtypes(res, 10)
    assert_matches(res, reference(model, seqs, K, M, W))


@pytest.mark.parametrize("arch", ARCHS)
def test_random_model_self_generated_rows_are_exact(arch):
    """Rows whose suffix is the model's own greedy continuation are exact; altered tails give partial matches."""
    model = tiny_model(arch, seed=2)
    g = torch.Generator().manual_seed(5)
    prefixes = torch.randint(0, VOCAB, (6, K), generator=g)
    with torch.no_grad():
        cont = model.generate(
            prefixes,
            attention_mask=torch.ones_like(prefixes),
            max_new_tokens=M,
            do_sample=False,
            pad_token_id=0,
        )
    seqs = cont.clone()
    seqs[3:, K + 4 :] = torch.randint(0, VOCAB, (3, M - 4), generator=g)  # diverge after 4 tokens
    res = memwatch.extract(model, seqs, prefix_len=K, suffix_len=M, entropy_window=W)
    assert res.exact[:3].all() and not res.exact[3:].any()
    assert (res.prefix_match_len[3:] >= 4).all()
    assert_matches(res, reference(model, seqs, K, M, W))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_trained_model_mixed_panel_matches_generate(arch):
    model = trained_model(arch, K, M)
    _, panel = memorizing_panel(K, M)
    res = memwatch.extract(model, panel, prefix_len=K, suffix_len=M, entropy_window=W, batch_size=5)
    # The panel really mixes exact, partly matching and unmatched rows.
    assert res.exact[:4].all(), res.prefix_match_len
    assert not res.exact[4:].any()
    partial = res.match_ratio[4:8]
    assert ((partial > 0) & (partial < 1)).all(), partial
    assert (res.match_ratio[8:] < 0.5).all()
    assert_matches(res, reference(model, panel, K, M, W))
    # Memorized rows keep low entropy through the boundary; unmatched rows do not.
    assert res.entropy[:4, W:].mean() < res.entropy[8:, W:].mean()


def test_batch_size_and_input_forms_do_not_change_results():
    model = trained_model("gpt2", K, M)
    _, panel = memorizing_panel(K, M)
    base = memwatch.extract(model, panel, prefix_len=K, suffix_len=M, entropy_window=W)
    longer = torch.cat([panel, torch.zeros(len(panel), 7, dtype=torch.long)], dim=1)
    variants = [
        memwatch.extract(model, panel, prefix_len=K, suffix_len=M, entropy_window=W, batch_size=1),
        memwatch.extract(model, panel, prefix_len=K, suffix_len=M, entropy_window=W, batch_size=7),
        memwatch.extract(
            model, [list(r) for r in longer.tolist()], prefix_len=K, suffix_len=M, entropy_window=W
        ),
        memwatch.extract(model, panel.numpy().astype(np.int32), prefix_len=K, suffix_len=M, entropy_window=W),
        memwatch.extract(model, panel, prefix_len=K, suffix_len=M, entropy_window=W, memory_budget=1),
    ]
    for res in variants:
        np.testing.assert_array_equal(res.generated, base.generated)
        np.testing.assert_array_equal(res.exact, base.exact)
        np.testing.assert_allclose(res.entropy, base.entropy, atol=1e-5)
        np.testing.assert_allclose(res.suffix_nll, base.suffix_nll, atol=1e-5)


def test_exact_mode_is_the_teacher_forced_part_of_full_mode():
    model = trained_model("gpt2", K, M)
    _, panel = memorizing_panel(K, M)
    full = memwatch.extract(model, panel, prefix_len=K, suffix_len=M, entropy_window=W)
    ex = memwatch.extract(model, panel, prefix_len=K, suffix_len=M, entropy_window=W, mode="exact")
    assert (
        ex.mode == "exact" and ex.generated is None and ex.match_ratio is None and ex.edit_similarity is None
    )
    np.testing.assert_array_equal(ex.exact, full.exact)
    np.testing.assert_array_equal(ex.prefix_match_len, full.prefix_match_len)
    np.testing.assert_allclose(ex.suffix_nll, full.suffix_nll, atol=1e-6)
    # Up to and including each row's first divergence, the greedy path is the true sequence.
    for i, d in enumerate(full.prefix_match_len):
        upto = W + min(int(d), M - 1) + 1
        np.testing.assert_allclose(ex.entropy[i, :upto], full.entropy[i, :upto], atol=1e-6)
    # Teacher-forced entropies after a divergence follow the true suffix, so they differ from the greedy path's.
    diverged = np.flatnonzero(full.prefix_match_len < M - 2)
    assert not np.allclose(ex.entropy[diverged, -1], full.entropy[diverged, -1])


def test_tie_margin_controls_near_tie():
    model = tiny_model("gpt2")
    seqs = torch.randint(0, VOCAB, (4, K + M), generator=torch.Generator().manual_seed(0))
    assert memwatch.extract(model, seqs, prefix_len=K, suffix_len=M, tie_margin=1e9).near_tie.all()
    assert not memwatch.extract(model, seqs, prefix_len=K, suffix_len=M, tie_margin=0.0).near_tie.any()


def test_select_and_concat_round_trip():
    model = trained_model("gpt2", K, M)
    _, panel = memorizing_panel(K, M)
    res = memwatch.extract(model, panel, prefix_len=K, suffix_len=M, entropy_window=W)
    back = ExtractionResult.concat([res.select(slice(0, 5)), res.select(np.arange(5, len(panel)))])
    for name in ExtractionResult.ARRAY_FIELDS:
        np.testing.assert_array_equal(getattr(back, name), getattr(res, name))
    assert len(res.select([3, 1])) == 2 and res.select([3, 1]).exact[1] == res.exact[1]
    assert res.decoding == back.decoding == res.select([0]).decoding == "cache-reuse"
    mixed = [res.select([0]), replace(res.select([1]), decoding="recompute"), replace(res, decoding="none")]
    assert ExtractionResult.concat(mixed).decoding == "cache-reuse+recompute"
    assert ExtractionResult.concat([mixed[2], mixed[2]]).decoding == "none"


def test_progress_is_reported_per_batch():
    model = tiny_model("gpt2")
    seqs = torch.randint(0, VOCAB, (7, K + M), generator=torch.Generator().manual_seed(0))
    seen = []
    memwatch.extract(
        model, seqs, prefix_len=K, suffix_len=M, batch_size=3, progress=lambda d, t: seen.append((d, t))
    )
    assert seen == [(3, 7), (6, 7), (7, 7)]


# --- leaving the model as found -------------------------------------------------------------------------------


def _snapshot(model):
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "training": [mod.training for mod in model.modules()],
        "config": model.config.to_dict(),
        "gc": any(getattr(mod, "gradient_checkpointing", False) for mod in model.modules()),
        "rng": torch.get_rng_state().clone(),
        "grad_enabled": torch.is_grad_enabled(),
    }


def _assert_same(before, after):
    for n, p in before["params"].items():
        assert torch.equal(p, after["params"][n]), n
    assert before["requires_grad"] == after["requires_grad"]
    assert before["training"] == after["training"]
    assert before["config"] == after["config"]
    assert before["gc"] == after["gc"]
    assert torch.equal(before["rng"], after["rng"])
    assert before["grad_enabled"] == after["grad_enabled"]


@pytest.mark.parametrize("arch", ARCHS)
def test_model_left_as_found_from_train_mode_with_gradient_checkpointing(arch):
    model = copy.deepcopy(trained_model(arch, K, M)) if arch != "neox" else tiny_model(arch)
    _, panel = memorizing_panel(K, M)
    expected = memwatch.extract(model, panel, prefix_len=K, suffix_len=M, entropy_window=W)

    # transformers 5 renames gradient checkpointing to activation checkpointing (the old name warns)
    getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    model.config.use_cache = False  # what the Trainer leaves behind with gradient checkpointing
    model.train()
    head = model.get_output_embeddings()
    head.eval()  # a submodule deliberately in another mode must stay so
    torch.manual_seed(1234)
    before = _snapshot(model)
    res = memwatch.extract(model, panel, prefix_len=K, suffix_len=M, entropy_window=W)
    after = _snapshot(model)
    _assert_same(before, after)
    assert model.training and not head.training and model.config.use_cache is False
    # Dropout was off and the cache was used correctly: same answers as from eval mode.
    np.testing.assert_array_equal(res.generated, expected.generated)
    np.testing.assert_allclose(res.entropy, expected.entropy, atol=1e-5)
    # Training still works afterwards, with gradients.
    loss = model(input_ids=panel[:2], labels=panel[:2]).loss
    loss.backward()
    assert head.weight.grad is not None


def test_grad_mode_and_rng_untouched_inside_no_grad_and_with_dropout_draws():
    model = tiny_model("gpt2")
    seqs = torch.randint(0, VOCAB, (3, K + M), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(7)
    expected_next = torch.rand(3)
    torch.manual_seed(7)
    with torch.no_grad():
        memwatch.extract(model, seqs, prefix_len=K, suffix_len=M)
        assert not torch.is_grad_enabled()
    assert torch.is_grad_enabled()
    assert torch.equal(torch.rand(3), expected_next)


def test_wrapped_models_are_unwrapped(tmp_path):
    import torch.distributed as dist
    from accelerate import Accelerator
    from torch.nn.parallel import DistributedDataParallel

    model = trained_model("gpt2", K, M)
    _, panel = memorizing_panel(K, M)
    base = memwatch.extract(model, panel, prefix_len=K, suffix_len=M, entropy_window=W)
    wrapped = [torch.compile(copy.deepcopy(model)), Accelerator(cpu=True).prepare_model(copy.deepcopy(model))]
    store = f"file://{tmp_path / 'pg'}"
    dist.init_process_group("gloo", init_method=store, rank=0, world_size=1)
    try:
        wrapped.append(DistributedDataParallel(copy.deepcopy(model)))
        for w in wrapped:
            res = memwatch.extract(w, panel, prefix_len=K, suffix_len=M, entropy_window=W)
            np.testing.assert_array_equal(res.generated, base.generated)
            np.testing.assert_allclose(res.entropy, base.entropy, atol=1e-5)
    finally:
        dist.destroy_process_group()


def test_bf16_autocast_runs_and_flags_near_ties():
    """bf16 on CPU: same shapes, memorized rows still exact, and disagreements with fp32 are near ties."""
    model = trained_model("gpt2", K, M)
    _, panel = memorizing_panel(K, M)
    fp32 = memwatch.extract(model, panel, prefix_len=K, suffix_len=M, entropy_window=W)
    bf16 = memwatch.extract(model, panel, prefix_len=K, suffix_len=M, entropy_window=W, amp_dtype="bf16")
    assert bf16.generated.shape == fp32.generated.shape and bf16.entropy.dtype == np.float32
    assert bf16.exact[:4].all()
    np.testing.assert_allclose(bf16.suffix_nll, fp32.suffix_nll, atol=0.25)
    model_bf16 = copy.deepcopy(model).to(torch.bfloat16)
    native = memwatch.extract(model_bf16, panel, prefix_len=K, suffix_len=M, entropy_window=W)
    assert native.exact[:4].all()


# --- bad input ------------------------------------------------------------------------------------------------


def test_short_rows_are_named():
    model = tiny_model("gpt2")
    rows = [[1] * 40, [2] * 10, [3] * 32, [4] * 31]
    with pytest.raises(ValueError, match=r"32 tokens; row 1 has 10, row 3 has 31"):
        memwatch.extract(model, rows, prefix_len=K, suffix_len=M)
    with pytest.raises(ValueError, match="all 2 rows have 20"):
        memwatch.extract(model, torch.zeros(2, 20, dtype=torch.long), prefix_len=K, suffix_len=M)


def test_position_limit():
    model = tiny_model("gpt2", positions=48)
    with pytest.raises(ValueError, match="position limit of 48"):
        memwatch.extract(model, torch.zeros(1, 64, dtype=torch.long), prefix_len=32, suffix_len=32)


def test_non_causal_models_are_refused():
    from transformers import BertConfig, BertForMaskedLM, BertModel, T5Config, T5ForConditionalGeneration

    bert = BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    t5 = T5Config(vocab_size=100, d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16)
    seqs = torch.zeros(1, K + M, dtype=torch.long)
    for model in (BertForMaskedLM(bert), BertModel(bert), T5ForConditionalGeneration(t5)):
        with pytest.raises(TypeError, match="causal language models"):
            memwatch.extract(model, seqs, prefix_len=K, suffix_len=M)
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        memwatch.extract("gpt2", seqs, prefix_len=K, suffix_len=M)


def test_empty_input_gives_empty_result():
    model = tiny_model("gpt2")
    for empty in ([], torch.zeros(0, 40, dtype=torch.long)):
        res = memwatch.extract(model, empty, prefix_len=K, suffix_len=M, entropy_window=W)
        assert len(res) == 0 and res.generated.shape == (0, M) and res.entropy.shape == (0, W + M)
    ex = memwatch.extract(model, [], prefix_len=K, suffix_len=M, mode="exact")
    assert len(ex) == 0 and ex.generated is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"entropy_window": K}, "entropy_window must be at most prefix_len - 1"),
        ({"prefix_len": 0}, "prefix_len must be an integer >= 1"),
        ({"suffix_len": 2.5}, "suffix_len must be an integer"),
        ({"mode": "greedy"}, "mode must be one of"),
        ({"batch_size": 0}, "batch_size must be None"),
        ({"amp_dtype": "int8"}, "amp_dtype must be"),
    ],
)
def test_bad_arguments(kwargs, message):
    model = tiny_model("gpt2")
    args = {"prefix_len": K, "suffix_len": M, **kwargs}
    with pytest.raises(ValueError, match=message):
        memwatch.extract(model, torch.zeros(1, 64, dtype=torch.long), **args)


def test_out_of_vocabulary_tokens():
    model = tiny_model("gpt2")
    bad = torch.full((1, K + M), VOCAB + 3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 257\)"):
        memwatch.extract(model, bad, prefix_len=K, suffix_len=M)
    with pytest.raises(ValueError, match="integer token ids"):
        memwatch.extract(model, torch.zeros(1, K + M), prefix_len=K, suffix_len=M)


def test_statistics_with_masked_vocabulary_entries():
    """-inf logits (a masked vocabulary) give finite entropies equal to fp64's, without a host check."""
    from memwatch.engine.extraction import _stats

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 50, generator=g) * 3
    logits[:, :, 10:20] = float("-inf")
    targets = torch.randint(20, 50, (3, 5), generator=g)
    logp = torch.log_softmax(logits.double(), -1)
    expected = -(logp.exp() * logp.nan_to_num(neginf=0.0)).sum(-1)
    for consume in (False, True):
        st = _stats(logits.clone(), targets, consume=consume)
        torch.testing.assert_close(st.entropy.double(), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(
            st.nll.double(), -logp.gather(-1, targets[..., None])[..., 0], atol=1e-5, rtol=0
        )
        assert torch.equal(st.argmax, logits.argmax(-1))
        top2 = logits.topk(2, -1).values
        torch.testing.assert_close(st.top, top2[..., 0])
        torch.testing.assert_close(st.margin, top2[..., 0] - top2[..., 1])
    kept = logits.clone()
    _stats(kept)
    assert torch.equal(kept, logits)  # not consumed: the caller's logits are left alone


def test_statistics_match_fp64_with_a_32k_vocabulary_and_logits_beyond_50():
    """Entropies (prefix and greedy part), suffix NLLs and exposure's NLLs within 1e-4 of fp64 on a model whose
    logits reach +-50 and more over a 32k vocabulary, where unshifted fp32 formulas lose 1e-3 nats."""
    model = wide_llama()
    g = torch.Generator().manual_seed(0)
    seqs = torch.randint(0, model.config.vocab_size, (6, K + M), generator=g)
    with torch.no_grad():
        assert model.config.vocab_size >= 32_000 and model(seqs).logits.abs().max() >= 50
    res = memwatch.extract(model, seqs, prefix_len=K, suffix_len=M, entropy_window=W)
    ref = reference(model, seqs, K, M, W, tie_margin=0.0)
    np.testing.assert_array_equal(res.generated, ref["generated"])
    assert (res.prefix_match_len < M - 4).all()  # most of each row's greedy part comes from decoding steps
    np.testing.assert_allclose(res.entropy[:, :W], ref["entropy"][:, :W], atol=1e-4, rtol=0)
    np.testing.assert_allclose(res.entropy[:, W:], ref["entropy"][:, W:], atol=1e-4, rtol=0)
    np.testing.assert_allclose(res.suffix_nll, ref["suffix_nll"], atol=1e-4, rtol=0)
    prefix, suffixes = seqs[0, :K], seqs[:, K:]
    with torch.no_grad():
        logits = model(torch.cat([prefix.expand(len(suffixes), K), suffixes], 1)).logits.double()
    logp = torch.log_softmax(logits[:, K - 1 : -1], -1).gather(-1, suffixes[..., None])[..., 0]
    np.testing.assert_allclose(
        suffix_nll_after_prefix(model, prefix, suffixes), -logp.mean(1).numpy(), atol=1e-4, rtol=0
    )


def test_tie_threshold_is_a_few_units_in_the_last_place_of_the_top_logit():
    from memwatch.engine.extraction import tie_threshold

    # Hand-computed: TIE_ULPS = 4 times the spacing 2**(floor(log2 max(|x|, 1)) - mantissa bits).
    cases = {
        torch.bfloat16: {
            40.0: 1.0,
            -40.0: 1.0,
            32.0: 1.0,
            63.9: 1.0,
            31.9: 0.5,
            64.0: 2.0,
            3.0: 2**-4,
            1.5: 2**-5,
        },
        torch.float16: {40.0: 0.125, 1000.0: 2.0, 0.5: 2**-8, 1.0: 2**-8},
        torch.float32: {40.0: 2**-16, 1.0: 2**-21, 2.0**20: 0.5, -3.0: 2**-20},
    }
    for dtype, expected in cases.items():
        tops = torch.tensor(list(expected))
        torch.testing.assert_close(
            tie_threshold(tops, dtype), torch.tensor(list(expected.values())), rtol=0, atol=0
        )
        assert (
            tie_threshold(torch.tensor([1e-3, 0.0]), dtype)
            .eq(tie_threshold(torch.tensor([1.0]), dtype))
            .all()
        )


class _SplitSumHead(torch.nn.Module):
    """An lm_head computing x @ W.T in bf16 as two rounded half-sums over several positions (a prefill) and as one
    sum for a single position (a decoding step): two valid summation orders, as a GPU's split-K and plain kernels."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.weight = linear.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] == 1:
            return x @ self.weight.T
        h = x.shape[-1] // 2
        return x[..., :h] @ self.weight[:, :h].T + x[..., h:] @ self.weight[:, h:].T


def test_bf16_summation_order_disagreements_are_flagged_relative_to_the_logits_magnitude():
    """Forced disagreements: our teacher-forced pass sums the head in halves, generate's steps in one go, so rows
    that recite generate's own continuation flip at near ties. Each such row is flagged, including rows whose
    margins all exceed an absolute 0.125 (bf16 logits of 32 to 64 lie 0.25 apart)."""
    model = wide_llama(vocab=300, spread=8.0, offset=40.0).to(torch.bfloat16)
    model.lm_head = _SplitSumHead(model.lm_head)
    prefixes = torch.randint(0, 300, (16, K), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        continuation = torch.stack([generate_row(model, p[None], M)[0] for p in prefixes])
    seqs = torch.cat([prefixes, continuation], 1)
    res = memwatch.extract(model, seqs, prefix_len=K, suffix_len=M)
    absolute = memwatch.extract(model, seqs, prefix_len=K, suffix_len=M, tie_margin=0.125)
    differ = (res.generated != continuation.numpy()).any(axis=1)
    assert differ.any(), "no disagreement was forced: the test would pass vacuously"
    assert res.near_tie[differ].all(), np.flatnonzero(differ & ~res.near_tie)
    assert (differ & ~absolute.near_tie).any(), (
        "every disagreement was an absolute tie: nothing relative tested"
    )


@pytest.mark.parametrize("arch", ARCHS)
def test_prefix_shared_suffix_nll_equals_the_full_teacher_forced_pass(arch):
    model = trained_model("gpt2", K, M) if arch == "gpt2" else tiny_model(arch)
    g = torch.Generator().manual_seed(4)
    prefix = torch.randint(0, VOCAB, (K,), generator=g)
    suffixes = torch.randint(0, VOCAB, (9, M), generator=g)
    full = memwatch.extract(
        model, torch.cat([prefix.expand(9, K), suffixes], 1), prefix_len=K, suffix_len=M, mode="exact"
    )
    shared = suffix_nll_after_prefix(model, prefix, suffixes, batch_size=4)
    np.testing.assert_allclose(shared, full.suffix_nll, atol=1e-4)
    one = suffix_nll_after_prefix(model, prefix, suffixes[:, :1])
    logp = torch.log_softmax(model(prefix[None]).logits[0, -1].detach().double(), -1)
    np.testing.assert_allclose(one, -logp[suffixes[:, 0]].numpy(), atol=1e-5)


def test_statistics_stay_fp32_inside_autocast():
    from memwatch.engine.extraction import _stats

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 6, 300, generator=g) * 12
    targets = torch.randint(0, 300, (4, 6), generator=g)
    plain = _stats(logits, targets, moments=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = _stats(logits, targets, moments=True)
    for a, b in zip(plain, auto, strict=True):
        assert a.dtype == b.dtype and (a.dtype != torch.bfloat16)
        torch.testing.assert_close(a, b)


def test_bf16_disagreements_with_generate_are_near_ties():
    """In bf16 our one-pass computation and generate's step-by-step one may pick different tokens only where the
    top-1/top-2 margin is small: those rows are flagged."""
    model = copy.deepcopy(trained_model("gpt2", K, M)).to(torch.bfloat16)
    seqs = torch.cat(
        [
            memorizing_panel(K, M)[1],
            torch.randint(0, VOCAB, (20, K + M), generator=torch.Generator().manual_seed(9)),
        ]
    )
    res = memwatch.extract(model, seqs, prefix_len=K, suffix_len=M, entropy_window=W)
    with torch.no_grad():
        ref = torch.stack(
            [
                model.generate(
                    r[None, :K],
                    attention_mask=torch.ones(1, K, dtype=torch.long),
                    max_new_tokens=M,
                    do_sample=False,
                    pad_token_id=0,
                )[0, K:]
                for r in seqs
            ]
        ).numpy()
    differ = (res.generated != ref).any(axis=1)
    assert res.near_tie[differ].all(), np.flatnonzero(differ & ~res.near_tie)
    assert res.exact[:4].all()
