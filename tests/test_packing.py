"""Packed and shared-prompt batches give the log-probs and gradients of the padded batch."""

import pytest
import torch

from dpo.data import TokenizedPair, collate_pairs
from dpo.logprobs import SequenceScorer
from dpo.packing import PACKED_ATTENTION, PackingError, collate_packed, collate_shared_prompt, enable_packed_attention
from harness import tiny_phi

LAYOUTS = {"packed": collate_packed, "shared_prompt": collate_shared_prompt}


def random_pairs(n, vocab, seed=0, empty_prompt=False):
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for row in range(n):
        lengths = torch.randint(1, 9, (3,), generator=g).tolist()
        ids = [torch.randint(1, vocab, (k,), generator=g).tolist() for k in lengths]
        prompt = [] if empty_prompt and row == 0 else ids[0]
        pairs.append(TokenizedPair(prompt_ids=prompt, chosen_ids=ids[1] + [0], rejected_ids=ids[2] + [0], row=row))
    return pairs


def definition_token_logps(model, pairs):
    """Each sequence's scored tokens' log-probs (fp64), in order (chosen sequences, then rejected): one sequence at a
    time, no padding, full log-softmax."""
    tokens = []
    for responses in ([p.chosen_ids for p in pairs], [p.rejected_ids for p in pairs]):
        for pair, response in zip(pairs, responses):
            ids = torch.tensor([pair.prompt_ids + response])
            logp = model(input_ids=ids).logits.double().log_softmax(-1)[0]
            start = len(pair.prompt_ids)
            tokens.append([logp[start + j - 1, tok] for j, tok in enumerate(response) if start + j >= 1])
    return tokens


def definition_logps(model, pairs):
    """One sequence at a time, no padding, full log-softmax."""
    return torch.stack([sum(tokens, torch.tensor(0.0, dtype=torch.float64))
                        for tokens in definition_token_logps(model, pairs)]).float()


def test_collate_packed_layout_by_hand():
    pairs = [TokenizedPair([5, 6], [7, 0], [8, 9, 0], 0), TokenizedPair([4], [3, 0], [2, 0], 1)]
    batch = collate_packed(pairs)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0, 4, 3, 0, 5, 6, 8, 9, 0, 4, 2, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4, 0, 1, 2]]
    assert batch["block_lengths"].tolist() == [[4, 0, 0], [3, 0, 0], [5, 0, 0], [3, 0, 0]]
    assert batch["score_index"].tolist() == [1, 2, 4, 5, 8, 9, 10, 12, 13]
    assert batch["score_target"].tolist() == [7, 0, 3, 0, 8, 9, 0, 2, 0]
    assert batch["score_row"].tolist() == [0, 0, 1, 1, 2, 2, 2, 3, 3]


