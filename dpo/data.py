"""Preference data: raw records -> rendered text -> token ids -> padded batches.

    load_records   a source (hub name, .jsonl/.json/.parquet file, dataset directory, built-in name)
                   -> list of dict records
    to_example     one record -> PreferenceExample (prompt / chosen / rejected text); the record's
                   format is detected per row (see detect_format)
    tokenize_pair  PreferenceExample -> TokenizedPair (prompt ids; response ids + EOS), truncated
    build_pairs    the same over all records (to_example, then encoding in large batches), counting skipped
                   rows in DataStats
    collate_pairs  TokenizedPair list -> [2B, T] tensors, chosen rows first, then rejected rows

Record formats (field names as in TRL and the hub datasets):
    explicit        {"prompt": str, "chosen": str, "rejected": str}; the prompt is a bare instruction
    conversational  {"chosen": [messages], "rejected": [messages]} (HuggingFaceH4/ultrafeedback_binarized):
                    the prompt is every message before the last (assistant) turn, identical in both.
                    If "prompt" is itself a message list, chosen/rejected hold only the continuation.
    implicit        {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": ...} (Anthropic/hh-rlhf):
                    the prompt is the longest common prefix ending at the last "\\n\\nAssistant:"; each turn's
                    text (the final answer's too) is what lies between the markers, stripped.
Explicit and conversational texts are kept as they are (a chat template renders them so). A row is a counted
skip: "empty_prompt" when its prompt says nothing (an empty explicit prompt, a prompt with no user turn, or any
user turn, the last or an earlier one, that is empty or whitespace, in every format); "empty_response" when an
answer is empty; "identical_responses" when chosen and rejected are the same text up to the whitespace around them.

Rendering and tokenization are dpo.prompts' (see its docstring), the very functions generation uses, so a
model is prompted at inference exactly as it was trained: the "recipe" template ("### Human: ...\\n\\n### Assistant:"
prompts, " " + text responses) or the tokenizer's chat template; prompt_ids = [BOS]? + tok(prompt) cut to
max_prompt_length by dpo.prompts.truncate_prompt, response_ids = tok(response) + [EOS] cut to what max_length
leaves.
"""

from __future__ import annotations

import array
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dpo.errors import UserError, first_line
from dpo.prompts import (HH_ASSISTANT, HH_TURN, ROW_REASONS, Message, Prompt, PromptError, SpecialIds, as_messages,
                         check_template, check_truncation, empty_user_turn, encode_texts, hh_messages, is_hh_prompt,
                         lone_surrogate, read_prompt, recipe_messages, render_prompt, render_response, special_ids,
                         truncate_prompt, with_bos)

IGNORE_INDEX = -100  # label value of tokens that are not scored (prompt and padding)
CONSTRAINT_FIELDS = ("instruction_id_list", "kwargs")  # IFEval's: what a judge of a prompt's text checks
# raised whenever a release renders, tokenizes or skips the same records otherwise (a resumed run names it):
# 2 reads a prompt already in the recipe template as its turns and skips a chat message holding a special token's text;
# 3 leaves out online instructions whose text is a conversation of other than one non-empty user turn;
# 4 reads a conversation written inside a history's one user message as its turns, and cuts the turn separator
# after a chat answer whose text recurs in the end-of-turn text
RENDERING = 4



class DataError(UserError):
    """Unusable data; the message is one line naming the file / row / field."""


@dataclass(frozen=True)
class BuiltinSource:
    """Preference data shipped with the package, loaded by name."""

    splits: tuple[str, ...]
    load: Callable[[str], list[dict]]  # split -> records


def _demo_records(split: str) -> list[dict]:
    from dpo.demo.task import preference_records  # imported only when the demo data is used

    return preference_records(split)


BUILTIN_SOURCES: dict[str, BuiltinSource] = {"demo": BuiltinSource(("train", "test"), _demo_records)}


class RowError(DataError):
    """One unusable row. `reason` is the short key under which build_pairs counts the skip."""

    def __init__(self, reason: str, row: int, detail: str):
        super().__init__(f"row {row}: {detail}")
        self.reason = reason
        self.row = row


@dataclass(frozen=True)
class PreferenceExample:
    """One preference record as rendered text: the prompt and the chosen and rejected responses."""

    prompt: str  # rendered prompt, e.g. "### Human: ...\n\n### Assistant:"
    chosen: str  # rendered response, e.g. " answer" (no EOS)
    rejected: str
    row: int  # index in the source


@dataclass(frozen=True)
class TokenizedPair:
    """A preference pair as token ids: the prompt and the two responses (each ending with EOS unless truncated)."""

    prompt_ids: list[int]  # at most one BOS (only if the tokenizer adds one), never an EOS
    chosen_ids: list[int]  # ends with exactly one EOS unless cut by truncation
    rejected_ids: list[int]
    row: int


def pairs_digest(pairs: Sequence[TokenizedPair]) -> str:
    """A fingerprint of tokenized pairs, in order: equal exactly when every pair's token ids are."""
    digest = hashlib.sha256()
    for pair in pairs:
        for ids in (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids):
            digest.update(len(ids).to_bytes(8, "little"))
            digest.update(array.array("q", ids).tobytes())
    return digest.hexdigest()[:20]


