"""The test harness: tiny Phi-architecture models (random weights, Phi-2's layout at toy size), their tokenizer and
preference pairs, and the ways tests run train.py on them.

    make_run_dir(root, n)              root/model + root/pairs.jsonl: what a tiny run reads
    tiny_run_args(root, out, *extra)   train.py flags of a tiny run on those files, writing to root/out
    train_tiny(root, out, *extra)      train.main on those flags in this process (asserts exit 0): root/out
    run_metrics(out, *splits)          a run's metrics.jsonl records, of the given splits only if any are named
    torchrun(args, nproc=2)            train.py under torch.distributed.run (CPU, gloo) in N processes (asserts exit 0)
    start_train(args)                  train.py in a child process (Popen), for tests that kill it
"""

import os
import subprocess
import sys
from pathlib import Path

import torch
from transformers import PhiConfig, PhiForCausalLM

from dpo.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]


def tiny_phi(vocab_size: int = 97, hidden_size: int = 40, layers: int = 2, heads: int = 4, seed: int = 0,
             dropout: float = 0.0) -> PhiForCausalLM:
    torch.manual_seed(seed)
    config = PhiConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=4 * hidden_size,
                       num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=256,
                       partial_rotary_factor=0.4, resid_pdrop=dropout, embd_pdrop=dropout, attention_dropout=dropout,
                       bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return PhiForCausalLM(config)


WORDS = ("red green blue cat dog sun moon one two three yes no the a is what color big small fast slow "
         "answer human assistant please tell me about").split()


def tiny_tokenizer():
    """A byte-level BPE trained on a few words; <|endoftext|> is BOS, EOS and pad (as in Phi-2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = [" ".join(WORDS), "### Human: what color is the sun?\n\n### Assistant: yellow"] * 4
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>", pad_token="<|endoftext|>")


def make_model_dir(path, *, hidden_size: int = 40, layers: int = 2, seed: int = 0):
    """A saved tiny Phi model + tokenizer directory, loadable with AutoModelForCausalLM / AutoTokenizer."""
    tokenizer = tiny_tokenizer()
    model = tiny_phi(vocab_size=len(tokenizer), hidden_size=hidden_size, layers=layers, seed=seed)
    eos = tokenizer.eos_token_id
    model.config.bos_token_id = model.config.eos_token_id = model.config.pad_token_id = eos
    model.generation_config.bos_token_id = model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = eos
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_pairs(path, n: int, seed: int = 0):
    """n explicit-format preference pairs of random words, as JSONL."""
    import json
    import random

    rng = random.Random(seed)
    with open(path, "w") as handle:
        for _ in range(n):
            prompt = " ".join(rng.choices(WORDS, k=rng.randint(2, 6)))
            chosen = " ".join(rng.choices(WORDS, k=rng.randint(1, 5)))
            rejected = chosen + " " + " ".join(rng.choices(WORDS, k=rng.randint(1, 5)))
            handle.write(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}) + "\n")
    return path


def random_pairs(n: int, vocab: int, seed: int = 0):
    """n TokenizedPairs of random ids (1..vocab-1) with EOS id 0 ending each response."""
    from dpo.data import TokenizedPair

    g = torch.Generator().manual_seed(seed)
    pairs = []
    for row in range(n):
        lengths = torch.randint(1, 9, (3,), generator=g).tolist()
        ids = [torch.randint(1, vocab, (k,), generator=g).tolist() for k in lengths]
        pairs.append(TokenizedPair(prompt_ids=ids[0], chosen_ids=ids[1] + [0], rejected_ids=ids[2] + [0], row=row))
    return pairs


def make_run_dir(root, num_pairs: int, **model_kwargs):
    """What a tiny training run reads: root/model (make_model_dir) and root/pairs.jsonl (write_pairs)."""
    make_model_dir(root / "model", **model_kwargs)
    write_pairs(root / "pairs.jsonl", num_pairs)
    return root


def tiny_run_args(root, out: str | Path | None, *extra: str, model: str | Path = "model",
                  dataset: str | Path = "pairs.jsonl", test_size: str | None = "8",
                  seed: str | None = "0") -> list[str]:
    """train.py flags of a tiny run on make_run_dir's files, writing to root/out; `extra` adds the run's own (a flag
    given again in `extra` wins: argparse keeps the last).

    model, dataset and out are relative to root (an absolute path stays itself); out None leaves --output-dir out
    (for runs that add it later), and test_size or seed None leave that flag out (the default, or a dataset folder's
    own test split)."""
    args = ["--model", str(root / model), "--dataset", str(root / dataset)]
    if out is not None:
        args += ["--output-dir", str(root / out)]
    args += ["--max-length", "48", "--max-prompt-length", "24"]
    if test_size is not None:
        args += ["--test-size", test_size]
    if seed is not None:
        args += ["--seed", seed]
    return [*args, "--no-progress", "--no-plot", *extra]


def train_tiny(root, out: str | Path, *extra: str, **flags) -> Path:
    """A tiny run in this process: train.main(tiny_run_args(root, out, *extra, **flags)), which must return 0 (an
    exception propagates: pytest.raises reads it). Returns the output directory, root/out."""
    import train  # not at the top: train.py imports the whole package, which most users of this module never need

    assert train.main(tiny_run_args(root, out, *extra, **flags)) == 0
    return root / out


def run_metrics(out_dir: Path, *splits: str) -> list[dict]:
    """The records of out_dir/metrics.jsonl; with `splits`, only those whose split is one of them."""
    records = read_metrics(out_dir / "metrics.jsonl")
    return [r for r in records if r.get("split") in splits] if splits else records


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a train.py child process: this one's, one thread per process, the repository importable."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **extra}


def start_train(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    """train.py in a child process (stdout and stderr together in .stdout), for tests that signal or kill it."""
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=env or child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def torchrun(args: list[str], nproc: int = 2, env: dict[str, str] | None = None, check: bool = True,
             timeout: float = 600) -> subprocess.CompletedProcess:
    """train.py under `python -m torch.distributed.run --standalone` with `nproc` processes (gloo on CPU), in the
    repository root; env adds to child_env(). With check (the default) a non-zero exit fails the test, showing the
    end of the processes' output. Returns the completed process (stdout and stderr captured as text)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(ROOT / "train.py"), *args]
    result = subprocess.run(cmd, cwd=ROOT, env=child_env(**(env or {})), capture_output=True, text=True,
                            timeout=timeout)
    if check:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result
