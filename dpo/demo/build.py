"""Build the demo's SFT model: a byte-level BPE tokenizer and a tiny Phi model trained on the synthetic task.

    python -m dpo.demo.build [--out DIR] [--seed 0]

Steps (all seeded, CPU, fp32):
  1. generate the SFT records (`task.sft_records`) and render them with the recipe's template;
  2. train a byte-level BPE tokenizer on that text, with "<|endoftext|>" as bos, eos and pad (one id,
     as in Phi-2);
  3. train a small `PhiForCausalLM` with the causal-LM loss on response tokens + EOS only;
  4. measure the model's quality on held-out prompts by sampling at the card's decoding
     (temperature 0.7, top-p 0.9) and write a model card with the numbers.

The output directory loads with `AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained`.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, PhiConfig, PhiForCausalLM, PreTrainedTokenizerFast

from dpo.cli import ArgumentParser
from dpo.data import IGNORE_INDEX
from dpo.demo import task
from dpo.generation import TEMPERATURE, TOP_P  # the card's decoding
from dpo.prompts import format_prompt, format_response

DEFAULT_OUT = Path(__file__).resolve().parent / "assets" / "sft"
EOS_TOKEN = "<|endoftext|>"
MAX_NEW_TOKENS = 48


@dataclass(frozen=True)
class BuildSettings:
    """The demo model's size, tokenizer and SFT schedule (all seeded)."""

    seed: int = 0
    vocab_size: int = 768
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int = 512
    partial_rotary_factor: float = 0.4
    max_position_embeddings: int = 256
    sft_steps: int = 1000
    sft_batch_size: int = 64
    sft_lr: float = 2e-3
    sft_warmup_steps: int = 100
    sft_weight_decay: float = 0.01
    eval_prompts: int = 243  # every held-out instruction
    eval_samples_per_prompt: int = 2


def render(prompt: str, response: str) -> str:
    """A prompt and its response in the recipe's template, as SFT trains on them."""
    return format_prompt(prompt) + format_response(response)


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 pre-tokenization, no prefix space) with one special token for bos/eos/pad."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN,
                                   pad_token=EOS_TOKEN, unk_token=None, clean_up_tokenization_spaces=False,
                                   model_max_length=256)


def make_model(cfg: BuildSettings, tokenizer: PreTrainedTokenizerFast) -> PhiForCausalLM:
    """A new PhiForCausalLM of `cfg`'s size for `tokenizer` (its one special token as bos, eos and pad)."""
    eos_id = tokenizer.eos_token_id
    config = PhiConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                         "partial_rotary_factor": cfg.partial_rotary_factor},
        resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0, tie_word_embeddings=False,
        bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id)
    torch.manual_seed(cfg.seed)
    model = PhiForCausalLM(config)
    model.generation_config = GenerationConfig(
        do_sample=True, temperature=TEMPERATURE, top_p=TOP_P, max_new_tokens=MAX_NEW_TOKENS,
        bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id)
    return model


def encode_sft(records: list[dict[str, str]], tokenizer: PreTrainedTokenizerFast) -> list[tuple[list[int], int]]:
    """Each record -> (prompt ids + response ids + [eos], number of prompt tokens)."""
    prompts = tokenizer([format_prompt(r["prompt"]) for r in records], add_special_tokens=False)["input_ids"]
    responses = tokenizer([format_response(r["response"]) for r in records],
                          add_special_tokens=False)["input_ids"]
    return [(p + r + [tokenizer.eos_token_id], len(p)) for p, r in zip(prompts, responses)]