def texts_digest(texts: Sequence[str]) -> str:
    """A fingerprint of texts, in order: equal exactly when every text is (online DPO's instructions)."""
    digest = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8", "surrogatepass")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()[:20]


@dataclass
class DataStats:
    """Rows read, pairs kept and skips counted by reason (with the first skip's message per reason)."""

    rows: int = 0
    kept: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    first_skip: dict[str, str] = field(default_factory=dict)
    truncated_prompts: int = 0  # kept pairs whose prompt was cut to max_prompt_length
    truncated_responses: int = 0  # kept pairs with a response cut at max_length (it lost its EOS)

    def count_skip(self, reason: str, message: str) -> None:
        """Count a skipped row under `reason`, keeping the first skip's message."""
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        self.first_skip.setdefault(reason, message)

    @property
    def num_skipped(self) -> int:
        """Rows skipped, all reasons together."""
        return sum(self.skipped.values())

    def reasons(self) -> str:
        """The skips as one line: each reason, its count and its first message."""
        return "; ".join(f"{reason} {n} (first: {self.first_skip[reason]})" for reason, n in self.skipped.items())

    def __str__(self) -> str:
        line = f"{self.rows} rows, {self.kept} pairs kept"
        if self.truncated_prompts or self.truncated_responses:
            line += (f" ({self.truncated_prompts} with the prompt truncated, {self.truncated_responses} with a "
                     f"response truncated)")
        if self.skipped:
            line += f", {self.num_skipped} skipped: {self.reasons()}"
        return line


# ---------------------------------------------------------------------------------------------------
# Loading


def _read_jsonl(path: Path, content: bytes | None = None) -> list[dict]:
    """The records of a JSON Lines file (its `content` where it was read already: a pipe reads once)."""
    records = []
    lines = (content if content is not None else path.read_bytes()).split(b"\n")
    for lineno, raw in enumerate(lines, start=1):
        try:
            line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a byte order mark some editors write
        except UnicodeDecodeError as err:
            raise DataError(f"{path}, line {lineno}: not UTF-8 (byte 0x{raw[err.start]:02x} at column "
                            f"{err.start + 1})") from None
        if not line.strip():
            continue
        try:
            record = json.loads(line.rstrip("\r\n"))  # a line cut short: its own column, not the newline's
        except (ValueError, RecursionError) as err:
            raise DataError(f"{path}, line {lineno}: {_json_error(err)}") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}, line {lineno}: expected a JSON object, got {type(record).__name__}")
        if (where := lone_surrogate(record)) is not None:
            raise DataError(f"{path}, line {lineno}: not Unicode text (a lone surrogate {where})")
        records.append(record)
    return records


def _json_error(err: ValueError | RecursionError) -> str:
    """What json.loads found wrong, as the end of a one-line error (its column where it names one): a syntax
    error, an integer of more digits than Python converts, or nesting deeper than it recurses."""
    if isinstance(err, json.JSONDecodeError):
        return f"not valid JSON ({err.msg}, column {err.colno})"
    if isinstance(err, RecursionError):
        return "not valid JSON (nested too deeply)"
    return f"not valid JSON ({first_line(err)})"


def _starts_as_json_lines(text: str) -> bool:
    """Whether the first non-blank line of `text` is a whole JSON value, as in JSON Lines."""
    first = next((line for line in text.split("\n") if line.strip()), "")  # not splitlines: U+2028 is text
    try:
        json.loads(first)
    except (ValueError, RecursionError):
        return False
    return True


def read_json(path: Path, split: str | None = None, *, single_record: bool = False) -> tuple[list[Any], str]:
    """A JSON array of records, or an object {split: [records]}; JSON Lines saved as .json also work; with
    `single_record`, an object that is not {split: [records]} is one record. With a description: the path, and the
    split where one was taken from an object. Every syntax or encoding error is a DataError naming the line."""
    content = path.read_bytes()  # once: a pipe (/dev/stdin) reads once
    try:
        text = content.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = content.count(b"\n", 0, err.start) + 1
        column = err.start - (content.rfind(b"\n", 0, err.start) + 1) + 1
        raise DataError(f"{path}, line {line}: not UTF-8 (byte 0x{content[err.start]:02x} at column {column})") from None
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as err:
        if _starts_as_json_lines(text):
            return _read_jsonl(path, content), str(path)
        where = f", line {err.lineno}" if isinstance(err, json.JSONDecodeError) else ""
        raise DataError(f"{path}{where}: {_json_error(err)}") from None
    description = str(path)
    if isinstance(data, dict) and split is not None and isinstance(data.get(split), list):
        data, description = data[split], f"{path} [{split}]"
    elif isinstance(data, dict) and single_record:
        data = [data]
    if not isinstance(data, list):
        hint = f" (no list under key '{split}')" if split is not None else ""
        raise DataError(f"{path}: expected a JSON array of records{hint}")
    for index, record in enumerate(data):
        if (where := lone_surrogate(record)) is not None:
            raise DataError(f"{description}, record {index}: not Unicode text (a lone surrogate {where})")
    return data, description


