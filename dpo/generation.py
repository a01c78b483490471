"""Decoding with the recipe's settings, shared by generate.py and dpo.evaluate.

    DecodingSettings     how prompts are rendered and cut, and how responses are decoded
    run_settings       a trained model's training settings (final/dpo_run.json): its template and prompt limits
    prompt_budget      the most prompt tokens a model is given
    left_pad           id lists -> input_ids, attention_mask (the mask comes from lengths: pad may equal EOS/BOS)
    generate_batch     model + instructions -> one response text each (or k samples each), in left-padded batches
    decode             the decoding loop: generate's tokens, finished rows leaving the batch
    shared_prompt_cache  a batch's prompts computed once, their KV cache repeated for k samples of each
    preallocated_cache   a KV cache that writes each new token in place (DynamicCache copies itself at every token)
    truncate_at_stop   the text before the first stop string ("### Human:" by default)
    StopOnStrings      a StoppingCriteria: a row is finished once its generated text holds a stop string
    StopAwareStreamer  prints a response as it is generated, never printing a stop string
    read_instructions / write_outputs   batch files (AlpacaEval's format)
    check_output_file / write_output_text   an output path checked before any work, and written all at once

Decoding is the phi-2-dpo card's: sampling with temperature 0.7 and nucleus top-p 0.9 (transformers'
implicit top-k of 50 is switched off, top_k=0, so the distribution is exactly temperature + top-p), or
greedy. The temperature is applied first and the nucleus taken on the tempered distribution, as the card's
`generate(temperature=0.7, top_p=0.9)` does (sampling_processors). A response ends at EOS, or where the model
starts a new "### Human:" turn (the verbosity failure the Phi-2 card describes); the stop string and everything
after it are dropped, then surrounding whitespace (the response starts with the space after "### Assistant:").

Prompts are rendered, encoded and cut by dpo.prompts, the functions training uses (dpo.data), so a model sees
the prompt it was trained on: a trained run's template, max_prompt_length and truncation_mode (dpo_run.json)
are the defaults. A prompt longer than its budget (prompt_budget) is cut as training cuts it and counted in one
warning on stderr; it never fails the batch.
"""

from __future__ import annotations

import argparse
import errno
import inspect
import json
import math
import os
import re
import shutil
import sys
import tempfile
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformers import (DynamicCache, LogitsProcessor, LogitsProcessorList, StoppingCriteria,
                          TemperatureLogitsWarper, TopKLogitsWarper)
from transformers.cache_utils import DynamicLayer
from transformers.generation.streamers import BaseStreamer

from dpo.data import DataError, read_json
from dpo.errors import TrainingError, UserError, first_line
from dpo.files import write_text_atomically
from dpo.modeling import (ModelLoadError, embedding_rows, foreign_token, is_adapter_dir, load_tokenizer,
                          names_shipped_model)
from dpo.precision import AUTOCAST_DTYPES, PRECISIONS, autocast, resolve_precision
from dpo.prompts import (HUMAN_TURN_PREFIX, ROW_REASONS, TEMPLATES, TRUNCATION_MODES, PromptError, empty_user_turn,
                         encode_prompts, lone_surrogate, read_prompt, render_prompt, resolve_template)
from dpo.settings import seed_range

# The card's decoding.
TEMPERATURE = 0.7
TOP_P = 0.9
MIN_TEMPERATURE = 1e-5  # below it sampling is argmax in all but name, and logits / T can overflow to inf
MAX_NEW_TOKENS = 256
STOP_STRINGS = (HUMAN_TURN_PREFIX,)
_TRAILING_UNSETTLED = re.compile(r"[\s\ufffd]+$")  # whitespace and incomplete UTF-8 at the end
RUN_SETTINGS_FILE = "dpo_run.json"  # a trained model's training settings, written by train.py into final/


class GenerationError(UserError):
    """A decoding setting or an input that cannot work, in one line."""


class BatchFileError(GenerationError):
    """An unusable batch file; the message names the file and the row."""


class NonFiniteLogitsError(GenerationError, TrainingError):
    """The model's next-token logits hold NaN or +inf (or are all -inf): nothing can be drawn from them."""


class InstructionError(GenerationError):
    """An instruction of a batch that cannot be rendered: `index` (its place in the batch) and `detail` (why), for
    a caller that knows the file to name its row."""

    def __init__(self, index: int, detail: str, single: bool = False):
        super().__init__(detail if single else f"instruction {index}: {detail}")
        self.index, self.detail = index, detail


def chat_template_flag(template: str | None) -> bool | None:
    """DecodingSettings.chat_template of a training template: True for chat, False for recipe, None for auto (or no
    run settings): the tokenizer decides."""
    return {"chat": True, "recipe": False}.get(template)


