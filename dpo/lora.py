"""LoRA with peft: the policy trains low-rank adapters on a frozen base; the reference is that same base.

    LoraSettings   the --lora-* flags, --adapter, --merge-lora, --load-in-4bit / --load-in-8bit
    add_adapters   base model -> Adapters: new adapters, or an adapter directory (an SFT adapter to start from, a
                   checkpoint's) loaded trainable; with --adapter, that SFT adapter once more, frozen, as the reference
    Adapters       the policy under LoRA: the model the scorer runs, its reference mode, saving the adapter only

Reading an adapter directory (its base model, loading it with peft, merging it for generation and evaluation) is
dpo.modeling's, which loads every model.

The reference is never a second model in memory. Without --adapter it is the base with the adapters switched off
(`peft`'s disable_adapter); with --adapter it is the base with the SFT adapter, kept as a frozen second adapter
(a few MB) beside the one being trained, so the reference is not the bare base (a known failure of trainers that
switch the adapters off in that case). At step 0 the trained adapter equals the reference's (new adapters: B = 0
adds exactly nothing), which train.py's step-0 check verifies.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import BitsAndBytesConfig

from dpo.errors import first_line
from dpo.modeling import (ADAPTER_CONFIG, DEFAULT_ADAPTER, LoraError, adapter_base, import_peft, load_peft_adapter,
                          local_model_path, quiet_bitsandbytes, quiet_peft)
from dpo.settings import ConfigError, check_settings, in_range, non_negative, positive, setting

REFERENCE_ADAPTER = "reference"
TRAINED_ADAPTER = DEFAULT_ADAPTER
DOUBLE_RANK = "auto"  # --lora-alpha's default: 2 x --lora-r


@dataclass(frozen=True)
class LoraSettings:
    """LoRA (peft): each field is a flag of train.py. --lora-r 0 and no --adapter: full fine-tuning."""

    lora_r: int = setting(0, "LoRA rank: train low-rank adapters on a frozen base (0: full fine-tuning)",
                          check=non_negative)
    lora_alpha: float = setting(DOUBLE_RANK, "LoRA scaling numerator, the update is alpha / r x B A ('auto': 2 x "
                                             "--lora-r)", check=positive)
    lora_dropout: float = setting(0.0, "dropout on the adapters' input (the base stays deterministic)",
                                  check=in_range(0.0, 1.0))
    lora_target_modules: str = setting("all-linear", "modules given adapters: comma-separated module names, or "
                                                     "all-linear (every linear layer of the decoder, not the LM head)")
    lora_modules_to_save: str | None = setting(None, "modules trained in full and saved with the adapter "
                                                     "(comma-separated names, e.g. lm_head)")
    adapter: str | None = setting(None, "start from this SFT LoRA adapter (a directory); the reference is the base "
                                        "with it, and the policy trains a copy of it (its own rank, alpha and modules)")
    merge_lora: bool = setting(False, "also write final/merged: the base with the trained adapter merged in",
                               identity=False)
    load_in_4bit: bool = setting(False, "QLoRA: keep the frozen base in 4-bit NF4 (bitsandbytes, CUDA)")
    load_in_8bit: bool = setting(False, "keep the frozen base in 8-bit (bitsandbytes, CUDA)")

    def __post_init__(self) -> None:
        if self.adapter is not None:  # its own configuration applies: these would be ignored, and recorded as used
            ignored = [flag for flag, value, default in (
                ("--lora-r", self.lora_r, 0), ("--lora-alpha", self.lora_alpha, 2.0),  # 2.0: run_config.json's "auto"
                ("--lora-target-modules", self.lora_target_modules, "all-linear"),
                ("--lora-modules-to-save", self.lora_modules_to_save, None)) if value not in (default, DOUBLE_RANK)]
            if ignored:
                raise ConfigError(f"{', '.join(ignored)} with --adapter: the adapter's own rank, alpha and modules "
                                  "apply (its adapter_config.json); leave them out")
        if self.lora_alpha == DOUBLE_RANK and isinstance(self.lora_r, int):
            object.__setattr__(self, "lora_alpha", float(2 * max(self.lora_r, 1)))
        check_settings(self)
        if not isinstance(self.lora_r, int) or isinstance(self.lora_r, bool):
            raise ConfigError(f"--lora-r must be a whole number, got {self.lora_r!r}")
        if self.load_in_4bit and self.load_in_8bit:
            raise ConfigError("--load-in-4bit and --load-in-8bit exclude each other")
        if (self.load_in_4bit or self.load_in_8bit or self.merge_lora) and not self.enabled:
            flag = "--merge-lora" if self.merge_lora else "--load-in-4bit / --load-in-8bit"
            raise ConfigError(f"{flag} needs LoRA: set --lora-r (or --adapter)")
        if not self.enabled:  # full fine-tuning: these would be ignored, and recorded as used
            ignored = [flag for flag, value, default in (
                ("--lora-alpha", self.lora_alpha, 2.0), ("--lora-dropout", self.lora_dropout, 0.0),
                ("--lora-target-modules", self.lora_target_modules, "all-linear"),
                ("--lora-modules-to-save", self.lora_modules_to_save, None)) if value not in (default, DOUBLE_RANK)]
            if ignored:
                raise ConfigError(f"{', '.join(ignored)} without LoRA: the run would train the whole model and ignore "
                                  f"{'them' if len(ignored) > 1 else 'it'}; set --lora-r (or --adapter)")
        if not self.lora_target_modules.strip():
            raise ConfigError("--lora-target-modules is empty")
        if self.adapter is not None and self.lora_dropout > 0:
            raise ConfigError("--lora-dropout with --adapter: the loaded adapter would be stochastic from the first "
                              "step, so the policy could not start as the reference; leave --lora-dropout at 0")

    @property
    def enabled(self) -> bool:
        """Whether the run trains adapters (--lora-r or --adapter)."""
        return self.lora_r > 0 or self.adapter is not None

    @property
    def quantized(self) -> bool:
        """Whether the frozen base is quantized (--load-in-4bit or --load-in-8bit)."""
        return self.load_in_4bit or self.load_in_8bit


def _names(text: str | None) -> list[str] | None:
    return [name.strip() for name in text.split(",") if name.strip()] if text else None


def quantization_config(settings: LoraSettings, device: torch.device, compute_dtype: torch.dtype) -> Any:
    """transformers' BitsAndBytesConfig for --load-in-4bit / --load-in-8bit, or None; one line where bitsandbytes
    cannot run (it needs a CUDA device). `compute_dtype`: the run's autocast dtype, which the 4-bit layers compute
    in (fp16 under --precision fp16: GPUs before Ampere have no bf16)."""
    if not settings.quantized:
        return None
    flag = "--load-in-4bit" if settings.load_in_4bit else "--load-in-8bit"
    if device.type != "cuda":
        raise LoraError(f"{flag} quantizes the base with bitsandbytes, which needs a CUDA device; this run is on "
                        f"{device.type} (train LoRA on the full-precision base instead)")
    quiet_bitsandbytes()
    try:
        import bitsandbytes  # noqa: F401 - optional (the [8bit] extra): only whether it is installed
    except ImportError:
        raise LoraError(f"{flag} needs bitsandbytes: pip install bitsandbytes") from None
    if settings.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


class Adapters:
    """A policy under LoRA: `model` is the causal LM with the adapters in its layers (what the scorer runs and the
    optimizer trains), `reference()` a context in which that same model computes the reference."""

    def __init__(self, peft_model: Any, with_reference_adapter: bool):
        self.peft_model = peft_model
        self.with_reference_adapter = with_reference_adapter

    @property
    def model(self) -> nn.Module:
        """The causal LM with the adapters in its layers."""
        return self.peft_model.get_base_model()

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """The base with the adapters off, or with the frozen SFT adapter (--adapter)."""
        if not self.with_reference_adapter:
            with self.peft_model.disable_adapter():
                yield
            return
        self.peft_model.set_adapter(REFERENCE_ADAPTER, inference_mode=True)
        try:
            yield
        finally:
            self.peft_model.set_adapter(TRAINED_ADAPTER)  # trainable again, the reference adapter frozen

    def trainable_parameters(self) -> int:
        """The number of parameters that train: the adapters' (and --lora-modules-to-save's)."""
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def save(self, directory: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """The trained adapter only (adapter_config.json, adapter_model.safetensors). `state_dict`: the trained
        weights gathered from all processes, keyed as `model` names them (peft's names add a prefix)."""
        if state_dict is not None:
            state_dict = {f"base_model.model.{name}": tensor for name, tensor in state_dict.items()}
        # save_embedding_layers: no run resizes the vocabulary, so the base's embeddings are never saved; peft's
        # "auto" would look the base up on the hub to find out, and warn where it cannot (offline, a GGUF model)
        self.peft_model.save_pretrained(directory, selected_adapters=[TRAINED_ADAPTER], state_dict=state_dict,
                                        save_embedding_layers=False)


def add_adapters(base: nn.Module, settings: LoraSettings, start: str | None = None, seed: int = 0) -> Adapters:
    """`base` (frozen) with the adapter to train: loaded from `start` (a checkpoint's adapter, else --adapter) or
    new (--lora-r, --lora-alpha, ...; A drawn from `seed`, B = 0). With --adapter, also that adapter, frozen, as the
    reference."""
    peft = import_peft()
    start = start or settings.adapter
    if start is None:
        check_module_names(base, settings)
        try:
            with quiet_peft(), torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                peft_model = peft.get_peft_model(base, peft_config(settings))
        except ValueError as error:  # e.g. "Target modules {...} not found in the base model"
            raise LoraError(f"--lora-target-modules {settings.lora_target_modules}: {first_line(error)}") from None
    else:
        peft_model = load_peft_adapter(peft.PeftModel, base, start, TRAINED_ADAPTER, trainable=True)
    # saved with it: the base this run trains it on (the model loaded), a local one by its path from anywhere, so
    # that final/ loads from any directory
    peft_model.peft_config[TRAINED_ADAPTER].base_model_name_or_path = (local_model_path(base.name_or_path)
                                                                       or base.name_or_path)
    if settings.adapter is not None:
        load_peft_adapter(peft_model.load_adapter, None, settings.adapter, REFERENCE_ADAPTER, trainable=False)
        peft_model.set_adapter(TRAINED_ADAPTER)
    # a loaded adapter brings its own lora_dropout: --lora-dropout decides, and the reference adapter has none
    for module in peft_model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if isinstance(dropouts, nn.ModuleDict):
            for name, dropout in dropouts.items():
                if isinstance(dropout, nn.Dropout):
                    dropout.p = settings.lora_dropout if name == TRAINED_ADAPTER else 0.0
    peft_model.peft_config[TRAINED_ADAPTER].lora_dropout = settings.lora_dropout  # saved with it, as trained
    if upcast_trained(peft_model) and start is not None:
        # peft copied the file's fp32 modules_to_save weights into the half-precision base's copies, rounding them;
        # loaded again into the fp32 copies, they are exact (a resume goes on bit for bit)
        peft.set_peft_model_state_dict(peft_model, peft.utils.load_peft_weights(start), adapter_name=TRAINED_ADAPTER)
    return Adapters(peft_model, with_reference_adapter=settings.adapter is not None)


def adapter_base_note(adapter: str, base: nn.Module) -> str | None:
    """A note where the --adapter was trained on another base than the model this run loads (the names differ, and
    they are not paths to one directory), else None. Two copies of one model under other names are the same model,
    so this is no error; an adapter on another base computes another model, which no check can see (its reference
    is that same base with the adapter)."""
    try:
        recorded, loaded = adapter_base(adapter), base.name_or_path
    except LoraError:  # it records no base: nothing to compare (a note never stops a run)
        return None
    if recorded == loaded or (Path(recorded).exists() and Path(loaded).exists()
                              and Path(recorded).resolve() == Path(loaded).resolve()):
        return None
    return (f"note: --adapter {adapter} was trained on {recorded} (its {ADAPTER_CONFIG}), and this run loads "
            f"{loaded} as its base: an adapter holds changes to its own base, so the two must be the same model")


def upcast_trained(model: nn.Module) -> bool:
    """fp32 master weights of what trains (a half-precision base's modules_to_save copies); whether any was not.
    A trained embedding copy then hands the half base its own dtype (a bf16 LayerNorm on the CPU refuses fp32
    input; on CUDA autocast casts it anyway)."""
    half = {p.dtype for p in model.parameters() if p.requires_grad and p.dtype != torch.float32}
    for parameter in model.parameters():
        if parameter.requires_grad and parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()
    if len(half) == 1:
        (dtype,) = half
        for module in model.modules():
            if isinstance(module, nn.Embedding) and module.weight.requires_grad:
                module.register_forward_hook(lambda _, __, output: output.to(dtype))
    return bool(half)


def check_module_names(base: nn.Module, settings: LoraSettings) -> None:
    """A LoraError naming each module of --lora-target-modules / --lora-modules-to-save that is no module of `base`,
    matched as peft matches them (a target: a module named so, or ending in "." and the name; a module to save:
    any module name ending in it). peft refuses only a list of which no name matches, so a misspelled name beside a
    right one was silently not trained."""
    names = [name for name, _ in base.named_modules(remove_duplicate=False)]
    targets = settings.lora_target_modules.strip()
    for flag, value, matches in (
            ("--lora-target-modules", "" if targets == "all-linear" else targets,
             lambda name, want: name == want or name.endswith("." + want)),
            ("--lora-modules-to-save", settings.lora_modules_to_save, lambda name, want: name.endswith(want))):
        unknown = [want for want in _names(value) or [] if not any(matches(name, want) for name in names)]
        if unknown:
            leaves = sorted({name.rsplit(".", 1)[-1] for name in names if name and not name[-1].isdigit()})
            raise LoraError(f"{flag} {value}: no module of the model is named {', '.join(unknown)} (its modules: "
                            f"{', '.join(leaves)})")
    both = set(_names(targets) or []) & set(_names(settings.lora_modules_to_save) or [])
    if both:
        raise LoraError(f"{', '.join(sorted(both))} in both --lora-target-modules and --lora-modules-to-save: a module "
                        "either gets an adapter or is trained in full")
    modules = dict(base.named_modules(remove_duplicate=False))
    for want in _names(targets) if targets != "all-linear" else []:
        holders = [name for name in names if (name == want or name.endswith("." + want))
                   and next(modules[name].children(), None) is not None]
        if holders:
            raise LoraError(f"--lora-target-modules {targets}: {want} names a module that holds others "
                            f"({holders[0]}, a {type(modules[holders[0]]).__name__}); name its layers (linear, "
                            "embedding)")
    for want in _names(settings.lora_modules_to_save) or []:
        holders = [name for name in names if name.endswith(want) and next(modules[name].children(), None) is not None]
        if holders:
            raise LoraError(f"--lora-modules-to-save {settings.lora_modules_to_save}: {want} names a module that holds "
                            f"others ({holders[0]}, a {type(modules[holders[0]]).__name__}); name a layer (lm_head, "
                            "embed_tokens)")


def peft_config(settings: LoraSettings) -> Any:
    """peft's LoraConfig of new adapters (--lora-r, --lora-alpha, --lora-dropout, --lora-target-modules,
    --lora-modules-to-save)."""
    peft, targets = import_peft(), settings.lora_target_modules.strip()
    return peft.LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                           target_modules="all-linear" if targets == "all-linear" else _names(targets),
                           modules_to_save=_names(settings.lora_modules_to_save), task_type="CAUSAL_LM")

