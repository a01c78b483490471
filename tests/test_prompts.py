"""dpo.prompts: generation feeds a model exactly the prompt ids training masks, and cuts over-long prompts as
training does.

The real-data tests use the GPT-2 tokenizer and the preference pairs of the shared folder beside the repository
(skipped where it is absent), with the recipe template and a ChatML-like chat template, on GPT-2 as it is and on
GPT-2 made to add a BOS.
"""

import copy
import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import LlamaConfig

import generate
from dpo.data import DataError, build_pairs, to_example
from dpo.generation import DecodingSettings, generate_batch, prompt_budget
from dpo.prompts import (PromptError, SpecialIds, encode_prompts, encode_texts, end_of_turn_text, format_prompt,
                         format_response, read_prompt, render_prompt, render_response, special_ids, truncate_prompt)
from harness import make_model_dir, tiny_tokenizer

NUM_PAIRS = 300
CHATML = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def pair_rows(pair_rows):
    """conftest's real pairs, the first NUM_PAIRS."""
    return pair_rows[:NUM_PAIRS]


def adds_bos(tokenizer):
    """A copy of `tokenizer` whose own encoding starts with BOS (as Llama's does)."""
    from tokenizers.processors import TemplateProcessing

    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{tokenizer.bos_token} $A", special_tokens=[(tokenizer.bos_token, tokenizer.bos_token_id)])
    return tokenizer


def variant(tokenizer, template: str, bos: bool):
    tokenizer = adds_bos(tokenizer) if bos else copy.deepcopy(tokenizer)
    if template == "chat":
        tokenizer.chat_template = CHATML
    return tokenizer


class IndexEchoLM(nn.Module):
    """Stands in for a causal LM under greedy decoding: records the prompt ids generate_batch feeds it (left padding
    dropped by the attention mask) and answers each row with the index of its record, so every response names the
    ids its prompt was fed as. A row leaves the batch once it has answered (decode drops all finished rows at once)."""

    def __init__(self, tokenizer, positions: int = 4096):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.config = LlamaConfig(num_hidden_layers=1, hidden_size=8, intermediate_size=8, num_attention_heads=1,
                                  vocab_size=len(tokenizer), max_position_embeddings=positions)
        self.tokenizer = tokenizer
        self.fed: list[list[int]] = []

    def forward(self, input_ids, attention_mask, position_ids=None, use_cache=None, logits_to_keep=None, cache=None):
        eos = self.tokenizer.eos_token_id
        if attention_mask.shape[1] == input_ids.shape[1]:  # a new batch's prompts
            self.answers, self.rows, self.ended, self.step = [], list(range(len(input_ids))), set(), 0
            for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
                self.fed.append([token for token, keep in zip(ids, mask) if keep])
                self.answers.append(self.tokenizer(f" {len(self.fed) - 1}", add_special_tokens=False)["input_ids"])
        elif len(input_ids) < len(self.rows):
            self.rows = [row for row in self.rows if row not in self.ended]
        logits = torch.zeros(len(input_ids), 1, len(self.tokenizer))
        for i, row in enumerate(self.rows):
            answer = self.answers[row]
            token = answer[self.step] if self.step < len(answer) else eos
            logits[i, 0, token] = 1.0
            if token == eos:
                self.ended.add(row)
        self.step += 1
        return SimpleNamespace(logits=logits)


def fed_prompt_ids(tokenizer, instructions, decoding, positions: int = 4096) -> list[list[int]]:
    """The prompt ids generate_batch feeds the model for each instruction, in the instructions' order."""
    model = IndexEchoLM(tokenizer, positions)
    outputs = generate_batch(model, tokenizer, instructions, decoding, batch_size=64)
    assert len(model.fed) == len(instructions)
    return [model.fed[int(output)] for output in outputs]


# ---------------------------------------------------------------------------------------------------- identity


