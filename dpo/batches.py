"""What each optimizer step trains on: a global batch of pairs, with their reference log-probs when precomputed.

    PairBatch      the pairs of one step (all processes together) and their precomputed reference log-probs
    OfflinePairs   the offline pair source: step s takes a slice of its epoch's permutation of the preference
                   set, a pure function of (seed, s), so the step number is the data position and a resumed run
                   sees exactly the batches an uninterrupted one would
    process_slice / micro_batches   how a step's batch is split over processes and into micro-batches; the loss
                   is a sum over the same pairs whatever the split
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from dpo.data import TokenizedPair, epoch_permutation
from dpo.packing import group_by_length
from dpo.reference import ReferenceLogps, ReferenceLogpsError


@dataclass
class PairBatch:
    pairs: list[TokenizedPair]
    reference: ReferenceLogps | None = None  # one entry per pair; None when computed at step time or not needed
    metrics: dict[str, float] = field(default_factory=dict)  # how the pairs were made (online: sampling, judge)

    def __len__(self) -> int:
        return len(self.pairs)


@dataclass(frozen=True)
class OfflinePairs:
    pairs: Sequence[TokenizedPair]
    batch_size: int
    seed: int

    @property
    def steps_per_epoch(self) -> int:
        return len(self.pairs) // self.batch_size

    def batch_ids(self, step: int) -> list[int]:
        """Indices into `pairs` of the global batch of optimizer step `step` (0-based)."""
        return step_ids(len(self.pairs), self.batch_size, self.seed, step)

    def batch(self, step: int, reference: ReferenceLogps | None = None) -> PairBatch:
        """The pairs of step `step` with their precomputed reference log-probs, which must all be finite."""
        ids = self.batch_ids(step)
        selected = reference.select(ids) if reference is not None else None
        if selected is not None and not bool(torch.isfinite(torch.cat([selected.chosen, selected.rejected])).all()):
            raise ReferenceLogpsError(f"step {step + 1}: the reference log-probs of some of its pairs are not finite "
                                      "(a reference model that outputs NaN or inf?)")
        return PairBatch([self.pairs[i] for i in ids], selected)

    def step_batch(self, step: int, reference: ReferenceLogps | None, policy: object, dist: object) -> PairBatch:
        """The source interface train.py calls (OnlinePairs and IterativePairs sample with `policy` instead)."""
        return self.batch(step, reference)

    def used_ids(self, total_steps: int) -> list[int]:
        """Every pair index that steps 0 .. total_steps - 1 train on, sorted (what needs reference log-probs)."""
        used: set[int] = set()
        for epoch in range(math.ceil(total_steps / self.steps_per_epoch)):
            steps = min(self.steps_per_epoch, total_steps - epoch * self.steps_per_epoch)
            used.update(epoch_permutation(len(self.pairs), epoch, self.seed)[:steps * self.batch_size])
            if len(used) == len(self.pairs):
                break
        return sorted(used)


def step_ids(size: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Indices (of `size` items) that optimizer step `step` takes: a slice of its epoch's seeded permutation."""
    epoch, position = divmod(step, size // batch_size)
    order = epoch_permutation(size, epoch, seed)
    return order[position * batch_size:(position + 1) * batch_size]


def process_slice(batch_size: int, rank: int, world_size: int) -> list[int]:
    """The positions in a global batch that process `rank` of `world_size` trains on (contiguous, near-equal)."""
    return list(range(rank * batch_size // world_size, (rank + 1) * batch_size // world_size))


def micro_batches(positions: list[int], pairs: Sequence[TokenizedPair], micro_batch_size: int,
                  by_length: bool) -> list[list[int]]:
    """`positions` (into `pairs`) cut into micro-batches, in order or grouped by length (dpo.packing)."""
    if by_length:
        return group_by_length(positions, pairs, micro_batch_size)
    return [positions[i:i + micro_batch_size] for i in range(0, len(positions), micro_batch_size)]
