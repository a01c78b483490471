"""Log-probs of target tokens through the LM head, fused and tiled: no [tokens, vocab] tensor is kept.

For hidden states h [n, d], LM-head weight W [V, d], bias b [V] and targets t [n]:

    z_i     = W h_i + b                           logits of row i, [V]
    lse_i   = log sum_v exp z_iv
    logp_i  = z_{i, t_i} - lse_i

Backward, for an upstream gradient g [n] (one number per row: d loss / d logp_i):

    G_i = g_i (onehot(t_i) - softmax(z_i))        [V]
    dh = G W,   dW = G^T h,   db = sum_i G_i

The work is cut into tiles of `row_chunk` rows x `vocab_chunk` vocabulary entries. Tiles hold base-2
logits y = z log2(e), because exp2 costs about half of exp on CPUs, shifted by one number m_i per row, the
maximum of the row's first tile. In fp32 one plain matmul of augmented operands makes them, bias and shift
included, so neither costs a pass over the tile:

    y - m = [h log2(e) | log2(e) | -m] [W | b | 1]^T
    s_i     = sum_v 2^(y_iv - m_i)
    logp_i  = ln 2 (y_{i, t_i} - m_i - log2 s_i),      softmax(z_i)_v = 2^(y_iv - m_i) / s_i

If a later tile exceeds m_i by so much that s_i passes 2^64 (MAX_SHIFTED_SUM: beyond it the backward's -g / s_i
would lose precision for a small g, and s_i overflows past 2^128), the block is redone shifted by its exact row
maxima (one more pass of matmuls), so every term is <= 1 and s_i >= 1.

The backward (fp32) never rescales a tile: with E = 2^(y - m) and c = -g / s per row,

    dh = c * (E W) + g W_t,        [dW | db]^T = [c h | c]^T E  + (g h, g) scattered to the rows t

E W is made in the forward, while each tile is in cache, whenever h needs a gradient; the backward then
reads each tile once, for [dW | db]. E itself comes one of two ways:

    store     (store=True)   keep E of every tile from the forward (n V floats, in a workspace that is
                             reused across calls): 6 n d V flops in all
    recompute (store=False)  redo the tiles in backward: 8 n d V flops, memory O(n + V) beyond the inputs

Optionally (`with_wpo`) the forward also returns log p_t - log sum_v p_v^2 (WPO eq. 2; no gradient), from
a second running sum sum_v 4^(y_v - m). With `with_stats` it returns each row's entropy and whether its target
is the top token (no gradient), from a running sum and a running maximum over the tiles of u = y - m:

    H_i = -sum_v p_v ln p_v = ln 2 (log2 s_i - sum_v 2^u_v u_v / s_i),     top1_i = [u_{i, t_i} >= max_v u_v]

Under autocast the matmuls run in the autocast dtype of the forward (also when backward is called after
leaving autocast), exactly as `F.linear` and its autograd would run them: G is formed in fp32 and cast.
Everything else (log-sum-exp, softmax gradient, accumulation) is fp32, as `logits.float()` after
`lm_head(h)` would be.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

DEFAULT_VOCAB_CHUNK = 2048
# a row's sum of 2^(y - m) above this redoes its block with exact maxima (module docstring); a real model's rows stay
# far below it (SmolLM2-135M: its top logit at most 20 bits above the first tile's maximum over 10k tokens)
MAX_SHIFTED_SUM = 2.0 ** 64
# [d, rows] x [rows, tile] with rows in the thousands runs well below a square matmul's rate in MKL on AVX-512
# (the rows x tile operand streams through L2 once per output block); summed over 128-row slices, each slice
# of E stays in L2 and the product runs close to that rate
BACKWARD_ROW_SLICE = 128
LOG2E = 1.0 / math.log(2.0)
LN2 = math.log(2.0)
_MAX_POOLED = 2  # free workspaces kept between calls
STATS_SCALE = 2.0 ** -7  # u 2^u scaled so that it stays below 2^u for |u| <= 128 (see _forward_rows)


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

    def reserve(self, numel: int, device: torch.device) -> None:
        """Map and touch a buffer of `numel` floats now (sized for the largest micro-batch of a run), so that
        no later call maps a bigger one: memory is flat from the first step, and a shortage shows at once."""
        if any(b.device == device and b.numel() >= numel for b in self.free):
            return
        self.free.clear()
        self.give_back(torch.zeros(numel, dtype=torch.float32, device=device))

    def give_back(self, buffer: Tensor) -> None:
        self.free.append(buffer)
        self.free.sort(key=Tensor.numel, reverse=True)
        del self.free[_MAX_POOLED:]

    def clear(self) -> None:
        self.free.clear()


workspace_pool = _WorkspacePool()


def workspace_numel(rows: int, vocab: int, vocab_chunk: int = DEFAULT_VOCAB_CHUNK) -> int:
    """Floats of the workspace that keeps the softmax tiles of `rows` rows (store=True)."""
    return -(-vocab // vocab_chunk) * rows * vocab_chunk


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
    """The LM head's operands in the compute dtype.

    fp32: a tile's shifted base-2 logits come out of one plain matmul of augmented operands,

        [h log2(e) | log2(e) | -m] [W | b | 1]^T = y - m,

    so neither the bias nor the shift costs a pass over the tile (`h_aug`'s last column holds -m of the rows
    being computed). Other dtypes: z in the compute dtype exactly as F.linear makes it, then scaled and
    shifted in fp32."""

    def __init__(self, hidden: Tensor, weight: Tensor, bias: Tensor | None, vocab_chunk: int,
                 cdtype: torch.dtype | None = None) -> None:
        self.cdtype = cdtype or _compute_dtype(hidden.device, hidden.dtype)
        self._vocab_chunk = min(vocab_chunk, weight.shape[0])
        self.h, self.w = hidden.to(self.cdtype), weight.to(self.cdtype)
        self.b = None if bias is None else bias.to(self.cdtype)
        self.fp32 = self.cdtype == torch.float32
        self.vocab, self.d = weight.shape

    @functools.cached_property
    def h_aug(self) -> Tensor:
        d = self.d
        h_aug = self.h.new_zeros(self.h.shape[0], d + (1 if self.b is None else 2))
        torch.mul(self.h, LOG2E, out=h_aug[:, :d])
        if self.b is not None:
            h_aug[:, d] = LOG2E
        return h_aug

    @functools.cached_property
    def _w_tile(self) -> Tensor:
        """Room for [W | b | 1] of one vocabulary tile (the trailing ones are written once)."""
        return self.w.new_ones(self._vocab_chunk, self.h_aug.shape[1])

    def augmented_weight(self, v0: int, v1: int) -> Tensor:
        """[W | b | 1] for vocabulary v0:v1, copied into a small buffer that stays in cache (rather than one
        copy of the whole of W per call, which costs a cold pass over memory)."""
        w_tile = self._w_tile[:v1 - v0]
        w_tile[:, :self.d] = self.w[v0:v1]
        if self.b is not None:
            w_tile[:, self.d] = self.b[v0:v1]
        return w_tile

    def shifted_tile(self, start: int, end: int, v0: int, v1: int, shift: Tensor | None, out: Tensor) -> Tensor:
        """y - shift for rows start:end and vocabulary v0:v1, into `out` (fp32), where y = z log2(e).
        Without a shift: y itself."""
        if self.fp32:
            rows = self.h_aug[start:end]
            if shift is None:
                rows[:, -1] = 0.0
            else:
                torch.neg(shift, out=rows[:, -1])
            return torch.mm(rows, self.augmented_weight(v0, v1).t(), out=out)
        h, w = self.h[start:end], self.w[v0:v1]
        z = torch.mm(h, w.t()) if self.b is None else torch.addmm(self.b[v0:v1], h, w.t())
        out.copy_(z).mul_(LOG2E)
        return out if shift is None else out.sub_(shift.unsqueeze(1))


def _tile_view(buffer: Tensor, tile: int, rows: int, width: int, vocab_chunk: int) -> Tensor:
    """Tile `tile` of a row block's buffer: a contiguous [rows, width] slice at offset tile * rows * vocab_chunk."""
    offset = tile * rows * vocab_chunk
    return buffer[offset:offset + rows * width].view(rows, width)


