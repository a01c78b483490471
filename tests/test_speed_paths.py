"""The fused LM head and the other speed paths compute exactly what the plain path computes."""

import pytest
import torch
from torch.nn import functional as F

from dpo import lm_head
from dpo.data import collate_pairs
from dpo.lm_head import lm_head_logps
from dpo.logprobs import SequenceScorer
from dpo.modeling import enable_gradient_checkpointing
from dpo.loss import LossSettings, PreferenceLogps, compute_loss
from dpo.packing import collate_shared_prompt, micro_batches
from harness import random_pairs, tiny_phi


def plain_head(hidden, weight, bias, targets):
    """The definition: full logits, fp32 log-softmax, ordinary autograd (under autocast as F.linear runs); WPO's
    values, the entropy and whether the target is the argmax."""
    logits = F.linear(hidden, weight, bias).float()
    lse = logits.logsumexp(-1)
    logps = logits.gather(-1, targets[:, None]).squeeze(-1) - lse
    log_sum_sq = torch.logsumexp(2 * (logits - lse[:, None]), -1)
    entropy = torch.special.entr((logits - lse[:, None]).detach().exp()).sum(-1)  # 0 log 0 = 0
    top1 = (logits.gather(-1, targets[:, None]).squeeze(-1) >= logits.amax(-1)).float()  # a tie for the top counts
    return logps, (logps - log_sum_sq).detach(), entropy, top1.detach()


def head_inputs(n=29, d=12, vocab=203, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g).requires_grad_()
    weight = (0.7 * torch.randn(vocab, d, generator=g)).requires_grad_()
    b = torch.randn(vocab, generator=g).requires_grad_() if bias else None
    targets = torch.randint(0, vocab, (n,), generator=g)
    targets[:3] = torch.tensor([0, vocab - 1, vocab - 1])  # the vocabulary's edges, a repeated target
    with torch.no_grad():  # some rows' targets are their top token (random ones almost never are)
        targets[3::4] = F.linear(hidden[3::4], weight, b).argmax(-1)
    upstream = torch.randn(n, generator=g)
    return hidden, weight, b, targets, upstream


def values_and_grads(fn, hidden, weight, bias, targets, upstream):
    """(log-probs, WPO's values, gradients of sum(upstream * log-probs), entropy, top1) of a head `fn`."""
    logps, adjusted, entropy, top1 = fn(hidden, weight, bias, targets)
    leaves = [t for t in (hidden, weight, bias) if t is not None]
    grads = torch.autograd.grad((logps * upstream).sum(), leaves)
    return logps.detach(), adjusted, grads, entropy, top1


