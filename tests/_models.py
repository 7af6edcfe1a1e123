"""Tiny causal LMs built from configs (no hub access), and a model trained here to memorize some rows."""

from __future__ import annotations

import functools

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
    model = tiny_model(arch, seed=1)
    train, _ = memorizing_panel(k, m)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        batch = train[torch.randperm(len(train), generator=g)]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()
