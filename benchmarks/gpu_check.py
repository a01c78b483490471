"""The GPU check's measurements: train.py's own functions on one CUDA GPU, with torch, transformers and peft only.

    python benchmarks/gpu_check.py equality       CPU vs CUDA on the demo: log-probs, loss and gradients of one
                                                  micro-batch in fp32 (TF32 off), bf16 and fp16
    python benchmarks/gpu_check.py phi2           a phi-2-sized random-init model (PhiConfig, no download) through
                                                  train_step with the recipe's settings (phi2_ultrafeedback.json:
                                                  batch 64, micro 4, context 1024) on UltraFeedback-like lengths, per
                                                  layout (--layouts) with gradient checkpointing, the first also
                                                  without it
    python benchmarks/gpu_check.py lora           the same model with the LoRA recipe (phi2_ultrafeedback_lora.json)
    python benchmarks/gpu_check.py generate       sampling tokens/s of the phi-2-sized model (T 0.7, top-p 0.9)
    python benchmarks/gpu_check.py profile        where a padded bf16 step of the phi-2-sized model spends its time
                                                  (torch.profiler), then its gradient-checkpointed step at micro 16,
                                                  the model built in GPU memory (no save and load)
    python benchmarks/gpu_check.py summary FILE   the table of a report's results.jsonl

Each measurement prints one JSON line. A step's figures are train_step's own metrics (tokens/s and MFU over a
synced step time, the step's peak CUDA memory); benchmarks/gpu_check.sh runs every part and writes the report.

`--smoke` runs a part (not equality, which compares the CPU with CUDA) on the CPU with a tiny model of Phi's
architecture (2 layers, width 64, a 512-token vocabulary) and short pairs at batch 8: the same code paths in a few
seconds, to check the script before a GPU is at hand (its figures mean nothing).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

import train  # noqa: E402
from dpo.batches import PairBatch  # noqa: E402
from dpo.train_settings import parse_settings  # noqa: E402
from dpo.data import TokenizedPair  # noqa: E402
from dpo.distributed import DistInfo  # noqa: E402
from dpo.lm_head import workspace_pool  # noqa: E402
from dpo.loss import compute_loss  # noqa: E402
from dpo.modeling import enable_gradient_checkpointing, load_tokenizer  # noqa: E402
from dpo.splits import PreferenceData, load_preference_pairs  # noqa: E402
from dpo.reference import ReferenceLogps  # noqa: E402

CONFIGS = ROOT / "configs"
PHI2 = dict(vocab_size=51200, hidden_size=2560, intermediate_size=10240, num_hidden_layers=32, num_attention_heads=32,
            max_position_embeddings=2048, partial_rotary_factor=0.4, resid_pdrop=0.0, embd_pdrop=0.0,
            attention_dropout=0.0, bos_token_id=50256, eos_token_id=50256)
EOS = 50256
MODEL = Path("phi2-sized-random-init")  # what train.py's loader is asked for: in_memory_phi2 answers
STEPS = 3  # the first is a warm-up (allocator, kernel choice); the others are timed


@dataclass
class Target:
    """Where and at what size the parts run: phi-2's sizes on CUDA, or --smoke's tiny sizes on the CPU."""
    device: torch.device
    model: dict  # PhiConfig arguments
    eos: int
    batch: int  # pairs per step (the recipe's 64)
    flags: tuple[str, ...] = ()  # train.py flags over the recipe's config
    max_length: int = 1024
    max_prompt_length: int = 512
    prompt_tokens: float = 150  # the log-normal medians of ultrafeedback_like_pairs
    response_tokens: float = 260
    generate_shape: tuple[int, int, int] = (64, 128, 128)  # rows, prompt tokens, new tokens
    large_micro: int = 16  # the profile part's gradient-checkpointed step: 4 micro-batches of the recipe's batch


GPU = Target(torch.device("cuda"), PHI2, EOS, batch=64)
SMOKE = Target(torch.device("cpu"), {**PHI2, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
                                     "num_hidden_layers": 2, "num_attention_heads": 4, "bos_token_id": 511,
                                     "eos_token_id": 511},
               eos=511, batch=8, max_length=64, max_prompt_length=32, prompt_tokens=12, response_tokens=20,
               flags=("--batch-size", "8", "--micro-batch-size", "4", "--max-length", "64",
                      "--max-prompt-length", "32"), generate_shape=(4, 8, 8), large_micro=8)
target = GPU


def reset_peak_memory() -> None:
    """Start the device's peak memory count afresh (CUDA only)."""
    if target.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(target.device)


