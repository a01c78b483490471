"""Log-probs of target tokens through the LM head, fused and tiled: no [tokens, vocab] tensor is kept.

For hidden states h [n, d], LM-head weight W [V, d], bias b [V] and targets t [n]:

    z_i     = W h_i + b                           logits of row i, [V]
    lse_i   = log sum_v exp z_iv
    logp_i  = z_{i, t_i} - lse_i

Backward, for an upstream gradient g [n] (one number per row: d loss / d logp_i):

    G_i = g_i (onehot(t_i) - softmax(z_i))        [V]
    dh = G W,   dW = G^T h,   db = sum_i G_i

The work is cut into tiles of `row_chunk` rows x `vocab_chunk` vocabulary entries, so that the elementwise
passes run on cache-resident data and the only full passes over memory are the three matmuls. Tiles hold
base-2 logits y = z log2(e) (in fp32 the matmul makes them directly from h log2(e) and b log2(e)), because
exp2 costs about half of exp on CPUs. Every tile of a row is shifted by one number m_i, the maximum of the
row's first tile, folded into the matmul as its starting value (b log2(e) - m):

    s_i     = sum_v 2^(y_iv - m_i)
    logp_i  = ln 2 (y_{i, t_i} - m_i - log2 s_i),      softmax(z_i)_v = 2^(y_iv - m_i) / s_i

If a later tile exceeds m_i by so much that s_i overflows (y - m > 127), the block is redone shifted by its
exact row maxima (one more pass of matmuls), so every term is <= 1 and s_i >= 1. The backward needs the
softmax again; two ways to have it:

    recompute (store=False)  redo the tiles in backward: 8 n d V flops in all instead of 6,
                             memory O(n + V) beyond the inputs
    store     (store=True)   keep 2^(y - m) of every tile from the forward (n V floats, in a workspace that
                             is reused across calls): 6 n d V flops; the backward only rescales it

Optionally (`with_wpo`) the forward also returns log p_t - log sum_v p_v^2 (WPO eq. 2; no gradient), from
a second running sum sum_v 4^(y_v - m).

Under autocast the matmuls run in the autocast dtype, exactly as `F.linear` would run them, and everything
else (log-sum-exp, softmax gradient, accumulation) in fp32, as `logits.float()` after `lm_head(h)` would.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

DEFAULT_VOCAB_CHUNK = 2048
LOG2E = 1.0 / math.log(2.0)
LN2 = math.log(2.0)
_MAX_POOLED = 2  # free workspaces kept between calls


class _WorkspacePool:
    """Reuses the large fp32 buffers that keep exp(z - m) between forward and backward.

    A fresh buffer of hundreds of MB is mapped by the allocator on every call and paged in on first touch,
    which costs as much as a pass over it; a buffer handed back after the backward is reused instead."""

    def __init__(self) -> None:
        self.free: list[Tensor] = []

    def take(self, numel: int, device: torch.device) -> Tensor:
        fits = [b for b in self.free if b.device == device and b.numel() >= numel]
        if fits:
            buffer = min(fits, key=Tensor.numel)
            self.free = [b for b in self.free if b is not buffer]
            return buffer
        self.free.clear()  # none fits: free the smaller ones before mapping a bigger one
        # headroom for the next, slightly longer batch; pages that are never written are never resident
        return torch.empty(numel + numel // 4, dtype=torch.float32, device=device)

    def give_back(self, buffer: Tensor) -> None:
        self.free.append(buffer)
        self.free.sort(key=Tensor.numel, reverse=True)
        del self.free[_MAX_POOLED:]

    def clear(self) -> None:
        self.free.clear()


workspace_pool = _WorkspacePool()


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


class _Operands:
    """The LM head's operands in the compute dtype, plus the base-2 scaled copies the fp32 path multiplies."""

    def __init__(self, hidden: Tensor, weight: Tensor, bias: Tensor | None) -> None:
        self.cdtype = _compute_dtype(hidden.device, hidden.dtype)
        self.h, self.w = hidden.to(self.cdtype), weight.to(self.cdtype)
        self.b = None if bias is None else bias.to(self.cdtype)
        self.fp32 = self.cdtype == torch.float32
        self.vocab = weight.shape[0]
        if self.fp32:  # y = z log2(e) straight from the matmul
            self.h2 = self.h * LOG2E
            self.b2 = None if self.b is None else self.b * LOG2E

    def shifted_tile(self, start: int, end: int, v0: int, v1: int, shift: Tensor | None, out: Tensor) -> Tensor:
        """y - shift for rows start:end and vocabulary v0:v1, into `out` (fp32), where y = z log2(e).

        fp32: one matmul that starts from b log2(e) - shift. Other dtypes: z in the compute dtype exactly as
        F.linear makes it, then scaled and shifted in fp32. Without a shift: y itself."""
        w = self.w[v0:v1]
        if self.fp32:
            h2 = self.h2[start:end]
            b2 = None if self.b2 is None else self.b2[v0:v1]
            if shift is None:
                return torch.mm(h2, w.t(), out=out) if b2 is None else torch.addmm(b2, h2, w.t(), out=out)
            if b2 is None:
                out.copy_(shift.neg().unsqueeze(1).expand_as(out))
            else:
                torch.sub(b2.unsqueeze(0), shift.unsqueeze(1), out=out)
            return out.addmm_(h2, w.t())
        h = self.h[start:end]
        z = torch.mm(h, w.t()) if self.b is None else torch.addmm(self.b[v0:v1], h, w.t())
        out.copy_(z).mul_(LOG2E)
        return out if shift is None else out.sub_(shift.unsqueeze(1))


