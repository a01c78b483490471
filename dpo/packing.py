"""Padding-free batch layouts: every token of a micro-batch in one row, no padding anywhere.

`collate_pairs` (dpo.data) pads 2B sequences to the longest one; every linear layer then also computes
the padding. The packed layouts put the real tokens of all sequences side by side in a single row
[1, N] and say where each sequence lies, so linear layers see exactly the N real tokens:

    collate_packed          B pairs -> 2B blocks, one per sequence: [prompt][chosen] ... [prompt][rejected] ...
    collate_shared_prompt   B pairs -> B blocks, one per pair: [prompt][chosen][rejected]; the prompt is
                            computed once for both responses

Attention never crosses a block: `packed_sdpa_attention` runs SDPA block by block (causal inside a
block). In a shared-prompt block the rejected tokens attend to the prompt and to earlier rejected tokens,
never to the chosen ones, and their positions restart where the prompt ends, so every hidden state
equals the one of the unshared sequence [prompt][rejected].

Batch dict (all tensors, so `{k: v.to(device)}` moves it):
    input_ids, position_ids   [1, N] long
    block_lengths             [num_blocks, 3] long: (prefix, first branch, second branch) token counts.
                              An unshared sequence is (its length, 0, 0); a shared pair is (P, C, R).
    score_index               [M] long, the position in the row whose hidden state predicts a scored token
    score_target              [M] long, the scored token
    score_row                 [M] long, the sequence it belongs to: pair i chosen = i, rejected = B + i
    prompt_lengths, response_lengths   [2B] long, as in collate_pairs

`micro_batches` cuts the pairs of one optimizer step into micro-batches, of similar length (so a padded layout
computes little padding) and within a token budget of the layout; the step still sums the loss of the same pairs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F
from torch.nn.attention.bias import causal_lower_right
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from dpo.data import TokenizedPair
from dpo.errors import UserError, first_line
from dpo.modeling import decoder_body
from dpo.precision import EPSILON, LOGP_TOLERANCE, weights_matmul_precision

PACKED_ATTENTION = "sdpa_packed"  # the name under which packed_sdpa_attention is registered in transformers


class PackingError(UserError):
    """A packed batch cannot be run (e.g. the model does not use SDPA attention)."""


# ---------------------------------------------------------------------------------------------------
# Collate

def _packed_dict(tokens: list[int], positions: list[int], blocks: list[tuple[int, int, int]],
                 scores: tuple[list[int], list[int], list[int]], pairs: Sequence[TokenizedPair]) -> dict[str, Tensor]:
    index, target, row = scores
    long = dict(dtype=torch.long)
    return {
        "input_ids": torch.tensor([tokens], **long),
        "position_ids": torch.tensor([positions], **long),
        "block_lengths": torch.tensor(blocks, **long).reshape(-1, 3),
        "score_index": torch.tensor(index, **long),
        "score_target": torch.tensor(target, **long),
        "score_row": torch.tensor(row, **long),
        "prompt_lengths": torch.tensor([len(p.prompt_ids) for p in pairs] * 2, **long),
        "response_lengths": torch.tensor([len(p.chosen_ids) for p in pairs] + [len(p.rejected_ids) for p in pairs],
                                         **long),
    }


def _add_scores(scores: tuple[list[int], list[int], list[int]], response: list[int], first_predictor: int | None,
                start: int, row: int) -> None:
    """Response token j is predicted by the hidden state at start + j - 1, its first token by `first_predictor`
    (the last prompt token; None when the prompt is empty, so the first token has no predictor)."""
    index, target, rows = scores
    for j, token in enumerate(response):
        predictor = first_predictor if j == 0 else start + j - 1
        if predictor is None:
            continue
        index.append(predictor)
        target.append(token)
        rows.append(row)


def collate_packed(pairs: Sequence[TokenizedPair]) -> dict[str, Tensor]:
    """B pairs -> one row of 2B sequences without padding (chosen sequences first, then rejected)."""
    if not pairs:
        raise ValueError("collate_packed needs at least one pair")
    tokens: list[int] = []
    positions: list[int] = []
    blocks: list[tuple[int, int, int]] = []
    scores: tuple[list[int], list[int], list[int]] = ([], [], [])
    sequences = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
    for row, (prompt, response) in enumerate(sequences):
        start = len(tokens)
        tokens += prompt + response
        positions += range(len(prompt) + len(response))
        blocks.append((len(prompt) + len(response), 0, 0))
        response_start = start + len(prompt)
        _add_scores(scores, response, response_start - 1 if prompt else None, response_start, row)
    return _packed_dict(tokens, positions, blocks, scores, pairs)


def collate_shared_prompt(pairs: Sequence[TokenizedPair]) -> dict[str, Tensor]:
    """B pairs -> one row of B blocks [prompt][chosen][rejected]; rejected positions restart after the prompt."""
    if not pairs:
        raise ValueError("collate_shared_prompt needs at least one pair")
    num = len(pairs)
    tokens: list[int] = []
    positions: list[int] = []
    blocks: list[tuple[int, int, int]] = []
    scores: tuple[list[int], list[int], list[int]] = ([], [], [])
    for i, pair in enumerate(pairs):
        prompt, chosen, rejected = pair.prompt_ids, pair.chosen_ids, pair.rejected_ids
        start = len(tokens)
        tokens += prompt + chosen + rejected
        positions += list(range(len(prompt) + len(chosen))) + list(range(len(prompt), len(prompt) + len(rejected)))
        blocks.append((len(prompt), len(chosen), len(rejected)))
        last_prompt = start + len(prompt) - 1 if prompt else None
        _add_scores(scores, chosen, last_prompt, start + len(prompt), i)
        _add_scores(scores, rejected, last_prompt, start + len(prompt) + len(chosen), num + i)
    return _packed_dict(tokens, positions, blocks, scores, pairs)


def is_packed(batch: dict[str, Tensor]) -> bool:
    """Whether `batch` is a packed or shared-prompt layout (it has block lengths)."""
    return "block_lengths" in batch


def num_sequences(batch: dict[str, Tensor]) -> int:
    """The number of sequences `batch` scores (chosen and rejected responses counted apart)."""
    return int(batch["prompt_lengths"].shape[0])


# ---------------------------------------------------------------------------------------------------
# Attention

@dataclass
class PackedBlocks:
    """Where the blocks of a packed row lie."""

    spans: list[tuple[int, int, int, int]]  # (start, prefix, first, second) token counts

    @classmethod
    def from_lengths(cls, block_lengths: Tensor) -> "PackedBlocks":
        """The blocks of a row from its [num_blocks, 3] (prompt, first, second) lengths."""
        spans, start = [], 0
        for prefix, first, second in block_lengths.tolist():
            spans.append((start, prefix, first, second))
            start += prefix + first + second
        return cls(spans)


def _autocast_inputs(*tensors: Tensor) -> tuple[Tensor, ...]:
    """The tensors in the autocast dtype when autocast is on: what SDPA's own autocast does to its inputs, which
    an attention bias's dispatch runs before (it requires one dtype, and Phi's rotary leaves q, k in fp32)."""
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) for t in tensors)


def packed_sdpa_attention(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                          attention_mask: Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          packed_blocks: PackedBlocks | None = None, **kwargs) -> tuple[Tensor, None]:
    """SDPA block by block over a packed row ([1, heads, N, head_dim]); plain SDPA when not packed.

    Block (start, P, C, R): queries of [P][C] attend causally to [P][C]; queries of [R] attend to all of
    [P] and causally to [R] (R = 0: an ordinary causal sequence of P + C tokens). No call passes a mask
    tensor: the first is SDPA's causal case, the second its bottom-right-aligned causal case (R queries over
    P + R keys, query i seeing keys up to P + i), so on CUDA both can run the flash kernel."""
    if packed_blocks is None:
        if attention_mask is not None and attention_mask.numel() == 0:  # _NO_MASK reached attention, its blocks not
            raise PackingError("the model's layers do not pass the packed blocks on to its attention")
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    # one split per tensor, not a slice per block: the backward of a split is one concatenation, that of a
    # slice a zero tensor of the full row per block
    segments = [n for _, prefix, first, second in packed_blocks.spans for n in (prefix + first, second)]
    pieces = [t.split(segments, dim=2) for t in (query, key, value)]
    outputs = []
    for block, (_, prefix, _, second) in enumerate(packed_blocks.spans):
        (q, q2), (k, k2), (v, v2) = (p[2 * block:2 * block + 2] for p in pieces)
        outputs.append(F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, is_causal=True))
        if second:
            keys, values = torch.cat((k[:, :, :prefix], k2), dim=2), torch.cat((v[:, :, :prefix], v2), dim=2)
            q2, keys, values = _autocast_inputs(q2, keys, values)
            outputs.append(F.scaled_dot_product_attention(q2, keys, values, dropout_p=dropout, scale=scaling,
                                                          attn_mask=causal_lower_right(second, prefix + second)))
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


# A 4D mask is passed through by transformers' mask creation untouched: an empty one costs nothing and
# tells it that no [N, N] mask is wanted (the blocks say everything).
_NO_MASK = torch.zeros(1, 1, 0, 0, dtype=torch.bool)


def attention_window(config) -> int | None:
    """The sliding window some of the model's layers attend within (Mistral, Gemma-2/3), or None."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if window is None or (layer_types is not None and "sliding_attention" not in layer_types):
        return None
    return window