@pytest.mark.parametrize("bos", [False, True], ids=["gpt2", "gpt2_adds_bos"])
@pytest.mark.parametrize("template", ["recipe", "chat"])
@pytest.mark.parametrize("mode", ["keep_end", "keep_start"])
def test_generation_feeds_exactly_the_prompt_ids_training_masks(gpt2, pair_rows, template, bos, mode, capsys):
    tokenizer = variant(gpt2, template, bos)
    limit = 40
    pairs, stats = build_pairs(pair_rows, tokenizer, max_length=4096, max_prompt_length=limit, truncation_mode=mode,
                               template=template)
    assert stats.kept == NUM_PAIRS  # every real pair is usable, so each prompt is compared
    decoding = DecodingSettings(greedy=True, max_new_tokens=4, chat_template=template == "chat",
                              max_prompt_length=limit, truncation_mode=mode)
    fed = fed_prompt_ids(tokenizer, [row["prompt"] for row in pair_rows], decoding)
    assert fed == [pair.prompt_ids for pair in pairs]

    # both count the same over-long prompts, a good share of these
    assert 0.2 * NUM_PAIRS < stats.truncated_prompts < NUM_PAIRS
    assert capsys.readouterr().err == (f"warning: {stats.truncated_prompts} of {NUM_PAIRS} prompts longer than "
                                       f"{limit} tokens were cut ({mode}), as training cuts them\n")

    # and the ids are what the template defines, by hand: [BOS]? + the text's tokens, cut at the right end
    bos_id = tokenizer.bos_token_id
    for row, ids in zip(pair_rows, fed):
        text = format_prompt(row["prompt"]) if template == "recipe" else tokenizer.apply_chat_template(
            [{"role": "user", "content": row["prompt"]}], tokenize=False, add_generation_prompt=True)
        full = tokenizer(text, add_special_tokens=False, split_special_tokens=template == "recipe")["input_ids"]
        if bos and full[:1] == [bos_id]:
            full = full[1:]  # the chat template's own BOS text: the one BOS kept
        keep = limit - bos
        expected = (full[-keep:] if mode == "keep_end" else full[:keep]) if bos + len(full) > limit else full
        assert ids == [bos_id] * bos + expected
        if bos:
            assert ids[1] != bos_id  # one BOS, also where the chat template writes its own


def test_without_a_limit_the_recipe_prompt_is_the_template_tokenized(gpt2, pair_rows, capsys):
    instructions = [row["prompt"] for row in pair_rows]
    fed = fed_prompt_ids(gpt2, instructions, DecodingSettings(greedy=True, max_new_tokens=4), positions=100_000)
    assert fed == gpt2([format_prompt(text) for text in instructions], add_special_tokens=False)["input_ids"]
    assert capsys.readouterr().err == ""  # nothing cut: no warning


QUESTION = "What is 3 plus 4?"
PROMPT_LAYOUTS = {  # a row's prompt, as the datasets write it
    "plain": QUESTION,
    "hh": f"\n\nHuman: {QUESTION}\n\nAssistant:",  # Dahoas/full-hh-rlhf's
    "hh_without_leading_newlines": f"Human: {QUESTION}\n\nAssistant:",
    "hh_history_with_a_system_text": f"Answer briefly.\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: {QUESTION}"
                                     "\n\nAssistant:",
    "messages": [{"role": "user", "content": QUESTION}],
}


