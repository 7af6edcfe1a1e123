"""Tiny causal LMs built from configs (no hub access), a model trained here to memorize some rows, and the naive
reference every extraction is checked against (per-row HF generate and a plain forward, statistics in fp64)."""

from __future__ import annotations

import functools

import numpy as np
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
)

VOCAB = 257
ARCHS = ("gpt2", "neox", "llama")


def tiny_model(arch: str, seed: int = 0, vocab: int = VOCAB, positions: int = 128) -> torch.nn.Module:
    """A 2-layer, 64-wide model of the given family with random weights; EOS/BOS unset so nothing stops early."""
    torch.manual_seed(seed)
    common = {"vocab_size": vocab, "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    if arch == "gpt2":
        cfg = GPT2Config(n_positions=positions, n_embd=64, n_layer=2, n_head=4, **common)
        model = GPT2LMHeadModel(cfg)
    elif arch == "neox":
        cfg = GPTNeoXConfig(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            max_position_embeddings=positions,
            **common,
        )
        model = GPTNeoXForCausalLM(cfg)
    elif arch == "llama":
        cfg = LlamaConfig(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=128,
            max_position_embeddings=positions,
            **common,
        )
        model = LlamaForCausalLM(cfg)
    else:
        raise ValueError(arch)
    return model.eval()


def memorizing_panel(k: int, m: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(training rows [4, k+m], probe panel [12, k+m]).

    Probes: the 4 trained rows (memorized once trained), 4 rows sharing a trained row's prefix and first few
    suffix tokens and then departing from it (partly matching), 4 random unseen rows (unmatched).
    """
    g = torch.Generator().manual_seed(seed)
    train = torch.randint(0, VOCAB, (4, k + m), generator=g)
    partial = train.clone()
    for i, keep in enumerate((2, 5, 9, 13)):
        partial[i, k + keep :] = torch.randint(0, VOCAB, (m - keep,), generator=g)
    unseen = torch.randint(0, VOCAB, (4, k + m), generator=g)
    return train, torch.cat([train, partial, unseen])


@functools.lru_cache(maxsize=4)
def trained_model(arch: str = "gpt2", k: int = 16, m: int = 16, steps: int = 200) -> torch.nn.Module:
    """A tiny model trained to recite the rows of memorizing_panel (cached per process; callers must not mutate)."""
    train, _ = memorizing_panel(k, m)
    return train_rows(tiny_model(arch, seed=1), train, steps, lr=3e-3).eval()


def train_rows(model: torch.nn.Module, rows: torch.Tensor, steps: int, lr: float) -> torch.nn.Module:
    """Full-batch AdamW on `rows` (shuffled each step, seeded) over the trainable parameters; left in train mode."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        batch = rows[torch.randperm(len(rows), generator=g)]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def wide_llama(
    seed: int = 0, vocab: int = 32_000, spread: float = 6.0, offset: float = 40.0
) -> torch.nn.Module:
    """A tiny Llama with a real-sized vocabulary and an untied lm_head whose logits reach +-50 and more: a spread
    of `spread` across the vocabulary on top of a per-position offset of about `offset` shared by every token (as
    real LMs have), the regime where fp32 statistics computed without a max shift lose precision."""
    torch.manual_seed(seed)
    hidden = 32
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        head = (
            model.get_output_embeddings().weight
        )  # [V, hidden]; RMS-normed hidden states have norm ~sqrt(hidden)
        head.mul_(spread / (head.std() * hidden**0.5))
        shared = torch.randn(hidden)
        head.add_(offset * shared / shared.norm())  # the same h . shared added to every token's logit
    return model.eval()


def fp64_entropy(logits: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits.double(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def levenshtein(a: list[int], b: list[int]) -> int:
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def generate_row(model, prefix: torch.Tensor, m: int):
    """Greedy HF generate of m tokens after prefix [1, k]: explicit all-ones mask, no EOS, with its step logits."""
    gen = model.generate(
        prefix,
        attention_mask=torch.ones_like(prefix),
        max_new_tokens=m,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
    )
    assert gen.sequences.shape[1] == prefix.shape[1] + m, "generation stopped early"
    return gen.sequences[0, prefix.shape[1] :], torch.stack([lg[0] for lg in gen.logits])  # [m], [m, V]


def reference(
    model, seqs: torch.Tensor, k: int, m: int, w: int, tie_margin: float | None = None
) -> dict[str, np.ndarray]:
    """Row by row: HF generate (greedy, no EOS stop) for the continuation and its entropies, a forward for the
    rest, all statistics in fp64. near_tie: a generate step's top-1/top-2 margin below `tie_margin`, or below
    memwatch's fp32 tie_threshold of its top logit when None."""
    out: dict[str, list] = {n: [] for n in ("generated", "entropy", "suffix_nll", "near_tie")}
    model.eval()
    with torch.no_grad():
        for row in seqs:
            x = row[None, : k + m]
            tokens, step_logits = generate_row(model, x[:, :k], m)
            full = model(x).logits[0]  # [k+m, V]
            logp = torch.log_softmax(full.double(), dim=-1)
            nll = -logp[k - 1 : k + m - 1].gather(-1, x[0, k:, None]).squeeze(-1)
            top2 = step_logits.float().topk(2, dim=-1).values
            if tie_margin is None:
                from memwatch.engine.extraction import tie_threshold

                limit = tie_threshold(top2[:, 0], torch.float32)
            else:
                limit = tie_margin
            out["generated"].append(tokens.numpy())
            out["entropy"].append(
                torch.cat([fp64_entropy(full[k - w - 1 : k - 1]), fp64_entropy(step_logits)]).numpy()
            )
            out["suffix_nll"].append(nll.mean().item())
            out["near_tie"].append(bool((top2[:, 0] - top2[:, 1] < limit).any()))
    ref = {n: np.array(v) for n, v in out.items()}
    suffix = seqs[:, k : k + m].numpy()
    eq = ref["generated"] == suffix
    ref["exact"] = eq.all(1)
    ref["match_ratio"] = eq.mean(1)
    ref["prefix_match_len"] = np.array([m if r.all() else int(np.argmin(r)) for r in eq])
    ref["edit_similarity"] = np.array(
        [1 - levenshtein(list(g), list(s)) / m for g, s in zip(ref["generated"], suffix, strict=True)]
    )
    return ref


def assert_matches(res, ref: dict[str, np.ndarray]) -> None:
    np.testing.assert_array_equal(res.generated, ref["generated"])
    np.testing.assert_array_equal(res.exact, ref["exact"])
    np.testing.assert_array_equal(res.prefix_match_len, ref["prefix_match_len"])
    np.testing.assert_allclose(res.match_ratio, ref["match_ratio"], atol=1e-6)
    np.testing.assert_allclose(res.edit_similarity, ref["edit_similarity"], atol=1e-6)
    np.testing.assert_allclose(res.entropy, ref["entropy"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(res.suffix_nll, ref["suffix_nll"], atol=1e-4, rtol=0)
    np.testing.assert_array_equal(res.near_tie, ref["near_tie"])