@dataclass(frozen=True)
class DecodingSettings:
    """How prompts are rendered and cut, and how responses are decoded. greedy=True ignores temperature, top_p
    and top_k. The prompt settings left None are the trained run's (for_run), else the defaults noted."""

    temperature: float = TEMPERATURE
    top_p: float = TOP_P
    top_k: int = 0  # 0: no top-k filtering
    greedy: bool = False
    max_new_tokens: int = MAX_NEW_TOKENS
    seed: int | None = 0  # torch.manual_seed(seed) before the first batch; None leaves the RNG alone
    stop_strings: tuple[str, ...] = STOP_STRINGS
    chat_template: bool | None = None  # the tokenizer's chat template (True), the recipe's (False); None: the chat
    #                                    template when the tokenizer ships one (dpo.prompts.resolve_template)
    max_prompt_length: int | None = None  # None: room for new tokens (prompt_budget)
    truncation_mode: str | None = None  # None: keep_end

    @classmethod
    def from_args(cls, args) -> "DecodingSettings":
        """From parsed command-line flags (--temperature, --top-p, --top-k, --greedy, --max-new-tokens, --seed,
        --chat-template, --max-prompt-length, --truncation-mode), validated."""
        decoding = cls(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, greedy=args.greedy,
                       max_new_tokens=args.max_new_tokens, seed=args.seed,
                       chat_template=getattr(args, "chat_template", None),
                       max_prompt_length=getattr(args, "max_prompt_length", None),
                       truncation_mode=getattr(args, "truncation_mode", None))
        decoding.validate()
        return decoding

    def for_run(self, settings: dict[str, Any]) -> "DecodingSettings":
        """The prompt settings left None taken from a run's training settings (run_settings): the chat template
        when it trained with template 'chat', and its max_prompt_length and truncation_mode."""
        chat = self.chat_template if self.chat_template is not None else chat_template_flag(settings.get("template"))
        limit = self.max_prompt_length if self.max_prompt_length is not None else settings.get("max_prompt_length")
        mode = self.truncation_mode or settings.get("truncation_mode")
        return replace(self, chat_template=chat, max_prompt_length=limit, truncation_mode=mode)

    def for_tokenizer(self, tokenizer: Any) -> "DecodingSettings":
        """With the template decided: left to the model (None), the chat template when `tokenizer` ships one."""
        if self.chat_template is not None:
            return self
        return replace(self, chat_template=resolve_template("auto", tokenizer) == "chat")

    @property
    def template(self) -> str:
        """The prompt template: 'chat', 'recipe', or 'auto' (the tokenizer's chat template when it has one)."""
        return {True: "chat", False: "recipe", None: "auto"}[self.chat_template]

    def validate(self) -> None:
        """A GenerationError naming the first setting out of range."""
        if self.max_new_tokens < 1:
            raise GenerationError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if not self.greedy:
            if not MIN_TEMPERATURE <= self.temperature < math.inf:  # inf: every token alike, uniform noise
                raise GenerationError(f"--temperature must be at least {MIN_TEMPERATURE} and finite (use --greedy for "
                                      f"argmax), got {self.temperature}")
            if not 0 < self.top_p <= 1:
                raise GenerationError(f"--top-p must be in (0, 1], got {self.top_p}")
            if self.top_k < 0:
                raise GenerationError(f"--top-k must be >= 0 (0 turns it off), got {self.top_k}")
        if self.seed is not None and seed_range(self.seed):
            raise GenerationError(f"--seed {seed_range(self.seed)}, got {self.seed}")
        if any(not s for s in self.stop_strings):
            raise GenerationError("stop strings must be non-empty")
        if self.max_prompt_length is not None and self.max_prompt_length < 1:
            raise GenerationError(f"--max-prompt-length must be at least 1, got {self.max_prompt_length}")
        if self.truncation_mode is not None and self.truncation_mode not in TRUNCATION_MODES:
            raise GenerationError(f"--truncation-mode must be one of {', '.join(TRUNCATION_MODES)}, "
                                  f"got {self.truncation_mode!r}")

    def describe(self) -> str:
        """The decoding in one line, for reports (e.g. "temperature 0.7, top-p 0.9, seed 0, ...")."""
        template = ", chat template" if self.chat_template else ""
        if self.greedy:
            return f"greedy, max {self.max_new_tokens} new tokens{template}"
        top_k = f", top-k {self.top_k}" if self.top_k else ""
        return (f"temperature {self.temperature}, top-p {self.top_p}{top_k}, seed {self.seed}, "
                f"max {self.max_new_tokens} new tokens{template}")


def add_prompt_arguments(parser: Any) -> None:
    """--chat-template / --no-chat-template, --max-prompt-length and --truncation-mode, shared by generate.py and
    dpo.evaluate. Left out, they are absent from the parsed arguments: the run's settings apply (for_run)."""
    unset = argparse.SUPPRESS  # no "(default: None)" in --help; DecodingSettings.from_args reads absence as None
    parser.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=unset,
                        help="render prompts with the tokenizer's chat template (--no-chat-template: the recipe's "
                             f"'### Human:' template); default: as the run was trained ({RUN_SETTINGS_FILE}'s "
                             "template), else the chat template where the tokenizer ships one, else the recipe's")
    parser.add_argument("--max-prompt-length", type=int, default=unset, metavar="TOKENS",
                        help="prompt tokens kept; a longer prompt is cut as training cuts it, with a warning. "
                             f"Default: the run's max_prompt_length ({RUN_SETTINGS_FILE}), else half the model's "
                             "positions or what --max-new-tokens leaves, whichever is more; always capped so one "
                             "new token fits")
    parser.add_argument("--truncation-mode", default=unset, metavar="|".join(TRUNCATION_MODES),
                        help="which end of an over-long prompt is kept; default: the run's truncation_mode, "
                             "else keep_end")


def run_reference_model(settings: dict[str, Any]) -> str | None:
    """The model a run started from: where it was a local path, the path train.py recorded from anywhere
    (dpo_run.json's reference_model_path) while it is there, else dpo_run.json's reference_model as it was given (a
    hub name, the demo, a run of an earlier version)."""
    name, path = settings.get("reference_model"), settings.get("reference_model_path")
    return path if path and Path(path).exists() else name


