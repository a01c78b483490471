"""Log-probabilities of response tokens under a causal LM.

A DPO loss needs, for every sequence, log pi(response | prompt) = sum over response tokens t of
log softmax(logits[t-1])[token t]. Only response tokens are scored: `labels` holds the token id on
response positions and -100 on prompt and padding (the `collate_pairs` layout, unshifted).

The fast path (`completion_only=True`) runs the transformer body once, keeps the hidden states of the
positions that predict a scored token, and applies the LM head to those rows only, `chunk_size` rows
at a time, computing log p = logit[target] - logsumexp(logits) in fp32. No [batch, time, vocab]
tensor is ever built: prompt and padding positions never reach the LM head. This assumes
logits = lm_head(last_hidden_state), true for Phi, Llama, Mistral, Qwen, GPT-2 and most causal LMs, or
lm_head(last_hidden_state) times a constant of the config (LOGIT_SCALES: Granite, Cohere, ...), then
soft-capped, cap * tanh(logits / cap), where the config sets `final_logit_softcapping` (Gemma-2), applied here as
transformers applies them. This is checked on a few tokens once per model (response_only_exact): a model whose
logits are anything else is scored as `completion_only=False` scores every model, from `model(...).logits`, with a
warning.

With `fused_lm_head=True` (default) the LM head and its log-softmax run as one autograd function
(dpo.lm_head.lm_head_logps) over cache-sized tiles, with a hand-written backward; with False, each
`chunk_size` rows go through `lm_head` and an fp32 log-softmax under ordinary autograd. Both compute the
same numbers (to fp32 rounding). The fused head scales its input rows and bias by a logit scale; it cannot
soft-cap its tiles, and reads the output layer's weight and bias only: a soft-capped model, or one with a LoRA adapter on its LM head, always takes the unfused path.

Batches come in two layouts, told apart by their keys: the padded one of `collate_pairs` (input_ids,
attention_mask, labels) and the packed ones of dpo.packing (one row of real tokens, `score_*` tensors
naming the scored positions). Either way the result has 2B rows, chosen sequences first.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from transformers import PretrainedConfig

from dpo.data import IGNORE_INDEX, TokenizedPair
from dpo.modeling import decoder_body
from dpo.lm_head import DEFAULT_VOCAB_CHUNK, lm_head_logps, workspace_numel, workspace_pool
from dpo.packing import is_packed, num_sequences, packed_hidden_states, packed_logits
from dpo.settings import check_settings, positive, setting


@dataclass
class SequenceLogps:
    """Per-sequence log-prob statistics, all fp32 tensors of shape [num_sequences]."""

    sum: Tensor  # sum of log p over scored tokens (LD-DPO: those beyond the pair's shorter response times ld_alpha)
    count: Tensor  # number of scored tokens
    wpo: Tensor | None = None  # mean over scored tokens of log p_t - logsumexp_v(2 log p_v) (WPO eq. 2), no grad
    # with_stats, each a sum over scored tokens without gradient: the token's mean logit over the vocabulary, its
    # entropy, and 1 where the token is the one with the largest logit (TRL's logits/*, entropy, mean_token_accuracy)
    logits: Tensor | None = None
    entropy: Tensor | None = None
    top1: Tensor | None = None
    unweighted_sum: Tensor | None = None  # LD-DPO: the sum over scored tokens with every token weighted 1 (the NLL's)

    @property
    def mean(self) -> Tensor:
        """The mean log-prob over scored tokens (0 for a sequence with none)."""
        return self.sum / self.count.clamp(min=1)


LOADED_DROPOUT = "_dropout_as_loaded"  # on a model disable_dropout switched off: [(config, {name: value as loaded})]


def disable_dropout(model: nn.Module) -> None:
    """Set every dropout probability to 0, so policy and reference see the same deterministic function: the
    dropout modules' and every float attribute of a module named for one, which attention applies in train mode
    (Llama's `attention_dropout`, GPT-BigCode's `attn_dropout`, `attn_pdrop`, OPT's `layerdrop`, ...), and its
    config's, which some models read at every forward (Falcon's `hidden_dropout`, Persimmon's and GPT-Neo's
    `attention_dropout`). The configs' values as loaded are kept: `dropout_as_loaded` puts them back while the model
    is saved, so that a saved config.json is the model's own."""
    recorded = vars(model).setdefault(LOADED_DROPOUT, [])
    seen = {id(config) for config, _ in recorded}
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for name, value in vars(module).items():
            if "drop" in name and isinstance(value, float):
                setattr(module, name, 0.0)
        config = vars(module).get("config")
        if isinstance(config, PretrainedConfig) and id(config) not in seen:
            seen.add(id(config))
            loaded = {name: value for name, value in vars(config).items()
                      if "drop" in name and isinstance(value, float) and value != 0.0}
            for name in loaded:
                setattr(config, name, 0.0)
            if loaded:
                recorded.append((config, loaded))