def _read_parquet(path: Path) -> list[dict]:
    import pyarrow.parquet as pq  # heavy, and comes with datasets: only .parquet files need it

    try:
        return pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow raises several types for corrupt files
        raise DataError(f"{path}: cannot read parquet ({type(err).__name__}: {first_line(err)})") from None


class _Collected(logging.Handler):
    """Keeps the last error a library logs, to put in a one-line message instead of on stderr."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.last_error: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        lines = record.getMessage().strip().splitlines()
        self.last_error = lines[0][:300] if lines else None


def _ends(error: BaseException) -> str:
    """The first line of an error's message and, when it has more, its last: datasets' CastError says what it could
    not cast on the first line and why ("because column names don't match") on the last."""
    lines = str(error).strip().splitlines()
    return first_line(error) + (f" ... {lines[-1].strip()[:200]}" if len(lines) > 1 else "")


def _load_with_datasets(source: str, split: str | None) -> tuple[list[dict], str]:
    """A dataset directory with splits or a hub name, through datasets.load_dataset."""
    import datasets  # heavy: only hub names and dataset directories need it

    logged = _Collected()
    library_logger = logging.getLogger("datasets")
    handlers, propagate, bars_off = library_logger.handlers, library_logger.propagate, \
        datasets.are_progress_bars_disabled()
    library_logger.handlers, library_logger.propagate = [logged], False  # an error is one line, not its log
    datasets.disable_progress_bars()
    try:
        if split is None:
            splits = datasets.get_dataset_split_names(source)
            if len(splits) != 1:
                raise DataError(f"{source}: has splits {', '.join(splits)}; choose one with split=")
            split = splits[0]
        dataset = datasets.load_dataset(source, split=split)
    except DataError:
        raise
    except Exception as err:  # network, missing split, bad files: all reported as one line
        # datasets wraps what went wrong; its log names the file ("Failed to load JSON from file '...' with
        # error ...: JSON parse error: Invalid value. in row 10")
        detail = logged.last_error or (f"{type(err.__cause__).__name__}: {_ends(err.__cause__)}"
                                       if err.__cause__ is not None else "")
        raise DataError(f"{source}: cannot load dataset ({type(err).__name__}: {first_line(err)}"
                        + (f"; {detail}" if detail else "") + ")") from None
    finally:
        library_logger.handlers, library_logger.propagate = handlers, propagate
        if not bars_off:
            datasets.enable_progress_bars()
    return dataset.to_list(), f"{source} [{split}]"


def available_splits(source: str) -> list[str] | None:
    """Split names of a source, or None for a single file (which has no splits)."""
    if source in BUILTIN_SOURCES:
        return list(BUILTIN_SOURCES[source].splits)
    path = Path(source)
    if path.is_file():
        return _json_object_splits(path) if path.suffix == ".json" else None
    if path.suffix in (".jsonl", ".json", ".parquet") or (source.startswith((".", "/", "~")) and not path.exists()):
        raise DataError(f"{source}: file not found")
    import datasets  # slow to import: only hub names and dataset directories need it

    try:
        return list(datasets.get_dataset_split_names(source))
    except Exception as error:
        raise DataError(f"{source}: cannot read the dataset's splits ({first_line(error)})") from None


def _json_object_splits(path: Path) -> list[str] | None:
    """The keys of a .json file that is an object of record lists ({"train": [...], "test": [...]}), else None."""
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (ValueError, RecursionError):  # UnicodeDecodeError and json's errors are ValueErrors
        return None  # JSON Lines saved as .json, or a broken file: load_records reads or reports it
    if isinstance(data, dict) and data and all(isinstance(value, list) for value in data.values()):
        return list(data)
    return None


def load_records(source: str, split: str | None = None) -> tuple[list[dict], str]:
    """Records of a source and a description of it, e.g. ("pairs.jsonl (2383 records)").

    Resolution order: a name in BUILTIN_SOURCES; a local .jsonl / .json / .parquet file (split is ignored,
    except to pick a key of a .json object); a local dataset directory or a hub name, loaded with
    datasets.load_dataset (split required when there is more than one).
    """
    path = Path(source)
    if source in BUILTIN_SOURCES:
        builtin = BUILTIN_SOURCES[source]
        if split not in builtin.splits:
            raise DataError(f"{source}: no split {split!r} (available: {', '.join(builtin.splits)})")
        records, description = builtin.load(split), f"built-in '{source}'"
    elif path.is_file():
        readers = {
            ".jsonl": lambda: (_read_jsonl(path), source),
            ".json": lambda: read_json(path, split),
            ".parquet": lambda: (_read_parquet(path), source),
        }
        if path.suffix not in readers:
            raise DataError(f"{source}: unsupported file type '{path.suffix}' (use .jsonl, .json or .parquet)")
        records, description = readers[path.suffix]()
    elif path.suffix in (".jsonl", ".json", ".parquet"):
        raise DataError(f"{source}: file not found")
    else:
        records, description = _load_with_datasets(source, split)
    if not records:
        raise DataError(f"{description}: no records")
    return records, f"{description} ({len(records)} records)"


# ---------------------------------------------------------------------------------------------------
# Record formats -> dialogue (prompt messages + two candidate final assistant turns)


@dataclass(frozen=True)
class _Dialogue:
    prompt: Prompt  # the explicit format's bare instruction, or the history ending with a user turn
    chosen: str  # raw text of the final assistant turn
    rejected: str


def detect_format(record: Any) -> str:
    """'conversational' (chosen/rejected are message lists), 'explicit' (has a prompt), else 'implicit'."""
    if not isinstance(record, dict):
        raise DataError(f"record is a {type(record).__name__}, not an object")
    if isinstance(record.get("chosen"), list) or isinstance(record.get("rejected"), list):
        return "conversational"
    if record.get("prompt") is not None:  # (a parquet or datasets column a row lacks is there as null)
        return "explicit"
    return "implicit"


def _get(record: dict, key: str, row: int) -> Any:
    if key not in record or record[key] is None:
        raise RowError("missing_field", row, f"field '{key}' is missing")
    return record[key]


def _text_field(record: dict, key: str, row: int, empty_reason: str) -> str:
    value = _get(record, key, row)
    if not isinstance(value, str):
        raise RowError("wrong_type", row, f"field '{key}' is a {type(value).__name__}, not a string")
    if not value.strip():
        raise RowError(empty_reason, row, f"field '{key}' is empty")
    return value


def _message_list(value: Any, key: str, row: int) -> list[dict[str, str]]:
    if not isinstance(value, list):
        raise RowError("wrong_type", row, f"field '{key}' is a {type(value).__name__}, not a list of messages")
    for i, message in enumerate(value):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise RowError("wrong_type", row, f"field '{key}' message {i} is not a {{'role', 'content'}} of strings")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _check_user_turns(messages: Sequence[dict[str, str]], row: int, where: str) -> None:
    """An "empty_prompt" skip for a prompt that says nothing (prompts.empty_user_turn), as for an empty explicit
    prompt. `where` names the field (and format) the messages came from."""
    if (why := empty_user_turn(messages)) is not None:
        raise RowError("empty_prompt", row, f"{where}: {why}")


def _explicit(record: dict, row: int) -> _Dialogue:
    prompt = _text_field(record, "prompt", row, "empty_prompt")
    chosen = _text_field(record, "chosen", row, "empty_response")
    rejected = _text_field(record, "rejected", row, "empty_response")
    if (messages := recipe_messages(prompt)) is not None:  # already in the recipe template: its conversation
        _check_user_turns(messages, row, "field 'prompt' (recipe text)")
        return _Dialogue(messages, chosen, rejected)
    if not is_hh_prompt(prompt):
        return _Dialogue(prompt, chosen, rejected)
    # an HH conversation in the prompt field (Dahoas/full-hh-rlhf, rm-static): read as the implicit format reads
    # the shared prefix, not wrapped in the template a second time
    responses = _hh_responses(chosen, rejected, row)
    return _Dialogue(_hh_messages(prompt, row, "field 'prompt' (HH text)"), *responses)


def _hh_messages(prompt: str, row: int, where: str) -> list[dict[str, str]]:
    """The messages of an HH text (dpo.prompts.hh_messages), each user turn checked to say something."""
    messages = hh_messages(prompt)
    _check_user_turns(messages, row, where)
    return messages


def _hh_responses(chosen: str, rejected: str, row: int) -> tuple[str, str]:
    """The two final answers of an HH row, stripped; a response that goes on with another turn after its answer
    is a "multi_turn_response" skip (its later turns would be scored as the answer's text)."""
    responses = chosen.strip(), rejected.strip()
    for key, text in zip(("chosen", "rejected"), responses):
        if not text:
            raise RowError("empty_response", row, f"field '{key}' has an empty response after the prompt")
        if turn := HH_TURN.search(text):
            raise RowError("multi_turn_response", row, f"field '{key}' goes on after its answer with another "
                                                       f"{turn.group(1)} turn")
    return responses


def _written_turns(messages: list[Message]) -> list[Message]:
    """A conversation whose history is one user message holding a conversation written as text (HH's `Human: ...
    Assistant:`, the recipe's `### Human:`), with that history read as the turns it writes: as a prompt string is
    read, and as online sampling and generation read such a message (record_instruction, render_prompt)."""
    if len(messages) == 2 and messages[0]["role"] == "user":
        turns = read_prompt(messages[0]["content"])
        if isinstance(turns, list):
            return [*turns, messages[1]]
    return messages


def _conversational(record: dict, row: int) -> _Dialogue:
    chosen = _message_list(_get(record, "chosen", row), "chosen", row)
    rejected = _message_list(_get(record, "rejected", row), "rejected", row)
    if isinstance(record.get("prompt"), list):  # TRL style: prompt messages + continuations
        prompt = _message_list(record["prompt"], "prompt", row)
        # or whole conversations that repeat the prompt (ultrafeedback_binarized's shape with a message prompt)
        if not (chosen[:len(prompt)] == prompt and rejected[:len(prompt)] == prompt):
            chosen, rejected = prompt + chosen, prompt + rejected
    elif isinstance(record.get("prompt"), str) and len(chosen) == len(rejected) == 1 and record["prompt"].strip():
        # a prompt string and the two answers as one assistant message each (ultrafeedback_binarized's full
        # conversations carry the user turn themselves: their "prompt" is then a copy, left unread)
        prompt = [{"role": "user", "content": record["prompt"]}]
        chosen, rejected = prompt + chosen, prompt + rejected
    chosen, rejected = _written_turns(chosen), _written_turns(rejected)
    for key, messages in (("chosen", chosen), ("rejected", rejected)):
        if not messages or messages[-1]["role"] != "assistant":
            raise RowError("no_assistant_turn", row, f"field '{key}' does not end with an assistant message")
        if not messages[-1]["content"].strip():
            raise RowError("empty_response", row, f"field '{key}' has an empty final assistant message")
    if chosen[:-1] != rejected[:-1]:
        raise RowError("prompt_mismatch", row, "chosen and rejected differ before their last assistant turn")
    if not chosen[:-1]:
        raise RowError("empty_prompt", row, "no messages before the last assistant turn")
    _check_user_turns(chosen[:-1], row, "field 'prompt'" if isinstance(record.get("prompt"), list) else
                      "field 'chosen'")
    return _Dialogue(chosen[:-1], chosen[-1]["content"], rejected[-1]["content"])


def _implicit(record: dict, row: int) -> _Dialogue:
    chosen = _text_field(record, "chosen", row, "empty_response")
    rejected = _text_field(record, "rejected", row, "empty_response")
    common = os.path.commonprefix([chosen, rejected])
    end = common.rfind(HH_ASSISTANT)
    if end < 0:
        raise RowError("no_assistant_turn", row, f"no shared prompt ending with {HH_ASSISTANT!r} "
                                                 "(and no 'prompt' field)")
    end += len(HH_ASSISTANT)
    responses = _hh_responses(chosen[end:], rejected[end:], row)
    return _Dialogue(_hh_messages(chosen[:end], row, "field 'chosen' (HH text)"), *responses)


_FORMATS: dict[str, Callable[[dict, int], _Dialogue]] = {
    "explicit": _explicit,
    "conversational": _conversational,
    "implicit": _implicit,
}


def other_constraints(first: Any, record: Any) -> bool:
    """Whether two records of one instruction both carry IFEval's constraints (CONSTRAINT_FIELDS), and other ones."""
    constrained = all(isinstance(r, dict) and any(f in r for f in CONSTRAINT_FIELDS) for r in (first, record))
    return constrained and any(first.get(f) != record.get(f) for f in CONSTRAINT_FIELDS)


def constraint_clash(where: str, first_row: int) -> str:
    """The message of a record whose instruction is row `first_row`'s with other constraints (other_constraints)."""
    return (f"{where}: its instruction is row {first_row}'s, with other constraints ({', '.join(CONSTRAINT_FIELDS)}): "
            "an IFEval judge, which knows a prompt by its text, cannot tell them apart")


def instruction_records(records: Sequence[Any], rows: Sequence[int] | None = None, *, template: str | None = None,
                        tokenizer: Any = None, source: str = "the data",
                        constraints: bool = False) -> tuple[dict[str, tuple[int, Any]], int]:
    """The distinct single-turn instructions of records, in first-seen order, each with the row and record it first
    came from, and how many records were left out (a multi-turn history, a row that cannot be read, or with
    `template` an instruction that template cannot render, e.g. one holding a special token's text under the chat
    template): online DPO's prompt set, checked before the first step samples it. A record is a preference pair of
    any format, or a prompt alone (a "prompt" and no responses, as in IFEval's input_data.jsonl, whose other fields
    its judge reads). `rows`: as build_pairs'. With `constraints` (an IFEval judge will read them), the same
    instruction in two records with other constraints is a DataError naming `source`: the judge knows a prompt by
    its text."""
    seen: dict[str, tuple[int, Any]] = {}
    left_out = 0
    if template is not None:
        with _as_data_errors():
            check_template(template, tokenizer)
    for row, record in zip(range(len(records)) if rows is None else rows, records):
        prompt, _ = record_instruction(record, row)
        if prompt is not None and prompt not in seen and template is not None:
            try:
                with _as_data_errors(row):
                    render_prompt(prompt, template, tokenizer)
            except RowError:
                prompt = None
        if prompt is not None:
            first_row, first = seen.setdefault(prompt, (row, record))
            if constraints and other_constraints(first, record):
                raise DataError(constraint_clash(f"{source}, row {row}", first_row))
        else:
            left_out += 1
    return seen, left_out


def record_instruction(record: Any, row: int) -> tuple[str | None, bool]:
    """The single-turn instruction a record holds, as online DPO samples it (the text of its one user turn), or None;
    and whether the record is a preference pair (of any format) rather than a prompt alone."""
    pair = isinstance(record, dict)
    try:
        prompt = _FORMATS[detect_format(record)](record, row).prompt if pair else None
    except RowError:
        pair = False
        prompt = record.get("prompt") if "chosen" not in record and "rejected" not in record else None
        if isinstance(prompt, str):  # a conversation in HH's or the recipe's text: its turns, as sampling reads
            prompt = read_prompt(prompt)
    if (isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], dict)
            and prompt[0].get("role") == "user"):
        prompt = prompt[0].get("content")  # not text (a list of parts, say): None below
    # a message's content written as a conversation is read so by sampling too: it must be one turn, saying
    # something (the instruction is the turn's text; an IFEval judge knows the record by it: IFEvalJudge)
    if isinstance(prompt, str):
        turns = read_prompt(prompt)
        if isinstance(turns, list) and (len(turns) != 1 or empty_user_turn(turns) is not None):
            prompt = None
    return (prompt if isinstance(prompt, str) and prompt.strip() else None), pair


