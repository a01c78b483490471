"""dpo.data: formats, rendering, exact tokenization, truncation, collation, subsets and bad input.

Most tests use a character-level tokenizer (one id per character) so every expected id list can be written
by hand; the real-data tests use the GPT-2 BPE and the preference pairs from the shared folder beside the
repository, and skip when it is absent.
"""

import json
import os
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from dpo import data  # noqa: E402
from dpo.data import (  # noqa: E402
    DataError,
    DataStats,
    PreferenceExample,
    RowError,
    TokenizedPair,
    build_pairs,
    collate_pairs,
    detect_format,
    epoch_permutation,
    instruction_records,
    load_records,
    select_subset,
    to_example,
    tokenize_pair,
    train_test_split,
)
from dpo.prompts import format_prompt, format_response  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
PAIRS_DIR = SHARED / "data" / "alpacaeval-phi2-prefs"  # its pairs.jsonl: conftest's pair_rows; GPT-2: its gpt2


class CharTokenizer:
    """id = ord(char) + 10; EOS = 0, BOS = 1 (prepended only when add_bos and add_special_tokens).
    The texts "</s>" and "<s>" map to EOS / BOS unless split_special_tokens."""

    OFFSET = 10
    SPECIAL = {"</s>": 0, "<s>": 1}

    def __init__(self, add_bos: bool = False, eos_token_id: int | None = 0):
        self.add_bos = add_bos
        self.eos_token_id = eos_token_id
        self.bos_token_id = 1
        self.chat_template = None

    def encode_text(self, text: str, add_special_tokens: bool = True, split_special_tokens: bool = False) -> list:
        ids = [1] if (self.add_bos and add_special_tokens) else []
        pieces = [text] if split_special_tokens else re.split(r"(</s>|<s>)", text)
        for piece in pieces:
            if not split_special_tokens and piece in self.SPECIAL:
                ids.append(self.SPECIAL[piece])
            else:
                ids += [ord(c) + self.OFFSET for c in piece]
        return ids

    def __call__(self, text, add_special_tokens=True, split_special_tokens=False, verbose=True):
        encode = lambda t: self.encode_text(t, add_special_tokens, split_special_tokens)  # noqa: E731
        return {"input_ids": [encode(t) for t in text] if isinstance(text, list) else encode(text)}


def char_ids(text: str) -> list[int]:
    return [ord(c) + CharTokenizer.OFFSET for c in text]


EOS = 0
BOS = 1


def explicit(prompt="Say hi", chosen="Hi!", rejected="Go away.", **extra):
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, **extra}


def conversation(prompt: str, answer) -> list:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


# ---------------------------------------------------------------------------------------------------
# Real data: GPT-2 BPE on all pairs


def test_all_real_pairs_tokenize_exactly_as_the_template_defines(gpt2, pair_rows):
    eos = gpt2.eos_token_id
    assert gpt2.bos_token_id == eos  # GPT-2 / Phi-2: BOS, EOS (and often PAD) are one id
    pairs, stats = build_pairs(pair_rows, gpt2, max_length=100_000, max_prompt_length=None, source="pairs.jsonl")

    identical_rows = [i for i, r in enumerate(pair_rows) if r["chosen"].strip() == r["rejected"].strip()]
    assert len(identical_rows) == 2  # the only unusable rows of this data set
    assert stats.rows == 2383 and stats.kept == 2381 and stats.skipped == {"identical_responses": 2}
    assert f"row {identical_rows[0]}" in stats.first_skip["identical_responses"]
    assert [p.row for p in pairs] == [i for i in range(2383) if i not in identical_rows]
    # the identical rows still tokenize; take them through tokenize_pair to cover all 2,383
    by_row = {p.row: p for p in pairs}
    for i in identical_rows:
        r = pair_rows[i]
        example = PreferenceExample(format_prompt(r["prompt"]), format_response(r["chosen"]),
                                    format_response(r["rejected"]), i)
        by_row[i] = tokenize_pair(example, gpt2, max_length=100_000, max_prompt_length=None)
    assert len(by_row) == 2383

    prompts = [format_prompt(r["prompt"]) for r in pair_rows]
    chosen = [" " + r["chosen"].strip() for r in pair_rows]
    rejected = [" " + r["rejected"].strip() for r in pair_rows]
    encode = lambda texts: gpt2(texts, add_special_tokens=False)["input_ids"]  # noqa: E731
    expected_prompt, expected_chosen, expected_rejected = encode(prompts), encode(chosen), encode(rejected)
    joint_chosen = encode([p + c for p, c in zip(prompts, chosen)])
    joint_rejected = encode([p + r for p, r in zip(prompts, rejected)])

    boundary_clean = 0
    for i in range(2383):
        pair = by_row[i]
        assert pair.prompt_ids == expected_prompt[i]
        assert pair.chosen_ids == expected_chosen[i] + [eos]
        assert pair.rejected_ids == expected_rejected[i] + [eos]
        assert eos not in pair.prompt_ids  # no BOS (= EOS id) anywhere in the prompt
        assert pair.chosen_ids.count(eos) == 1 and pair.rejected_ids.count(eos) == 1
        boundary_clean += (joint_chosen[i] == pair.prompt_ids + pair.chosen_ids[:-1]
                           and joint_rejected[i] == pair.prompt_ids + pair.rejected_ids[:-1])
    # the prompt ends with ":" and the response starts with " ", so BPE never merges across the boundary
    assert boundary_clean == 2383

    for i in range(0, 2383, 7):  # decoding is slow; a spread sample of rows
        pair = by_row[i]
        text = gpt2.decode(pair.prompt_ids + pair.chosen_ids[:-1], clean_up_tokenization_spaces=False)
        assert text == prompts[i] + chosen[i]
        text = gpt2.decode(pair.prompt_ids + pair.rejected_ids[:-1], clean_up_tokenization_spaces=False)
        assert text == prompts[i] + rejected[i]


