"""IFEval, verifiable instruction following (Zhou et al. 2023, "Instruction-Following Evaluation for Large Language
Models"), judged by Google's own checkers as the `if-verifiable` package ships them.

An IFEval prompt carries three fields, so that IFEval's own input_data.jsonl works as it is:

    prompt               the instruction with its constraints written out ("... Do not use any commas.")
    instruction_id_list  the constraint types, e.g. ["punctuation:no_comma"]
    kwargs               one dict of the checker's arguments per type (None values are left out, as IFEval does)

A response is checked against each constraint of its prompt:

    strict   the checker passes on the response as it is (an empty response follows nothing)
    loose    the checker passes on the response or one of IFEval's variants of it: without its first line, its
             last line or both, each also with every '*' removed
    prompt level        a prompt counts when every one of its constraints passes
    instruction level   every constraint counts on its own

`constrained_prompts` builds such prompts from plain instructions with the checkers' own descriptions and
sampled arguments, and `split_instructions` keeps evaluation instructions apart from training ones:

    python -m dpo.ifeval --instructions PAIRS_OR_PROMPTS_FILE --out-dir runs/ifeval-data
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import stat
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from dpo.cli import ArgumentParser, exit_quietly_on_interrupt, run_cli  # light: it comes before the heavy imports below

if __name__ == "__main__":
    exit_quietly_on_interrupt()  # Ctrl-C in their seconds: `interrupted`, not a traceback

from dpo.data import available_splits, instruction_records, load_records, record_instruction
from dpo.errors import UserError, first_line

# The constraint types the builder uses by default: ten of IFEval's types that a 135M-parameter instruct model
# follows at least sometimes, none of them needing nltk data (NLTK_RESOURCES) or a language other than English
DEFAULT_TYPES = (
    "detectable_content:postscript",
    "detectable_format:title",
    "length_constraints:number_words",
    "startend:end_checker",
    "change_case:english_lowercase",
    "punctuation:no_comma",
    "startend:quotation",
    "detectable_format:number_bullet_lists",
    "change_case:english_capital",
    "keywords:existence",
)
# checkers that need nltk data the package does not ship, and the resource each loads
# (nltk 3.9+, which if-verifiable requires, reads punkt_tab where the checkers ask for punkt)
NLTK_RESOURCES = {"length_constraints:number_sentences": "tokenizers/punkt_tab",
                  "change_case:capital_word_frequency": "tokenizers/punkt_tab"}
# arguments that must be lists of words: a string would be read as its letters
WORD_LIST_ARGUMENTS = ("keywords", "forbidden_words")
FIELDS = ("prompt", "instruction_id_list", "kwargs")


class IFEvalError(UserError):
    """An IFEval prompt that cannot be checked, or a builder setting that cannot work, in one line."""


@dataclass(frozen=True)
class IFEvalPrompt:
    """One IFEval prompt: the text the model answers, and the constraints its answer is checked against."""

    prompt: str
    instruction_id_list: tuple[str, ...]
    kwargs: tuple[dict[str, Any], ...]
    key: Any = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)  # other fields of the row, kept when written

    def to_row(self) -> dict[str, Any]:
        """The prompt as a row of IFEval's input_data.jsonl (key first, as IFEval writes it)."""
        return {"key": self.key, "prompt": self.prompt, "instruction_id_list": list(self.instruction_id_list),
                "kwargs": [dict(k) for k in self.kwargs], **self.extra}


@cache
def registry() -> dict[str, type]:
    """IFEval's checkers by type (`if_verifiable.ifeval`)."""
    try:  # optional: the [ifeval] extra
        from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT
        from langdetect import DetectorFactory
    except ImportError:
        raise IFEvalError("the ifeval judge needs IFEval's checkers (if-verifiable, Python 3.11 or later): "
                          'pip install -e ".[ifeval]"') from None
    # the case checkers ask langdetect whether a response is English; unseeded, it answers at random on short or
    # mixed text, and the same response could pass and then fail
    DetectorFactory.seed = 0
    return dict(INSTRUCTION_DICT)


