"""Training settings: `TrainSettings`, exposed as command-line flags and as `--config FILE` (JSON).

Every setting is a flag (`beta` -> `--beta`, `micro_batch_size` -> `--micro-batch-size`), declared once with
its default, help, choices and check (dpo.settings). The loss's hyper-parameters are `LossSettings`'s fields
(dpo.loss) and the log-prob computation's are `ScoringSettings`'s (dpo.logprobs), nested here and flat on the
command line. A config file holds the same keys (either spelling); flags given on the command line override it.
The defaults are the phi-2-dpo recipe's hyper-parameters with the embedded demo's model and data, so
`python train.py` alone trains the shipped tiny SFT model on the shipped synthetic preference set. When the
model is the demo model, `DEMO_SETTINGS` (sizes and a learning rate fit for a tiny model on a CPU) are
layered over the defaults, under any config file or flag.

    python -m dpo.train_settings     prints the flag tables of docs/training.md, generated from the parser
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from dataclasses import dataclass
from typing import Any

import torch

from dpo.cli import ArgumentParser
from dpo.checkpoint import PROCESSES
from dpo.logprobs import ScoringSettings
from dpo.lora import DOUBLE_RANK, LoraSettings
from dpo.errors import UserError
from dpo.loss import (LOSS_OWN_SETTINGS, LossSettings, LossSpecError, UnknownLossError, batch_coupled,
                      check_loss_output, check_weighting, label_smoothing_losses, needs_reference_model,
                      parse_loss_spec, reads_f_alpha, reads_f_divergence, reads_label_smoothing, reads_own_setting,
                      resolve_loss, unread_loss_settings)
from dpo.on_policy import SWITCHES, OnPolicySettings
from dpo.generation import DEVICE_TYPES, MAX_NEW_TOKENS
from dpo.health import HEALTH_MODES
from dpo.judges import JUDGE_HELP
from dpo.optim import OPTIMIZERS, check_optimizer
from dpo.precision import PRECISIONS
from dpo.prompts import TEMPLATES, TRUNCATION_MODES
from dpo.tracking import REPORT_TO_CHOICES, resolve_report_to
from dpo.settings import (ConfigError, add_flags, at_least, check_settings, from_flat, in_range, load_config_file,
                          nested, non_negative, positive, probability, seed_range, setting, setting_fields, to_flat)

DEMO_MODEL = "demo"  # resolved to the SFT model shipped inside the package
DEMO_DATASET = "demo"
DEMO_SETTINGS: dict[str, Any] = {
    "lr": 1e-4,
    "max_length": 96,
    "micro_batch_size": 32,
    "eval_steps": 10,
    "eval_generate": 243,  # every held-out instruction of dpo.demo.task, judged by the demo judge at each evaluation
    "eval_generate_batch_size": 32,
    "output_dir": "runs/demo",
}
# and with LoRA on the demo model: adapters learn at a higher rate (the rates tried: docs/lora.md)
DEMO_LORA_SETTINGS: dict[str, Any] = {"lr": 3e-4}
# and with online or iterative DPO: the offline demo's 64 optimizer steps (its 791 instructions make 12 batches), and
# the chosen answers' NLL, which keeps online DPO from cutting answers short (docs/online.md)
DEMO_ONLINE_SETTINGS: dict[str, Any] = {"max_steps": 64, "rpo_alpha": 1.0}
HALF_OF_MAX_LENGTH = "auto"  # --max-prompt-length's default: derived from --max-length
# what train.py's run_config.json records beside the settings (derived, not settable): a --config file may hold them
RUN_RECORDS = ("reference_model", "reference_model_path", "total_steps", "steps_per_epoch", "world_size", "accumulation_steps", "dataset_path",
               "held_out_digest", "held_out_by")
LOSS_ERRORS = (LossSpecError, UnknownLossError)  # errors of --loss's value, which do not name the flag
# settings of one command, not of the run: a run's record holds them as given, and replaying it leaves them out
INVOCATION = ("overwrite", "resume", "stop_at_step")


def _report_to(value: Any) -> str | None:
    names = [name.strip() for name in str(value).split(",")]
    unknown = [name for name in names if name not in REPORT_TO_CHOICES]
    return f"must be a comma list of {', '.join(REPORT_TO_CHOICES)}" if unknown else None


def _device(value: Any) -> str | None:
    if value == "auto":
        return None
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError):
        return "must be cpu, cuda, cuda:N or auto"
    return None if device.type in DEVICE_TYPES else "must be cpu, cuda, cuda:N or auto"


def _test_size(value: Any) -> str | None:
    """A fraction below 1, or a whole number of pairs (1.5 would silently be 1)."""
    if positive(value) is not None:
        return "must be positive"
    return None if value < 1 or float(value).is_integer() else "must be a fraction below 1 or a whole count"


def _betas(value: Any) -> str | None:
    ok = isinstance(value, tuple) and len(value) == 2 and all(in_range(0.0, 1.0)(b) is None for b in value)
    return None if ok else "must be two numbers in [0, 1)"


@dataclass
class TrainSettings:
    """Every setting of a training run, each a flag and a config-file key (nested settings flat on the command line);
    checked when built, whatever builds it."""

    # model and data
    model: str = setting(DEMO_MODEL, "SFT model: a local directory or hub name ('demo' = the shipped tiny model)")
    dataset: str = setting(DEMO_DATASET, "preference data: hub name, .jsonl/.json/.parquet file, dataset directory, "
                                         "or 'demo'")
    train_split: str = setting("train", "split to train on (ultrafeedback_binarized: train_prefs)")
    eval_split: str | None = setting("test", "held-out split; when the source has none, --test-size pairs are "
                                             "split off")
    test_size: float = setting(0.05, "fraction (or count if >= 1) of the pairs held out, whole prompts, when the "
                                     "source has no eval split",
                               check=_test_size)
    num_pairs: int | None = setting(None, "use only this many records of the training split (a subset, drawn before "
                                          "unusable rows are skipped)", check=positive)
    subset: str = setting("first", "how --num-pairs are chosen", choices=["first", "random"])
    max_eval_pairs: int | None = setting(256, "evaluate on at most this many held-out pairs (None: all)",
                                         check=positive)
    template: str = setting("auto", "prompt rendering: the tokenizer's chat template when the model ships one, else "
                                    "the recipe's '### Human:' template (auto), or either one", choices=TEMPLATES)
    max_length: int = setting(1024, "maximum tokens of prompt + response", check=at_least(2))
    max_prompt_length: int | None = setting(
        HALF_OF_MAX_LENGTH, "maximum prompt tokens, cut first ('auto': half of --max-length; none: no limit, a pair "
                            "whose prompt leaves no room for a response is skipped)", check=positive)
    truncation_mode: str = setting("keep_end", "which end of an over-long prompt is kept",
                                   choices=TRUNCATION_MODES)
    # the loss and its hyper-parameters
    loss: LossSettings = nested(LossSettings, "loss")
    # LoRA: adapters on a frozen base, the reference that base
    lora: LoraSettings = nested(LoraSettings, "LoRA")
    # online and iterative DPO: the pairs are the policy's own samples, judged
    on_policy: OnPolicySettings = nested(OnPolicySettings, "online and iterative DPO")
    # optimisation
    lr: float = setting(3e-5, "peak learning rate", check=positive)
    warmup_ratio: float = setting(0.03, "fraction of the steps with linear warmup (then cosine decay)",
                                  check=in_range(0.0, 1.0))
    min_lr_ratio: float = setting(0.0, "cosine decays to this fraction of the peak", check=in_range(0.0, 1.0))
    optimizer: str = setting("adamw", "adamw, or adamw_8bit: AdamW with both moments in 8 bits (bitsandbytes; 2 bytes "
                                      "a parameter instead of 8; tensors under 4,096 elements keep fp32 moments)",
                             choices=list(OPTIMIZERS))
    weight_decay: float = setting(0.0, "AdamW weight decay, on the weight matrices and embeddings (none on biases and "
                                       "norm scales, as HF Trainer and TRL)",
                                  check=non_negative)
    adam_betas: tuple[float, float] = setting((0.9, 0.999), "AdamW betas", check=_betas)
    max_grad_norm: float | None = setting(1.0, "clip the gradient norm to this (None: no clipping)", check=positive)
    sync_ref_model: bool = setting(False, "TR-DPO: every --ref-model-sync-steps steps the reference becomes alpha x "
                                          "policy + (1 - alpha) x reference (a reference model of its own, scored "
                                          "at step time)")
    ref_model_sync_steps: int = setting(512, "TR-DPO's tau: optimizer steps between reference updates",
                                        check=positive)
    ref_model_mixup_alpha: float = setting(0.6, "TR-DPO's alpha: the policy's weight in a reference update (1: the "
                                                "reference becomes the policy)", check=probability)
    epochs: float = setting(2, "passes over the training pairs (each in a new seeded order, less the last pairs "
                                  "that do not fill a batch)", check=positive)
    max_steps: int | None = setting(None, "stop after this many optimizer steps (overrides --epochs)",
                                    check=positive)
    batch_size: int = setting(64, "effective batch in pairs per optimizer step (all devices, all accumulation)",
                              check=positive)
    micro_batch_size: int = setting(8, "pairs per forward/backward on one device; accumulation = batch / (micro x "
                                       "devices)", check=positive, identity=False)
    precision: str = setting("auto", "fp32, bf16 (autocast) or fp16 (autocast + GradScaler), fp32 master weights "
                                     "in each; auto: bf16 on a GPU that has it, else fp16 on a GPU, fp32 on a CPU",
                             choices=list(PRECISIONS))
    seed: int = setting(42, "seed for initialisation order, shuffling and subsets", check=seed_range)
    # run management: none of these changes the numbers of a run
    output_dir: str = setting("runs/dpo", "where metrics, checkpoints and final/ are written", identity=False)
    stop_at_step: int | None = setting(None, "checkpoint and stop after this step, schedule unchanged (split a run "
                                             "into jobs)", check=positive, identity=False)
    resume: bool = setting(False, "continue from the latest complete checkpoint in --output-dir", identity=False)
    overwrite: bool = setting(False, "replace the run in --output-dir (it is deleted once the new run is set up)",
                              identity=False)
    eval_steps: int | None = setting(None, "evaluate every N optimizer steps (and always at the end)", check=positive,
                                     identity=False)
    save_steps: int | None = setting(None, "checkpoint every N optimizer steps", check=positive, identity=False)
    save_total_limit: int = setting(2, "keep only the newest K checkpoints", check=at_least(1), identity=False)
    log_steps: int = setting(1, "write a metrics line every N optimizer steps", check=positive, identity=False)
    on_nan: str = setting("stop", "a NaN/inf loss or gradient norm stops the run, or skips the batch and counts it",
                          choices=["stop", "skip"], identity=False)
    # speed: exact (the same numbers to rounding), so they may change when a run is resumed
    device: str = setting("auto", "cpu, cuda, cuda:N or auto", check=_device, identity=False)
    precompute_ref: bool = setting(True, "compute reference log-probs once before training and free the reference "
                                         "model", identity=False)
    scoring: ScoringSettings = nested(ScoringSettings)
    fused_gelu: bool = setting(True, "run gelu_new activations as one fused kernel (same formula, equal to fp32 "
                                     "rounding)", identity=False)
    layout: str = setting("auto", "micro-batch layout: padded rows, packed (padding-free), shared_prompt (prompt "
                                  "computed once per pair, no padding) or auto (on a CPU shared_prompt where the "
                                  "model allows it, else padded; on a GPU or under --compile padded)",
                          choices=["auto", "padded", "packed", "shared_prompt"], identity=False)
    group_by_length: bool = setting(True, "within a step, put pairs of similar length in the same micro-batch "
                                          "(exact)", identity=False)
    max_tokens_per_micro_batch: int | None = setting(
        None, "cut micro-batches by tokens: as many pairs (at most --micro-batch-size) as fit this many token "
              "positions of the layout; a longer pair alone (exact: the same loss and gradient, except for losses "
              "that compare a micro-batch's pairs, aot)", check=positive,
        identity=False)
    gradient_checkpointing: bool = setting(False, "recompute activations in backward to save memory", identity=False)
    compile: bool = setting(False, "torch.compile the policy", identity=False)
    peak_tflops: float | None = setting(None, "the device's dense peak TFLOP/s in this precision, for the metrics' "
                                              "MFU (default: known GPUs' datasheet figures; none on a CPU)",
                                        check=positive, identity=False)
    fsdp: bool = setting(False, "shard the model with FSDP2 under torchrun (default under torchrun: DDP)",
                         identity=False)
    progress: bool = setting(True, "show a progress bar", identity=False)
    plot: bool = setting(True, "write training_curves.png at the end", identity=False)
    # run observation: trackers, win rate while training, health alerts; none changes the numbers of a run
    report_to: str = setting("none", "experiment trackers besides metrics.jsonl: a comma list of "
                                     f"{', '.join(c for c in REPORT_TO_CHOICES if c not in ('jsonl', 'all', 'none'))}"
                                     "; all (those installed) or none", check=_report_to, identity=False)
    eval_generate: int = setting(0, "at every evaluation the policy answers N held-out prompts, judged against the "
                                    "reference's answers: win rate, lengths, samples (0: off)", check=non_negative,
                                 identity=False)
    eval_judge: str = setting("demo", f"judge of --eval-generate: {JUDGE_HELP}", identity=False)
    eval_prompts: str | None = setting(None, "JSON / JSONL instructions for --eval-generate (default: the judge's "
                                             "own held-out prompts)", identity=False)
    eval_generate_batch_size: int = setting(64, "prompts per generate call of --eval-generate", check=positive,
                                            identity=False)
    eval_max_new_tokens: int = setting(MAX_NEW_TOKENS, "new tokens per answer of --eval-generate", check=positive,
                                       identity=False)
    health: str = setting("warn", "health alerts: printed and logged (warn), the first stops the run (strict), or "
                                  "off", choices=HEALTH_MODES, identity=False)
    health_window: int = setting(3, "steps (evaluations, for likelihood displacement) a condition lasts before "
                                    "its alert", check=positive, identity=False)

    def __post_init__(self) -> None:
        if self.max_prompt_length == HALF_OF_MAX_LENGTH and isinstance(self.max_length, int):
            self.max_prompt_length = self.max_length // 2
        check_settings(self)
        if self.max_prompt_length is not None and self.max_prompt_length >= self.max_length:
            raise ConfigError(f"--max-prompt-length ({self.max_prompt_length}) must be below --max-length "
                              f"({self.max_length})")
        if self.batch_size % self.micro_batch_size:
            raise ConfigError(f"--batch-size ({self.batch_size}) must be a multiple of --micro-batch-size "
                              f"({self.micro_batch_size})")
        if self.subset != "first" and self.num_pairs is None:
            raise ConfigError(f"--subset {self.subset} changes nothing without --num-pairs (it says how they are "
                              "chosen)")
        if self.resume and self.overwrite:
            raise ConfigError("--resume and --overwrite exclude each other")
        if self.on_policy.enabled and self.fsdp:
            raise ConfigError("--online / --iterations do not run under --fsdp (sampling would need every process in "
                              "each decoding step of the sharded model); use DDP")
        if self.optimizer == "adamw_8bit" and self.fsdp:
            raise ConfigError("--optimizer adamw_8bit does not run under --fsdp (bitsandbytes updates whole tensors, "
                              "not FSDP2's shards); use DDP")
        if self.lora.quantized and self.fsdp:
            raise ConfigError("--load-in-4bit / --load-in-8bit do not run under --fsdp (FSDP2 cannot shard "
                              "bitsandbytes' quantized weights); use DDP")
        if self.sync_ref_model:  # TR-DPO: a reference of its own, updated from the whole policy on every process
            if self.lora.enabled:
                raise ConfigError("--sync-ref-model does not run with LoRA: the reference is the base with the "
                                  "adapters switched off, not a model of its own (train in full, or leave the "
                                  "reference fixed)")
            if self.fsdp:
                raise ConfigError("--sync-ref-model does not run under --fsdp (the policy's weights are sharded "
                                  "across the processes); use DDP")
            if self.on_policy.iterations:
                raise ConfigError("--sync-ref-model does not run with --iterations (each round's reference is "
                                  "computed when the round starts); use --reference-update for a reference that "
                                  "follows the rounds")
        if self.eval_generate and self.fsdp:
            raise ConfigError(f"--eval-generate {self.eval_generate} does not run under --fsdp (generation would need "
                              "every process in each decoding step of the sharded model); pass --eval-generate 0 and "
                              "evaluate final/ with dpo.evaluate, or use DDP")

    def to_dict(self) -> dict[str, Any]:
        """Every setting under its flat name (the keys of a --config file)."""
        return to_flat(self)

    def run_identity(self, processes: int = 1) -> dict[str, Any]:
        """The settings that define the run's data order and math: a resumed run must have the same. For a loss
        that compares the pairs of a micro-batch (AOT), how a step is split is part of the math too, the number
        of `processes` (torchrun's) included."""
        flat = self.to_dict()
        coupled = batch_coupled(self.loss)
        # (under a token budget the layout, resolved by device, is checked apart: train.check_resumed_layout)
        split = ("micro_batch_size", "group_by_length", "max_tokens_per_micro_batch") if coupled else ()
        unused = () if self.sync_ref_model else ("ref_model_sync_steps", "ref_model_mixup_alpha")  # TR-DPO's, off
        unused += tuple(unread_loss_settings(self.loss))  # (a run of an earlier version may have recorded them)
        if not self.lora.enabled:  # full fine-tuning reads none of LoRA's (an earlier version recorded them as given)
            unused += ("lora_alpha", "lora_dropout", "lora_target_modules", "lora_modules_to_save")
        if not self.on_policy.enabled:  # offline DPO samples nothing (an earlier version recorded them as given)
            unused += tuple(f.name for f in dataclasses.fields(OnPolicySettings) if f.name not in SWITCHES)
        if self.num_pairs is None:  # every record is used, however a subset would be drawn (ditto)
            unused += ("subset",)
        identity = {s.name: flat[s.name] for s in setting_fields(TrainSettings)
                    if (s.identity or s.name in split) and s.name not in unused}
        return {**identity, PROCESSES: processes} if coupled else identity


_GROUPS = {"model": "model and data", "lr": "optimisation", "output_dir": "run management", "device": "speed",
           "report_to": "run observation"}


def _max_prompt_length(text: str) -> int | str | None:
    lowered = text.lower()
    if lowered in ("none", "null"):
        return None
    if lowered == HALF_OF_MAX_LENGTH:
        return HALF_OF_MAX_LENGTH
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer, {HALF_OF_MAX_LENGTH} or none") from None


def _lora_alpha(text: str) -> float | str:
    if text.lower() == DOUBLE_RANK:
        return DOUBLE_RANK
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number or {DOUBLE_RANK}") from None


def build_parser() -> argparse.ArgumentParser:
    """train.py's argument parser: --config and one flag per setting, in argument groups."""
    parser = ArgumentParser(
        prog="train.py",
        description="DPO training. With no arguments: the embedded demo (tiny SFT model, synthetic preferences).",
    )
    parser.add_argument("--config", help="JSON file with any of the settings below (flags override it)")
    add_flags(parser, TrainSettings, _GROUPS, converters={"max_prompt_length": _max_prompt_length,
                                                        "lora_alpha": _lora_alpha})
    return parser


def parse_settings(argv: list[str] | None = None) -> TrainSettings:
    """Defaults, then DEMO_SETTINGS (and DEMO_LORA_SETTINGS under LoRA, DEMO_ONLINE_SETTINGS for online or
    iterative DPO) for the demo model, then the --config file, then flags; validated."""
    args = vars(build_parser().parse_args(argv))
    config_file = args.pop("config", None)
    from_file = load_config_file(config_file, TrainSettings, RUN_RECORDS, INVOCATION) if config_file else {}
    values = {**from_file, **args}
    if values.get("model", DEMO_MODEL) == DEMO_MODEL:
        lora = values.get("lora_r") or values.get("adapter")
        sampled = values.get("online") or values.get("iterations")
        # the demo's length in steps, unless the run gives its length in epochs (--max-steps would override it)
        online = {k: v for k, v in DEMO_ONLINE_SETTINGS.items() if not (k == "max_steps" and "epochs" in values)}
        values = {**DEMO_SETTINGS, **(DEMO_LORA_SETTINGS if lora else {}), **(online if sampled else {}), **values}
    try:
        cfg = from_flat(TrainSettings, values)
        check_requirements(cfg)
    except UserError as error:  # a value of the file, not of a flag: the error names the file and its key
        message = str(error)
        named = re.findall(r"--([a-z0-9-]+)", message) + (["loss"] if isinstance(error, LOSS_ERRORS) else [])
        given = [flag for flag in named if flag.replace("-", "_") in from_file and flag.replace("-", "_") not in args]
        if given and message.startswith(f"--{given[0]} "):
            raise ConfigError(f"--config {config_file}: {given[0].replace('-', '_')}"
                              f"{message[len(given[0]) + 2:]}") from None
        if given:
            raise ConfigError(f"--config {config_file}: {message}") from None
        raise
    return cfg


def check_requirements(cfg: TrainSettings) -> None:
    """What a run needs beyond valid values, checked before any work: every term of --loss resolves (an unknown
    name lists the known ones) and returns one loss per pair, some term reads every loss setting given (--f-divergence,
    --label-smoothing, --f-alpha, --rpo-normalize, --simpo-gamma, --discopop-tau), and the libraries of --report-to's trackers and of --optimizer are
    installed (the error names the pip extra)."""
    for name, _ in parse_loss_spec(cfg.loss.loss_type):
        resolve_loss(name)
    check_weighting(cfg.loss)
    if cfg.sync_ref_model and not needs_reference_model(cfg.loss):
        raise ConfigError(f"--sync-ref-model with --loss {cfg.loss.loss_type}"
                          f"{' --reference-free' if cfg.loss.reference_free else ''}: the loss reads no reference "
                          "model, so there is none to sync")
    if cfg.loss.f_divergence != "reverse_kl" and not reads_f_divergence(cfg.loss):
        raise ConfigError(f"--f-divergence {cfg.loss.f_divergence} changes nothing for --loss {cfg.loss.loss_type}: "
                          "no term of it reads a log-ratio (aot sorts log-ratio differences; simpo, orpo and sft "
                          "have no reference)")
    if cfg.loss.label_smoothing and not reads_label_smoothing(cfg.loss):
        raise ConfigError(f"--label-smoothing {cfg.loss.label_smoothing:g} changes nothing for --loss "
                          f"{cfg.loss.loss_type}: no term of it reads it (the losses that do: "
                          f"{', '.join(label_smoothing_losses())})")
    defaults = LossSettings()
    for name, loss in LOSS_OWN_SETTINGS.items():
        value = getattr(cfg.loss, name)
        if value != getattr(defaults, name) and not reads_own_setting(cfg.loss, name):
            raise ConfigError(f"--{name.replace('_', '-')} {value:g} changes nothing for --loss {cfg.loss.loss_type}: "
                              f"only {loss} reads it")
    if cfg.loss.f_alpha != defaults.f_alpha and not reads_f_alpha(cfg.loss):
        raise ConfigError(f"--f-alpha {cfg.loss.f_alpha:g} changes nothing with --f-divergence "
                          f"{cfg.loss.f_divergence}: it is the alpha of --f-divergence alpha_divergence")
    if cfg.loss.rpo_normalize != defaults.rpo_normalize and cfg.loss.rpo_alpha is None:
        raise ConfigError(f"--rpo-normalize {cfg.loss.rpo_normalize} changes nothing without --rpo-alpha: it says how "
                          "the RPO term averages the chosen NLL")
    check_loss_output(cfg.loss)
    resolve_report_to(cfg.report_to)
    check_optimizer(cfg.optimizer)


def flag_tables() -> str:
    """The flag tables of docs/training.md: one markdown table per argument group of the parser."""
    parser = build_parser()
    blocks = []
    for group in parser._action_groups:
        rows = [action for action in group._group_actions if action.help != argparse.SUPPRESS
                and action.option_strings and action.dest not in ("help", "config")]
        if not rows:
            continue
        lines = [f"**{group.title[0].upper() + group.title[1:]}**", "", "| flag | default | meaning |",
                 "|---|---|---|"]
        fields = {s.name: s for s in setting_fields(TrainSettings)}
        for action in rows:
            s = fields[action.dest]
            choices = f" ({' / '.join(action.choices)})" if action.choices else ""
            lines.append(f"| `{action.option_strings[0]}` | `{_shown(s.default)}` | {s.help}{choices} |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def _shown(default: Any) -> str:
    if isinstance(default, tuple):
        return ",".join(str(v) for v in default)
    return str(default)


if __name__ == "__main__":
    sys.stdout.write(flag_tables())