def test_ultrafeedback_schema_split_yields_the_same_texts_as_pairs_jsonl(pair_rows):
    schema_dir = PAIRS_DIR / "ultrafeedback_schema"
    records, description = load_records(str(schema_dir), "train_prefs")
    assert len(records) == 2183 and "train_prefs" in description and "2183" in description
    assert detect_format(records[0]) == "conversational"

    def texts(record, row):
        try:
            e = to_example(record, row)
            return e.prompt, e.chosen, e.rejected
        except RowError as err:
            return err.reason

    expected_by_prompt: dict[str, Counter] = {}
    for i, r in enumerate(pair_rows):
        key = format_prompt(r["prompt"])
        expected_by_prompt.setdefault(key, Counter())[texts(r, i)] += 1
    skipped = 0
    for i, record in enumerate(records):
        got = texts(record, i)
        prompt = format_prompt(record["prompt"])
        if isinstance(got, str):
            skipped += 1
            assert got == "identical_responses"
        else:
            assert got[0] == prompt
        remaining = expected_by_prompt[prompt]
        assert remaining[got] > 0, f"row {i} has no matching row in pairs.jsonl"
        remaining[got] -= 1  # each pairs.jsonl row matches at most one schema row
    assert skipped <= 2


# ---------------------------------------------------------------------------------------------------
# Formats and rendering


def test_explicit_prompt_rendered_with_template_unless_already_rendered():
    e = to_example(explicit(prompt="Name a color.", chosen="  Blue.\n", rejected="Dog"), 3)
    assert e == PreferenceExample("### Human: Name a color.\n\n### Assistant:", " Blue.", " Dog", 3)
    rendered = "### Human: Name a color.\n\n### Assistant:"
    assert to_example(explicit(prompt=rendered), 0).prompt == rendered
    assert to_example(explicit(prompt=rendered + " \n"), 0).prompt == rendered  # no stray token before the response
    with pytest.raises(RowError, match="field 'prompt' \\(recipe text\\): user turn 2 of 2 \\(message 2\\) is empty") as err:
        to_example(explicit(prompt="### Human: a\n\n### Assistant: b\n\n### Human:  \n\n### Assistant:"), 0)
    assert err.value.reason == "empty_prompt"


def test_conversational_multi_turn_with_system_message():
    history = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "u1"},
        {"role": "assistant", "content": " a1 "},
        {"role": "user", "content": "u2"},
    ]
    record = {"prompt": "u1", "chosen": history + [{"role": "assistant", "content": "good"}],
              "rejected": history + [{"role": "assistant", "content": "bad"}]}
    assert detect_format(record) == "conversational"
    e = to_example(record, 0)
    assert e.prompt == "### Human: Be brief.\n\nu1\n\n### Assistant: a1\n\n### Human: u2\n\n### Assistant:"
    assert (e.chosen, e.rejected) == (" good", " bad")
    # a single user turn renders exactly like the explicit format
    single = {"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x"}],
              "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "y"}]}
    assert to_example(single, 0) == to_example(explicit("q", "x", "y"), 0)


def test_conversational_with_separate_prompt_messages():
    record = {"prompt": [{"role": "user", "content": "q"}],
              "chosen": [{"role": "assistant", "content": "x"}], "rejected": [{"role": "assistant", "content": "y"}]}
    assert to_example(record, 0) == PreferenceExample(format_prompt("q"), " x", " y", 0)


def test_a_prompt_string_with_one_assistant_message_each_is_that_prompt():
    record = {"prompt": "q", "chosen": [{"role": "assistant", "content": "x"}],
              "rejected": [{"role": "assistant", "content": "y"}]}
    assert to_example(record, 0) == to_example(explicit("q", "x", "y"), 0)
    # full conversations carry their user turn: the prompt string is not read twice (ultrafeedback_binarized)
    full = {"prompt": "q", "chosen": conversation("q", "x"), "rejected": conversation("q", "y")}
    assert to_example(full, 0) == to_example(explicit("q", "x", "y"), 0)


def test_hh_implicit_prompt_is_common_prefix_up_to_last_assistant_marker():
    history = "\n\nHuman: Hi there\n\nAssistant: Hello.\n\nHuman: How are you?\n\nAssistant:"
    record = {"chosen": history + " Fine, thanks.", "rejected": history + " Fine."}  # responses share " Fine"
    assert detect_format(record) == "implicit"
    e = to_example(record, 5)
    assert e.prompt == "### Human: Hi there\n\n### Assistant: Hello.\n\n### Human: How are you?\n\n### Assistant:"
    assert (e.chosen, e.rejected, e.row) == (" Fine, thanks.", " Fine.", 5)
    with pytest.raises(RowError, match="row 2") as err:
        to_example({"chosen": "just text", "rejected": "other text"}, 2)
    assert err.value.reason == "no_assistant_turn"


def test_a_bad_role_order_is_a_counted_skip_of_its_row():
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    record = {"chosen": messages + [{"role": "assistant", "content": "c"}],
              "rejected": messages + [{"role": "assistant", "content": "d"}]}
    with pytest.raises(RowError) as err:
        to_example(record, 4)
    assert err.value.reason == "bad_roles" and "row 4" in str(err.value)


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% if m['role'] == 'assistant' %}"
    "<|endoftext|>{% endif %}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def test_chat_template_rendering_and_single_eos(gpt2):
    import copy

    tokenizer = copy.copy(gpt2)
    tokenizer.chat_template = CHAT_TEMPLATE
    e = to_example(explicit("q", " x ", "y"), 0, template="chat", tokenizer=tokenizer)
    # the answer as the template renders it, its spaces kept; the "\n" after the end-of-turn text is not its own
    assert e == PreferenceExample("<|user|>q\n<|assistant|>", " x <|endoftext|>", "y<|endoftext|>", 0)
    pairs, _ = build_pairs([explicit("q", "x", "y")], tokenizer, template="chat")
    eos = tokenizer.eos_token_id
    assert pairs[0].chosen_ids == tokenizer("x", add_special_tokens=False)["input_ids"] + [eos]  # not doubled

    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}" \
                              "{% if add_generation_prompt %}[gen]{% endif %}"
    with pytest.raises(DataError, match="does not start with"):
        to_example(explicit(), 0, template="chat", tokenizer=tokenizer)
    with pytest.raises(DataError, match="chat template"):
        to_example(explicit(), 0, template="chat", tokenizer=CharTokenizer())


# SmolLM2's ChatML template, as its tokenizer_config.json ships it
SMOL_CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
               "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
               "{% endif %}")