@contextlib.contextmanager
def dropout_as_loaded(model: nn.Module) -> Iterator[None]:
    """Within the block, the dropout probabilities of `model`'s configs are as loaded (disable_dropout zeroed them),
    for save_pretrained to write; 0 again after it."""
    recorded = [entry for module in model.modules() for entry in vars(module).get(LOADED_DROPOUT, ())]
    for config, loaded in recorded:
        for name, value in loaded.items():
            setattr(config, name, value)
    try:
        yield
    finally:
        for config, loaded in recorded:
            for name in loaded:
                setattr(config, name, 0.0)


class _TokenValues(NamedTuple):
    """Per scored token, fp32: log p (differentiable) and, where asked for, the values without gradient that
    SequenceLogps sums."""

    logp: Tensor
    wpo: Tensor | None = None  # log p_t - logsumexp_v(2 log p_v) (with_wpo)
    logits: Tensor | None = None  # the mean logit over the vocabulary (with_stats, as the next two)
    entropy: Tensor | None = None  # -sum_v p_v ln p_v
    top1: Tensor | None = None  # 1.0 where the target's logit is the largest (ties count), else 0


def _token_logps(logits: Tensor, targets: Tensor, with_wpo: bool, with_stats: bool = False) -> _TokenValues:
    """log p of `targets` under `logits` [n, vocab], in fp32; optionally WPO's values and the token statistics."""
    logits = logits.float()
    log_normalizer = torch.logsumexp(logits, dim=-1)
    target_logits = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    logps = target_logits - log_normalizer
    adjusted, stats = None, {}
    with torch.no_grad():
        if with_wpo:
            # log sum_v p_v^2 = logsumexp(2 * log p) over the vocabulary
            log_sum_sq = torch.logsumexp(2.0 * (logits - log_normalizer.unsqueeze(-1)), dim=-1)
            adjusted = logps.detach() - log_sum_sq
        if with_stats:
            # H = lse - sum_v p_v z_v, with one [n, vocab] temporary (nansum: p z = 0 for a logit of -inf)
            weighted = (logits - log_normalizer.unsqueeze(-1)).exp_().mul_(logits).nansum(-1)
            stats = {"logits": logits.mean(-1), "entropy": log_normalizer - weighted,
                     "top1": (target_logits >= logits.amax(-1)).float()}
    return _TokenValues(logps, adjusted, **stats)


def _mean_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Each row's mean logit over the vocabulary, mean_v (W h + b)_v = h . mean_v W_v + mean_v b_v, in fp32
    without forming the logits (no grad)."""
    with torch.no_grad():
        means = hidden.float() @ weight.mean(0, dtype=torch.float32)
        return means if bias is None else means + bias.mean(dtype=torch.float32)


def _scored_positions(labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(row, position, target) of every scored token; position t predicts labels[:, t + 1]."""
    targets = labels[:, 1:]
    rows, positions = (targets != IGNORE_INDEX).nonzero(as_tuple=True)
    return rows, positions, targets[rows, positions]


