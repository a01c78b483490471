import pytest
import torch

from dpo.data import collate_pairs
from dpo.logprobs import SequenceScorer, disable_dropout, sequence_logps
from harness import random_pairs, tiny_phi


def loop_logps(model, pairs):
    """One sequence at a time, no padding, full log-softmax: the definition."""
    sums, counts = [], []
    for responses in ([p.chosen_ids for p in pairs], [p.rejected_ids for p in pairs]):
        for pair, response in zip(pairs, responses):
            ids = torch.tensor([pair.prompt_ids + response])
            logp = model(input_ids=ids).logits.float().log_softmax(-1)[0]
            start = len(pair.prompt_ids)
            total = sum(logp[start + j - 1, tok] for j, tok in enumerate(response))
            sums.append(total)
            counts.append(len(response))
    return torch.stack(sums), torch.tensor(counts, dtype=torch.float32)


@pytest.mark.parametrize("completion_only", [True, False])
@pytest.mark.parametrize("chunk_size", [3, 1024])
def test_batched_masked_logps_equal_per_example_loop(completion_only, chunk_size):
    model = tiny_phi().eval()
    pairs = random_pairs(5, 97)
    batch = collate_pairs(pairs, pad_id=0)
    with torch.no_grad():
        got = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"],
                             completion_only=completion_only, chunk_size=chunk_size)
        want_sum, want_count = loop_logps(model, pairs)
    torch.testing.assert_close(got.sum, want_sum, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.count, want_count)
    torch.testing.assert_close(got.mean, want_sum / want_count, atol=1e-5, rtol=0)
    assert got.sum.dtype == torch.float32


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