def _tile_view(buffer: Tensor, tile: int, rows: int, width: int, vocab_chunk: int) -> Tensor:
    """Tile `tile` of a row block's buffer: a contiguous [rows, width] slice at offset tile * rows * vocab_chunk."""
    offset = tile * rows * vocab_chunk
    return buffer[offset:offset + rows * width].view(rows, width)


def _forward_rows(ops: _Operands, start: int, end: int, targets: Tensor, vocab_chunk: int, with_wpo: bool,
                  buffer: Tensor, stored: bool, shift: Tensor | None):
    """One block of rows: (target y - shift, sum_v 2^(y_v - shift), sum_v 4^(y_v - shift) or None, shift).

    Tiles go through `buffer` (all tiles when `stored`, else one tile reused); each ends up holding
    2^(y - shift). Without a given shift, the first tile's row maxima become the shift of every tile."""
    n = end - start
    running_sum = torch.zeros(n, device=ops.h.device)
    running_sq = torch.zeros(n, device=ops.h.device) if with_wpo else None
    target = torch.empty(n, device=ops.h.device)
    for tile, bucket in enumerate(_target_buckets(targets, ops.vocab, vocab_chunk)):
        v0 = tile * vocab_chunk
        v1 = min(v0 + vocab_chunk, ops.vocab)
        y = ops.shifted_tile(start, end, v0, v1, shift,
                             _tile_view(buffer, tile if stored else 0, n, v1 - v0, vocab_chunk))
        if shift is None:
            shift = y.amax(dim=1)
            y.sub_(shift.unsqueeze(1))
        if bucket is not None:
            rows, cols = bucket
            target[rows] = y[rows, cols]
        y.exp2_()
        running_sum.add_(y.sum(dim=1))
        if running_sq is not None:
            running_sq.add_(y.square().sum(dim=1))
    return target, running_sum, running_sq, shift


def _row_maxima(ops: _Operands, start: int, end: int, vocab_chunk: int, scratch: Tensor) -> Tensor:
    """max_v y_v of each row, one more pass of matmuls."""
    best = torch.full((end - start,), float("-inf"), device=ops.h.device)
    for v0 in range(0, ops.vocab, vocab_chunk):
        v1 = min(v0 + vocab_chunk, ops.vocab)
        y = ops.shifted_tile(start, end, v0, v1, None, _tile_view(scratch, 0, end - start, v1 - v0, vocab_chunk))
        torch.maximum(best, y.amax(dim=1), out=best)
    return best


def _row_blocks(n: int, row_chunk: int) -> list[tuple[int, int]]:
    return [(start, min(start + row_chunk, n)) for start in range(0, n, row_chunk)]


