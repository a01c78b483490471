"""Useful FLOPs of a DPO step and the peak they are measured against: model FLOPs utilisation (MFU).

The count is benchmarks/README.md's: the work a padded implementation must do, whatever it recomputes. Per real token of each sequence, 6 x N_layers for the
policy's forward and backward (4 for a weight that is frozen, LoRA's base: no weight gradient), plus 2 x N_layers
for a reference forward at step time; per scored response token, the same multiples of the LM head's d x V (the
head is only needed where a log-prob is scored). N_layers counts the weight matrices of the transformer blocks (a
4-bit weight at its unpacked size, a mixture of experts' at the share of experts a token uses), d is the hidden
size, V the vocabulary; attention scores are left out. A prompt counts once per sequence (twice per pair), as a
padded implementation computes it: the shared-prompt layout computes it once, so its utilisation reads high by
the prompt's share.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# Dense (no sparsity) tensor-core peaks per GPU in TFLOP/s from the vendors' datasheets: (bf16 / fp16, tf32, whether
# it computes bf16). A name matches torch.cuda.get_device_name() as whole words ("A100" is not "RTX A1000"); the
# first match wins, so the longer names come first. A laptop part ("... Laptop GPU") has lower clocks: no entry.
GPU_PEAK_TFLOPS: tuple[tuple[str, float, float, bool], ...] = (
    ("H200 NVL", 835.5, 417.5, True),
    ("GH200", 989.4, 494.7, True),  # its GPU is an H100 or H200 SXM
    ("H200", 989.4, 494.7, True),
    ("H100 NVL", 835.5, 417.5, True),
    ("H100 PCIe", 756.0, 378.0, True),
    ("H100", 989.4, 494.7, True),
    ("A100", 312.0, 156.0, True),
    ("L40S", 362.1, 183.0, True),
    ("L40", 181.0, 90.5, True),
    ("L4", 121.0, 60.0, True),
    ("A10G", 70.0, 35.0, True),
    ("A10", 125.0, 62.5, True),
    ("RTX 4090", 165.2, 82.6, True),
    ("RTX 3090", 71.0, 35.6, True),
    ("V100S", 130.0, 0.0, False),
    ("V100", 125.0, 0.0, False),  # fp16 only: no bf16, no TF32
)


def peak_tflops(device: torch.device, precision: str, override: float | None = None) -> float | None:
    """The dense peak a step on `device` in `precision` is measured against (`override`: --peak-tflops), or None
    where it is unknown (CPUs, GPUs missing from GPU_PEAK_TFLOPS, a precision the GPU does not compute)."""
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    if "laptop" in name.lower():
        return None
    for key, half, tf32, has_bf16 in GPU_PEAK_TFLOPS:
        if re.search(rf"(?<![\w-]){re.escape(key)}(?!\w)", name):
            if precision == "bf16" and not has_bf16:
                return None
            return (half if precision in ("bf16", "fp16") else tf32) or None
    return None


def _weight_count(parameter: nn.Parameter, config: Any) -> float:
    """The elements of a weight as its matmuls use them: a 4-bit weight's unpacked shape (bitsandbytes packs two
    per byte), and a mixture of experts' stacked expert weights [experts, out, in] at the share a token uses."""
    quant_state = getattr(parameter, "quant_state", None)
    count = quant_state.shape.numel() if quant_state is not None else parameter.numel()
    if parameter.ndim == 3:
        active = getattr(config, "num_experts_per_tok", None)
        experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None)
        if active and experts:
            return count * active / experts
    return count


def _counted(name: str, parameter: nn.Parameter) -> bool:
    """A weight matrix of the base model: not LoRA's A and B, not the original that peft's modules_to_save
    keeps beside the trained copy (only the copy runs)."""
    return parameter.ndim in (2, 3) and "lora_" not in name and ".original_module." not in name


def block_weight_counts(model: nn.Module) -> tuple[float, float]:
    """N_layers, as (trained, frozen): elements of the transformer blocks' weight matrices. Where the blocks are
    not found under .layers or .h, every weight matrix but the embeddings' and the LM head's."""
    config = model.config
    layers = _decoder_layers(model)
    inactive = _inactive_copies(model)
    if layers is not None:
        named = [(n, p) for n, p in layers.named_parameters() if id(p) not in inactive]
    else:
        skipped = inactive | {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
        skipped.add(id(model.get_output_embeddings().weight))
        named = [(n, p) for n, p in model.named_parameters() if id(p) not in skipped]
    trained = sum(_weight_count(p, config) for n, p in named if _counted(n, p) and p.requires_grad)
    frozen = sum(_weight_count(p, config) for n, p in named if _counted(n, p) and not p.requires_grad)
    return trained, frozen


def _inactive_copies(model: nn.Module) -> set[int]:
    """The parameters of peft's modules_to_save copies that do not run: those of adapters other than the active
    one (a reference adapter's copy, which TRL and --adapter add beside the trained one)."""
    ids = set()
    for module in model.modules():
        copies = getattr(module, "modules_to_save", None)
        if isinstance(copies, nn.ModuleDict):
            active = getattr(module, "active_adapters", None) or [getattr(module, "active_adapter", None)]
            active = [active] if isinstance(active, str) else active
            ids |= {id(p) for name, copy in copies.items() if name not in active for p in copy.parameters()}
    return ids


def block_weight_count(model: nn.Module) -> float:
    """N_layers: elements of the transformer blocks' weight matrices (the base's: LoRA's A and B aside)."""
    return sum(block_weight_counts(model))


def _decoder_layers(model: nn.Module) -> nn.Module | None:
    """The transformer blocks of the text decoder (a multimodal model's, not its vision tower's), or None."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        backbone = inner.get_decoder()
    except (AttributeError, NotImplementedError):
        backbone = getattr(inner, inner.base_model_prefix, inner) if hasattr(inner, "base_model_prefix") else inner
    for name in ("layers", "h", "blocks"):
        if isinstance(getattr(backbone, name, None), nn.Module):
            return getattr(backbone, name)
    return None


@dataclass(frozen=True)
class FlopCounter:
    """The useful FLOPs of steps of one model: N_layers, trained and frozen, and the LM head's d x V."""

    trained_block_weights: float
    frozen_block_weights: float
    head_weights: int
    head_trained: bool

    @classmethod
    def of(cls, model: nn.Module) -> "FlopCounter":
        """The counter of `model`: its decoder layers' weights and its head, each weight trained or frozen as its
        requires_grad says (LoRA: the base frozen; a --lora-modules-to-save copy trained)."""
        trained, frozen = block_weight_counts(model)
        head = model.get_output_embeddings().weight
        return cls(trained, frozen, head.numel(), head.requires_grad)

    @property
    def block_weights(self) -> float:
        """N_layers, trained and frozen together."""
        return self.trained_block_weights + self.frozen_block_weights

    def pairs(self, pairs: Sequence[Any], reference_forward: bool) -> float:
        """FLOPs of a step on `pairs` (TokenizedPair); `reference_forward`: the reference runs at step time."""
        tokens = sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
        # a response token is scored where a position predicts it: all but a first token after an empty prompt
        scored = sum(len(r) - (0 if p.prompt_ids else 1) for p in pairs for r in (p.chosen_ids, p.rejected_ids)
                     if r)
        reference = 2 if reference_forward else 0
        # per weight and token: forward 2, the input gradient 2, the weight gradient 2 where it trains
        block = (6 + reference) * self.trained_block_weights + (4 + reference) * self.frozen_block_weights
        head = ((6 if self.head_trained else 4) + reference) * self.head_weights
        return block * tokens + head * scored