def has_ifeval_fields(record: Any) -> bool:
    """Whether a record carries IFEval's constraint fields (instruction_id_list and kwargs)."""
    return isinstance(record, dict) and "instruction_id_list" in record and "kwargs" in record


def parse_prompt(record: Any, where: str) -> IFEvalPrompt:
    """A record with IFEval's fields as an IFEvalPrompt; IFEvalError naming `where` (file and row) and the field."""
    if not isinstance(record, dict):
        raise IFEvalError(f"{where}: not an object with IFEval's fields ({', '.join(FIELDS)})")
    missing = [name for name in FIELDS if name not in record]
    if missing:
        raise IFEvalError(f"{where}: no field {missing[0]!r} (an IFEval prompt has {', '.join(FIELDS)})")
    prompt, ids, kwargs = record["prompt"], record["instruction_id_list"], record["kwargs"]
    if not isinstance(prompt, str) or not prompt.strip():
        raise IFEvalError(f"{where}: field 'prompt' must be non-empty text")
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
        raise IFEvalError(f"{where}: field 'instruction_id_list' must be a non-empty list of constraint types")
    if not isinstance(kwargs, list) or len(kwargs) != len(ids) or not all(isinstance(k, dict) for k in kwargs):
        raise IFEvalError(f"{where}: field 'kwargs' must be a list of {len(ids)} objects, one per constraint type")
    known = registry()
    for type_id in ids:
        if type_id not in known:
            raise IFEvalError(f"{where}: unknown constraint type {type_id!r} in 'instruction_id_list' (IFEval's "
                              f"types: {', '.join(sorted(known))})")
        if type_id in NLTK_RESOURCES and not nltk_has(NLTK_RESOURCES[type_id]):
            raise IFEvalError(f"{where}: the {type_id} checker needs nltk's {NLTK_RESOURCES[type_id]} data: python "
                              f"-m nltk.downloader {NLTK_RESOURCES[type_id].split('/')[-1]}")
    clean = tuple({k: v for k, v in args.items() if v is not None} for args in kwargs)
    for type_id, args in zip(ids, clean):
        check_arguments(type_id, args, where)
    extra = {k: v for k, v in record.items() if k not in (*FIELDS, "key")}
    return IFEvalPrompt(prompt, tuple(ids), clean, record.get("key"), extra)


def check_arguments(type_id: str, args: dict[str, Any], where: str) -> None:
    """An IFEvalError naming `where` when `args` (a row's kwargs for `type_id`, nulls dropped as in the Hub's copy of
    IFEval, whose rows carry every argument name) are not the checker's: a name it does not take, one it takes but
    is not given or given a value it replaces (a negative count, an empty keyword list, a two-letter "letter": the
    checker would draw a new value at every verdict, passing and failing the same answer), or a value it cannot
    use."""
    checker = registry()[type_id](type_id)
    expected = set(checker.get_instruction_args_keys() or ())
    names = f"its arguments: {', '.join(sorted(expected)) or 'none'}"
    if unknown := sorted(set(args) - expected):
        raise IFEvalError(f"{where}: field 'kwargs' gives {type_id} an argument {unknown[0]!r} it does not take "
                          f"({names})")
    if missing := sorted(expected - set(args)):
        raise IFEvalError(f"{where}: field 'kwargs' gives {type_id} no {missing[0]!r} ({names}); without it the "
                          "checker draws a new one at every verdict")
    for name in WORD_LIST_ARGUMENTS:
        if name in args and not (isinstance(args[name], list) and all(isinstance(w, str) for w in args[name])):
            raise IFEvalError(f"{where}: field 'kwargs' gives {type_id} a {name!r} that is not a list of words "
                              f"({args[name]!r})")
    try:
        with caller_random_kept():
            replaced = redrawn(checker, args)
            checker.check_following("An answer.")
    except Exception as error:
        resource = re.search(r"Resource \W*(\w+)\W* not found", str(error))
        if isinstance(error, LookupError) and resource:  # nltk's data, its message framed in asterisks
            raise IFEvalError(f"{where}: the {type_id} checker needs nltk data it cannot find: python -m "
                              f"nltk.downloader {resource.group(1)}") from None
        # the checker's own message says which value it could not use
        raise IFEvalError(f"{where}: field 'kwargs' of {type_id} does not fit its checker ({type(error).__name__}: "
                          f"{first_line(error)})") from None
    if replaced is not None:
        raise IFEvalError(f"{where}: field 'kwargs' gives {type_id} a {replaced!r} it cannot use "
                          f"({args.get(replaced)!r}); the checker draws a new one at every verdict")