@pytest.fixture(scope="module")
def chatml(gpt2):
    """GPT-2's BPE set up as SmolLM2's is: <|im_start|> / <|im_end|> special tokens, <|im_end|> the EOS, ChatML."""
    import copy

    tokenizer = copy.deepcopy(gpt2)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.chat_template = SMOL_CHATML
    return tokenizer


def chat_rendering(tokenizer, messages, **kwargs) -> list[int]:
    """The chat template's rendering of `messages`, tokenized as a whole."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


HISTORY = [{"role": "system", "content": "Be brief."}, user("Who wrote it?"), assistant(" Ada did.\n"), user("When?")]


@pytest.mark.parametrize("record, prompt", [
    (explicit("Who wrote it?", " According to the text, Ada.", "Nobody."), [user("Who wrote it?")]),
    (explicit("Who wrote it?", " According to the text:\n\nAda.\n", "Nobody."), [user("Who wrote it?")]),
    ({"chosen": HISTORY + [assistant(" According to the text, 1843.")], "rejected": HISTORY + [assistant("1900")]},
     HISTORY),
])
def test_chat_template_scores_exactly_the_conversations_rendering(chatml, record, prompt):
    """A phi-2 answer starting with a space: its tokens are those the template renders for the conversation
    ("ĠAccording"), not those of the stripped text ("According")."""
    pairs, stats = build_pairs([record], chatml, template="chat", max_length=10_000, max_prompt_length=None)
    assert stats.kept == 1
    pair, eos, newline = pairs[0], chatml.eos_token_id, chatml("\n", add_special_tokens=False)["input_ids"]
    assert pair.prompt_ids == chat_rendering(chatml, prompt, add_generation_prompt=True)
    for ids, answer in ((pair.chosen_ids, record["chosen"]), (pair.rejected_ids, record["rejected"])):
        answer = answer if isinstance(answer, str) else answer[-1]["content"]
        # the whole conversation tokenized = prompt + response; only the "\n" after <|im_end|> is not scored
        assert chat_rendering(chatml, prompt + [assistant(answer)]) == pair.prompt_ids + ids + newline
        assert ids[-1] == eos == chatml.convert_tokens_to_ids("<|im_end|>") and ids.count(eos) == 1
    assert chatml.convert_ids_to_tokens(pair.chosen_ids[0]) == "ĠAccording"
    # the same answer in a later turn's history is rendered the same way
    e = to_example(record, 0, template="chat", tokenizer=chatml)
    later = prompt + [assistant(e.chosen[:-len("<|im_end|>")]), user("And?")]
    assert chatml.apply_chat_template(later, tokenize=False).startswith(e.prompt + e.chosen + "\n")


def test_tokenize_pair_encodes_a_chat_rendering_as_build_pairs_does(chatml):
    """The implicit-reward judge scores one pair with tokenize_pair: <|im_start|> must stay one special token."""
    record = {"prompt": "q", "chosen": "a", "rejected": "b"}
    (built,), _ = build_pairs([record], chatml, max_length=256, max_prompt_length=128, template="chat")
    example = to_example(record, 0, template="chat", tokenizer=chatml)
    assert tokenize_pair(example, chatml, max_length=256, max_prompt_length=128, template="chat") == built
    assert chatml.convert_tokens_to_ids("<|im_start|>") in built.prompt_ids


def test_chat_template_on_all_real_pairs_is_the_conversations_rendering(chatml, pair_rows):
    pairs, stats = build_pairs(pair_rows, chatml, template="chat", max_length=100_000, max_prompt_length=None)
    identical = sum(r["chosen"].strip() == r["rejected"].strip() for r in pair_rows)
    assert stats.skipped == ({"identical_responses": identical} if identical else {})
    newline = chatml("\n", add_special_tokens=False)["input_ids"]
    leading_space = 0
    for pair in pairs:
        row = pair_rows[pair.row]
        prompt = [user(row["prompt"])]
        assert pair.prompt_ids == chat_rendering(chatml, prompt, add_generation_prompt=True)
        for ids, answer in ((pair.chosen_ids, row["chosen"]), (pair.rejected_ids, row["rejected"])):
            assert chat_rendering(chatml, prompt + [assistant(answer)]) == pair.prompt_ids + ids + newline
            if answer.startswith(" "):
                leading_space += 1
                assert chatml.convert_ids_to_tokens(ids[0]).startswith("Ġ")
    assert leading_space > 100  # phi-2's answers often start with a space


def test_chat_template_skips_answers_identical_up_to_their_whitespace(chatml):
    pairs, stats = build_pairs([explicit(chosen="Same answer", rejected=" Same answer\n"), explicit()], chatml,
                               template="chat")
    assert [p.row for p in pairs] == [1] and stats.skipped == {"identical_responses": 1}


def test_chat_template_skips_a_message_holding_a_special_tokens_text(chatml):
    """A chat rendering is encoded with its special tokens: "<|im_end|>" written in an answer would become the end of
    its turn (and the EOS), "<|endoftext|>" in a question a stray control token. The recipe template keeps it text."""
    rows = [explicit(prompt="What does <|endoftext|> mean?"), explicit(chosen="It ends here <|im_end|> then more"),
            explicit()]
    pairs, stats = build_pairs(rows, chatml, template="chat")
    assert [p.row for p in pairs] == [2] and stats.skipped == {"special_token_text": 2}
    assert "row 0: a user message holds the text of the special token '<|endoftext|>'" in stats.reasons()
    pairs, stats = build_pairs(rows, chatml, template="recipe")
    assert len(pairs) == 3 and all(chatml.convert_tokens_to_ids("<|im_end|>") not in p.chosen_ids[:-1] for p in pairs)


EMPTY_USER_TURNS = {  # rows whose prompt (or a user turn in it) says nothing: each is an "empty_prompt" skip
    "explicit, whitespace": explicit(prompt=" \n\t"),
    "conversational, final user turn empty": {"chosen": conversation("", "c"), "rejected": conversation("", "r")},
    "conversational, final user turn whitespace": {"chosen": conversation("  \n", "c"),
                                                   "rejected": conversation("  \n", "r")},
    "conversational, prompt messages [user '']": {"prompt": [user("")], "chosen": [assistant("c")],
                                                  "rejected": [assistant("r")]},
    "conversational, an earlier user turn empty": {"chosen": [user(" "), assistant("a"), user("q"), assistant("c")],
                                                   "rejected": [user(" "), assistant("a"), user("q"), assistant("r")]},
    "conversational, no user turn": {"chosen": [{"role": "system", "content": "s"}, assistant("c")],
                                     "rejected": [{"role": "system", "content": "s"}, assistant("r")]},
    "ultrafeedback schema, empty prompt": {"prompt": "", "prompt_id": "0", "chosen": conversation("", "c"),
                                           "rejected": conversation("", "r"), "messages": conversation("", "c"),
                                           "score_chosen": 8.0, "score_rejected": 2.0},
    "HH, final Human turn empty": {"chosen": "\n\nHuman: \n\nAssistant: x", "rejected": "\n\nHuman: \n\nAssistant: y"},
    "HH, an earlier Human turn empty": {"chosen": "\n\nHuman:  \n\nAssistant: a\n\nHuman: q\n\nAssistant: x",
                                       "rejected": "\n\nHuman:  \n\nAssistant: a\n\nHuman: q\n\nAssistant: y"},
    "HH, no Human turn": {"chosen": "\n\nAssistant: x", "rejected": "\n\nAssistant: y"},
}
GOOD_ROWS = [  # one usable row of each format
    explicit(),
    {"chosen": conversation("q", "c"), "rejected": conversation("q", "r")},
    {"prompt": [user("q")], "chosen": [assistant("c")], "rejected": [assistant("r")]},
    {"prompt": "q", "prompt_id": "1", "chosen": conversation("q", "c"), "rejected": conversation("q", "r"),
     "messages": conversation("q", "c"), "score_chosen": 8.0, "score_rejected": 2.0},
    {"chosen": "\n\nHuman: q\n\nAssistant: x", "rejected": "\n\nHuman: q\n\nAssistant: y"},
]


@pytest.mark.parametrize("case", sorted(EMPTY_USER_TURNS))
def test_an_empty_user_turn_is_an_empty_prompt_skip(case):
    with pytest.raises(RowError) as err:
        to_example(EMPTY_USER_TURNS[case], 7)
    assert err.value.reason == "empty_prompt" and str(err.value).startswith("row 7: ")


@pytest.mark.parametrize("template", ["recipe", "chat"])
def test_empty_user_turns_are_counted_skips_and_the_other_rows_load(template, request):
    tokenizer = request.getfixturevalue("chatml") if template == "chat" else CharTokenizer()
    bad = list(EMPTY_USER_TURNS.values())
    records = [row for pair in zip(GOOD_ROWS * 2, bad) for row in pair]  # good and bad rows interleaved
    pairs, stats = build_pairs(records, tokenizer, template=template)
    assert [p.row for p in pairs] == list(range(0, 2 * len(bad), 2))
    assert (stats.rows, stats.kept, stats.skipped) == (2 * len(bad), len(bad), {"empty_prompt": len(bad)})
    assert f"empty_prompt {len(bad)} (first: row 1: " in str(stats) and "\n" not in str(stats)


def test_literal_special_token_text_in_recipe_response_stays_text(gpt2):
    pair = tokenize_pair(PreferenceExample("### Human: q\n\n### Assistant:", " a <|endoftext|> b", " c", 0),
                         gpt2, max_length=64, max_prompt_length=32)
    assert pair.chosen_ids.count(gpt2.eos_token_id) == 1 and pair.chosen_ids[-1] == gpt2.eos_token_id


# ---------------------------------------------------------------------------------------------------
# Tokenization, BOS and truncation (character tokenizer: one id per character)


def example(prompt="PROMPT:", chosen=" yes", rejected=" no", row=0):
    return PreferenceExample(prompt, chosen, rejected, row)


def test_tokenize_pair_no_truncation():
    pair = tokenize_pair(example(), CharTokenizer(), max_length=100, max_prompt_length=50)
    assert pair == TokenizedPair(char_ids("PROMPT:"), char_ids(" yes") + [EOS], char_ids(" no") + [EOS], 0)


def test_bos_added_once_only_when_tokenizer_adds_it():
    pair = tokenize_pair(example(), CharTokenizer(add_bos=True), max_length=100, max_prompt_length=50)
    assert pair.prompt_ids == [BOS] + char_ids("PROMPT:")
    assert pair.chosen_ids == char_ids(" yes") + [EOS]  # no BOS on the response
    # a rendering that already starts with the BOS text (as chat templates do) gets no second BOS
    pair = tokenize_pair(example(prompt="<s>P:"), CharTokenizer(add_bos=True), max_length=100, max_prompt_length=50,
                         split_special_tokens=False)
    assert pair.prompt_ids == [BOS] + char_ids("P:")


def test_a_prompt_too_long_is_skipped_naming_its_length_with_the_bos():
    records = [{"prompt": "abc", "chosen": "yes", "rejected": "no"}]
    rendered = len(format_prompt("abc"))
    _, stats = build_pairs(records, CharTokenizer(add_bos=True), max_length=rendered + 1, max_prompt_length=None,
                           allow_empty=True)
    assert stats.skipped == {"prompt_too_long": 1}
    assert stats.first_skip["prompt_too_long"] == (f"row 0: prompt of {rendered + 1} tokens leaves no room for a "
                                                   f"response within max_length={rendered + 1}")
    pairs, _ = build_pairs(records, CharTokenizer(add_bos=True), max_length=rendered + 3, max_prompt_length=None)
    assert len(pairs[0].prompt_ids) == rendered + 1


@pytest.mark.parametrize("mode, kept", [("keep_end", "GHIJ"), ("keep_start", "ABCD")])
def test_prompt_truncation_modes(mode, kept):
    pair = tokenize_pair(example(prompt="ABCDEFGHIJ"), CharTokenizer(), max_length=100, max_prompt_length=4,
                         truncation_mode=mode)
    assert pair.prompt_ids == char_ids(kept)
    assert pair.chosen_ids == char_ids(" yes") + [EOS]
    # with a BOS the BOS survives and counts towards max_prompt_length
    pair = tokenize_pair(example(prompt="ABCDEFGHIJ"), CharTokenizer(add_bos=True), max_length=100,
                         max_prompt_length=4, truncation_mode=mode)
    assert pair.prompt_ids == [BOS] + char_ids(kept[1:] if mode == "keep_end" else kept[:3])


def test_response_truncation_drops_eos_only_when_cut():
    tok = CharTokenizer()
    prompt_len = len("PROMPT:")
    fits = tokenize_pair(example(chosen=" yes"), tok, max_length=prompt_len + 4 + 1, max_prompt_length=50)
    assert fits.chosen_ids == char_ids(" yes") + [EOS]  # 4 chars + EOS exactly fill max_length
    cut = tokenize_pair(example(chosen=" yes"), tok, max_length=prompt_len + 4, max_prompt_length=50)
    assert cut.chosen_ids == char_ids(" yes")  # all text kept, but it did not end: no EOS
    assert cut.rejected_ids == char_ids(" no") + [EOS]  # the shorter response still ends
    cut = tokenize_pair(example(chosen=" yes"), tok, max_length=prompt_len + 2, max_prompt_length=50)
    assert cut.chosen_ids == char_ids(" y") and len(cut.prompt_ids) + len(cut.chosen_ids) == prompt_len + 2


def test_prompt_too_long_is_skipped_and_counted():
    tok = CharTokenizer()
    assert tokenize_pair(example(prompt="ABCDEFGHIJ"), tok, max_length=5, max_prompt_length=5) is None
    assert tokenize_pair(example(prompt="ABCDEFGHIJ"), tok, max_length=5, max_prompt_length=None) is None
    records = [explicit(prompt="x" * 40), explicit(prompt="q")]  # rendered: 61 and 22 characters
    pairs, stats = build_pairs(records, tok, max_length=30, max_prompt_length=30)
    assert [p.row for p in pairs] == [1]
    assert stats.skipped == {"prompt_too_long": 1} and "row 0" in stats.first_skip["prompt_too_long"]
    assert str(stats).startswith("2 rows, 1 pairs kept (0 with the prompt truncated, 1 with a response truncated), "
                                 "1 skipped: prompt_too_long 1")
    assert (stats.truncated_prompts, stats.truncated_responses) == (0, 1)


def test_pair_identical_after_truncation_is_skipped():
    records = [explicit(chosen="same start, then A", rejected="same start, then B"), explicit()]
    prompt_len = len(format_prompt("Say hi"))
    pairs, stats = build_pairs(records, CharTokenizer(), max_length=prompt_len + 5, max_prompt_length=100)
    assert [p.row for p in pairs] == [1]
    assert stats.skipped == {"identical_after_truncation": 1}


# ---------------------------------------------------------------------------------------------------
# Collation


def test_collate_masks_from_lengths_when_pad_equals_eos():
    pad = EOS  # as in GPT-2 / Phi-2: padding, BOS and EOS share one id
    pairs = [
        TokenizedPair([5, EOS], [6, 7, EOS], [8, EOS], row=0),  # an EOS id inside the prompt is a real token
        TokenizedPair([9], [10, EOS], [11, 12, 13, EOS], row=1),
    ]
    batch = collate_pairs(pairs, pad)
    seqs = [[5, EOS, 6, 7, EOS], [9, 10, EOS], [5, EOS, 8, EOS], [9, 11, 12, 13, EOS]]  # chosen rows, then rejected
    prompt_lengths = [2, 1, 2, 1]
    assert batch["input_ids"].shape == (4, 5)
    assert batch["input_ids"].tolist() == [s + [pad] * (5 - len(s)) for s in seqs]
    assert batch["attention_mask"].tolist() == [[1] * len(s) + [0] * (5 - len(s)) for s in seqs]
    assert batch["labels"].tolist() == [[-100] * p + s[p:] + [-100] * (5 - len(s))
                                        for s, p in zip(seqs, prompt_lengths)]
    assert batch["prompt_lengths"].tolist() == prompt_lengths
    assert batch["response_lengths"].tolist() == [3, 2, 2, 4]
    assert all(t.dtype == torch.long for t in batch.values())
    # masking by id would have dropped the real EOS tokens: the mask must count more ones than ids != pad
    assert batch["attention_mask"].sum() > (batch["input_ids"] != pad).sum()


def test_collate_pad_to_multiple_of():
    batch = collate_pairs([TokenizedPair([1, 2, 3], [4, 0], [5, 6, 0], 0)], pad_id=99, pad_to_multiple_of=8)
    assert batch["input_ids"].shape == (2, 8)
    assert batch["input_ids"][0].tolist() == [1, 2, 3, 4, 0, 99, 99, 99]
    assert batch["attention_mask"].sum(dim=1).tolist() == [5, 6]
    with pytest.raises(ValueError):
        collate_pairs([], pad_id=0)


def test_collate_from_build_pairs_labels_are_exactly_the_responses():
    pairs, _ = build_pairs([explicit("q", "longer answer", "b"), explicit("qq", "x", "yy")], CharTokenizer())
    batch = collate_pairs(pairs, pad_id=0)
    for i, pair in enumerate(pairs):
        for offset, response in ((0, pair.chosen_ids), (len(pairs), pair.rejected_ids)):
            labels = batch["labels"][i + offset]
            assert labels[labels != -100].tolist() == response
            start = len(pair.prompt_ids)
            assert batch["input_ids"][i + offset, :start].tolist() == pair.prompt_ids


# ---------------------------------------------------------------------------------------------------
# Subsets, splits, epoch order


def test_select_subset():
    records = list(range(100))
    assert select_subset(records, 10) == list(range(10))
    assert select_subset(records, None) == records and select_subset(records, 500) == records
    a, b = select_subset(records, 10, seed=1), select_subset(records, 10, seed=1)
    assert a == b and len(set(a)) == 10 and a == sorted(a) and a != list(range(10))
    assert select_subset(records, 10, seed=2) != a
    with pytest.raises(DataError):
        select_subset(records, 0)


def test_epoch_permutation_deterministic_per_seed_and_epoch():
    p = epoch_permutation(50, epoch=0, seed=3)
    assert sorted(p) == list(range(50))
    assert p == epoch_permutation(50, epoch=0, seed=3)
    assert p != epoch_permutation(50, epoch=1, seed=3)
    assert p != epoch_permutation(50, epoch=0, seed=4)


def test_a_prompts_records_go_to_one_side_and_distinct_prompts_split_as_before():
    records = [{"id": i} for i in range(101)]
    plain = train_test_split(records, 0.1, seed=0)
    assert train_test_split(records, 0.1, seed=0, keys=[str(i) for i in range(101)]) == plain
    assert train_test_split(records, 0.1, seed=0, keys=[None] * 101) == plain  # unreadable: each on its own
    keys = [str(i // 3) for i in range(101)]  # 34 prompts of 3 records (the last of 2)
    for seed in range(20):
        train, test = train_test_split(records, 0.1, seed=seed, keys=keys)
        test_keys = {keys[r["id"]] for r in test}
        assert not test_keys & {keys[r["id"]] for r in train}
        assert sorted(r["id"] for r in train + test) == list(range(101))
        assert 11 <= len(test) <= 11 + 2  # at least ceil(0.1 * 101), overshooting by less than one prompt
        # drawn in the plain split's order: the first record drawn brings its prompt's others
        first = int(np.random.default_rng(seed).permutation(101)[0])
        assert keys[first] in test_keys
    # rows that will be skipped (no key) stay on the train side, where their skips are counted
    keyed = [None, "a", None, "b", "c", None, "d", "e", "f", "g"]
    for seed in range(10):
        train, test = train_test_split(records[:10], 0.2, seed=seed, keys=keyed)
        assert len(test) == 2 and all(keyed[r["id"]] is not None for r in test)  # 0.2 of the 7 usable: ceil 1.4
    with pytest.raises(DataError, match=r"^test_size=7 gives 7 test records out of 7 usable; both splits"):
        train_test_split(records[:10], 7, seed=0, keys=keyed)
    with pytest.raises(DataError, match=r"^test_size=1: the records of one prompt go to one side, and 4 records "
                                        r"share 1 prompt\(s\): no prompt is left to train on; hold out fewer$"):
        train_test_split(records[:4], 1, seed=0, keys=["same"] * 4)


def test_a_prompt_written_in_two_formats_is_held_out_whole(tmp_path):
    """The same instruction as an explicit row and as a conversational one renders to one prompt: both rows go to
    the same side of --test-size's split."""
    from dpo.data import prompt_key
    from dpo.splits import split_records

    rows = []
    for i in range(20):
        rows.append(explicit(prompt=f"question {i}", chosen="yes", rejected="no"))
        rows.append({"chosen": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": "y"}],
                     "rejected": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": "n"}]})
    path = write_jsonl(tmp_path / "two-formats.jsonl", rows)
    for seed in (0, 42):
        train, _, held_out, _ = split_records(path, "train", "test", 0.2, seed)
        keys = lambda indexed: {prompt_key(record, row) for row, record in indexed}  # noqa: E731
        assert len(held_out) == 8 and len(keys(held_out)) == 4 and not keys(held_out) & keys(train)


def test_prompt_keys_follow_what_a_record_asks():
    from dpo.data import prompt_key

    explicit = {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"}
    assert prompt_key(explicit, 0) == prompt_key({**explicit, "chosen": "four"}, 1)
    assert prompt_key(explicit, 0) != prompt_key({**explicit, "prompt": "What is 3+3?"}, 0)
    hh = {"chosen": "\n\nHuman: What is 2+2?\n\nAssistant: 4", "rejected": "\n\nHuman: What is 2+2?\n\nAssistant: 5"}
    messages = {"chosen": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}],
                "rejected": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "5"}]}
    assert prompt_key(hh, 0) == prompt_key(messages, 0) == prompt_key({**explicit, "prompt": "\n\nHuman: What is "
                                                                                          "2+2?\n\nAssistant:"}, 0)
    assert prompt_key(explicit, 0) == prompt_key(hh, 0)  # a bare instruction is its one user turn
    assert prompt_key({"prompt": "What is 2+2?"}, 0) == prompt_key(explicit, 0)  # a prompt alone (online DPO's)
    assert prompt_key(["not a record"], 0) is None and prompt_key({"prompt": "q", "chosen": "a"}, 0) is None
    assert prompt_key({"prompt": 5}, 0) is None and prompt_key({"prompt": ["not", "messages"]}, 0) is None
    assert prompt_key({**explicit, "rejected": " 4 "}, 0) is None  # the same answer twice: a skipped row