def _reduce(num_rows: int, rows: Tensor, values: _TokenValues, ld_alpha: float | None = None) -> SequenceLogps:
    def per_row(token_values: Tensor | None) -> Tensor | None:
        if token_values is None:
            return None
        return torch.zeros(num_rows, dtype=torch.float32, device=values.logp.device).index_add(0, rows,
                                                                                               token_values.float())

    count = per_row(torch.ones_like(values.logp))
    wpo = None if values.wpo is None else per_row(values.wpo) / count.clamp(min=1)
    if ld_alpha is None:
        total, unweighted = per_row(values.logp), None
    else:
        total, unweighted = per_row(values.logp * ld_weights(rows, count, ld_alpha)), per_row(values.logp)
    return SequenceLogps(sum=total, count=count, wpo=wpo, logits=per_row(values.logits),
                         entropy=per_row(values.entropy), top1=per_row(values.top1), unweighted_sum=unweighted)


def ld_weights(rows: Tensor, count: Tensor, ld_alpha: float) -> Tensor:
    """LD-DPO (Liu et al. 2024, "Length Desensitization in Direct Preference Optimization"): each scored token's
    weight in its sequence's log-prob, 1 for the first k tokens of the response, k the length of the pair's shorter
    response, and `ld_alpha` beyond. Sequences are pairs' chosen responses, then their rejected ones (2B rows);
    `rows` names each token's sequence, its tokens in order."""
    pairs = count.shape[0] // 2
    shared = torch.minimum(count[:pairs], count[pairs:]).repeat(2)
    # each token's place in its response: its rank among the tokens of its row, in the order they are listed
    order = torch.argsort(rows, stable=True)
    starts = torch.cumsum(count, 0) - count
    place = torch.empty_like(rows)
    place[order] = torch.arange(len(rows), device=rows.device) - starts.long()[rows[order]]
    weights = torch.ones(len(rows), dtype=torch.float32, device=rows.device)
    return weights.masked_fill_(place >= shared.long()[rows], ld_alpha)


@dataclass(frozen=True)
class ScoringSettings:
    """How log-probs are computed from hidden states (see the module docstring). Every choice computes the same
    numbers (to fp32 rounding), so a resumed run may change them; each field is a flag of train.py."""

    completion_only: bool = setting(True, "run the LM head on response tokens only (exact)", identity=False)
    chunk_size: int = setting(1024, "response tokens per LM-head chunk: the unfused head's, or the fused one's with "
                                    "--recompute-softmax (the fused head that keeps its softmax runs all of a "
                                    "micro-batch's tokens as one block)", flag="logps_chunk_size", check=positive,
                              identity=False)
    fused_lm_head: bool = setting(True, "fused chunked LM-head log-softmax with a hand-written backward (exact)",
                                  identity=False)
    vocab_chunk: int = setting(DEFAULT_VOCAB_CHUNK, "fused LM head: vocabulary entries per tile", check=positive,
                               identity=False)
    recompute_softmax: bool = setting(False, "fused LM head: recompute the logits in backward instead of storing "
                                             "them (less memory)", identity=False)

    def __post_init__(self) -> None:
        check_settings(self)


def _settings(settings: ScoringSettings | None, overrides: dict) -> ScoringSettings:
    return replace(settings or ScoringSettings(), **overrides)


def logit_softcap(model: nn.Module) -> float | None:
    """The cap of a model whose logits are cap * tanh(lm_head(h) / cap) (config.final_logit_softcapping), else None."""
    return getattr(model.config, "final_logit_softcapping", None)


# transformers' causal LMs whose logits are lm_head(h) times a constant of their config (MiniCPM3 divides h before the
# head, which its bias-free head makes the same): model_type -> that constant
_DIVIDED_BY_LOGITS_SCALING = ("granite", "granitemoe", "granitemoeshared", "granitemoehybrid", "granite_swa",
                              "granitemoe_swa", "minicpm3")