def redrawn(checker: Any, args: dict[str, Any]) -> str | None:
    """The name of an argument of `args` that the checker replaces with a value it draws from Python's global
    `random` (a negative count, an empty keyword list, ...), or None when it keeps them all (it then draws nothing,
    and is left built with `args`). Changes the global `random` state."""
    state = random.getstate()
    checker.build_description(**args)
    if random.getstate() == state:
        return None
    builds = []
    for seed in range(4):  # the replaced value is the one that changes with the draws (others are only normalized)
        random.seed(seed)
        checker.build_description(**args)
        builds.append(checker.get_instruction_args() or {})
    varying = (name for name in args if any(b.get(name) != builds[0].get(name) for b in builds))
    changed = (name for name in args if not _normalized_alike(builds[0].get(name), args[name]))  # a draw of one value
    return next(varying, None) or next(changed, None) or next(iter(args), "?")


def _normalized_alike(built: Any, given: Any) -> bool:
    """Whether a checker's value is the given one as it normalizes it (case and spaces, a keyword list's order)."""
    if isinstance(built, str) and isinstance(given, str):
        return built.strip().lower() == given.strip().lower()
    if isinstance(built, list) and isinstance(given, list):
        return sorted(set(map(str, built))) == sorted(set(map(str, given)))
    return built == given


@cache
def nltk_has(resource: str) -> bool:
    """Whether nltk finds `resource` (a checker's tokenizer data) on this machine."""
    import nltk  # installed with if-verifiable, imported only for the two checkers that need its data

    try:
        nltk.data.find(resource)
    except LookupError:
        return False
    return True


