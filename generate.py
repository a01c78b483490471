"""Sample from a causal LM with the phi-2-dpo recipe's prompt template and decoding.

    python generate.py --model runs/demo/final "What is 3 plus 4?"       # one instruction
    python generate.py --model runs/demo/final                            # interactive, streamed
    python generate.py --model runs/demo/final --instructions eval.json --output outputs.json
    python generate.py --model runs/demo/final --compare demo "What is 3 plus 4?"   # side by side

--model is a model directory, a hub name, "demo" (the shipped SFT model) or a training run's directory
(its final/ is used); without it, the demo run's runs/demo/final. The instruction is rendered and encoded
exactly as training renders a one-turn prompt (dpo.prompts): "### Human: {instruction}\\n\\n### Assistant:",
or with the tokenizer's chat template when the run trained with it (or --chat-template), and decoded by
sampling with temperature 0.7 and top-p 0.9 (or --greedy), seeded. A response ends at EOS or where the model
starts a new "### Human:" turn; that marker is never printed or saved.

A prompt longer than its budget is cut as training cuts it and counted in a warning on stderr, never failing
the batch: the budget is the run's max_prompt_length and truncation_mode (final/dpo_run.json; or
--max-prompt-length / --truncation-mode), capped so a new token fits the model's positions; without them, half
the positions or what --max-new-tokens leaves, whichever is more, keeping the prompt's end.

--instructions reads a JSON array or JSON Lines of objects with an "instruction" field (AlpacaEval's
format) and --output writes a JSON list of {"instruction", "output", "generator"} that alpaca_eval
accepts, generated in left-padded batches. Without an instruction and with stdin not a terminal, each
non-empty line of stdin is an instruction.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from dpo.cli import exit_quietly_on_interrupt  # light: it comes before the heavy imports below

if __name__ == "__main__":
    exit_quietly_on_interrupt()  # Ctrl-C in their seconds: `interrupted`, not a traceback

import torch
import transformers

from dpo.cli import ArgumentParser, DefaultsHelpFormatter, run_cli
from dpo.precision import PRECISIONS
from dpo.generation import (MAX_NEW_TOKENS, TEMPERATURE, TOP_P, BatchFileError, DecodingSettings, GenerationError,
                            InstructionError, StopAwareStreamer, add_prompt_arguments, check_instruction,
                            check_output_file, generate_batch, generator_name, load_checked_tokenizer,
                            read_instructions, resolve_device, resolve_dtype, resolve_run_model, run_settings,
                            side_by_side, write_outputs)
from dpo.modeling import load_causal_lm
from dpo.prompts import HUMAN_TURN_PREFIX, PromptError, render_prompt

DEMO_RUN_MODEL = Path("runs") / "demo" / "final"


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="generate.py", description=__doc__.splitlines()[0],
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("instruction", nargs="?", help="one instruction (omit for interactive mode)")
    parser.add_argument("--model", help=f"model directory, hub name, 'demo' or a run directory "
                                        f"(default: {DEMO_RUN_MODEL} when it exists)")
    parser.add_argument("--compare", metavar="OTHER_MODEL", help="also answer with this model, side by side")
    parser.add_argument("--instructions", metavar="FILE", help="JSON / JSONL batch file with 'instruction' fields")
    parser.add_argument("--output", metavar="FILE.json", help="where --instructions outputs are written")
    parser.add_argument("--generator", help="the 'generator' name in --output (default: the model's name)")
    parser.add_argument("--temperature", type=float, default=TEMPERATURE)
    parser.add_argument("--top-p", type=float, default=TOP_P)
    parser.add_argument("--top-k", type=int, default=0, help="0 turns top-k filtering off")
    parser.add_argument("--greedy", action="store_true", help="argmax decoding instead of sampling")
    parser.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS)
    parser.add_argument("--seed", type=int, default=0)
    add_prompt_arguments(parser)
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="model weights; auto = bf16 on CUDA GPUs that support it, else fp16; fp32 on CPU")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per generate call")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar for --instructions")
    return parser


def default_model() -> str:
    if (DEMO_RUN_MODEL / "config.json").is_file():
        return str(DEMO_RUN_MODEL)
    raise GenerationError(f"--model is required (no trained demo model at {DEMO_RUN_MODEL}; "
                          "run `python train.py` first or pass --model demo)")


class Generator:
    """A loaded model, its tokenizer, its display name and its run's training settings (prompt defaults)."""

    def __init__(self, name: str, dtype: torch.dtype, device: torch.device):
        self.path = resolve_run_model(name)
        self.name = generator_name(self.path)
        self.settings = run_settings(self.path)
        self.tokenizer = load_checked_tokenizer(self.path)  # first: a directory without a tokenizer fails fast
        self.model = load_causal_lm(self.path, dtype=dtype, device=device)

    def answer(self, instructions: list[str], decoding: DecodingSettings, **kwargs) -> list[str]:
        return generate_batch(self.model, self.tokenizer, instructions, decoding.for_run(self.settings).for_tokenizer(self.tokenizer), **kwargs)

    def refusal(self, instruction: str, decoding: DecodingSettings) -> str | None:
        """Why `answer` would refuse `instruction` (an empty or unreadable one, one the template cannot render), or
        None."""
        try:
            check_instruction(instruction)
            render_prompt(instruction, decoding.for_run(self.settings).for_tokenizer(self.tokenizer).template,
                          self.tokenizer)
        except (GenerationError, PromptError) as error:
            return str(error)
        return None

    def stream(self, instruction: str, decoding: DecodingSettings, write: Callable[[str], object]) -> str:
        streamer = StopAwareStreamer(self.tokenizer, decoding.stop_strings, write=write)
        generate_batch(self.model, self.tokenizer, [instruction], decoding.for_run(self.settings).for_tokenizer(self.tokenizer),
                       streamer=streamer)
        return streamer.text


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def check_args(args: argparse.Namespace) -> DecodingSettings:
    """Every setting is checked before a model is loaded."""
    decoding = DecodingSettings.from_args(args)
    if args.batch_size < 1:
        raise GenerationError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.instruction is not None:
        check_instruction(args.instruction)
        if args.instructions:
            raise GenerationError("give either an instruction or --instructions FILE, not both")
    if args.output and not args.instructions:
        raise GenerationError("--output needs --instructions FILE")
    if args.instructions and not args.output and not args.compare:
        raise GenerationError("--instructions needs --output FILE.json (or --compare to print side by side)")
    if args.output and args.compare:
        raise GenerationError("--compare prints answers side by side; run each model with --output separately")
    if args.output:
        check_output_file(args.output)  # a path that cannot be written fails now, not after every answer
    return decoding


