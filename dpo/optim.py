"""The optimizer of a run: AdamW with fp32 states, or AdamW with 8-bit states (bitsandbytes).

    adamw        torch's AdamW, its fused kernel on CPU and CUDA (one pass over every parameter)
    adamw_8bit   bitsandbytes' AdamW8bit: both moments kept in 8 bits, blockwise quantized (2 bytes a parameter
                 instead of 8); CPU and CUDA. Tensors under 4,096 elements (biases, norm scales: bitsandbytes'
                 min_8bit_size) keep fp32 moments, a negligible share of the memory

Weight decay reaches the weight matrices and embeddings (tensors of 2 or more dimensions) and leaves the biases and
norm scales (1 dimension) alone, as nanoGPT, HF Trainer and TRL do.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable
from typing import Any

import torch

from dpo.modeling import quiet_bitsandbytes
from dpo.settings import ConfigError

OPTIMIZERS = ("adamw", "adamw_8bit")


def check_optimizer(name: str) -> None:
    """One line, before any work, when the optimizer's library is missing."""
    if name == "adamw_8bit" and importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("--optimizer adamw_8bit needs bitsandbytes: pip install bitsandbytes")


def parameter_groups(params: Iterable[torch.nn.Parameter], weight_decay: float, *,
                     decay_all: bool = False) -> list[dict[str, Any]]:
    """AdamW's parameter groups: `weight_decay` on the parameters of 2 or more dimensions, none on the biases and
    norm scales; one group where nothing would differ (no decay, or every parameter decayed). `decay_all`: decay
    every parameter, as checkpoints written with a single group did."""
    params = list(params)
    decayed = [p for p in params if p.ndim >= 2 or decay_all]
    kept = [p for p in params if not (p.ndim >= 2 or decay_all)]
    if weight_decay == 0 or not kept or not decayed:
        return [{"params": params, "weight_decay": weight_decay if decayed else 0.0}]
    return [{"params": decayed, "weight_decay": weight_decay}, {"params": kept, "weight_decay": 0.0}]


def decays_every_parameter(optimizer_state: dict[str, Any], params: Iterable[torch.nn.Parameter]) -> bool:
    """Whether a checkpoint's optimizer state (full_optimizer_state's) decays biases and norm scales as well: one
    group with weight decay although some of `params` (the trainable ones) have 1 dimension, as checkpoints written
    before parameter_groups held them."""
    groups = optimizer_state["param_groups"]
    return len(groups) == 1 and groups[0]["weight_decay"] > 0 and any(p.ndim < 2 for p in params)


def build_optimizer(name: str, params: Iterable[torch.nn.Parameter], *, lr: float, betas: tuple[float, float],
                    weight_decay: float, fused: bool, decay_all: bool = False) -> torch.optim.Optimizer:
    """`fused`: torch's fused AdamW kernel (not for FSDP2's sharded parameters); `decay_all`: parameter_groups'."""
    check_optimizer(name)
    groups = parameter_groups(params, weight_decay, decay_all=decay_all)
    if name == "adamw_8bit":
        quiet_bitsandbytes()
        import bitsandbytes  # an optional dependency, imported only when asked for

        return bitsandbytes.optim.AdamW8bit(groups, lr=lr, betas=betas)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)