def collate_sft(batch: list[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad; labels are the input ids on response+EOS positions and IGNORE_INDEX elsewhere."""
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, (ids, n_prompt) in enumerate(batch):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        labels[i, n_prompt:len(ids)] = torch.tensor(ids[n_prompt:])
        attention_mask[i, :len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def sft_loss(model: PhiForCausalLM, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean over labelled tokens of -log p(x_t | x_<t): the logits at t-1 predict the label at t."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                           ignore_index=IGNORE_INDEX)


def train_sft(model: PhiForCausalLM, examples: list[tuple[list[int], int]], cfg: BuildSettings,
              pad_id: int, log_every: int = 100) -> None:
    """AdamW with linear warmup then cosine decay to 10% of the peak lr; one pass over `examples`."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or "embed" in n]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.sft_weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.sft_lr, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < cfg.sft_warmup_steps:
            return cfg.sft_lr * (step + 1) / cfg.sft_warmup_steps
        progress = (step - cfg.sft_warmup_steps) / max(1, cfg.sft_steps - cfg.sft_warmup_steps)
        return cfg.sft_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    model.train()
    start, running = time.time(), 0.0
    for step in range(cfg.sft_steps):
        batch = collate_sft(examples[step * cfg.sft_batch_size:(step + 1) * cfg.sft_batch_size], pad_id)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        loss = sft_loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        running += loss.item()
        if (step + 1) % log_every == 0 or step + 1 == cfg.sft_steps:
            print(f"sft step {step + 1}/{cfg.sft_steps}  loss {running / log_every:.4f}  "
                  f"lr {lr_at(step):.2e}  {time.time() - start:.0f}s", flush=True)
            running = 0.0
    model.eval()


@torch.no_grad()
def sample_answers(model: PhiForCausalLM, tokenizer: PreTrainedTokenizerFast, prompts: list[str], seed: int,
                   temperature: float = TEMPERATURE, top_p: float = TOP_P,
                   max_new_tokens: int = MAX_NEW_TOKENS, batch_size: int = 128) -> list[str]:
    """Sample one response per bare instruction (left-padded batches; text after the prompt, up to EOS)."""
    torch.manual_seed(seed)
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    answers = []
    try:
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer([format_prompt(p) for p in prompts[i:i + batch_size]], return_tensors="pt",
                            padding=True, add_special_tokens=False)
            out = model.generate(**enc, do_sample=True, temperature=temperature, top_p=top_p,
                                 max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
            answers += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = padding_side
    return answers


def measure_quality(model: PhiForCausalLM, tokenizer: PreTrainedTokenizerFast, n_prompts: int,
                    samples_per_prompt: int, seed: int) -> dict[str, float]:
    """Judge sampled answers on held-out instructions: rates of good (correct and concise), correct, concise."""
    instrs = task.held_out_instructions(n_prompts, seed=seed) * samples_per_prompt
    answers = sample_answers(model, tokenizer, [i.text for i in instrs], seed=seed)
    verdicts = [task.judge(i, a) for i, a in zip(instrs, answers)]
    n = len(verdicts)
    return {
        "samples": n,
        "good_rate": sum(v.correct and v.concise for v in verdicts) / n,
        "correct_rate": sum(v.correct for v in verdicts) / n,
        "concise_rate": sum(v.concise for v in verdicts) / n,
        "mean_answer_chars": sum(len(a.strip()) for a in answers) / n,
        "mean_answer_tokens": sum(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers) / n,
    }


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, out: Path) -> None:
    """save_pretrained, naming the class "PreTrainedTokenizerFast", a name transformers 4.x and 5.x both resolve."""
    tokenizer.save_pretrained(out)
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


MODEL_CARD = """\
# demo-phi-sft

A tiny `PhiForCausalLM` (Phi-2's architecture) SFT-trained on the synthetic instruction task of
`dpo/demo/task.py`. It is the starting point of the demo DPO run (`python train.py` with no arguments).
Like the Phi-2 model card warns, it tends to add irrelevant text after a correct answer, and it is
sometimes wrong; DPO on pairs (chosen: concise and correct; rejected: wrong, or correct followed by
rambling) should fix that.

## How it was built

    python -m dpo.demo.build --seed {seed}

Deterministic for a seed (CPU, fp32). Build time on the building machine: {build_seconds:.0f} s.

- Tokenizer: byte-level BPE trained with `tokenizers` on the rendered SFT text, {vocab} tokens;
  `<|endoftext|>` (id {eos_id}) is bos, eos and pad.
- Model: hidden {hidden_size}, {num_hidden_layers} layers, {num_attention_heads} heads, MLP {intermediate_size},
  partial rotary factor {partial_rotary_factor}, dropout 0, untied embeddings; {n_params:,} parameters, stored
  in fp32 safetensors.
- SFT data: `task.sft_records({n_records}, seed={seed})` (mix: {mix}), rendered with the recipe's template
  `### Human: {{instruction}}\\n\\n### Assistant:` + " " + response + EOS; loss on response tokens and EOS only.
- Training: {sft_steps} steps, batch {sft_batch_size}, AdamW (lr {sft_lr}, betas 0.9/0.98, weight decay
  {sft_weight_decay}), {sft_warmup_steps} warmup steps then cosine decay to 10%, gradient clipping 1.0.
- Generation defaults (`generation_config.json`): do_sample, temperature {temperature}, top-p {top_p}.

## Measured quality

{samples} samples on the {eval_prompts} held-out instructions (never seen in SFT or DPO training),
temperature {temperature}, top-p {top_p}, judged by `task.judge`:

| good (correct and concise) | correct | concise | mean answer length |
|---|---|---|---|
| {good_rate:.1%} | {correct_rate:.1%} | {concise_rate:.1%} | {mean_answer_chars:.1f} characters ({mean_answer_tokens:.1f} tokens) |
"""


def build(out: Path, cfg: BuildSettings) -> dict[str, float]:
    """Build the demo model into `out` (tokenizer, SFT model, model card); returns its quality on held-out
    prompts."""
    start = time.time()
    random.seed(cfg.seed)
    n_records = cfg.sft_steps * cfg.sft_batch_size
    records = task.sft_records(n_records, seed=cfg.seed)
    print(f"{n_records} SFT records; training the tokenizer", flush=True)
    tokenizer = train_tokenizer([render(r["prompt"], r["response"]) for r in records], cfg.vocab_size)
    model = make_model(cfg, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"vocab {len(tokenizer)}, model {n_params:,} parameters", flush=True)
    examples = encode_sft(records, tokenizer)
    train_sft(model, examples, cfg, pad_id=tokenizer.pad_token_id)
    print("measuring quality on held-out prompts", flush=True)
    quality = measure_quality(model, tokenizer, cfg.eval_prompts, cfg.eval_samples_per_prompt, seed=cfg.seed)
    build_seconds = time.time() - start

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    save_tokenizer(tokenizer, out)
    card = MODEL_CARD.format(**asdict(cfg), **quality, vocab=len(tokenizer), eos_id=tokenizer.eos_token_id,
                             n_params=n_params, n_records=n_records, build_seconds=build_seconds,
                             mix=", ".join(f"{k} {v:.0%}" for k, v in task.SFT_MIX.items()),
                             temperature=TEMPERATURE, top_p=TOP_P)
    (out / "README.md").write_text(card)
    print(json.dumps({"out": str(out), "seconds": round(build_seconds), **quality}, indent=2))
    return quality


def main(argv: list[str] | None = None) -> None:
    """The command line: python -m dpo.demo.build [--out DIR] [--seed 0] [--sft-steps N]."""
    parser = ArgumentParser(prog="python -m dpo.demo.build", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="model directory to write")
    parser.add_argument("--seed", type=int, default=BuildSettings.seed)
    parser.add_argument("--sft-steps", type=int, default=BuildSettings.sft_steps)
    args = parser.parse_args(argv)
    build(args.out, BuildSettings(seed=args.seed, sft_steps=args.sft_steps))


if __name__ == "__main__":
    main(sys.argv[1:])
