from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM, GPTBigCodeConfig

from dpo.data import collate_pairs
from dpo.logprobs import SequenceScorer, disable_dropout, sequence_logps
from harness import random_pairs, tiny_phi


def loop_logps(model, pairs, with_stats=False):
    """One sequence at a time, no padding, full log-softmax: the definition. With `with_stats`, also each
    sequence's sums over its response tokens of the mean logit over the vocabulary (TRL's logits/chosen), of the
    entropy -sum_v p_v log p_v, and of 1 where the token's logit is the largest."""
    sums, counts, stats = [], [], []
    for responses in ([p.chosen_ids for p in pairs], [p.rejected_ids for p in pairs]):
        for pair, response in zip(pairs, responses):
            ids = torch.tensor([pair.prompt_ids + response])
            logits = model(input_ids=ids).logits.double()[0]
            logp = logits.log_softmax(-1)
            start = len(pair.prompt_ids)
            rows = [start + j - 1 for j in range(len(response))]
            sums.append(sum(logp[row, tok] for row, tok in zip(rows, response)))
            counts.append(len(response))
            stats.append([sum(logits[row].mean() for row in rows),
                          sum(-(logp[row].exp() * logp[row]).sum() for row in rows),
                          sum(float(logits[row, tok] >= logits[row].max()) for row, tok in zip(rows, response))])
    result = torch.stack(sums).float(), torch.tensor(counts, dtype=torch.float32)
    return (*result, *torch.tensor(stats, dtype=torch.float32).T) if with_stats else result


def force_top_tokens(pairs, model):
    """The pairs with every third response token replaced by the model's top token there (random tokens are
    almost never the top one, so the accuracy would test only zeros)."""
    forced = []
    with torch.no_grad():
        for pair in pairs:
            chosen = list(pair.chosen_ids)
            for j in range(0, len(chosen), 3):
                ids = torch.tensor([pair.prompt_ids + chosen[:j]])
                chosen[j] = int(model(input_ids=ids).logits[0, -1].argmax())
            forced.append(replace(pair, chosen_ids=chosen))
    return forced


@pytest.mark.parametrize("completion_only,fused_lm_head", [(True, True), (True, False), (False, False)])
@pytest.mark.parametrize("chunk_size", [3, 1024])
def test_batched_masked_logps_equal_per_example_loop(completion_only, fused_lm_head, chunk_size):
    model = tiny_phi().eval()
    assert model.get_output_embeddings().bias is not None  # the mean logit's bias term is exercised
    pairs = force_top_tokens(random_pairs(5, 97), model)
    batch = collate_pairs(pairs, pad_id=0)
    with torch.no_grad():
        got = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"], with_stats=True,
                             completion_only=completion_only, chunk_size=chunk_size, fused_lm_head=fused_lm_head)
        want_sum, want_count, want_logits, want_entropy, want_top1 = loop_logps(model, pairs, with_stats=True)
    torch.testing.assert_close(got.sum, want_sum, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.count, want_count)
    torch.testing.assert_close(got.mean, want_sum / want_count, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.logits, want_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.entropy, want_entropy, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.top1, want_top1, atol=0, rtol=0)
    assert want_logits.abs().min() > 1e-3  # not trivially zero
    assert 0 < want_top1[:5].sum() and (want_top1[:5] < want_count[:5]).all()  # some chosen tokens on top, not all
    assert got.sum.dtype == got.logits.dtype == got.entropy.dtype == got.top1.dtype == torch.float32
    plain = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    assert plain.logits is None and plain.entropy is None and plain.top1 is None  # only asked for


