"""Sampling speed: online DPO's sampling (dpo.generation.generate_batch: a shared prompt cache, a preallocated KV
cache, finished rows leaving the batch) against transformers' generate on the same prompts, cache of the prompts
and settings (a DynamicCache, every row computed until the last one ends).

    python benchmarks/sampling.py --model smollm2-135m-instruct --prompts runs/ifeval-data/train.jsonl
    python benchmarks/sampling.py --model DIR --prompts FILE --num-prompts 16 --num-samples 4 --rounds 2

Both sample `--num-samples` answers to each of the first `--num-prompts` prompts (the rows of any file
generate.py's --input-file reads; online DPO samples groups of 16 prompts), with the recipe's decoding (temperature
0.7, top-p 0.9, `--max-new-tokens` 160) and the model's chat template when it ships one, from the same seed: the
answers must be the same text (the script stops if not). Runs alternate in one process, `--rounds` times each;
printed: seconds, new tokens per second (the answers' tokens, up to each row's end) and the speed-up per round.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from transformers import DynamicCache, GenerationConfig, StoppingCriteriaList  # noqa: E402

from dpo.errors import UserError  # noqa: E402
from dpo.memory import tune_cpu_allocator  # noqa: E402
from dpo.generation import (DecodingSettings, StopOnStrings, _cut_at_eos, model_eos_ids, cache_argument,  # noqa: E402
                            clean_response, generate_batch, left_pad, read_instructions, sampling_processors)
from dpo.modeling import load_causal_lm, load_tokenizer, resolve_model_path  # noqa: E402
from dpo.prompts import encode_prompts, resolve_template  # noqa: E402


def transformers_generate(model, tokenizer, prompts: list[str], decoding: DecodingSettings, k: int) -> list[str]:
    """k answers per prompt (prompt-major) by transformers' generate from a DynamicCache of the prompts."""
    eos_ids = model_eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    ids, _ = encode_prompts(tokenizer, prompts, decoding.template, decoding.max_prompt_length, "keep_end")
    input_ids, attention_mask = left_pad(ids, pad_id)
    width = input_ids.shape[1]
    torch.manual_seed(decoding.seed)
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
        model(input_ids=input_ids[:, :-1], attention_mask=attention_mask[:, :-1], position_ids=positions[:, :-1],
              use_cache=True, logits_to_keep=1, **{cache_argument(model): cache})
        cache.batch_repeat_interleave(k)
        # the same temperature and top-p filter as generate_batch (transformers' own top-p warper sorts the whole
        # vocabulary: a cost of the filter, not of the loop this compares), so no warpers of generate's own
        config = GenerationConfig(do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                                  max_new_tokens=decoding.max_new_tokens, pad_token_id=pad_id, eos_token_id=eos_ids)
        out = model.generate(input_ids=input_ids.repeat_interleave(k, dim=0),
                             attention_mask=attention_mask.repeat_interleave(k, dim=0),
                             **{cache_argument(model): cache}, generation_config=config,
                             logits_processor=sampling_processors(decoding),
                             stopping_criteria=StoppingCriteriaList([StopOnStrings(tokenizer, decoding.stop_strings,
                                                                                   width)]))
    return [clean_response(tokenizer.decode(_cut_at_eos(row, eos_ids), skip_special_tokens=True),
                           decoding.stop_strings) for row in out[:, width:].tolist()]


def main() -> None:
    tune_cpu_allocator()  # as train.py's command line does (online DPO samples inside it), before the first tensor
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="any model train.py's --model takes")
    parser.add_argument("--prompts", required=True, help="a JSON / JSONL file of prompts (generate.py's format)")
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--num-samples", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    path = resolve_model_path(args.model)
    model, tokenizer = load_causal_lm(path).eval(), load_tokenizer(path)
    prompts = [row["instruction"] for row in read_instructions(args.prompts)[:args.num_prompts]]
    template = resolve_template("auto", tokenizer)
    decoding = DecodingSettings(max_new_tokens=args.max_new_tokens, seed=0,
                                chat_template=template == "chat")
    ids, _ = encode_prompts(tokenizer, prompts, decoding.template, None, "keep_end")
    prompts = [prompts[i] for i in sorted(range(len(prompts)), key=lambda i: -len(ids[i]))]  # generate_batch's order
    runs = {"transformers generate": lambda: transformers_generate(model, tokenizer, prompts, decoding,
                                                                   args.num_samples),
            "dpo generate_batch": lambda: generate_batch(model, tokenizer, prompts, decoding,
                                                         batch_size=len(prompts), num_samples=args.num_samples)}
    print(f"{args.model}: {len(prompts)} prompts x {args.num_samples} samples, up to {args.max_new_tokens} new "
          f"tokens, {torch.get_num_threads()} threads", flush=True)
    for r in range(args.rounds):
        seconds, answers = {}, {}
        for name, run in runs.items():
            start = time.perf_counter()
            answers[name] = run()
            seconds[name] = time.perf_counter() - start
        first, second = answers.values()
        if first != second:
            differ = sum(a != b for a, b in zip(first, second))
            sys.exit(f"error: {differ} of {len(first)} answers differ between the two")
        tokens = sum(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in first)
        line = ", ".join(f"{name} {s:.1f} s ({tokens / s:.1f} tokens/s)" for name, s in seconds.items())
        print(f"round {r + 1}: {line}; {tokens} answer tokens, the same answers; speed-up "
              f"{seconds['transformers generate'] / seconds['dpo generate_batch']:.2f}x", flush=True)


if __name__ == "__main__":
    try:
        main()
    except UserError as error:  # a missing or malformed file, an unknown model: one line
        sys.exit(f"error: {error}")
