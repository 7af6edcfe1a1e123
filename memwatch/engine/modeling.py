"""Model introspection and state preservation: unwrap, check the model is a causal LM, restore what we touch."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = [
    "ModelInfo",
    "generation_scope",
    "inspect_model",
    "output_cache",
    "preserved_state",
    "reusable_cache",
    "unwrap_model",
]

# Class-name fragments of wrappers whose `.module` is the real model and whose forward must *not* be called
# from one rank only: DDP's forward may broadcast buffers (a collective), DeepSpeed's engine does bookkeeping.
_CONTAINER_NAMES = ("DistributedDataParallel", "DataParallel", "DeepSpeedEngine", "PipelineEngine")
# Wrappers that must stay in the call path (they gather sharded parameters in forward) but whose
# `.module` is the model to inspect.
_SHARDING_NAMES = ("FullyShardedDataParallel",)
_POSITION_LIMIT_ATTRS = ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "seq_length")


def unwrap_model(model: nn.Module) -> nn.Module:
    """Return the module to call: DDP / DataParallel / DeepSpeed engines and `torch.compile` wrappers removed.

    FSDP wrappers are kept, because their forward gathers the sharded parameters.
    An Accelerate mixed-precision forward patch is kept too: extraction then runs at the training precision.
    """
    seen: set[int] = set()
    while id(model) not in seen:
        seen.add(id(model))
        name = type(model).__name__
        orig = getattr(model, "_orig_mod", None)  # torch.compile's OptimizedModule
        if isinstance(orig, nn.Module):
            model = orig
        elif name in _CONTAINER_NAMES and isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
    return model


def _inspected(model: nn.Module) -> nn.Module:
    """The module that carries the HF config: through FSDP and PEFT wrappers, without changing the call path."""
    seen: set[int] = set()
    while id(model) not in seen:
        seen.add(id(model))
        if type(model).__name__ in _SHARDING_NAMES and isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        elif callable(getattr(model, "get_base_model", None)):  # PEFT
            model = model.get_base_model()
    return model


@dataclass(frozen=True)
class ModelInfo:
    """What the engine needs to know about a model, read once per call."""

    call: nn.Module  # the module whose forward we call
    model: nn.Module  # the Hugging Face model inside it (the one with `generate`)
    config: object
    class_name: str
    vocab_size: int
    position_limit: int | None
    device: torch.device
    param_dtype: torch.dtype
    logits_kwarg: str | None  # "logits_to_keep", "num_logits_to_keep" or None (full logits, then sliced)
    cache_kwarg: str | None  # "cache" (transformers 5), "past_key_values" (4.x) or None (none to pass back)
    takes_position_ids: bool  # forward accepts explicit position ids (needed to decode past masked slots)
    n_layers: int
    hidden_size: int
    kv_dim: int  # key/value width per layer (kv heads × head dim)
    intermediate_size: int
    n_heads: int


def _causal_lm_names() -> set[str]:
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:  # pragma: no cover - very old transformers
        return set()
    names: set[str] = set()
    for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        names.update([value] if isinstance(value, str) else value)
    return names


def _cfg(config: object, *names: str, default: int | None = None) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return default


def inspect_model(model: nn.Module) -> ModelInfo:
    """Check that `model` is a Hugging Face causal LM we can decode, and read its shape.

    Raises TypeError with what is supported otherwise.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"memwatch.extract needs a torch.nn.Module (a Hugging Face causal LM such as GPT2LMHeadModel, "
            f"GPTNeoXForCausalLM or LlamaForCausalLM); got {type(model).__name__}."
        )
    call = unwrap_model(model)
    inner = _inspected(call)
    name = type(inner).__name__
    config = getattr(inner, "config", None)
    supported = (
        "memwatch decodes Hugging Face causal language models (AutoModelForCausalLM: GPT-2, GPT-NeoX/Pythia, "
        "Llama/SmolLM, Mistral, Qwen, ...)"
    )
    if config is None:
        raise TypeError(f"{supported}; {name} has no Hugging Face `config`.")
    if getattr(config, "is_encoder_decoder", False):
        raise TypeError(
            f"{supported}; {name} is an encoder-decoder model. Load it with AutoModelForCausalLM."
        )
    can_generate = getattr(inner, "can_generate", None)
    # Older transformers report can_generate() for masked LMs that keep a legacy prepare_inputs_for_generation.
    masked = "MaskedLM" in name or "ForMaskedLM" in name
    is_causal = name in _causal_lm_names() or (callable(can_generate) and bool(can_generate()) and not masked)
    if not is_causal or inner.get_output_embeddings() is None:
        raise TypeError(
            f"{supported}; {name} is not one (an encoder-only, masked or headless model cannot continue a "
            f"prefix greedily). Load the checkpoint with AutoModelForCausalLM."
        )
    emb = inner.get_input_embeddings()
    weight = getattr(emb, "weight", None)
    if weight is None:
        param = next(inner.parameters(), None)
        if param is None:
            raise TypeError(f"{name} has no parameters to run.")
        weight = param
    vocab = _cfg(config, "vocab_size") or int(inner.get_output_embeddings().weight.shape[0])
    params = inspect.signature(inner.forward).parameters
    logits_kwarg = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None)
    # transformers 5 renames `past_key_values` to `cache` (the old name warns, and goes in 5.40): the signature
    # says which one this version's forward takes.
    cache_kwarg = next((k for k in ("cache", "past_key_values") if k in params), None)
    hidden = _cfg(config, "hidden_size", "n_embd", "d_model", default=0) or 0
    n_heads = _cfg(config, "num_attention_heads", "n_head", default=1) or 1
    head_dim = _cfg(config, "head_dim", default=hidden // n_heads if hidden else 0) or 0
    kv_heads = _cfg(config, "num_key_value_heads", default=n_heads) or n_heads
    return ModelInfo(
        call=call,
        model=inner,
        config=config,
        class_name=name,
        vocab_size=int(vocab),
        position_limit=_cfg(config, *_POSITION_LIMIT_ATTRS),
        device=weight.device,
        param_dtype=weight.dtype,
        logits_kwarg=logits_kwarg,
        cache_kwarg=cache_kwarg,
        takes_position_ids="position_ids" in params,
        n_layers=_cfg(config, "num_hidden_layers", "n_layer", "num_layers", default=1) or 1,
        hidden_size=hidden,
        kv_dim=kv_heads * head_dim,
        intermediate_size=_cfg(config, "intermediate_size", "n_inner", "ffn_dim", default=4 * hidden)
        or 4 * hidden,
        n_heads=n_heads,
    )


def output_cache(output: Any, model: object = None) -> object | None:
    """The cache a forward returned, or None. Read by key: transformers 5 keeps `past_key_values` only as a
    deprecated property (it warns, and goes in 5.40), while 4.x outputs have no `cache` field.

    transformers 4.x models that take Cache objects still return the legacy tuple format unless given a Cache, and
    warn when the tuple is passed back: theirs is returned as the DynamicCache they expect.
    """
    keys = set(output.keys()) if callable(getattr(output, "keys", None)) else set()
    cache = next((output[key] for key in ("cache", "past_key_values") if key in keys), None)
    dynamic = _cache_classes().get("DynamicCache")
    if isinstance(cache, tuple) and getattr(model, "_supports_cache_class", False) and dynamic is not None:
        return dynamic.from_legacy_cache(cache)
    return cache


def _cache_classes() -> dict[str, type]:
    try:
        from transformers import cache_utils
    except ImportError:  # pragma: no cover - transformers is how these models exist at all
        return {}
    names = ("DynamicCache", "DynamicLayer", "DynamicSlidingWindowLayer")
    return {n: getattr(cache_utils, n) for n in names if hasattr(cache_utils, n)}


def _windowed(config: object) -> bool:
    """Whether a config declares sliding or local attention anywhere (for caches that do not say per layer)."""
    layer_types = getattr(config, "layer_types", None) or ()
    attention_layers = getattr(config, "attention_layers", None) or ()  # GPT-Neo: "global" / "local"
    return (
        getattr(config, "sliding_window", None) is not None
        or any(t != "full_attention" for t in layer_types)
        or "local" in attention_layers
    )


def _key_value_pairs(cache: object) -> bool:
    """A legacy cache of one (key, value) pair of [batch, heads, slots, dim] tensors per layer (not, e.g., GPT
    BigCode's fused key-value tensors, which slicing by pairs would mangle)."""
    return isinstance(cache, tuple | list) and all(
        isinstance(layer, tuple | list) and len(layer) == 2 and all(getattr(t, "ndim", 0) == 4 for t in layer)
        for layer in cache
    )


def reusable_cache(cache: object, config: object, slots: int) -> bool:
    """Whether a cache is a plain append buffer that may be cropped, row-selected and extended to `slots` positions.

    Exact classes only, since a subclass may add state those operations do not know about (quantized, offloaded,
    indexer keys): transformers' DynamicCache whose layers are all plain key/value lists (DynamicLayer), or
    sliding-window layers whose window `slots` never reaches (they then keep every slot and mask none). Caches
    without per-layer objects (transformers < 4.56: a legacy tuple or a DynamicCache of lists) qualify only for
    models with no sliding or local window, since the window is then applied by the model, from slot positions.
    Recurrent state, static, hybrid or quantized caches never qualify.
    """
    classes = _cache_classes()
    dynamic = classes.get("DynamicCache")
    layers = getattr(cache, "layers", None)
    if layers is None:
        return (_key_value_pairs(cache) or type(cache) is dynamic) and not _windowed(config)
    if type(cache) is not dynamic or getattr(cache, "offloading", False) or not layers:
        return False
    plain, sliding = classes.get("DynamicLayer"), classes.get("DynamicSlidingWindowLayer")

    def unslid(layer: object) -> bool:
        return not getattr(layer, "record_past", False) and slots < layer.sliding_window  # type: ignore[attr-defined]

    return all(type(layer) is plain or (type(layer) is sliding and unslid(layer)) for layer in layers)


# Generation settings that say how the model must be run rather than which token it picks (transformers 4.x
# Gemma 2, for one, needs its "hybrid" cache): kept from the model's own generation config.
_RUN_SETTINGS = ("cache_implementation", "cache_config")


@contextlib.contextmanager
def generation_scope(info: ModelInfo, **settings: Any) -> Iterator[Any]:
    """Where `info.model.generate` may run as plain greedy decoding, leaving the model as found. Yields the
    GenerationConfig to pass: `settings` plus the model's _RUN_SETTINGS.

    The model's own generation config is swapped for that one for the duration, since `generate` (5.x) fills every
    setting the passed config leaves unset from the model's: a checkpoint's repetition penalty, EOS or minimum
    length would otherwise change the continuation. Under FSDP (version 1) the root wrapper's own parameters are
    gathered too, since `generate` calls the inner model and so bypasses the wrapper's forward, which gathers them.
    """
    from transformers import GenerationConfig

    model = info.model
    saved = model.generation_config
    run = {name: getattr(saved, name) for name in _RUN_SETTINGS if getattr(saved, name, None) is not None}
    config = GenerationConfig(**run, **settings)
    model.generation_config = config
    try:
        if type(info.call).__name__ in _SHARDING_NAMES:
            with type(info.call).summon_full_params(info.call, recurse=False, writeback=False):
                yield config
        else:
            yield config
    finally:
        model.generation_config = saved


@contextlib.contextmanager
def preserved_state(model: nn.Module) -> Iterator[None]:
    """Run a block in eval mode without grad and give the model back exactly as found.

    Restored: every submodule's training flag (not a blanket `train()`, which would wake frozen parts),
    the CPU and CUDA RNG states, and the grad mode. The config is never written, so `use_cache` and the
    gradient-checkpointing switches stay as they were.
    """
    flags = [(mod, mod.training) for mod in model.modules()]
    cpu_rng = torch.get_rng_state()
    cuda_rng = (
        torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    )
    try:
        model.eval()
        with torch.no_grad():
            yield
    finally:
        for mod, flag in flags:
            mod.training = flag
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
