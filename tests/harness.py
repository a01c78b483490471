"""Tiny Phi-architecture models for tests (random weights, Phi-2's layout at toy size)."""

import torch
from transformers import PhiConfig, PhiForCausalLM


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


def tiny_run_args(root, out: str, *extra: str) -> list[str]:
    """train.py flags of a tiny run on make_run_dir's files, writing to root/out; `extra` adds the run's own."""
    return ["--model", str(root / "model"), "--dataset", str(root / "pairs.jsonl"), "--output-dir", str(root / out),
            "--max-length", "48", "--max-prompt-length", "24", "--test-size", "8", "--seed", "0", "--no-progress",
            "--no-plot", *extra]
