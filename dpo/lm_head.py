"""Log-probs of target tokens through the LM head, fused and tiled: no [tokens, vocab] tensor is kept.

For hidden states h [n, d], LM-head weight W [V, d], bias b [V] and targets t [n]:

    z_i     = W h_i + b                           logits of row i, [V]
    lse_i   = log sum_v exp z_iv                  (online over vocabulary tiles: running max m, running sum s)
    logp_i  = z_{i, t_i} - lse_i

Backward, for an upstream gradient g [n] (one number per row: d loss / d logp_i):

    G_i = g_i (onehot(t_i) - softmax(z_i))        [V]
    dh = G W,   dW = G^T h,   db = sum_i G_i

The work is cut into tiles of `row_chunk` rows x `vocab_chunk` vocabulary entries, small enough to stay in
cache, so every elementwise pass (max, exp, sum, the softmax gradient) runs on cached data and the only
full passes over memory are the three matmuls. The backward needs softmax(z) again; two ways to have it:

    recompute (store=False)  redo z = W h + b tile by tile in backward: 8 n d V flops in all instead of 6,
                             memory O(n + V) beyond the inputs
    store     (store=True)   keep exp(z - m) of every tile from the forward (n V floats): 6 n d V flops, one
                             extra write and read of n V floats; the backward only rescales it

Optionally (`with_wpo`) the forward also returns log p_t - log sum_v p_v^2 (WPO eq. 2; no gradient), from
a second running sum s2 = sum_v exp(2 (z_v - m)).

Under autocast the matmuls run in the autocast dtype, exactly as `F.linear` would run them, and everything
else (log-sum-exp, softmax gradient, accumulation) in fp32, as `logits.float()` after `lm_head(h)` would.
"""

from __future__ import annotations

import torch
from torch import Tensor

DEFAULT_VOCAB_CHUNK = 2048


def _compute_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return dtype