class _RowBlock(NamedTuple):
    """What the forward of one block of rows gives: all of it per row, fp32."""

    target: Tensor  # y_t - shift
    total: Tensor  # s = sum_v 2^(y_v - shift)
    squares: Tensor | None  # sum_v 4^(y_v - shift) (with_wpo)
    shift: Tensor
    ew: Tensor | None  # sum_v 2^(y_v - shift) W_v [rows, d] (with_ew)
    weighted: Tensor | None  # sum_v 2^(y_v - shift) (y_v - shift) STATS_SCALE (with_stats: the entropy)
    maximum: Tensor | None  # max_v y_v - shift (with_stats: whether the target is the top token)


def _forward_rows(ops: _Operands, start: int, end: int, targets: Tensor, vocab_chunk: int, with_wpo: bool,
                  buffer: Tensor | None, scratch: Tensor, shift: Tensor | None, with_ew: bool,
                  with_stats: bool = False) -> _RowBlock:
    """One block of rows (see _RowBlock).

    Each tile's 2^(y - shift) is kept in `buffer` (all tiles) or left in `scratch` (its second tile with
    `with_stats`, whose sums read y - shift beside it). Without a given shift, the first tile's row maxima become
    the shift of every tile. `with_ew`: also the softmax-weighted sum of W rows that dh needs, while the tile is
    still in cache (the backward then reads the kept tiles once)."""
    n = end - start
    device = ops.h.device
    ew = torch.zeros(n, ops.d, device=device) if with_ew else None
    running_sum = torch.zeros(n, device=device)
    running_sq = torch.zeros(n, device=device) if with_wpo else None
    weighted = torch.zeros(n, device=device) if with_stats else None
    maximum = torch.full((n,), float("-inf"), device=device) if with_stats else None
    target = torch.empty(n, device=device)
    for tile, bucket in enumerate(_target_buckets(targets, ops.vocab, vocab_chunk)):
        v0 = tile * vocab_chunk
        v1 = min(v0 + vocab_chunk, ops.vocab)
        # the matmul writes a scratch tile that stays in cache; exp2 writes the kept tile
        y = ops.shifted_tile(start, end, v0, v1, shift, _tile_view(scratch, 0, n, v1 - v0, vocab_chunk))
        if shift is None:
            shift = y.amax(dim=1)
            y.sub_(shift.unsqueeze(1))
        if bucket is not None:
            rows, cols = bucket
            target[rows] = y[rows, cols]
        if buffer is not None:
            e = torch.exp2(y, out=_tile_view(buffer, tile, n, v1 - v0, vocab_chunk))
        elif with_stats:
            e = torch.exp2(y, out=_tile_view(scratch, 1, n, v1 - v0, vocab_chunk))
        else:
            e = y.exp2_()
        # a separate sum, not a column of E [W | b | 1]: the forward without gradient must give the same bits
        running_sum.add_(e.sum(dim=1))
        if running_sq is not None:
            running_sq.add_(e.square().sum(dim=1))
        if with_stats:
            torch.maximum(maximum, y.amax(dim=1), out=maximum)
            # y is spent: the product is made in place. Scaled by 2^-7 (exact), each term is at most 2^u, so the
            # sum is finite wherever s is; nansum: 0 for a logit of -inf (u = -inf, 2^u = 0)
            weighted.add_(y.mul_(STATS_SCALE).mul_(e).nansum(dim=1))
        if ew is not None:
            ew.addmm_(e, ops.w[v0:v1])
    return _RowBlock(target, running_sum, running_sq, shift, ew, weighted, maximum)


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