def attention_chunk(config) -> int | None:
    """The chunk some of the model's layers attend within (Llama-4's chunked attention: a token sees only the
    earlier tokens of its own chunk of that many positions), or None."""
    chunk = getattr(config, "attention_chunk_size", None)
    layer_types = getattr(config, "layer_types", None)
    if chunk is None or (layer_types is not None and "chunked_attention" not in layer_types):
        return None
    return chunk


def packing_problem(model: torch.nn.Module, longest_sequence: int) -> str | None:
    """Why packed batches of sequences up to `longest_sequence` tokens would not give exactly what the model gives
    each sequence alone, or None: they need SDPA attention over whole sequences (blocks apply no sliding window),
    reached by the blocks (a packed row of two short sequences is run once to see)."""
    return _config_problem(model, longest_sequence) or _forward_problem(model)


def _config_problem(model: torch.nn.Module, longest_sequence: int) -> str | None:
    implementation = model.config._attn_implementation
    if implementation not in ("sdpa", PACKED_ATTENTION):
        return f"packed and shared-prompt batches need SDPA attention, the model uses '{implementation}'"
    if getattr(model.config, "attn_logit_softcapping", None) is not None:
        return "packed and shared-prompt batches run SDPA attention, which cannot soft-cap the model's attention scores"
    window = attention_window(model.config)
    if window is not None and longest_sequence > window:
        return (f"packed and shared-prompt batches attend over whole sequences, but the model attends within a "
                f"sliding window of {window} tokens and sequences reach {longest_sequence}")
    chunk = attention_chunk(model.config)
    if chunk is not None and longest_sequence > chunk:
        return (f"packed and shared-prompt batches attend over whole sequences, but the model attends within chunks "
                f"of {chunk} tokens and sequences reach {longest_sequence}")
    return None


