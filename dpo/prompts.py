"""Prompts and responses: rendered to text and encoded to token ids, for training and generation alike.

dpo.data (training pairs) and dpo.generation (decoding) both go through these functions, so the prompt a model
is given at inference is exactly the prompt it was trained on.

    read_prompt       an instruction in HH's text format or the recipe template -> its messages, as training
                      reads a record's prompt
    render_prompt     instruction or message history -> prompt text, in the "recipe" or "chat" template
    render_response   one answer -> the response text that follows the rendered prompt
    special_ids       EOS (required) and the BOS to put in front of a prompt (or None)
    encode_texts      texts -> ids, without special tokens
    truncate_prompt   prompt ids -> [BOS]? + ids, cut to max_prompt_length (keep_end / keep_start)
    encode_prompts    render_prompt + encode_texts + truncate_prompt over a batch, with the number cut

Templates:
    recipe  the phi-2-dpo recipe's
                prompt   = "### Human: u1\\n\\n### Assistant: a1\\n\\n### Human: u2\\n\\n### Assistant:"
                response = " " + text.strip()        (EOS is added as a token id, never as text)
            A single-turn prompt is exactly format_prompt(instruction); a leading "system" message is prepended
            to the first human turn (system + "\\n\\n" + u1). A bare instruction that is already rendered
            (starts with "### Human:", ends with "### Assistant:") is read as its conversation (recipe_messages),
            so it renders as written less the whitespace around its turns. The prompt ends with the colon
            of "### Assistant:" and the response starts with a space: for byte-level BPE a space always starts a
            new token, so the token boundary between prompt and response is clean.
    chat    the tokenizer's chat template, exactly as it renders the conversation at inference:
                prompt   = apply_chat_template(history, add_generation_prompt=True)
                response = the rest of apply_chat_template(history + [assistant: text]), up to and including the
                           template's end-of-turn text (e.g. "<|im_end|>")
            The text goes into the template as it is, never stripped: an answer that starts with a space is scored
            with that space (" According" -> "ĠAccording"), as the same message is rendered in a later turn's
            history. Only the whitespace the template writes after its end-of-turn text (the "\n" between turns)
            is left out, so prompt + response is the conversation's rendering less that separator. (A template that
            rewrites the text, e.g. Llama-3's `| trim`, is followed too: the rendering is what it writes.)
A bare instruction is a conversation of one user turn, in both templates; one in HH's text format
("\\n\\nHuman: u1\\n\\nAssistant: a1\\n\\nHuman: u2\\n\\nAssistant:", Dahoas/full-hh-rlhf's prompts) is the
conversation it writes (read_prompt), wherever it comes from: a training record or an instruction to answer.

Encoding: prompt and response are encoded separately without special tokens (as TRL does), so no BPE merge
crosses the boundary and the response text is exactly what the template defines (its tokens are the whole
conversation's for byte-level BPE, unless a chat answer begins with white space that merges with the template's
own "\n": two spaces or a line break; a SentencePiece tokenizer starts the response with its own "▁"):
    prompt_ids   = [BOS]? + tok(prompt)    BOS only if the tokenizer itself adds one (e.g. Llama; not GPT-2 or
                                           Phi-2), and never twice (a chat rendering may start with it)
    response_ids = tok(response) + [EOS]   EOS not repeated if the rendering already ends with it
Recipe text is plain text: a literal "<|endoftext|>" in it stays text (split_special_tokens=True). A chat
rendering holds the template's special-token text, which is encoded as those tokens; a message that holds such
text itself is refused (apply_chat_template: "special_token_text").

Truncation: a prompt longer than max_prompt_length tokens (BOS included) loses the start of its text (keep_end,
which keeps the question's end and the assistant cue) or its end (keep_start). BOS is never cut.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dpo.errors import UserError, first_line

HUMAN_TURN_PREFIX = "### Human:"
ASSISTANT_CUE = "### Assistant:"
PROMPT_TEMPLATE = HUMAN_TURN_PREFIX + " {instruction}\n\n" + ASSISTANT_CUE
TEMPLATES = ("auto", "recipe", "chat")  # auto: the tokenizer's chat template when it ships one, else the recipe's
TRUNCATION_MODES = ("keep_end", "keep_start")
# Anthropic HH's text format (Dahoas/full-hh-rlhf, rm-static): "\n\nHuman: u1\n\nAssistant: a1 ... \n\nAssistant:"
HH_ASSISTANT = "\n\nAssistant:"
HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_FIRST_TURN = re.compile(r"\s*(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}
# Recipe text is plain text; chat renderings hold special-token text.
_SPLIT_SPECIAL_TOKENS = {"recipe": True, "chat": False}

Message = dict[str, str]
Prompt = str | Sequence[Message]  # a bare instruction, or the history before an assistant turn


# PromptError reasons that concern one conversation only (a skipped row, an instruction named)
ROW_REASONS = ("bad_roles", "chat_template_error", "special_token_text")


class PromptError(UserError):
    """A prompt that cannot be rendered or encoded, or a tokenizer that cannot encode prompts.

    `reason` is a short key: "bad_roles", "chat_template_error" and "special_token_text" concern one conversation
    only; "no_chat_template", "chat_template_mismatch", "no_eos" and "bad_setting" concern every prompt.
    """

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


# ---------------------------------------------------------------------------------------------------
# Text


def format_prompt(instruction: str) -> str:
    """One instruction in the recipe template: "### Human: {instruction}\\n\\n### Assistant:"."""
    return PROMPT_TEMPLATE.format(instruction=instruction)


def is_rendered_recipe_prompt(text: str) -> bool:
    """Whether `text` is a prompt already in the recipe template: it starts with "### Human:" and ends with the
    assistant cue (white space after it aside). An instruction that only mentions "### Human:" is not one."""
    return text.lstrip().startswith(HUMAN_TURN_PREFIX) and text.rstrip().endswith(ASSISTANT_CUE)


def format_response(text: str) -> str:
    """A response as it follows a recipe prompt: " " + text.strip(), or nothing for an empty answer (a sampled one:
    EOS alone). EOS is added as a token id, not as text."""
    return " " + text.strip() if text.strip() else ""


def _check_template_name(template: str) -> None:
    if template not in TEMPLATES:
        raise PromptError("bad_setting", f"unknown template '{template}' (choose from {', '.join(TEMPLATES)})")


def resolve_template(template: str, tokenizer: Any = None) -> str:
    """"auto" -> "chat" when the tokenizer ships a chat template, else "recipe"; another name -> itself."""
    if template == "auto":
        return "chat" if getattr(tokenizer, "chat_template", None) else "recipe"
    return template


def check_template(template: str, tokenizer: Any = None) -> None:
    """Raises PromptError (a ValueError) for an unknown template name, or for "chat" without a chat template."""
    _check_template_name(template)
    if template == "chat" and not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or "of the model"
        raise PromptError("no_chat_template", f"template 'chat': the tokenizer {name} has no chat template")


def is_hh_prompt(text: str) -> bool:
    """Whether `text` is an HH conversation up to its last assistant cue: "...\n\nHuman: ...\n\nAssistant:"."""
    return bool(_HH_FIRST_TURN.match(text) or "\n\nHuman:" in text) and text.rstrip().endswith(HH_ASSISTANT)


def hh_messages(text: str) -> list[Message]:
    """The messages of an HH text "lead\n\nHuman: u1\n\nAssistant: a1 ... \n\nHuman: un\n\nAssistant:".

    Every turn's text is what lies between the markers, stripped: the space after "Assistant:" / "Human:" and the
    line breaks around a turn belong to HH's text format, not to the message (the final answer is parsed as the
    same answer in a later row's history is). A text before the first marker is a system message."""
    if _HH_FIRST_TURN.match(text):  # a text stripped of the line breaks before its first turn
        text = "\n\n" + text.lstrip()
    parts = HH_TURN.split(text.rstrip() + " ")
    lead, turns = parts[0].strip(), list(zip(parts[1::2], parts[2::2]))
    messages = [{"role": "system", "content": lead}] if lead else []
    return messages + [{"role": _HH_ROLES[role], "content": content.strip()} for role, content in turns[:-1]]