def loose_variants(response: str) -> list[str]:
    """The response and IFEval's loose variants of it: first, last, or both lines dropped, each also without '*'."""
    lines = response.split("\n")
    cut = ["\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(), "\n".join(lines[1:-1]).strip()]
    return [response, response.replace("*", ""), *cut, *(text.replace("*", "") for text in cut)]


def verdicts(prompt: IFEvalPrompt, response: str) -> tuple[list[bool], list[bool]]:
    """(strict, loose) verdict of each constraint of `prompt` on `response`, in instruction_id_list order."""
    variants = loose_variants(response)
    strict, loose = [], []
    for type_id, args in zip(prompt.instruction_id_list, prompt.kwargs):
        checker = registry()[type_id](type_id)
        with caller_random_kept():  # some descriptions draw a wording even when every argument is given
            checker.build_description(**args)
            if "prompt" in (checker.get_instruction_args() or {}):
                checker.build_description(prompt=prompt.prompt)
        strict.append(bool(response.strip()) and bool(checker.check_following(response)))
        loose.append(any(text.strip() and checker.check_following(text) for text in variants))
    return strict, loose


@contextmanager
def caller_random_kept() -> Iterator[None]:
    """Python's global `random` state as it was before the block, whatever the checkers draw inside it."""
    state = random.getstate()
    try:
        yield
    finally:
        random.setstate(state)


ASKS_FOR_REPETITION = ("combination:repeat_prompt",)  # types whose answer must repeat the prompt


ECHO_RUN = 6  # consecutive words of a constraint's description that make an answer a copy of it


def _normalized(text: str) -> str:
    return " ".join(text.lower().split()).rstrip(".")


def _words(text: str) -> list[str]:
    """Lower-cased words, punctuation and markdown dropped: `**Wrap** your response,` -> wrap your response."""
    return re.findall(r"[^\W_]+", text.lower())


def _runs(words: Sequence[str]) -> set[tuple[str, ...]]:
    return {tuple(words[i:i + ECHO_RUN]) for i in range(len(words) - ECHO_RUN + 1)}


def _stated_constraints(prompt: IFEvalPrompt) -> Iterator[tuple[str, dict[str, Any]]]:
    """(description, arguments) of each of the prompt's constraints whose description the prompt states word for word
    (case and spacing ignored): what the builder appends."""
    for type_id, args in zip(prompt.instruction_id_list, prompt.kwargs):
        with caller_random_kept():  # a checker samples any argument it is not given
            description = registry()[type_id](type_id).build_description(**args)
        if _normalized(description) and _normalized(description) in _normalized(prompt.prompt):
            yield description, args


def constraint_descriptions(prompt: IFEvalPrompt) -> list[str]:
    """The checkers' own descriptions of the prompt's constraints (build_description with the prompt's arguments),
    those that the prompt states word for word (case and spacing ignored): what the builder appends."""
    return [description for description, _ in _stated_constraints(prompt)]


def _echo_runs(description: str, args: dict[str, Any]) -> set[tuple[str, ...]]:
    """The runs of ECHO_RUN words of a description that mark a copy: all of them, less those inside an argument the
    answer may have to write (an end phrase, a keyword, a first word)."""
    runs = _runs(_words(description))
    for value in args.values():
        for text in ([value] if isinstance(value, str) else value if isinstance(value, (list, tuple)) else []):
            if isinstance(text, str):
                runs -= _runs(_words(text))
    return runs


def echoed_constraint(prompt: IFEvalPrompt, response: str) -> str | None:
    """The description of one of the prompt's constraints that the response copies, or None; also None when a
    constraint asks the answer to repeat the prompt. A copy is any ECHO_RUN consecutive words of the description,
    case, punctuation and markdown ignored: the whole description, one of its sentences, a copy with a comma dropped
    or a word in bold. Copying the constraint passes some checkers without answering: the keywords are in it, quoted
    it is a "response wrapped in quotation marks", without its comma it has none. Of the 109,618 checks of both
    answers of each of alpacaeval-phi2-prefs' 2,383 pairs against a description of each type built for their
    instruction, none finds a copy (at 5 words, 3 would: "At the end of your trip" is 5 words of the postscript's)."""
    if any(type_id in ASKS_FOR_REPETITION for type_id in prompt.instruction_id_list):
        return None
    answer = _runs(_words(response))
    return next((d for d, args in _stated_constraints(prompt) if answer & _echo_runs(d, args)), None)


# ---------------------------------------------------------------------------------------------------
# building constrained prompts from plain instructions


def split_instructions(instructions: Sequence[str], eval_count: int, seed: int) -> tuple[list[str], list[str]]:
    """Distinct instructions shuffled with `seed` and cut into (train, eval): no instruction is in both."""
    distinct = list(dict.fromkeys(text.strip() for text in instructions if text.strip()))
    if len(distinct) < 2:
        raise IFEvalError(f"{len(distinct)} distinct single-turn instructions: the builder needs at least 2 (records "
                          "with a 'prompt', or preference pairs, of a format train.py reads)")
    if not 0 < eval_count < len(distinct):
        raise IFEvalError(f"--eval-instructions must be between 1 and {len(distinct) - 1} (there are {len(distinct)} "
                          f"distinct instructions), got {eval_count}")
    order = list(range(len(distinct)))
    random.Random(seed).shuffle(order)
    return [distinct[i] for i in order[eval_count:]], [distinct[i] for i in order[:eval_count]]


def constrained_prompts(instructions: Sequence[str], types: Sequence[str], seed: int,
                        per_instruction: int = 1) -> list[IFEvalPrompt]:
    """`per_instruction` prompts for each instruction, each with one constraint type (the types dealt in turn over a
    seeded order, so they are balanced) whose arguments and description the checker itself samples."""
    known = registry()
    unknown = [t for t in types if t not in known]
    if unknown:
        raise IFEvalError(f"unknown constraint type {unknown[0]!r} (IFEval's types: {', '.join(sorted(known))})")
    for type_id in types:  # its prompts would be refused when they are read (parse_prompt): refused before writing
        if type_id in NLTK_RESOURCES and not nltk_has(NLTK_RESOURCES[type_id]):
            raise IFEvalError(f"--types {type_id}: its checker needs nltk's {NLTK_RESOURCES[type_id]} data: python "
                              f"-m nltk.downloader {NLTK_RESOURCES[type_id].split('/')[-1]}")
    rng = random.Random(seed)
    prompts: list[IFEvalPrompt] = []
    deal = list(types)
    for text in instructions:
        for _ in range(per_instruction):
            if len(prompts) % len(deal) == 0:
                rng.shuffle(deal)
            type_id = deal[len(prompts) % len(deal)]
            description, args = sampled_constraint(type_id, rng.randrange(2 ** 32), text)
            separator = "\n\n" if "\n" in text else " "  # after a multi-line instruction, a paragraph of its own
            prompts.append(IFEvalPrompt(f"{text}{separator}{description}", (type_id,), (args,), key=len(prompts),
                                        extra={"source_instruction": text}))
    return prompts


def sampled_constraint(type_id: str, seed: int, instruction: str = "") -> tuple[str, dict[str, Any]]:
    """A checker's own description of its constraint with arguments it samples (from Python's global `random`,
    seeded here and restored after); a constraint to repeat the request repeats `instruction`."""
    with caller_random_kept():
        random.seed(seed)
        checker = registry()[type_id](type_id)
        if type_id in ASKS_FOR_REPETITION:
            if not instruction.strip():
                raise IFEvalError(f"{type_id} needs the instruction it repeats")
            return checker.build_description(prompt_to_repeat=instruction), {"prompt_to_repeat": instruction}
        while True:
            description = checker.build_description()
            args = {k: v for k, v in (checker.get_instruction_args() or {}).items() if v is not None}
            if redrawn(registry()[type_id](type_id), args) is None:  # a verdict keeps them (not so IFEval's own
                return description, args                            # draw of paragraph n + 1 of n)


def write_files(files: dict[Path, list[dict[str, Any]]], flag: str = "--out-dir") -> None:
    """Write each list of records as JSON Lines at its path, the files together: every one is written beside itself
    first and only then renamed into place, so an interruption or a full disk never leaves one build's train.jsonl
    beside another's eval.jsonl. A failure is an IFEvalError naming `flag`."""
    staged: list[tuple[Path, Path]] = []
    try:
        for path, records in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            staged.append((Path(tmp), path))
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
            # mkstemp makes the file private: an existing file keeps its mode, a new one is an ordinary data file
            os.chmod(tmp, stat.S_IMODE(path.stat().st_mode) if path.is_file() else 0o644)
        for tmp, path in staged:
            tmp.replace(path)
    except OSError as error:
        raise IFEvalError(f"{flag} {next(iter(files)).parent}: cannot be written ({error.strerror or error})") from None
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)