def _forward(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, row_chunk: int,
             vocab_chunk: int, with_wpo: bool, store: bool):
    """(logp, WPO-adjusted or None, per-block (shift, sum), workspace or None); the workspace keeps every
    tile's 2^(y - shift) for the backward when `store`."""
    ops = _Operands(hidden, weight, bias)
    n = hidden.shape[0]
    num_tiles = -(-ops.vocab // vocab_chunk)
    blocks = _row_blocks(n, row_chunk)
    tile_floats = vocab_chunk * min(n, row_chunk)
    scratch = torch.empty(tile_floats, device=hidden.device)
    workspace = workspace_pool.take(num_tiles * n * vocab_chunk, hidden.device) if store else None
    logps, sqs, saved = [], [], []
    with torch.autocast(hidden.device.type, enabled=False):
        for start, end in blocks:
            buffer = workspace[num_tiles * start * vocab_chunk:] if store else scratch
            target, total, sq, shift = _forward_rows(ops, start, end, targets[start:end], vocab_chunk, with_wpo,
                                                     buffer, store, None)
            if not bool(torch.isfinite(total).all()):
                # a later tile exceeded the first tile's maxima by ~2^128: redo the block shifted by the
                # exact row maxima, so that every 2^(y - shift) <= 1 and every sum >= 1
                shift = _row_maxima(ops, start, end, vocab_chunk, scratch)
                target, total, sq, shift = _forward_rows(ops, start, end, targets[start:end], vocab_chunk,
                                                         with_wpo, buffer, store, shift)
            log2_total = total.log2()
            logps.append(LN2 * (target - log2_total))
            if sq is not None:
                sqs.append(LN2 * (sq.log2() - 2.0 * log2_total))  # log sum_v p_v^2
            saved.append((shift, total))
    logp = torch.cat(logps) if logps else hidden.new_zeros(0, dtype=torch.float32)
    adjusted = None
    if with_wpo:
        adjusted = logp - (torch.cat(sqs) if sqs else logp.new_zeros(0))
    return logp, adjusted, saved, workspace


class _FusedLMHeadLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, row_chunk: int,
                vocab_chunk: int, with_wpo: bool, store: bool):
        logp, adjusted, saved, workspace = _forward(hidden, weight, bias, targets, row_chunk, vocab_chunk,
                                                    with_wpo, store)
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.saved_blocks, ctx.workspace = saved, workspace
        ctx.row_chunk, ctx.vocab_chunk = row_chunk, vocab_chunk
        if adjusted is not None:
            ctx.mark_non_differentiable(adjusted)
        return logp, adjusted

    @staticmethod
    def backward(ctx, grad_logp: Tensor, grad_adjusted: Tensor | None):
        hidden, weight, bias, targets = ctx.saved_tensors
        vocab_chunk, workspace = ctx.vocab_chunk, ctx.workspace
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        ops = _Operands(hidden, weight, bias)
        n, vocab = hidden.shape[0], weight.shape[0]
        num_tiles = -(-vocab // vocab_chunk)
        blocks = _row_blocks(n, ctx.row_chunk)
        scratch = None if workspace is not None else torch.empty(vocab_chunk * min(n, ctx.row_chunk),
                                                                  device=hidden.device)
        # the first row block writes every tile of dW and db, later blocks add to them
        fresh = torch.empty if blocks else torch.zeros
        grad_h = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_h else None
        grad_w = fresh(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = fresh(vocab, dtype=torch.float32, device=weight.device) if need_b and bias is not None else None
        g = grad_logp.float()
        with torch.autocast(hidden.device.type, enabled=False):
            for block, ((start, end), (shift, total)) in enumerate(zip(blocks, ctx.saved_blocks)):
                rows_n = end - start
                h_rows, g_rows = ops.h[start:end], g[start:end]
                # d logp / dz = onehot(target) - p, p = 2^(y - shift) / total
                scale = (-g_rows / total).unsqueeze(1)
                for tile, bucket in enumerate(_target_buckets(targets[start:end], vocab, vocab_chunk)):
                    v0 = tile * vocab_chunk
                    v1 = min(v0 + vocab_chunk, vocab)
                    if workspace is not None:
                        grad_z = _tile_view(workspace[num_tiles * start * vocab_chunk:], tile, rows_n, v1 - v0,
                                            vocab_chunk)
                    else:
                        grad_z = ops.shifted_tile(start, end, v0, v1, shift,
                                                  _tile_view(scratch, 0, rows_n, v1 - v0, vocab_chunk)).exp2_()
                    grad_z.mul_(scale)
                    if bucket is not None:
                        rows, cols = bucket
                        grad_z[rows, cols] += g_rows[rows]
                    _accumulate_tile(grad_z.to(ops.cdtype), h_rows, ops.w[v0:v1],
                                     grad_h[start:end] if need_h else None,
                                     grad_w[v0:v1] if grad_w is not None else None,
                                     grad_b[v0:v1] if grad_b is not None else None, first=block == 0)
        ctx.saved_blocks = None
        if workspace is not None:
            workspace_pool.give_back(workspace)
            ctx.workspace = None
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
        logp, adjusted, _, _ = _forward(hidden, weight, bias, targets, row_chunk, vocab_chunk, with_wpo, False)
        return logp, adjusted
    return _FusedLMHeadLogps.apply(hidden, weight, bias, targets, row_chunk, vocab_chunk, with_wpo, store)