def _forward_problem(model: torch.nn.Module) -> str | None:
    """Why a packed row does not give what the model gives its sequences alone, or None. One row of a shared-prompt
    block ([1 2][3][4 5]) and an unshared sequence ([6 7 8]) is run once and its log-probs compared with those of
    [1 2 3], [1 2 4 5] and [6 7 8] each run alone: a model whose layers do not pass the blocks on to attention
    (StableLM), compute attention their own way (Falcon with ALiBi) or read positions otherwise fails or differs."""
    implementation = model.config._attn_implementation
    device = next(model.parameters()).device
    row = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]], device=device)
    positions = torch.tensor([[0, 1, 2, 2, 3, 0, 1, 2]], device=device)
    blocks = PackedBlocks.from_lengths(torch.tensor([[2, 1, 2], [3, 0, 0]]))
    modes = [m.training for m in model.modules()]
    try:
        # no gradient, dropout off, the RNG as it was (a LoRA dropout draws in train mode): the run trains as without
        with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            model.eval()
            alone = [model(input_ids=row[:, ids], use_cache=False).logits[0].float()
                     for ids in ([0, 1, 2], [0, 1, 3, 4], [5, 6, 7])]
            _register_packed_attention(model)
            packed = model(input_ids=row, position_ids=positions, attention_mask=_NO_MASK.to(device),
                           use_cache=False, packed_blocks=blocks).logits[0].float()
    except torch.OutOfMemoryError:
        raise  # the device's, not the layout's
    except Exception as error:  # whatever the model's own code raises: the layouts cannot run it
        return f"packed and shared-prompt batches fail in the model's forward ({type(error).__name__}: " \
               f"{first_line(error)})"
    finally:
        model.config._attn_implementation = implementation
        for module, mode in zip(model.modules(), modes):
            module.training = mode
    expected = torch.cat([alone[0], alone[1][2:], alone[2]])
    difference = logp_difference(packed, expected, weights_matmul_precision(model))
    if difference is not None:
        return (f"packed and shared-prompt batches do not compute what the model computes for each sequence alone "
                f"(log-probs differ by up to {difference:.3g})")
    return None


# Logits computed in other batch shapes round apart by a few steps of their own precision (bf16's step at a logit of
# 30 is 0.125): ROUNDING_EPSILONS machine epsilons of the largest logit (in bf16, 1.9 at a logit of 30; in fp32, 3e-5)
# are no difference of computation.
ROUNDING_EPSILONS = 8