# ---------------------------------------------------------------------------------------------------
# Dialogue -> rendered text (dpo.prompts)

@contextmanager
def _as_data_errors(row: int | None = None) -> Iterator[None]:
    """dpo.prompts' errors as data errors: one conversation's as a RowError (a counted skip), the template's or
    the tokenizer's as a DataError, which stops the run."""
    try:
        yield
    except PromptError as err:
        if row is None:
            raise DataError(str(err)) from None
        if err.reason in ROW_REASONS:
            raise RowError(err.reason, row, str(err)) from None
        raise DataError(f"row {row}: {err}") from None


def _sampled(record: dict, row: int) -> _Dialogue:
    """Online DPO's record: an instruction and two of the policy's answers, as they were sampled. An answer may be
    empty (the policy stopped at once: its response is its end alone, EOS after any end-of-turn text), and the two
    may be the same text (one cut, one ended: dpo.on_policy compares their tokens)."""
    return _Dialogue(record["prompt"], record["chosen"], record["rejected"])


def to_example(record: Any, row: int, *, template: str = "recipe", tokenizer: Any = None,
               samples: bool = False) -> PreferenceExample:
    """One record -> rendered text. Raises RowError (a DataError with a skip reason) for a bad row. `samples`: a
    record of sampled answers (_sampled), not of a preference set."""
    with _as_data_errors():
        check_template(template, tokenizer)
    if not isinstance(record, dict):
        raise RowError("wrong_type", row, f"record is a {type(record).__name__}, not an object")
    dialogue = _sampled(record, row) if samples else _FORMATS[detect_format(record)](record, row)
    with _as_data_errors(row):
        prompt = render_prompt(dialogue.prompt, template, tokenizer)
        chosen = render_response(dialogue.prompt, dialogue.chosen, template, tokenizer, rendered_prompt=prompt)
        rejected = render_response(dialogue.prompt, dialogue.rejected, template, tokenizer, rendered_prompt=prompt)
    example = PreferenceExample(prompt, chosen, rejected, row)
    # identical up to the whitespace around them, too: under a chat template (which keeps that whitespace) such a
    # pair would teach only a preference for a leading space or a final newline
    if not samples and (example.chosen == example.rejected or dialogue.chosen.strip() == dialogue.rejected.strip()):
        raise RowError("identical_responses", row, "chosen and rejected are identical")
    return example