def release_memory() -> None:
    """Free what the last run left: Python's garbage and, on CUDA, the allocator's cached blocks."""
    gc.collect()
    if target.device.type == "cuda":
        torch.cuda.empty_cache()


def peak_memory_gb() -> float | None:
    """The peak memory allocated on the CUDA device since the last reset (None on the CPU)."""
    return torch.cuda.max_memory_allocated(target.device) / 1e9 if target.device.type == "cuda" else None


def device_name() -> str:
    """The GPU's name, or 'cpu'."""
    return torch.cuda.get_device_name(target.device) if target.device.type == "cuda" else "cpu"


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


# ---------------------------------------------------------------------------------------------------- equality


def micro_batch_probe(device: torch.device, precision: str, pairs: list[TokenizedPair],
                      reference: ReferenceLogps | None) -> tuple[float, torch.Tensor, dict[str, torch.Tensor]]:
    """Loss, policy log-probs and gradients of one micro-batch of the demo model, through train.py's scorer and
    loss (train.score_pairs, compute_loss) under the precision's autocast."""
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as out:
        cfg = parse_settings(["--precision", precision, "--device", device.type, "--output-dir", out,
                            "--batch-size", str(len(pairs)), "--micro-batch-size", str(len(pairs))])
        policy, adapters = train.build_policy(cfg, device)
        tokenizer = load_tokenizer(cfg.model)
        _, collate = train.collator(cfg, tokenizer.pad_token_id, policy)
        state = train.build_state(cfg, policy, adapters, device=device, dist=DistInfo(), collate=collate,
                                  workspace_pairs=pairs)
        ids = list(range(len(pairs)))
        with train.autocast(cfg, device):
            logps = train.score_pairs(state, pairs, ids, reference)
            if reference is None:  # the CPU fp32 run makes the reference: the step-0 case, policy = reference
                logps.reference_chosen_logps = logps.policy_chosen_logps.detach()
                logps.reference_rejected_logps = logps.policy_rejected_logps.detach()
            loss = compute_loss(logps, cfg.loss).losses.mean()
        loss.backward()
        grads = {name: p.grad.detach().float().cpu() for name, p in policy.named_parameters() if p.grad is not None}
        both = torch.cat([logps.policy_chosen_logps, logps.policy_rejected_logps]).detach().float().cpu()
    return loss.item(), both, grads


def compare_cpu_cuda(precision: str, num_pairs: int = 16) -> dict:
    """One micro-batch of demo pairs on the CPU in fp32 and on CUDA in `precision` (fp32 with TF32 off): the
    largest log-prob difference, the loss difference and the relative gradient error (norm of the difference over
    the CPU gradient's norm), with the cosine between the two gradients."""
    cpu, cuda = torch.device("cpu"), target.device
    with tempfile.TemporaryDirectory() as out:
        cfg = parse_settings(["--output-dir", out])
        pairs = load_preference_pairs(cfg, load_tokenizer(cfg.model), log=lambda *a, **k: None).train[:num_pairs]
    loss_cpu, logps_cpu, grads_cpu = micro_batch_probe(cpu, "fp32", pairs, None)
    reference = ReferenceLogps(logps_cpu[:num_pairs], logps_cpu[num_pairs:])
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # plain fp32 for the fp32 comparison (train.py turns TF32 on)
    try:
        loss_gpu, logps_gpu, grads_gpu = micro_batch_probe(cuda, precision, pairs, reference)
    finally:
        torch.set_float32_matmul_precision(previous)
    diff = torch.cat([(grads_gpu[n] - grads_cpu[n]).flatten() for n in grads_cpu])
    flat_cpu = torch.cat([grads_cpu[n].flatten() for n in grads_cpu])
    flat_gpu = torch.cat([grads_gpu[n].flatten() for n in grads_cpu])
    return {"part": "equality", "precision": precision, "pairs": num_pairs, "loss_cpu": loss_cpu,
            "loss_cuda": loss_gpu, "loss_abs_diff": abs(loss_gpu - loss_cpu),
            "logps_max_abs_diff": float((logps_gpu - logps_cpu).abs().max()),
            "logps_max_rel_diff": float(((logps_gpu - logps_cpu).abs() / logps_cpu.abs()).max()),
            "grad_rel_error": float(diff.norm() / flat_cpu.norm()),
            "grad_cosine": float(torch.nn.functional.cosine_similarity(flat_gpu, flat_cpu, dim=0)),
            "same_parameters": sorted(grads_cpu) == sorted(grads_gpu)}


