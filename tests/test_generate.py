"""generate.py and dpo.generation: template, stop strings, left padding, seeding, streaming, batch files, CLI errors."""

import errno
import io
import json
import os
import re
import subprocess
import sys
import time
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import LlamaConfig

import generate
from dpo import evaluate
from dpo.errors import TrainingError
from dpo.generation import (BatchFileError, DecodingSettings, GenerationError, NonFiniteLogitsError,
                            Sample, StopAwareStreamer, StopOnStrings, clean_response, generate_batch,
                            generate_batch_ended, generate_samples, generator_name, left_pad, prompt_budget, read_instructions, resolve_dtype,
                            resolve_run_model, run_settings, sampled_response_ids, side_by_side,
                            truncate_at_stop, write_outputs,
                            write_output_text)
from dpo.modeling import DEMO_MODEL_DIR, load_causal_lm, load_tokenizer, resolve_model_path
from dpo.prompts import PromptError, encode_prompts, format_prompt, render_prompt
from harness import make_model_dir, tiny_tokenizer

GREEDY = DecodingSettings(greedy=True, max_new_tokens=12)
SAMPLED = DecodingSettings(max_new_tokens=12, seed=0)
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest's, as model_dir: tiny models decode token by token


@pytest.fixture(scope="module")
def lm(model_dir):
    return load_causal_lm(model_dir).eval(), load_tokenizer(model_dir)


# ---------------------------------------------------------------------------------------------------- template


def test_recipe_prompt_is_the_template_tokenized_without_special_tokens():
    tokenizer = tiny_tokenizer()
    assert format_prompt("what color is the sun?") == "### Human: what color is the sun?\n\n### Assistant:"
    ids, cut = encode_prompts(tokenizer, ["what color is the sun?", "a <|endoftext|> b"])
    assert cut == 0
    assert ids[0] == tokenizer(format_prompt("what color is the sun?"), add_special_tokens=False)["input_ids"]
    # recipe text is plain text: a literal special-token string is not the EOS id
    assert tokenizer.eos_token_id not in ids[1]


def _bos_adding_tokenizer():
    from tokenizers.processors import TemplateProcessing

    tokenizer = tiny_tokenizer()
    eos = tokenizer.eos_token_id
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", eos)])
    return tokenizer


def test_bos_is_added_once_when_the_tokenizer_adds_one():
    tokenizer = _bos_adding_tokenizer()
    bos = tokenizer.bos_token_id
    plain = tokenizer(format_prompt("yes"), add_special_tokens=False)["input_ids"]
    assert encode_prompts(tokenizer, ["yes"]) == ([[bos] + plain], 0)
    tokenizer.chat_template = ("{{ bos_token }}{% for m in messages %}<user> {{ m['content'] }}{% endfor %}"
                               "{% if add_generation_prompt %} <assistant>{% endif %}")
    rendered = render_prompt("yes", "chat", tokenizer)
    assert rendered == "<|endoftext|><user> yes <assistant>"
    ids = encode_prompts(tokenizer, ["yes"], "chat")[0][0]
    assert ids[0] == bos and ids[1] != bos  # the template's BOS, not a second one


def test_chat_template_missing_is_an_error():
    with pytest.raises(PromptError, match="no chat template"):
        render_prompt("yes", "chat", tiny_tokenizer())


# ---------------------------------------------------------------------------------------------------- stop strings


@pytest.mark.parametrize("text, expected", [
    ("7.", "7."),
    (" 7.\n\n### Human: What is 2 plus 2?\n\n### Assistant: 4.", "7."),
    ("7. ### Human: more", "7."),
    ("### Human: only a new turn", ""),
    ("7.\n\n### Hum", "7.\n\n### Hum"),  # a partial marker at the end is the response's own text
    ("### Humans are mammals.", "### Humans are mammals."),  # no colon: not the marker
    ("# Human: hi", "# Human: hi"),
    ("a ### human: b", "a ### human: b"),  # case matters, as in the template
])
def test_clean_response_cuts_at_the_first_complete_stop_string(text, expected):
    assert clean_response(text) == expected


def test_truncate_at_the_earliest_of_several_stop_strings():
    assert truncate_at_stop("a STOP b ### Human: c", ["### Human:", "STOP"]) == "a "
    assert truncate_at_stop("a ### Human: b STOP", ["STOP", "### Human:"]) == "a "


def test_stop_criterion_marks_only_rows_whose_continuation_holds_the_marker():
    tokenizer = tiny_tokenizer()
    prompt = tokenizer(format_prompt("yes"), add_special_tokens=False)["input_ids"]
    done = tokenizer(" yes\n\n### Human: no", add_special_tokens=False)["input_ids"]
    partial = tokenizer(" yes\n\n### Hum", add_special_tokens=False)["input_ids"]
    width = max(len(done), len(partial))
    rows = [prompt + done + [tokenizer.eos_token_id] * (width - len(done)),
            prompt + partial + [tokenizer.eos_token_id] * (width - len(partial))]
    criterion = StopOnStrings(tokenizer, ["### Human:"], prompt_width=len(prompt))
    assert criterion(torch.tensor(rows), None).tolist() == [True, False]
    # the prompt itself holds "### Human:", and must not count
    assert criterion(torch.tensor([prompt + partial]), None).tolist() == [False]


def first_stop(criterion, prompt: list[int], continuation: list[int]) -> int | None:
    """The step at which generation would stop this row (the criterion is asked after every new token)."""
    for step in range(1, len(continuation) + 1):
        if criterion(torch.tensor([prompt + continuation[:step]]), None).item():
            return step
    return None


def whole_continuation_stops(tokenizer, stop_strings, prompt_width):
    """The reference: decode the whole continuation at every step."""
    def criterion(input_ids, scores):
        texts = tokenizer.batch_decode(input_ids[:, prompt_width:], skip_special_tokens=True)
        return torch.tensor([any(stop in text for stop in stop_strings) for text in texts])
    return criterion


@pytest.mark.parametrize("tokenizer_name", ["tiny", "demo", "gpt2"])
def test_stop_criterion_decoding_a_window_stops_where_whole_decoding_does(tokenizer_name):
    """Brute force over random continuations (random tokens, stop strings, multi-byte characters cut between
    tokens, long runs of special tokens, which decode to nothing): the windowed criterion stops at the same step as
    decoding the whole continuation each step."""
    import random

    from dpo.generation import STOP_STRINGS
    from dpo.modeling import DEMO_MODEL_DIR, load_tokenizer

    if tokenizer_name == "gpt2":
        path = Path(__file__).resolve().parents[2] / "shared" / "tokenizers" / "gpt2"
        if not path.is_dir():
            pytest.skip("../shared is not present")
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
    else:
        tokenizer = tiny_tokenizer() if tokenizer_name == "tiny" else load_tokenizer(str(DEMO_MODEL_DIR))
    stops = list(STOP_STRINGS) + ["日本語"]
    pieces = [" yes", "\n\n### Hum", "an:", "### Human:", "\n\n### Assistant:", " 日本", "語", "🙂", " the answer",
              "###", " Human", "\n"]
    rng = random.Random(0)
    prompt = tokenizer(format_prompt("yes"), add_special_tokens=False)["input_ids"]
    stopped = 0
    for _ in range(60):
        ids: list[int] = []
        while len(ids) < rng.randint(5, 90):
            if rng.random() < 0.5:
                ids += tokenizer(rng.choice(pieces), add_special_tokens=False)["input_ids"]
            elif rng.random() < 0.2:
                ids += [rng.choice(tokenizer.all_special_ids)] * rng.randint(1, 80)
            else:
                ids.append(rng.randrange(len(tokenizer)))
        want = first_stop(whole_continuation_stops(tokenizer, stops, len(prompt)), prompt, ids)
        assert first_stop(StopOnStrings(tokenizer, stops, len(prompt)), prompt, ids) == want
        stopped += want is not None
    assert 10 < stopped < 60  # both outcomes were exercised
    # a stop string cut in two by more special tokens than the window holds
    split = (tokenizer(" yes\n\n### Hum", add_special_tokens=False)["input_ids"] + [tokenizer.all_special_ids[0]] * 200
             + tokenizer("an: no", add_special_tokens=False)["input_ids"])
    want = first_stop(whole_continuation_stops(tokenizer, stops, len(prompt)), prompt, split)
    assert want is not None and first_stop(StopOnStrings(tokenizer, stops, len(prompt)), prompt, split) == want