@pytest.mark.parametrize("template", ["recipe", "chat"])
@pytest.mark.parametrize("layout", list(PROMPT_LAYOUTS))
def test_generation_reads_a_rows_prompt_as_training_does(layout, template):
    """An HH-format prompt is the conversation it writes in training (dpo.data) and generation alike, not a question
    that quotes "Human:" wrapped in the template a second time: the text and the ids fed match the training row's."""
    tokenizer = variant(tiny_tokenizer(), template, bos=False)
    prompt = PROMPT_LAYOUTS[layout]
    if isinstance(prompt, str):
        record = {"prompt": prompt, "chosen": "7.", "rejected": "8."}
    else:
        record = {"prompt": prompt, "chosen": [{"role": "assistant", "content": "7."}],
                  "rejected": [{"role": "assistant", "content": "8."}]}
    trained = to_example(record, 0, template=template, tokenizer=tokenizer).prompt
    assert render_prompt(prompt, template, tokenizer) == trained
    assert "Human:" not in trained.replace("### Human:", "")  # HH's markers are read, never kept as text
    if layout.startswith("hh_history"):
        expected = render_prompt([{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi"},
                                  {"role": "assistant", "content": "Hello."}, {"role": "user", "content": QUESTION}],
                                 template, tokenizer)
    else:
        expected = (format_prompt(QUESTION) if template == "recipe" else tokenizer.apply_chat_template(
            [{"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True))
    assert trained == expected
    pairs, _ = build_pairs([record], tokenizer, max_length=512, max_prompt_length=None, template=template)
    assert encode_prompts(tokenizer, [prompt], template)[0] == [pairs[0].prompt_ids]
    if isinstance(prompt, str):  # what generate.py --instructions and dpo.evaluate --prompts feed the model
        decoding = DecodingSettings(greedy=True, max_new_tokens=4, chat_template=template == "chat")
        assert fed_prompt_ids(tokenizer, [prompt], decoding) == [pairs[0].prompt_ids]


WRITTEN_CONVERSATIONS = {"hh": PROMPT_LAYOUTS["hh"], "recipe": f"### Human: {QUESTION}\n\n### Assistant:"}


@pytest.mark.parametrize("template", ["recipe", "chat"])
@pytest.mark.parametrize("written", list(WRITTEN_CONVERSATIONS))
@pytest.mark.parametrize("shape", ["prompt_messages", "prompt_string", "whole_conversations"])
def test_a_conversation_written_inside_a_message_is_read_as_online_sampling_reads_it(shape, written, template):
    """A user message holding HH's or the recipe's text is the conversation it writes, in training as in online
    sampling and generation (record_instruction, render_prompt): never that text wrapped in the template again."""
    from dpo.data import record_instruction

    tokenizer = variant(tiny_tokenizer(), template, bos=False)
    content = WRITTEN_CONVERSATIONS[written]
    user = [{"role": "user", "content": content}]
    answer = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731
    record = {"prompt_messages": {"prompt": user, "chosen": answer("7."), "rejected": answer("8.")},
              "prompt_string": {"prompt": content, "chosen": answer("7."), "rejected": answer("8.")},
              "whole_conversations": {"chosen": user + answer("7."), "rejected": user + answer("8.")}}[shape]
    trained = to_example(record, 0, template=template, tokenizer=tokenizer).prompt
    instruction, is_pair = record_instruction(record, 0)
    assert is_pair and instruction == QUESTION
    assert trained == render_prompt(instruction, template, tokenizer) == render_prompt(QUESTION, template, tokenizer)


# ---------------------------------------------------------------------------------------------------- over-long prompts


LONG_BATCH = ["yes", "red " * 300, "what color is the sun?"]  # the second is longer than the tiny model

@pytest.mark.parametrize("limit, mode", [(48, "keep_start"), (None, "keep_end")])
def test_an_over_long_prompt_is_cut_as_build_pairs_cuts_it_and_the_batch_completes(limit, mode, capsys):
    tokenizer = tiny_tokenizer()
    instructions = LONG_BATCH
    decoding = DecodingSettings(greedy=True, max_new_tokens=12, max_prompt_length=limit, truncation_mode=mode)
    fed = fed_prompt_ids(tokenizer, instructions, decoding, positions=256)
    budget = limit or 256 - 12  # without a run limit: what the new tokens leave of the 256 positions
    records = [{"prompt": text, "chosen": "yes", "rejected": "no"} for text in instructions]
    pairs, _ = build_pairs(records, tokenizer, max_length=1024, max_prompt_length=budget, truncation_mode=mode)
    assert fed == [pair.prompt_ids for pair in pairs]
    assert len(fed[1]) == budget and fed[0] == encode_prompts(tokenizer, ["yes"])[0][0]
    assert capsys.readouterr().err == (f"warning: 1 of 3 prompts longer than {budget} tokens were cut ({mode}), "
                                       "as training cuts them\n")


def _write_batch(path, instructions):
    path.write_text("".join(json.dumps({"instruction": text}) + "\n" for text in instructions), encoding="utf-8")
    return str(path)


def _record_fed(monkeypatch):
    """The prompt id lists every generate_batch call left-pads, as sorted tuples."""
    import dpo.generation

    fed = []
    left_pad = dpo.generation.left_pad

    def recording(sequences, pad_id):
        fed.extend(tuple(seq) for seq in sequences)
        return left_pad(sequences, pad_id)

    monkeypatch.setattr(dpo.generation, "left_pad", recording)
    return fed


@pytest.mark.parametrize("settings, budget, mode", [
    (None, 256 - 8, "keep_end"),  # no dpo_run.json: what --max-new-tokens leaves of the 256 positions
    ({"max_prompt_length": 48, "truncation_mode": "keep_start", "template": "recipe"}, 48, "keep_start"),
    ({"max_prompt_length": None, "truncation_mode": "keep_start"}, 256 - 8, "keep_start"),
    ({"max_prompt_length": 4000, "truncation_mode": "keep_end"}, 255, "keep_end"),  # capped: one new token fits
])
def test_generate_cli_completes_a_batch_with_a_prompt_longer_than_the_model(tmp_path, monkeypatch, capsys,
                                                                            settings, budget, mode):
    model_dir = make_model_dir(tmp_path / "run" / "final")  # 256 positions
    if settings is not None:
        (model_dir / "dpo_run.json").write_text(json.dumps(settings))
    instructions = LONG_BATCH + ["tell me about a big dog " * 80]
    out = tmp_path / "out.json"
    fed = _record_fed(monkeypatch)
    capsys.readouterr()
    assert generate.main(["--model", str(tmp_path / "run"), "--instructions", _write_batch(tmp_path / "b.jsonl",
                          instructions), "--output", str(out), "--greedy", "--max-new-tokens", "8",
                          "--no-progress", "--batch-size", "2"]) == 0
    records = json.loads(out.read_text(encoding="utf-8"))
    assert [r["instruction"] for r in records] == instructions
    assert all(isinstance(r["output"], str) for r in records)
    assert capsys.readouterr().err == (f"warning: 2 of 4 prompts longer than {budget} tokens were cut ({mode}), "
                                       f"as training cuts them\n4 outputs of run/final written to {out}\n")
    tokenizer = tiny_tokenizer()
    pairs, _ = build_pairs([{"prompt": text, "chosen": "yes", "rejected": "no"} for text in instructions], tokenizer,
                           max_length=4096, max_prompt_length=budget, truncation_mode=mode)
    assert sorted(fed) == sorted(tuple(pair.prompt_ids) for pair in pairs)


def test_generate_defaults_to_the_chat_template_a_run_was_trained_with(tmp_path, monkeypatch, capsys):
    model_dir = make_model_dir(tmp_path / "final")
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = ("{% for m in messages %}<user> {{ m['content'] }}{% endfor %}"
                               "{% if add_generation_prompt %} <assistant>{% endif %}")
    tokenizer.save_pretrained(model_dir)
    (model_dir / "dpo_run.json").write_text(json.dumps({"template": "chat", "max_prompt_length": 64}))
    fed = _record_fed(monkeypatch)
    base = ["--model", str(model_dir), "--greedy", "--max-new-tokens", "2"]
    assert generate.main(base + ["yes"]) == 0
    assert generate.main(base + ["--no-chat-template", "yes"]) == 0
    assert generate.main(base + ["--chat-template", "yes"]) == 0
    chat = tuple(encode_prompts(tokenizer, ["yes"], "chat")[0][0])
    recipe = tuple(encode_prompts(tokenizer, ["yes"], "recipe")[0][0])
    assert chat != recipe and fed == [chat, recipe, chat]


# ---------------------------------------------------------------------------------------------------- the pieces


def test_render_prompt_and_response_recipe_and_chat():
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "u1"},
               {"role": "assistant", "content": " a1 "}, {"role": "user", "content": "u2"}]
    assert render_prompt(history) == ("### Human: Be brief.\n\nu1\n\n### Assistant: a1\n\n"
                                      "### Human: u2\n\n### Assistant:")
    assert render_prompt("q") == format_prompt("q") == render_prompt([{"role": "user", "content": "q"}])
    assert render_prompt(format_prompt("q")) == format_prompt("q")  # already rendered: kept as it is
    two_turns = render_prompt(history)
    # read as its conversation, whitespace around the turns aside: no stray space or newline token before the
    # response, and the chat template renders the conversation, not the recipe text inside a user turn
    assert read_prompt(two_turns) == [{"role": "user", "content": "Be brief.\n\nu1"},
                                      {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"}]
    assert render_prompt(two_turns) == render_prompt(two_turns + " ") == render_prompt(two_turns + "\n") == two_turns
    assert render_prompt("### Human: q ### Assistant:") == "### Human: q ### Assistant:"  # its turns unreadable: kept
    mention = 'In a chat log, what does the line "### Human:" mark?'  # mentioned, not rendered: rendered
    assert render_prompt(mention) == format_prompt(mention)
    assert render_prompt("### Human: q") == format_prompt("### Human: q")  # no assistant cue: not a prompt yet
    assert render_response("q", "  a \n") == format_response("a") == " a"
    with pytest.raises(PromptError, match="not user/assistant turns") as err:
        render_prompt([{"role": "assistant", "content": "a"}])
    assert err.value.reason == "bad_roles"

    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = CHATML.replace("{{ bos_token }}", "")
    prompt = render_prompt("q", "chat", tokenizer)
    assert prompt == "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n"
    assert render_prompt(format_prompt("q") + " ", "chat", tokenizer) == prompt
    assert render_response("q", " a ", "chat", tokenizer) == " a <|im_end|>"  # as the template renders it
    with pytest.raises(PromptError, match="unknown template"):
        render_prompt("q", "alpaca")


@pytest.mark.parametrize("turn, cue, answer, response", [
    # ChatML: the end-of-turn text is the response's, the "\n" after it separates turns
    ("<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n", "<|im_start|>assistant\n", " a\n",
     " a\n<|im_end|>"),
    # an answer whose text recurs in the end-of-turn text and the separator after it
    ("<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n", "<|im_start|>assistant\n", ">\n",
     ">\n<|im_end|>"),
    ("<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n", "<|im_start|>assistant\n", "end|>\n",
     "end|>\n<|im_end|>"),
    # no end-of-turn text, only a separator: the answer's own whitespace stays, the separator goes
    ("{{ m['role'] }}: {{ m['content'] }}\n\n", "assistant: ", " a\n", " a\n"),
    ("{{ m['role'] }}: {{ m['content'] }}\n\n", "assistant: ", "a", "a"),
    # nothing after the answer: all of it is the answer's
    ("{{ m['role'] }}: {{ m['content'] }}", "assistant: ", "a \n", "a \n"),
    # a template that trims the answer (as Llama-3's does) is followed: what it renders is scored
    ("<|start|>{{ m['role'] }}\n\n{{ m['content'] | trim }}<|eot|>\n", "<|start|>assistant\n\n", " a \n",
     "a<|eot|>"),
])
def test_chat_response_is_the_rendering_up_to_the_turns_end(turn, cue, answer, response):
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = ("{% for m in messages %}" + turn + "{% endfor %}"
                               "{% if add_generation_prompt %}" + cue + "{% endif %}")
    prompt = render_prompt("q", "chat", tokenizer)
    assert render_response("q", answer, "chat", tokenizer) == response
    full = tokenizer.apply_chat_template([{"role": "user", "content": "q"}, {"role": "assistant", "content": answer}],
                                         tokenize=False)
    assert full.startswith(prompt + response) and not full[len(prompt + response):].strip()


def test_truncate_prompt_never_cuts_or_doubles_bos():
    plain, bos = SpecialIds(eos=0, bos=None), SpecialIds(eos=0, bos=1)
    assert truncate_prompt([5, 6, 7, 8], plain, 2, "keep_end") == [7, 8]
    assert truncate_prompt([5, 6, 7, 8], plain, 2, "keep_start") == [5, 6]
    assert truncate_prompt([5, 6, 7, 8], bos, 3, "keep_end") == [1, 7, 8]
    assert truncate_prompt([1, 5, 6, 7, 8], bos, 3, "keep_start") == [1, 5, 6]  # the text's BOS is the one kept
    assert truncate_prompt([5, 6], bos, 1, "keep_end") == [1]
    assert truncate_prompt([5, 6], bos, None, "keep_end") == [1, 5, 6]


def test_special_ids_and_plain_text_encoding(gpt2):
    assert special_ids(gpt2) == SpecialIds(eos=gpt2.eos_token_id, bos=None)  # GPT-2 adds no BOS
    assert special_ids(adds_bos(gpt2)) == SpecialIds(eos=gpt2.eos_token_id, bos=gpt2.bos_token_id)
    recipe, chat = (encode_texts(gpt2, ["a <|endoftext|>"], template)[0] for template in ("recipe", "chat"))
    assert gpt2.eos_token_id not in recipe and chat[-1] == gpt2.eos_token_id
    no_eos = copy.deepcopy(gpt2)
    no_eos.eos_token = None
    with pytest.raises(PromptError, match="no EOS"):
        special_ids(no_eos)
    with pytest.raises(DataError, match="no EOS"):  # training reports it as a data error
        build_pairs([{"prompt": "q", "chosen": "a", "rejected": "b"}], no_eos)


def test_encode_prompts_counts_what_it_cut():
    tokenizer = tiny_tokenizer()
    ids, cut = encode_prompts(tokenizer, ["yes", "red " * 50], max_prompt_length=20, truncation_mode="keep_end")
    full = tokenizer(format_prompt("red " * 50), add_special_tokens=False)["input_ids"]
    assert cut == 1 and len(full) > 20 and ids[1] == full[-20:]
    assert ids[0] == tokenizer(format_prompt("yes"), add_special_tokens=False)["input_ids"]
    with pytest.raises(PromptError, match="truncation_mode"):
        encode_prompts(tokenizer, ["yes"], truncation_mode="keep_middle")
    assert prompt_budget(256, 12, 20) == 20


@pytest.mark.parametrize("content, end", [("{{ m['content'] }}", "<|end|>\n"), ("{{ m['content'] | upper }}", "")])
def test_the_end_of_turn_text_is_what_follows_the_answer(content, end):
    """What a chat template writes after an answer (a cut online sample loses it); a template that rewrites the
    answer, where it cannot be found, gives none rather than a wrong piece of the rendering."""
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>\n" + content + "<|end|>\n{% endfor %}"
                               "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    assert end_of_turn_text("chat", tokenizer) == end.rstrip()  # the white space after a turn is not the answer's
    assert end_of_turn_text("recipe") == ""