def run_settings(model_path: str | Path) -> dict[str, Any]:
    """The training settings saved beside a trained model (final/dpo_run.json), or {} when there are none.
    The prompt settings generation reads from it (template, max_prompt_length, truncation_mode) are checked."""
    path = Path(model_path) / RUN_SETTINGS_FILE
    if not path.is_file():
        return {}
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        detail = f"{error.msg}, line {error.lineno}" if isinstance(error, json.JSONDecodeError) else "not UTF-8"
        raise GenerationError(f"{path}: not valid JSON ({detail})") from None
    if not isinstance(settings, dict):
        raise GenerationError(f"{path}: expected a JSON object of settings")
    template, limit, mode = (settings.get(k) for k in ("template", "max_prompt_length", "truncation_mode"))
    if template is not None and template not in TEMPLATES:
        raise GenerationError(f"{path}: template must be one of {', '.join(TEMPLATES)}, got {template!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise GenerationError(f"{path}: max_prompt_length must be a positive integer or null, got {limit!r}")
    if mode is not None and mode not in TRUNCATION_MODES:
        raise GenerationError(f"{path}: truncation_mode must be one of {', '.join(TRUNCATION_MODES)}, got {mode!r}")
    return settings


# ---------------------------------------------------------------------------------------------------
# Devices and precision


DEVICE_TYPES = ("cpu", "cuda")  # what --device takes (with auto); others (mps, meta, xpu) are not tested here


def resolve_device(name: str = "auto") -> torch.device:
    """--device as a torch device: 'auto' is CUDA where available, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in DEVICE_TYPES:
        raise GenerationError(f"--device must be cpu, cuda, cuda:N or auto, got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GenerationError(f"--device {name}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise GenerationError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """fp32 / bf16 / fp16 weights; auto as training resolves it (dpo.precision): bf16 on a GPU that has it, fp16 on
    an older GPU, fp32 elsewhere (half precision is slow on CPUs)."""
    if precision not in PRECISIONS:
        raise GenerationError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return AUTOCAST_DTYPES[resolve_precision(precision, device)] or torch.float32


# ---------------------------------------------------------------------------------------------------
# Prompts -> padded batches


def load_checked_tokenizer(name: str) -> Any:
    """load_tokenizer, plus a check that it encodes text: for a directory without tokenizer files,
    transformers may build an empty tokenizer from config.json alone, which encodes everything to []."""
    tokenizer = load_tokenizer(name)
    if not tokenizer("Hello world", add_special_tokens=False)["input_ids"]:
        raise ModelLoadError(f"model {name}: no usable tokenizer (it encodes text to no tokens; are the "
                             "tokenizer files missing from the directory?)")
    return tokenizer


def check_instruction(instruction: Any, where: str = "the instruction") -> str:
    """`instruction` itself when it is a non-empty string (a conversation in HH's text or the recipe template with
    no empty user turn, which training would skip), else a GenerationError naming `where`."""
    if not isinstance(instruction, str):
        raise GenerationError(f"{where} is a {type(instruction).__name__}, not a string")
    if not instruction.strip():
        raise GenerationError(f"{where} is empty")
    if (surrogate := lone_surrogate(instruction)) is not None:
        raise GenerationError(f"{where} is not Unicode text (a lone surrogate {surrogate})")
    messages = read_prompt(instruction)
    if isinstance(messages, list) and (why := empty_user_turn(messages)) is not None:
        raise GenerationError(f"{where} is a conversation that training would skip ({why})")
    return instruction


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """[B, T] input_ids with pad_id on the left, and attention_mask 1 on the last len(seq) positions.

    The mask is built from the lengths, never by comparing ids with pad_id: for Phi-2 pad == EOS == BOS.
    """
    width = max(len(seq) for seq in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            input_ids[row, width - len(seq):] = torch.tensor(list(seq), dtype=torch.long)
            attention_mask[row, width - len(seq):] = 1
    return input_ids, attention_mask


# ---------------------------------------------------------------------------------------------------
# Stop strings


def truncate_at_stop(text: str, stop_strings: Sequence[str] = STOP_STRINGS) -> str:
    """The text before the earliest complete stop string (all of it when there is none).

    Only complete stop strings cut: "### Hum" at the end of a response that ran out of tokens, or
    "### Humans" inside it, are kept, since they may be the response's own text.
    """
    cut = min((i for i in (text.find(s) for s in stop_strings) if i >= 0), default=len(text))
    return text[:cut]


def clean_response(text: str, stop_strings: Sequence[str] = STOP_STRINGS) -> str:
    """A decoded continuation (special tokens already removed) -> the response as printed and saved."""
    return truncate_at_stop(text, stop_strings).strip()


def model_eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """The tokenizer's EOS plus any the model's generation config lists (chat models often have several)."""
    ids = [tokenizer.eos_token_id]
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for eos in configured if isinstance(configured, (list, tuple)) else [configured]:
        if eos is not None and eos not in ids:
            ids.append(int(eos))
    return ids


def _cut_at_eos(ids: list[int], eos_ids: Sequence[int]) -> list[int]:
    for position, token in enumerate(ids):
        if token in eos_ids:
            return ids[:position]
    return ids


class StopOnStrings(StoppingCriteria):
    """A row is finished once the text generated after position `prompt_width` contains a stop string.

    Each step decodes only a window of the continuation's last tokens: a stop string that first appears at this
    step takes in the newest token, and its n characters are at most 4n bytes, so at most 4n tokens that decoding
    keeps (each adds a byte or more; special tokens add nothing, so the window takes 4n + MARGIN tokens that are
    not special, and every special token among them); the margin keeps a decoder's handling of a window's first
    token (a dropped leading space, half a character) away from it. The result equals decoding the whole
    continuation at every step, while the text decoded does not grow with the continuation's length.
    """

    MARGIN = 8

    def __init__(self, tokenizer: Any, stop_strings: Sequence[str], prompt_width: int):
        self.tokenizer = tokenizer
        self.stop_strings = tuple(stop_strings)
        self.prompt_width = prompt_width
        self.window = 4 * max((len(stop) for stop in self.stop_strings), default=0) + self.MARGIN
        self.special_ids = torch.tensor(sorted(set(getattr(tokenizer, "all_special_ids", None) or [])),
                                        dtype=torch.long)

    def __call__(self, input_ids: Tensor, scores: Any = None, **kwargs: Any) -> Tensor:
        continuation = input_ids[:, self.prompt_width:]
        if continuation.shape[1] == 0:
            return torch.zeros(len(input_ids), dtype=torch.bool, device=input_ids.device)
        # per row: the first position from which `window` tokens that decoding keeps are left (0: fewer are)
        if self.special_ids.device != continuation.device:
            self.special_ids = self.special_ids.to(continuation.device)  # once, not at every step
        kept = ~torch.isin(continuation, self.special_ids)
        left = kept.flip(1).cumsum(1).flip(1)  # kept tokens from each position to the end
        positions = torch.arange(continuation.shape[1], device=continuation.device)
        starts = torch.where(left >= self.window, positions, -1).amax(dim=1).clamp(min=0).tolist()
        texts = self.tokenizer.batch_decode([row[start:].tolist() for row, start in zip(continuation, starts)],
                                            skip_special_tokens=True)
        done = [any(stop in text for stop in self.stop_strings) for text in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class StopAwareStreamer(BaseStreamer):
    """Writes a response while it is generated (batch size 1), exactly as clean_response will return it.

    After each token the continuation is decoded; what is written is its cleaned form minus a held-back
    tail: trailing whitespace, an incomplete UTF-8 character and any suffix that could be the start of a
    stop string. end() writes the rest of clean_response(full text) and a newline. `text` is the result.
    """

    def __init__(self, tokenizer: Any, stop_strings: Sequence[str] = STOP_STRINGS,
                 write: Callable[[str], Any] | None = None, eos_ids: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.stop_strings = tuple(stop_strings)
        self.write = write or (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
        self.eos_ids = tuple(eos_ids) or (tokenizer.eos_token_id,)
        self.reset()

    def reset(self) -> None:
        """Forget the last response: ready for the next prompt."""
        self.tokens: list[int] = []
        self.written = ""
        self.text = ""
        self._prompt_pending = True
        self._finished = False

    def _safe_prefix(self, text: str) -> str:
        """The part of clean_response(text) that no later token can change."""
        truncated = truncate_at_stop(text, self.stop_strings)
        if len(truncated) < len(text):  # a complete stop string: the response is final
            return truncated.strip()
        cleaned = truncated.lstrip()
        hold = max((k for stop in self.stop_strings for k in range(1, len(stop))
                    if cleaned.endswith(stop[:k])), default=0)
        return _TRAILING_UNSETTLED.sub("", cleaned[:len(cleaned) - hold])

    def put(self, value: Tensor) -> None:
        """Take the next token (generate() passes the prompt first) and write what can no longer change."""
        if value.dim() > 1:
            if value.shape[0] > 1:
                raise GenerationError("streaming needs a batch of one prompt")
            value = value[0]
        if self._prompt_pending:  # generate() first passes the prompt
            self._prompt_pending = False
            return
        if self._finished:
            return
        new = value.tolist()
        kept = _cut_at_eos(new, self.eos_ids)
        self.tokens.extend(kept)
        self._finished = len(kept) < len(new)
        safe = self._safe_prefix(self.tokenizer.decode(self.tokens, skip_special_tokens=True))
        if safe.startswith(self.written) and len(safe) > len(self.written):
            self.write(safe[len(self.written):])
            self.written = safe

    def end(self) -> None:
        """Write the rest of the cleaned response and a newline; `text` holds the response (as generate_batch_ended
        gives it: a response cut at the token budget drops a partial last character)."""
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if not self._finished and truncate_at_stop(text, self.stop_strings) == text:
            text = without_partial_character(text)
        self.text = clean_response(text, self.stop_strings)
        if self.text.startswith(self.written):
            self.write(self.text[len(self.written):] + "\n")
        else:  # cannot happen for a prefix-stable decoder; never print a wrong continuation silently
            self.write("\n" + self.text + "\n")
        self.written = self.text
        self._prompt_pending = True


# ---------------------------------------------------------------------------------------------------
# Generation


def sampling_processors(decoding: DecodingSettings) -> LogitsProcessorList:
    """What turns a step's logits into the scores a token is drawn from: the temperature, then top-k (when set), then
    top-p on the tempered scores; none for greedy decoding. The order of transformers' generate(temperature=...,
    top_k=..., top_p=...): a temperature below 1 sharpens the distribution, so its nucleus holds fewer tokens."""
    if decoding.greedy:
        return LogitsProcessorList()
    processors: list[LogitsProcessor] = [TemperatureLogitsWarper(decoding.temperature)]
    if decoding.top_k > 0:
        processors.append(TopKLogitsWarper(decoding.top_k))
    processors.append(TopP(decoding.top_p))
    return LogitsProcessorList(processors)


COMPACT_FRACTION = 8  # finished rows leave the batch once they are an eighth of it: at most 1/8 of a step's compute
# is spent on them, and the copies of the cache that removing rows costs sum to at most 8 times one cache


@torch.no_grad()
def decode(model: Any, input_ids: Tensor, attention_mask: Tensor, cache: DynamicCache, max_new_tokens: int,
           processors: LogitsProcessorList, greedy: bool, eos_ids: Sequence[int], pad_id: int,
           stop: StopOnStrings | None = None, streamer: BaseStreamer | None = None,
           budgets: Tensor | None = None) -> Tensor:
    """The new tokens of a left-padded batch, [rows, max_new_tokens], pad after a row's end: what transformers'
    generate samples (the same draws from the same RNG), with finished rows taken out of the batch. Equal up to float
    rounding: a smaller batch (3 rows or fewer on CPU) runs other matmul kernels, whose logits differ by ~1e-6 from
    the full batch's, so two tokens that close can swap.

    `cache` holds the prompts' first cache.get_seq_length() positions (none, or all but the last: shared_prompt_cache).
    A row ends at an EOS (which it keeps), at a stop string (`stop`, on the row's new tokens) or after max_new_tokens
    (or `budgets[row]`, its own limit, where given).
    generate computes every row until the last one ends; here a finished row leaves the batch (its KV cache rows with
    it) once the finished rows are 1/COMPACT_FRACTION of the batch, which saves a third of the compute of a batch of
    answers that vary in length. Drawing a token is multinomial sampling as torch.multinomial draws it (an
    exponential race: argmax of p / q with q ~ Exp(1)), with q drawn for every row of the batch at every step, so the
    random numbers a row gets do not depend on which rows have finished.
    """
    n, width = input_ids.shape
    device = input_ids.device
    eos = torch.tensor(list(eos_ids), device=device)
    new_tokens = torch.full((n, max_new_tokens), pad_id, dtype=torch.long, device=device)
    rows = torch.arange(n, device=device)  # the batch row of each row still in the batch
    live = torch.ones(n, dtype=torch.bool, device=device)  # per row in the batch: not finished
    positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    cached = cache.get_seq_length()
    tokens, token_positions = input_ids[:, cached:], positions[:, cached:]
    next_position = positions[:, -1] + 1
    argument = cache_argument(model)
    broken = torch.zeros((), dtype=torch.bool, device=device)  # a live row's logits not a distribution (no sync)
    if streamer is not None:
        streamer.put(input_ids.cpu())
    for step in range(max_new_tokens):
        logits = model(input_ids=tokens, attention_mask=attention_mask, position_ids=token_positions, use_cache=True,
                       logits_to_keep=1, **{argument: cache}).logits[:, -1].float()
        broken |= (~logits.amax(-1).isfinite() & live).any()  # amax: NaN if any is, inf if any +inf or all -inf
        scores = processors(new_tokens[rows, :step], logits)
        if greedy:
            chosen = scores.argmax(dim=-1)
        else:
            race = torch.empty((n, scores.shape[-1]), device=device).exponential_(1)
            chosen = (scores.softmax(dim=-1) / race[rows]).argmax(dim=-1)
        chosen = chosen.masked_fill(~live, pad_id)
        new_tokens[rows, step] = chosen
        if streamer is not None:
            streamer.put(chosen.cpu())
        ended = torch.isin(chosen, eos)
        if stop is not None:
            ended |= stop(new_tokens[rows, :step + 1])
        if budgets is not None:
            ended |= budgets[rows] <= step + 1
        live &= ~ended
        if not live.any():
            break
        finished = int((~live).sum())
        if finished * COMPACT_FRACTION >= len(rows):
            keep = live.nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            rows, live, chosen = rows[keep], live[keep], chosen[keep]
            attention_mask, next_position = attention_mask[keep], next_position[keep]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(rows), 1))], dim=1)
        tokens, token_positions = chosen[:, None], next_position[:, None]
        next_position = next_position + 1
    if streamer is not None:
        streamer.end()
    if broken:  # argmax would read NaN scores as token 0, and the batch would be answers of "!!!" or empty ones
        raise NonFiniteLogitsError("the model's next-token logits are not finite (NaN or inf): its weights hold "
                                   "NaN/inf or its precision overflows (fp16: try --precision bf16 or fp32)")
    return new_tokens


class TopP(LogitsProcessor):
    """Nucleus sampling's filter (Holtzman et al. 2020), the same tokens as transformers' TopPLogitsWarper: a token
    is kept when the probability of the tokens above it is below p (so the top token always is). Where tokens of
    exactly equal probability straddle the boundary, which of them is kept follows each sort's order (transformers'
    ascending sort tends to keep the later ones; topk's order among ties is unspecified). It sorts only the `candidates` most likely tokens of
    a row, not the whole vocabulary: when they hold at least p of the mass, no token below them can be kept; a row
    where they do not is sorted whole."""

    def __init__(self, top_p: float, candidates: int = 1024):
        self.top_p, self.candidates = top_p, candidates

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """`scores` with every token outside each row's nucleus set to -inf."""
        if self.top_p >= 1.0:
            return scores
        k = min(self.candidates, scores.shape[-1])
        probs = scores.double().softmax(dim=-1)  # fp64: the running sums decide the boundary token
        top, index = probs.topk(k, dim=-1)  # descending
        if k < scores.shape[-1]:
            short = top.sum(dim=-1) < self.top_p
            if short.any():  # the nucleus reaches below the candidates: sort these rows whole
                full, full_index = probs[short].sort(dim=-1, descending=True)
                keep_full = (full.cumsum(dim=-1) - full) < self.top_p
                kept = torch.zeros_like(probs[short], dtype=torch.bool).scatter(-1, full_index, keep_full)
                mask = torch.zeros_like(probs, dtype=torch.bool)
                mask[short] = kept
                mask[~short] = torch.zeros_like(probs[~short], dtype=torch.bool).scatter(
                    -1, index[~short], (top[~short].cumsum(dim=-1) - top[~short]) < self.top_p)
                return scores.masked_fill(~mask, -float("inf"))
        keep = (top.cumsum(dim=-1) - top) < self.top_p
        mask = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, index, keep)
        return scores.masked_fill(~mask, -float("inf"))


