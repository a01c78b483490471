"""The optimizer of a run: AdamW with fp32 states, or AdamW with 8-bit states (bitsandbytes).

    adamw        torch's AdamW, its fused kernel on CPU and CUDA (one pass over every parameter)
    adamw_8bit   bitsandbytes' AdamW8bit: both moments kept in 8 bits, blockwise quantized (2 bytes a parameter
                 instead of 8); CPU and CUDA
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable

import torch

from dpo.modeling import quiet_bitsandbytes
from dpo.settings import ConfigError

OPTIMIZERS = ("adamw", "adamw_8bit")


def check_optimizer(name: str) -> None:
    """One line, before any work, when the optimizer's library is missing."""
    if name == "adamw_8bit" and importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("--optimizer adamw_8bit needs bitsandbytes: pip install bitsandbytes")


def build_optimizer(name: str, params: Iterable[torch.nn.Parameter], *, lr: float, betas: tuple[float, float],
                    weight_decay: float, fused: bool) -> torch.optim.Optimizer:
    """`fused`: torch's fused AdamW kernel (not for FSDP2's sharded parameters)."""
    check_optimizer(name)
    if name == "adamw_8bit":
        quiet_bitsandbytes()
        import bitsandbytes  # an optional dependency, imported only when asked for

        return bitsandbytes.optim.AdamW8bit(list(params), lr=lr, betas=betas, weight_decay=weight_decay)
    return torch.optim.AdamW(list(params), lr=lr, betas=betas, weight_decay=weight_decay, fused=fused)