LOGIT_SCALES: dict[str, Callable[[Any], float]] = {
    **dict.fromkeys(_DIVIDED_BY_LOGITS_SCALING, lambda config: 1 / config.logits_scaling),
    **dict.fromkeys(("cohere", "cohere2", "cohere2_moe"), lambda config: config.logit_scale),
    "hyperclovax": lambda config: config.logits_scaling,
    "falcon_h1": lambda config: config.lm_head_multiplier,
}


def logit_scale(model: nn.Module) -> float | None:
    """s where the model's logits are lm_head(h) * s before any soft cap (LOGIT_SCALES), else None."""
    scale = LOGIT_SCALES.get(getattr(model.config, "model_type", None))
    value = scale(model.config) if scale is not None else None
    return None if value is None or value == 1 else float(value)


_RESPONSE_ONLY_EXACT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its check's verdict


def response_only_exact(model: nn.Module) -> bool:
    """Whether the response-only path computes the model's own logits: lm_head(last hidden state), scaled
    (LOGIT_SCALES) and soft-capped as transformers does for its architecture. Checked once per model, on 8 tokens
    (the first time: a SequenceScorer checks its model when it is made, before any wrapping); a model that
    post-processes its logits otherwise is scored from model(...).logits, with a warning."""
    exact = _RESPONSE_ONLY_EXACT.get(model)
    if exact is None:
        difference, largest, half = _head_logits_difference(model)
        # the same matmul either way: fp32 rounding passes at 1e-5, half precision's at 1e-2; a transform does not
        exact = difference <= (1e-2 if half else 1e-5) * largest + 1e-6
        if not exact:
            warnings.warn(f"{type(model).__name__} (model_type {getattr(model.config, 'model_type', '?')!r}): its "
                          f"logits are not lm_head(last hidden state) as response-only scoring computes them (they "
                          f"differ by up to {difference:.3g}), so its log-probs come from model(...).logits, every "
                          "position's (slower, more memory)", stacklevel=2)
        _RESPONSE_ONLY_EXACT[model] = exact
    return exact


@torch.no_grad()
def _head_logits_difference(model: nn.Module) -> tuple[float, float, bool]:
    """The largest difference between the model's logits and the response-only path's on 8 tokens, the largest
    logit, and whether they ran in half precision; (0, 0, False) where the model cannot run here (no parameters, or
    on the meta device). Every module's train or eval mode is as it was afterwards."""
    parameter = next(model.parameters(), None)
    if parameter is None or parameter.device.type == "meta":
        return 0.0, 0.0, False
    vocab = model.get_output_embeddings().weight.shape[0]
    ids = (torch.arange(1, 9, device=parameter.device) % vocab).unsqueeze(0)
    # a half-precision base with fp32 trainable layers (LoRA's) runs under its autocast only
    half = [dtype for dtype in (torch.float16, torch.bfloat16) if any(p.dtype == dtype for p in model.parameters())]
    autocast = torch.autocast(parameter.device.type, dtype=half[0]) if half else contextlib.nullcontext()
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with autocast:
            expected = model(input_ids=ids, use_cache=False).logits[0].float()
            hidden = decoder_body(model)(input_ids=ids, use_cache=False).last_hidden_state[0]
            computed = _head_logits(model.get_output_embeddings(), hidden, logit_softcap(model),
                                    logit_scale(model)).float()
    finally:
        for module, training in modes.items():
            module.training = training
    return float((computed - expected).abs().max()), float(expected.abs().max()), bool(half)


def fused_head_applies(model: nn.Module, settings: ScoringSettings) -> bool:
    """Whether the fused LM head computes this model's log-probs: completion_only and fused_lm_head set, logits not
    soft-capped, and an output layer that is its weight and bias (a LoRA adapter on it, peft's lora_A / lora_B,
    adds to that product, so its log-probs take the unfused path through the layer's own forward)."""
    head = model.get_output_embeddings()
    return (settings.completion_only and settings.fused_lm_head and logit_softcap(model) is None
            and not hasattr(head, "lora_A") and response_only_exact(model))