RECIPE_TURN = re.compile(r"\n\n### (Human|Assistant):")


def recipe_messages(text: str) -> list[Message] | None:
    """The messages of a text already in the recipe template ("### Human: u1\\n\\n### Assistant: a1 ...
    \\n\\n### Human: un\\n\\n### Assistant:"), each turn stripped; None for a text that is not one
    (is_rendered_recipe_prompt false, or turns that are not Human / Assistant alternating with the cue last)."""
    if not is_rendered_recipe_prompt(text):
        return None
    parts = RECIPE_TURN.split("\n\n" + text.strip())
    roles, contents = parts[1::2], parts[2::2]
    if parts[0] or roles != ["Human", "Assistant"] * (len(roles) // 2) or len(roles) % 2 or contents[-1].strip():
        return None
    return [{"role": _HH_ROLES[role], "content": content.strip()} for role, content in zip(roles[:-1], contents)]


def read_prompt(prompt: Prompt) -> Prompt:
    """A prompt as training reads a record's: a string in HH's text format (is_hh_prompt) or already in the recipe
    template (recipe_messages) as its messages, not an instruction that quotes the format; any other prompt as it
    is."""
    if isinstance(prompt, str) and is_hh_prompt(prompt):
        return hh_messages(prompt)
    if isinstance(prompt, str) and (messages := recipe_messages(prompt)) is not None:
        return messages
    return prompt


def empty_user_turn(messages: Sequence[Message]) -> str | None:
    """Why a history says nothing to answer (no user turn, or a user turn, the last or an earlier one, that is
    empty or whitespace), or None when every user turn says something. Training skips such a row; generation
    refuses such an instruction."""
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    if not users:
        return "no user turn before the last assistant turn"
    for turn, i in enumerate(users, 1):
        if not messages[i]["content"].strip():
            return f"user turn {turn} of {len(users)} (message {i}) is empty"
    return None


def as_messages(prompt: Prompt) -> list[Message]:
    """A bare instruction as one user turn; a message list as a copy of itself."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def render_recipe_prompt(messages: Sequence[Message]) -> str:
    """History (optional system, then user/assistant alternating, ending with user) in the recipe template:

        "### Human: u1\\n\\n### Assistant: a1\\n\\n### Human: u2\\n\\n### Assistant:"

    i.e. concat(format_prompt(u_i) + format_response(a_i) + "\\n\\n") + format_prompt(u_last).
    """
    messages = list(messages)
    system = messages.pop(0)["content"].strip() if messages and messages[0]["role"] == "system" else ""
    roles = [m["role"] for m in messages]
    expected = ["user", "assistant"] * (len(roles) // 2) + ["user"]
    if roles != expected:
        raise PromptError("bad_roles", f"prompt roles {roles} are not user/assistant turns ending with user")
    turns = [m["content"] for m in messages]
    if system:
        turns[0] = f"{system}\n\n{turns[0]}"
    history = "".join(format_prompt(u) + format_response(a) + "\n\n" for u, a in zip(turns[0::2], turns[1::2]))
    return history + format_prompt(turns[-1])


def special_token_texts(tokenizer: Any) -> list[str]:
    """The texts of the tokenizer's special tokens (EOS, the chat template's markers...), longest first."""
    texts = set(getattr(tokenizer, "all_special_tokens", None) or [])
    texts |= {t.content for t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values()
              if getattr(t, "special", False)}
    return sorted((t for t in texts if t), key=len, reverse=True)


def apply_chat_template(tokenizer: Any, messages: Sequence[Message], **kwargs: Any) -> str:
    """The tokenizer's chat template applied to `messages`, as text. A message that holds a special token's text
    is a PromptError ("special_token_text"): a chat rendering is encoded with its special tokens (the template's own
    markers are such text), so that text would become the control token itself, a stray EOS or end of turn."""
    check_template("chat", tokenizer)
    specials = special_token_texts(tokenizer)
    for message in messages:
        found = next((t for t in specials if t in message["content"]), None)
        if found is not None:
            raise PromptError("special_token_text", f"a {message['role']} message holds the text of the special "
                                                    f"token {found!r}, which the chat template would encode as that "
                                                    "token")
    try:
        return tokenizer.apply_chat_template(list(messages), tokenize=False, **kwargs)
    except Exception as err:  # jinja raises for conversations the template rejects (e.g. role order)
        raise PromptError("chat_template_error", f"chat template failed ({first_line(err)})") from None


def render_prompt(prompt: Prompt, template: str = "recipe", tokenizer: Any = None) -> str:
    """The prompt text of an instruction or a history ending with a user turn (see the module docstring).
    The chat template needs the tokenizer that holds it."""
    template = resolve_template(template, tokenizer)
    check_template(template, tokenizer)
    prompt = read_prompt(prompt)
    if template == "chat":
        return apply_chat_template(tokenizer, as_messages(prompt), add_generation_prompt=True)
    if isinstance(prompt, str):
        # a text in the template whose turns could not be read (recipe_messages) is kept, less trailing space
        return prompt.rstrip() if is_rendered_recipe_prompt(prompt) else format_prompt(prompt)
    return render_recipe_prompt(prompt)


def render_response(prompt: Prompt, response: str, template: str = "recipe", tokenizer: Any = None, *,
                    rendered_prompt: str | None = None) -> str:
    """The text of `response` as it follows render_prompt(prompt) (pass that as rendered_prompt to save
    rendering it again). EOS is not added; a chat template may end the turn with its own EOS text."""
    template = resolve_template(template, tokenizer)
    check_template(template, tokenizer)
    if template == "recipe":
        return format_response(response)
    prompt = read_prompt(prompt)
    if rendered_prompt is None:
        rendered_prompt = render_prompt(prompt, template, tokenizer)
    full = apply_chat_template(tokenizer, as_messages(prompt) + [{"role": "assistant", "content": response}])
    if not full.startswith(rendered_prompt):
        raise PromptError("chat_template_mismatch", "the chat template's rendering of the conversation does not start "
                                                    "with its rendering of the prompt (add_generation_prompt=True)")
    return _without_turn_separator(full[len(rendered_prompt):], response)


END_PROBE = "Done."  # an answer rendered to find what a template writes after it


def end_of_turn_text(template: str = "recipe", tokenizer: Any = None) -> str:
    """What the template writes after an answer to end its turn, before the EOS every response gets: "" for the
    recipe's template, "<|im_end|>" for ChatML, "<|end|>" for Phi-3's chat template."""
    rendered = render_response("Hi", END_PROBE, template, tokenizer)
    at = rendered.rfind(END_PROBE)
    return rendered[at + len(END_PROBE):] if at >= 0 else ""  # a template that rewrites answers: the EOS alone


def _without_turn_separator(tail: str, response: str) -> str:
    """`tail` (a chat rendering after its prompt: the answer, then the template's end-of-turn text, then what
    separates turns) without the whitespace after the end-of-turn text. The answer's own whitespace, leading or
    trailing, is kept: only what follows it is cut, where `tail` begins with it, else after its last occurrence (a
    template that writes something before the answer). A template that rewrites the answer (so it is found neither as
    it is nor stripped) loses only its trailing whitespace."""
    for content in (response, response.strip()):
        # an answer that begins the tail is that one, also where its text recurs in the end-of-turn text (">\n")
        at = (0 if tail.startswith(content) else tail.rfind(content)) if content else -1
        if at >= 0:
            end = at + len(content)
            return tail[:end] + tail[end:].rstrip()
    return tail.rstrip()


# ---------------------------------------------------------------------------------------------------
# Token ids


@dataclass(frozen=True)
class SpecialIds:
    """The EOS id that ends every response, and the BOS id put in front of a prompt (or None)."""

    eos: int
    bos: int | None  # the BOS to put in front of a prompt, or None when the tokenizer adds none


def special_ids(tokenizer: Any) -> SpecialIds:
    """EOS (required: responses end with it) and the BOS, kept only when the tokenizer's own encoding starts
    with a BOS that it adds."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise PromptError("no_eos", f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no EOS token; "
                                    "responses must end with one")
    bos = getattr(tokenizer, "bos_token_id", None)
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    adds_bos = bos is not None and with_special[:1] == [bos] and without[:1] != [bos]
    return SpecialIds(eos=eos, bos=bos if adds_bos else None)