class HeadLogps(NamedTuple):
    """What lm_head_logps gives, per row (fp32)."""

    logp: Tensor  # log p(target), differentiable
    wpo: Tensor | None = None  # log p(target) - log sum_v p_v^2 (with_wpo; no grad)
    entropy: Tensor | None = None  # -sum_v p_v log p_v (with_stats; no grad)
    top1: Tensor | None = None  # 1.0 where the target's logit is the row's largest (ties count), else 0 (with_stats)


def _forward(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, row_chunk: int,
             vocab_chunk: int, with_wpo: bool, store: bool, grad_h: bool = False, grad_params: bool = True,
             with_stats: bool = False):
    """(HeadLogps, per-block (shift, sum, E W or None), workspace or None, compute dtype); the workspace keeps
    every tile's 2^(y - shift) for the backward when `store`. `grad_h` (fp32 only): also E W. `grad_params` False
    (a frozen head, e.g. under LoRA): in fp32 the backward needs only E W, so no tile is kept and the
    weight-gradient matmul never runs."""
    ops = _Operands(hidden, weight, bias, vocab_chunk)
    with_ew = grad_h and ops.fp32
    store = store and (grad_params or not ops.fp32)
    n = hidden.shape[0]
    num_tiles = -(-ops.vocab // vocab_chunk)
    blocks = _row_blocks(n, row_chunk)
    tile_floats = vocab_chunk * min(n, row_chunk)
    # without a workspace, the statistics need y - shift beside its exp2: a second scratch tile
    scratch = torch.empty(tile_floats * (2 if with_stats and not store else 1), device=hidden.device)
    workspace = workspace_pool.take(num_tiles * n * vocab_chunk, hidden.device) if store else None
    pieces: dict[str, list[Tensor]] = {"logp": [], "wpo": [], "entropy": [], "top1": []}
    saved = []
    with torch.autocast(hidden.device.type, enabled=False):
        for start, end in blocks:
            buffer = workspace[num_tiles * start * vocab_chunk:] if store else None
            block = _forward_rows(ops, start, end, targets[start:end], vocab_chunk, with_wpo, buffer, scratch, None,
                                  with_ew, with_stats)
            # a sum up to 2^128 would be finite, but the backward's -g / s would then fall among fp32's subnormals
            # for a small upstream g (1e-6 at a sum of 2^125): its gradients would lose their precision
            usable = (block.total <= MAX_SHIFTED_SUM).all()
            # not `weighted`: finite wherever `total` is, so the statistics never change which blocks are redone
            for extra in (block.squares, block.ew):
                if extra is not None:
                    usable &= torch.isfinite(extra).all()
            if not bool(usable):
                # a later tile exceeded the first tile's maxima by 64 bits (44 nats; by ~2^64 for WPO's sum of
                # squares, less for E W with large weights): redo the block shifted by the exact row maxima, so
                # that every 2^(y - shift) <= 1 and every sum >= 1
                shift = _row_maxima(ops, start, end, vocab_chunk, scratch)
                block = _forward_rows(ops, start, end, targets[start:end], vocab_chunk, with_wpo, buffer, scratch,
                                      shift, with_ew, with_stats)
            log2_total = block.total.log2()
            logp = LN2 * (block.target - log2_total)
            pieces["logp"].append(logp)
            if with_wpo:
                pieces["wpo"].append(logp - LN2 * (block.squares.log2() - 2.0 * log2_total))  # - log sum_v p_v^2
            if with_stats:
                # H = lse - sum_v p_v z_v = ln 2 (log2 s - sum_v 2^u_v u_v / s), u = y - shift
                pieces["entropy"].append(LN2 * (log2_total - block.weighted / (STATS_SCALE * block.total)))
                pieces["top1"].append((block.target >= block.maximum).float())
            saved.append((block.shift, block.total, block.ew))
    def joined(name: str) -> Tensor:
        return torch.cat(pieces[name]) if pieces[name] else hidden.new_zeros(0, dtype=torch.float32)

    result = HeadLogps(joined("logp"), joined("wpo") if with_wpo else None,
                       joined("entropy") if with_stats else None, joined("top1") if with_stats else None)
    return result, saved, workspace, ops.cdtype


class _FusedLMHeadLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, row_chunk: int,
                vocab_chunk: int, with_wpo: bool, store: bool, with_stats: bool):
        result, saved, workspace, ctx.cdtype = _forward(hidden, weight, bias, targets, row_chunk, vocab_chunk,
                                                        with_wpo, store, grad_h=ctx.needs_input_grad[0],
                                                        grad_params=any(ctx.needs_input_grad[1:3]),
                                                        with_stats=with_stats)
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.saved_blocks, ctx.workspace = saved, workspace
        ctx.row_chunk, ctx.vocab_chunk = row_chunk, vocab_chunk
        ctx.mark_non_differentiable(*(t for t in result[1:] if t is not None))
        return tuple(result)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logp: Tensor, *grad_no_grad_outputs):
        if ctx.saved_blocks is None:  # the first backward gave the forward's tiles back (retain_graph keeps no more)
            raise RuntimeError("lm_head_logps: one backward per forward (the first releases what the forward kept); "
                               "run the forward again for another backward")
        hidden, weight, bias, targets = ctx.saved_tensors
        # the forward's autocast dtype, not the backward's
        ops = _Operands(hidden, weight, bias, ctx.vocab_chunk, ctx.cdtype)
        backward = _backward_fp32 if ops.fp32 else _backward_cast
        with torch.autocast(hidden.device.type, enabled=False):
            grad_h, grad_w, grad_b = backward(ops, grad_logp.float(), targets, ctx.saved_blocks, ctx.workspace,
                                              ctx.row_chunk, ctx.vocab_chunk, *ctx.needs_input_grad[:3])
        ctx.saved_blocks = None
        if ctx.workspace is not None:
            workspace_pool.give_back(ctx.workspace)
            ctx.workspace = None
        return (None if grad_h is None else grad_h.to(hidden.dtype),
                None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None, None, None, None)


