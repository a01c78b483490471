"""DPO training throughput: train.py's own training step, timed on the workload of benchmarks/README.md.

    python benchmarks/throughput.py --size S                          # train.py's step with its defaults
    python benchmarks/throughput.py --size S --layout shared_prompt    # with any train.py flag
    python benchmarks/throughput.py --size S --preset plain            # the plain loop: padded, full logits
    python benchmarks/throughput.py --size S --impl trl                # TRL's DPOTrainer (pip install -e ".[bench]")
    python benchmarks/throughput.py --size S --alternate 3 --runs trl dpo "dpo --layout packed" "dpo:plain"
                                    # each run in its own process, alternating; prints the medians
    python benchmarks/throughput.py --model smollm2-135m-instruct --alternate 2 --runs trl dpo
                                    # a real model, as `python train.py --model NAME` loads it (MODEL_SIZE)

This library's runs build the model, the reference log-probs, the optimizer and the step with train.py's
functions (`build_policy`, `reference_logps`, `build_state`, `train_step`) and train.py's settings: its defaults,
the workload's sizes, and the train.py flags given that concern the step (STEP_SETTINGS: the loss, the log-prob
computation, the layout and the other speed switches, precision, the optimizer's); the workload fixes the data,
its truncation, the batch, the learning rate and the schedule, so the other train.py flags are refused.

Each run prints one JSON line: pairs_per_s (pairs of the timed optimizer steps over their time; the first step
is a warm-up), peak_rss_mb (ru_maxrss of the process), step_s, the loss of every step, the layout chosen, the
useful FLOPs of the timed steps as benchmarks/README.md counts them, and the fp32 matmul peak measured in the
same process (best of several 1024^3 matmuls, before and after training), with the utilisation
useful / (time x peak).

--dataset takes any preference file or source train.py reads (default: the AlpacaEval pairs of ../shared where
present, else the demo's pairs); --tokenizer any tokenizer directory (default: ../shared's GPT-2 where present,
else the demo model's).

--model NAME (any model train.py's --model takes: a shipped GGUF model's name, a GGUF file, a directory) runs the
real-model workload instead of the synthetic Phi model: the model and its tokenizer loaded by train.py's loaders,
the pairs made by train.py's build_pairs with train.py's defaults (--template auto: the model's chat template when
it ships one; --max-length MODEL_SIZE's, --max-prompt-length half of it, keep_end), the first ones in file order.
TRL gets the same rendered texts and the same model; a TRL run checks that its tokenization gives the same ids.
--steps N overrides the number of timed steps (a smoke run: --steps 1).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import shlex
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

import train  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402

from dpo.batches import PairBatch  # noqa: E402
from dpo.train_settings import TrainSettings, build_parser, parse_settings  # noqa: E402
from dpo.data import (BUILTIN_SOURCES, DataError, RowError, TokenizedPair, build_pairs, load_records,  # noqa: E402
                      to_example)
from dpo.distributed import DistInfo  # noqa: E402
from dpo.errors import UserError  # noqa: E402
from dpo.flops import FlopCounter  # noqa: E402
from dpo.logprobs import ScoringSettings  # noqa: E402
from dpo.lora import peft_config  # noqa: E402
from dpo.loss import LossSettings  # noqa: E402
from dpo.memory import tune_cpu_allocator  # noqa: E402
from dpo.modeling import DEMO_MODEL_DIR, load_causal_lm  # noqa: E402
from dpo.modeling import load_tokenizer as load_model_tokenizer  # noqa: E402
from dpo.splits import PreferenceData  # noqa: E402
from dpo.prompts import encode_texts, special_ids  # noqa: E402
from dpo.settings import setting_fields  # noqa: E402

SHARED = ROOT.parent / "shared"
SIZES = {  # hidden, layers, max_length, micro, accum, timed steps (benchmarks/README.md, "The workload")
    "S": dict(hidden=128, layers=2, max_length=256, micro=4, accum=4, steps=2),
    "M": dict(hidden=256, layers=4, max_length=512, micro=4, accum=8, steps=2),
}
# --model: a real model's workload (benchmarks/README.md, "SmolLM2-135M-Instruct"):
# max_length, micro, accum, timed steps
MODEL_SIZE = dict(max_length=512, micro=2, accum=2, steps=2)
VOCAB = 51200
LR = 3e-5
# named sets of train.py flags; "plain" is the loop without the exact speed-ups
PRESETS = {"plain": ["--no-completion-only", "--no-fused-lm-head", "--no-fused-gelu", "--no-group-by-length",
                     "--layout", "padded"]}
# LoRA's settings: the adapters (both implementations take them, TRL as the same peft.LoraConfig)
LORA_SETTINGS = {"lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_modules_to_save"}
STEP_SETTINGS = ({s.name for s in setting_fields(LossSettings)} | {s.name for s in setting_fields(ScoringSettings)}
                 | LORA_SETTINGS
                 | {"micro_batch_size", "precision", "optimizer", "weight_decay", "adam_betas", "max_grad_norm", "on_nan",
                    "precompute_ref", "fused_gelu", "layout", "group_by_length", "gradient_checkpointing", "compile"})


def default_dataset() -> str:
    pairs = SHARED / "data" / "alpacaeval-phi2-prefs" / "pairs.jsonl"
    return str(pairs) if pairs.is_file() else "demo"


def default_tokenizer() -> str:
    gpt2 = SHARED / "tokenizers" / "gpt2"
    return str(gpt2) if gpt2.is_dir() else str(DEMO_MODEL_DIR)


# ---------------------------------------------------------------------------------------------------
# The workload


def workload_texts(size: dict, dataset: str, tokenizer) -> list[dict]:
    """The first micro x accum x (steps + 1) usable rows of `dataset`, in file order, rendered with the recipe
    template as training renders them (prompt, " " + response; EOS is added as a token)."""
    count = size["micro"] * size["accum"] * (size["steps"] + 1)
    records, description = load_records(dataset, "train" if dataset in BUILTIN_SOURCES else None)
    texts = []
    for row, record in enumerate(records):
        try:
            example = to_example(record, row, tokenizer=tokenizer)
        except RowError:
            continue
        texts.append({"prompt": example.prompt, "chosen": example.chosen, "rejected": example.rejected})
        if len(texts) == count:
            return texts
    raise DataError(f"{description}: {len(texts)} usable pairs, the workload needs {count}")


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    return tokenizer


def tokenized_pairs(texts: list[dict], tokenizer, max_length: int) -> list[TokenizedPair]:
    """Prompt ids, response ids + EOS; each sequence keeps its first max_length tokens."""
    eos = special_ids(tokenizer).eos
    pairs = []
    for row, text in enumerate(texts):
        prompt, chosen, rejected = encode_texts(tokenizer, [text["prompt"], text["chosen"], text["rejected"]])
        prompt = prompt[:max_length]
        budget = max_length - len(prompt)
        pairs.append(TokenizedPair(prompt, (chosen + [eos])[:budget], (rejected + [eos])[:budget], row))
    return pairs


def model_workload(size: dict, dataset: str, model: str) -> tuple[list[dict], list[TokenizedPair], object]:
    """The real-model workload (--model): the first micro x accum x (steps + 1) pairs that train.py's build_pairs
    keeps of `dataset`, in file order, made as `python train.py --model MODEL` makes them (the model's tokenizer,
    train.py's template and truncation settings at the workload's max_length); their rendered texts (TRL's input);
    the tokenizer."""
    cfg = workload_config(size, model, Path("out"), [])
    tokenizer = load_model_tokenizer(model)
    count = size["micro"] * size["accum"] * (size["steps"] + 1)
    records, description = load_records(dataset, "train" if dataset in BUILTIN_SOURCES else None)
    lengths = dict(max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
                   truncation_mode=cfg.truncation_mode, template=cfg.template)
    end = count
    while True:  # the first rows only: rendering and encoding all of a large file would take longer than a step
        pairs, _ = build_pairs(records[:end], tokenizer, source=description, **lengths)
        if len(pairs) >= count or end >= len(records):
            break
        end *= 2
    if len(pairs) < count:
        raise DataError(f"{description}: {len(pairs)} usable pairs, the workload needs {count}")
    pairs = pairs[:count]
    examples = [to_example(records[p.row], p.row, template=cfg.template, tokenizer=tokenizer) for p in pairs]
    texts = [{"prompt": e.prompt, "chosen": e.chosen, "rejected": e.rejected} for e in examples]
    return texts, pairs, tokenizer


def build_model(size: dict, eos: int):
    from transformers import PhiConfig, PhiForCausalLM

    torch.manual_seed(0)
    hidden = size["hidden"]
    config = PhiConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=4 * hidden,
                       num_hidden_layers=size["layers"], num_attention_heads=hidden // 32,
                       max_position_embeddings=2048, partial_rotary_factor=0.4, resid_pdrop=0.0, embd_pdrop=0.0,
                       attention_dropout=0.0, bos_token_id=eos, eos_token_id=eos)
    return PhiForCausalLM(config)


def useful_flops(pairs, model, precomputed_reference: bool) -> float:
    """benchmarks/README.md's count (dpo.flops, the count train.py's MFU metric uses): a weight that does not
    train (LoRA's base) counts 4 FLOPs per token instead of 6."""
    return FlopCounter.of(model).pairs(pairs, reference_forward=not precomputed_reference)


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
# This library: train.py's parts


def workload_config(size: dict, model_dir: Path | str, out_dir: Path, train_flags: list[str]) -> TrainSettings:
    """train.py's settings: its defaults, the workload's sizes, then the given train.py flags."""
    workload = ["--model", str(model_dir), "--output-dir", str(out_dir), "--batch-size",
                str(size["micro"] * size["accum"]), "--micro-batch-size", str(size["micro"]), "--lr", str(LR),
                "--max-length", str(size["max_length"]), "--device", "cpu", "--no-progress", "--no-plot"]
    return parse_settings(workload + train_flags)


def run_dpo(size: dict, pairs: list[TokenizedPair], pad_id: int, train_flags: list[str], model: str = "") -> dict:
    """train.py's step on `model` (a name train.py's --model takes), or on the workload's Phi model (saved here)."""
    transformers.utils.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, out_dir = model or Path(tmp) / "model", Path(tmp) / "run"
        if not model:
            build_model(size, pad_id).save_pretrained(model_dir)
        cfg = workload_config(size, model_dir, out_dir, train_flags)
        out_dir.mkdir()
        device, dist = torch.device("cpu"), DistInfo()
        start = time.perf_counter()
        policy, adapters = train.build_policy(cfg, device)
        layout, collate = train.collator(cfg, pad_id, policy)
        every = list(range(len(pairs)))
        reference = train.reference_logps(cfg, policy, adapters, PreferenceData(train=pairs, eval=[]), every,
                                          device=device, dist=dist, collate=collate, resumed=False,
                                          log=lambda *a, **k: None)
        state = train.build_state(cfg, policy, adapters, device=device, dist=dist, collate=collate,
                                  workspace_pairs=pairs, layout=layout)
        reference_s = time.perf_counter() - start
        batch = cfg.batch_size
        step_s, losses = [], []
        for step in range(size["steps"] + 1):
            ids = list(range(step * batch, (step + 1) * batch))
            step_reference = reference["train"].select(ids) if reference["train"] is not None else None
            t0 = time.perf_counter()
            record = train.train_step(state, PairBatch([pairs[i] for i in ids], step_reference), LR)
            step_s.append(time.perf_counter() - t0)
            losses.append(record["loss"])
        timed = pairs[batch:]
        return dict(step_s=step_s, losses=losses, reference_s=reference_s, timed_pairs=len(timed),
                    useful_flops=useful_flops(timed, policy, reference["train"] is not None),
                    layout=layout, settings=changed_settings(cfg))


def changed_settings(cfg: TrainSettings) -> dict:
    """The batch, and the step's settings that differ from `python train.py`'s defaults."""
    defaults, settings = TrainSettings().to_dict(), cfg.to_dict()
    return {"batch_size": cfg.batch_size,
            **{k: v for k, v in settings.items() if k in STEP_SETTINGS and v != defaults[k]}}


# ---------------------------------------------------------------------------------------------------
# TRL


def run_trl(size: dict, texts: list[dict], tokenizer, pairs: list[TokenizedPair], eos: int,
            train_flags: list[str], model_name: str = "") -> dict:
    """TRL's DPOTrainer on the workload (`model_name`: the real model, loaded as train.py loads it); with --lora-*
    flags, given the same peft.LoraConfig this library builds (its reference is then the base with the adapters
    off, as here). It must train on this library's token ids (check_trl_ids)."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    model = load_causal_lm(model_name) if model_name else build_model(size, eos)
    cfg = workload_config(size, model_name or Path("model"), Path("out"), train_flags)
    if cfg.lora.enabled:  # the adapters this library starts from: the same config, the same seed
        from peft import get_peft_model

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model = get_peft_model(model, peft_config(cfg.lora))
    lora = cfg.lora
    ends, losses = [], []
    marks = {}

    class Clock(TrainerCallback):
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
                           learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                           beta=0.1, loss_type=["sigmoid"], max_length=size["max_length"],
                           precompute_ref_log_probs=True, bf16=False, fp16=False, use_cpu=True, logging_steps=1,
                           save_strategy="no", report_to=[], disable_tqdm=True, dataloader_num_workers=0,
                           train_sampling_strategy="sequential", seed=0,
                           gradient_checkpointing=False)  # the workload's (TRL 1.16's DPOConfig turns it on)
        start = time.perf_counter()  # the trainer precomputes the reference log-probs from here on
        trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(texts),
                             processing_class=tokenizer, callbacks=[Clock()])
        check_trl_ids(trainer.train_dataset, pairs, size["max_length"])
        trainer.train()
    # step k (k >= 1) runs from the end of step k - 1 to its own end; step 0 from its beginning
    step_s = [ends[0] - marks["first_step"]] + [b - a for a, b in zip(ends, ends[1:])]
    batch = size["micro"] * size["accum"]
    return dict(step_s=step_s, losses=losses, reference_s=marks["first_step"] - start,
                useful_flops=useful_flops(pairs[batch:], model.get_base_model() if lora.enabled else model, True),
                timed_pairs=len(pairs) - batch, trl_config={"gradient_checkpointing": config.gradient_checkpointing})


def check_trl_ids(dataset, pairs: list[TokenizedPair], max_length: int) -> None:
    """DataError unless TRL trains on this library's token ids: its tokenization of the texts, cut as its collator
    cuts them (prompt + response keeps its first max_length tokens), equals the workload's pairs."""
    if len(dataset) != len(pairs):
        raise DataError(f"TRL kept {len(dataset)} of the workload's {len(pairs)} pairs")
    for index, (row, pair) in enumerate(zip(dataset, pairs)):
        budget = max_length - len(row["prompt_ids"])
        theirs = (row["prompt_ids"], row["chosen_ids"][:budget], row["rejected_ids"][:budget])
        if theirs != (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids):
            raise DataError(f"pair {index} (row {pair.row}): TRL's token ids differ from this library's")


# ---------------------------------------------------------------------------------------------------
# Driver


def run_once(args: argparse.Namespace, train_flags: list[str]) -> dict:
    allocator = tune_cpu_allocator()  # as train.py's command line does, before the first tensor
    if args.threads:
        torch.set_num_threads(args.threads)
    size = workload_size(args)
    if args.model:
        texts, pairs, tokenizer = model_workload(size, args.dataset, args.model)
    else:
        tokenizer = load_tokenizer(args.tokenizer)
        texts = workload_texts(size, args.dataset, tokenizer)
        pairs = tokenized_pairs(texts, tokenizer, size["max_length"])
    eos = special_ids(tokenizer).eos
    peak_before = matmul_peak_gflops()
    if args.impl == "trl":
        result = run_trl(size, texts, tokenizer, pairs, eos, train_flags, args.model)
    else:
        result = run_dpo(size, pairs, tokenizer.pad_token_id if args.model else eos, train_flags, args.model)
    peak_after = matmul_peak_gflops()
    timed = sum(result["step_s"][1:])
    peak = max(peak_before, peak_after)
    achieved = result["useful_flops"] / timed / 1e9
    record = {"impl": args.impl, "size": args.size, "model": args.model or "phi (random init, --size)",
              "config": args.label or " ".join([args.impl, *train_flags]),
              "pairs_per_s": result["timed_pairs"] / timed, "peak_rss_mb": round(peak_rss_mb(), 1),
              "step_s": [round(s, 3) for s in result["step_s"]], "losses": result["losses"],
              "reference_s": round(result["reference_s"], 3), "useful_gflop": round(result["useful_flops"] / 1e9, 2),
              "useful_gflops": round(achieved, 2), "matmul_peak_gflops": round(peak, 2),
              "matmul_peak_gflops_before_after": [round(peak_before, 2), round(peak_after, 2)],
              "utilisation": round(achieved / peak, 4), "threads": torch.get_num_threads(),
              "timed_pairs": result["timed_pairs"], "dataset": args.dataset,
              "tokenizer": args.model or args.tokenizer,
              "allocator": {"THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE"),
                            "set_here": allocator}}
    if "trl_config" in result:
        record["trl_config"] = result["trl_config"]
    if "settings" in result:
        record["train_flags"] = train_flags
        record["layout"] = result["layout"]
        record["settings"] = result["settings"]
    return record