class ScriptedLM(nn.Module):
    """Stands in for a causal LM of one row: each forward makes the next token of a fixed continuation the most
    likely one (greedy decoding emits it); `steps` counts the forwards, one per emitted token."""

    def __init__(self, continuation: list[int], eos_id: int, vocab_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.continuation, self.eos_id, self.vocab_size = continuation, eos_id, vocab_size
        self.config = LlamaConfig(num_hidden_layers=1, hidden_size=8, intermediate_size=8, num_attention_heads=1,
                                  vocab_size=vocab_size, max_position_embeddings=4096)
        self.steps = 0

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None, logits_to_keep=None,
                cache=None):
        logits = torch.zeros(input_ids.shape[0], 1, self.vocab_size)
        logits[:, :, self.continuation[min(self.steps, len(self.continuation) - 1)]] = 1.0
        self.steps += 1
        return SimpleNamespace(logits=logits)


def test_a_streamed_answer_ends_at_every_eos_the_model_lists_as_the_returned_one_does():
    """A model's generation config may list an end id besides the tokenizer's EOS (Llama-3's <|eot_id|>); one that
    is not a special token would be written by the streamer if it knew the tokenizer's EOS alone."""
    from types import SimpleNamespace

    tokenizer = tiny_tokenizer()
    eos = tokenizer.eos_token_id
    red, cat, blue = (tokenizer(text, add_special_tokens=False)["input_ids"] for text in (" red", " cat", " blue"))
    decoding = DecodingSettings(greedy=True, max_new_tokens=20)
    answers = []
    for streamed in (False, True):
        model = ScriptedLM(red + cat + blue + [eos], eos, len(tokenizer))
        model.generation_config = SimpleNamespace(eos_token_id=[eos, cat[0]])
        written = []
        streamer = StopAwareStreamer(tokenizer, decoding.stop_strings, write=written.append) if streamed else None
        answers.append(generate_batch(model, tokenizer, ["yes"], decoding, streamer=streamer)[0])
        if streamed:
            assert streamer.text == answers[0] and "".join(written).strip() == answers[0]
    assert answers == ["red", "red"]


def test_generation_stops_at_the_marker_and_never_shows_it():
    tokenizer = tiny_tokenizer()
    continuation = tokenizer(" yes\n\n### Human: tell me more\n\n### Assistant: no",
                             add_special_tokens=False)["input_ids"]
    model = ScriptedLM(continuation, tokenizer.eos_token_id, len(tokenizer))
    written = []
    streamer = StopAwareStreamer(tokenizer, write=written.append)
    assert generate_batch(model, tokenizer, ["yes"], DecodingSettings(greedy=True, max_new_tokens=100),
                          streamer=streamer) == ["yes"]
    marker_end = len(tokenizer(" yes\n\n### Human:", add_special_tokens=False)["input_ids"])
    assert model.steps == marker_end  # stopped as soon as the marker was complete
    assert "".join(written) == "yes\n" and "#" not in "".join(written)


def test_generation_stops_at_eos_and_drops_what_follows():
    tokenizer = tiny_tokenizer()
    eos = tokenizer.eos_token_id
    red = tokenizer(" red", add_special_tokens=False)["input_ids"]
    model = ScriptedLM(red + [eos] + tokenizer(" blue", add_special_tokens=False)["input_ids"], eos, len(tokenizer))
    assert generate_batch(model, tokenizer, ["yes"], DecodingSettings(greedy=True)) == ["red"]
    assert model.steps == len(red) + 1


def test_a_response_ends_at_eos_or_a_stop_string_and_is_cut_at_the_token_budget():
    tokenizer = tiny_tokenizer()
    eos = tokenizer.eos_token_id
    red = tokenizer(" red", add_special_tokens=False)["input_ids"]
    marker = tokenizer(" red\n\n### Human: more", add_special_tokens=False)["input_ids"]
    for continuation, budget, ended in ((red + [eos], 20, True), (red + [eos], len(red), False),
                                        (marker, 40, True), (red * 30, 10, False)):
        model = ScriptedLM(continuation, eos, len(tokenizer))
        texts, ends = generate_batch_ended(model, tokenizer, ["yes"], DecodingSettings(greedy=True,
                                                                                       max_new_tokens=budget))
        assert ends == [ended], (continuation, budget)
        assert texts[0].startswith("red")


def test_a_sample_keeps_the_ids_the_model_sampled():
    """A model may sample a split its tokenizer would not write (" y" "e" "l" "low" for " yellow", written " y" "el"
    "low"): the sample's ids are those, before its EOS; where a stop string ended it, those before the stop string
    and the white space before it (the padding after it aside); where that text ends inside a token, or a special
    token is among them, none."""
    tokenizer = tiny_tokenizer()
    eos = tokenizer.eos_token_id
    sampled = [281, 69, 76, 285]
    assert tokenizer.decode(sampled) == " yellow" and tokenizer(" yellow", add_special_tokens=False)["input_ids"] \
        == [281, 268, 285]
    stop = tokenizer("\n\n### Human: more", add_special_tokens=False)["input_ids"]
    for continuation, budget, want in ((sampled + [eos], 20, Sample("yellow", True, sampled)),
                                       (sampled + stop, 20, Sample("yellow", True, sampled)),
                                       (sampled * 3, 8, Sample("yellow yellow", False, (sampled * 3)[:8]))):
        model = ScriptedLM(continuation, eos, len(tokenizer))
        decoding = DecodingSettings(greedy=True, max_new_tokens=budget)
        assert generate_samples(model, tokenizer, ["yes"], decoding) == [want]
    stops = ["### Human:"]
    assert stop[:2] == [199, 199]  # "\n" "\n", then the stop string
    assert sampled_response_ids(tokenizer, sampled + stop + [eos, eos], stops) == sampled
    assert sampled_response_ids(tokenizer, stop, stops) == []
    assert sampled_response_ids(tokenizer, [281, 268, 285], ["llow"]) is None  # " y" "el|low": begun inside "el"
    assert sampled_response_ids(tokenizer, [281, 268, 285], ["low"]) == [281, 268]
    assert sampled_response_ids(tokenizer, [281, eos, 268], stops) is None