# ---------------------------------------------------------------------------------------------------
# Text -> token ids (dpo.prompts), responses and truncation


def _special_ids(tokenizer: Any) -> SpecialIds:
    with _as_data_errors():
        return special_ids(tokenizer)


def _check_lengths(max_length: int, max_prompt_length: int | None, truncation_mode: str) -> None:
    with _as_data_errors():
        check_truncation(max_prompt_length, truncation_mode)
    if max_length < 1:
        raise DataError(f"max_length must be at least 1, got {max_length}")


def _assemble(prompt_ids: list[int], chosen_ids: list[int], rejected_ids: list[int], row: int,
              special: SpecialIds, max_length: int, max_prompt_length: int | None,
              truncation_mode: str) -> TokenizedPair | None:
    prompt = truncate_prompt(prompt_ids, special, max_prompt_length, truncation_mode)
    budget = max_length - len(prompt)
    if budget < 1:
        return None

    def response(ids: list[int]) -> list[int]:
        # a response cut here loses its EOS: it did not end
        return (ids if ids[-1:] == [special.eos] else ids + [special.eos])[:budget]

    return TokenizedPair(prompt, response(chosen_ids), response(rejected_ids), row)


def tokenize_pair(example: PreferenceExample, tokenizer: Any, *, max_length: int, max_prompt_length: int | None,
                  truncation_mode: str = "keep_end", template: str = "recipe",
                  split_special_tokens: bool | None = None) -> TokenizedPair | None:
    """prompt_ids = [BOS]? + tok(prompt), responses = tok(response) + [EOS], then truncated:
    the prompt to max_prompt_length (keep_end / keep_start), each response to max_length - len(prompt_ids).
    Special-token text is encoded as build_pairs encodes it for `template` (split_special_tokens overrides).
    None when the prompt leaves no room for a single response token."""
    _check_lengths(max_length, max_prompt_length, truncation_mode)
    special = _special_ids(tokenizer)
    prompt_ids, chosen_ids, rejected_ids = encode_texts(
        tokenizer, [example.prompt, example.chosen, example.rejected], template,
        split_special_tokens=split_special_tokens)
    return _assemble(prompt_ids, chosen_ids, rejected_ids, example.row, special,
                     max_length, max_prompt_length, truncation_mode)


