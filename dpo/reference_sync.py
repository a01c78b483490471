"""TR-DPO (Gorbatovski et al. 2024, "Learn Your Reference Model for Real Good Alignment"): the reference follows the
policy. Every tau optimizer steps

    pi_ref <- alpha pi_theta + (1 - alpha) pi_ref          (weights; alpha = 1: the reference becomes the policy)

so the KL anchor of DPO moves with training instead of pinning the policy to the SFT model for the whole run.
The reference is then a model of its own, scored at step time (its log-probs change, so none are precomputed),
and each checkpoint keeps it, so a resumed run goes on with the reference it had.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from dpo.loss import needs_reference_model
from dpo.settings import ConfigError

if TYPE_CHECKING:  # train_settings imports this module
    from dpo.train_settings import TrainSettings


def check_reference_sync(cfg: TrainSettings) -> None:
    """A ConfigError for a run whose reference cannot follow its policy."""
    if not needs_reference_model(cfg.loss):
        raise ConfigError(f"--sync-ref-model with --loss {cfg.loss.loss_type}"
                          f"{' --reference-free' if cfg.loss.reference_free else ''}: the loss reads no reference "
                          "model, so there is none to sync")
    if cfg.lora.enabled:
        raise ConfigError("--sync-ref-model does not run with LoRA: the reference is the base with the adapters "
                          "switched off, not a model of its own (train in full, or leave the reference fixed)")
    if cfg.fsdp:
        raise ConfigError("--sync-ref-model does not run under --fsdp (the policy's weights are sharded across the "
                          "processes); use DDP")
    if cfg.on_policy.iterations:
        raise ConfigError("--sync-ref-model does not run with --iterations (each round's reference is computed when "
                          "the round starts); use --reference-update for a reference that follows the rounds")


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