class BytePieces:
    """A tokenizer's decoding of byte pieces: a token may hold punctuation and the newlines after it (".\n\n", as in
    Qwen2's and Llama-3's tokenizers), and a character's incomplete bytes decode to one U+FFFD each (byte fallback)."""

    all_special_ids = [0]

    def __init__(self, pieces: dict[int, bytes]):
        self.pieces = pieces

    def decode(self, ids, skip_special_tokens=True):
        data = b"".join(self.pieces[i] for i in ids if i not in self.all_special_ids)
        for end in range(len(data), -1, -1):
            try:
                return data[:end].decode() + "\ufffd" * (len(data) - end)
            except UnicodeDecodeError:
                continue


def test_a_stop_ended_sample_keeps_its_ids_whatever_its_tokens_hold():
    """The ids of an answer a stop string ended reach its text: with the newlines where one token holds them and the
    last punctuation; through a character of byte tokens (whose partial decodings are longer than the whole); none
    where one token holds both text and the stop string."""
    emoji = "\N{GRINNING FACE}".encode()
    pieces = {1: b"Sure", 2: b".\n\n", 3: b"###", 4: b" Human", 5: b":", 6: b"Hi", 11: b"\n", 12: b"e###",
              **{7 + i: emoji[i:i + 1] for i in range(4)}}
    tokenizer, stops = BytePieces(pieces), ["### Human:"]
    assert tokenizer.decode([6, 7, 8]) == "Hi\ufffd\ufffd" and tokenizer.decode([6, 7, 8, 9, 10]) == "Hi\N{GRINNING FACE}"
    assert sampled_response_ids(tokenizer, [1, 2, 3, 4, 5], stops) == [1, 2]
    assert sampled_response_ids(tokenizer, [6, 7, 8, 9, 10, 11, 3, 4, 5, 0, 0], stops) == [6, 7, 8, 9, 10]
    assert sampled_response_ids(tokenizer, [1, 12, 4, 5], stops) is None


def test_a_response_cut_inside_a_character_drops_its_partial_bytes():
    """Byte-level BPE: a budget that ends after 2 of the 3 bytes of a CJK character decodes to U+FFFD; the cut
    response drops it. A response that ends (EOS) keeps its text as decoded."""
    tokenizer = tiny_tokenizer()
    eos = tokenizer.eos_token_id
    ids = tokenizer(" café 日本", add_special_tokens=False)["input_ids"]
    partial = next(n for n in range(len(ids), 0, -1) if tokenizer.decode(ids[:n]).endswith("\ufffd"))
    assert tokenizer.decode(ids[:partial]).startswith(" café 日")
    texts, ends = generate_batch_ended(ScriptedLM(ids, eos, len(tokenizer)), tokenizer, ["yes"],
                                       DecodingSettings(greedy=True, max_new_tokens=partial))
    assert ends == [False] and texts == [tokenizer.decode(ids[:partial]).rstrip("\ufffd").strip()]
    assert "\ufffd" not in texts[0] and texts[0].endswith("café 日")
    streamer = StopAwareStreamer(tokenizer, write=lambda text: None)  # generate.py's streamed answer: the same
    assert generate_batch(ScriptedLM(ids, eos, len(tokenizer)), tokenizer, ["yes"],
                          DecodingSettings(greedy=True, max_new_tokens=partial), streamer=streamer) == texts
    assert streamer.text == texts[0]
    whole = ids[:partial] + [eos]
    texts, ends = generate_batch_ended(ScriptedLM(whole, eos, len(tokenizer)), tokenizer, ["yes"],
                                       DecodingSettings(greedy=True, max_new_tokens=partial + 5))
    assert ends == [True] and texts[0].endswith("\ufffd")  # it ended there: the model's own text, as it is


def test_streamer_holds_back_a_possible_marker_and_flushes_it_at_the_end():
    tokenizer = tiny_tokenizer()
    text = " yes\n\n### Hum"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    written = []
    streamer = StopAwareStreamer(tokenizer, write=written.append)
    streamer.put(torch.tensor([[1, 2, 3]]))  # the prompt, skipped
    for token in ids:
        streamer.put(torch.tensor([token]))
        assert "#" not in "".join(written) and not "".join(written).endswith("\n")
    assert "".join(written) == "yes"
    streamer.end()
    assert "".join(written) == "yes\n\n### Hum\n" and streamer.text == clean_response(text)


# ---------------------------------------------------------------------------------------------------- padding


def test_an_instruction_the_chat_template_refuses_is_named(lm):
    import copy

    model, tokenizer = lm
    tokenizer = copy.copy(tokenizer)
    tokenizer.chat_template = ("{% for m in messages %}<user> {{ m['content'] }}{% endfor %}"
                               "{% if add_generation_prompt %} <assistant>{% endif %}")
    settings = DecodingSettings(greedy=True, max_new_tokens=2, chat_template=True)
    with pytest.raises(GenerationError, match=r"^instruction 1: a user message holds the text of the special token "
                                              r"'<\|endoftext\|>'"):
        generate_batch(model, tokenizer, ["yes", "what is <|endoftext|>?"], settings)


def test_a_batch_files_instruction_the_chat_template_refuses_names_the_file_and_row(model_dir, tmp_path, capsys):
    import shutil

    chat = tmp_path / "chat-model"
    shutil.copytree(model_dir, chat)
    tokenizer = load_tokenizer(str(chat))
    tokenizer.chat_template = ("{% for m in messages %}<user> {{ m['content'] }}{% endfor %}"
                               "{% if add_generation_prompt %} <assistant>{% endif %}")
    tokenizer.save_pretrained(chat)
    batch = tmp_path / "batch.jsonl"
    batch.write_text('{"instruction": "yes"}\n\n{"instruction": "a"}\n{"instruction": "what is <|endoftext|>?"}\n')
    capsys.readouterr()
    assert generate.cli(["--model", str(chat), "--chat-template", "--instructions", str(batch), "--output",
                         str(tmp_path / "o.json"), "--max-new-tokens", "2", "--no-progress"]) == 2
    assert capsys.readouterr().err == (f"error: {batch}, row 2: a user message holds the text of the special token "
                                       "'<|endoftext|>', which the chat template would encode as that token\n")
    one = tmp_path / "one.jsonl"  # a file of one row, and --compare, name the row too
    one.write_text('{"instruction": "what is <|endoftext|>?"}\n')
    for flags in (["--instructions", str(one), "--output", str(tmp_path / "o.json")],
                  ["--instructions", str(batch), "--compare", str(chat)]):
        assert generate.cli(["--model", str(chat), "--chat-template", "--max-new-tokens", "2", "--no-progress",
                             *flags]) == 2
        assert capsys.readouterr().err.startswith(f"error: {flags[1]}, row {0 if flags[1] == str(one) else 2}: ")


def test_left_pad_builds_the_mask_from_lengths_even_when_pad_is_a_real_token():
    input_ids, mask = left_pad([[5, 6, 7], [5], [7, 5]], pad_id=5)
    assert input_ids.tolist() == [[5, 6, 7], [5, 5, 5], [5, 7, 5]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]