# ---------------------------------------------------------------------------------------------------- phi-2 sized


def ultrafeedback_like_pairs(count: int, seed: int = 0) -> list[TokenizedPair]:
    """Random token ids with UltraFeedback-like lengths (phi-2 tokenizer): prompts log-normal around 150 tokens,
    responses around 260, cut as train.py cuts them (prompt to max_prompt_length, each sequence to max_length)."""
    rng = np.random.default_rng(seed)
    pairs = []
    for row in range(count):
        prompt = int(np.clip(rng.lognormal(math.log(target.prompt_tokens), 0.9), 8, target.max_prompt_length))
        budget = target.max_length - prompt
        chosen, rejected = (int(np.clip(rng.lognormal(math.log(target.response_tokens), 0.6), 4, budget))
                            for _ in range(2))
        ids = [rng.integers(0, target.eos, n).tolist() for n in (prompt, chosen - 1, rejected - 1)]
        pairs.append(TokenizedPair(ids[0], ids[1] + [target.eos], ids[2] + [target.eos], row))
    return pairs


def time_steps(cfg, policy, adapters, pairs: list[TokenizedPair], label: str, extra: dict, steps: int = STEPS) -> dict:
    """train.py's reference pass and `steps` optimizer steps on `pairs`: the timed steps' metrics (the first step is
    a warm-up)."""
    device = target.device
    layout, collate = train.collator(cfg, target.eos, policy)
    every = list(range(len(pairs)))
    reset_peak_memory()
    start = train.synced_clock(device)
    reference = train.reference_logps(cfg, policy, adapters, PreferenceData(train=pairs, eval=[]), every,
                                      device=device, dist=DistInfo(), collate=collate, resumed=False,
                                      log=lambda *a, **k: None)["train"]
    reference_s = train.synced_clock(device) - start
    state = train.build_state(cfg, policy, adapters, device=device, dist=DistInfo(), collate=collate,
                              workspace_pairs=pairs, layout=layout)
    records = []
    for step in range(steps):
        ids = every[step * cfg.batch_size:(step + 1) * cfg.batch_size]
        batch = PairBatch([pairs[i] for i in ids], reference.select(ids) if reference is not None else None)
        records.append(train.train_step(state, batch, cfg.lr))
    timed = records[1:]
    result = {"part": label, **extra, "layout": layout, "precision": train.resolve_precision(cfg.precision, device),
              "gradient_checkpointing": cfg.gradient_checkpointing, "batch": cfg.batch_size,
              "micro": cfg.micro_batch_size, "step_s": [round(cfg.batch_size / r["pairs_per_s"], 3) for r in records],
              "tokens_per_s": statistics.mean(r["tokens_per_s"] for r in timed),
              "pairs_per_s": statistics.mean(r["pairs_per_s"] for r in timed),
              "mfu": statistics.mean(r["mfu"] for r in timed) if "mfu" in timed[0] else None,
              "peak_memory_gb": max(r["cuda_peak_memory_gb"] for r in records) if "cuda_peak_memory_gb" in records[0]
              else None,
              "reference_pass_s": round(reference_s, 2), "losses": [r["loss"] for r in records],
              "trainable_parameters": sum(p.numel() for p in policy.parameters() if p.requires_grad),
              "device": device_name()}
    del state
    release_memory()
    return result


