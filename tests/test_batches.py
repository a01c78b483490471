"""The offline pair source: what each step trains on, and which pairs need reference log-probs."""

import inspect

import pytest
import torch

from dpo.batches import OfflinePairs, PairSource, process_slice
from dpo.packing import micro_batches
from dpo.data import DataError
from dpo.on_policy import IterativePairs, OnlinePairs
from dpo.reference import ReferenceLogps, ReferenceLogpsError
from dpo.settings import ConfigError
from harness import random_pairs


@pytest.mark.parametrize("num_pairs,batch_size,total_steps", [(72, 16, 2), (72, 16, 4), (72, 16, 7), (50, 8, 13),
                                                               (9, 3, 1), (64, 64, 2)])
def test_used_ids_are_exactly_the_pairs_the_steps_train_on(num_pairs, batch_size, total_steps):
    source = OfflinePairs(random_pairs(num_pairs, 97), batch_size, seed=3)
    trained = {i for step in range(total_steps) for i in source.batch_ids(step)}
    assert source.used_ids(total_steps) == sorted(trained)
    assert all(len(source.batch_ids(step)) == batch_size for step in range(total_steps))


def test_a_batch_takes_its_reference_log_probs_and_refuses_missing_ones():
    pairs = random_pairs(12, 97)
    source = OfflinePairs(pairs, 4, seed=0)
    used = source.used_ids(2)
    reference = ReferenceLogps(-torch.arange(len(used), dtype=torch.float32), torch.zeros(len(used))).spread(used, 12)
    batch = source.step_batch(1, reference)
    ids = source.batch_ids(1)
    assert batch.pairs == [pairs[i] for i in ids]
    assert torch.equal(batch.reference.chosen, reference.chosen[ids])
    with pytest.raises(ReferenceLogpsError, match="step 3: the reference log-probs"):
        source.step_batch(2, reference)  # step 2 trains on pairs outside the precomputed set (NaN)


def test_process_slices_and_micro_batches_partition_the_batch():
    assert [process_slice(10, rank, 3) for rank in range(3)] == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    pairs = random_pairs(7, 97, seed=2)
    for by_length in (False, True):
        chunks = micro_batches(list(range(7)), pairs, 3, by_length)
        assert sorted(i for chunk in chunks for i in chunk) == list(range(7)) and [len(c) for c in chunks] == [3, 3, 1]


def test_every_pair_source_implements_the_protocol_train_py_reads():
    members = ("steps_per_epoch", "used_ids", "step_batch")
    for source in (OfflinePairs, OnlinePairs, IterativePairs):
        for name in members:
            expected, actual = getattr(PairSource, name), getattr(source, name)
            assert isinstance(actual, property) == isinstance(expected, property), (source, name)
            if not isinstance(expected, property):
                assert list(inspect.signature(actual).parameters) == list(inspect.signature(expected).parameters), \
                    (source, name)


def test_an_iterative_source_is_complete_when_built_and_refuses_fewer_steps_than_rounds(tmp_path):
    with pytest.raises(ConfigError, match="--iterations 4 needs at least one step per round; the run has 3"):
        IterativePairs(["a"] * 8, 2, 0, sampler=None, rounds=4, round_dir=tmp_path, total_steps=3, identity="",
                       reference=lambda pairs, r: None)
    source = IterativePairs(["a"] * 8, 2, 0, sampler=None, rounds=2, round_dir=tmp_path, total_steps=5, identity="",
                            reference=lambda pairs, r: None)
    assert (source.steps_per_epoch, source.steps_per_round, [source.round_of(s) for s in range(5)]) == \
        (4, 2, [0, 0, 1, 1, 1])


def test_an_offline_source_with_less_than_one_batch_is_refused_naming_the_data():
    with pytest.raises(DataError, match=r"my\.jsonl: 3 usable training pairs, fewer than one batch of --batch-size 4"):
        OfflinePairs(random_pairs(3, 97), 4, seed=0, description="my.jsonl")