def check_out_dir(path: Path) -> None:
    """An IFEvalError when --out-dir cannot become a directory that can be written, before any work: it is a file,
    or the nearest existing directory on its way refuses a new entry (tried with a file removed at once). Nothing
    is created: a command that then fails leaves no empty directory."""
    if path.exists() and not path.is_dir():
        raise IFEvalError(f"--out-dir {path}: is not a directory")
    existing = path.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise IFEvalError(f"--out-dir {path}: its parent {existing} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".probe.", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        raise IFEvalError(f"--out-dir {path}: cannot be written ({error.strerror or error})") from None


def held_out_pair(record: Any, row: int, held_out: set[str]) -> bool:
    """Whether a record is a preference pair (of any format train.py reads) of one of the held-out instructions, its
    instruction read as online DPO reads it (the text of its one user turn)."""
    instruction, pair = record_instruction(record, row)
    return pair and instruction is not None and instruction.strip() in held_out


def instructions_split(source: str, split: str | None) -> str | None:
    """The split of --instructions to read: --split, or a source's only split; None for a single file."""
    splits = available_splits(source)
    if splits is None:
        if split is not None:
            raise IFEvalError(f"{source}: a single file has no splits; leave out --split {split}")
        return None
    if split is None and len(splits) == 1:
        return splits[0]
    if split not in splits:
        raise IFEvalError(f"{source}: " + (f"no split {split!r} (available: " if split is not None else "has splits (")
                          + f"{', '.join(splits)}); choose one with --split")
    return split


def build_parser() -> argparse.ArgumentParser:
    """The command line of python -m dpo.ifeval."""
    parser = ArgumentParser(prog="python -m dpo.ifeval",
                                     description=" ".join(__doc__.split("\n\n")[0].split()),  # its first paragraph
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--instructions", required=True, help="a file of instructions (any preference or prompt "
                                                                "format train.py reads)")
    parser.add_argument("--split", help="the split of --instructions to read, where it has more than one (a dataset "
                                        "directory or hub name, e.g. ultrafeedback_binarized's train_prefs)")
    parser.add_argument("--out-dir", required=True, help="writes train.jsonl and eval.jsonl here")
    parser.add_argument("--types", default=",".join(DEFAULT_TYPES), help="comma list of IFEval constraint types")
    parser.add_argument("--eval-instructions", type=int, default=200, help="instructions held out for eval.jsonl")
    parser.add_argument("--per-instruction", type=int, default=1, help="training prompts per training instruction, "
                                                                       "each with its own constraint")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Build train.jsonl and eval.jsonl of constrained prompts from a file of instructions."""
    args = build_parser().parse_args(argv)
    if args.per_instruction < 1:
        raise IFEvalError(f"--per-instruction must be at least 1, got {args.per_instruction}")
    types = [t.strip() for t in args.types.split(",") if t.strip()]
    if not types:
        raise IFEvalError(f"--types {args.types!r} names no constraint type")
    out = Path(args.out_dir)
    check_out_dir(out)
    records, description = load_records(args.instructions, instructions_split(args.instructions, args.split))
    found, left_out = instruction_records(records)
    instructions = list(found)
    train, evaluation = split_instructions(instructions, args.eval_instructions, args.seed)
    train_prompts = constrained_prompts(train, types, args.seed, args.per_instruction)
    eval_prompts = constrained_prompts(evaluation, types, args.seed + 1)
    held_out = set(evaluation)
    pairs = [record for row, record in enumerate(records) if held_out_pair(record, row, held_out)]
    files = {out / "train.jsonl": [p.to_row() for p in train_prompts],
             out / "eval.jsonl": [p.to_row() for p in eval_prompts]}
    pairs_path = out / "heldout_pairs.jsonl"
    if pairs:  # the source's own pairs of the held-out instructions: what the trained model must still write
        files[pairs_path] = pairs
    write_files(files)
    print(f"{description}: {len(instructions)} distinct single-turn instructions ({left_out} records left out), "
          f"{len(types)} constraint types\n{out / 'train.jsonl'}: {len(train_prompts)} prompts from {len(train)} "
          f"instructions\n{out / 'eval.jsonl'}: {len(eval_prompts)} prompts from {len(evaluation)} held-out "
          "instructions")
    if pairs:
        print(f"{pairs_path}: the source's {len(pairs)} pairs of the held-out instructions")
    elif pairs_path.exists():  # an earlier build's, of other instructions
        pairs_path.unlink()
        print(f"{pairs_path}: removed (an earlier build's; {description} has no pairs of the held-out instructions)")
    return 0


def cli(argv: list[str] | None = None) -> int:
    """`main` with user errors as one line and exit status 2."""
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
