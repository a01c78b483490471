"""The tanh-approximated GELU of Phi (and GPT-2) as one fused kernel instead of six elementwise passes.

transformers' `gelu_new` computes 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) with separate pow, mul,
add and tanh ops, each a pass over the MLP's widest activation, forward and backward. `F.gelu(x,
approximate="tanh")` is the same formula in one pass; the two agree to fp32 rounding.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F
from transformers.activations import NewGELUActivation


class FusedTanhGELU(nn.Module):
    """The tanh-approximated GELU as torch's one fused kernel (a drop-in for `gelu_new`)."""

    def forward(self, x: Tensor) -> Tensor:
        """GELU(x), tanh approximation, in one pass."""
        return F.gelu(x, approximate="tanh")


def fuse_gelu(model: nn.Module) -> int:
    """Replace every `gelu_new` activation module of `model` in place; returns how many were replaced."""
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, NewGELUActivation):
                setattr(parent, name, FusedTanhGELU())
                replaced += 1
    return replaced