def build_pairs(records: Sequence[Any], tokenizer: Any, *, max_length: int = 1024, max_prompt_length: int | None = 512,
                truncation_mode: str = "keep_end", template: str = "recipe", source: str = "preference data",
                allow_empty: bool = False, rows: Sequence[int] | None = None,
                samples: bool = False) -> tuple[list[TokenizedPair], DataStats]:
    """All usable records as TokenizedPairs (source order) and the counts of skipped rows by reason.
    `rows`: each record's row in its source (messages and TokenizedPair.row), when `records` is a split or subset
    of it. Raises DataError when none is usable, unless `allow_empty` (online DPO's samples of a step). `samples`:
    records of sampled answers (to_example's), whose identical pairs the caller drops once it has set their ends."""
    _check_lengths(max_length, max_prompt_length, truncation_mode)
    special = _special_ids(tokenizer)
    stats = DataStats(rows=len(records))
    examples = []
    for row, record in zip(range(len(records)) if rows is None else rows, records):
        try:
            examples.append(to_example(record, row, template=template, tokenizer=tokenizer, samples=samples))
        except RowError as err:
            stats.count_skip(err.reason, str(err))

    pairs = []
    chunk = 1024  # batched encoding is much faster than one call per text
    for start in range(0, len(examples), chunk):
        batch = examples[start:start + chunk]
        texts = [e.prompt for e in batch] + [e.chosen for e in batch] + [e.rejected for e in batch]
        ids = encode_texts(tokenizer, texts, template)
        n = len(batch)
        for i, example in enumerate(batch):
            pair = _assemble(ids[i], ids[n + i], ids[2 * n + i], example.row, special,
                             max_length, max_prompt_length, truncation_mode)
            if pair is None:
                prompt = truncate_prompt(ids[i], special, max_prompt_length, truncation_mode)  # as _assemble's
                stats.count_skip("prompt_too_long", f"row {example.row}: prompt of {len(prompt)} tokens leaves no "
                                                    f"room for a response within max_length={max_length}")
            elif not pair.prompt_ids:  # no position would predict the first response token: it goes unscored
                stats.count_skip("empty_prompt", f"row {example.row}: the prompt is no tokens (rendered "
                                                 f"{example.prompt!r}, and the tokenizer adds no BOS)")
            elif pair.chosen_ids == pair.rejected_ids and not samples:
                stats.count_skip("identical_after_truncation", f"row {example.row}: chosen and rejected are "
                                                               f"identical within max_length={max_length}")
            else:
                pairs.append(pair)
                stats.truncated_prompts += len(pair.prompt_ids) < len(with_bos(ids[i], special))
                stats.truncated_responses += (pair.chosen_ids[-1:] != [special.eos]
                                              or pair.rejected_ids[-1:] != [special.eos])
    stats.kept = len(pairs)
    if not pairs and not allow_empty:
        detail = f"{stats.rows} rows: {stats.reasons()}" if stats.skipped else f"{stats.rows} rows"
        raise DataError(f"{source}: no usable preference pairs ({detail})")
    return pairs, stats