def test_left_padded_batches_give_the_unpadded_greedy_outputs(lm):
    model, tokenizer = lm
    instructions = ["yes", "what color is the sun?", "tell me about a big red dog please", "one two"]
    alone = [generate_batch(model, tokenizer, [text], GREEDY)[0] for text in instructions]
    assert generate_batch(model, tokenizer, instructions, GREEDY, batch_size=4) == alone
    assert generate_batch(model, tokenizer, instructions, GREEDY, batch_size=3) == alone  # sorted, then restored
    assert len(set(alone)) > 1  # the prompts really lead to different outputs



def test_logits_that_are_no_distribution_stop_generation_in_one_line(model_dir):
    """NaN (an fp16 overflow, broken weights) would be argmax's token 0 for every row: "!!!" answers, or empty ones
    where token 0 ends them. -inf on some tokens (a masked vocabulary) is still a distribution."""
    model, tokenizer = load_causal_lm(model_dir).eval(), load_tokenizer(model_dir)
    bias = model.get_output_embeddings().bias  # Phi's head has one
    prompts = ["yes", "what color is the sun?"]
    with torch.no_grad():
        bias[5] = float("-inf")
    assert generate_batch_ended(model, tokenizer, prompts, GREEDY)[0] == \
        generate_batch_ended(model, tokenizer, prompts, GREEDY)[0]  # runs: no error
    for value in (float("nan"), float("inf")):
        with torch.no_grad():
            bias[5] = value
        for decoding in (GREEDY, SAMPLED):
            with pytest.raises(NonFiniteLogitsError, match="logits are not finite .*try --precision bf16 or fp32"):
                generate_batch_ended(model, tokenizer, prompts, decoding)
    assert isinstance(NonFiniteLogitsError("x"), TrainingError)  # train.py logs it to metrics.jsonl and stops

# ---------------------------------------------------------------------------------------------------- seeding


def test_same_seed_same_samples_and_seeds_matter(lm):
    model, tokenizer = lm
    instructions = ["what color is the sun?", "yes"]
    first = generate_batch(model, tokenizer, instructions, SAMPLED)
    torch.manual_seed(1234)  # the global RNG state before the call must not matter
    assert generate_batch(model, tokenizer, instructions, SAMPLED) == first
    by_seed = {tuple(generate_batch(model, tokenizer, instructions, DecodingSettings(max_new_tokens=12, seed=s)))
               for s in range(4)}
    assert len(by_seed) > 1


def test_streaming_prints_exactly_the_returned_response(lm):
    model, tokenizer = lm
    written = []
    streamer = StopAwareStreamer(tokenizer, write=written.append)
    returned = generate_batch(model, tokenizer, ["what color is the sun?"], SAMPLED, streamer=streamer)
    expected = generate_batch(model, tokenizer, ["what color is the sun?"], SAMPLED)
    assert returned == expected and "".join(written) == expected[0] + "\n"


@pytest.mark.parametrize("change, message", [
    (dict(max_new_tokens=0), "--max-new-tokens must be at least 1"),
    (dict(max_new_tokens=-3), "--max-new-tokens must be at least 1"),
    (dict(temperature=0.0), "--temperature must be at least 1e-05"),
    (dict(temperature=1e-38), "--temperature must be at least 1e-05"),  # logits / T overflowed: NaN, token 0
    (dict(temperature=float("inf")), "--temperature must be at least 1e-05 and finite"),  # uniform noise
    (dict(seed=10 ** 20), r"--seed must be an integer in \[0, 2\*\*63\), got 100000000000000000000"),
    (dict(seed=-1), "--seed must be an integer"),
    (dict(top_p=1.5), "--top-p must be in"),
])
def test_bad_decoding_settings(change, message):
    with pytest.raises(GenerationError, match=message):
        DecodingSettings(**change).validate()


def test_prompt_longer_than_the_model_is_cut_and_the_batch_completes(lm, capsys):
    model, tokenizer = lm  # 256 positions; no run settings: the budget leaves room for the new tokens
    long = "red " * 300
    outputs = generate_batch(model, tokenizer, [long, "yes"], GREEDY)
    assert len(outputs) == 2
    assert capsys.readouterr().err == ("warning: 1 of 2 prompts longer than 244 tokens were cut (keep_end), "
                                       "as training cuts them\n")
    assert outputs[1] == generate_batch(model, tokenizer, ["yes"], GREEDY)[0]  # the other prompt is untouched


def test_each_prompt_keeps_its_own_new_token_budget_beside_a_longer_one(lm):
    """Left-padded rows start at position 0: a short prompt may write up to the model's positions minus its own
    length, whatever the longest prompt of its batch; a row stopped there is cut (not ended)."""
    model, tokenizer = lm  # 256 positions
    decoding = DecodingSettings(greedy=True, max_new_tokens=256, stop_strings=())
    short, long = "what color", "red " * 100
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
    alone, alone_ended = generate_batch_ended(model, tokenizer, [short], decoding)
    both, both_ended = generate_batch_ended(model, tokenizer, [short, long], decoding)
    assert not alone_ended[0] and len(ids(alone[0])) > 256 - len(ids(long))  # cut at the positions, not the batch's
    assert (both[0], both_ended[0]) == (alone[0], alone_ended[0])
    assert both[1] == generate_batch_ended(model, tokenizer, [long], decoding)[0][0]


def test_run_settings_are_the_prompt_defaults(tmp_path):
    final = _run_with_settings(tmp_path, {"template": "chat", "max_prompt_length": 48, "truncation_mode": "keep_start"})
    settings = run_settings(final)
    decoding = DecodingSettings().for_run(settings)
    assert (decoding.template, decoding.max_prompt_length, decoding.truncation_mode) == ("chat", 48, "keep_start")
    chosen = DecodingSettings(chat_template=False, max_prompt_length=10, truncation_mode="keep_end").for_run(settings)
    assert (chosen.template, chosen.max_prompt_length, chosen.truncation_mode) == ("recipe", 10, "keep_end")
    assert run_settings(tmp_path) == {}
    unset = DecodingSettings().for_run({})  # no run settings: the model decides, by whether it ships a chat template
    assert unset.template == "auto"
    plain, chat = tiny_tokenizer(), tiny_tokenizer()
    chat.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    assert (unset.for_tokenizer(plain).template, unset.for_tokenizer(chat).template) == ("recipe", "chat")
    assert chosen.for_tokenizer(chat).template == "recipe"  # a choice made stays made
    (final / "dpo_run.json").write_text(json.dumps({"max_prompt_length": 0}))
    with pytest.raises(GenerationError, match="max_prompt_length must be a positive integer"):
        run_settings(final)


def test_prompt_budget():
    assert prompt_budget(256, 256) == 128  # no run limit: half the positions at least
    assert prompt_budget(256, 12) == 244  # or what the new tokens leave
    assert prompt_budget(256, 12, max_prompt_length=48) == 48  # the run's limit
    assert prompt_budget(256, 12, max_prompt_length=1000) == 255  # capped: one new token fits
    assert prompt_budget(None, 12) is None and prompt_budget(None, 12, 48) == 48


def test_precision_by_device():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) in ((torch.float16, torch.bfloat16) if torch.cuda.is_available()
                                                           else (torch.float16,))
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(GenerationError):
        resolve_dtype("fp64", torch.device("cpu"))


# ---------------------------------------------------------------------------------------------------- batch files