def test_train_test_split_disjoint_and_complete():
    records = [{"id": i} for i in range(101)]
    train, test = train_test_split(records, 0.1, seed=0)
    assert len(test) == 11 and len(train) == 90  # ceil(0.1 * 101)
    ids = [r["id"] for r in train + test]
    assert sorted(ids) == list(range(101)) and len(set(ids)) == 101
    assert train_test_split(records, 0.1, seed=0) == (train, test)
    assert train_test_split(records, 0.1, seed=1)[1] != test
    assert len(train_test_split(records, 7, seed=0)[1]) == 7
    for bad in (0, 101, 0.0, 1.0):
        with pytest.raises(DataError, match="test_size"):
            train_test_split(records, bad, seed=0)


# ---------------------------------------------------------------------------------------------------
# Loading and bad input


def write_jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_load_records_file_types_and_builtins(tmp_path, monkeypatch):
    rows = [explicit(), explicit(prompt="Q2")]
    records, description = load_records(write_jsonl(tmp_path / "a.jsonl", rows))
    assert records == rows and "2 records" in description
    (tmp_path / "b.json").write_text(json.dumps(rows))
    assert load_records(str(tmp_path / "b.json"))[0] == rows
    (tmp_path / "c.json").write_text(json.dumps({"train": rows, "test": rows[:1]}))
    assert load_records(str(tmp_path / "c.json"), "test") == (rows[:1], f"{tmp_path / 'c.json'} [test] (1 records)")
    (tmp_path / "e.json").write_text(json.dumps({"train": rows, "test": []}))  # the split that is empty is named
    with pytest.raises(DataError, match=r"e\.json \[test\]: no records$"):
        load_records(str(tmp_path / "e.json"), "test")
    # JSON Lines saved as .json whose first record holds U+2028 (json.dumps writes it raw): one record, not two lines
    lines = [explicit(prompt="line\u2028separator"), explicit(prompt="next\u0085line")]
    (tmp_path / "f.json").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines),
                                     encoding="utf-8")
    assert load_records(str(tmp_path / "f.json"))[0] == lines
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    assert load_records(str(tmp_path / "d.parquet"))[0] == rows
    # HH rows beside explicit ones: the column an HH row lacks is there as null, and the row is still read as HH
    hh = {"chosen": "\n\nHuman: Q3\n\nAssistant: yes", "rejected": "\n\nHuman: Q3\n\nAssistant: no"}
    pq.write_table(pa.Table.from_pylist([*rows, hh]), tmp_path / "mixed.parquet")
    mixed = load_records(str(tmp_path / "mixed.parquet"))[0]
    assert mixed[2]["prompt"] is None and detect_format(mixed[2]) == "implicit"
    assert len(build_pairs(mixed, CharTokenizer(), max_length=64, max_prompt_length=32)[0]) == 3

    monkeypatch.setitem(data.BUILTIN_SOURCES, "tiny",
                        data.BuiltinSource(("train", "test"), lambda split: rows[:1] if split == "test" else rows))
    records, description = load_records("tiny", "test")
    assert records == rows[:1] and "tiny" in description


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "a", "chosen": "b", "rejected": "c"}\n\n{"prompt": "a", "chosen": \n', "line 3"),
    ('["not", "an", "object"]\n', "line 1"),
])
def test_malformed_jsonl_names_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=f"bad.jsonl, {message}"):
        load_records(str(path))


