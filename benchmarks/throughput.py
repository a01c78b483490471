"""DPO training throughput on the workload of ../shared/bench/WORKLOAD.md (sizes S and M).

    python benchmarks/throughput.py --size S                       # this library, every exact speed-up on
    python benchmarks/throughput.py --size S --preset plain         # the plain loop: padded batch, full logits
    python benchmarks/throughput.py --size S --preset plain --padding-free    # one technique on its own
    python benchmarks/throughput.py --size S --impl trl             # TRL's DPOTrainer (pip install -r benchmarks/requirements.txt)
    python benchmarks/throughput.py --size S --alternate 3 --runs dpo:all trl dpo:plain
                                    # each run in its own process, alternating; prints the medians

Each run prints one JSON line: pairs_per_s (pairs of the timed optimizer steps over their time; the first
step is a warm-up), peak_rss_mb (ru_maxrss of the process), step_s, the loss of every step, the useful
FLOPs of the timed steps as WORKLOAD.md counts them, and the fp32 matmul peak measured in the same process
(best of several 1024^3 matmuls, before and after training), with the utilisation useful / (time x peak).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
from dpo.memory import tune_cpu_allocator  # noqa: E402

# the same allocator settings as train.py, for every implementation alike (before torch is imported)
ALLOCATOR_SETTINGS = tune_cpu_allocator()

import torch  # noqa: E402

SIZES = {  # hidden, layers, max_length, micro, accum, timed steps
    "S": dict(hidden=128, layers=2, max_length=256, micro=4, accum=4, steps=2),
    "M": dict(hidden=256, layers=4, max_length=512, micro=4, accum=8, steps=2),
}
VOCAB = 51200
EOS = 50256
TECHNIQUES = ("completion_only", "fused_lm_head", "fused_gelu", "padding_free", "prompt_sharing", "length_grouped",
              "precompute_ref", "gradient_checkpointing", "compile", "recompute_softmax")
PRESETS = {
    "plain": dict(completion_only=False, fused_lm_head=False, fused_gelu=False, padding_free=False,
                  prompt_sharing=False, length_grouped=False, precompute_ref=True, gradient_checkpointing=False,
                  compile=False, recompute_softmax=False),
    "all": dict(completion_only=True, fused_lm_head=True, fused_gelu=True, padding_free=True, prompt_sharing=True,
                length_grouped=True, precompute_ref=True, gradient_checkpointing=False, compile=False,
                recompute_softmax=False),
}


def shared_dir() -> Path:
    path = ROOT.parent / "shared"
    if not path.is_dir():
        sys.exit(f"error: {path.name}/ (tokenizer and data of WORKLOAD.md) not found beside the repository")
    return path


# ---------------------------------------------------------------------------------------------------
# The workload


def workload_texts(size: dict) -> list[dict]:
    """The first micro x accum x (steps + 1) rows of pairs.jsonl, rendered as WORKLOAD.md says (EOS not included)."""
    from dpo.templates import format_prompt

    count = size["micro"] * size["accum"] * (size["steps"] + 1)
    rows = []
    with open(shared_dir() / "data" / "alpacaeval-phi2-prefs" / "pairs.jsonl") as handle:
        for line in handle:
            record = json.loads(line)
            rows.append({"prompt": format_prompt(record["prompt"]), "chosen": " " + record["chosen"].strip(),
                         "rejected": " " + record["rejected"].strip()})
            if len(rows) == count:
                break
    return rows


def load_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(shared_dir() / "tokenizers" / "gpt2")


def tokenized_pairs(texts: list[dict], tokenizer, max_length: int):
    """prompt ids, response ids + EOS; each sequence keeps its first max_length tokens."""
    from dpo.data import TokenizedPair

    pairs = []
    for row, text in enumerate(texts):
        prompt, chosen, rejected = tokenizer([text["prompt"], text["chosen"], text["rejected"]],
                                             add_special_tokens=False)["input_ids"]
        prompt = prompt[:max_length]
        budget = max_length - len(prompt)
        pairs.append(TokenizedPair(prompt, (chosen + [EOS])[:budget], (rejected + [EOS])[:budget], row))
    return pairs


def build_model(size: dict):
    from transformers import PhiConfig, PhiForCausalLM

    torch.manual_seed(0)
    hidden = size["hidden"]
    config = PhiConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=4 * hidden,
                       num_hidden_layers=size["layers"], num_attention_heads=hidden // 32,
                       max_position_embeddings=2048, partial_rotary_factor=0.4, resid_pdrop=0.0, embd_pdrop=0.0,
                       attention_dropout=0.0, bos_token_id=EOS, eos_token_id=EOS)
    return PhiForCausalLM(config)


def block_weight_count(model) -> int:
    """N_layers of WORKLOAD.md: elements of the weight matrices of the transformer blocks."""
    return sum(p.numel() for name, p in model.model.layers.named_parameters() if p.ndim == 2)


def useful_flops(pairs, model, precomputed_reference: bool) -> float:
    n_layers = block_weight_count(model)
    d_v = model.config.hidden_size * model.config.vocab_size
    tokens = sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    # a response token is scored when a position predicts it: all but a first token after an empty prompt
    scored = sum(len(r) - (0 if p.prompt_ids else 1) for p in pairs for r in (p.chosen_ids, p.rejected_ids) if r)
    per_token, per_scored = (6, 6) if precomputed_reference else (8, 8)
    return per_token * n_layers * tokens + per_scored * d_v * scored


def matmul_peak_gflops(repeats: int = 30, n: int = 1024) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    torch.mm(a, b, out=out)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ---------------------------------------------------------------------------------------------------
# This library


def run_dpo(size: dict, flags: dict) -> dict:
    import functools

    from dpo.activations import fuse_gelu
    from dpo.data import collate_pairs
    from dpo.logprobs import SequenceScorer, disable_dropout
    from dpo.loss import LossConfig, PreferenceLogps, compute_loss
    from dpo.packing import collate_packed, collate_shared_prompt, group_by_length
    from dpo.reference import compute_reference_logps

    pairs = tokenized_pairs(workload_texts(size), load_tokenizer(), size["max_length"])
    policy = build_model(size)
    disable_dropout(policy)
    if flags["fused_gelu"]:
        fuse_gelu(policy)
    if flags["prompt_sharing"]:
        collate = collate_shared_prompt
    elif flags["padding_free"]:
        collate = collate_packed
    else:
        collate = functools.partial(collate_pairs, pad_id=EOS)
    scorer_kwargs = dict(completion_only=flags["completion_only"], fused_lm_head=flags["fused_lm_head"],
                         recompute_softmax=flags["recompute_softmax"])
    if flags["vocab_chunk"]:
        scorer_kwargs["vocab_chunk"] = flags["vocab_chunk"]
    micro, accum, batch = size["micro"], size["accum"], size["micro"] * size["accum"]

    start = time.perf_counter()
    reference_scorer, reference = None, None
    if flags["precompute_ref"]:
        # step 0: the policy is the reference, so its log-probs are the reference ones
        reference = compute_reference_logps(SequenceScorer(policy, **scorer_kwargs), pairs, micro_batch_size=micro,
                                            collate=collate, device=torch.device("cpu"),
                                            autocast=lambda: torch.autocast("cpu", enabled=False))
    else:
        reference_model = copy.deepcopy(policy).eval().requires_grad_(False)
        reference_scorer = SequenceScorer(reference_model, **scorer_kwargs)
    reference_s = time.perf_counter() - start

    if flags["gradient_checkpointing"]:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy.train()
    if flags["compile"]:
        policy.base_model.compile()
    scorer = SequenceScorer(policy, **scorer_kwargs)
    scorer.reserve_workspace(pairs, micro)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=3e-5, weight_decay=0.0, fused=True)
    loss_config = LossConfig(loss_type="sigmoid", beta=0.1)

    step_s, losses = [], []
    for step in range(size["steps"] + 1):
        t0 = time.perf_counter()
        ids = list(range(step * batch, (step + 1) * batch))
        if flags["length_grouped"]:
            micro_batches = group_by_length(ids, pairs, micro)
        else:
            micro_batches = [ids[k * micro:(k + 1) * micro] for k in range(accum)]
        step_loss = 0.0
        for micro_ids in micro_batches:
            logps = scorer(collate([pairs[i] for i in micro_ids]))
            n = len(micro_ids)
            if reference is not None:
                ref_chosen, ref_rejected = reference.take(micro_ids, torch.device("cpu"))
            else:
                with torch.no_grad():
                    ref = reference_scorer(collate([pairs[i] for i in micro_ids]))
                ref_chosen, ref_rejected = ref.sum[:n], ref.sum[n:]
            out = compute_loss(PreferenceLogps(policy_chosen_logps=logps.sum[:n], policy_rejected_logps=logps.sum[n:],
                                               reference_chosen_logps=ref_chosen,
                                               reference_rejected_logps=ref_rejected,
                                               chosen_lengths=logps.count[:n], rejected_lengths=logps.count[n:],
                                               state={}), loss_config)
            loss = out.losses.sum() / batch
            loss.backward()
            step_loss += loss.item()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_s.append(time.perf_counter() - t0)
        losses.append(step_loss)
    timed_pairs = pairs[batch:]
    return dict(step_s=step_s, losses=losses, reference_s=reference_s,
                useful_flops=useful_flops(timed_pairs, policy, flags["precompute_ref"]), timed_pairs=len(timed_pairs))


# ---------------------------------------------------------------------------------------------------
# TRL


def run_trl(size: dict, flags: dict) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    texts = workload_texts(size)
    tokenizer = load_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    model = build_model(size)
    ends, losses = [], []
    marks = {}

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            marks["train_begin"] = time.perf_counter()

        def on_step_begin(self, args, state, control, **kwargs):
            marks.setdefault("first_step", time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    with tempfile.TemporaryDirectory() as out_dir:
        config = DPOConfig(output_dir=out_dir, per_device_train_batch_size=size["micro"],
                           gradient_accumulation_steps=size["accum"], max_steps=size["steps"] + 1,
                           learning_rate=3e-5, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                           beta=0.1, loss_type=["sigmoid"], max_length=size["max_length"],
                           precompute_ref_log_probs=flags["precompute_ref"],
                           gradient_checkpointing=flags["gradient_checkpointing"], bf16=False, fp16=False,
                           use_cpu=True, logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True,
                           dataloader_num_workers=0, train_sampling_strategy="sequential", seed=0)
        start = time.perf_counter()  # the trainer precomputes the reference log-probs from here on
        trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(texts),
                             processing_class=tokenizer, callbacks=[Clock()])
        trainer.train()
    # step k (k >= 1) runs from the end of step k - 1 to its own end; step 0 from its beginning
    step_s = [ends[0] - marks["first_step"]] + [b - a for a, b in zip(ends, ends[1:])]
    pairs = tokenized_pairs(texts, tokenizer, size["max_length"])
    batch = size["micro"] * size["accum"]
    return dict(step_s=step_s, losses=losses, reference_s=marks["first_step"] - start,
                useful_flops=useful_flops(pairs[batch:], model, flags["precompute_ref"]),
                timed_pairs=len(pairs) - batch)


# ---------------------------------------------------------------------------------------------------
# Driver


def run_once(args: argparse.Namespace, flags: dict) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    size = SIZES[args.size]
    peak_before = matmul_peak_gflops()
    result = (run_trl if args.impl == "trl" else run_dpo)(size, flags)
    peak_after = matmul_peak_gflops()
    timed = sum(result["step_s"][1:])
    peak = max(peak_before, peak_after)
    achieved = result["useful_flops"] / timed / 1e9
    return {"impl": args.impl, "size": args.size, "config": args.label or args.impl,
            "pairs_per_s": result["timed_pairs"] / timed, "peak_rss_mb": round(peak_rss_mb(), 1),
            "step_s": [round(s, 3) for s in result["step_s"]], "losses": result["losses"],
            "reference_s": round(result["reference_s"], 3), "useful_gflop": round(result["useful_flops"] / 1e9, 2),
            "useful_gflops": round(achieved, 2), "matmul_peak_gflops": round(peak, 2),
            "matmul_peak_gflops_before_after": [round(peak_before, 2), round(peak_after, 2)],
            "utilisation": round(achieved / peak, 4), "threads": torch.get_num_threads(),
            "allocator": {"THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE"), "set_here": ALLOCATOR_SETTINGS},
            "flags": flags if args.impl == "dpo" else {k: flags[k] for k in ("precompute_ref", "gradient_checkpointing")}}


def run_spec(spec: str) -> tuple[str, list[str]]:
    """'trl' | 'dpo:PRESET[+flag+no_flag...]' -> (label, command-line arguments)."""
    if spec == "trl":
        return spec, ["--impl", "trl"]
    impl, _, rest = spec.partition(":")
    if impl != "dpo":
        raise SystemExit(f"error: run '{spec}' is not 'trl' or 'dpo:PRESET[+flag...]'")
    preset, *extra = (rest or "all").split("+")
    argv = ["--impl", "dpo", "--preset", preset]
    for flag in extra:
        argv.append("--no-" + flag[3:].replace("_", "-") if flag.startswith("no_") else "--" + flag.replace("_", "-"))
    return spec, argv


def alternate(args: argparse.Namespace) -> None:
    specs = [run_spec(spec) for spec in args.runs]
    results: dict[str, list[dict]] = {label: [] for label, _ in specs}
    sink = open(args.results, "a") if args.results else None
    for round_index in range(args.alternate):
        for label, argv in specs:
            command = [sys.executable, str(Path(__file__).resolve()), "--size", args.size, "--label", label, *argv]
            if args.threads:
                command += ["--threads", str(args.threads)]
            done = subprocess.run(command, capture_output=True, text=True)
            lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
            if done.returncode != 0 or not lines:
                print(json.dumps({"config": label, "error": done.stderr.strip().splitlines()[-3:]}), flush=True)
                continue
            record = json.loads(lines[-1])
            record["round"] = round_index
            results[label].append(record)
            print(json.dumps(record), flush=True)
            if sink:
                sink.write(json.dumps(record) + "\n")
                sink.flush()
    print(f"\nmedians over {args.alternate} alternating rounds, size {args.size}:")
    print(f"{'config':40} {'pairs/s':>9} {'peak RSS MB':>12} {'util':>7} {'peak GF/s':>10} {'runs':>5}")
    for label, records in results.items():
        if not records:
            print(f"{label:40} failed")
            continue
        median = lambda key: statistics.median(r[key] for r in records)  # noqa: E731
        print(f"{label:40} {median('pairs_per_s'):9.3f} {median('peak_rss_mb'):12.0f} {median('utilisation'):7.3f} "
              f"{median('matmul_peak_gflops'):10.1f} {len(records):5d}")


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="S")
    parser.add_argument("--impl", choices=("dpo", "trl"), default="dpo")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="all",
                        help="starting point of the technique flags; the flags below override it")
    for name in TECHNIQUES:
        parser.add_argument("--" + name.replace("_", "-"), dest=name, action=argparse.BooleanOptionalAction,
                            default=None)
    parser.add_argument("--vocab-chunk", type=int, default=0, help="fused LM head: vocabulary tile (0: default)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--label", default="", help="name of this configuration in the output")
    parser.add_argument("--alternate", type=int, default=0,
                        help="run each of --runs this many times, alternating, each in its own process")
    parser.add_argument("--runs", nargs="+", default=["dpo:all", "trl"],
                        help="configurations for --alternate: trl, dpo:PRESET, dpo:PRESET+flag+no_flag")
    parser.add_argument("--results", default="", help="--alternate: append every JSON line to this file")
    args = parser.parse_args(argv)
    flags = dict(PRESETS[args.preset])
    flags.update({name: getattr(args, name) for name in TECHNIQUES if getattr(args, name) is not None})
    flags["vocab_chunk"] = args.vocab_chunk
    return args, flags


def main(argv: list[str] | None = None) -> None:
    args, flags = parse_args(argv)
    if args.alternate:
        alternate(args)
        return
    print(json.dumps(run_once(args, flags)), flush=True)


if __name__ == "__main__":
    main()