def logp_difference(packed: Tensor, alone: Tensor, precision: str) -> float | None:
    """The largest difference of the log-probs of logits [n, vocab] of a packed row from those of its sequences
    alone, or None where every one is rounding: within 1e-3 + LOGP_TOLERANCE x |log-prob| (the step-0 check's) +
    ROUNDING_EPSILONS machine epsilons of the largest logit."""
    rounding = ROUNDING_EPSILONS * EPSILON[precision] * float(torch.cat([packed, alone]).abs().max())
    packed, alone = packed.log_softmax(dim=-1), alone.log_softmax(dim=-1)
    difference = (packed - alone).abs()
    if bool((difference <= 1e-3 + rounding + LOGP_TOLERANCE[precision] * alone.abs()).all()):
        return None
    return float(difference.max())


def check_packable(model: torch.nn.Module, longest_sequence: int) -> None:
    """A PackingError (use --layout padded) when `packing_problem` finds one."""
    problem = packing_problem(model, longest_sequence)
    if problem is not None:
        raise PackingError(f"{problem}; use --layout padded")


def enable_packed_attention(model: torch.nn.Module, longest_sequence: int = 0) -> None:
    """Route the model's attention through packed_sdpa_attention (identical to SDPA for unpacked inputs)."""
    if problem := _config_problem(model, longest_sequence):  # at every forward: the forward itself is no check
        raise PackingError(f"{problem}; use --layout padded")
    _register_packed_attention(model)


def _register_packed_attention(model: torch.nn.Module) -> None:
    # registered here, not at import: importing this module changes no global registry
    AttentionInterface.register(PACKED_ATTENTION, packed_sdpa_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_ATTENTION, sdpa_mask)
    model.config._attn_implementation = PACKED_ATTENTION


def _packed_forward(model: torch.nn.Module, batch: dict[str, Tensor]) -> dict:
    blocks = PackedBlocks.from_lengths(batch["block_lengths"])
    enable_packed_attention(model, max((prefix + max(first, second) for _, prefix, first, second in blocks.spans),
                                       default=0))
    return dict(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                attention_mask=_NO_MASK.to(batch["input_ids"].device), use_cache=False, packed_blocks=blocks)


def packed_hidden_states(model: torch.nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Last hidden states [N, d] of a packed batch, from the model's transformer body."""
    return decoder_body(model)(**_packed_forward(model, batch)).last_hidden_state[0]


def packed_logits(model: torch.nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Full logits [N, V] of a packed batch (for models whose logits are not lm_head(hidden))."""
    return model(**_packed_forward(model, batch)).logits[0]


# ---------------------------------------------------------------------------------------------------
# Length grouping

def pair_length(pair: TokenizedPair) -> int:
    """The tokens of a pair's longer sequence: its prompt and longer response."""
    return len(pair.prompt_ids) + max(len(pair.chosen_ids), len(pair.rejected_ids))


def longest_first(ids: Sequence[int], pairs: Sequence[TokenizedPair]) -> list[int]:
    """`ids` ordered by their pairs' length, longest first (ties keep their order)."""
    return sorted(ids, key=lambda i: -pair_length(pairs[i]))


def micro_batches(positions: Sequence[int], pairs: Sequence[TokenizedPair], micro_batch_size: int,
                  by_length: bool, max_tokens: int | None = None, layout: str = "padded") -> list[list[int]]:
    """`positions` (into `pairs`) cut into micro-batches, in order or longest first: of `micro_batch_size` pairs,
    or with `max_tokens`, of as many pairs (up to `micro_batch_size`) as fit that many tokens of `layout`
    (layout_tokens); a pair longer than the budget alone.

    A step's gradient is a sum over the same pairs whatever the cut, so this changes only how much padding a
    padded layout computes, the memory peak, and the floating-point order of the sum."""
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    positions = longest_first(positions, pairs) if by_length else list(positions)
    if max_tokens is None:
        return [positions[i:i + micro_batch_size] for i in range(0, len(positions), micro_batch_size)]
    chunks: list[list[int]] = []
    for i in positions:
        if chunks and len(chunks[-1]) < micro_batch_size and \
                layout_tokens(layout, [pairs[j] for j in chunks[-1]] + [pairs[i]]) <= max_tokens:
            chunks[-1].append(i)
        else:
            chunks.append([i])
    return chunks


def layout_tokens(layout: str, pairs: Sequence[TokenizedPair]) -> int:
    """The token positions a micro-batch of `pairs` computes in `layout`: padded rows (chosen and rejected padded
    to the longest sequence), packed sequences (the prompt twice), shared-prompt blocks (the prompt once)."""
    if layout == "padded":
        return 2 * len(pairs) * max(pair_length(p) for p in pairs)
    prompts = (2 if layout == "packed" else 1) * sum(len(p.prompt_ids) for p in pairs)
    return prompts + sum(len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