def test_load_errors_are_one_line_data_errors(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "x.csv").write_text("a,b\n")
    for source, message in [(str(tmp_path / "empty.jsonl"), "no records"),
                            (str(tmp_path / "missing.jsonl"), "file not found"),
                            (str(tmp_path / "x.csv"), "unsupported file type"),
                            ("no-such-org/no-such-dataset", "cannot load dataset")]:
        with pytest.raises(DataError, match=message) as err:
            load_records(source)
        assert "\n" not in str(err.value)


def test_dataset_dir_needs_a_split_when_it_has_several():
    schema_dir = PAIRS_DIR / "ultrafeedback_schema"
    if not schema_dir.is_dir():
        pytest.skip("shared preference pairs not available")
    with pytest.raises(DataError, match="test_prefs, train_prefs"):
        load_records(str(schema_dir))


@pytest.mark.parametrize("record, reason, field", [
    ({"prompt": "p", "rejected": "r"}, "missing_field", "'chosen'"),
    ({"prompt": "p", "chosen": "c", "rejected": None}, "missing_field", "'rejected'"),
    (explicit(chosen=3), "wrong_type", "'chosen'"),
    (explicit(prompt=["p"]), "wrong_type", "'prompt'"),
    (explicit(rejected="  \n"), "empty_response", "'rejected'"),
    (explicit(prompt=""), "empty_prompt", "'prompt'"),
    (explicit(chosen="Same answer", rejected=" Same answer\n"), "identical_responses", "identical"),
    ({"chosen": conversation("p", "c"), "rejected": conversation("other p", "r")}, "prompt_mismatch", "differ"),
    ({"chosen": conversation("p", "c"), "rejected": conversation("p", 7)}, "wrong_type", "'rejected'"),
    ({"chosen": conversation("p", "c"), "rejected": "r"}, "wrong_type", "'rejected'"),
    ({"chosen": conversation("p", "c")[:1], "rejected": conversation("p", "r")}, "no_assistant_turn", "'chosen'"),
    ({"chosen": conversation("p", ""), "rejected": conversation("p", "r")}, "empty_response", "'chosen'"),
    ("just a string", "wrong_type", "not an object"),
])
def test_bad_rows_are_counted_skips_naming_row_and_field(record, reason, field):
    with pytest.raises(RowError) as err:
        to_example(record, 1)
    assert err.value.reason == reason and isinstance(err.value, DataError)
    assert str(err.value).startswith("row 1: ") and field in str(err.value)

    pairs, stats = build_pairs([explicit(), record, explicit(prompt="other")], CharTokenizer())
    assert [p.row for p in pairs] == [0, 2]
    assert (stats.rows, stats.kept, stats.skipped) == (3, 2, {reason: 1})
    assert stats.first_skip[reason].startswith("row 1: ")
    assert reason in str(stats) and "\n" not in str(stats)


