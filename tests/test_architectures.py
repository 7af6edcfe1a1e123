"""Extraction on every kind of causal LM, each built tiny from a config, against per-row HF `generate`.

Each architecture either equals `generate` (greedy, explicit all-ones attention mask, no EOS stop) token for token,
with entropies within 1e-4 nats (differences allowed only on near-tie rows) and suffix NLLs within 1e-4 of an
fp64 recomputation, on the decoding path its cache allows; or it is refused with a TypeError naming it. Panels
mix divergence points in one batch (stale cache slots masked), and include none- and all-memorized batches.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import numpy as np
import pytest
import torch
import transformers as tf
from _models import reference

import memwatch
from memwatch.engine.extraction import suffix_nll_after_prefix

K, M, W = 16, 16, 4
V = 300
COMMON = {"vocab_size": V, "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
DIVERGE = (
    0,
    2,
    5,
    9,
    13,
    15,
    16,
    0,
)  # first miss per row of the mixed panel (16: exact, 15: nothing to decode)


# transformers >= 4.56 caches have per-layer objects. Before, memwatch cannot tell a window that never slides
# from one that does, and GPT BigCode's legacy cache fuses keys and values: those recompute.
PER_LAYER_CACHES = hasattr(tf.cache_utils, "DynamicLayer")
LEGACY_RECOMPUTE = {"mistral-window48", "gemma3-window48", "gpt-bigcode-mqa"}


def _llama_like(cls: type, **kw: object) -> object:
    shape = {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        "max_position_embeddings": 128,
    }
    return cls(**{**shape, **kw}, **COMMON)


def _gemma(cls: type, window: int, **kw: object) -> object:
    return _llama_like(cls, head_dim=16, sliding_window=window, query_pre_attn_scalar=16, **kw)


# name -> (model from a config, decoding path of the mixed panel, path of the none-memorized panel)
ARCHS: dict[str, tuple[Callable[[], torch.nn.Module], str, str]] = {
    "gpt2": (
        lambda: tf.GPT2LMHeadModel(tf.GPT2Config(n_positions=128, n_embd=64, n_layer=2, n_head=4, **COMMON)),
        "cache-reuse",
        "cache-reuse",
    ),
    "gpt-neox": (
        lambda: tf.GPTNeoXForCausalLM(
            tf.GPTNeoXConfig(
                hidden_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=128,
                max_position_embeddings=128,
                **COMMON,
            )
        ),
        "cache-reuse",
        "cache-reuse",
    ),
    "llama": (lambda: tf.LlamaForCausalLM(_llama_like(tf.LlamaConfig)), "cache-reuse", "cache-reuse"),
    "qwen2": (lambda: tf.Qwen2ForCausalLM(_llama_like(tf.Qwen2Config)), "cache-reuse", "cache-reuse"),
    "qwen3": (
        lambda: tf.Qwen3ForCausalLM(_llama_like(tf.Qwen3Config, head_dim=16)),
        "cache-reuse",
        "cache-reuse",
    ),
    "phi3": (lambda: tf.Phi3ForCausalLM(_llama_like(tf.Phi3Config)), "cache-reuse", "cache-reuse"),
    # Sliding windows shorter than k + m slide during the extraction: the cache cannot be cropped back.
    "mistral-window8": (
        lambda: tf.MistralForCausalLM(_llama_like(tf.MistralConfig, sliding_window=8)),
        "recompute",
        "recompute",
    ),
    "gemma2-window8": (lambda: tf.Gemma2ForCausalLM(_gemma(tf.Gemma2Config, 8)), "recompute", "recompute"),
    "gemma3-window8": (
        lambda: tf.Gemma3ForCausalLM(
            _gemma(tf.Gemma3TextConfig, 8, layer_types=["sliding_attention", "full_attention"])
        ),
        "recompute",
        "recompute",
    ),
    # A window the extraction never reaches (k + 2m here) keeps every slot: the cache is reused.
    "mistral-window48": (
        lambda: tf.MistralForCausalLM(_llama_like(tf.MistralConfig, sliding_window=48)),
        "cache-reuse",
        "cache-reuse",
    ),
    "gemma3-window48": (
        lambda: tf.Gemma3ForCausalLM(
            _gemma(tf.Gemma3TextConfig, 48, layer_types=["sliding_attention", "full_attention"])
        ),
        "cache-reuse",
        "cache-reuse",
    ),
    "opt": (
        lambda: tf.OPTForCausalLM(
            tf.OPTConfig(
                hidden_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                ffn_dim=128,
                word_embed_proj_dim=64,
                max_position_embeddings=128,
                **COMMON,
            )
        ),
        "cache-reuse",
        "cache-reuse",
    ),
    # ALiBi without position ids: stale slots would shift its distances, so mixed divergence points recompute.
    "bloom": (
        lambda: tf.BloomForCausalLM(tf.BloomConfig(hidden_size=64, n_layer=2, n_head=4, **COMMON)),
        "recompute",
        "cache-reuse",
    ),
    "mpt": (
        lambda: tf.MptForCausalLM(
            tf.MptConfig(d_model=64, n_heads=4, n_layers=2, expansion_ratio=2, max_seq_len=128, **COMMON)
        ),
        "recompute",
        "cache-reuse",
    ),
    "falcon": (
        lambda: tf.FalconForCausalLM(
            tf.FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, **COMMON)
        ),
        "cache-reuse",
        "cache-reuse",
    ),
    "gpt-j": (
        lambda: tf.GPTJForCausalLM(
            tf.GPTJConfig(n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=128, **COMMON)
        ),
        "cache-reuse",
        "cache-reuse",
    ),
    "gpt-bigcode-mqa": (
        lambda: tf.GPTBigCodeForCausalLM(
            tf.GPTBigCodeConfig(n_embd=64, n_layer=2, n_head=4, n_positions=128, multi_query=True, **COMMON)
        ),
        "cache-reuse",
        "cache-reuse",
    ),
    # Recurrent state: nothing to crop.
    "mamba": (
        lambda: tf.MambaForCausalLM(
            tf.MambaConfig(hidden_size=64, num_hidden_layers=2, state_size=8, expand=2, **COMMON)
        ),
        "recompute",
        "recompute",
    ),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Models this small gain nothing from a second thread, and on a shared 2-core machine the threads' waiting
    for each other costs several times the work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    try:
        return ARCHS[name][0]().eval()
    except AttributeError as exc:  # an architecture this transformers version does not have yet
        pytest.skip(str(exc))


def panels(model: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Rows [n, k+m] whose suffix follows the model's greedy continuation up to a chosen first miss d, then departs
    from it (a different token at d, random after): mixed d in one batch, d = 0 everywhere, and no miss at all."""
    g = torch.Generator().manual_seed(seed)
    spec = {"mixed": DIVERGE, "none memorized": (0, 0, 0, 0), "all memorized": (M, M, M, M)}
    prefixes = torch.randint(0, V, (sum(len(d) for d in spec.values()), K), generator=g)
    with torch.no_grad():
        greedy = model.generate(
            prefixes, attention_mask=torch.ones_like(prefixes), max_new_tokens=M, do_sample=False
        )[:, K:]
    out, i = {}, 0
    for name, points in spec.items():
        rows = []
        for d in points:
            suffix = greedy[i].clone()
            if d < M:
                suffix[d] = (suffix[d] + 1 + torch.randint(0, V - 1, (1,), generator=g)) % V
                suffix[d + 1 :] = torch.randint(0, V, (M - d - 1,), generator=g)
            rows.append(torch.cat([prefixes[i], suffix]))
            i += 1
        out[name] = torch.stack(rows)
    return out