# ---------------------------------------------------------------------------------------------------
# Subsets, splits, epoch order


def select_subset(records: Sequence[Any], n: int | None, *, seed: int | None = None) -> list:
    """The first n records (seed None) or n drawn without replacement with `seed`, kept in source order.
    n None or n >= len(records): all records."""
    if n is None or n >= len(records):
        return list(records)
    if n < 1:
        raise DataError(f"subset size must be >= 1, got {n}")
    if seed is None:
        return list(records[:n])
    indices = np.sort(np.random.default_rng(seed).choice(len(records), size=n, replace=False))
    return [records[i] for i in indices]


def prompt_key(record: Any, row: int) -> str | None:
    """What a record asks, as a key that is equal for the records of one prompt in any of its forms (an instruction,
    its messages, HH's or the recipe's text), or None for a row build_pairs will skip (its prompt cannot be read, or
    its two answers are the same text). A prompt alone (what online DPO samples) has the key of that prompt."""
    if isinstance(record, dict) and record.get("prompt") is not None and not {"chosen", "rejected"} & set(record):
        prompt = record["prompt"]
        if not isinstance(prompt, str) and not (isinstance(prompt, list)
                                                and all(isinstance(message, dict) for message in prompt)):
            return None  # a skipped row (wrong_type)
    else:
        try:
            dialogue = _FORMATS[detect_format(record)](record, row)
        except DataError:
            return None
        if str(dialogue.chosen).strip() == str(dialogue.rejected).strip():
            return None
        prompt = dialogue.prompt
    return json.dumps(as_messages(read_prompt(prompt)), sort_keys=True, default=str)