def recipe_config(config: str, model_dir: Path, out_dir: str, *flags: str):
    return parse_settings(["--config", str(CONFIGS / config), "--model", str(model_dir), "--output-dir", out_dir,
                         "--device", target.device.type, "--no-progress", "--no-plot", *target.flags, *flags])


def phi2(args: argparse.Namespace) -> None:
    """Full fine-tuning: the first layout in bf16 and as the recipe's config has it (fp16 + GradScaler), then every
    layout in bf16 with gradient checkpointing. One model load: the runs reuse it (a reference pass per run)."""
    in_memory_phi2()
    pairs = ultrafeedback_like_pairs(target.batch * STEPS)
    with tempfile.TemporaryDirectory() as out:
        cfg = recipe_config("phi2_ultrafeedback.json", MODEL, out, "--precision", "bf16", "--no-gradient-checkpointing")
        policy, adapters = train.build_policy(cfg, target.device)
        # gradient checkpointing, once on, stays on: the other layouts run last, with it, against the first's
        first = args.layouts[0]
        runs = [(first, False, "bf16"), (first, False, "fp16")] + [(layout, True, "bf16") for layout in args.layouts]
        checkpointing = False
        for run, (layout, with_checkpointing, precision) in enumerate(runs):
            if with_checkpointing and not checkpointing:
                enable_gradient_checkpointing(policy)
                checkpointing = True
            flags = ["--precision", precision, "--layout", layout] + \
                (["--gradient-checkpointing"] if with_checkpointing else ["--no-gradient-checkpointing"])
            run_dir = f"{out}/{layout}-{precision}-{checkpointing}"
            cfg = recipe_config("phi2_ultrafeedback.json", MODEL, run_dir, *flags)
            # the first run times two steps after its warm-up, the others one: the part's time limit
            if not measured(lambda: time_steps(cfg, policy, adapters, pairs, "phi2",
                                               {"config": "phi2_ultrafeedback.json"}, steps=STEPS if run == 0 else 2),
                            {"part": "phi2", "layout": layout, "precision": precision,
                             "gradient_checkpointing": with_checkpointing}):
                policy.zero_grad(set_to_none=True)  # the failed step's gradients would add to the next run's


def measured(run, label: dict) -> bool:
    """Emit what `run()` returns; on a CUDA out-of-memory error emit `label` with the error and free what the failed
    run held (outside the handler, whose traceback keeps the run's frames and their tensors alive). False then."""
    try:
        emit(run())
        return True
    except torch.OutOfMemoryError as error:
        emit({**label, "error": f"out of memory: {str(error)[:200]}"})
    workspace_pool.clear()
    release_memory()
    return False


def lora(args: argparse.Namespace) -> None:
    """The LoRA recipe as its config has it: fp16 base, rank 16 on every linear layer, gradient checkpointing."""
    in_memory_phi2()
    pairs = ultrafeedback_like_pairs(target.batch * STEPS)
    with tempfile.TemporaryDirectory() as out:
        cfg = recipe_config("phi2_ultrafeedback_lora.json", MODEL, out)
        reset_peak_memory()
        policy, adapters = train.build_policy(cfg, target.device)
        emit(time_steps(cfg, policy, adapters, pairs, "lora", {"config": "phi2_ultrafeedback_lora.json"}))