def workload_size(args: argparse.Namespace) -> dict:
    """The workload's sizes: --model's (MODEL_SIZE) or --size's, with --steps timed steps if given."""
    size = dict(MODEL_SIZE if args.model else SIZES[args.size])
    return {**size, "steps": args.steps or size["steps"]}


def workload_argv(args: argparse.Namespace) -> list[str]:
    """This script's options that define the workload, for the runs --alternate starts."""
    argv = ["--model", args.model] if args.model else ["--size", args.size, "--tokenizer", args.tokenizer]
    return argv + ["--dataset", args.dataset] + (["--steps", str(args.steps)] if args.steps else [])


def run_spec(spec: str) -> tuple[str, list[str]]:
    """'trl' | 'dpo[:PRESET] [train.py flags]' -> (label, command-line arguments of this script)."""
    words = shlex.split(spec)
    if not words:
        raise SystemExit("error: an empty run in --runs")
    impl, _, preset = words[0].partition(":")
    if impl == "trl" and not preset:
        return spec, ["--impl", "trl", *words[1:]]
    if impl != "dpo" or (preset and preset not in PRESETS):
        raise SystemExit(f"error: run {spec!r} is not 'trl' or 'dpo[:{'|'.join(PRESETS)}] [train.py flags]'")
    return spec, ["--impl", "dpo", *(["--preset", preset] if preset else []), *words[1:]]