def test_padding_and_prompt_positions_get_zero_gradient():
    model = tiny_phi().eval()
    pairs = random_pairs(4, 97, seed=1)
    batch = collate_pairs(pairs, pad_id=0)
    captured = {}

    def keep_embeddings(module, args, output):
        output.retain_grad()
        captured["embeddings"] = output

    handle = model.model.embed_tokens.register_forward_hook(keep_embeddings)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    handle.remove()
    logits.retain_grad()
    labels = batch["labels"]
    targets = labels[:, 1:]
    mask = targets != -100
    logp = logits[:, :-1].log_softmax(-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    (logp * mask).sum().backward()
    # the logits of a position whose next token is not scored never reach the loss
    scored_next = torch.zeros_like(labels, dtype=torch.bool)
    scored_next[:, :-1] = mask
    assert torch.all(logits.grad[~scored_next] == 0)
    assert torch.any(logits.grad[scored_next] != 0)
    # padding (right of every sequence) cannot influence earlier tokens under the causal mask
    padding = batch["attention_mask"] == 0
    assert padding.any()
    assert torch.all(captured["embeddings"].grad[padding] == 0)

    # and the completion-only path gives the same parameter gradients as the full-logits path
    model.zero_grad()
    full = sequence_logps(model, batch["input_ids"], batch["attention_mask"], labels, completion_only=False)
    full.sum.sum().backward()
    full_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    fast = sequence_logps(model, batch["input_ids"], batch["attention_mask"], labels, completion_only=True, chunk_size=4)
    fast.sum.sum().backward()
    for a, b in zip(full_grads, [p.grad for p in model.parameters()]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_wpo_adjusted_logps_match_brute_force():
    model = tiny_phi().eval()
    pairs = random_pairs(3, 97, seed=2)
    batch = collate_pairs(pairs, pad_id=0)
    with torch.no_grad():
        got = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"], with_wpo=True,
                             chunk_size=5)
    sequences = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
    for i, (prompt, response) in enumerate(sequences):
        probs = model(input_ids=torch.tensor([prompt + response])).logits[0].double().softmax(-1)
        values = []
        for j, token in enumerate(response):
            p = probs[len(prompt) + j - 1]
            values.append(torch.log(p[token]) - torch.log((p * p).sum()))
        assert got.wpo[i].item() == pytest.approx(torch.stack(values).mean().item(), abs=1e-5)


@pytest.mark.parametrize("fused_lm_head", [True, False])
def test_a_micro_batch_that_scores_nothing_trains_with_zero_gradients(fused_lm_head):
    """Every response masked (a masking bug the nothing_scored health alert reports): the sums are 0 and reach the
    model's graph, so backward gives zero gradients on either head (the unfused one serves Gemma-2, soft-capped
    models and a LoRA adapter on the LM head)."""
    model = tiny_phi()
    batch = collate_pairs(random_pairs(2, 97, seed=5), pad_id=0)
    batch["labels"].fill_(-100)
    logps = SequenceScorer(model, fused_lm_head=fused_lm_head)(batch)
    assert logps.sum.tolist() == [0.0] * 4 and logps.count.tolist() == [0] * 4
    logps.sum.sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is None or not g.any() for g in grads)
    assert model.get_output_embeddings().weight.grad is not None


def test_scorer_module_matches_function_and_dropout_is_disabled():
    model = tiny_phi(dropout=0.5)
    disable_dropout(model)
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    model.train()  # train mode, yet deterministic: dropout is off
    pairs = random_pairs(3, 97, seed=3)
    batch = collate_pairs(pairs, pad_id=0)
    scorer = SequenceScorer(model, chunk_size=2)
    a = scorer(batch).sum
    b = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"]).sum
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_dropout_kept_as_a_float_attribute_is_disabled_too():
    """GPT-BigCode (StarCoder) keeps attention's dropout probability as a float, `attn_dropout` (0.1), that attention
    applies in train mode, not as an nn.Dropout: the policy would not start from its reference."""
    torch.manual_seed(0)
    config = GPTBigCodeConfig(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                              embd_pdrop=0.0)  # the nn.Dropout ones off: what is left is attention's
    model = AutoModelForCausalLM.from_config(config).train()
    ids = torch.randint(1, 97, (2, 16))
    assert not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)  # dropout is on at first
    disable_dropout(model)
    torch.testing.assert_close(model(input_ids=ids).logits, model(input_ids=ids).logits, atol=0, rtol=0)


def test_fp16_autocast_logps_are_fp32_and_close():
    model = tiny_phi().eval()
    pairs = random_pairs(2, 97, seed=4)
    batch = collate_pairs(pairs, pad_id=0)
    with torch.no_grad():
        exact = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"]).sum
        with torch.autocast("cpu", dtype=torch.float16):
            half = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"]).sum
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, exact, atol=5e-2, rtol=1e-2)
