"""Model introspection and state preservation: unwrap, check the model is a causal LM, restore what we touch."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "ModelInfo",
    "inspect_model",
    "preserved_state",
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
    config: object
    class_name: str
    vocab_size: int
    position_limit: int | None
    device: torch.device
    param_dtype: torch.dtype
    logits_kwarg: str | None  # "logits_to_keep", "num_logits_to_keep" or None (full logits, then sliced)
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
    hidden = _cfg(config, "hidden_size", "n_embd", "d_model", default=0) or 0
    n_heads = _cfg(config, "num_attention_heads", "n_head", default=1) or 1
    head_dim = _cfg(config, "head_dim", default=hidden // n_heads if hidden else 0) or 0
    kv_heads = _cfg(config, "num_key_value_heads", default=n_heads) or n_heads
    return ModelInfo(
        call=call,
        config=config,
        class_name=name,
        vocab_size=int(vocab),
        position_limit=_cfg(config, *_POSITION_LIMIT_ATTRS),
        device=weight.device,
        param_dtype=weight.dtype,
        logits_kwarg=logits_kwarg,
        n_layers=_cfg(config, "num_hidden_layers", "n_layer", "num_layers", default=1) or 1,
        hidden_size=hidden,
        kv_dim=kv_heads * head_dim,
        intermediate_size=_cfg(config, "intermediate_size", "n_inner", "ffn_dim", default=4 * hidden)
        or 4 * hidden,
        n_heads=n_heads,
    )


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