def test_source_with_no_usable_row_raises(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [explicit(chosen=""), explicit(chosen="x", rejected="x"), {"a": 1}])
    records, description = load_records(path)
    with pytest.raises(DataError, match=r"bad\.jsonl.*no usable preference pairs \(3 rows: ") as err:
        build_pairs(records, CharTokenizer(), source=description)
    message = str(err.value)
    assert "empty_response 1" in message and "identical_responses 1" in message and "missing_field 1" in message
    assert "\n" not in message


def test_tokenizer_without_eos_and_bad_options_raise():
    with pytest.raises(DataError, match="no EOS"):
        build_pairs([explicit()], CharTokenizer(eos_token_id=None))
    with pytest.raises(DataError, match="no EOS"):
        tokenize_pair(example(), CharTokenizer(eos_token_id=None), max_length=10, max_prompt_length=5)
    with pytest.raises(ValueError, match="truncation_mode"):
        build_pairs([explicit()], CharTokenizer(), truncation_mode="keep_middle")
    with pytest.raises(ValueError, match="unknown template"):
        to_example(explicit(), 0, template="alpaca")


def test_data_stats_str_is_one_line():
    stats = DataStats(rows=10, kept=8)
    assert str(stats) == "10 rows, 8 pairs kept"
    stats.count_skip("empty_response", "row 3: field 'chosen' is empty")
    stats.count_skip("empty_response", "row 5: field 'chosen' is empty")
    assert stats.skipped == {"empty_response": 2} and stats.num_skipped == 2
    assert str(stats) == "10 rows, 8 pairs kept, 2 skipped: empty_response 2 (first: row 3: field 'chosen' is empty)"


