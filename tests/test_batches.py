"""The offline pair source: what each step trains on, and which pairs need reference log-probs."""

import pytest
import torch

from dpo.batches import OfflinePairs, micro_batches, process_slice
from dpo.reference import ReferenceLogps, ReferenceLogpsError
from tiny import random_pairs


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
    batch = source.batch(1, reference)
    ids = source.batch_ids(1)
    assert batch.pairs == [pairs[i] for i in ids]
    assert torch.equal(batch.reference.chosen, reference.chosen[ids])
    with pytest.raises(ReferenceLogpsError, match="step 3: the reference log-probs"):
        source.batch(2, reference)  # step 2 trains on pairs outside the precomputed set (NaN)


def test_process_slices_and_micro_batches_partition_the_batch():
    assert [process_slice(10, rank, 3) for rank in range(3)] == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    pairs = random_pairs(7, 97, seed=2)
    for by_length in (False, True):
        chunks = micro_batches(list(range(7)), pairs, 3, by_length)
        assert sorted(i for chunk in chunks for i in chunk) == list(range(7)) and [len(c) for c in chunks] == [3, 3, 1]