def alternate(args: argparse.Namespace) -> None:
    specs = [run_spec(spec) for spec in args.runs]
    results: dict[str, list[dict]] = {label: [] for label, _ in specs}
    sink = open(args.results, "a") if args.results else None
    for round_index in range(args.alternate):
        for label, argv in specs:
            command = [sys.executable, str(Path(__file__).resolve()), *workload_argv(args), "--label", label, *argv]
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
    print(f"\nmedians over {args.alternate} alternating rounds, {args.model or 'size ' + args.size}:")
    print(f"{'config':44} {'pairs/s':>9} {'peak RSS MB':>12} {'util':>7} {'peak GF/s':>10} {'runs':>5}")
    for label, records in results.items():
        if not records:
            print(f"{label:44} failed")
            continue
        median = lambda key: statistics.median(r[key] for r in records)  # noqa: E731
        print(f"{label:44} {median('pairs_per_s'):9.3f} {median('peak_rss_mb'):12.0f} {median('utilisation'):7.3f} "
              f"{median('matmul_peak_gflops'):10.1f} {len(records):5d}")
    print("\nlosses of each step, first round (every implementation trains on the same pairs and ids):")
    for label, records in results.items():
        if records:
            print(f"{label:44} {' '.join(f'{loss:.6f}' for loss in records[0]['losses'])}")


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """This script's own options, and the rest: train.py flags (checked by train.py's parser)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Any other option is a train.py flag (python train.py --help).")
    parser.add_argument("--size", choices=sorted(SIZES), help="the synthetic Phi model's workload (default: S)")
    parser.add_argument("--model", default="",
                        help="a real model, any name train.py's --model takes (smollm2-135m-instruct): its workload")
    parser.add_argument("--steps", type=int, default=0, help="timed steps (0: the workload's)")
    parser.add_argument("--impl", choices=("dpo", "trl"), default="dpo")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="a named set of train.py flags, before the others")
    parser.add_argument("--dataset", default=default_dataset(), help="preference data (default: %(default)s)")
    parser.add_argument("--tokenizer", help=f"tokenizer directory of the Phi workload (default: {default_tokenizer()}; "
                                            "--model: the model's own)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--label", default="", help="name of this configuration in the output")
    parser.add_argument("--alternate", type=int, default=0,
                        help="run each of --runs this many times, alternating, each in its own process")
    parser.add_argument("--runs", nargs="+", default=["dpo", "trl"],
                        help="configurations for --alternate: 'trl', 'dpo', 'dpo:plain', 'dpo --layout packed'")
    parser.add_argument("--results", default="", help="--alternate: append every JSON line to this file")
    args, train_flags = parser.parse_known_args(argv)
    if args.threads < 0 or args.alternate < 0 or args.steps < 0:
        parser.error("--threads, --alternate and --steps must be >= 0")
    if args.model and (args.size or args.tokenizer):
        parser.error("--size and --tokenizer define the Phi workload; --model runs the model's own (MODEL_SIZE)")
    if not args.model:
        args.size, args.tokenizer = args.size or "S", args.tokenizer or default_tokenizer()
    if args.impl == "trl" and args.preset:
        parser.error(f"--preset applies to --impl dpo only, got {args.preset}")
    train_flags = (PRESETS[args.preset] if args.preset else []) + train_flags
    given = {k for k in vars(build_parser().parse_args(train_flags)) if k != "config"} | (
        {"config"} if "--config" in train_flags else set())
    if args.impl == "trl" and importlib.util.find_spec("trl") is None:
        parser.error('--impl trl needs TRL: pip install -e ".[bench]"')
    allowed = STEP_SETTINGS if args.impl == "dpo" else LORA_SETTINGS
    if given - allowed:
        what = ("fixed by the workload (the data, its truncation, the batch, the learning rate and the schedule)"
                if args.impl == "dpo" else "not a setting TRL's run takes (only the --lora-* ones)")
        parser.error(f"{', '.join('--' + k.replace('_', '-') for k in sorted(given - allowed))}: {what}")
    if train_flags:
        try:
            workload_config(workload_size(args), args.model or Path("model"), Path("out"), train_flags)  # fail early
        except UserError as error:
            parser.error(str(error))
    return args, train_flags


def main(argv: list[str] | None = None) -> None:
    args, train_flags = parse_args(argv)
    if args.alternate:
        alternate(args)
        return
    print(json.dumps(run_once(args, train_flags)), flush=True)


if __name__ == "__main__":
    main()