def test_collate_shared_prompt_layout_by_hand():
    pairs = [TokenizedPair([5, 6], [7, 0], [8, 9, 0], 0), TokenizedPair([4], [3, 0], [2, 0], 1)]
    batch = collate_shared_prompt(pairs)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0, 8, 9, 0, 4, 3, 0, 2, 0]]
    # the rejected response restarts at the end of the prompt
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 2, 3, 4, 0, 1, 2, 1, 2]]
    assert batch["block_lengths"].tolist() == [[2, 2, 3], [1, 2, 2]]
    # the first rejected token is predicted by the last prompt token (index 1), not the last chosen token
    assert batch["score_index"].tolist() == [1, 2, 1, 4, 5, 7, 8, 7, 10]
    assert batch["score_target"].tolist() == [7, 0, 8, 9, 0, 3, 0, 2, 0]
    assert batch["score_row"].tolist() == [0, 0, 2, 2, 2, 1, 1, 3, 3]
    assert batch["prompt_lengths"].tolist() == [2, 1, 2, 1]
    assert batch["response_lengths"].tolist() == [2, 2, 3, 2]


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("completion_only", [True, False])
@pytest.mark.parametrize("empty_prompt", [False, True])
def test_packed_logps_equal_definition_and_padded(layout, completion_only, empty_prompt):
    model = tiny_phi().eval()
    pairs = random_pairs(5, 97, seed=1, empty_prompt=empty_prompt)
    scorer = SequenceScorer(model, completion_only=completion_only, vocab_chunk=16, with_wpo=True, with_stats=True)
    with torch.no_grad():
        got = scorer(LAYOUTS[layout](pairs))
        padded = scorer(collate_pairs(pairs, pad_id=0))
        want = definition_logps(model, pairs)
    torch.testing.assert_close(got.sum, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.sum, padded.sum, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.count, padded.count, atol=0, rtol=0)
    torch.testing.assert_close(got.wpo, padded.wpo, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.logits, padded.logits, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(got.entropy, padded.entropy, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(got.top1, padded.top1, atol=0, rtol=0)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_packed_gradients_equal_padded_gradients(layout):
    model = tiny_phi()
    pairs = random_pairs(4, 97, seed=2)
    upstream = torch.randn(8, generator=torch.Generator().manual_seed(0))
    grads = {}
    for name, collate, kwargs in (("padded", lambda p: collate_pairs(p, pad_id=0), dict(fused_lm_head=False)),
                                  (layout, LAYOUTS[layout], dict(vocab_chunk=16))):
        model.zero_grad()
        logps = SequenceScorer(model, **kwargs)(collate(pairs))
        (logps.sum * upstream).sum().backward()
        grads[name] = [p.grad.clone() for p in model.parameters()]
    for a, b in zip(grads[layout], grads["padded"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_shared_prompt_hides_chosen_from_rejected_and_blocks_from_each_other():
    model = tiny_phi().eval()
    pairs = random_pairs(3, 97, seed=3)
    changed = list(pairs)
    p = pairs[1]
    changed[1] = TokenizedPair(p.prompt_ids, [(t + 11) % 97 for t in p.chosen_ids], p.rejected_ids, p.row)
    scorer = SequenceScorer(model)
    with torch.no_grad():
        before = scorer(collate_shared_prompt(pairs)).sum
        after = scorer(collate_shared_prompt(changed)).sum
    # only pair 1's chosen sequence (row 1) may change
    assert not torch.allclose(before[1], after[1])
    keep = [0, 2, 3, 4, 5]
    torch.testing.assert_close(after[keep], before[keep], atol=0, rtol=0)


def test_packed_attention_needs_sdpa_and_leaves_unpacked_calls_unchanged():
    eager = tiny_phi()
    eager.config._attn_implementation = "eager"
    with pytest.raises(PackingError, match="eager"):
        enable_packed_attention(eager)
    model = tiny_phi().eval()
    batch = collate_pairs(random_pairs(3, 97, seed=4), pad_id=0)
    with torch.no_grad():
        before = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        enable_packed_attention(model)
        assert model.config._attn_implementation == PACKED_ATTENTION
        after = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(after, before, atol=0, rtol=0)


class SDPAMasks(torch.overrides.TorchFunctionMode):
    """Records (attn_mask, is_causal) of every SDPA call made under it; each call still runs as it would."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            self.calls.append((kwargs.get("attn_mask"), kwargs.get("is_causal", False)))
        return func(*args, **kwargs)


@pytest.mark.parametrize("layout", ["padded", *sorted(LAYOUTS)])
def test_every_layout_attends_without_a_mask_tensor(layout):
    """Flash kernels take no mask tensor: every layout's SDPA calls are plain causal, or (shared prompt's rejected
    branch) bottom-right causal, never a materialized mask."""
    from torch.nn.attention.bias import CausalBias, CausalVariant
    model = tiny_phi().eval()
    pairs = random_pairs(4, 97, seed=5)
    collate = LAYOUTS.get(layout, lambda p: collate_pairs(p, pad_id=0))
    batch = collate(pairs)
    if layout == "padded":
        assert (batch["attention_mask"] == 0).any()  # rows of different lengths
    with torch.no_grad(), SDPAMasks() as recorder:
        SequenceScorer(model)(batch)
    masks = recorder.calls
    assert len(masks) >= model.config.num_hidden_layers
    for mask, is_causal in masks:
        if isinstance(mask, CausalBias):
            assert layout == "shared_prompt" and mask.variant == CausalVariant.LOWER_RIGHT and not is_causal
        else:
            assert mask is None and is_causal
    bias_calls = sum(isinstance(mask, CausalBias) for mask, _ in masks)
    assert bias_calls == (4 * model.config.num_hidden_layers if layout == "shared_prompt" else 0)


def test_a_left_padded_mask_is_kept():
    from dpo.logprobs import causal_attention_mask
    right = torch.tensor([[1, 1, 1], [1, 1, 0], [0, 0, 0]])
    left = torch.tensor([[1, 1, 1], [0, 1, 1]])
    assert causal_attention_mask(right) is None
    assert causal_attention_mask(left) is left


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_shared_prompt_under_autocast_equals_padded(dtype):
    """Under autocast Phi hands attention fp32 queries and keys with half values; the bottom-right causal call
    casts them as SDPA's autocast does, so the layout runs and agrees with padded rows in forward and backward."""
    model = tiny_phi()
    pairs = random_pairs(4, 97, seed=6)
    upstream = torch.randn(8, generator=torch.Generator().manual_seed(1))
    results = {}
    for name, batch in (("padded", collate_pairs(pairs, pad_id=0)), ("shared", collate_shared_prompt(pairs))):
        model.zero_grad()
        with torch.autocast("cpu", dtype=dtype):
            logps = SequenceScorer(model, fused_lm_head=False)(batch).sum
        (logps * upstream).sum().backward()
        results[name] = (logps.detach(), torch.cat([p.grad.flatten() for p in model.parameters()]))
    (a, grad_a), (b, grad_b) = results["padded"], results["shared"]
    torch.testing.assert_close(a, b, atol=0.1, rtol=0.01)
    assert torch.nn.functional.cosine_similarity(grad_a, grad_b, dim=0) > 0.999


@pytest.mark.parametrize("layout", ["padded", *sorted(LAYOUTS)])
@pytest.mark.parametrize("completion_only,fused_lm_head", [(True, True), (True, False), (False, False)])
@pytest.mark.parametrize("ld_alpha", [0.0, 0.3, 1.0])
def test_ld_dpo_log_probs_weigh_the_tokens_beyond_the_shorter_response(layout, completion_only, fused_lm_head,
                                                                       ld_alpha):
    """LD-DPO: a response's log-prob is the sum over its first k scored tokens, k the pair's shorter response, plus
    ld_alpha times the rest; in every layout (the shared-prompt layout lists a pair's rows out of order)."""
    model = tiny_phi().eval()
    pairs = random_pairs(6, 97, seed=3, empty_prompt=True)
    collate = LAYOUTS.get(layout, lambda p: collate_pairs(p, pad_id=0))
    scorer = SequenceScorer(model, completion_only=completion_only, fused_lm_head=fused_lm_head, vocab_chunk=16,
                            ld_alpha=ld_alpha)
    with torch.no_grad():
        got = scorer(collate(pairs))
        tokens = definition_token_logps(model, pairs)
    n = len(pairs)
    want = []
    for i, seq in enumerate(tokens):
        shared = min(len(tokens[i % n]), len(tokens[i % n + n]))
        want.append(sum(seq[:shared], torch.tensor(0.0)) + ld_alpha * sum(seq[shared:], torch.tensor(0.0)))
    torch.testing.assert_close(got.sum, torch.stack(want).float(), atol=1e-5, rtol=0)
    torch.testing.assert_close(got.count, torch.tensor([float(len(t)) for t in tokens]))  # lengths stay whole
    whole = torch.stack([sum(t, torch.tensor(0.0)) for t in tokens]).float()
    torch.testing.assert_close(got.unweighted_sum, whole, atol=1e-5, rtol=0)  # what the NLL terms read
    assert any(len(tokens[i]) != len(tokens[i + n]) for i in range(n))  # some tails to weigh