HH_HISTORY = "\n\nHuman: Hi there\n\nAssistant: Hello.\n\nHuman: How are you?\n\nAssistant:"


@pytest.mark.parametrize("template", ["recipe", "chat"])
def test_an_hh_conversation_in_the_prompt_field_is_read_as_the_implicit_row(gpt2, template):
    """Dahoas/full-hh-rlhf's layout: the HH text up to the last `Assistant:` in `prompt`, the answers apart. It is
    the conversation the implicit row holds, not an instruction to wrap in the template once more."""
    import copy

    tokenizer = copy.copy(gpt2)
    tokenizer.chat_template = CHAT_TEMPLATE
    implicit = {"chosen": HH_HISTORY + " Fine, thanks.", "rejected": HH_HISTORY + " Fine."}
    explicit_hh = {"prompt": HH_HISTORY, "chosen": " Fine, thanks.", "rejected": " Fine."}
    a, b = (to_example(r, 0, template=template, tokenizer=tokenizer) for r in (implicit, explicit_hh))
    assert a == b and "Human:" not in a.prompt.replace("### Human:", "")
    # the same texts stripped of the line breaks before the first turn: the same conversation, no system message
    stripped = [{k: v.lstrip() for k, v in r.items()} for r in (implicit, explicit_hh)]
    assert [to_example(r, 0, template=template, tokenizer=tokenizer) for r in stripped] == [a, a]
    single = {"prompt": "Human: Hi there\n\nAssistant:", "chosen": " Hello.", "rejected": " Go away."}
    assert to_example(single, 0, template=template, tokenizer=tokenizer).prompt == to_example(
        {**single, "prompt": "\n\n" + single["prompt"]}, 0, template=template, tokenizer=tokenizer).prompt
    assert to_example(explicit("What is 2+2?\n\nAssistant: says", "4", "5"), 0).prompt == format_prompt(
        "What is 2+2?\n\nAssistant: says")  # no "\n\nHuman:" turn: a plain instruction


