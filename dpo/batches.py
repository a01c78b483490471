"""What each optimizer step trains on: a global batch of pairs, with their reference log-probs when precomputed.

    PairBatch      the pairs of one step (all processes together) and their precomputed reference log-probs
    PairSource     what a run's steps train on: the interface train.py reads (OfflinePairs here; OnlinePairs and
                   IterativePairs in dpo.on_policy sample and judge the policy's own responses)
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
from typing import Protocol

from torch import nn

from dpo.data import DataError, TokenizedPair, epoch_permutation
from dpo.distributed import DistInfo
from dpo.packing import micro_batches
from dpo.reference import ReferenceLogps


@dataclass
class PairBatch:
    """The pairs of one optimizer step (all processes together), their precomputed reference log-probs and the
    metrics of how they were made."""

    pairs: list[TokenizedPair]
    reference: ReferenceLogps | None = None  # one entry per pair; None when computed at step time or not needed
    metrics: dict[str, float] = field(default_factory=dict)  # how the pairs were made (online: sampling, judge)

    def __len__(self) -> int:
        return len(self.pairs)


class PairSource(Protocol):
    """What a run's optimizer steps train on. Built complete (every setting it needs given to its constructor), it
    answers three questions:

        steps_per_epoch    optimizer steps in one pass over its items (pairs, or instructions to sample)
        used_ids           the pair indices steps 0 .. total_steps - 1 read from the preference set: what needs
                           reference log-probs computed before training (none for a source that makes its pairs)
        step_batch         the global batch of a step: a pure function of the step (and, for sources that sample,
                           the policy), so a resumed run sees the batches an uninterrupted one would
    """

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps in one pass over the source's items."""

    def used_ids(self, total_steps: int) -> list[int]:
        """The preference set's pair indices that steps 0 .. total_steps - 1 train on, sorted."""

    def step_batch(self, step: int, reference: ReferenceLogps | None, policy: nn.Module,
                   dist: DistInfo) -> PairBatch:
        """The global batch of optimizer step `step` (0-based; the same on every process). `reference`: the
        precomputed reference log-probs of the preference set (NaN where not used), or None."""


@dataclass(frozen=True)
class OfflinePairs:
    """Offline DPO's pair source: step s trains on a slice of its epoch's seeded permutation of `pairs`."""

    pairs: Sequence[TokenizedPair]
    batch_size: int
    seed: int
    description: str = "the preference set"  # named in the error when there is less than one batch

    def __post_init__(self) -> None:
        if self.steps_per_epoch == 0:
            raise DataError(f"{self.description}: {len(self.pairs)} usable training pairs, fewer than one batch of "
                            f"--batch-size {self.batch_size}")

    @property
    def steps_per_epoch(self) -> int:
        """Full batches in one pass over the pairs (the last partial batch of an epoch is left out)."""
        return len(self.pairs) // self.batch_size

    def batch_ids(self, step: int) -> list[int]:
        """Indices into `pairs` of the global batch of optimizer step `step` (0-based)."""
        return step_ids(len(self.pairs), self.batch_size, self.seed, step)

    def step_batch(self, step: int, reference: ReferenceLogps | None = None, policy: nn.Module | None = None,
                   dist: DistInfo | None = None) -> PairBatch:
        """The pairs of step `step` with their precomputed reference log-probs, which must all be finite (the
        policy and the processes play no part: the batch is a function of the step)."""
        ids = self.batch_ids(step)
        selected = reference.select(ids).require_finite(f"step {step + 1}") if reference is not None else None
        return PairBatch([self.pairs[i] for i in ids], selected)

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


def process_micro_batches(pairs: Sequence[TokenizedPair], rank: int, world_size: int, micro_batch_size: int,
                          by_length: bool, max_tokens: int | None = None,
                          layout: str = "padded") -> list[tuple[list[int], bool]]:
    """This process's micro-batches of a global batch `pairs`, as (positions, counted) pairs.

    Every process runs as many forward/backward passes as the process with the most micro-batches, since DDP's
    and FSDP's collectives pair the passes of all processes up; the extra passes of a process (a token budget
    that cut its slice into fewer micro-batches, or a batch with fewer pairs than processes) repeat one of its
    pairs with weight 0 (counted False). Every process computes every plan, so no communication is needed."""
    plans = [micro_batches(process_slice(len(pairs), r, world_size), pairs, micro_batch_size, by_length, max_tokens,
                           layout) for r in range(world_size)]
    mine = plans[rank]
    filler = mine[0][:1] if mine else [0]
    return [(ids, True) for ids in mine] + [(filler, False)] * (max(map(len, plans)) - len(mine))