def lone_surrogate(value: Any) -> str | None:
    """Where a string in `value` (a str, or lists and dicts of them) holds a lone UTF-16 surrogate, which JSON's \\u
    escapes and undecodable command-line bytes can produce and no tokenizer encodes ("'\\ud800' at character 4"),
    else None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as error:
            return f"{value[error.start]!r} at character {error.start + 1}"
        return None
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    for item in items:
        if (found := lone_surrogate(item)) is not None:
            return found
    return None


def encode_texts(tokenizer: Any, texts: Sequence[str], template: str = "recipe", *,
                 split_special_tokens: bool | None = None) -> list[list[int]]:
    """Token ids of each text, without special tokens. Special-token text is kept as text for the recipe
    template and encoded as the special token for the chat template; split_special_tokens overrides that."""
    if split_special_tokens is None:
        _check_template_name(template)
        split_special_tokens = _SPLIT_SPECIAL_TOKENS[resolve_template(template, tokenizer)]
    return tokenizer(list(texts), add_special_tokens=False, split_special_tokens=split_special_tokens,
                     verbose=False)["input_ids"]


def check_truncation(max_prompt_length: int | None, truncation_mode: str) -> None:
    """Raises PromptError (a ValueError) for a mode other than keep_end / keep_start or a limit below 1."""
    if truncation_mode not in TRUNCATION_MODES:
        raise PromptError("bad_setting", f"truncation_mode must be one of {', '.join(TRUNCATION_MODES)}, "
                                         f"got '{truncation_mode}'")
    if max_prompt_length is not None and max_prompt_length < 1:
        raise PromptError("bad_setting", f"max_prompt_length must be at least 1, got {max_prompt_length}")


def with_bos(ids: Sequence[int], special: SpecialIds) -> list[int]:
    """[BOS] + ids when the tokenizer adds a BOS, never a second one (a chat rendering may start with it)."""
    ids = list(ids)
    if special.bos is None or ids[:1] == [special.bos]:
        return ids
    return [special.bos] + ids


def truncate_prompt(ids: Sequence[int], special: SpecialIds, max_prompt_length: int | None,
                    truncation_mode: str = "keep_end") -> list[int]:
    """with_bos(ids), cut to at most max_prompt_length tokens (None: no limit), BOS included and never cut:
    keep_end keeps the end of the ids, keep_start their start."""
    bos = [special.bos] if special.bos is not None else []
    ids = with_bos(ids, special)[len(bos):]
    if max_prompt_length is not None and len(bos) + len(ids) > max_prompt_length:
        keep = max(max_prompt_length - len(bos), 0)
        ids = ids[len(ids) - keep:] if truncation_mode == "keep_end" else ids[:keep]
    return bos + ids


def encode_prompts(tokenizer: Any, prompts: Sequence[Prompt], template: str = "recipe",
                   max_prompt_length: int | None = None,
                   truncation_mode: str = "keep_end") -> tuple[list[list[int]], int]:
    """Prompt ids of each instruction (or history), exactly as training builds them, and how many were cut.

    render_prompt -> encode_texts -> truncate_prompt: [BOS]? + tok(prompt), no EOS, at most max_prompt_length
    tokens.
    """
    check_truncation(max_prompt_length, truncation_mode)
    special = special_ids(tokenizer)
    texts = [render_prompt(prompt, template, tokenizer) for prompt in prompts]
    encoded = encode_texts(tokenizer, texts, template)
    ids = [truncate_prompt(row, special, max_prompt_length, truncation_mode) for row in encoded]
    cut = sum(len(kept) < len(with_bos(row, special)) for kept, row in zip(ids, encoded))
    return ids, cut