def _max_positions(model: Any) -> int | None:
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def prompt_budget(positions: int | None, max_new_tokens: int, max_prompt_length: int | None = None) -> int | None:
    """The most prompt tokens a model with `positions` positions is given (None: no limit).

    max_prompt_length (the run's, or --max-prompt-length) capped so that one new token still fits; without it,
    room for max_new_tokens, but never less than half the positions.
    """
    if positions is None:
        return max_prompt_length
    if max_prompt_length is None:
        return max(positions // 2, positions - max_new_tokens, 1)
    return max(min(max_prompt_length, positions - 1), 1)


def model_prompt_budget(model: Any, decoding: DecodingSettings) -> int | None:
    """The most prompt tokens `model` is given under `decoding` (None: no limit): prompt_budget of its positions."""
    return prompt_budget(_max_positions(model), decoding.max_new_tokens, decoding.max_prompt_length)


def own_rng(model: Any) -> Any:
    """A context in which sampling with `model` draws from a copy of the RNG state (CPU, and the model's GPU), so
    that evaluating or sampling while training leaves the training's random numbers as they were."""
    device = getattr(model, "device", torch.device("cpu"))
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


class PreallocatedLayer(DynamicLayer):
    """A DynamicLayer whose keys and values are views into buffers with room for `capacity` positions, so that a new
    token's keys and values are written in place. DynamicLayer concatenates, which copies the whole cache at every
    token: sampling 64 answers to 200-token prompts of SmolLM2-135M on a CPU, that copy costs about as much as the
    forward. A DynamicLayer method that replaces the keys (repeat, select, crop) leaves plain tensors, which the next
    update moves into new buffers; a sequence longer than `capacity` doubles them."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self._buffers: tuple[Tensor, Tensor] | None = None
        self._view: Tensor | None = None  # the keys this layer last handed out (a view of _buffers[0])

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """Append the new positions' keys and values; the cache's keys and values so far (views)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length, new = self.get_seq_length(), key_states.shape[-2]
        if self._buffers is None or self.keys is not self._view or length + new > self._buffers[0].shape[-2]:
            size = max(self.capacity, length + new)
            if self._buffers is not None and self.keys is self._view:  # the same sequence, out of room
                size = max(size, 2 * self._buffers[0].shape[-2])
            buffers = tuple(states.new_empty((*states.shape[:2], size, states.shape[-1]))
                            for states in (key_states, value_states))
            if length:
                buffers[0][:, :, :length] = self.keys
                buffers[1][:, :, :length] = self.values
            self._buffers = buffers
        keys, values = self._buffers
        keys[:, :, length:length + new] = key_states
        values[:, :, length:length + new] = value_states
        self.keys, self.values = keys[:, :, :length + new], values[:, :, :length + new]
        self._view = self.keys
        return self.keys, self.values

    def batch_select_indices(self, indices: Tensor) -> None:
        """Keep only the batch rows `indices`, in new buffers of the same room (one copy; DynamicLayer's selection
        and the next update would make two)."""
        if self._buffers is None or self.keys is not self._view:
            super().batch_select_indices(indices)
            return
        length = self.get_seq_length()
        self._buffers = (self._buffers[0][indices], self._buffers[1][indices])
        self.keys, self.values = self._buffers[0][:, :, :length], self._buffers[1][:, :, :length]
        self._view = self.keys


def preallocated_cache(model: Any, capacity: int) -> DynamicCache:
    """An empty KV cache for `model` whose layers hold `capacity` positions without copying (PreallocatedLayer): a
    DynamicCache, as generate makes, whose full-attention layers are PreallocatedLayer (a model with other layers,
    sliding-window ones for example, keeps DynamicCache's)."""
    cache = DynamicCache(config=model.config)
    if cache.layers and all(type(layer) is DynamicLayer for layer in cache.layers):
        cache.layers = [PreallocatedLayer(capacity) for _ in cache.layers]
    return cache


@torch.no_grad()
def shared_prompt_cache(model: Any, input_ids: Tensor, attention_mask: Tensor, copies: int,
                        capacity: int = 0) -> DynamicCache | None:
    """The KV cache of a left-padded batch of prompts without their last token, computed once and repeated `copies`
    times along the batch (prompt-major), for `decode` on the prompts repeated the same way: it then runs only the
    last prompt token and the new ones, and samples what it samples from the repeated prompts. A prompt
    token costs about the compute of a sampled one, so k samples of a P-token prompt save (k - 1) P tokens of
    forward. The positions are generate's own for a left-padded mask (cumulative count of real tokens). None where
    there is nothing to share (prompts of one token). `capacity`: the positions the cache will hold (prompt and new
    tokens; preallocated_cache)."""
    if input_ids.shape[1] < 2:
        return None
    cache = preallocated_cache(model, capacity)
    positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    model(input_ids=input_ids[:, :-1], attention_mask=attention_mask[:, :-1], position_ids=positions[:, :-1],
          use_cache=True, logits_to_keep=1, **{cache_argument(model): cache})
    cache.batch_repeat_interleave(copies)
    return cache


def cache_argument(model: Any) -> str:
    """The name under which this model's forward and generate take a KV cache: `cache` since transformers renamed
    `past_key_values` (5.2x), `past_key_values` before."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft model forwards kwargs
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def generate_batch(model: Any, tokenizer: Any, instructions: Sequence[str], decoding: DecodingSettings | None = None,
                   **options: Any) -> list[str]:
    """One response per instruction (k with num_samples), as generate_samples, the texts alone."""
    return [s.text for s in generate_samples(model, tokenizer, instructions, decoding, **options)]


def generate_batch_ended(model: Any, tokenizer: Any, instructions: Sequence[str],
                         decoding: DecodingSettings | None = None, **options: Any) -> tuple[list[str], list[bool]]:
    """(responses, ended) of generate_samples."""
    samples = generate_samples(model, tokenizer, instructions, decoding, **options)
    return [s.text for s in samples], [s.ended for s in samples]


def without_partial_character(text: str) -> str:
    """A response cut at max_new_tokens may stop inside a character (byte-level BPE): the bytes of that character
    decode to U+FFFD, dropped from the text (its sampled ids keep them)."""
    return text.rstrip("\ufffd")


@dataclass(frozen=True)
class Sample:
    """One sampled response: `text` as printed, judged and saved (clean_response); `ended` at an EOS or a stop string
    rather than cut at max_new_tokens; `ids`, the tokens the model sampled for it, before its end (an EOS; a stop
    string and the white space before it, unless a token holds both), or None where no run of them is the text (a
    special token among them; a token holding both the text and the stop string)."""

    text: str
    ended: bool
    ids: list[int] | None


def sampled_response_ids(tokenizer: Any, answer: list[int], stop_strings: Sequence[str]) -> list[int] | None:
    """Sample.ids of `answer`, a row's new tokens before its first EOS (padding may follow a stop string)."""
    full = tokenizer.decode(answer, skip_special_tokens=True)
    before = truncate_at_stop(full, stop_strings)
    if len(before) < len(full):
        # where the model began a new turn its answer ends, before the white space before it, as an answer of the
        # data ends before its EOS: the fewest tokens whose text reaches that far (their length grows with the
        # tokens once a partial character's U+FFFD are dropped), with at most white space beyond it (".\n\n" is one
        # token of some tokenizers)
        text = before.rstrip()
        low, high = 0, len(answer)
        while low < high:
            middle = (low + high) // 2
            if len(without_partial_character(tokenizer.decode(answer[:middle], skip_special_tokens=True))) >= len(text):
                high = middle
            else:
                low = middle + 1
        answer = answer[:low]
        kept = tokenizer.decode(answer, skip_special_tokens=True)
        if not kept.startswith(text) or kept[len(text):].strip():
            return None
    special = set(tokenizer.all_special_ids)
    return None if any(token in special for token in answer) else answer


def generate_samples(model: Any, tokenizer: Any, instructions: Sequence[str],
                     decoding: DecodingSettings | None = None, *, batch_size: int = 8, num_samples: int = 1,
                     progress: bool = False, streamer: BaseStreamer | None = None, description: str = "generating",
                     warn: bool = True, precision: str = "fp32") -> list[Sample]:
    """One Sample per instruction, in the instructions' order; with `num_samples` k, k per instruction
    (instruction-major: k for the first, then k for the second, ...), each prompt's forward computed once
    (shared_prompt_cache) and `batch_size` counting prompts. The samples are those of the instructions repeated k
    times.

    Prompts are encoded by dpo.prompts.encode_prompts with decoding's template, cut to prompt_budget (as
    training cuts them; one warning line on stderr counts them), sorted by length (longest first) into batches
    of `batch_size`, left-padded, and decoded with `decoding`; the seed is set once, before the first batch, so
    a call is a pure function of its arguments. When a prompt plus max_new_tokens would exceed the model's
    max_position_embeddings, that prompt's new-token budget is lowered to fit (its own: the other prompts of its batch
    keep theirs; an answer stopped there is cut, not ended). `precision`: the autocast the
    model runs under (a training run samples its fp32 policy in the run's precision).
    """
    decoding = decoding or DecodingSettings()
    decoding.validate()
    if batch_size < 1:
        raise GenerationError(f"--batch-size must be at least 1, got {batch_size}")
    if num_samples < 1 or (num_samples > 1 and streamer is not None):
        raise GenerationError(f"num_samples must be at least 1 (and 1 when streaming), got {num_samples}")
    for i, text in enumerate(instructions):
        check_instruction(text, f"instruction {i}" if len(instructions) > 1 else "the instruction")
    if streamer is not None and len(instructions) != 1:
        raise GenerationError("streaming needs exactly one instruction")
    device = next(model.parameters()).device
    eos_ids = model_eos_ids(model, tokenizer)
    if isinstance(streamer, StopAwareStreamer):  # it shows what decoding keeps: the answer ends at the same ids
        streamer.eos_ids = tuple(eos_ids)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    limit = _max_positions(model)
    budget = model_prompt_budget(model, decoding)
    mode = decoding.truncation_mode or "keep_end"
    try:
        prompts, cut = encode_prompts(tokenizer, instructions, decoding.template, budget, mode)
    except PromptError as error:  # one conversation's: name it (found again only on this path)
        if error.reason not in ROW_REASONS:
            raise
        for i, text in enumerate(instructions):
            try:
                render_prompt(text, decoding.template, tokenizer)
            except PromptError as own:
                raise InstructionError(i, str(own), single=len(instructions) == 1) from None
        raise
    rows = embedding_rows(model)
    for i, ids in enumerate(prompts):
        if (why := foreign_token(tokenizer, ids + [pad_id], rows)) is not None:
            raise GenerationError(f"{'instruction ' + str(i) if len(prompts) > 1 else 'the instruction'}: {why}")
    if cut and warn:  # online DPO samples every step: it passes warn=False (training reports the cut prompts)
        print(f"warning: {cut} of {len(prompts)} prompts longer than {budget} tokens were cut ({mode}), "
              "as training cuts them", file=sys.stderr)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    was_training = model.training
    model.eval()
    if decoding.seed is not None:
        torch.manual_seed(decoding.seed)
    bar = None
    if progress:
        bar = tqdm(total=len(prompts), desc=description, unit="prompt", dynamic_ncols=True)
    samples: list[Sample | None] = [None] * (len(prompts) * num_samples)
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            input_ids, attention_mask = left_pad([prompts[i] for i in rows], pad_id)
            width = input_ids.shape[1]
            if limit is not None and width >= limit:
                raise GenerationError(f"a prompt of {width} tokens does not fit the model's {limit} positions")
            own = [min(decoding.max_new_tokens, limit - len(prompts[i])) if limit is not None
                   else decoding.max_new_tokens for i in rows for _ in range(num_samples)]
            max_new = max(own)
            budgets = torch.tensor(own, device=device) if min(own) < max_new else None
            input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
            with autocast(precision, device):
                cache = None
                if num_samples > 1:
                    cache = shared_prompt_cache(model, input_ids, attention_mask, num_samples, width + max_new)
                    input_ids = input_ids.repeat_interleave(num_samples, dim=0)
                    attention_mask = attention_mask.repeat_interleave(num_samples, dim=0)
                if cache is None:
                    cache = preallocated_cache(model, width + max_new)
                out = decode(model, input_ids, attention_mask, cache, max_new, sampling_processors(decoding),
                             decoding.greedy, eos_ids, pad_id, StopOnStrings(tokenizer, decoding.stop_strings, 0),
                             streamer, budgets)
            slots = [row * num_samples + s for row in rows for s in range(num_samples)]
            for slot, ids, budget in zip(slots, out.tolist(), own):
                ids = ids[:budget]  # past a row's own budget: padding (which may be the EOS)
                answer = _cut_at_eos(ids, eos_ids)
                text = tokenizer.decode(answer, skip_special_tokens=True)
                ended = len(answer) < len(ids) or truncate_at_stop(text, decoding.stop_strings) != text
                if not ended:
                    text = without_partial_character(text)
                samples[slot] = Sample(clean_response(text, decoding.stop_strings), ended,
                                       sampled_response_ids(tokenizer, answer, decoding.stop_strings))
            if bar is not None:
                bar.update(len(rows))
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    return samples


# ---------------------------------------------------------------------------------------------------
# Batch files


def read_instructions(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a JSON array, a single JSON object, or JSON Lines, each an object with a non-empty
    string "instruction" (AlpacaEval's format) or, without one, "prompt" (IFEval's), which becomes its "instruction";
    other fields are kept."""
    path = Path(path)
    if not path.exists():
        raise BatchFileError(f"{path}: file not found")
    if path.is_dir():
        raise BatchFileError(f"{path}: is a directory, not a JSON or JSONL file")
    try:  # the training data's reader: the same files are read the same way
        rows, _ = read_json(path, single_record=True)
    except DataError as error:
        raise BatchFileError(str(error)) from None
    if not rows:
        raise BatchFileError(f"{path}: no rows")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise BatchFileError(f"{path}, row {i}: expected an object with an 'instruction' field, "
                                 f"got a {type(row).__name__}")
        if "instruction" not in row and isinstance(row.get("prompt"), str):
            rows[i] = row = {"instruction": row["prompt"], **row}
        if "instruction" not in row and row.get("prompt") is not None:
            raise BatchFileError(f"{path}, row {i}: field 'prompt' is a {type(row['prompt']).__name__}, not a string "
                                 "(write a conversation as its text, e.g. 'Human: ...\\n\\nAssistant:')")
        if "instruction" not in row:
            raise BatchFileError(f"{path}, row {i}: no 'instruction' or 'prompt' field (fields: "
                                 f"{', '.join(row) or 'none'})")
        try:
            check_instruction(row["instruction"], "field 'instruction'")
        except GenerationError as error:
            raise BatchFileError(f"{path}, row {i}: {error}") from None
        if isinstance(row.get("input"), str) and row["input"].strip():  # Alpaca's format: it would be left out
            raise BatchFileError(f"{path}, row {i}: a non-empty 'input' field, which the prompt would leave out: put "
                                 "it in the 'instruction' (as the instruction's text should read)")
    return rows


def write_outputs(path: str | Path, rows: Sequence[dict[str, Any]], outputs: Sequence[str], generator: str) -> None:
    """A JSON list of {"instruction", "output", "generator"} (plus the rows' other fields), UTF-8."""
    records = [{**row, "instruction": row["instruction"], "output": output, "generator": generator}
               for row, output in zip(rows, outputs, strict=True)]
    write_output_text(path, json.dumps(records, ensure_ascii=False, indent=2) + "\n")


def _written_path(path: Path) -> Path:
    """The file a write to `path` replaces: the target of a symbolic link, else `path`."""
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def _same_file(path: Path, stream: Any) -> bool:
    """Whether `path` is the file behind `stream` (sys.stdout redirected to it, say)."""
    try:
        here, there = os.stat(path), os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):  # no file behind it (captured output)
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _is_stream(path: Path) -> bool:
    """Whether `path` names a stream to write into, not a file to replace: a device or a pipe."""
    return path.exists() and not path.is_file() and not path.is_dir()


def check_output_file(path: str | Path, flag: str = "--output") -> None:
    """A GenerationError naming `flag` and `path` when no file can be written there: `path` is a directory, a parent
    on its way is a file, or the nearest existing directory refuses a new entry (tried with a temporary file or
    directory, removed at once). Called before any model is loaded, so that no work is lost at the end."""
    path = Path(path)
    try:
        if path.is_dir():
            raise GenerationError(f"{flag} {path}: is a directory")
        if _is_stream(path):  # a device or a pipe (/dev/stdout), written directly
            if not os.access(path, os.W_OK):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
            return
        target = _written_path(path)
        existing = target.parent
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise GenerationError(f"{flag} {path}: its parent {existing} is not a directory")
        if existing == target.parent:
            fd, probe = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=existing)
            os.close(fd)
            os.unlink(probe)
        else:  # the missing directories are made when the file is written
            os.rmdir(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=existing))
    except OSError as error:
        raise GenerationError(f"{flag} {path}: cannot write there ({error.strerror or first_line(error)})") from None


