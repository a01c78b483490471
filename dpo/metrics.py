"""Training metrics with TRL's names, accumulated over micro-batches and ranks; metrics.jsonl read back (written by
dpo.tracking.JsonlTracker)."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dpo.loss import LossOutput, PreferenceLogps

# Per-pair quantities summed over a step (then divided by the number of pairs).
PAIR_METRICS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "logps/chosen_per_token",  # each response's log-prob divided by its scored tokens: a mean length cannot move
    "logps/rejected_per_token",
)
# Per-token quantities summed over a step's scored tokens (then divided by those tokens), weighted by tokens as TRL
# weighs a micro-batch's: each metric's (PreferenceLogps field of per-sequence sums, its lengths field) per side.
# The policy's mean logit over the vocabulary at the response's positions; its entropy there, over chosen and
# rejected tokens alike; the share of chosen tokens that are its top token.
TOKEN_METRICS = {
    "logits/chosen": (("policy_chosen_logits", "chosen_lengths"),),
    "logits/rejected": (("policy_rejected_logits", "rejected_lengths"),),
    "entropy": (("policy_chosen_entropy", "chosen_lengths"), ("policy_rejected_entropy", "rejected_lengths")),
    "mean_token_accuracy": (("policy_chosen_top1", "chosen_lengths"),),
}


class PairMetrics:
    """Running sums of the step's metrics; `means` turns them into means (after an all-reduce of `sums`)."""

    def __init__(self, device: torch.device | str = "cpu"):
        # the pair sums, the pair count, then each token metric's sum and its token count
        self.sums = torch.zeros(len(PAIR_METRICS) + 1 + 2 * len(TOKEN_METRICS), dtype=torch.float64, device=device)

    def add(self, out: LossOutput, logps: PreferenceLogps) -> None:
        """Add a micro-batch's per-pair losses and rewards (`out`) and its log-probs and lengths (`logps`) to the
        sums."""
        losses, chosen_rewards, rejected_rewards = (x.detach() for x in out[:3])
        chosen_logps, rejected_logps = logps.policy_chosen_logps.detach(), logps.policy_rejected_logps.detach()
        chosen_lengths, rejected_lengths = logps.require("chosen_lengths"), logps.require("rejected_lengths")
        pair_sums = torch.stack([
            losses.sum(),
            chosen_rewards.sum(),
            rejected_rewards.sum(),
            # a NaN margin is no comparison: the step's accuracy is NaN (logged null), not a silent 0
            (chosen_rewards > rejected_rewards).float().masked_fill((chosen_rewards - rejected_rewards).isnan(),
                                                                   math.nan).sum(),
            (chosen_rewards - rejected_rewards).sum(),
            chosen_logps.sum(),
            rejected_logps.sum(),
            (chosen_logps / chosen_lengths.clamp(min=1)).sum(),
            (rejected_logps / rejected_lengths.clamp(min=1)).sum(),
            losses.new_tensor(float(losses.numel())),
        ]).double()
        token_sums = [sum(_token_sums(getattr(logps, values), logps.require(lengths)) for values, lengths in sides)
                      for sides in TOKEN_METRICS.values()]
        self.sums += torch.cat([pair_sums.to(self.sums.device), *(t.to(self.sums.device) for t in token_sums)])

    @property
    def num_pairs(self) -> int:
        """The number of pairs added."""
        return int(self.sums[len(PAIR_METRICS)].item())

    def means(self) -> dict[str, float]:
        """Each per-pair metric's mean over the pairs added, and each per-token metric's over its tokens (a token
        metric without tokens is left out)."""
        count = max(self.sums[len(PAIR_METRICS)].item(), 1.0)
        result = {name: self.sums[i].item() / count for i, name in enumerate(PAIR_METRICS)}
        for k, name in enumerate(TOKEN_METRICS):
            total, tokens = self.sums[len(PAIR_METRICS) + 1 + 2 * k:len(PAIR_METRICS) + 3 + 2 * k].tolist()
            if tokens > 0:
                result[name] = total / tokens
        return result


def _token_sums(values: Tensor | None, lengths: Tensor) -> Tensor:
    """(sum of the per-sequence sums `values`, their tokens) in fp64; (0, 0) when the scorer gave none."""
    if values is None:
        return torch.zeros(2, dtype=torch.float64, device=lengths.device)
    return torch.stack([values.detach().double().sum(), lengths.double().sum()])


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl; a last line cut short by a crash is dropped, and any other line that is no
    JSON record (the file edited by hand, a disk error) is left out with a warning naming it."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            record = None
        if isinstance(record, dict):
            records.append(record)
        elif number < len(lines) and line.strip():
            warnings.warn(f"{path}, line {number}: not a JSON record, left out", stacklevel=2)
    return records
