"""Training metrics with TRL's names, accumulated over micro-batches and ranks; metrics.jsonl read back (written by
dpo.tracking.JsonlTracker)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

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


class PairMetrics:
    """Running sums of the per-pair metrics; `reduce` turns them into means (after an all-reduce)."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.sums = torch.zeros(len(PAIR_METRICS) + 1, dtype=torch.float64, device=device)

    def add(self, losses: Tensor, chosen_rewards: Tensor, rejected_rewards: Tensor,
            chosen_logps: Tensor, rejected_logps: Tensor, chosen_lengths: Tensor, rejected_lengths: Tensor) -> None:
        """Add a micro-batch's per-pair losses, rewards and log-probs (and the responses' scored tokens) to the
        sums."""
        losses, chosen_rewards, rejected_rewards = losses.detach(), chosen_rewards.detach(), rejected_rewards.detach()
        values = torch.stack([
            losses.sum(),
            chosen_rewards.sum(),
            rejected_rewards.sum(),
            (chosen_rewards > rejected_rewards).float().sum(),
            (chosen_rewards - rejected_rewards).sum(),
            chosen_logps.detach().sum(),
            rejected_logps.detach().sum(),
            (chosen_logps.detach() / chosen_lengths.clamp(min=1)).sum(),
            (rejected_logps.detach() / rejected_lengths.clamp(min=1)).sum(),
            torch.tensor(float(losses.numel()), device=losses.device),
        ])
        self.sums += values.to(self.sums.device, torch.float64)

    @property
    def num_pairs(self) -> int:
        """The number of pairs added."""
        return int(self.sums[-1].item())

    def means(self) -> dict[str, float]:
        """Each per-pair metric's mean over the pairs added."""
        count = max(self.sums[-1].item(), 1.0)
        return {name: self.sums[i].item() / count for i, name in enumerate(PAIR_METRICS)}


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl; a last line cut short by a crash is dropped."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