def write_output_text(path: str | Path, text: str) -> None:
    """`text` as UTF-8 at `path` (its missing parent directories made), written to a temporary file beside it and
    renamed over it: a failure while writing leaves no partial file, and a file already at `path` stays as it was.
    A symbolic link is followed; this process's own stdout or stderr (/dev/stdout, also where it is redirected to a
    file, which the process keeps writing to) is written through it, in order; another stream (a pipe, a device) is
    written into. A failure is a GenerationError naming the
    path."""
    path = Path(path)
    try:
        for stream in (sys.stdout, sys.stderr):  # this process's own output: written through it, in its order
            if path.exists() and _same_file(path, stream):
                stream.write(text)
                stream.flush()
                return
        if _is_stream(path):
            with open(path, "w", encoding="utf-8") as handle:
                handle.write(text)
            return
        write_text_atomically(_written_path(path), text)
    except OSError as error:
        raise GenerationError(f"{path}: cannot be written ({error.strerror or first_line(error)})") from None


def generator_name(model: str) -> str:
    """A short name for outputs: the hub name, the directory's name, or "<run>/final" for a run's model."""
    path = Path(model.rstrip("/\\"))
    if not path.exists():
        return model
    path = path.resolve()
    if path.name == "model" and path.parent.name.startswith("checkpoint-"):
        path = path.parent
    if path.name == "final" or path.name.startswith("checkpoint-"):
        return f"{path.parent.name}/{path.name}"
    return path.name