def _head_logits(lm_head: nn.Module, hidden: Tensor, cap: float | None, scale: float | None = None) -> Tensor:
    logits = lm_head(hidden)
    if scale is not None:
        logits = logits * scale
    if cap is None:
        return logits
    # transformers' order and dtype (that of lm_head's output), so the numbers are those of model(...).logits
    return torch.tanh(logits / cap) * cap


def _scored_logps(model: nn.Module, scored_hidden: Tensor, targets: Tensor, settings: ScoringSettings,
                  with_wpo: bool, with_stats: bool = False) -> _TokenValues:
    """log p of each target from the hidden state [n, d] that predicts it, through the model's LM head, with what
    _token_logps adds."""
    lm_head = model.get_output_embeddings()
    cap, scale = logit_softcap(model), logit_scale(model)
    if fused_head_applies(model, settings):
        # keeping the softmax, the head holds all rows' tiles anyway: one block of rows is then the fastest
        # (dW is made in one pass); chunk_size bounds the recomputing head's scratch
        row_chunk = settings.chunk_size if settings.recompute_softmax else max(settings.chunk_size, len(targets))
        hidden, bias = scored_hidden, lm_head.bias
        if scale is not None:  # s (W h + b) = W (s h) + s b
            hidden, bias = scored_hidden * scale, None if bias is None else bias * scale
        head = lm_head_logps(hidden, lm_head.weight, bias, targets, row_chunk=row_chunk,
                             vocab_chunk=settings.vocab_chunk, with_wpo=with_wpo,
                             store=not settings.recompute_softmax, with_stats=with_stats)
        mean_logits = _mean_logits(hidden, lm_head.weight, bias) if with_stats else None
        return _TokenValues(head.logp, head.wpo, mean_logits, head.entropy, head.top1)
    chunks = [_token_logps(_head_logits(lm_head, scored_hidden[start:start + settings.chunk_size], cap, scale),
                           targets[start:start + settings.chunk_size], with_wpo, with_stats)
              for start in range(0, scored_hidden.shape[0], settings.chunk_size)]
    if not chunks:  # no scored token: one empty chunk through the head, so that every asked-for field is an empty
        # tensor and the sums still reach the model's graph (zero gradients, as the fused head gives)
        chunks = [_token_logps(_head_logits(lm_head, scored_hidden, cap, scale), targets, with_wpo, with_stats)]
    return _TokenValues(*(None if field[0] is None else torch.cat(field) for field in zip(*chunks)))


def causal_attention_mask(attention_mask: Tensor) -> Tensor | None:
    """None where `attention_mask` only pads rows on the right: causal attention then gives every real token what
    the mask gives it (a row's padding comes after all its tokens), and the model's SDPA attention takes its
    mask-free causal case, which can run the flash kernel on CUDA. Any other mask is returned as it is."""
    right_padded = bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())
    return None if right_padded else attention_mask