def train_test_split(records: Sequence[Any], test_size: float | int, seed: int,
                     keys: Sequence[str | None] | None = None) -> tuple[list, list]:
    """Disjoint (train, test) covering all records, each in source order. A float test_size is a
    fraction (ceil(fraction * N) test records), an int a count; both sides must be non-empty.

    With `keys` (prompt_key of each record), the records of one key go to one side: the test side is drawn from the
    records with a key (test_size a fraction of them), in the seeded order, each bringing the others of its key,
    until it holds at least that many; a record without one (a row that will be skipped) stays on the train side,
    where its skip is counted. Where every record has a key of its own this is the plain split, record for record."""
    if keys is not None and any(key is not None for key in keys):
        return _split_by_key(records, test_size, seed, keys)
    num = len(records)
    num_test = _test_count(test_size, num)
    order = np.random.default_rng(seed).permutation(num).tolist()
    test_indices = set(order[:num_test])
    train = [r for i, r in enumerate(records) if i not in test_indices]
    test = [r for i, r in enumerate(records) if i in test_indices]
    return train, test


def _test_count(test_size: float | int, num: int, of: str = "") -> int:
    """How many of `num` records test_size holds out (a fraction: ceil(fraction * num); an int: itself), leaving
    both sides non-empty; a DataError otherwise (`of` qualifies the records counted)."""
    if isinstance(test_size, float) and not 0.0 < test_size < 1.0:
        raise DataError(f"a fractional test_size must be in (0, 1), got {test_size}")
    num_test = math.ceil(test_size * num) if isinstance(test_size, float) else int(test_size)
    if not 1 <= num_test <= num - 1:
        raise DataError(f"test_size={test_size} gives {num_test} test records out of {num}{of}; "
                        "both splits must be non-empty")
    return num_test


def _split_by_key(records: Sequence[Any], test_size: float | int, seed: int,
                  keys: Sequence[str | None]) -> tuple[list, list]:
    """train_test_split with keys (see there)."""
    usable = [i for i, key in enumerate(keys) if key is not None]
    num_test = _test_count(test_size, len(usable), " usable")
    groups: dict[str, list[int]] = {}
    for i in usable:
        groups.setdefault(keys[i], []).append(i)
    test_indices: set[int] = set()
    for i in np.random.default_rng(seed).permutation(len(records)).tolist():
        if len(test_indices) >= num_test:
            break
        if keys[i] is not None:
            test_indices.update(groups[keys[i]])
    if len(test_indices) == len(usable):
        raise DataError(f"test_size={test_size}: the records of one prompt go to one side, and {len(usable)} "
                        f"records share {len(groups)} prompt(s): no prompt is left to train on; hold out fewer")
    return ([r for i, r in enumerate(records) if i not in test_indices],
            [r for i, r in enumerate(records) if i in test_indices])


def epoch_permutation(num_items: int, epoch: int, seed: int) -> list[int]:
    """Order of the items in `epoch`: a permutation determined by (seed, epoch) alone, so a resumed run
    sees the same order."""
    return np.random.default_rng([seed, epoch]).permutation(num_items).tolist()


# ---------------------------------------------------------------------------------------------------
# Batches


def collate_pairs(pairs: Sequence[TokenizedPair], pad_id: int, *,
                  pad_to_multiple_of: int | None = None) -> dict[str, Tensor]:
    """B pairs -> 2B right-padded sequences: rows 0..B-1 = prompt + chosen, rows B..2B-1 = prompt + rejected.

    input_ids       [2B, T] long, pad_id after each sequence
    attention_mask  [2B, T] long, 1 on the first prompt_len + response_len positions (from lengths: the
                    pad id may equal EOS or BOS, e.g. Phi-2 and GPT-2)
    labels          [2B, T] long, input_ids on response tokens, -100 on prompt and padding (not shifted)
    prompt_lengths, response_lengths  [2B] long
    """
    if not pairs:
        raise ValueError("collate_pairs needs at least one pair")
    sequences = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
    prompt_lengths = torch.tensor([len(prompt) for prompt, _ in sequences], dtype=torch.long)
    response_lengths = torch.tensor([len(response) for _, response in sequences], dtype=torch.long)
    width = int((prompt_lengths + response_lengths).max())
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of

    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    labels = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
    for i, (prompt, response) in enumerate(sequences):
        input_ids[i, :len(prompt) + len(response)] = torch.tensor(prompt + response, dtype=torch.long)
        labels[i, len(prompt):len(prompt) + len(response)] = torch.tensor(response, dtype=torch.long)
    positions = torch.arange(width)
    attention_mask = (positions[None, :] < (prompt_lengths + response_lengths)[:, None]).long()
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "prompt_lengths": prompt_lengths,
        "response_lengths": response_lengths,
    }