def generate(args: argparse.Namespace) -> None:
    """Sampling tokens/s of the phi-2-sized model: the fp32 policy under the run's autocast (what online DPO and
    --eval-generate run) and bf16 weights (what generate.py loads on such a GPU)."""
    in_memory_phi2()
    device = target.device
    policy = train.load_model(parse_settings(["--model", str(MODEL)]), str(MODEL), device).eval()
    rows, prompt_length, new_tokens = target.generate_shape
    input_ids = torch.randint(0, target.eos, (rows, prompt_length), device=device)
    settings = dict(do_sample=True, temperature=0.7, top_p=0.9, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                    pad_token_id=target.eos, eos_token_id=target.eos)
    for label, dtype, context in (("fp32 weights, bf16 autocast", torch.float32, "bf16"),
                                  ("bf16 weights", torch.bfloat16, "fp32")):
        model = policy.to(dtype)
        for run in range(2):  # the first is a warm-up
            start = train.synced_clock(device)
            with torch.no_grad(), train.precision_autocast(context, device):
                out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **settings)
            seconds = train.synced_clock(device) - start
        emit({"part": "generate", "model": label, "rows": rows, "prompt_tokens": prompt_length,
              "new_tokens": int(out.shape[1] - prompt_length), "seconds": round(seconds, 3),
              "tokens_per_s": rows * (out.shape[1] - prompt_length) / seconds, "peak_memory_gb": peak_memory_gb()})


def in_memory_phi2() -> None:
    """train.py's loader hands out a random-init phi-2-sized model built on the device (in the dtype train.py asks
    for) instead of reading one from disk: what follows the load (dropout off, fused GELU, LoRA) is train.py's."""
    torch.manual_seed(0)
    config = transformers.PhiConfig(**target.model, attn_implementation="sdpa")
    with target.device:
        model = transformers.PhiForCausalLM(config)
    train.load_causal_lm = lambda name, *, dtype=torch.float32, device=None, quantization=None: model.to(dtype)


def profile(args: argparse.Namespace) -> None:
    """A padded bf16 step under torch.profiler (its tables printed), gradient-checkpointed on a GPU of less than
    100 GB (without, phi-2's step peaks at 78 GB), then the gradient-checkpointed step at larger micro-batches
    (fewer weight casts and gradient additions per step: the phi2 part times micro 4), timed."""
    in_memory_phi2()
    pairs = ultrafeedback_like_pairs(target.batch * 2)
    device, cuda = target.device, target.device.type == "cuda"
    checkpointed = cuda and torch.cuda.get_device_properties(device).total_memory < 100e9
    with tempfile.TemporaryDirectory() as out:
        cfg = recipe_config("phi2_ultrafeedback.json", MODEL, f"{out}/a", "--precision", "bf16",
                            "--layout", "padded",
                            "--gradient-checkpointing" if checkpointed else "--no-gradient-checkpointing")
        policy, adapters = train.build_policy(cfg, device)
        layout, collate = train.collator(cfg, target.eos, policy)

        def profiled_steps() -> dict:
            reference = train.reference_logps(cfg, policy, adapters, PreferenceData(train=pairs, eval=[]),
                                              list(range(len(pairs))), device=device, dist=DistInfo(),
                                              collate=collate, resumed=False, log=lambda *a, **k: None)["train"]
            state = train.build_state(cfg, policy, adapters, device=device, dist=DistInfo(), collate=collate,
                                      workspace_pairs=pairs, layout=layout)
            batch = target.batch
            batches = [PairBatch(pairs[i * batch:(i + 1) * batch],
                                 reference.select(range(i * batch, (i + 1) * batch))) for i in range(2)]
            emit({"part": "profile", "warmup_step": train.train_step(state, batches[0], cfg.lr)})
            activities = [torch.profiler.ProfilerActivity.CPU] + \
                ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
            with torch.profiler.profile(activities=activities) as prof:
                record = train.train_step(state, batches[1], cfg.lr)
            table = prof.key_averages()
            if cuda:
                print(table.table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=60), flush=True)
            print(table.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60), flush=True)
            return {"part": "profile", "gradient_checkpointing": checkpointed, "profiled_step": record}

        if not measured(profiled_steps, {"part": "profile", "gradient_checkpointing": checkpointed}):
            policy.zero_grad(set_to_none=True)
        release_memory()
        enable_gradient_checkpointing(policy)
        cfg = recipe_config("phi2_ultrafeedback.json", MODEL, f"{out}/b", "--precision", "bf16",
                            "--layout", "padded", "--gradient-checkpointing",
                            "--micro-batch-size", str(target.large_micro))
        measured(lambda: time_steps(cfg, policy, adapters, pairs, "phi2", {"config": "phi2_ultrafeedback.json"},
                                    steps=2),
                 {"part": "phi2", "layout": "padded", "precision": "bf16", "gradient_checkpointing": True,
                  "micro": target.large_micro})


