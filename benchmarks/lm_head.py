"""The fused LM head alone at the workload's shapes, and each of its matmuls on its own: how close to the
fp32 matmul peak the head can get on this machine.

    python benchmarks/lm_head.py                      # sizes S and M, one thread
    python benchmarks/lm_head.py --size S --rows 1400

The head (`dpo.lm_head`, store mode) does three matmuls per vocabulary tile of T entries, for n scored rows,
hidden size d and vocabulary V (2 n d V flops each, 6 n d V in all, which benchmarks/README.md counts as useful):

    logits   [n, d + 2] x [d + 2, T]           forward, into a cache-sized scratch tile
    E W      [n, T] x [T, d]                   forward, the tile still in cache
    dW       [d + 1, n] x [n, T]               backward, the kept tile E read back from memory, in row slices

plus the passes that are not matmuls (exp2 writing the kept tile, its row sums, the token statistics train.py
logs, copies). Timing each matmul at
its shape, with its operands where the head has them, gives the best the head could do if everything else
were free: `gemm_bound` = useful flops / (sum of the three matmul times) / peak. One JSON line per size.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput  # noqa: E402  (sets the path, then imports torch)
from throughput import SIZES, VOCAB, matmul_peak_gflops  # noqa: E402

from dpo.memory import tune_cpu_allocator  # noqa: E402

import torch  # noqa: E402

from dpo.lm_head import (BACKWARD_ROW_SLICE, DEFAULT_VOCAB_CHUNK, lm_head_logps, workspace_numel,  # noqa: E402
                         workspace_pool)
from dpo.packing import micro_batches  # noqa: E402
from dpo.train_settings import TrainSettings  # noqa: E402


def workload_rows(size: dict) -> list[int]:
    """Scored tokens of every micro-batch of the timed steps, split as train.py splits a step by default."""
    tokenizer = throughput.load_tokenizer(throughput.default_tokenizer())
    texts = throughput.workload_texts(size, throughput.default_dataset(), tokenizer)
    pairs = throughput.tokenized_pairs(texts, tokenizer, size["max_length"])
    defaults = TrainSettings()
    batch = size["micro"] * size["accum"]
    rows = []
    for step in range(1, size["steps"] + 1):
        step_pairs = pairs[step * batch:(step + 1) * batch]
        for micro in micro_batches(list(range(batch)), step_pairs, size["micro"], defaults.group_by_length):
            rows.append(sum(len(step_pairs[i].chosen_ids) + len(step_pairs[i].rejected_ids) for i in micro))
    return rows


def best_of(repeats: int, fn) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure(n: int, d: int, repeats: int, tile: int = DEFAULT_VOCAB_CHUNK) -> dict:
    torch.manual_seed(0)
    tiles = -(-VOCAB // tile)
    weight = (torch.randn(VOCAB, d) * 0.02).requires_grad_()
    bias = torch.zeros(VOCAB, requires_grad=True)
    hidden = torch.randn(n, d, requires_grad=True)
    targets = torch.randint(0, VOCAB, (n,))
    workspace_pool.reserve(workspace_numel(n, VOCAB, tile), torch.device("cpu"))

    def head():
        # with the token statistics, as train.py's policy scorer runs the head
        logp = lm_head_logps(hidden, weight, bias, targets, row_chunk=n, vocab_chunk=tile, with_stats=True).logp
        logp.sum().backward()
        weight.grad = bias.grad = hidden.grad = None

    # the three matmuls with the head's operand shapes; E lives in a workspace of n x V floats (as the kept
    # tiles do: the backward reads them from memory), the scratch tile and [W | b | 1] in cache
    h_aug, w_aug = torch.randn(n, d + 2), torch.randn(tile, d + 2)
    w_tile, scratch, ew = torch.randn(tile, d), torch.empty(n, tile), torch.zeros(n, d)
    left, out = torch.randn(n, d + 1), torch.empty(d + 1, tile)
    kept = torch.rand(tiles, n, tile)

    def logits():
        for _ in range(tiles):
            torch.mm(h_aug, w_aug.t(), out=scratch)

    def e_times_w():
        for _ in range(tiles):
            ew.addmm_(scratch, w_tile)

    def dw():
        for k in range(tiles):
            e = kept[k]
            torch.mm(left[:BACKWARD_ROW_SLICE].t(), e[:BACKWARD_ROW_SLICE], out=out)
            for r in range(BACKWARD_ROW_SLICE, n, BACKWARD_ROW_SLICE):
                out.addmm_(left[r:r + BACKWARD_ROW_SLICE].t(), e[r:r + BACKWARD_ROW_SLICE])

    def exp2():
        for k in range(tiles):
            torch.exp2(scratch, out=kept[k])

    peak_before = matmul_peak_gflops()
    head()
    times = {"head": best_of(repeats, head), "logits": best_of(repeats, logits),
             "e_times_w": best_of(repeats, e_times_w), "dw": best_of(repeats, dw), "exp2": best_of(repeats, exp2)}
    peak = max(peak_before, matmul_peak_gflops())
    mm_flops = 2 * n * d * tiles * tile  # one of the three matmuls (the augmented columns not counted)
    useful = 3 * mm_flops
    gemms = times["logits"] + times["e_times_w"] + times["dw"]
    workspace_pool.clear()
    return {
        "rows": n, "hidden": d, "vocab": VOCAB, "vocab_tile": tile, "matmul_peak_gflops": round(peak, 2),
        "head_ms": round(times["head"] * 1e3, 1),
        "head_utilisation": round(useful / times["head"] / 1e9 / peak, 4),
        "matmul_gflops": {k: round(mm_flops / times[k] / 1e9, 2) for k in ("logits", "e_times_w", "dw")},
        "matmul_ms": {k: round(times[k] * 1e3, 1) for k in ("logits", "e_times_w", "dw")},
        "exp2_ms": round(times["exp2"] * 1e3, 1),
        "gemm_bound": round(useful / gemms / 1e9 / peak, 4),
        "gemm_exp2_bound": round(useful / (gemms + times["exp2"]) / 1e9 / peak, 4),
    }


def main(argv: list[str] | None = None) -> None:
    tune_cpu_allocator()  # as train.py's command line does, before the first tensor
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), action="append",
                        help="workload size (repeatable; default S and M)")
    parser.add_argument("--rows", type=int, default=0,
                        help="scored rows of the micro-batch (0: the median micro-batch of the workload)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    for flag, value, least in (("--rows", args.rows, 0), ("--repeats", args.repeats, 1),
                               ("--threads", args.threads, 0)):
        if value < least:
            parser.error(f"{flag} must be at least {least}, got {value}")
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in args.size or ["S", "M"]:
        size = SIZES[name]
        rows = args.rows or int(statistics.median(workload_rows(size)))
        print(json.dumps({"size": name, **measure(rows, size["hidden"], args.repeats)}), flush=True)


if __name__ == "__main__":
    main()
