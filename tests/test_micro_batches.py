"""Micro-batches cut by rows or by a token budget, and the passes each process runs."""

import math
import random

import pytest
import torch

import train
from dpo.batches import process_micro_batches
from dpo.packing import layout_tokens, micro_batches
from dpo.data import TokenizedPair
from dpo.loss import LossOutput, PreferenceLogps
from dpo.metrics import PairMetrics
from harness import make_run_dir, run_metrics, tiny_run_args


def random_length_pairs(n: int, seed: int = 0) -> list[TokenizedPair]:
    rng = random.Random(seed)
    return [TokenizedPair([1] * rng.randint(0, 30), [2] * rng.randint(1, 40), [3] * rng.randint(1, 40), row)
            for row in range(n)]


def test_layout_tokens_by_hand():
    pairs = [TokenizedPair([1] * 5, [2] * 3, [3] * 7, 0), TokenizedPair([1] * 2, [2] * 9, [3] * 1, 1)]
    # padded: 4 rows, each as wide as the longest sequence (5 + 7 = 12)
    assert layout_tokens("padded", pairs) == 4 * 12
    assert layout_tokens("packed", pairs) == (5 + 3 + 5 + 7) + (2 + 9 + 2 + 1)
    assert layout_tokens("shared_prompt", pairs) == (5 + 3 + 7) + (2 + 9 + 1)


@pytest.mark.parametrize("layout", ["padded", "packed", "shared_prompt"])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_token_budget_plans_cover_every_pair_once_within_the_budget(layout, world_size):
    pairs = random_length_pairs(37, seed=world_size)
    budget = 200
    plans = [process_micro_batches(pairs, rank, world_size, 8, True, budget, layout) for rank in range(world_size)]
    assert len({len(plan) for plan in plans}) == 1  # every process runs as many passes
    counted = [ids for plan in plans for ids, is_counted in plan if is_counted]
    assert sorted(i for ids in counted for i in ids) == list(range(len(pairs)))
    for ids in counted:
        assert len(ids) <= 8
        assert len(ids) == 1 or layout_tokens(layout, [pairs[i] for i in ids]) <= budget
    for rank, plan in enumerate(plans):  # weight-0 passes repeat one of the process's own pairs
        own = {i for ids, is_counted in plan if is_counted for i in ids}
        assert all(len(ids) == 1 and ids[0] in own for ids, is_counted in plan if not is_counted)
    # greedy: no micro-batch could have taken the next pair in order
    for plan in plans:
        real = [ids for ids, is_counted in plan if is_counted]
        for a, b in zip(real, real[1:]):
            assert len(a) == 8 or layout_tokens(layout, [pairs[i] for i in a + b[:1]]) > budget


def test_without_a_budget_micro_batches_are_rows_longest_first():
    pairs = random_length_pairs(10)
    chunks = micro_batches(list(range(10)), pairs, 4, by_length=True)
    lengths = [len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs]
    assert [len(c) for c in chunks] == [4, 4, 2]
    flat = [i for c in chunks for i in c]
    assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)
    assert micro_batches(list(range(10)), pairs, 4, by_length=False) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    # a batch with fewer pairs than processes: the process without pairs runs one weight-0 pass
    assert process_micro_batches(pairs[:1], 0, 2, 4, True) == [([0], False)]
    assert process_micro_batches(pairs[:1], 1, 2, 4, True) == [([0], True)]


