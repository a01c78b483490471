"""Useful FLOPs of a DPO step and the peak they are measured against: model FLOPs utilisation (MFU).

The count is benchmarks/README.md's (the work any exact implementation must do, whatever its layout or
recomputation): per real token of each sequence, 6 x N_layers for the policy's forward and backward (4 when the
weights are frozen, LoRA: no weight gradients), plus 2 x N_layers for a reference forward at step time; per scored
response token, the same multiples of d x V (the LM head is only needed where a log-prob is scored). N_layers
counts the weight matrices of the transformer blocks, d is the hidden size, V the vocabulary; attention scores are
left out. A prompt counts once per sequence (twice per pair), as a padded implementation computes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# Dense (no sparsity) tensor-core peaks per GPU in TFLOP/s from the vendors' datasheets: (bf16 / fp16, tf32). The
# first name contained in torch.cuda.get_device_name() wins, so the longer names come first.
GPU_PEAK_TFLOPS: tuple[tuple[str, float, float], ...] = (
    ("H200 NVL", 835.5, 417.5),
    ("H200", 989.4, 494.7),
    ("H100 NVL", 835.5, 417.5),
    ("H100 PCIe", 756.0, 378.0),
    ("H100", 989.4, 494.7),
    ("A100", 312.0, 156.0),
    ("L40S", 362.1, 183.0),
    ("L40", 181.0, 90.5),
    ("L4", 121.0, 60.0),
    ("A10G", 70.0, 35.0),
    ("A10", 125.0, 62.5),
    ("RTX 4090", 165.2, 82.6),
    ("RTX 3090", 71.0, 35.6),
    ("V100", 125.0, 0.0),  # fp16 only: no bf16, no TF32
)


def peak_tflops(device: torch.device, precision: str, override: float | None = None) -> float | None:
    """The dense peak a step on `device` in `precision` is measured against (`override`: --peak-tflops), or None
    where it is unknown (CPUs, GPUs missing from GPU_PEAK_TFLOPS)."""
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, half, tf32 in GPU_PEAK_TFLOPS:
        if key in name:
            return (half if precision in ("bf16", "fp16") else tf32) or None
    return None


def block_weight_count(model: nn.Module) -> int:
    """N_layers: elements of the transformer blocks' weight matrices (the base's: LoRA's A and B aside)."""
    layers = _decoder_layers(model)
    return sum(p.numel() for name, p in layers.named_parameters() if p.ndim == 2 and "lora_" not in name)


def _decoder_layers(model: nn.Module) -> nn.Module:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(inner, inner.base_model_prefix, inner) if hasattr(inner, "base_model_prefix") else inner
    layers = getattr(backbone, "layers", None) or getattr(backbone, "h", None)
    if layers is None:
        raise ValueError(f"{type(inner).__name__}: no decoder layers found (expected .layers or .h)")
    return layers


@dataclass(frozen=True)
class FlopCounter:
    """The useful FLOPs of steps of one model: `block_weights` = N_layers, `head_weights` = d x V."""

    block_weights: int
    head_weights: int
    frozen_weights: bool = False  # LoRA: the base's weights get no gradient

    @classmethod
    def of(cls, model: nn.Module, frozen_weights: bool = False) -> "FlopCounter":
        """The counter of `model`: its decoder layers' weights and its d x V head."""
        config: Any = model.config
        return cls(block_weight_count(model), config.hidden_size * config.vocab_size, frozen_weights)

    def pairs(self, pairs: Sequence[Any], reference_forward: bool) -> float:
        """FLOPs of a step on `pairs` (TokenizedPair); `reference_forward`: the reference runs at step time."""
        tokens = sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
        # a response token is scored where a position predicts it: all but a first token after an empty prompt
        scored = sum(len(r) - (0 if p.prompt_ids else 1) for p in pairs for r in (p.chosen_ids, p.rejected_ids)
                     if r)
        per_weight = (4 if self.frozen_weights else 6) + (2 if reference_forward else 0)
        return per_weight * (self.block_weights * tokens + self.head_weights * scored)
