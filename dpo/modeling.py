"""Loading a causal LM and its tokenizer from a local directory, a hub name, the shipped demo model, or a LoRA
adapter directory (its base model with the adapter merged in). Every adapter directory is read here, also the ones
dpo.lora trains from."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn
from transformers import (MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig, AutoModelForCausalLM, AutoTokenizer,
                          PreTrainedTokenizerBase)

from dpo.errors import UserError, first_line
from dpo.gguf import SHIPPED_GGUF, gguf_source, is_gguf, resolve_gguf

DEMO_MODEL_DIR = Path(__file__).resolve().parent / "demo" / "assets" / "sft"


class ModelLoadError(UserError):
    """A model or tokenizer that cannot be loaded, named in one line."""


class LoraError(UserError):
    """A LoRA setting or adapter that cannot work, in one line."""


ADAPTER_CONFIG = "adapter_config.json"  # what makes a directory a LoRA adapter (peft)
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")  # the files peft reads its weights from
DEFAULT_ADAPTER = "default"  # peft's name of a model's adapter: a loaded one, the one LoRA trains


def names_shipped_model(name: str) -> bool:
    """Whether --model is a name this package ships a model under ('demo', a shipped GGUF model's): it stands for
    that model, also where the working directory holds a directory of that name (`./demo` reaches the directory)."""
    return name == "demo" or name in SHIPPED_GGUF


def resolve_model_path(name: str) -> str:
    """'demo' -> the shipped SFT model; a GGUF file or a shipped GGUF model's name -> its converted directory
    (dpo.gguf, converted on first use); an existing model or adapter directory -> itself; else a hub name."""
    if is_gguf(name):
        return resolve_gguf(name)
    if name == "demo":
        if not (DEMO_MODEL_DIR / "config.json").is_file():
            raise ModelLoadError(f"the shipped demo model is missing from {DEMO_MODEL_DIR.name}/ (reinstall the "
                                 "package)")
        return str(DEMO_MODEL_DIR)
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"model {name}: not a directory")
        if not (path / "config.json").is_file() and not (path / ADAPTER_CONFIG).is_file():
            raise ModelLoadError(f"model {name}: no config.json (or {ADAPTER_CONFIG}) in this directory")
        return str(path)
    looks_local = name.startswith((".", "/", "~")) or name.endswith(os.sep) or name.count("/") > 1
    if looks_local:
        raise ModelLoadError(f"model directory {name} does not exist")
    return name  # a hub name such as lxuechen/phi-2-sft


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model")


@contextlib.contextmanager
def naming_adapter(path: str | Path) -> Iterator[None]:
    """A ModelLoadError of an adapter's base model names the adapter, which the user gave, as well as its base."""
    try:
        yield
    except ModelLoadError as error:
        raise ModelLoadError(f"adapter {path}: its base model {adapter_base(path)} ({ADAPTER_CONFIG}) cannot be "
                             f"loaded: {error}") from None


def require_tokenizer_files(path: str, what: str) -> None:
    """A ModelLoadError naming `what` where the local directory `path` holds no tokenizer files (a hub name passes:
    its files are fetched)."""
    if Path(path).is_dir() and not any((Path(path) / f).is_file() for f in TOKENIZER_FILES):
        raise ModelLoadError(f"{what}: no tokenizer files in this directory (expected one of "
                             f"{', '.join(TOKENIZER_FILES)}); save the tokenizer next to the model")


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """The tokenizer saved with a model; for an adapter directory without one, its base model's."""
    path = resolve_model_path(name)
    has_files = any((Path(path) / f).is_file() for f in TOKENIZER_FILES)
    if Path(path).is_dir() and not has_files and (Path(path) / ADAPTER_CONFIG).is_file():
        with naming_adapter(path):
            return load_tokenizer(adapter_base(path))
    require_tokenizer_files(path, f"model {name}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as error:  # transformers raises OSError, ValueError, TypeError... for a missing tokenizer
        raise ModelLoadError(f"model {name}: no usable tokenizer ({first_line(error)})") from None
    if tokenizer.eos_token_id is None:
        raise ModelLoadError(f"model {name}: the tokenizer has no EOS token; responses could not be terminated")
    if tokenizer.pad_token_id is None:
        # Masks are built from lengths, never from pad ids, so any id pads safely; EOS is the usual choice.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def attention_implementation(config) -> str:
    """'sdpa', unless the model's attention is one SDPA cannot compute: soft-capped attention scores
    (`attn_logit_softcapping`, Gemma-2), or an architecture whose transformers class has no SDPA path. Then
    'eager', the architecture's own. Packed layouts (dpo.packing) need 'sdpa'."""
    if getattr(config, "attn_logit_softcapping", None) is not None:
        return "eager"
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    # an unknown architecture is left to from_pretrained, which names the problem
    return "eager" if model_class is not None and not getattr(model_class, "_supports_sdpa", True) else "sdpa"


def model_placement(device: torch.device | str, quantization: Any = None) -> dict[str, Any]:
    """from_pretrained's placement arguments. A quantized model is placed as it loads (it must be); so is any model
    on an accelerator where accelerate is installed (peft installs it): the weights go from the memory-mapped file
    straight to the device, where without a device map transformers first builds the whole model in host memory,
    11 GB in fp32 for phi-2 in every process under torchrun. A CPU model loads as before and needs no accelerate."""
    device = torch.device(device)
    direct = quantization is not None or (device.type != "cpu" and importlib.util.find_spec("accelerate") is not None)
    placement: dict[str, Any] = {"device_map": {"": device}} if direct else {}
    if quantization is not None:
        placement["quantization_config"] = quantization
    return placement


def load_causal_lm(name: str, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                   quantization: Any = None):
    """The causal LM of `name`; an adapter directory gives its base with the adapter merged in. `quantization`:
    a transformers quantization config (bitsandbytes), the model then placed on `device` as it loads."""
    path = resolve_model_path(name)
    if Path(path).is_dir() and (Path(path) / ADAPTER_CONFIG).is_file() and not (Path(path) / "config.json").is_file():
        return load_adapter_model(path, dtype=dtype, device=device)
    placement = model_placement(device, quantization)
    try:
        config = AutoConfig.from_pretrained(path)
        # SDPA kernels accumulate QK^T in fp32, which keeps Phi-2's attention from overflowing in fp16.
        model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype,
                                                     attn_implementation=attention_implementation(config), **placement)
    except Exception as error:
        raise ModelLoadError(f"model {name}: could not be loaded ({first_line(error)})") from None
    if is_gguf(name):  # what an adapter trained on it records as its base: the name, not the cache directory
        model.name_or_path = model.config._name_or_path = gguf_source(name)
    return model if placement else model.to(device)


def embedding_rows(model: Any) -> int | None:
    """How many token ids the model embeds (its input embedding's rows); None for a model without such a table."""
    get = getattr(model, "get_input_embeddings", None)
    return getattr(get(), "num_embeddings", None) if callable(get) else None


def foreign_token(tokenizer: Any, ids: list[int], rows: int | None) -> str | None:
    """Why `ids` cannot be embedded by a model of `rows` token embeddings (the first id beyond them, as the
    tokenizer writes it), or None where they all can: the embedding lookup would fail mid-run (a device assert on
    CUDA). Its cause: a tokenizer of another model, or tokens added to it without resizing the model."""
    beyond = next((i for i in ids if rows is not None and i >= rows), None)
    if beyond is None:
        return None
    return (f"token id {beyond} ({tokenizer.convert_ids_to_tokens(beyond)!r}) is beyond the model's {rows} token "
            "embeddings: the tokenizer is another model's, or has tokens added without resizing the model")


def enable_gradient_checkpointing(model: Any) -> None:
    """Recompute activations in backward (non-reentrant), by the name transformers >= 5 gives it or the older one."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def local_model_path(model: str) -> str | None:
    """Where `model` (--model, --adapter, a base) is a local path, the path from anywhere (a run's record and its
    adapter's base name it so, for dpo.evaluate, implicit judges and generate.py run from elsewhere); None for the
    demo, a shipped model's name or a hub name."""
    path = Path(model).expanduser()
    return None if model == "demo" or not path.exists() else str(path.resolve())


def is_adapter_dir(path: str | Path) -> bool:
    """Whether `path` is a LoRA adapter directory (it has an adapter_config.json)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_base(path: str | Path) -> str:
    """The base model an adapter directory was trained on (its adapter_config.json)."""
    file = Path(path) / ADAPTER_CONFIG
    try:
        base = json.loads(file.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise LoraError(f"{file}: cannot be read ({first_line(error)})") from None
    if not base:
        raise LoraError(f"{file}: names no base model (base_model_name_or_path)")
    return base


BITSANDBYTES_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
KERNELS_HUB_LOGGER = "kernels._internals.hf_hub"


def quiet_bitsandbytes() -> None:
    """Call before anything imports bitsandbytes (peft does, where it is installed): its CPU backend logs a warning
    at import when it cannot fetch an optional hub kernel for 4-bit matmuls on the CPU, also on a CUDA machine; no
    run of this project uses one, so that logger keeps only its errors; so does the `kernels` package's, which
    says offline that it skips that kernel's publisher check."""
    for name in (BITSANDBYTES_CPU_LOGGER, KERNELS_HUB_LOGGER):
        logging.getLogger(name).setLevel(logging.ERROR)


def decoder_body(model: nn.Module) -> nn.Module:
    """The causal LM's transformer body, whose output is the last hidden state: `base_model`, or `model` where
    base_model_prefix names no attribute and base_model is the LM itself (Llama-4 and Mllama keep their body as
    `.model`). A body that cannot be found raises AttributeError."""
    body = model.base_model
    if body is model:
        body = getattr(model, "model", None)
        if not isinstance(body, nn.Module):
            raise AttributeError(f"{type(model).__name__} has no transformer body to read hidden states from")
    return body


def rope_switch_length(config: Any) -> int | None:
    """The sequence length beyond which the model's rotary frequencies change, for every sequence of a forward at
    once (transformers' longrope picks its long factors from the forward's largest position: Phi-3 and Phi-4-mini's
    long-context models), or None."""
    parameters = getattr(config, "rope_parameters", None)
    if not isinstance(parameters, dict):
        return None
    per_layer_type = parameters and all(isinstance(value, dict) for value in parameters.values())
    lengths = [p.get("original_max_position_embeddings") for p in (parameters.values() if per_layer_type else
                                                                   [parameters])
               if p.get("rope_type") == "longrope"]
    lengths = [length for length in lengths if isinstance(length, int)]
    return min(lengths) if lengths else None


def import_peft() -> Any:
    """peft, imported where a run needs it (it is heavy), bitsandbytes' CPU-kernel warning kept out."""
    quiet_bitsandbytes()
    import peft  # heavy: only LoRA runs and adapter directories need it

    return peft


@contextlib.contextmanager
def quiet_peft() -> Iterator[None]:
    """peft asks transformers' deprecated is_gradient_checkpointing: a warning that is neither ours nor the user's."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def load_peft_adapter(loader: Any, base: nn.Module | None, path: str, name: str, *, trainable: bool) -> Any:
    """The adapter directory `path` loaded as adapter `name` by peft's `loader`: PeftModel (onto `base`, giving the
    PeftModel) or a PeftModel's load_adapter (`base` None). A LoraError where `path` is not an adapter directory or
    does not fit the base."""
    if not is_adapter_dir(path):
        raise LoraError(f"adapter {path}: not an adapter directory (no {ADAPTER_CONFIG})")
    check_adapter_weights(path)
    try:
        with quiet_peft():
            if base is not None:
                return loader.from_pretrained(base, path, adapter_name=name, is_trainable=trainable)
            return loader(path, adapter_name=name, is_trainable=trainable)
    except Exception as error:  # peft raises RuntimeError (size mismatch), KeyError, ValueError...
        raise LoraError(f"adapter {path} does not fit this base model, trained on {adapter_base(path)} "
                        f"({first_line(error)})") from None


def check_adapter_weights(path: str) -> None:
    """A LoraError naming the file where an adapter directory (a local one) has no weights file, or a safetensors
    file that cannot be read whole (cut short by a full disk or a copy that stopped): peft would report either as
    an adapter that does not fit its base."""
    directory = Path(path)
    if not directory.is_dir():
        return  # a hub adapter: its files are fetched, and checked, by peft
    present = [directory / name for name in ADAPTER_WEIGHTS if (directory / name).is_file()]
    if not present:
        raise LoraError(f"adapter {path}: no weights ({' or '.join(ADAPTER_WEIGHTS)})")
    if present[0].suffix == ".safetensors":
        try:
            with safe_open(present[0], framework="pt") as weights:
                weights.keys()
        except Exception as error:  # safetensors' own error type, or an OSError
            raise LoraError(f"adapter {path}: {present[0].name} cannot be read ({first_line(error)}); it is cut "
                            "short or damaged") from None


def load_adapter_model(path: str, *, dtype: torch.dtype, device: torch.device | str) -> nn.Module:
    """An adapter directory as a plain causal LM: its base (adapter_config.json) with the adapter merged in."""
    with naming_adapter(path):
        base = load_causal_lm(adapter_base(path), dtype=dtype, device=device)
    merged = load_peft_adapter(import_peft().PeftModel, base, path, DEFAULT_ADAPTER, trainable=False).merge_and_unload()
    return merged.requires_grad_(True)  # as any model from_pretrained loads (peft froze the base): it may train