@pytest.mark.slow
def test_a_token_budget_run_equals_the_row_micro_batch_run(tmp_path, monkeypatch):
    """Every forward of the run keeps the budget: the steps, the reference pass before them and the evaluation of
    the held-out pairs; and the run is the row micro-batch run."""
    make_run_dir(tmp_path, 40)
    common = ["--lr", "1e-2", "--batch-size", "16", "--micro-batch-size", "8", "--max-steps", "3", "--layout", "padded",
              "--eval-steps", "1"]
    assert train.main(tiny_run_args(tmp_path, "rows", *common)) == 0
    collated = []
    real_collate = train.collate_pairs
    monkeypatch.setattr(train, "collate_pairs", lambda pairs, **kw: collated.append(list(pairs)) or
                        real_collate(pairs, **kw))
    budget = 120
    assert train.main(tiny_run_args(tmp_path, "tokens", *common, "--max-tokens-per-micro-batch", str(budget))) == 0
    # the reference pass scores the 32 train pairs and the 8 held-out ones, 3 steps train on 16 pairs each, and an
    # evaluation after each step scores the 8 held-out pairs
    assert sum(map(len, collated)) == 32 + 8 + 3 * 16 + 3 * 8
    assert all(len(pairs) == 1 or layout_tokens("padded", pairs) <= budget for pairs in collated)
    assert max(map(len, collated)) > 1
    from safetensors.torch import load_file

    a, b = (load_file(tmp_path / run / "final" / "model.safetensors") for run in ("rows", "tokens"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=0)
    ra, rb = (run_metrics(tmp_path / run) for run in ("rows", "tokens"))
    for x, y in zip(ra, rb):
        assert x.get("split") == y.get("split")
        for key in ("loss", "rewards/margins", "logps/chosen", "logits/chosen", "logits/rejected", "entropy",
                    "mean_token_accuracy", "grad_norm"):
            if key in x:
                assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-6), key
    assert len([r for r in ra if r.get("split") == "eval"]) == 3


def test_token_metrics_are_token_weighted_over_the_step():
    """logits/chosen is the step's sum of per-token mean logits over its chosen tokens (TRL's per-micro-batch
    definition, taken over the whole step): the same however the pairs are split into micro-batches. entropy pools
    chosen and rejected tokens; mean_token_accuracy counts chosen tokens only."""
    lengths = torch.tensor([1.0, 9.0, 4.0, 2.0])
    chosen_sums, rejected_sums = torch.tensor([3.0, -18.0, 2.0, 5.0]), torch.tensor([-1.0, 4.0, 0.5, 8.0])
    chosen_entropy, rejected_entropy = torch.tensor([0.5, 9.0, 2.0, 1.0]), torch.tensor([1.0, 30.0, 4.0, 6.0])
    top1 = torch.tensor([1.0, 3.0, 4.0, 0.0])
    zeros = torch.zeros(4)

    def step(splits):
        stats = PairMetrics()
        for ids in splits:
            ids = torch.tensor(ids)
            logps = PreferenceLogps(zeros[ids], zeros[ids], chosen_lengths=lengths[ids],
                                    rejected_lengths=2 * lengths[ids], policy_chosen_logits=chosen_sums[ids],
                                    policy_rejected_logits=rejected_sums[ids],
                                    policy_chosen_entropy=chosen_entropy[ids],
                                    policy_rejected_entropy=rejected_entropy[ids], policy_chosen_top1=top1[ids])
            stats.add(LossOutput(zeros[ids], zeros[ids], zeros[ids], torch.zeros(0)), logps)
        return stats.means()

    whole, split = step([[0, 1, 2, 3]]), step([[0], [1, 2], [3]])
    assert whole["logits/chosen"] == pytest.approx(-8.0 / 16.0) == split["logits/chosen"]
    assert whole["logits/rejected"] == pytest.approx(11.5 / 32.0) == split["logits/rejected"]
    assert split["logits/chosen"] != pytest.approx((3.0 + (-16.0 / 13.0) + 2.5) / 3)  # the mean of micro means
    assert whole["entropy"] == pytest.approx((12.5 + 41.0) / (16 + 32)) == split["entropy"]
    assert whole["mean_token_accuracy"] == pytest.approx(8.0 / 16.0) == split["mean_token_accuracy"]
    stats = PairMetrics()
    stats.add(LossOutput(zeros, zeros, zeros, torch.zeros(0)), PreferenceLogps(zeros, zeros, chosen_lengths=lengths,
                                                                              rejected_lengths=lengths))
    assert not {"logits/chosen", "entropy", "mean_token_accuracy"} & set(stats.means())  # a scorer that gave none
    assert stats.num_pairs == 4
    assert stats.means()["rewards/accuracies"] == 0.0  # no pair's chosen reward above its rejected one
    nan = PairMetrics()  # a NaN margin is no comparison: NaN (logged null), not counted as a loss of the pair
    nan.add(LossOutput(zeros, torch.tensor([math.nan, 1.0, 1.0, 1.0]), zeros, torch.zeros(0)),
            PreferenceLogps(zeros, zeros, chosen_lengths=lengths, rejected_lengths=lengths))
    assert math.isnan(nan.means()["rewards/accuracies"])