def _softmax_tiles(ops: _Operands, start: int, end: int, shift: Tensor, workspace: Tensor | None,
                   vocab_chunk: int, scratch: Tensor | None):
    """(v0, v1, 2^(y - shift)) for every vocabulary tile of rows start:end: stored, or recomputed into `scratch`."""
    rows, num_tiles = end - start, -(-ops.vocab // vocab_chunk)
    for tile in range(num_tiles):
        v0, v1 = tile * vocab_chunk, min((tile + 1) * vocab_chunk, ops.vocab)
        if workspace is not None:
            yield v0, v1, _tile_view(workspace[num_tiles * start * vocab_chunk:], tile, rows, v1 - v0, vocab_chunk)
        else:
            yield v0, v1, ops.shifted_tile(start, end, v0, v1, shift,
                                           _tile_view(scratch, 0, rows, v1 - v0, vocab_chunk)).exp2_()


def _left_t_times(left: Tensor, e: Tensor, out: Tensor) -> Tensor:
    """left^T e into `out`, summed over slices of BACKWARD_ROW_SLICE rows."""
    rows = left.shape[0]
    torch.mm(left[:BACKWARD_ROW_SLICE].t(), e[:BACKWARD_ROW_SLICE], out=out)
    for r in range(BACKWARD_ROW_SLICE, rows, BACKWARD_ROW_SLICE):
        out.addmm_(left[r:r + BACKWARD_ROW_SLICE].t(), e[r:r + BACKWARD_ROW_SLICE])
    return out


def _backward_fp32(ops: _Operands, g: Tensor, targets: Tensor, saved_blocks, workspace: Tensor | None,
                   row_chunk: int, vocab_chunk: int, need_h: bool, need_w: bool, need_b: bool):
    """fp32: the softmax part of G = g (onehot - E / s) is applied through the small operands only,

        dh = (-g / s) (E W) + g W_t,    [dW | db]^T = [(-g / s) h | -g / s]^T E + scatter of g [h | 1] to t,

    with E W from the forward, so the kept tiles E are read once, by one matmul. [dW | db]^T of a tile is
    made in a small cache-resident buffer (h^T E runs faster than E^T h for these skinny shapes) and
    transposed into dW's rows."""
    n, d, vocab = ops.h.shape[0], ops.d, ops.vocab
    with_b = ops.b is not None and need_b
    cols = d + 1 if with_b else d
    alloc = torch.empty if n else torch.zeros  # the row blocks write every entry, but there are none when n = 0
    grad_h = alloc(n, d, device=ops.h.device) if need_h else None
    grad_w = alloc(vocab, d, device=ops.h.device) if need_w or with_b else None
    grad_b = alloc(vocab, device=ops.h.device) if with_b else None
    tiles_needed = grad_w is not None  # dh needs only E W: a frozen head reads no tile
    scratch = None if workspace is not None or not tiles_needed else torch.empty(vocab_chunk * min(n, row_chunk),
                                                                                 device=ops.h.device)
    tile_t = torch.empty(cols, min(vocab_chunk, vocab), device=ops.h.device) if tiles_needed else None
    for block, ((start, end), (shift, total, ew)) in enumerate(zip(_row_blocks(n, row_chunk), saved_blocks)):
        h_rows, g_rows, t_rows = ops.h[start:end], g[start:end], targets[start:end]
        scale = (-g_rows / total).unsqueeze(1)
        if grad_h is not None:
            torch.addcmul(ops.w[t_rows] * g_rows.unsqueeze(1), ew, scale, out=grad_h[start:end])
        if grad_w is None:
            continue
        left = torch.empty(end - start, cols, device=ops.h.device)
        torch.mul(h_rows, scale, out=left[:, :d])
        if with_b:
            left[:, d:] = scale
        for v0, v1, e in _softmax_tiles(ops, start, end, shift, workspace, vocab_chunk, scratch):
            tile = _left_t_times(left, e, out=tile_t[:, :v1 - v0])
            if block == 0:
                grad_w[v0:v1].copy_(tile[:d].t())
                if with_b:
                    grad_b[v0:v1].copy_(tile[d])
            else:
                grad_w[v0:v1].add_(tile[:d].t())
                if with_b:
                    grad_b[v0:v1].add_(tile[d])
        grad_w.index_add_(0, t_rows, h_rows * g_rows.unsqueeze(1))
        if with_b:
            grad_b.index_add_(0, t_rows, g_rows)
    return grad_h, grad_w if need_w else None, grad_b


def _backward_cast(ops: _Operands, g: Tensor, targets: Tensor, saved_blocks, workspace: Tensor | None,
                   row_chunk: int, vocab_chunk: int, need_h: bool, need_w: bool, need_b: bool):
    """Half precision: G = g (onehot - p) is formed in fp32 and cast to the compute dtype, and the matmuls run
    on it as autograd would run them after F.linear; sums are kept in fp32."""
    n, vocab = ops.h.shape[0], ops.vocab
    blocks = _row_blocks(n, row_chunk)
    scratch = None if workspace is not None else torch.empty(vocab_chunk * min(n, row_chunk), device=ops.h.device)
    grad_h = torch.zeros(n, ops.d, device=ops.h.device) if need_h else None
    grad_w = torch.zeros(vocab, ops.d, device=ops.h.device) if need_w else None
    grad_b = torch.zeros(vocab, device=ops.h.device) if need_b and ops.b is not None else None
    for (start, end), (shift, total, _) in zip(blocks, saved_blocks):
        h_rows, g_rows = ops.h[start:end], g[start:end]
        scale = (-g_rows / total).unsqueeze(1)
        buckets = _target_buckets(targets[start:end], vocab, vocab_chunk)
        tiles = _softmax_tiles(ops, start, end, shift, workspace, vocab_chunk, scratch)
        for (v0, v1, grad_z), bucket in zip(tiles, buckets):
            grad_z.mul_(scale)
            if bucket is not None:
                rows, cols = bucket
                grad_z[rows, cols] += g_rows[rows]
            grad_z = grad_z.to(ops.cdtype)
            if grad_h is not None:
                grad_h[start:end] += torch.mm(grad_z, ops.w[v0:v1]).float()
            if grad_w is not None:
                grad_w[v0:v1] += torch.mm(grad_z.t(), h_rows).float()
            if grad_b is not None:
                grad_b[v0:v1] += grad_z.sum(dim=0).float()
    return grad_h, grad_w, grad_b


def lm_head_logps(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, *, row_chunk: int = 4096,
                  vocab_chunk: int = DEFAULT_VOCAB_CHUNK, with_wpo: bool = False, store: bool = True,
                  with_stats: bool = False) -> HeadLogps:
    """log p(targets | hidden) [n] fp32, differentiable in hidden, weight and bias; with `with_wpo` WPO's adjusted
    values, with `with_stats` each row's entropy and whether its target is the top token (HeadLogps; none of
    these has a gradient). See the module docstring for the formulas and for `store`."""
    if hidden.ndim != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(f"lm_head_logps wants hidden [n, d] and targets [n], got {tuple(hidden.shape)} and "
                         f"{tuple(targets.shape)}")
    if row_chunk < 1 or vocab_chunk < 1:
        raise ValueError(f"row_chunk ({row_chunk}) and vocab_chunk ({vocab_chunk}) must be >= 1")
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias))
    if not needs_grad:
        return _forward(hidden, weight, bias, targets, row_chunk, vocab_chunk, with_wpo, False,
                        with_stats=with_stats)[0]
    return HeadLogps(*_FusedLMHeadLogps.apply(hidden, weight, bias, targets, row_chunk, vocab_chunk, with_wpo, store,
                                              with_stats))