def summary_lines(records: list[dict]) -> list[str]:
    """The report's table: one line per step measurement (phi2, lora), sampling run and equality check."""
    def gb(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f} GB"

    lines = []
    for r in records:
        if r.get("part") in ("phi2", "lora"):
            head = (f"{r['part']:5} {r['layout']:13} {r['precision']:4} gc={r['gradient_checkpointing']!s:5} "
                    f"micro={r.get('micro', '-')!s:2}")
            if "error" in r:
                lines.append(f"{head} {r['error']}")
                continue
            mfu = f"{r['mfu']:.3f}" if r["mfu"] is not None else "-"
            lines.append(f"{head} step {statistics.mean(r['step_s'][1:]):6.2f} s  {r['tokens_per_s']:9.0f} tok/s  "
                         f"MFU {mfu}  peak {gb(r['peak_memory_gb']):>8}  reference pass {r['reference_pass_s']} s")
        elif r.get("part") == "profile" and "error" in r:
            lines.append(f"profile gc={r['gradient_checkpointing']!s:5} {r['error']}")
        elif r.get("part") == "generate":
            lines.append(f"generate {r['model']:28} {r['tokens_per_s']:9.0f} new tok/s ({r['rows']} rows x "
                         f"{r['new_tokens']})  peak {gb(r['peak_memory_gb'])}")
        elif r.get("part") == "equality":
            lines.append(f"equality {r['precision']:4} loss diff {r['loss_abs_diff']:.2e}  log-prob rel diff "
                         f"{r['logps_max_rel_diff']:.2e}  grad rel error {r['grad_rel_error']:.2e}  cosine "
                         f"{r['grad_cosine']:.6f}")
    return lines


def read_results(path: str) -> list[dict]:
    """The records of a report's results.jsonl; a missing file or a line that is not JSON stops with one line."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as error:
        raise SystemExit(f"error: {path}: cannot read it ({error.strerror})") from None
    records = []
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise SystemExit(f"error: {path}, line {number}: not JSON ({error.msg})") from None
    return records


PARTS = ("equality", "phi2", "lora", "generate", "profile")


def main(argv: list[str] | None = None) -> None:
    global target
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=[*PARTS, "summary"])
    parser.add_argument("results", nargs="?", help="summary: the report's results.jsonl")
    parser.add_argument("--layouts", nargs="+", default=["padded", "shared_prompt"],
                        choices=["padded", "packed", "shared_prompt"],
                        help="phi2: the layouts to time in bf16 with gradient checkpointing (the first also "
                             "without it, in bf16 and fp16). Every layout's attention is mask-free (flash-capable); "
                             "the packed ones still call it pair by pair: one H200 measurement, before that change "
                             "and with cuDNN's attention, put shared_prompt at 21 s a step against padded's 5.5 s")
    parser.add_argument("--smoke", action="store_true",
                        help="run the part on the CPU with a tiny model and short pairs (the code paths only)")
    args = parser.parse_args(argv)
    if (args.part == "summary") != (args.results is not None):
        parser.error("summary takes the report's results.jsonl, and only summary takes a file")
    if args.smoke and args.part == "equality":
        parser.error("equality compares the CPU with a CUDA device: it has no --smoke")
    if args.part == "summary":
        print("\n".join(summary_lines(read_results(args.results))))
        return
    target = SMOKE if args.smoke else GPU
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("error: the GPU check needs a CUDA device (--smoke runs its code paths on the CPU)")
    transformers.utils.logging.disable_progress_bar()
    train.use_fast_cuda_kernels(target.device)  # as train.py's start (TF32, SDPA kernels)
    if args.part == "equality":
        for precision in ("fp32", "bf16", "fp16"):
            emit(compare_cpu_cuda(precision))
    else:
        {"phi2": phi2, "lora": lora, "generate": generate, "profile": profile}[args.part](args)


if __name__ == "__main__":
    main()