UNICODE = ["Qu'est-ce que « π » ?", "日本語で答えて", "emoji 🙂 and \"quotes\"\nnewline"]


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_batch_file_round_trip_keeps_unicode_and_fields(tmp_path, model_dir, lm, suffix, capsys):
    rows = [{"instruction": text, "dataset": f"set{i}"} for i, text in enumerate(UNICODE)]
    source = tmp_path / f"in{suffix}"
    if suffix == ".json":
        source.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    else:
        source.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n\n", encoding="utf-8")
    out = tmp_path / "out.json"
    assert generate.cli(["--model", model_dir, "--instructions", str(source), "--output", str(out), "--greedy",
                         "--max-new-tokens", "6", "--batch-size", "2", "--no-progress"]) == 0
    records = json.loads(out.read_text(encoding="utf-8"))
    model, tokenizer = lm
    expected = generate_batch(model, tokenizer, UNICODE, DecodingSettings(greedy=True, max_new_tokens=6))
    assert [set(r) for r in records] == [{"instruction", "output", "generator", "dataset"}] * 3
    assert [r["instruction"] for r in records] == UNICODE
    assert [r["output"] for r in records] == expected
    assert {r["generator"] for r in records} == {"model"}
    assert [r["dataset"] for r in records] == ["set0", "set1", "set2"]
    assert "日本語で答えて" in out.read_text(encoding="utf-8")  # written as UTF-8, not \u escapes
    printed = capsys.readouterr()
    # on stderr: with --output /dev/stdout the outputs alone are on stdout, one JSON document
    assert "3 outputs of model" in printed.err and printed.out == ""


def test_write_outputs_sets_the_generator(tmp_path):
    write_outputs(tmp_path / "o.json", [{"instruction": "a", "output": "old", "generator": "old"}], ["new"], "me")
    assert json.loads((tmp_path / "o.json").read_text()) == [{"instruction": "a", "output": "new", "generator": "me"}]


def test_single_object_file_is_one_row(tmp_path):
    path = tmp_path / "one.json"
    path.write_text('{"instruction": "yes"}')
    assert read_instructions(path) == [{"instruction": "yes"}]
    path.write_text('{"instruction": "yes", "input": " "}')  # an empty Alpaca input leaves nothing out
    assert read_instructions(path) == [{"instruction": "yes", "input": " "}]


def test_a_batch_file_from_a_pipe_is_read_once(tmp_path):
    """/dev/stdin or <(...) can be read once: JSON Lines, which a whole-file parse fails on, come from that one read."""
    import threading

    rows = [{"instruction": "one"}, {"instruction": "two"}]
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_text("".join(json.dumps(r) + "\n" for r in rows)))
    writer.start()
    try:
        assert read_instructions(fifo) == rows
    finally:
        writer.join(timeout=10)


def test_a_batch_file_that_is_not_utf8_names_the_line_of_the_byte(tmp_path):
    path = tmp_path / "latin.json"
    path.write_bytes(b'[\n{"instruction": "a"},\n{"instruction": "caf\xe9"}\n]')
    with pytest.raises(BatchFileError, match=re.escape(f"{path}, line 3: not UTF-8 (byte 0xe9 at column 21)")):
        read_instructions(path)


def test_batch_files_read_as_the_training_data_does(tmp_path):
    """JSON Lines whose text holds U+2028 or U+0085 (json.dumps writes them raw), and a byte order mark."""
    path = tmp_path / "in.jsonl"
    rows = [{"instruction": "Say hi\u2028please"}, {"instruction": "next\x85line"}, {"instruction": "third"}]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    assert read_instructions(path) == rows
    path.write_text(json.dumps(rows), encoding="utf-8-sig")
    assert read_instructions(path) == rows


