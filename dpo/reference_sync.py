"""TR-DPO (Gorbatovski et al. 2024, "Learn Your Reference Model for Real Good Alignment"): the reference follows the
policy. Every tau optimizer steps

    pi_ref <- alpha pi_theta + (1 - alpha) pi_ref          (weights; alpha = 1: the reference becomes the policy)

so the KL anchor of DPO moves with training instead of pinning the policy to the SFT model for the whole run.
The reference is then a model of its own, scored at step time (its log-probs change, so none are precomputed),
and each checkpoint keeps it, so a resumed run goes on with the reference it had.
"""

from __future__ import annotations

import torch
from torch import nn


def sync_due(step: int, every: int) -> bool:
    """Whether the reference is updated after optimizer step `step` (1-based): every `every` steps."""
    return step % every == 0


@torch.no_grad()
def mix_into_reference(reference: nn.Module, policy: nn.Module, alpha: float) -> None:
    """reference <- alpha policy + (1 - alpha) reference, parameter by parameter (matched by name), computed in
    fp32 and rounded once to the reference's dtype (a half-precision reference keeps its dtype)."""
    ref_params = dict(reference.named_parameters())
    policy_params = dict(policy.named_parameters())
    if ref_params.keys() != policy_params.keys():
        missing = sorted(ref_params.keys() ^ policy_params.keys())
        raise ValueError(f"reference and policy have different parameters: {', '.join(missing[:3])}")
    for name, target in ref_params.items():
        mixed = target.float().lerp_(policy_params[name].detach().float(), alpha)
        target.copy_(mixed)