@pytest.mark.parametrize("store", [True, False])
@pytest.mark.parametrize("row_chunk,vocab_chunk", [(7, 32), (29, 203), (100, 1000), (1, 67)])
@pytest.mark.parametrize("bias", [True, False])
def test_fused_head_equals_plain_autograd_fp32(store, row_chunk, vocab_chunk, bias):
    inputs = head_inputs(bias=bias)
    want = values_and_grads(plain_head, *inputs)
    got = values_and_grads(lambda h, w, b, t: lm_head_logps(h, w, b, t, row_chunk=row_chunk, vocab_chunk=vocab_chunk,
                                                            with_wpo=True, store=store, with_stats=True), *inputs)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(got[3], want[3], atol=1e-5, rtol=0)
    torch.testing.assert_close(got[4], want[4], atol=0, rtol=0)
    assert 0 < want[4].sum() < len(want[4])
    for a, b in zip(got[2], want[2]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
        assert a.dtype == torch.float32


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("store", [True, False])
def test_fused_head_with_no_scored_token_has_zero_gradients(dtype, store):
    """A micro-batch whose responses are all masked scores no row: the gradients are 0, not uninitialised memory
    (which trained a NaN model before the empty case was handled)."""
    _, weight, bias, _, _ = head_inputs()
    hidden, targets = torch.zeros(0, weight.shape[1], requires_grad=True), torch.zeros(0, dtype=torch.long)
    with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        logps = lm_head_logps(hidden, weight, bias, targets, store=store).logp
        grads = torch.autograd.grad(logps.sum(), [hidden, weight, bias], allow_unused=True)
    assert logps.shape == (0,)
    for grad, leaf in zip(grads, (hidden, weight, bias)):
        assert grad is not None and grad.shape == leaf.shape and not grad.any()


@pytest.mark.parametrize("n,row_slice", [(300, None), (29, 7), (29, 28)])
@pytest.mark.parametrize("store", [True, False])
def test_fused_head_backward_summed_over_row_slices_equals_plain(monkeypatch, n, row_slice, store):
    """[c h | c]^T E is summed over slices of rows: several full slices and a partial last one."""
    if row_slice is not None:
        monkeypatch.setattr(lm_head, "BACKWARD_ROW_SLICE", row_slice)
    assert n > lm_head.BACKWARD_ROW_SLICE and n % lm_head.BACKWARD_ROW_SLICE
    inputs = head_inputs(n=n)
    want = values_and_grads(plain_head, *inputs)
    got = values_and_grads(lambda h, w, b, t: lm_head_logps(h, w, b, t, row_chunk=n, vocab_chunk=64, store=store),
                           *inputs)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=0)
    for a, b in zip(got[2], want[2]):
        # gradients summed over 300 rows reach ~10, where fp32 rounding alone differs by ~5e-6 from plain
        # autograd: 1e-5 of their scale
        torch.testing.assert_close(a, b, atol=1e-5 * max(1.0, b.abs().max().item()), rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("store", [True, False])
def test_fused_head_under_autocast_equals_plain_autocast(dtype, store):
    inputs = head_inputs(n=9, d=8, vocab=64)
    with torch.autocast("cpu", dtype=dtype):
        want = values_and_grads(plain_head, *inputs)
        # one tile: the same matmuls in the same dtype as the plain path, so the same numbers
        one_tile = values_and_grads(lambda h, w, b, t: lm_head_logps(h, w, b, t, vocab_chunk=64, with_wpo=True,
                                                                     store=store, with_stats=True), *inputs)
        # several tiles: partial sums are rounded to the autocast dtype tile by tile
        tiled = values_and_grads(lambda h, w, b, t: lm_head_logps(h, w, b, t, row_chunk=4, vocab_chunk=16,
                                                                  with_wpo=True, store=store, with_stats=True),
                                 *inputs)
    for got, tolerance in ((one_tile, 1e-5), (tiled, 8 * torch.finfo(dtype).eps)):
        assert got[0].dtype == got[3].dtype == torch.float32
        torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=0)
        torch.testing.assert_close(got[3], want[3], atol=1e-5, rtol=0)  # the logits are those of the plain path
        torch.testing.assert_close(got[4], want[4], atol=0, rtol=0)
        for a, b in zip(got[2], want[2]):
            torch.testing.assert_close(a, b, atol=tolerance * b.abs().max().item(), rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_head_backward_outside_autocast_keeps_the_forward_dtype(dtype):
    """A training loop runs the forward under autocast and calls backward after leaving it: the backward must
    still run the matmuls as autocast's F.linear would, not switch to fp32 half-way."""
    inputs = head_inputs(n=9, d=8, vocab=64)
    hidden, weight, bias, targets, upstream = inputs
    leaves = [hidden, weight, bias]
    with torch.autocast("cpu", dtype=dtype):
        want_logps = plain_head(hidden, weight, bias, targets)[0]
        got_logps = lm_head_logps(hidden, weight, bias, targets, vocab_chunk=64).logp
    want = torch.autograd.grad((want_logps * upstream).sum(), leaves)
    got = torch.autograd.grad((got_logps * upstream).sum(), leaves)
    for a, b in zip(got, want):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, atol=1e-5 * b.abs().max().item(), rtol=0)


def test_fused_head_without_grad_equals_with_grad_and_checks_shapes():
    hidden, weight, bias, targets, _ = head_inputs()
    with torch.no_grad():
        a = lm_head_logps(hidden, weight, bias, targets, vocab_chunk=50, with_wpo=True, with_stats=True)
    b = lm_head_logps(hidden, weight, bias, targets, vocab_chunk=50, with_wpo=True, with_stats=True)
    assert b.logp.requires_grad and not a.logp.requires_grad
    assert not any(t.requires_grad for t in b[1:])
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y.detach(), atol=0, rtol=0)
    assert lm_head_logps(hidden, weight, bias, targets)[1:] == (None, None, None)  # only what is asked for
    with pytest.raises(ValueError, match="hidden"):
        lm_head_logps(hidden[None], weight, bias, targets)
    with pytest.raises(ValueError, match="vocab_chunk"):
        lm_head_logps(hidden, weight, bias, targets, vocab_chunk=0)