def resolve_run_model(name: str) -> str:
    """A training run's directory stands for the model in its final/ subdirectory (a whole model, or a LoRA run's
    adapter), a checkpoint's (checkpoint-<step>/) for its model/; a shipped model's name ('demo') for the shipped
    model, not for a run directory of that name (reached as ./demo)."""
    path = Path(name)
    if names_shipped_model(name) or not path.is_dir() or (path / "config.json").exists() or is_adapter_dir(path):
        return name
    for inner in (path / "final", path / "model"):
        if (inner / "config.json").is_file() or is_adapter_dir(inner):
            return str(inner)
    return name


# ---------------------------------------------------------------------------------------------------
# Display


def side_by_side(title_a: str, text_a: str, title_b: str, text_b: str, width: int | None = None) -> str:
    """Two texts in two wrapped columns under their titles."""
    width = width or shutil.get_terminal_size((120, 20)).columns
    column = max(20, (width - 3) // 2)

    def lines(title: str, text: str) -> list[str]:
        body = [piece for paragraph in (text or "(empty)").splitlines()
                for piece in (textwrap.wrap(paragraph, column) or [""])]
        return [title[:column], "-" * min(column, max(len(title), 1))] + body

    left, right = lines(title_a, text_a), lines(title_b, text_b)
    rows = max(len(left), len(right))
    left += [""] * (rows - len(left))
    right += [""] * (rows - len(right))
    return "\n".join(f"{a:<{column}} | {b}".rstrip() for a, b in zip(left, right))