@contextlib.contextmanager
def rows_of(path: str) -> Iterator[None]:
    """An instruction of the batch file `path` that cannot be rendered, named as every other bad row of it is."""
    try:
        yield
    except InstructionError as error:
        raise BatchFileError(f"{path}, row {error.index}: {error.detail}") from None


def run_batch(generator: Generator, rows: list[dict], args: argparse.Namespace, decoding: DecodingSettings) -> None:
    with rows_of(args.instructions):
        outputs = generator.answer([row["instruction"] for row in rows], decoding, batch_size=args.batch_size,
                                   progress=not args.no_progress, description=generator.name)
    write_outputs(args.output, rows, outputs, args.generator or generator.name)
    # on stderr: --output /dev/stdout writes the outputs to stdout, which a JSON reader downstream reads whole
    print(f"{len(outputs)} outputs of {generator.name} written to {args.output}", file=sys.stderr)


def print_compared(instructions: list[str], first: Generator, second: Generator, decoding: DecodingSettings,
                   batch_size: int) -> None:
    answers_a = first.answer(instructions, decoding, batch_size=batch_size)
    answers_b = second.answer(instructions, decoding, batch_size=batch_size)
    for instruction, a, b in zip(instructions, answers_a, answers_b):
        print(f"{HUMAN_TURN_PREFIX} {instruction}\n")
        print(side_by_side(first.name, a, second.name, b) + "\n")


def interactive(generator: Generator, other: Generator | None, decoding: DecodingSettings, batch_size: int,
                read: Callable[[str], str] = input, write: Callable[[str], object] = _write) -> None:
    """Read instructions until EOF or 'exit'; stream each answer (or print both with --compare)."""
    write(f"{generator.name}: {decoding.for_run(generator.settings).for_tokenizer(generator.tokenizer).describe()}. "
          "Empty line skips, Ctrl-D or 'exit' quits.\n")
    while True:
        try:
            instruction = read(f"{HUMAN_TURN_PREFIX} ")
        except (EOFError, KeyboardInterrupt):
            write("\n")
            return
        if instruction.strip() in ("exit", "quit"):
            return
        if not instruction.strip():
            continue
        if why := generator.refusal(instruction, decoding) or (other and other.refusal(instruction, decoding)):
            write(f"error: {why}\n")  # this line only: the session goes on
            continue
        if other is None:
            write("### Assistant: ")
            generator.stream(instruction, decoding, write)
        else:
            a = generator.answer([instruction], decoding, batch_size=batch_size)[0]
            b = other.answer([instruction], decoding, batch_size=batch_size)[0]
            write(side_by_side(generator.name, a, other.name, b) + "\n")


def escape_undecodable_stdin() -> None:
    """Read stdin's bytes that are not text in its encoding as lone surrogates (surrogateescape, Python's own choice
    under a UTF-8 locale), also where its errors are strict (PYTHONIOENCODING=utf-8:strict): the instruction check
    then names them in one line, where decoding would end in a UnicodeDecodeError traceback."""
    if callable(getattr(sys.stdin, "reconfigure", None)):
        sys.stdin.reconfigure(errors="surrogateescape")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    decoding = check_args(args)
    rows = read_instructions(args.instructions) if args.instructions else None  # fails before any loading
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.precision, device)
    generator = Generator(args.model or default_model(), dtype, device)
    other = Generator(args.compare, dtype, device) if args.compare else None

    if rows is not None and other is None:
        run_batch(generator, rows, args, decoding)
    elif rows is not None:
        with rows_of(args.instructions):
            print_compared([row["instruction"] for row in rows], generator, other, decoding, args.batch_size)
    elif args.instruction is not None and other is None:
        print(generator.answer([args.instruction], decoding)[0])
    elif args.instruction is not None:
        print_compared([args.instruction], generator, other, decoding, args.batch_size)
    elif sys.stdin.isatty():
        escape_undecodable_stdin()
        interactive(generator, other, decoding, args.batch_size)
    else:
        escape_undecodable_stdin()
        lines = [line.strip() for line in sys.stdin if line.strip()]
        if not lines:
            raise GenerationError("no instruction given (as an argument, on stdin, or with --instructions)")
        if other is None:
            for answer in generator.answer(lines, decoding, batch_size=args.batch_size):
                print(answer)
        else:
            print_compared(lines, generator, other, decoding, args.batch_size)
    return 0


def cli(argv: list[str] | None = None) -> int:
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
