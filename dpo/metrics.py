"""Training metrics with TRL's names, accumulated over micro-batches and ranks, written as JSON lines."""

from __future__ import annotations

import json
import math
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
)


class PairMetrics:
    """Running sums of the per-pair metrics; `reduce` turns them into means (after an all-reduce)."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.sums = torch.zeros(len(PAIR_METRICS) + 1, dtype=torch.float64, device=device)

    def add(self, losses: Tensor, chosen_rewards: Tensor, rejected_rewards: Tensor,
            chosen_logps: Tensor, rejected_logps: Tensor) -> None:
        losses, chosen_rewards, rejected_rewards = losses.detach(), chosen_rewards.detach(), rejected_rewards.detach()
        values = torch.stack([
            losses.sum(),
            chosen_rewards.sum(),
            rejected_rewards.sum(),
            (chosen_rewards > rejected_rewards).float().sum(),
            (chosen_rewards - rejected_rewards).sum(),
            chosen_logps.detach().sum(),
            rejected_logps.detach().sum(),
            torch.tensor(float(losses.numel()), device=losses.device),
        ])
        self.sums += values.to(self.sums.device, torch.float64)

    @property
    def num_pairs(self) -> int:
        return int(self.sums[-1].item())

    def means(self) -> dict[str, float]:
        count = max(self.sums[-1].item(), 1.0)
        return {name: self.sums[i].item() / count for i, name in enumerate(PAIR_METRICS)}


class MetricsWriter:
    """Appends one JSON object per line to metrics.jsonl (main process only)."""

    def __init__(self, path: str | Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled

    def truncate_after(self, step: int) -> None:
        """Drop lines logged after `step`: a resumed run re-logs them exactly once."""
        if not self.enabled or not self.path.exists():
            return
        kept = [json.dumps(record) for record in read_metrics(self.path) if record.get("step", 0) <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(self.path)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(clean) + "\n")
            handle.flush()


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