@pytest.mark.parametrize("content, message", [
    ("this is not json\n", "bad.json, line 1: not valid JSON (Expecting value, column 1)"),
    ('{"instruction": "a"}\n{"instruction": \n', "bad.json, line 2: not valid JSON"),
    ('[{"instruction": "a"}, {"text": "b"}]', "row 1: no 'instruction' or 'prompt' field"),
    ('{"instruction": "a"}\n{"input": "b"}\n', "row 1: no 'instruction' or 'prompt' field"),
    ('[{"instruction": "  "}]', "row 0: field 'instruction' is empty"),
    ('[{"instruction": "a", "input": ""}, {"instruction": "Sum these.", "input": "2, 3"}]',
     "row 1: a non-empty 'input' field, which the prompt would leave out"),
    ('[{"instruction": 3}]', "row 0: field 'instruction' is a int"),
    ('[{"instruction": "Human: hi\\n\\nAssistant: yo\\n\\nHuman: \\n\\nAssistant:"}]',
     "row 0: field 'instruction' is a conversation that training would skip (user turn 2 of 2 (message 2) is empty)"),
    ('[{"instruction": "a\\ud800"}]', "record 0: not Unicode text (a lone surrogate '\\ud800' at character 2"),
    ('["a"]', "row 0: expected an object"),
    ('"a string"', "expected a JSON array of records"),
    ("[]", "no rows"),
    # as the training data's reader says it: where the error is, whatever json raises
    ('[\n  {"instruction": "hi"},\n  {"instruction": "yo",}\n]', "bad.json, line 3: not valid JSON (Expecting "
                                                                 "property name enclosed in double quotes, column 24)"),
    pytest.param('{"instruction": "hi", "id": ' + "9" * 5000 + "}\n", "bad.json: not valid JSON (Exceeds the limit",
                 id="huge-integer"),
    pytest.param("[" * 100_000, "bad.json: not valid JSON (nested too deeply)", id="deep-nesting"),
    ('[{"prompt": [{"role": "user", "content": "hi"}]}]', "row 0: field 'prompt' is a list, not a string"),
])
def test_bad_batch_files(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(BatchFileError, match=re.escape(message)):
        read_instructions(path)


# ---------------------------------------------------------------------------------------------------- CLI


def test_cli_single_instruction_prints_the_response(model_dir, lm, capsys):
    assert generate.cli(["--model", model_dir, "--greedy", "--max-new-tokens", "8", "what color is the sun?"]) == 0
    model, tokenizer = lm
    expected = generate_batch(model, tokenizer, ["what color is the sun?"], DecodingSettings(greedy=True,
                                                                                          max_new_tokens=8))
    assert capsys.readouterr().out == expected[0] + "\n"


def test_cli_compare_shows_both_models(tmp_path, model_dir, capsys):
    other = str(make_model_dir(tmp_path / "other", seed=7))
    assert generate.cli(["--model", model_dir, "--compare", other, "--greedy", "--max-new-tokens", "4",
                         "yes"]) == 0
    out = capsys.readouterr().out
    assert "### Human: yes" in out
    title_line = [line for line in out.splitlines() if "|" in line][0]
    assert title_line.split("|")[0].strip() == "model" and title_line.split("|")[1].strip() == "other"


def test_ctrl_c_ends_a_command_in_one_line_without_a_traceback(capsys):
    from dpo.cli import run_cli

    def interrupted(argv):
        raise KeyboardInterrupt

    assert run_cli(interrupted, None) == 130 and capsys.readouterr().err == "interrupted\n"


def sigint_caught(pid: int) -> bool:
    """Whether process `pid` has a handler for SIGINT (Linux: /proc's caught-signals mask)."""
    import signal
    from pathlib import Path

    proc = Path(f"/proc/{pid}/status")
    if not proc.parent.parent.is_dir():  # no /proc: assume it has (the wait after it is then the whole margin)
        time.sleep(1.0)
        return True
    status = proc.read_text()
    mask = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
    return bool(mask >> (signal.SIGINT - 1) & 1)


def test_ctrl_c_while_starting_exits_even_inside_a_finalizer():
    """Python reports an exception raised in a finalizer (or a weakref or GC callback, which imports run) as ignored
    and goes on: the interrupt while starting must exit wherever its handler runs."""
    script = textwrap.dedent("""
        import os, signal
        from dpo.cli import exit_quietly_on_interrupt
        exit_quietly_on_interrupt()

        class Finalized:
            def __del__(self):
                os.kill(os.getpid(), signal.SIGINT)
                for _ in range(1000):  # the handler runs between these bytecodes, inside __del__
                    pass

        Finalized()
        print("went on")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert (done.returncode, done.stdout, done.stderr) == (130, "", "interrupted\n")


@pytest.mark.slow
@pytest.mark.parametrize("command", [["train.py", "--output-dir", "{tmp}/unused"], ["generate.py"],
                                     ["-m", "dpo.evaluate", "--model", "{tmp}/unused"], ["-m", "dpo.ifeval", "--help"]])
def test_ctrl_c_while_a_command_imports_is_one_line_too(command, tmp_path):
    """An entry point's imports (torch, transformers) take seconds before run_cli starts: Ctrl-C then is the same
    `interrupted` and status 130, not a traceback from inside an import."""
    import signal
    from pathlib import Path

    import dpo.cli

    root = Path(__file__).resolve().parents[1]
    assert signal.getsignal(signal.SIGINT) is not dpo.cli._interrupted_while_starting  # importing never installs it
    command = [part.format(tmp=tmp_path) for part in command]  # a run that went on would write there, not here
    process = subprocess.Popen([sys.executable, *command], cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # python is up once it catches SIGINT (its own handler, then the entry point's, installed before the imports of
    # several seconds); then a moment for the entry point's first lines, however loaded the machine is
    deadline = time.monotonic() + 60
    while not sigint_caught(process.pid) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.02)
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert (process.returncode, err) == (130, "interrupted\n")


def test_interactive_streams_each_answer(model_dir, lm):
    model, tokenizer = lm
    generator = generate.Generator(model_dir, torch.float32, torch.device("cpu"))
    lines = iter(["what color is the sun?", "   ", "exit"])
    written = []
    generate.interactive(generator, None, SAMPLED, 8, read=lambda prompt: next(lines), write=written.append)
    expected = generate_batch(model, tokenizer, ["what color is the sun?"], SAMPLED)[0]
    assert "".join(written).endswith("### Assistant: " + expected + "\n")
    # a line that cannot be answered is reported, and the session goes on
    lines = iter(["a \udcff b", "### Human: \n\n### Assistant:", "what color is the sun?", "exit"])
    written = []
    generate.interactive(generator, None, SAMPLED, 8, read=lambda prompt: next(lines), write=written.append)
    text = "".join(written)
    assert "error: the instruction is not Unicode text (a lone surrogate" in text
    assert "error: the instruction is a conversation that training would skip" in text
    assert text.endswith("### Assistant: " + expected + "\n") and text.count("### Assistant: ") == 1


def _model_without_tokenizer(tmp_path):
    source = make_model_dir(tmp_path / "full")
    target = tmp_path / "no_tokenizer"
    target.mkdir()
    for name in ("config.json", "model.safetensors"):
        (target / name).write_bytes((source / name).read_bytes())
    return str(target)


def _run_with_settings(tmp_path, settings):
    final = make_model_dir(tmp_path / "run" / "final")
    (final / "dpo_run.json").write_text(json.dumps(settings))
    return final


@pytest.mark.parametrize("case, message", [
    ("empty", "the instruction is empty"),
    ("blank", "the instruction is empty"),
    ("empty_hh_turn", "the instruction is a conversation that training would skip (user turn 1 of 1"),
    ("empty_recipe_turn", "the instruction is a conversation that training would skip (user turn 1 of 1"),
    ("undecodable", "the instruction is not Unicode text (a lone surrogate '\\udcff' at character 2)"),
    ("not_json", "not valid JSON"),
    ("no_instruction", "no 'instruction' or 'prompt' field"),
    ("no_tokenizer", "tokenizer"),
    ("zero_tokens", "--max-new-tokens must be at least 1"),
    ("negative_tokens", "--max-new-tokens must be at least 1"),
    ("missing_model", "does not exist"),
    ("no_chat_template", "has no chat template"),
    ("bad_truncation_mode", "--truncation-mode must be one of keep_end, keep_start"),
    ("zero_prompt_length", "--max-prompt-length must be at least 1"),
    ("bad_run_settings", "dpo_run.json: truncation_mode must be one of"),
])
def test_cli_bad_input_is_one_line_and_exit_code_2(tmp_path, model_dir, capsys, case, message):
    batch = tmp_path / "batch.jsonl"
    args = {
        "empty": ["--model", model_dir, ""],
        "blank": ["--model", model_dir, "   "],
        "empty_hh_turn": ["--model", model_dir, "\n\nHuman: \n\nAssistant:"],
        "empty_recipe_turn": ["--model", model_dir, "### Human: \n\n### Assistant:"],
        "undecodable": ["--model", model_dir, b"a\xffb".decode("utf-8", "surrogateescape")],  # as sys.argv has it
        "not_json": ["--model", model_dir, "--instructions", str(batch), "--output", str(tmp_path / "o.json")],
        "no_instruction": ["--model", model_dir, "--instructions", str(batch), "--output", str(tmp_path / "o.json")],
        "no_tokenizer": ["--model", _model_without_tokenizer(tmp_path), "yes"],
        "zero_tokens": ["--model", model_dir, "--max-new-tokens", "0", "yes"],
        "negative_tokens": ["--model", model_dir, "--max-new-tokens", "-1", "yes"],
        "missing_model": ["--model", str(tmp_path / "nope") + "/", "yes"],
        "no_chat_template": ["--model", model_dir, "--chat-template", "yes"],
        "bad_truncation_mode": ["--model", model_dir, "--truncation-mode", "keep_middle", "yes"],
        "zero_prompt_length": ["--model", model_dir, "--max-prompt-length", "0", "yes"],
        "bad_run_settings": ["--model", str(_run_with_settings(tmp_path, {"truncation_mode": "middle"})), "yes"],
    }[case]
    batch.write_text("instruction: yes\n" if case == "not_json" else '{"instruction": "a"}\n{"text": "b"}\n')
    capsys.readouterr()  # drop what building the test models printed
    assert generate.cli(args) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1
    assert message in captured.err
    assert not (tmp_path / "o.json").exists()


@pytest.mark.parametrize("errors", ["surrogateescape", "strict"])
def test_undecodable_stdin_is_one_line_whatever_its_error_handler(model_dir, monkeypatch, capsys, errors):
    """Bytes on stdin that are not UTF-8: Python reads them as lone surrogates under a UTF-8 locale, but raises under
    PYTHONIOENCODING=utf-8:strict; either way generate.py names them in the same one line (docs/errors.md)."""
    stdin = io.TextIOWrapper(io.BytesIO(b"What \xff is 3 plus 4?\n"), encoding="utf-8", errors=errors)
    monkeypatch.setattr(sys, "stdin", stdin)
    assert generate.cli(["--model", model_dir, "--max-new-tokens", "4"]) == 2
    assert capsys.readouterr().err == ("error: the instruction is not Unicode text (a lone surrogate '\\udcff' at "
                                       "character 6)\n")


def _refuse_to_load(monkeypatch):
    """Loading a model fails the test: an output path is checked before any model is loaded."""
    def load(*args, **kwargs):
        raise AssertionError("a model was loaded before the output path was checked")
    monkeypatch.setattr(generate, "Generator", load)


@pytest.mark.parametrize("case, message", [
    ("directory", "--output {tmp}/outputs: is a directory"),
    ("under_a_file", "--output {tmp}/batch.jsonl/o.json: its parent {tmp}/batch.jsonl is not a directory"),
    ("deep_under_a_file", "--output {tmp}/batch.jsonl/a/b/o.json: its parent {tmp}/batch.jsonl is not a directory"),
    ("not_writable", "--output {tmp}/o.json: cannot write there (Permission denied)"),
])
def test_cli_output_that_cannot_be_written_fails_before_loading(tmp_path, monkeypatch, capsys, case, message):
    batch = tmp_path / "batch.jsonl"
    batch.write_text('{"instruction": "a"}\n')
    (tmp_path / "outputs").mkdir()
    output = {"directory": tmp_path / "outputs", "under_a_file": batch / "o.json",
              "deep_under_a_file": batch / "a" / "b" / "o.json", "not_writable": tmp_path / "o.json"}[case]
    if case == "not_writable":  # a directory that refuses new files, also where the tests run as root
        def refuse(*args, **kwargs):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        monkeypatch.setattr("tempfile.mkstemp", refuse)
    _refuse_to_load(monkeypatch)
    assert generate.cli(["--model", "demo", "--instructions", str(batch), "--output", str(output)]) == 2
    assert capsys.readouterr().err == f"error: {message.format(tmp=tmp_path)}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["batch.jsonl", "outputs"]  # nothing left behind
    assert not any((tmp_path / "outputs").iterdir())


def test_cli_output_in_new_directories_is_checked_and_written(tmp_path, model_dir):
    output = tmp_path / "new" / "dirs" / "o.json"
    batch = tmp_path / "batch.jsonl"
    batch.write_text('{"instruction": "a"}\n')
    assert generate.cli(["--model", model_dir, "--instructions", str(batch), "--output", str(output), "--greedy",
                         "--max-new-tokens", "2", "--no-progress"]) == 0
    assert [r["instruction"] for r in json.loads(output.read_text())] == ["a"]
    assert os.listdir(output.parent) == ["o.json"] and (output.stat().st_mode & 0o777) == 0o644


def test_cli_output_failing_while_written_leaves_the_earlier_file(tmp_path, model_dir, monkeypatch, capsys):
    batch = tmp_path / "batch.jsonl"
    batch.write_text('{"instruction": "a"}\n{"instruction": "b"}\n')
    output = tmp_path / "o.json"
    output.write_text("earlier outputs\n")

    def disk_full(fd):  # after the text went into the temporary file, before it replaces the output
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "fsync", disk_full)
    assert generate.cli(["--model", model_dir, "--instructions", str(batch), "--output", str(output), "--greedy",
                         "--max-new-tokens", "2", "--no-progress"]) == 2
    assert capsys.readouterr().err == f"error: {output}: cannot be written (No space left on device)\n"
    assert output.read_text() == "earlier outputs\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["batch.jsonl", "o.json"]  # no partial temporary file


def test_write_output_text_interrupted_leaves_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "o.json"
    path.write_text("earlier")
    path.chmod(0o600)

    def interrupt(fd):
        raise KeyboardInterrupt
    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", interrupt)
        with pytest.raises(KeyboardInterrupt):
            write_output_text(path, "new text")
    assert path.read_text() == "earlier" and os.listdir(tmp_path) == ["o.json"]
    link = tmp_path / "link.json"
    link.symlink_to(path)
    write_output_text(link, "new text")  # through a link: the link stays, its target is replaced
    assert link.is_symlink() and path.read_text() == "new text" and (path.stat().st_mode & 0o777) == 0o600
    assert sorted(os.listdir(tmp_path)) == ["link.json", "o.json"]
    if os.path.isdir("/dev/shm"):  # a file under /dev is a file: replaced whole, not appended to
        shm = f"/dev/shm/dpo-test-{os.getpid()}.json"
        try:
            write_output_text(shm, "first\n")
            write_output_text(shm, "second\n")
            assert Path(shm).read_text() == "second\n"
        finally:
            os.remove(shm)


@pytest.mark.parametrize("redirect", ["w", "a"])
def test_dev_stdout_redirected_to_a_file_is_written_through_stdout(tmp_path, redirect):
    """--output /dev/stdout with stdout redirected to a file (> or >>): that file is the program's stdout, which it
    keeps writing to; the outputs go through it, between the lines printed before and after, never renamed over it."""
    log = tmp_path / "app.log"
    log.write_text("earlier\n")
    code = ("print('before', flush=True)\nfrom dpo.generation import write_output_text\n"
            "write_output_text('/dev/stdout', 'outputs\\n')\nprint('after')\n")
    with open(log, redirect) as handle:
        subprocess.run([sys.executable, "-c", code], stdout=handle, check=True, timeout=120)
    assert log.read_text() == ("earlier\n" if redirect == "a" else "") + "before\noutputs\nafter\n"


# ---------------------------------------------------------------------------------------------------- names, display


def test_generator_names_and_run_directories(tmp_path):
    run = tmp_path / "myrun"
    make_model_dir(run / "final")
    assert resolve_run_model(str(run)) == str(run / "final")
    assert generator_name(str(run / "final")) == "myrun/final"
    assert generator_name(str(run / "final") + "/") == "myrun/final"
    assert generator_name("lxuechen/phi-2-dpo") == "lxuechen/phi-2-dpo"
    plain = make_model_dir(tmp_path / "plain")
    assert generator_name(str(plain)) == "plain" and resolve_run_model(str(plain)) == str(plain)


def test_a_lora_runs_directory_stands_for_its_adapter(tmp_path, capsys):
    """A LoRA run's final/ is an adapter (adapter_config.json, no config.json): the run directory stands for it, as
    a full run's does, in generate.py and dpo.evaluate alike."""
    import peft

    base = make_model_dir(tmp_path / "sft")
    run = tmp_path / "lorarun"
    adapted = peft.get_peft_model(load_causal_lm(str(base)), peft.LoraConfig(r=4, target_modules="all-linear",
                                                                              init_lora_weights=False))
    adapted.save_pretrained(run / "final")
    load_tokenizer(str(base)).save_pretrained(run / "final")
    assert not (run / "final" / "config.json").exists()
    assert resolve_run_model(str(run)) == str(run / "final")
    assert resolve_run_model(str(run / "final")) == str(run / "final")  # an adapter directory stands for itself
    evaluate.check_model(str(run))
    answers = []
    for model in (run, run / "final"):
        assert generate.cli(["--model", str(model), "--greedy", "--max-new-tokens", "6", "what color is it?"]) == 0
        answers.append(capsys.readouterr().out)
    assert answers[0] == answers[1] and answers[0].strip()


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_a_checkpoint_is_a_model_as_final_is(tmp_path, capsys, lora):
    """checkpoint-<step>/ stands for its model/, which holds the tokenizer and the run's settings as final/ does:
    generate.py answers with it and dpo.evaluate scores it (the win rate of the demo peaks before its last step)."""
    from harness import make_run_dir, train_tiny

    root = make_run_dir(tmp_path, 24)
    run = train_tiny(root, "run", "--max-steps", "3", "--save-steps", "1", "--batch-size", "8", "--micro-batch-size",
                     "8", "--eval-generate", "0", "--lr", "1e-2", *(["--lora-r", "4"] if lora else []))
    checkpoint = run / "checkpoint-2"
    assert resolve_run_model(str(checkpoint)) == str(checkpoint / "model")
    assert generator_name(str(checkpoint / "model")) == "run/checkpoint-2"
    saved = json.loads((checkpoint / "model" / "dpo_run.json").read_text())
    assert saved == json.loads((run / "final" / "dpo_run.json").read_text())
    assert saved["dataset_path"] == str((root / "pairs.jsonl").resolve())  # dpo.evaluate finds it from anywhere
    assert generate.cli(["--model", str(checkpoint), "--greedy", "--max-new-tokens", "4", "what color is it?"]) == 0
    assert capsys.readouterr().out.strip()
    rewards = {}
    for model in (checkpoint, run / "final"):
        assert evaluate.cli(["--model", str(model), "--implicit-reward", "--skip-win-rate"]) == 0
        report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["implicit_reward"]
        assert report["pairs"] == 8  # the run's held-out pairs (test size 8)
        rewards[model.name] = report["chosen_reward"]
    # step 2's weights, moved from the start (step 1 warms up from lr 0) and not the final step's
    assert rewards["checkpoint-2"] != 0 and rewards["checkpoint-2"] != rewards["final"]


def test_a_builtin_or_hub_dataset_records_no_path(tmp_path, monkeypatch):
    import train

    (tmp_path / "demo").mkdir()  # a directory named as the built-in data: the built-in is what a run reads
    monkeypatch.chdir(tmp_path)
    assert train.dataset_path("demo") is None and train.dataset_path("HuggingFaceH4/ultrafeedback_binarized") is None
    (tmp_path / "pairs.jsonl").write_text("")
    assert train.dataset_path("pairs.jsonl") == str(tmp_path.resolve() / "pairs.jsonl")


def test_saving_a_usable_policy_leaves_the_live_models_decoding_as_it_was(tmp_path):
    """A checkpoint's model/ (and final/) carry the card's decoding with every EOS the model stops at, while the
    policy that goes on training keeps its own generation config: online sampling and --eval-generate read its EOS
    ids, and a save in the middle of a run must not change how it samples."""
    import types

    import train

    base = make_model_dir(tmp_path / "sft")
    policy, tokenizer = load_causal_lm(str(base)), load_tokenizer(str(base))
    policy.generation_config.eos_token_id, policy.generation_config.top_k = [tokenizer.eos_token_id, 7, 8], 50
    state = types.SimpleNamespace(policy=policy, adapters=None)
    train.save_usable_policy(state, tmp_path / "saved", dict(policy.state_dict()), tokenizer, {"beta": 0.1})
    assert policy.generation_config.eos_token_id == [tokenizer.eos_token_id, 7, 8]
    assert policy.generation_config.top_k == 50 and not policy.generation_config.do_sample
    saved = json.loads((tmp_path / "saved" / "generation_config.json").read_text())
    assert saved["eos_token_id"] == [tokenizer.eos_token_id, 7, 8] and saved["top_k"] == 0
    assert (saved["temperature"], saved["top_p"], saved["do_sample"]) == (0.7, 0.9, True)
    assert json.loads((tmp_path / "saved" / "dpo_run.json").read_text()) == {"beta": 0.1}
    assert (tmp_path / "saved" / "tokenizer_config.json").is_file()


def test_demo_names_the_shipped_model_beside_a_run_directory_called_demo(tmp_path, monkeypatch):
    """`--compare demo` in a directory holding a run `demo/` (train.py --output-dir demo) is the shipped SFT model,
    as `--model demo` is for every tool; `./demo` is the run."""
    make_model_dir(tmp_path / "demo" / "final")
    monkeypatch.chdir(tmp_path)
    assert resolve_run_model("demo") == "demo"
    assert resolve_model_path(resolve_run_model("demo")) == str(DEMO_MODEL_DIR)
    assert resolve_run_model("./demo") == str(Path("demo") / "final")


def test_side_by_side_wraps_each_answer_in_its_column():
    text = side_by_side("left", "a " * 40, "right", "short", width=41)
    lines = text.splitlines()
    assert lines[0].startswith("left") and lines[0].endswith("| right")
    assert all(len(line.split("|")[0].rstrip()) <= 20 for line in lines)
    assert "".join(line.split("|")[0] for line in lines[2:]).replace(" ", "") == "a" * 40
    assert lines[2].endswith("| short")


def test_top_p_keeps_exactly_the_nucleus_without_sorting_the_whole_vocabulary():
    from transformers.generation.logits_process import TopPLogitsWarper

    from dpo.generation import TopP

    def nucleus(scores, p):  # the definition: a token stays when the tokens above it hold less than p
        probs = scores.double().softmax(-1)
        ordered, index = probs.sort(-1, descending=True)
        return torch.zeros_like(probs, dtype=torch.bool).scatter(-1, index, (ordered.cumsum(-1) - ordered) < p)

    generator = torch.Generator().manual_seed(0)
    for scale in (0.3, 3.0, 12.0):  # flat rows take the whole-sort path, peaked rows the candidates only
        scores = torch.randn(24, 5000, generator=generator) * scale
        scores[:3] = scores[:3] * 0.01  # nearly uniform: the nucleus reaches far below 64 candidates
        for p in (0.3, 0.9, 0.97):
            kept = TopP(p, candidates=64)(None, scores.clone()) != -float("inf")
            assert torch.equal(kept, nucleus(scores, p))
            assert kept.any(-1).all()  # never an empty row
    peaked = torch.randn(8, 5000, generator=generator) * 12.0
    assert torch.equal(TopP(0.9)(None, peaked.clone()), TopPLogitsWarper(0.9)(None, peaked.clone()))
    assert TopP(1.0)(None, peaked) is peaked  # top-p 1 filters nothing


def test_k_samples_per_prompt_in_batches_of_prompts(lm):
    """num_samples: k responses per instruction, instruction-major, equal to the instructions repeated k times, also
    when the prompts are split over several batches."""
    model, tokenizer = lm
    instructions = ["what color is the sun?", "yes", "tell me about the moon", "two"]
    repeated = generate_batch(model, tokenizer, [t for t in instructions for _ in range(3)], SAMPLED, batch_size=12)
    assert generate_batch(model, tokenizer, instructions, SAMPLED, batch_size=4, num_samples=3) == repeated
    by_two = generate_batch(model, tokenizer, instructions, SAMPLED, batch_size=2, num_samples=3)
    assert by_two == generate_batch(model, tokenizer, [t for t in instructions for _ in range(3)], SAMPLED,
                                    batch_size=6)
    with pytest.raises(GenerationError, match="num_samples must be at least 1"):
        generate_batch(model, tokenizer, instructions, SAMPLED, num_samples=0)
