"""Training settings: one dataclass, exposed as command-line flags and as `--config FILE` (JSON).

Every field of `TrainConfig` is a flag (`beta` -> `--beta`, `micro_batch_size` -> `--micro-batch-size`).
A config file holds the same keys (either spelling); flags given on the command line override it.
The defaults are the phi-2-dpo recipe's hyper-parameters with the embedded demo's model and data, so
`python train.py` alone trains the shipped tiny SFT model on the shipped synthetic preference set. When the
model is the demo model, `DEMO_SETTINGS` (sizes and a learning rate fit for a tiny model on a CPU) are
layered over the defaults, under any config file or flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpo.errors import UserError

DEMO_MODEL = "demo"  # resolved to the SFT model shipped inside the package
DEMO_DATASET = "demo"
DEMO_SETTINGS: dict[str, Any] = {
    "lr": 1e-4,
    "max_length": 96,
    "max_prompt_length": 48,
    "micro_batch_size": 32,
    "eval_steps": 10,
    "output_dir": "runs/demo",
}


class ConfigError(UserError):
    """A setting that cannot work, reported before any training starts."""


def _opt(default: Any, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class TrainConfig:
    # model and data
    model: str = _opt(DEMO_MODEL, "SFT model: a local directory or hub name ('demo' = the shipped tiny model)")
    dataset: str = _opt(DEMO_DATASET, "preference data: hub name, .jsonl/.json/.parquet file, dataset directory, or 'demo'")
    train_split: str = _opt("train", "split to train on (ultrafeedback_binarized: train_prefs)")
    eval_split: str | None = _opt("test", "held-out split; when the source has none, --test-size pairs are split off")
    test_size: float = _opt(0.05, "fraction (or count if >= 1) held out when the source has no eval split")
    num_pairs: int | None = _opt(None, "use only this many training pairs (a subset)")
    subset: str = _opt("first", "how --num-pairs are chosen", choices=["first", "random"])
    max_eval_pairs: int | None = _opt(256, "evaluate on at most this many held-out pairs (None: all)")
    template: str = _opt("recipe", "prompt rendering: the recipe's '### Human:' template or the tokenizer's chat template", choices=["recipe", "chat"])
    max_length: int = _opt(1024, "maximum tokens of prompt + response")
    max_prompt_length: int | None = _opt(512, "maximum prompt tokens, cut first (none: no limit; a pair whose prompt leaves no room for a response is skipped)")
    truncation_mode: str = _opt("keep_end", "which end of an over-long prompt is kept", choices=["keep_end", "keep_start"])
    # loss
    loss: str = _opt("sigmoid", "loss name, 'a:0.8,b:0.2' mix, 'module:function' or 'file.py:function'")
    beta: float = _opt(0.1, "DPO beta (KL penalty strength)")
    label_smoothing: float = _opt(0.0, "cDPO / robust / EXO label smoothing epsilon")
    reference_free: bool = _opt(False, "treat the reference log-probs as 0 (no reference model)")
    rpo_alpha: float | None = _opt(None, "weight of an NLL term on the chosen response (RPO)")
    f_divergence: str = _opt("reverse_kl", "f-divergence regulariser", choices=["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"])
    f_alpha: float = _opt(1.0, "alpha of the alpha-divergence")
    use_weighting: bool = _opt(False, "WPO weighting of each pair's loss")
    simpo_gamma: float = _opt(0.5, "SimPO target reward margin")
    # optimisation
    lr: float = _opt(3e-5, "peak learning rate")
    warmup_ratio: float = _opt(0.03, "fraction of the steps with linear warmup (then cosine decay)")
    min_lr_ratio: float = _opt(0.0, "cosine decays to this fraction of the peak")
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    adam_betas: tuple[float, float] = _opt((0.9, 0.999), "AdamW betas")
    max_grad_norm: float | None = _opt(1.0, "clip the gradient norm to this (None: no clipping)")
    epochs: float = _opt(2, "passes over the training pairs")
    max_steps: int | None = _opt(None, "stop after this many optimizer steps (overrides --epochs)")
    batch_size: int = _opt(64, "effective batch in pairs per optimizer step (all devices, all accumulation)")
    micro_batch_size: int = _opt(8, "pairs per forward/backward on one device; accumulation = batch / (micro x devices)")
    precision: str = _opt("fp32", "fp32, bf16 (autocast) or fp16 (autocast + GradScaler, fp32 master weights)", choices=["fp32", "bf16", "fp16"])
    seed: int = _opt(42, "seed for initialisation order, shuffling and subsets")
    # run management
    output_dir: str = _opt("runs/dpo", "where metrics, checkpoints and final/ are written")
    stop_at_step: int | None = _opt(None, "checkpoint and stop after this step, schedule unchanged (split a run into jobs)")
    resume: bool = _opt(False, "continue from the latest complete checkpoint in --output-dir")
    overwrite: bool = _opt(False, "delete an existing --output-dir and start afresh")
    eval_steps: int | None = _opt(None, "evaluate every N optimizer steps (and always at the end)")
    save_steps: int | None = _opt(None, "checkpoint every N optimizer steps")
    save_total_limit: int = _opt(2, "keep only the newest K checkpoints")
    log_steps: int = _opt(1, "write a metrics line every N optimizer steps")
    on_nan: str = _opt("stop", "a NaN/inf loss stops the run, or skips the batch and counts it", choices=["stop", "skip"])
    # speed
    device: str = _opt("auto", "cpu, cuda, cuda:N or auto")
    precompute_ref: bool = _opt(True, "compute reference log-probs once before training and free the reference model")
    completion_only: bool = _opt(True, "run the LM head on response tokens only (exact)")
    logps_chunk_size: int = _opt(1024, "response tokens per LM-head chunk (unfused head, or fused with --recompute-softmax)")
    fused_lm_head: bool = _opt(True, "fused chunked LM-head log-softmax with a hand-written backward (exact)")
    fused_gelu: bool = _opt(True, "run gelu_new activations as one fused kernel (same formula, equal to fp32 rounding)")
    recompute_softmax: bool = _opt(False, "fused head: recompute logits in backward instead of storing them (less memory)")
    layout: str = _opt("padded", "micro-batch layout: padded rows, packed (padding-free) or shared_prompt (prompt computed once per pair)", choices=["padded", "packed", "shared_prompt"])
    group_by_length: bool = _opt(True, "within a step, put pairs of similar length in the same micro-batch (exact)")
    gradient_checkpointing: bool = _opt(False, "recompute activations in backward to save memory")
    compile: bool = _opt(False, "torch.compile the policy")
    fsdp: bool = _opt(False, "shard the model with FSDP2 under torchrun (default under torchrun: DDP)")
    progress: bool = _opt(True, "show a progress bar")
    plot: bool = _opt(True, "write training_curves.png at the end")

    def validate(self) -> None:
        positive = {"beta": self.beta, "lr": self.lr, "batch_size": self.batch_size,
                    "micro_batch_size": self.micro_batch_size, "max_length": self.max_length,
                    "epochs": self.epochs,
                    "logps_chunk_size": self.logps_chunk_size, "log_steps": self.log_steps}
        for name, value in positive.items():
            if value is None or value <= 0:
                raise ConfigError(f"--{_flag(name)} must be positive, got {value!r}")
        for name in ("max_steps", "eval_steps", "save_steps", "num_pairs", "max_eval_pairs", "stop_at_step",
                     "max_prompt_length"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"--{_flag(name)} must be positive, got {value!r}")
        if self.max_prompt_length is not None and self.max_prompt_length >= self.max_length:
            raise ConfigError(f"--max-prompt-length ({self.max_prompt_length}) must be below --max-length ({self.max_length})")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"--label-smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.batch_size % self.micro_batch_size:
            raise ConfigError(f"--batch-size ({self.batch_size}) must be a multiple of --micro-batch-size ({self.micro_batch_size})")
        if self.resume and self.overwrite:
            raise ConfigError("--resume and --overwrite exclude each other")
        if self.save_total_limit < 1:
            raise ConfigError(f"--save-total-limit must be at least 1, got {self.save_total_limit}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _optional(convert):
    def parse(text: str):
        return None if text.lower() in ("none", "null") else convert(text)
    parse.__name__ = convert.__name__
    return parse


def _pair(text: str) -> tuple[float, float]:
    parts = text.replace(",", " ").split()
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"expected two numbers like 0.9,0.999, got {text!r}")
    return float(parts[0]), float(parts[1])


_CONVERTERS = {
    "str": str, "int": int, "float": float, "bool": _parse_bool, "tuple[float, float]": _pair,
    "str | None": _optional(str), "int | None": _optional(int), "float | None": _optional(float),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train.py",
        description="DPO training. With no arguments: the embedded demo (tiny SFT model, synthetic preferences).",
    )
    parser.add_argument("--config", help="JSON file with any of the settings below (flags override it)")
    groups = {
        "model": "model and data", "loss": "loss", "lr": "optimisation",
        "output_dir": "run management", "device": "speed",
    }
    group = parser
    for f in dataclasses.fields(TrainConfig):
        if f.name in groups:
            group = parser.add_argument_group(groups[f.name])
        convert = _CONVERTERS[str(f.type)]
        default = f.default if f.default is not dataclasses.MISSING else None
        # defaults are SUPPRESSed so that only flags actually given override a --config file
        kwargs: dict[str, Any] = {"help": f"{f.metadata['help']} (default: {default})", "default": argparse.SUPPRESS}
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        if f.type == "bool":
            # --flag sets true; --flag false / --no-flag for the opposite
            kwargs.update(nargs="?", const=True, type=_parse_bool, metavar="BOOL")
            group.add_argument(f"--{_flag(f.name)}", **kwargs)
            group.add_argument(f"--no-{_flag(f.name)}", dest=f.name, action="store_false", default=argparse.SUPPRESS,
                               help=argparse.SUPPRESS)
        else:
            group.add_argument(f"--{_flag(f.name)}", type=convert, **kwargs)
    return parser


def load_config_file(path: str) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"--config {path}: not valid JSON ({error})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"--config {path}: expected a JSON object of settings")
    known = {f.name: f for f in dataclasses.fields(TrainConfig)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key.startswith("_"):  # "_comment" and the like
            continue
        name = key.replace("-", "_")
        if name not in known:
            raise ConfigError(f"--config {path}: unknown setting {key!r}")
        if name == "adam_betas":
            value = tuple(value)
        values[name] = value
    return values


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """Defaults, then DEMO_SETTINGS for the demo model, then the --config file, then flags; validated."""
    args = vars(build_parser().parse_args(argv))
    config_file = args.pop("config", None)
    values = load_config_file(config_file) if config_file else {}
    values.update(args)
    if values.get("model", DEMO_MODEL) == DEMO_MODEL:
        values = {**DEMO_SETTINGS, **values}
    try:
        config = TrainConfig(**values)
    except TypeError as error:
        raise ConfigError(str(error)) from None
    config.validate()
    return config