@pytest.mark.parametrize("record", [
    {"chosen": HH_HISTORY + " Fine.\n\nHuman: And you?\n\nAssistant: Good.", "rejected": HH_HISTORY + " Bad."},
    {"prompt": HH_HISTORY, "chosen": " Fine.", "rejected": " Bad.\n\nHuman: Why?\n\nAssistant: Because."},
])
def test_an_hh_answer_going_on_with_more_turns_is_a_counted_skip(record):
    with pytest.raises(RowError, match="row 3: field '(chosen|rejected)' goes on after its answer") as err:
        to_example(record, 3)
    assert err.value.reason == "multi_turn_response"
    pairs, stats = build_pairs([record, explicit()], CharTokenizer(), max_length=256)
    assert len(pairs) == 1 and "multi_turn_response 1" in stats.reasons()


def test_a_message_prompt_with_whole_conversations_is_not_repeated():
    """prompt as messages, chosen/rejected as whole conversations that start with it: read once, as the
    continuation layout is."""
    prompt = [{"role": "user", "content": "q"}]
    continuation = {"prompt": prompt, "chosen": [{"role": "assistant", "content": "x"}],
                    "rejected": [{"role": "assistant", "content": "y"}]}
    whole = {"prompt": prompt, "chosen": conversation("q", "x"), "rejected": conversation("q", "y")}
    assert to_example(whole, 0) == to_example(continuation, 0) == to_example(explicit("q", "x", "y"), 0)


def test_a_prompt_of_no_tokens_is_a_counted_skip(gpt2):
    """A chat template that renders no prompt text, with a tokenizer that adds no BOS: no position would predict
    the first answer token, which would go unscored."""
    import copy

    tokenizer = copy.copy(gpt2)
    tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] == 'assistant' %}{{ m['content'] }}"
                               "<|endoftext|>{% endif %}{% endfor %}")
    pairs, stats = build_pairs([explicit("q", "x", "y")] * 2, tokenizer, template="chat", allow_empty=True)
    assert pairs == [] and stats.reasons().startswith("empty_prompt 2 (first: row 0: the prompt is no tokens")


def test_prompt_rows_whose_prompt_list_is_not_one_user_message_are_left_out_and_counted():
    records = [{"prompt": "fine"}, {"prompt": ["hi there"]}, {"prompt": [{"content": "no role"}]},
               {"prompt": [{"role": "user", "content": ["a", "list"]}]}, {"prompt": [{"role": "user", "content": "ok"}]}]
    found, left_out = instruction_records(records)
    assert list(found) == ["fine", "ok"] and left_out == 3
    # a prompt alone in HH's or the recipe's text is read as its turns, as sampling reads it: an empty user turn or
    # a multi-turn history is left out when loaded, not refused at the step that samples it
    texts = ["\n\nHuman: \n\nAssistant:", "### Human: \n\n### Assistant:",
             "### Human: a\n\n### Assistant: b\n\n### Human: c\n\n### Assistant:", "### Human: hi\n\n### Assistant:"]
    found, left_out = instruction_records([{"prompt": text} for text in texts])
    assert list(found) == ["hi"] and left_out == 3  # the turn's text (a judge of a prompt's text gets it)
    found, left_out = instruction_records([{"prompt": [{"role": "user", "content": text}]} for text in texts])
    assert list(found) == [texts[3]] and left_out == 3  # the same text as a message's content


def test_an_instruction_given_twice_with_other_ifeval_constraints_is_one_line():
    """The judge knows a prompt by its text: the later row's constraints were silently never checked."""
    constrained = [{"prompt": "a", "instruction_id_list": ["x"], "kwargs": [{}]},
                   {"prompt": "a", "instruction_id_list": ["y"], "kwargs": [{}]}]
    with pytest.raises(DataError, match=r"^t.jsonl, row 1: its instruction is row 0's, with other constraints "
                                        r"\(instruction_id_list, kwargs\): an IFEval judge"):
        instruction_records(constrained, source="t.jsonl", constraints=True)
    same = [constrained[0], dict(constrained[0]), {"prompt": "a", "chosen": "c", "rejected": "d"}]  # no conflict
    assert instruction_records(same, constraints=True) == ({"a": (0, constrained[0])}, 0)
    # without an IFEval judge "kwargs" is any field: a preference file may repeat a prompt with other values
    assert instruction_records(constrained) == ({"a": (0, constrained[0])}, 0)


def test_an_instruction_the_template_cannot_render_is_left_out_before_sampling(chatml):
    """Online DPO renders its instructions when it loads them, as sampling will: one holding a special token's text
    under the chat template is left out and counted, not an error at the step that samples it."""
    records = [{"prompt": "fine"}, {"prompt": "what is <|endoftext|>?"}, {"prompt": "ok"}]
    assert list(instruction_records(records)[0]) == ["fine", "what is <|endoftext|>?", "ok"]
    found, left_out = instruction_records(records, template="chat", tokenizer=chatml)
    assert list(found) == ["fine", "ok"] and left_out == 1
    assert len(instruction_records(records, template="recipe", tokenizer=chatml)[0]) == 3  # text in the recipe