def dpo_loss_and_grads(model, scorer, micro_batches, collate, pairs, reference):
    """Summed sigmoid-DPO loss over micro-batches (one optimizer step) and the parameter gradients."""
    model.zero_grad()
    total = 0.0
    for ids in micro_batches:
        logps = scorer(collate([pairs[i] for i in ids]))
        n = len(ids)
        out = compute_loss(PreferenceLogps(policy_chosen_logps=logps.sum[:n], policy_rejected_logps=logps.sum[n:],
                                           reference_chosen_logps=reference[ids],
                                           reference_rejected_logps=reference[ids] - 1.0, state={}),
                           LossSettings(loss_type="sigmoid", beta=0.1))
        loss = out.losses.sum() / len(pairs)
        loss.backward()
        total += loss.item()
    return total, [p.grad.clone() for p in model.parameters()]


def two_step_setup(seed):
    """A tiny Phi, 6 random pairs in two micro-batches of 3, padded collation and made-up reference log-probs."""
    collate = lambda p: collate_pairs(p, pad_id=0)  # noqa: E731
    steps = [[0, 1, 2], [3, 4, 5]]
    return tiny_phi(), random_pairs(6, 97, seed=seed), -torch.arange(6, dtype=torch.float32), collate, steps


def test_fused_scorer_loss_and_gradients_equal_plain_scorer():
    model, pairs, reference, collate, steps = two_step_setup(seed=5)
    want = dpo_loss_and_grads(model, SequenceScorer(model, completion_only=False), steps, collate, pairs, reference)
    for kwargs in (dict(vocab_chunk=10), dict(vocab_chunk=10, recompute_softmax=True), dict(fused_lm_head=False)):
        got = dpo_loss_and_grads(model, SequenceScorer(model, **kwargs), steps, collate, pairs, reference)
        assert got[0] == pytest.approx(want[0], abs=1e-5)
        for a, b in zip(got[1], want[1]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_length_grouping_partitions_the_step_and_keeps_its_loss_and_gradients():
    model = tiny_phi()
    pairs = random_pairs(8, 97, seed=6)
    ids = list(range(8))
    groups = micro_batches(ids, pairs, 3, by_length=True)
    assert sorted(i for group in groups for i in group) == ids
    assert [len(group) for group in groups] == [3, 3, 2]
    lengths = [max(len(pairs[i].prompt_ids) + len(pairs[i].chosen_ids),
                   len(pairs[i].prompt_ids) + len(pairs[i].rejected_ids)) for group in groups for i in group]
    assert lengths == sorted(lengths, reverse=True)
    reference = -torch.arange(8, dtype=torch.float32)
    collate = lambda p: collate_pairs(p, pad_id=0)  # noqa: E731
    scorer = SequenceScorer(model)
    want = dpo_loss_and_grads(model, scorer, [ids[0:3], ids[3:6], ids[6:8]], collate, pairs, reference)
    got = dpo_loss_and_grads(model, scorer, groups, collate, pairs, reference)
    assert got[0] == pytest.approx(want[0], abs=1e-6)
    for a, b in zip(got[1], want[1]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="micro_batch_size"):
        micro_batches(ids, pairs, 0, by_length=True)


def test_gradient_checkpointing_with_shared_prompts_equals_plain():
    pairs = random_pairs(4, 97, seed=7)
    reference = -torch.arange(4, dtype=torch.float32)
    plain_model = tiny_phi()
    want = dpo_loss_and_grads(plain_model, SequenceScorer(plain_model, completion_only=False), [[0, 1], [2, 3]],
                              lambda p: collate_pairs(p, pad_id=0), pairs, reference)
    model = tiny_phi()
    enable_gradient_checkpointing(model)
    model.train()
    got = dpo_loss_and_grads(model, SequenceScorer(model, vocab_chunk=16), [[0, 1], [2, 3]], collate_shared_prompt,
                             pairs, reference)
    assert got[0] == pytest.approx(want[0], abs=1e-5)
    for a, b in zip(got[1], want[1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("store", [True, False])
@pytest.mark.parametrize("gap", [300.0, 60.0])
def test_fused_head_survives_a_later_tile_far_above_the_first(store, gap, monkeypatch):
    """The shift comes from the first vocabulary tile; a logit 300 above it in a later tile would overflow 2^(y - m),
    one 60 above it only WPO's sum of 4^(y - m) (the log-probs alone would stay finite), and either forces the
    exact-maximum pass. Values, WPO log-probs and gradients must still equal the plain computation."""
    hidden, weight, bias, targets, upstream = head_inputs(n=6, d=4, vocab=96)
    with torch.no_grad():
        bias[70] = gap  # far above every logit of the first tile (vocabulary 0..31)
        bias[5] = -gap
    targets[:2] = torch.tensor([70, 5])
    want = values_and_grads(plain_head, hidden, weight, bias, targets, upstream)
    import dpo.lm_head

    exact_passes = []
    row_maxima = dpo.lm_head._row_maxima
    monkeypatch.setattr(dpo.lm_head, "_row_maxima", lambda *args: exact_passes.append(1) or row_maxima(*args))
    got = values_and_grads(lambda h, w, b, t: lm_head_logps(h, w, b, t, row_chunk=4, vocab_chunk=32, with_wpo=True,
                                                            store=store, with_stats=True),
                           hidden, weight, bias, targets, upstream)
    assert len(exact_passes) == 2  # both row blocks, in the forward only
    assert torch.isfinite(got[0]).all() and torch.isfinite(got[1]).all()
    torch.testing.assert_close(got[3], want[3], atol=1e-5, rtol=1e-6)  # the entropy and the top token, too
    torch.testing.assert_close(got[4], want[4], atol=0, rtol=0)
    assert got[4][0] == 1  # token 70 is the top token
    # log-probs near -600 carry fp32 rounding of 1e-7 relative in both computations
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-6)
    for a, b in zip(got[2], want[2]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_fused_head_reuses_its_workspace_and_stays_exact():
    """The buffer that keeps the softmax tiles is handed back after the backward and reused by the next call."""
    from dpo.lm_head import workspace_pool

    workspace_pool.clear()
    inputs = head_inputs()
    want = values_and_grads(plain_head, *inputs)
    first = values_and_grads(lambda h, w, b, t: lm_head_logps(h, w, b, t, vocab_chunk=50), *inputs)
    assert len(workspace_pool.free) == 1
    buffer = workspace_pool.free[0]
    second = values_and_grads(lambda h, w, b, t: lm_head_logps(h, w, b, t, vocab_chunk=50), *inputs)
    assert len(workspace_pool.free) == 1 and workspace_pool.free[0] is buffer
    for got in (first, second):
        torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=0)
        for a, b in zip(got[2], want[2]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_reserved_workspace_serves_every_micro_batch_of_the_run():
    """reserve_workspace sizes the softmax workspace for the largest micro-batch the pairs can form: every
    micro-batch then reuses that one buffer, and the results are those of an unreserved run."""
    from dpo.lm_head import workspace_numel, workspace_pool

    pairs = random_pairs(6, 97, seed=3)
    model = tiny_phi()
    scorer = SequenceScorer(model, vocab_chunk=16)
    workspace_pool.clear()
    want = [scorer(collate_shared_prompt(pairs[i:i + 2])).sum for i in range(0, 6, 2)]
    workspace_pool.clear()
    rows = scorer.reserve_workspace(pairs, 2)
    scored = sorted((len(p.chosen_ids) + len(p.rejected_ids) for p in pairs), reverse=True)
    assert rows == scored[0] + scored[1]
    assert [b.numel() for b in workspace_pool.free] == [workspace_numel(rows, 97, 16)]
    reserved = workspace_pool.free[0]
    for i, expected in zip(range(0, 6, 2), want):
        logps = scorer(collate_shared_prompt(pairs[i:i + 2])).sum
        logps.sum().backward()  # hands the workspace back
        assert workspace_pool.free == [reserved]
        torch.testing.assert_close(logps, expected, atol=1e-5, rtol=0)
    assert SequenceScorer(model, recompute_softmax=True).reserve_workspace(pairs, 2) == 0
    workspace_pool.clear()


def test_a_token_budget_reserves_no_more_workspace_than_its_micro_batches_use():
    from dpo.lm_head import workspace_pool
    from dpo.packing import micro_batches

    pairs = random_pairs(12, 97, seed=4)
    scorer = SequenceScorer(tiny_phi(), vocab_chunk=16)
    scored = [len(p.chosen_ids) + len(p.rejected_ids) for p in pairs]
    unbudgeted = scorer.reserve_workspace(pairs, 12)
    assert unbudgeted == sum(scored)
    for budget in (1, 40, 90, 10_000):
        rows = scorer.reserve_workspace(pairs, 12, max_tokens=budget)
        for layout in ("padded", "packed", "shared_prompt"):
            for chunk in micro_batches(range(12), pairs, 12, True, budget, layout):
                assert sum(scored[i] for i in chunk) <= rows
        assert rows <= unbudgeted
        if budget < 90:
            assert rows < unbudgeted
    workspace_pool.clear()


def test_fused_gelu_is_gelu_new_to_fp32_rounding():
    from transformers.activations import NewGELUActivation

    from dpo.activations import FusedTanhGELU

    x = torch.cat([torch.linspace(-12, 12, 2001), 30 * torch.randn(500, generator=torch.Generator().manual_seed(0))])
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    want, got = NewGELUActivation()(x1), FusedTanhGELU()(x2)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-6)  # deep in the negative tail 1e-6 vs 0
    want.sum().backward()
    got.sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, atol=2e-6, rtol=1e-6)


def test_fused_gelu_model_gives_the_same_dpo_loss_and_gradients():
    from dpo.activations import FusedTanhGELU, fuse_gelu

    model, pairs, reference, collate, steps = two_step_setup(seed=7)
    want = dpo_loss_and_grads(model, SequenceScorer(model), steps, collate, pairs, reference)
    assert fuse_gelu(model) == model.config.num_hidden_layers
    assert sum(isinstance(m, FusedTanhGELU) for m in model.modules()) == model.config.num_hidden_layers
    got = dpo_loss_and_grads(model, SequenceScorer(model), steps, collate, pairs, reference)
    assert got[0] == pytest.approx(want[0], abs=1e-5)
    for a, b in zip(got[1], want[1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert fuse_gelu(model) == 0  # nothing left to replace


@pytest.mark.parametrize("store", [True, False])
def test_a_frozen_head_keeps_no_tiles_and_runs_no_weight_gradient(monkeypatch, store):
    """Under LoRA the LM head is frozen: in fp32 its backward needs only E W, so the forward keeps no softmax
    tile and the backward skips the weight-gradient matmul (a third of the head's FLOPs); dh is unchanged."""
    from dpo.lm_head import workspace_pool

    hidden, weight, bias, targets, upstream = head_inputs()
    weight.requires_grad_(False)
    bias.requires_grad_(False)
    want = torch.autograd.grad((plain_head(hidden, weight, bias, targets)[0] * upstream).sum(), [hidden])[0]
    calls = []
    real = lm_head._left_t_times
    monkeypatch.setattr(lm_head, "_left_t_times", lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
    workspace_pool.clear()
    logps = lm_head_logps(hidden, weight, bias, targets, vocab_chunk=50, store=store).logp
    got = torch.autograd.grad((logps * upstream).sum(), [hidden])[0]
    assert calls == [] and workspace_pool.free == []
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    weight.requires_grad_(True)  # the same call with a trainable head runs it
    logps = lm_head_logps(hidden, weight, bias, targets, vocab_chunk=50, store=store).logp
    torch.autograd.grad((logps * upstream).sum(), [hidden, weight])
    assert calls
    workspace_pool.clear()


@pytest.mark.parametrize("store", [True, False])
@pytest.mark.parametrize("gap", [50.0, 87.5])
def test_fused_head_gradients_keep_their_precision_under_a_small_upstream_gradient(store, gap):
    """A later tile `gap` nats above the first: with a sum of 2^(y - m) near 2^126 the backward's -g / s would fall
    among fp32's subnormals for g = 1e-6 (a per-token gradient of a batch mean), and dW lost 30% of its value. The
    block is redone with exact maxima, so the gradients equal float64's to fp32 rounding."""
    g = torch.Generator().manual_seed(0)
    hidden, weight = 0.1 * torch.randn(16, 4, generator=g), torch.randn(8, 4, generator=g)
    bias = torch.zeros(8)
    bias[6] = gap  # in the second tile of 4
    targets = torch.randint(0, 8, (16,), generator=g)
    leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    logp = lm_head_logps(*leaves, targets, vocab_chunk=4, store=store).logp
    got = torch.autograd.grad((logp * 1e-6).sum(), leaves)
    exact = [x.double().requires_grad_() for x in (hidden, weight, bias)]
    logits = torch.nn.functional.linear(*exact)
    want = torch.autograd.grad(((logits.gather(-1, targets[:, None]).squeeze(-1) - logits.logsumexp(-1))
                                * 1e-6).sum(), exact)
    for a, b in zip(got, want):
        assert ((a.double() - b).abs().max() / b.abs().max()).item() < 1e-5


@pytest.mark.parametrize("store", [True, False])
def test_fused_head_refuses_a_second_backward_in_one_line(store):
    """The first backward releases the forward's tiles: a second one (retain_graph) says so instead of failing
    inside a matmul (retain_graph left the tiles released), and a double backward (create_graph) gets no graph to
    differentiate, rather than failing inside the head."""
    hidden, weight, bias, targets, _ = head_inputs(n=5, d=4, vocab=40)
    logp = lm_head_logps(hidden, weight, bias, targets, vocab_chunk=16, store=store).logp
    first = torch.autograd.grad(logp.sum(), [weight], retain_graph=True)[0]
    assert torch.isfinite(first).all() and first.abs().sum() > 0
    with pytest.raises(RuntimeError, match=r"^lm_head_logps: one backward per forward \(the first releases"):
        torch.autograd.grad(logp.sum(), [weight])
    logp = lm_head_logps(hidden, weight, bias, targets, vocab_chunk=16, store=store).logp
    grad_h = torch.autograd.grad(logp.sum(), [hidden], create_graph=True)[0]
    assert not grad_h.requires_grad  # no second-order graph: a double backward is autograd's refusal
    with pytest.raises(RuntimeError, match="does not require grad"):
        torch.autograd.grad(grad_h.sum(), [weight])


@pytest.mark.parametrize("store", [True, False])
def test_fused_head_statistics_change_no_bit_of_the_log_probs_or_gradients(store, monkeypatch):
    """A later tile 86 nats above the first (u ~ 124 in base 2): 2^u is finite, u 2^u would not be. The statistics
    must not change which blocks the head redoes (which rounds log-probs and gradients otherwise), and a logit of
    -inf has probability 0 and adds nothing to the entropy (0 log 0 = 0)."""
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(16, 4, generator=g), torch.randn(8, 4, generator=g)
    bias = torch.zeros(8)
    bias[6], bias[5] = 86.0, float("-inf")  # both in the second tile
    targets = torch.randint(0, 8, (16,), generator=g)
    passes = []
    row_maxima = lm_head._row_maxima
    monkeypatch.setattr(lm_head, "_row_maxima", lambda *args: passes.append(1) or row_maxima(*args))
    runs, redone = {}, {}
    for with_stats in (False, True):
        leaf = weight.clone().requires_grad_()
        out = lm_head_logps(hidden, leaf, bias, targets, vocab_chunk=4, store=store, with_stats=with_stats)
        out.logp.sum().backward()
        runs[with_stats], redone[with_stats] = (out, leaf.grad), len(passes)
        passes.clear()
    assert redone[False] == redone[True]
    assert torch.equal(runs[False][0].logp, runs[True][0].logp) and torch.equal(runs[False][1], runs[True][1])
    want = plain_head(hidden, weight, bias, targets)
    assert torch.isfinite(runs[True][0].entropy).all()
    torch.testing.assert_close(runs[True][0].entropy, want[2], atol=2e-5, rtol=0)
    torch.testing.assert_close(runs[True][0].top1, want[3], atol=0, rtol=0)