def sequence_logps(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, labels: Tensor,
                   settings: ScoringSettings | None = None, *, with_wpo: bool = False, with_stats: bool = False,
                   ld_alpha: float | None = None, **overrides) -> SequenceLogps:
    """Summed response log-probs of each row of a right-padded batch (see the module docstring); keyword
    arguments override fields of `settings` (e.g. completion_only=False). `with_wpo`, `with_stats`: also the
    SequenceLogps fields they name; `ld_alpha`: LD-DPO's sums (ld_weights; the rows are pairs' chosen, then rejected
    responses)."""
    settings = _settings(settings, overrides)
    rows, positions, targets = _scored_positions(labels)
    num_rows = input_ids.shape[0]
    attention_mask = causal_attention_mask(attention_mask)
    if not settings.completion_only or not response_only_exact(model):
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        return _reduce(num_rows, rows, _token_logps(logits[rows, positions], targets, with_wpo, with_stats), ld_alpha)
    hidden = decoder_body(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    return _reduce(num_rows, rows, _scored_logps(model, hidden[rows, positions], targets, settings, with_wpo,
                                                with_stats), ld_alpha)


def packed_sequence_logps(model: nn.Module, batch: dict[str, Tensor], settings: ScoringSettings,
                          with_wpo: bool = False, with_stats: bool = False,
                          ld_alpha: float | None = None) -> SequenceLogps:
    """Summed response log-probs of each sequence of a packed batch (dpo.packing layouts)."""
    index, targets, rows = batch["score_index"], batch["score_target"], batch["score_row"]
    if not settings.completion_only or not response_only_exact(model):
        scored = _token_logps(packed_logits(model, batch)[index], targets, with_wpo, with_stats)
    else:
        scored = _scored_logps(model, packed_hidden_states(model, batch)[index], targets, settings, with_wpo,
                               with_stats)
    return _reduce(num_sequences(batch), rows, scored, ld_alpha)


class SequenceScorer(nn.Module):
    """Wraps a causal LM so that `forward(batch)` returns per-sequence log-prob statistics.

    `batch` is what the run's collator produced: `collate_pairs` (input_ids, attention_mask, labels for 2B
    rows, chosen rows first) or a packed layout of dpo.packing. Going through one module's forward lets DDP
    and FSDP wrap the whole scoring computation (the transformer body and the LM head on scored rows) as
    they expect. Keyword arguments override fields of `settings`; `with_wpo` also computes WPO's log-probs,
    `with_stats` the token statistics the trainer logs (the policy's; a reference needs none); `ld_alpha`
    LD-DPO's log-probs (ld_weights).
    """

    def __init__(self, model: nn.Module, settings: ScoringSettings | None = None, *, with_wpo: bool = False,
                 with_stats: bool = False, ld_alpha: float | None = None, **overrides):
        super().__init__()
        self.model = model
        self.settings = _settings(settings, overrides)
        if self.settings.completion_only:
            response_only_exact(model)  # checked now, before DDP or FSDP wraps the model
        self.with_wpo, self.with_stats, self.ld_alpha = with_wpo, with_stats, ld_alpha

    def reserve_workspace(self, pairs: Sequence[TokenizedPair], micro_batch_size: int,
                          max_tokens: int | None = None) -> int:
        """Reserve the fused LM head's softmax workspace for the largest micro-batch `pairs` can form (the
        `micro_batch_size` pairs with the most response tokens; under a token budget `max_tokens`, no more
        than the budget or the longest pair, since a micro-batch's layout holds all its scored tokens), so that
        the first steps do not pay for mapping ever larger buffers. Returns the rows reserved (0 when the head
        keeps no workspace)."""
        s = self.settings
        fused = fused_head_applies(self.model, s)
        head = self.model.get_output_embeddings()
        frozen = not any(p.requires_grad for p in head.parameters())  # fp32: the fused head then keeps no tiles
        if not fused or s.recompute_softmax or frozen or not pairs:
            return 0
        scored = sorted((len(p.chosen_ids) + len(p.rejected_ids) for p in pairs), reverse=True)
        rows = sum(scored[:micro_batch_size])
        if max_tokens is not None:
            rows = min(rows, max(max_tokens, scored[0]))
        weight = self.model.get_output_embeddings().weight
        workspace_pool.reserve(workspace_numel(rows, weight.shape[0], s.vocab_chunk), weight.device)
        return rows

    def forward(self, batch: dict[str, Tensor]) -> SequenceLogps:
        """The log-prob statistics of every sequence of `batch` (padded or packed)."""
        if is_packed(batch):
            return packed_sequence_logps(self.model, batch, self.settings, self.with_wpo, self.with_stats, self.ld_alpha)
        return sequence_logps(self.model, batch["input_ids"], batch["attention_mask"], batch["labels"],
                              self.settings, with_wpo=self.with_wpo, with_stats=self.with_stats,
                              ld_alpha=self.ld_alpha)