def assert_agrees(res: memwatch.ExtractionResult, ref: dict[str, np.ndarray]) -> None:
    differ = (res.generated != ref["generated"]).any(axis=1)
    assert res.near_tie[differ].all(), (
        f"rows {np.flatnonzero(differ & ~res.near_tie)} differ without a near tie"
    )
    same = ~differ
    np.testing.assert_array_equal(res.prefix_match_len[same], ref["prefix_match_len"][same])
    np.testing.assert_array_equal(res.exact[same], ref["exact"][same])
    np.testing.assert_allclose(res.entropy[same], ref["entropy"][same], atol=1e-4, rtol=0)
    np.testing.assert_allclose(res.suffix_nll, ref["suffix_nll"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", list(ARCHS))
def test_architecture_matches_generate(name):
    model = build(name)
    _, mixed_path, none_path = ARCHS[name]
    batches = panels(model)
    ref = reference(model, torch.cat(list(batches.values())), K, M, W, tie_margin=0.0)  # ties: the engine's
    start = 0
    for panel, x in batches.items():
        res = memwatch.extract(model, x, prefix_len=K, suffix_len=M, entropy_window=W)
        rows = slice(start, start + len(x))
        assert_agrees(res, {key: value[rows] for key, value in ref.items()})
        start += len(x)
        expected = {"mixed": mixed_path, "none memorized": none_path, "all memorized": "none"}[panel]
        if name in LEGACY_RECOMPUTE and not PER_LAYER_CACHES and expected != "none":
            expected = "recompute"
        assert res.decoding == expected, (panel, res.decoding)
        if panel == "mixed":  # the panel really holds the divergence points it was built with
            np.testing.assert_array_equal(res.prefix_match_len, DIVERGE)
    assert res.exact.all()


@pytest.mark.parametrize("name", ["gpt2", "mistral-window8", "mpt", "mamba"])
def test_prefix_shared_suffix_nll_matches_fp64(name):
    """Exposure's NLLs reuse the prefix's cache where it is a plain buffer, else run prefix + suffix whole."""
    model = build(name)
    g = torch.Generator().manual_seed(1)
    prefix = torch.randint(0, V, (K,), generator=g)
    suffixes = torch.randint(0, V, (5, M), generator=g)
    got = suffix_nll_after_prefix(model, prefix, suffixes, batch_size=2)
    with torch.no_grad():
        logits = model(torch.cat([prefix.expand(5, K), suffixes], 1)).logits.double()
    logp = torch.log_softmax(logits[:, K - 1 : -1], -1).gather(-1, suffixes[..., None]).squeeze(-1)
    np.testing.assert_allclose(got, -logp.mean(1).numpy(), atol=1e-4, rtol=0)


def test_a_model_that_can_neither_reuse_its_cache_nor_generate_is_refused_by_name():
    model = build("mamba")
    model.can_generate = lambda: False  # e.g. a custom class without GenerationMixin
    batches = panels(build("mamba"))
    with pytest.raises(TypeError, match="MambaForCausalLM"):
        memwatch.extract(model, batches["mixed"], prefix_len=K, suffix_len=M, entropy_window=W)
    # Nothing to decode needs no decoding path.
    assert (
        memwatch.extract(model, batches["mixed"], prefix_len=K, suffix_len=M, mode="exact").decoding == "none"
    )
    assert memwatch.extract(model, batches["all memorized"], prefix_len=K, suffix_len=M).exact.all()


def test_the_path_follows_the_cache_the_model_returned():
    from memwatch.engine.extraction import _choose_path
    from memwatch.engine.modeling import inspect_model, output_cache, reusable_cache

    def returned_cache(info):
        with torch.no_grad():
            out = info.call(input_ids=torch.zeros(1, 4, dtype=torch.long), use_cache=True, return_dict=True)
        return output_cache(out, info.model)

    llama, mamba = inspect_model(build("llama")), inspect_model(build("mamba"))
    steps = [3, 3]
    assert (
        _choose_path(llama, None, steps, K, M) == "recompute"
    )  # no cache returned: never decode without one
    assert _choose_path(llama, None, [], K, M) == "none"
    assert _choose_path(llama, returned_cache(llama), steps, K, M) == "cache-reuse"
    assert not reusable_cache(returned_cache(mamba), mamba.config, 64)
    assert _choose_path(mamba, returned_cache(mamba), steps, K, M) == "recompute"
    # Caches without per-layer objects (transformers < 4.56) say nothing about windows: a windowed config is not
    # trusted, and only (key, value) pairs of 4-D tensors can be sliced as such.
    legacy = ((torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 4, 8)),)
    assert reusable_cache(legacy, llama.config, 64)
    assert not reusable_cache(legacy, _llama_like(tf.MistralConfig, sliding_window=4096), 64)
    assert not reusable_cache((torch.zeros(1, 4, 16),), llama.config, 64)  # GPT BigCode's fused key-values


def test_the_models_own_generation_settings_do_not_change_the_recomputed_continuation():
    """A checkpoint's generation config (EOS, repetition penalty, minimum length) is not greedy decoding: the
    slower path runs `generate` without it, and puts it back."""
    model = build("mistral-window8")
    x = panels(model)["mixed"]
    ref = reference(model, x, K, M, W, tie_margin=0.0)
    settings = model.generation_config
    settings.repetition_penalty, settings.eos_token_id, settings.min_new_tokens = (
        3.0,
        int(ref["generated"][0, 3]),
        4,
    )
    before = settings.to_dict()
    res = memwatch.extract(model, x, prefix_len=K, suffix_len=M, entropy_window=W)
    assert res.decoding == "recompute"
    assert_agrees(res, ref)
    assert model.generation_config is settings and settings.to_dict() == before


# --- synced forwards under FSDP -------------------------------------------------------------------------------


def _fsdp_worker(rank: int, world: int, store: str, kind: str, name: str, out: str) -> None:
    import torch.distributed as dist

    from memwatch.live.distributed import Sync

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    model = build(name)  # the same weights on every rank
    x = panels(model)["mixed"]
    # Rank 0: five divergence points over two batches; rank 1: one batch with nothing to decode.
    mine = x[:5] if rank == 0 else x[5:7]
    if kind == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel

        model = FullyShardedDataParallel(model, device_id=torch.device("cpu"), use_orig_params=True)
    else:
        from torch.distributed.fsdp import fully_shard

        blocks = next(mod for mod in model.modules() if isinstance(mod, torch.nn.ModuleList))
        for block in blocks:
            fully_shard(block)
        fully_shard(model)
    res = memwatch.extract(
        model,
        mine,
        prefix_len=K,
        suffix_len=M,
        entropy_window=W,
        batch_size=3,
        sync=Sync(torch.device("cpu")),
    )
    np.savez(
        os.path.join(out, f"{rank}.npz"), generated=res.generated, entropy=res.entropy, decoding=res.decoding
    )
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["fsdp1", "fsdp2"])
@pytest.mark.parametrize("name", ["mistral-window8", "gpt2"])
def test_sharded_ranks_stay_in_step_on_either_path(kind, name, tmp_path):
    """Ranks with different work (divergence points, batches) keep the same number of forward calls; a rank
    that fell out of step would leave the other waiting in a collective, so a hang is a failure here."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(
        _fsdp_worker, args=(2, str(tmp_path / "store"), kind, name, str(tmp_path)), nprocs=2, join=False
    )
    deadline = time.monotonic() + 300
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{kind} ranks did not finish: forward calls out of step")
    model = build(name)
    base = memwatch.extract(model, panels(model)["mixed"][:7], prefix_len=K, suffix_len=M, entropy_window=W)
    got = [np.load(tmp_path / f"{r}.npz") for r in (0, 1)]
    np.testing.assert_array_equal(np.concatenate([g["generated"] for g in got]), base.generated)
    np.testing.assert_allclose(np.concatenate([g["entropy"] for g in got]), base.entropy, atol=1e-5)
    assert str(got[0]["decoding"]) == base.decoding and str(got[1]["decoding"]) == "none"