def _target_buckets(targets: Tensor, vocab_size: int, vocab_chunk: int) -> list[tuple[Tensor, Tensor] | None]:
    """For every vocabulary tile: (rows whose target lies in it, the target's column inside the tile)."""
    num_tiles = -(-vocab_size // vocab_chunk)
    tile_of = torch.div(targets, vocab_chunk, rounding_mode="floor")
    order = torch.argsort(tile_of, stable=True)
    counts = torch.bincount(tile_of, minlength=num_tiles).tolist()
    buckets: list[tuple[Tensor, Tensor] | None] = []
    for tile, rows in enumerate(order.split(counts)):
        buckets.append((rows, targets[rows] - tile * vocab_chunk) if rows.numel() else None)
    return buckets


def _logits_tile(h: Tensor, w: Tensor, b: Tensor | None, out: Tensor | None = None) -> Tensor:
    """z = h w^T + b computed in the operands' dtype, returned as fp32 (written into `out` when given)."""
    if out is not None and h.dtype == torch.float32:
        return torch.mm(h, w.t(), out=out) if b is None else torch.addmm(b, h, w.t(), out=out)
    z = torch.mm(h, w.t()) if b is None else torch.addmm(b, h, w.t())
    return z.float() if out is None else out.copy_(z)


def _forward_rows(h: Tensor, w: Tensor, b: Tensor | None, targets: Tensor, vocab_chunk: int, with_wpo: bool,
                  stored: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """(logp, lse, log sum_v p_v^2 or None, per-tile running max or None) of one block of rows.

    `stored`, when given, is a [num_tiles, rows, vocab_chunk] buffer that receives exp(z - m_tile) per tile."""
    n, vocab = h.shape[0], w.shape[0]
    running_max = torch.full((n,), float("-inf"), device=h.device)
    running_sum = torch.zeros(n, device=h.device)
    running_sq = torch.zeros(n, device=h.device) if with_wpo else None
    target_logit = torch.empty(n, device=h.device)
    tile_max = torch.empty(stored.shape[0], n, device=h.device) if stored is not None else None
    for tile, bucket in enumerate(_target_buckets(targets, vocab, vocab_chunk)):
        start = tile * vocab_chunk
        end = min(start + vocab_chunk, vocab)
        out = stored[tile, :, : end - start] if stored is not None else None
        z = _logits_tile(h, w[start:end], None if b is None else b[start:end], out)
        if bucket is not None:
            rows, cols = bucket
            target_logit[rows] = z[rows, cols]
        new_max = torch.maximum(running_max, z.amax(dim=1))
        rescale = torch.exp(running_max - new_max)
        z.sub_(new_max.unsqueeze(1)).exp_()  # z now holds exp(z - m)
        running_sum.mul_(rescale).add_(z.sum(dim=1))
        if running_sq is not None:
            running_sq.mul_(rescale.square()).add_(z.square().sum(dim=1))
        running_max = new_max
        if tile_max is not None:
            tile_max[tile] = new_max
    lse = running_max + running_sum.log()
    log_sum_sq = None
    if running_sq is not None:
        log_sum_sq = 2.0 * running_max + running_sq.log() - 2.0 * lse  # log sum_v p_v^2
    return target_logit - lse, lse, log_sum_sq, tile_max


def _row_blocks(n: int, row_chunk: int) -> list[tuple[int, int]]:
    return [(start, min(start + row_chunk, n)) for start in range(0, n, row_chunk)]


def _forward(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, row_chunk: int,
             vocab_chunk: int, with_wpo: bool, store: bool):
    cdtype = _compute_dtype(hidden.device, hidden.dtype)
    h, w = hidden.to(cdtype), weight.to(cdtype)
    b = None if bias is None else bias.to(cdtype)
    num_tiles = -(-weight.shape[0] // vocab_chunk)
    logps, lses, sqs, stored_tiles = [], [], [], []
    with torch.autocast(hidden.device.type, enabled=False):
        for start, end in _row_blocks(h.shape[0], row_chunk):
            stored = None
            if store:
                stored = torch.empty(num_tiles, end - start, vocab_chunk, device=h.device)
            logp, lse, sq, tile_max = _forward_rows(h[start:end], w, b, targets[start:end], vocab_chunk,
                                                    with_wpo, stored)
            logps.append(logp)
            lses.append(lse)
            sqs.append(sq)
            stored_tiles.append((stored, tile_max))
    logp = torch.cat(logps) if logps else hidden.new_zeros(0, dtype=torch.float32)
    lse = torch.cat(lses) if lses else hidden.new_zeros(0, dtype=torch.float32)
    adjusted = None
    if with_wpo:
        adjusted = logp - (torch.cat(sqs) if sqs else logp.new_zeros(0))
    return logp, lse, adjusted, stored_tiles


class _FusedLMHeadLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, row_chunk: int,
                vocab_chunk: int, with_wpo: bool, store: bool):
        logp, lse, adjusted, stored_tiles = _forward(hidden, weight, bias, targets, row_chunk, vocab_chunk,
                                                     with_wpo, store)
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.stored_tiles = stored_tiles
        ctx.cdtype = _compute_dtype(hidden.device, hidden.dtype)
        ctx.row_chunk, ctx.vocab_chunk, ctx.store = row_chunk, vocab_chunk, store
        if adjusted is not None:
            ctx.mark_non_differentiable(adjusted)
        return logp, adjusted

    @staticmethod
    def backward(ctx, grad_logp: Tensor, grad_adjusted: Tensor | None):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        cdtype, vocab_chunk = ctx.cdtype, ctx.vocab_chunk
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        h, w = hidden.to(cdtype), weight.to(cdtype)
        b = None if bias is None else bias.to(cdtype)
        vocab = weight.shape[0]
        blocks = _row_blocks(h.shape[0], ctx.row_chunk)
        # the first row block writes every tile of dW and db, later blocks add to them
        fresh = torch.empty if blocks else torch.zeros
        grad_h = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_h else None
        grad_w = fresh(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = fresh(vocab, dtype=torch.float32, device=weight.device) if need_b and bias is not None else None
        g = grad_logp.float()
        with torch.autocast(hidden.device.type, enabled=False):
            for block, ((start, end), (stored, tile_max)) in enumerate(zip(blocks, ctx.stored_tiles)):
                h_rows, g_rows, lse_rows = h[start:end], g[start:end], lse[start:end]
                for tile, bucket in enumerate(_target_buckets(targets[start:end], vocab, vocab_chunk)):
                    v0 = tile * vocab_chunk
                    v1 = min(v0 + vocab_chunk, vocab)
                    if stored is not None:
                        # stored tile = exp(z - m_tile): softmax = tile * exp(m_tile - lse)
                        grad_z = stored[tile, :, : v1 - v0]
                        grad_z.mul_((torch.exp(tile_max[tile] - lse_rows) * -g_rows).unsqueeze(1))
                    else:
                        grad_z = _logits_tile(h_rows, w[v0:v1], None if b is None else b[v0:v1])
                        grad_z.sub_(lse_rows.unsqueeze(1)).exp_().mul_(-g_rows.unsqueeze(1))
                    if bucket is not None:
                        rows, cols = bucket
                        grad_z[rows, cols] += g_rows[rows]
                    _accumulate_tile(grad_z.to(cdtype), h_rows, w[v0:v1], grad_h[start:end] if need_h else None,
                                     grad_w[v0:v1] if grad_w is not None else None,
                                     grad_b[v0:v1] if grad_b is not None else None, first=block == 0)
        ctx.stored_tiles = None
        return (None if grad_h is None else grad_h.to(hidden.dtype),
                None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None, None, None)


def _accumulate_tile(grad_z: Tensor, h: Tensor, w: Tensor, grad_h: Tensor | None, grad_w: Tensor | None,
                     grad_b: Tensor | None, first: bool) -> None:
    """dh += G w, dW (=, or += after the first row block) G^T h, db (= or +=) sum_rows G; fp32 results."""
    if grad_z.dtype == torch.float32:  # in place, no temporaries
        if grad_h is not None:
            grad_h.addmm_(grad_z, w)
        if grad_w is not None:
            torch.mm(grad_z.t(), h, out=grad_w) if first else grad_w.addmm_(grad_z.t(), h)
        if grad_b is not None:
            torch.sum(grad_z, dim=0, out=grad_b) if first else grad_b.add_(grad_z.sum(dim=0))
        return
    if grad_h is not None:
        grad_h += torch.mm(grad_z, w).float()
    if grad_w is not None:
        tile_w = torch.mm(grad_z.t(), h).float()
        grad_w.copy_(tile_w) if first else grad_w.add_(tile_w)
    if grad_b is not None:
        tile_b = grad_z.sum(dim=0).float()
        grad_b.copy_(tile_b) if first else grad_b.add_(tile_b)


def lm_head_logps(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, *, row_chunk: int = 4096,
                  vocab_chunk: int = DEFAULT_VOCAB_CHUNK, with_wpo: bool = False,
                  store: bool = True) -> tuple[Tensor, Tensor | None]:
    """(log p(targets | hidden) [n] fp32, WPO-adjusted values [n] or None), differentiable in hidden, weight
    and bias. See the module docstring for the formulas and for `store`."""
    if hidden.ndim != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(f"lm_head_logps wants hidden [n, d] and targets [n], got {tuple(hidden.shape)} and "
                         f"{tuple(targets.shape)}")
    if row_chunk < 1 or vocab_chunk < 1:
        raise ValueError(f"row_chunk ({row_chunk}) and vocab_chunk ({vocab_chunk}) must be >= 1")
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias))
    if not needs_grad:
        logp, _, adjusted, _ = _forward(hidden, weight, bias, targets, row_chunk, vocab_chunk, with_wpo, False)
        return logp, adjusted
    return _FusedLMHeadLogps.apply(hidden, weight, bias, targets, row_chunk, vocab_chunk, with_wpo, store)
