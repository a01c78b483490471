"""DPO training, the whole loop in one file, read top to bottom.

    python train.py                                   # the embedded demo: tiny SFT model, synthetic preferences
    python train.py --config configs/phi2_ultrafeedback.json    # the phi-2-dpo recipe
    torchrun --nproc_per_node 4 train.py --config ...           # DDP (add --fsdp to shard)

`python train.py --help` lists every setting. Outputs in --output-dir: metrics.jsonl, checkpoint-<step>/,
final/ (save_pretrained format with the tokenizer), run_config.json and training_curves.png.

The parts, in the order a run uses them:
    start_processes   the device and the torchrun process group
    open_run_dir      --output-dir, and the checkpoint --resume continues (its settings checked against these)
    build_policy      load -> dropout off -> fused GELU -> gradient checkpointing; the reference model too
    reference_logps   the frozen reference's log-probs of the pairs the run will use, computed once (cached)
    build_state       compile, the scorer (DDP / FSDP under torchrun), optimizer, GradScaler, resumed state
    train_step        one optimizer step on a global batch of pairs: micro-batches, accumulation, autocast,
                      clipping, the NaN policy; returns the step's metrics (benchmarks/throughput.py times it)
    evaluate          loss and reward metrics on the held-out pairs
    save / save_final checkpoints and the final model
    run_training      data -> models -> loop { batch -> train_step -> evaluate? -> log -> save? } -> final/
    main              settings -> processes -> run_training -> the process group closed
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import math
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from dpo.cli import exit_quietly_on_interrupt  # light: it comes before the heavy imports below

if __name__ == "__main__":
    exit_quietly_on_interrupt()  # Ctrl-C in their seconds: `interrupted`, not a traceback

import huggingface_hub
import torch
import transformers
from torch import nn
from tqdm.auto import tqdm

from dpo.activations import fuse_gelu
from dpo.batches import OfflinePairs, PairBatch, PairSource, process_micro_batches
from dpo.checkpoint import (PROCESSES, CheckpointError, ReplacedRun, check_disk_space, latest_checkpoint,
                            load_checkpoint, prepare_output_dir, process_rng_state, publish, read_trainer_state,
                            removed_if_unwritable, replacing, rng_state, save_checkpoint, set_rng_state,
                            settings_differences)
from dpo.cli import run_cli
from dpo.data import BUILTIN_SOURCES, RENDERING, DataError, TokenizedPair, collate_pairs, pairs_digest, texts_digest
from dpo.distributed import (DistInfo, PeerStoppedError, all_reduce_sum, barrier, broadcast_flag, full_model_state,
                             full_optimizer_state, gather, init_distributed, load_full_optimizer_state, no_sync,
                             peer_stopped, shutdown_distributed, wrap_model)
from dpo.errors import TrainingError, first_line
from dpo.files import write_text_atomically
from dpo.flops import FlopCounter, peak_tflops
from dpo.generation import (RUN_SETTINGS_FILE, TEMPERATURE, TOP_P, model_eos_ids,  # the card decoding, saved with final/
                            resolve_device)
from dpo.health import Alert, HealthError, HealthMonitor
from dpo.judges import build_judge
from dpo.logprobs import SequenceScorer, disable_dropout, dropout_as_loaded
from dpo.lora import Adapters, adapter_base_note, add_adapters, quantization_config
from dpo.loss import PreferenceLogps, batch_coupled, compute_loss, needs_reference_model, update_loss_state
from dpo.memory import tune_cpu_allocator
from dpo.metrics import PairMetrics, read_metrics
from dpo.modeling import (decoder_body, embedding_rows, enable_gradient_checkpointing, foreign_token, load_causal_lm,
                          load_tokenizer, local_model_path, resolve_model_path, rope_switch_length)
from dpo.on_policy import PAIR_BUILDING, IterativePairs, OnlinePairs, Sampler
from dpo.optim import build_optimizer, decays_every_parameter
from dpo.packing import (check_packable, collate_packed, collate_shared_prompt, longest_first, micro_batches,
                          packing_problem)
from dpo.plot import plot_training_curves
from dpo.prompts import encode_prompts
from dpo.precision import (AUTOCAST_DTYPES, LOGP_TOLERANCE, frozen_dtype, matmul_precision, resolve_precision, synced_clock,
                           use_fast_cuda_kernels)
from dpo.precision import autocast as precision_autocast
from dpo.reference import (ReferenceLogps, cache_key, compute_reference_logps, content_identity, identity_changes,
                           load_cached, model_identity, save_cached)
from dpo.reference_sync import mix_into_reference, sync_due
from dpo.schedule import lr_at
from dpo.settings import ConfigError
from dpo.splits import HELD_OUT_BY, PreferenceData, load_preference_pairs
from dpo.tracking import MetricsWriteError, open_trackers
from dpo.train_settings import TrainSettings, parse_settings
from dpo.win_rate import SAMPLE_COLUMNS, WinRateEval


# ---------------------------------------------------------------------------------------------------- set-up


def start_processes(cfg: TrainSettings) -> tuple[torch.device, DistInfo]:
    """This process's device and its place among the torchrun processes (one process without torchrun)."""
    device = resolve_device(cfg.device)
    dist = init_distributed(device.type)
    if device.type == "cuda" and dist.enabled:
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    use_fast_cuda_kernels(device)
    if cfg.batch_size % (cfg.micro_batch_size * dist.world_size):
        raise ConfigError(f"--batch-size {cfg.batch_size} is not a multiple of --micro-batch-size x processes "
                          f"({cfg.micro_batch_size} x {dist.world_size})")
    return device, dist


def open_run_dir(cfg: TrainSettings, dist: DistInfo,
                 log: Callable[..., None]) -> tuple[dict[str, Any] | None, ReplacedRun | None]:
    """Create --output-dir: (with --resume, the latest complete checkpoint, refused when it belongs to a run whose
    data order or math differ from these settings; with --overwrite, the old run, set aside until the new one is
    set up)."""
    out_dir = Path(cfg.output_dir)
    replaced = None
    if dist.is_main:
        inputs = {f"--{name.replace('_', '-')}": value for name, value in cfg.to_dict().items()
                  if isinstance(value, str) and name != "output_dir"}
        replaced = prepare_output_dir(out_dir, resume=cfg.resume, overwrite=cfg.overwrite, inputs=inputs)
    barrier(dist)
    path = latest_checkpoint(out_dir) if cfg.resume else None
    if cfg.resume and (out_dir / "final").is_dir():  # its checkpoints (if kept) would train its last steps again
        raise ConfigError(f"--resume: {out_dir} holds a finished run (final/), nothing to continue; --overwrite to "
                          "train it again")
    aside = out_dir.with_name(f".{out_dir.name}.replaced")
    if cfg.resume and path is None and latest_checkpoint(aside) is not None:
        raise ConfigError(f"--resume: {out_dir} holds no complete checkpoint, but {aside} does: the run an --overwrite "
                          "set aside before it was killed; move it back to --output-dir to resume it, or --overwrite "
                          "to start afresh")
    if cfg.resume and path is None:
        log(f"--resume: no complete checkpoint in {out_dir}, starting from step 0")
    if path is None:
        return None, replaced
    saved = read_trainer_state(path).get("settings")
    if saved is None:
        log(f"--resume: {path} records no settings of its run; they are not checked")
    # a checkpoint that does not record its number of processes is taken to have this run's
    elif changes := settings_differences(saved, cfg.run_identity(dist.world_size),
                                         {**TrainSettings().to_dict(), PROCESSES: dist.world_size}):
        raise ConfigError(f"--resume: {path} belongs to a run with other settings ({'; '.join(changes)}); use "
                          f"its settings, or --overwrite to start afresh")
    return load_checkpoint(path), replaced


def dataset_path(dataset: str) -> str | None:
    """Where --dataset is a local path, the path from anywhere (dpo.evaluate finds the held-out pairs with it); None
    for a built-in name (which wins over a directory of that name, as the loader reads it) or a hub name."""
    return None if dataset in BUILTIN_SOURCES or not Path(dataset).exists() else str(Path(dataset).resolve())


def check_stop_step(stop_at_step: int | None, start: int, total_steps: int) -> None:
    """--stop-at-step must come after the step the run starts (or resumes) at and not after its last step: the
    run would never stop there, and train on past the limit it was given."""
    if stop_at_step is not None and not start < stop_at_step <= total_steps:
        where = f"resumes at step {start}" if stop_at_step <= start else f"ends at step {total_steps}"
        raise ConfigError(f"--stop-at-step {stop_at_step}: the run {where}, so it would never stop there; give a "
                          f"step from {start + 1} to {total_steps}, or leave it out")


def training_data(cfg: TrainSettings, data: PreferenceData) -> dict[str, Any]:
    """What the steps train on, counted and fingerprinted for --resume: the tokenized pairs (offline DPO), or the
    instructions the policy samples with the records they come from (online and iterative DPO: a judge such as
    IFEval's reads a record's other fields)."""
    if cfg.on_policy.enabled:
        records = [json.dumps(record, sort_keys=True, default=str) for _, record in data.instruction_rows.values()]
        found = {"instructions": len(data.instructions), "digest": texts_digest(data.instructions + records),
                 "rendering": RENDERING, "pair_building": PAIR_BUILDING}
    else:
        found = {"pairs": len(data.train), "digest": pairs_digest(data.train), "rendering": RENDERING}
    return {**found, "held_out_by": HELD_OUT_BY} if data.held_out_digest is not None else found


def check_resumed_model(cfg: TrainSettings, resume: dict[str, Any] | None, now: dict[str, Any]) -> None:
    """A resumed run must start from the model (and --adapter) it started on: its reference, and under LoRA the
    base its adapters train on. The checkpoint records their files' sizes and hashes (content_identity)."""
    saved = resume["trainer_state"].get("model") if resume else None
    # (a part an earlier version did not record, the base under an adapter given as --model, is not compared)
    recorded = {part: fingerprint for part, fingerprint in now.items() if saved is not None and part in saved}
    if saved is not None and (changes := identity_changes(saved, recorded)):
        flags = f"--model {cfg.model}" + (f" --adapter {cfg.lora.adapter}" if cfg.lora.adapter else "")
        raise ConfigError(f"--resume: {flags} is not what the run started on ({', '.join(changes)}), so its "
                          "reference would be another model; restore it, or --overwrite to start afresh")


def check_resumed_data(resume: dict[str, Any] | None, now: dict[str, Any]) -> None:
    """A resumed run must train on the pairs (or sample the instructions) it started on."""
    saved = resume["trainer_state"].get("data") if resume else None
    kind = "instructions" if "instructions" in now else "pairs"
    if saved is not None and kind == "instructions" and saved.get("pair_building", 1) != now["pair_building"]:
        raise DataError(f"--resume: the checkpoint's run built its pairs from the samples as an earlier version of this "
                        f"library did (pair building {saved.get('pair_building', 1)}, now {now['pair_building']}), so "
                        "its later steps would train other token ids; resume with the version that started the run, "
                        "or --overwrite to start afresh")
    if saved is not None and kind in saved and saved["digest"] != now["digest"]:
        if saved.get("rendering", 1) != now["rendering"]:
            raise DataError(f"--resume: the checkpoint's {kind} were rendered and tokenized by an earlier version "
                            f"of this library (rendering {saved.get('rendering', 1)}, now {now['rendering']}), which "
                            "gives these records other token ids or skips; resume with the version that started the "
                            "run, or --overwrite to start afresh")
        if now.get("held_out_by") != saved.get("held_out_by"):
            raise DataError(f"--resume: the checkpoint's run split off its held-out pairs (--test-size) pair by pair, "
                            "as an earlier version of this library did; this one holds out whole prompts, which "
                            f"leaves it other {kind} to train on; resume with the version that started the run, or "
                            "--overwrite to start afresh")
        raise DataError(f"--resume: the training {kind} are not the ones the run started on ({now[kind]} {kind} now, "
                        f"{saved[kind]} then, or the same number with other text): --dataset changed; restore it, "
                        "or --overwrite to start afresh")


def load_model(cfg: TrainSettings, name: str, device: torch.device, frozen: bool = False) -> nn.Module:
    """A causal LM as training uses it: dropout off (so policy and reference are one deterministic function) and
    gelu_new fused. What never trains, LoRA's base and a `frozen` reference model, is kept in the autocast dtype
    (fp16 / bf16; the matmuls run in it anyway) or quantized; what trains in fp32, its master weights."""
    dtype = frozen_dtype(resolve_precision(cfg.precision, device)) if cfg.lora.enabled or frozen else torch.float32
    quantization = quantization_config(cfg.lora, device, compute_dtype=dtype)
    model = load_causal_lm(name, device=device, dtype=dtype, quantization=quantization)
    disable_dropout(model)
    if cfg.fused_gelu:
        fuse_gelu(model)
    return model


def build_policy(cfg: TrainSettings, device: torch.device,
                 weights: str | None = None) -> tuple[nn.Module, Adapters | None]:
    """The model to train: --model in full (or `weights`, a checkpoint's), or under LoRA the frozen base with
    adapters (new, --adapter, or the checkpoint's `weights`), whose reference mode is the reference. Gradient
    checkpointing as configured (--compile is applied in build_state, after the reference pass)."""
    adapters = None
    if cfg.lora.enabled:
        # what trains is kept in fp32 (dpo.lora.upcast_trained)
        adapters = add_adapters(load_model(cfg, cfg.model, device), cfg.lora, start=weights, seed=cfg.seed)
        model = adapters.model
    else:
        model = load_model(cfg, weights or cfg.model, device)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model.train(), adapters


def reference_model(cfg: TrainSettings, policy: nn.Module, adapters: Adapters | None, device: torch.device, *,
                    fresh: bool, weights: str | None = None
                    ) -> tuple[nn.Module, Callable[[], contextlib.AbstractContextManager]]:
    """The frozen reference as (model, context to run it in). Under LoRA: the policy in its adapters' reference
    mode, never a second model. Otherwise the policy itself while it has not moved (step 0), else (`fresh`) a
    second copy of --model (or of `weights`, a checkpoint's TR-DPO reference), loaded frozen."""
    if adapters is not None:
        return policy, adapters.reference
    if not fresh:
        return policy, contextlib.nullcontext
    model = load_model(cfg, weights or cfg.model, device, frozen=True)
    return model.eval().requires_grad_(False), contextlib.nullcontext


def autocast(cfg: TrainSettings, device: torch.device) -> contextlib.AbstractContextManager:
    """The run's autocast on `device` (none in fp32)."""
    return precision_autocast(resolve_precision(cfg.precision, device), device)


def check_resumed_layout(cfg: TrainSettings, resume: dict[str, Any] | None, layout: str) -> None:
    """A loss that compares a micro-batch's pairs (aot) under a token budget must resume in the layout it ran in:
    the budget counts that layout's tokens, so another (--layout auto resolves by device and --compile) would put
    other pairs together."""
    state = resume["trainer_state"] if resume else {}
    # a checkpoint of an earlier version records the layout only as given, where it was not "auto"
    saved = state.get("layout") or (state.get("settings") or {}).get("layout")
    saved = None if saved == "auto" else saved
    if saved is not None and saved != layout and batch_coupled(cfg.loss) and cfg.max_tokens_per_micro_batch:
        raise ConfigError(f"--resume: the run cut its micro-batches by the {saved} layout's tokens "
                          f"(--max-tokens-per-micro-batch with --loss {cfg.loss.loss_type}), this one would use the "
                          f"{layout} layout; pass --layout {saved}")


def check_positions(cfg: TrainSettings, data: PreferenceData, model: nn.Module) -> None:
    """One line where a pair is longer than the model's positions: a learned position table would fail with an
    index error mid-run (a device assert on CUDA), rotary positions would run past what the model was trained on.
    Online samples are kept within the positions by the sampler."""
    positions = getattr(model.config, "max_position_embeddings", None)
    scored = data.eval if cfg.on_policy.enabled else (*data.train, *data.eval)  # online runs train on samples
    longest = max((len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in scored), default=0)
    if positions is not None and longest > positions:
        raise ConfigError(f"--max-length {cfg.max_length}: pairs reach {longest} tokens, but the model has {positions} "
                          f"positions (max_position_embeddings); use --max-length {positions} or less")
    switch = rope_switch_length(model.config)
    if cfg.on_policy.enabled:  # sampled pairs are cut at --max-length, which they can reach
        longest = max(longest, cfg.max_length)
    if switch is not None and longest > switch:
        reach = "can reach" if cfg.on_policy.enabled else "reach"
        raise ConfigError(f"--max-length {cfg.max_length}: pairs {reach} {longest} tokens, beyond the {switch} "
                          "(original_max_position_embeddings) where the model's longrope rotary frequencies switch for "
                          "a whole batch at once, so a pair's log-probs would depend on the pairs batched with it; use "
                          f"--max-length {switch} or less")


def check_vocabulary(cfg: TrainSettings, data: PreferenceData, model: nn.Module, tokenizer: Any) -> None:
    """One line where a pair, an instruction online DPO samples, or the padding holds a token id the model has no
    embedding for (foreign_token), naming the row."""
    rows = embedding_rows(model)
    if rows is None:
        return
    if (why := foreign_token(tokenizer, [tokenizer.pad_token_id or 0], rows)) is not None:
        raise ConfigError(f"the padding: {why}")
    for split, pairs in (("train", data.train), ("eval", data.eval)):
        for pair in pairs:
            ids = pair.prompt_ids + pair.chosen_ids + pair.rejected_ids
            if max(ids) >= rows:
                raise ConfigError(f"{split} pair of row {pair.row}: {foreign_token(tokenizer, ids, rows)}")
    if cfg.on_policy.enabled:  # rendered as the sampler renders them
        prompts, _ = encode_prompts(tokenizer, data.instructions, cfg.template)
        for (row, _), ids in zip(data.instruction_rows.values(), prompts):
            if ids and max(ids) >= rows:
                raise ConfigError(f"the instruction of row {row}: {foreign_token(tokenizer, ids, rows)}")


def collator(cfg: TrainSettings, pad_id: int, model: nn.Module) -> tuple[str, Callable[[list[TokenizedPair]], dict]]:
    """The micro-batch layout and its collate. A packed layout only for a model it computes exactly
    (dpo.packing). auto, by the measurements in benchmarks/README.md: on a CPU shared_prompt where the model allows
    it, else padded; on a GPU padded (the packed layouts' attention runs pair by pair);
    under --compile padded (the packed layouts' block lists are Python numbers: a recompile at every micro-batch)."""
    layout = cfg.layout
    if layout == "auto":
        on_gpu = next(model.parameters()).device.type == "cuda"
        layout = "padded" if on_gpu or cfg.compile or packing_problem(model, cfg.max_length) else "shared_prompt"
    elif layout != "padded" and cfg.compile:
        raise ConfigError(f"--compile with --layout {layout}: the layout's attention blocks are Python numbers, so "
                          "torch.compile would recompile at every micro-batch; use --layout padded (or auto)")
    elif layout != "padded":
        check_packable(model, cfg.max_length)
    return layout, {"padded": lambda pairs: collate_pairs(pairs, pad_id=pad_id), "packed": collate_packed,
                    "shared_prompt": collate_shared_prompt}[layout]


def run_length(cfg: TrainSettings, steps_per_epoch: int) -> int:
    """The run's optimizer steps: --max-steps, else --epochs passes over the pair source."""
    # rounded first: 0.57 epochs of 100 steps is 57 steps, though 0.57 * 100 == 56.99999999999999
    return cfg.max_steps or max(1, math.floor(round(cfg.epochs * steps_per_epoch, 6)))


def pair_source(cfg: TrainSettings, data: PreferenceData, tokenizer: Any, policy: nn.Module,
                adapters: Adapters | None, collate: Callable, device: torch.device,
                log: Callable[..., None], layout: str = "padded") -> PairSource:
    """What the steps train on: the preference pairs (offline DPO), or the policy's own samples of the train
    records' instructions, judged (--online: every step; --iterations: once per round, each round's reference
    log-probs computed when it starts)."""
    if not cfg.on_policy.enabled:
        return OfflinePairs(data.train, cfg.batch_size, cfg.seed, description=cfg.dataset)
    settings = cfg.on_policy
    if len(data.instructions) < cfg.batch_size:
        raise DataError(f"{cfg.dataset}: {len(data.instructions)} distinct single-turn instructions, fewer than one "
                        f"batch of --batch-size {cfg.batch_size} ({data.instructions_left_out} records multi-turn, "
                        "unreadable or unrenderable)")
    records = {text: (f"{cfg.dataset}, row {row}", record) for text, (row, record) in data.instruction_rows.items()}
    judge = build_judge(settings.judge, device=device, dtype=frozen_dtype(resolve_precision(cfg.precision, device)),
                        prompts=records)
    for text in data.instructions:
        judge.category(text)  # an instruction the judge cannot handle fails now, not at the first step
    lengths = dict(max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
                   truncation_mode=cfg.truncation_mode, template=cfg.template)
    sampler = Sampler(settings, judge, tokenizer, lengths, cfg.seed, resolve_precision(cfg.precision, device))
    kind = "online" if settings.online else f"iterative ({settings.iterations} rounds)"
    log(f"{kind} DPO: {len(data.instructions)} instructions ({data.instructions_left_out} multi-turn, unreadable or "
        f"unrenderable records left out), {settings.num_samples} samples each, judged by {judge.name}")
    if settings.online:
        return OnlinePairs(data.instructions, cfg.batch_size, cfg.seed, sampler)
    return IterativePairs(data.instructions, cfg.batch_size, cfg.seed, sampler, settings.iterations,
                          Path(cfg.output_dir) / "rounds",
                          total_steps=run_length(cfg, len(data.instructions) // cfg.batch_size),
                          # the rounds' pairs do not depend on the number of processes (a batch-coupled loss's
                          # math does, which checkpoints record)
                          identity=json.dumps({k: v for k, v in cfg.run_identity().items() if k != PROCESSES},
                                              sort_keys=True),
                          reference=round_reference(cfg, policy, adapters, collate, device, layout))


def round_reference(cfg: TrainSettings, policy: nn.Module, adapters: Adapters | None, collate: Callable,
                    device: torch.device,
                    layout: str = "padded") -> Callable[[list[TokenizedPair], int], ReferenceLogps | None]:
    """Iterative DPO: the reference log-probs of a round's pairs, computed when the round starts, before its first
    update: with --reference-update by the policy itself (the round's starting policy is its reference), else by
    the SFT model (under LoRA the adapters switched off; otherwise the policy at round 1, a frozen copy later)."""
    def compute(pairs: list[TokenizedPair], round_index: int) -> ReferenceLogps | None:
        if not needs_reference_model(cfg.loss):
            return None
        if cfg.on_policy.reference_update:
            model, mode = policy, contextlib.nullcontext
        else:
            model, mode = reference_model(cfg, policy, adapters, device, fresh=round_index > 0)
        with mode():
            return compute_reference_logps(SequenceScorer(model, cfg.scoring, ld_alpha=cfg.loss.ld_alpha), pairs,
                                           micro_batch_size=cfg.micro_batch_size, collate=collate, device=device,
                                           autocast=lambda: autocast(cfg, device),
                                           max_tokens=cfg.max_tokens_per_micro_batch, layout=layout)
    return compute


def reference_cache_settings(cfg: TrainSettings, device: torch.device) -> dict[str, Any]:
    """The settings the reference log-probs depend on, besides the model, the adapter and the pairs (the cache
    key's): the precision they are computed in (`auto` as resolved on this device), how they are scored."""
    settings = {"precision": resolve_precision(cfg.precision, device), "completion_only": cfg.scoring.completion_only}
    if cfg.loss.ld_alpha is not None:
        settings["ld_alpha"] = cfg.loss.ld_alpha
    return settings


def reference_logps(cfg: TrainSettings, policy: nn.Module, adapters: Adapters | None, data: PreferenceData,
                    train_ids: list[int], *, device: torch.device, dist: DistInfo, collate: Callable, resumed: bool,
                    log: Callable[..., None], layout: str = "padded") -> dict[str, ReferenceLogps | None]:
    """The frozen reference's log-probs of the train pairs the run trains on (`train_ids`; NaN for the others)
    and of every eval pair, computed once before training and cached in --output-dir/reference_cache/.

    At step 0 the policy is the reference, so they are computed with the policy before its first update; a
    resumed run whose cache is gone loads the reference model instead (under LoRA: the adapters' reference
    mode, always). Under torchrun every process scores a share of the pairs (longest first, dealt in turn) and the
    shares are gathered; the main process writes the cache. None for a split when the loss reads no reference or
    --no-precompute-ref, and under --sync-ref-model (the reference changes)."""
    reference: dict[str, ReferenceLogps | None] = {"train": None, "eval": None}
    if not (needs_reference_model(cfg.loss) and cfg.precompute_ref) or cfg.sync_ref_model:
        return reference
    settings = reference_cache_settings(cfg, device)
    # the main process's: another node's copy of the model has other modification times
    identity = gather([model_identity(resolve_model_path(cfg.model), cfg.lora.adapter)], dist)[0]
    for split, pairs, ids in (("train", data.train, train_ids), ("eval", data.eval, list(range(len(data.eval))))):
        if not ids:
            continue
        selected = [pairs[i] for i in ids]
        key = cache_key(identity, selected, settings)
        cache_file = Path(cfg.output_dir) / "reference_cache" / f"{split}-{key}.pt"
        result = load_cached(cache_file, len(selected)) if dist.is_main else None
        if dist.is_main and result is None and cache_file.exists():
            log(f"{cache_file}: unreadable or of other pairs, computed again")
        cached = broadcast_flag(result is not None, dist, device)
        fresh = resumed and not cached
        if cached:
            result = result if result is not None else load_cached(cache_file, len(selected))
        else:
            share = longest_first(range(len(selected)), selected)[dist.rank::dist.world_size]
            model, mode = reference_model(cfg, policy, adapters, device, fresh=fresh)
            with mode():
                scorer = SequenceScorer(model, cfg.scoring, ld_alpha=cfg.loss.ld_alpha)
                part = compute_reference_logps(scorer, [selected[i] for i in share],
                                               micro_batch_size=cfg.micro_batch_size, collate=collate, device=device,
                                               autocast=lambda: autocast(cfg, device),
                                               max_tokens=cfg.max_tokens_per_micro_batch, layout=layout)
            result = ReferenceLogps(torch.empty(len(selected)), torch.empty(len(selected)))
            for positions, chosen, rejected in gather([(share, part.chosen, part.rejected)], dist):
                result.chosen[positions], result.rejected[positions] = chosen, rejected
            if dist.is_main:
                save_cached(cache_file, result)
        reference[split] = result.spread(ids, len(pairs))
        log(f"reference log-probs of {len(ids)} {split} pairs (of {len(pairs)}): {'cached' if cached else 'computed'}")
    return reference


@dataclass
class TrainState:
    """What a training step reads and changes; `save` checkpoints everything here but the models."""

    cfg: TrainSettings
    device: torch.device
    dist: DistInfo
    policy: nn.Module  # the causal LM being trained
    scorer: nn.Module  # SequenceScorer(policy), wrapped by DDP / FSDP under torchrun
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    collate: Callable[[list[TokenizedPair]], dict[str, torch.Tensor]]
    adapters: Adapters | None = None  # under LoRA
    reference_scorer: SequenceScorer | None = None  # the frozen reference, when its log-probs are not precomputed
    reference_mode: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext  # to run it in
    loss_state: dict = field(default_factory=dict)
    health: HealthMonitor = field(default_factory=HealthMonitor)  # the run's alerts; the step-0 check stops here
    reference_checked: bool = False  # the step-0 check ran (at the first step with pairs, before any update)
    layout: str = "padded"  # what `collate` lays out: the cost of a micro-batch under a token budget (padded: the
    # largest, so a budget is never exceeded when the layout is not given)
    flops: FlopCounter | None = None  # the useful FLOPs of a step, for its MFU
    peak_tflops: float | None = None  # the device's dense peak in this precision (None: unknown, no MFU)
    step: int = 0
    skipped_steps: int = 0
    overflow_steps: int = 0  # of the skipped steps, those the fp16 GradScaler skipped: the schedule waits on them
    data: dict | None = None  # training_data: what the steps train on, checked when a checkpoint is resumed
    model_identity: dict | None = None  # content_identity of --model and --adapter, checked likewise


def build_state(cfg: TrainSettings, policy: nn.Module, adapters: Adapters | None = None, *, device: torch.device,
                dist: DistInfo, collate: Callable, workspace_pairs: list[TokenizedPair],
                resume: dict[str, Any] | None = None, layout: str = "padded",
                on_alert: Callable[[Alert], None] | None = None, decay_all: bool = False) -> TrainState:
    """Scorer, optimizer (of the trainable parameters: the adapters under LoRA) and GradScaler around `policy`;
    the reference when its log-probs are computed at step time; the health monitor, whose alerts go to
    `on_alert`; the resumed optimizer, scaler, RNG, loss state and health checks. `decay_all`: weight decay on
    every parameter, biases and norms too (dpo.optim.decays_every_parameter)."""
    policy_scorer = SequenceScorer(policy, cfg.scoring, with_wpo=cfg.loss.use_weighting, with_stats=True,
                                   ld_alpha=cfg.loss.ld_alpha)
    if cfg.compile:  # after the scorer's check of the head, whose few tokens would be one more shape to compile
        decoder_body(policy).compile()
    policy_scorer.reserve_workspace(workspace_pairs, cfg.micro_batch_size, cfg.max_tokens_per_micro_batch)
    precision = resolve_precision(cfg.precision, device)
    scorer = wrap_model(policy_scorer, dist, fsdp=cfg.fsdp, device=device, param_dtype=AUTOCAST_DTYPES[precision])
    # the fused kernel updates every parameter in one pass instead of a loop over tensors
    optimizer = build_optimizer(cfg.optimizer, [p for p in policy.parameters() if p.requires_grad], lr=cfg.lr,
                                betas=cfg.adam_betas, weight_decay=cfg.weight_decay,
                                fused=device.type in ("cpu", "cuda") and not cfg.fsdp, decay_all=decay_all)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    state = TrainState(cfg, device, dist, policy, scorer, optimizer, scaler, collate, adapters,
                       health=HealthMonitor(cfg.health, cfg.health_window, emit=on_alert), layout=layout,
                       flops=FlopCounter.of(policy),
                       peak_tflops=peak_tflops(device, precision, cfg.peak_tflops))
    step_time = cfg.on_policy.online or cfg.sync_ref_model or (not cfg.precompute_ref and not cfg.on_policy.iterations)
    if needs_reference_model(cfg.loss) and step_time:  # iterative DPO precomputes each round's reference
        # TR-DPO resumes with the reference its checkpoint kept
        weights = str(resume["reference_dir"]) if resume is not None and cfg.sync_ref_model else None
        model, state.reference_mode = reference_model(cfg, policy, adapters, device, fresh=True, weights=weights)
        state.reference_scorer = SequenceScorer(model, cfg.scoring, ld_alpha=cfg.loss.ld_alpha)
    if resume is not None:
        load_full_optimizer_state(scorer, optimizer, resume.pop("optimizer"))  # copied: the mapped file let go
        if scaler is not None and resume["scaler"]:
            scaler.load_state_dict(resume["scaler"])
        set_rng_state(process_rng_state(resume, dist.rank, dist.world_size))
        state.loss_state = resume["loss_state"]
        state.step = resume["trainer_state"]["step"]
        state.skipped_steps = resume["trainer_state"].get("skipped_steps", 0)
        state.overflow_steps = resume["trainer_state"].get("overflow_steps", 0)
        state.health.load_state_dict(resume["trainer_state"].get("health", {}))  # windows and raised alerts go on
        state.reference_checked = True  # checked before the checkpoint's first update
    return state


# ---------------------------------------------------------------------------------------------------- the step


def score_pairs(state: TrainState, pairs: list[TokenizedPair], ids: list[int],
                reference: ReferenceLogps | None) -> PreferenceLogps:
    """Policy log-probs of pairs[ids] (one micro-batch of the step's batch `pairs`) and the reference's, as the
    loss reads them."""
    batch = {k: v.to(state.device) for k, v in state.collate([pairs[i] for i in ids]).items()}
    n = len(ids)
    policy = state.scorer(batch)
    ref_chosen = ref_rejected = None
    if reference is not None:
        ref_chosen, ref_rejected = reference.take(ids, state.device)
    elif state.reference_scorer is not None:
        with torch.no_grad(), state.reference_mode():
            ref = state.reference_scorer(batch)
        ref_chosen, ref_rejected = ref.sum[:n], ref.sum[n:]
        ReferenceLogps(ref_chosen.detach(), ref_rejected.detach()).require_finite(f"step {state.step + 1}")
    wpo = policy.wpo
    chosen_length = sum(len(p.chosen_ids) for p in pairs) / max(len(pairs), 1)  # the whole step's, as the loss reads
    return PreferenceLogps(
        policy_chosen_logps=policy.sum[:n], policy_rejected_logps=policy.sum[n:],
        reference_chosen_logps=ref_chosen, reference_rejected_logps=ref_rejected,
        chosen_lengths=policy.count[:n], rejected_lengths=policy.count[n:],
        batch_chosen_length=torch.full((n,), chosen_length, device=state.device),
        chosen_wpo_logps=None if wpo is None else wpo[:n], rejected_wpo_logps=None if wpo is None else wpo[n:],
        policy_chosen_nll_logps=None if policy.unweighted_sum is None else policy.unweighted_sum[:n],
        policy_chosen_logits=policy.logits[:n], policy_rejected_logits=policy.logits[n:],
        policy_chosen_entropy=policy.entropy[:n], policy_rejected_entropy=policy.entropy[n:],
        policy_chosen_top1=policy.top1[:n], state=state.loss_state)


def train_step(state: TrainState, batch: PairBatch, lr: float) -> dict[str, Any]:
    """One optimizer step on the global batch `batch` (every process passes the same one); returns the step's
    metrics (the same on every process).

    This process takes its slice of the batch in micro-batches; each micro-batch's summed loss is divided by the
    global batch size before backward, so the accumulated gradient is the mean over the batch whatever the split.
    """
    cfg, dist, device = state.cfg, state.dist, state.device
    if not len(batch):  # online DPO when every prompt's samples tie: the judge has nothing to teach this step
        state.step, state.skipped_steps = state.step + 1, state.skipped_steps + 1
        sync_reference(state)
        return {"lr": lr, "pairs_per_s": 0.0, "tokens_per_s": 0.0, "skipped_steps": state.skipped_steps}
    start = synced_clock(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    stats, check = PairMetrics(device), ReferenceStartCheck(state)
    state_sums, tokens, flops = None, 0, 0.0
    # every process runs the same number of passes; a pass that is not `counted` has weight 0 (dpo.batches)
    chunks = process_micro_batches(batch.pairs, dist.rank, dist.world_size, cfg.micro_batch_size, cfg.group_by_length,
                                   cfg.max_tokens_per_micro_batch, state.layout)
    for k, (ids, counted) in enumerate(chunks):
        with no_sync(state.scorer, sync=k == len(chunks) - 1):
            with autocast(cfg, device):
                logps = score_pairs(state, batch.pairs, ids, batch.reference)
                out = compute_loss(logps, cfg.loss)
            # sum over this process's pairs / global batch; DDP averages over processes, hence x world size
            loss = out.losses.sum() * (dist.world_size / len(batch) if counted else 0.0)
            (state.scaler.scale(loss) if state.scaler else loss).backward()
        if not counted:
            continue
        stats.add(out, logps)
        check.add(logps)
        state_sums = out.state_sums if state_sums is None else state_sums + out.state_sums
        chunk = [batch.pairs[i] for i in ids]
        tokens += sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in chunk)
        if state.flops is not None:
            flops += state.flops.pairs(chunk, reference_forward=state.reference_scorer is not None)
    state_sums = torch.zeros_like(out.state_sums) if state_sums is None else state_sums  # no pairs here
    totals = all_reduce_sum(torch.cat([stats.sums, state_sums, stats.sums.new_tensor([tokens, flops, check.count])]),
                            dist)
    stats.sums.copy_(totals[:len(stats.sums)])
    state_sums, tokens, flops = totals[len(stats.sums):-3], totals[-3].item(), totals[-2].item()
    check.finish(int(totals[-1].item()), stats.num_pairs)
    grad_norm, stepped = apply_gradients(state, stats.means()["loss"])
    if stepped:  # the losses' state moves with the steps the optimizer takes
        update_loss_state(cfg.loss, state.loss_state, state_sums)
    state.step += 1
    sync_reference(state)
    return step_record(state, stats, lr, grad_norm, tokens, flops, synced_clock(device) - start)


def synced_reference_bytes(cfg: TrainSettings, policy: nn.Module, device: torch.device) -> int:
    """What a TR-DPO reference adds to each checkpoint: every weight in the dtype load_model gives a frozen model
    (0 without --sync-ref-model)."""
    if not cfg.sync_ref_model:
        return 0
    dtype = frozen_dtype(resolve_precision(cfg.precision, device))
    return sum(p.numel() for p in policy.parameters()) * dtype.itemsize


def sync_reference(state: TrainState) -> None:
    """TR-DPO (--sync-ref-model): after every --ref-model-sync-steps-th step the reference moves toward the policy
    (dpo.reference_sync); the same on every process, whose policies are the same."""
    cfg = state.cfg
    if cfg.sync_ref_model and sync_due(state.step, cfg.ref_model_sync_steps):
        mix_into_reference(state.reference_scorer.model, state.policy, cfg.ref_model_mixup_alpha)


class ReferenceStartCheck:
    """The step-0 check: before any update the policy's log-probs must equal the reference's (they differ by
    rounding only: the reference pass ran in other batch shapes, maybe another layout). A pair beyond 1e-3 +
    LOGP_TOLERANCE x |log-prob| (by the precision the matmuls compute in) stops the run: the reference is not
    the policy's starting point. Runs at the first step with reference log-probs, and never after it."""

    def __init__(self, state: TrainState):
        self.state, self.count, self.largest = state, 0, 0.0
        self.tolerance = LOGP_TOLERANCE[matmul_precision(resolve_precision(state.cfg.precision, state.device),
                                                          state.device)]

    def add(self, x: PreferenceLogps) -> None:
        """Count the micro-batch's pairs whose policy and reference log-probs differ beyond rounding."""
        if self.state.reference_checked or x.reference_chosen_logps is None:
            return
        diffs = torch.stack([(x.policy_chosen_logps - x.reference_chosen_logps).abs(),
                             (x.policy_rejected_logps - x.reference_rejected_logps).abs()]).detach().float()
        scale = torch.stack([x.reference_chosen_logps, x.reference_rejected_logps]).detach().float().abs()
        self.count += int((diffs > 1e-3 + self.tolerance * scale).any(dim=0).sum())
        self.largest = max(self.largest, float(diffs.max()) if diffs.numel() else 0.0)

    def finish(self, mismatched: int, num_pairs: int) -> None:
        """With the count over every process: stop the run (through the health monitor) if any pair differed."""
        self.state.reference_checked = True
        if mismatched:
            self.state.health.stop("reference_mismatch", self.state.step + 1, (
                f"before any update the policy's log-probs must equal the reference's, but {mismatched} of "
                f"{num_pairs} pairs differ (by up to {self.largest:.3g} nats here): the reference is not the policy's "
                "starting point. Check --model and --adapter (and a reference_cache/ copied from another run), that "
                "dropout is off, and that the reference pass and training render prompts alike"))


def apply_gradients(state: TrainState, step_loss: float) -> tuple[torch.Tensor, bool]:
    """Unscale (fp16), clip to --max-grad-norm, and step the optimizer unless the step is skipped: a non-finite loss
    or gradient norm stops the run (--on-nan stop) or skips the step; in fp16 the GradScaler skips an overflowing
    step. Returns (the gradient norm before clipping, whether the optimizer stepped)."""
    cfg = state.cfg
    if state.scaler is not None:
        state.scaler.unscale_(state.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(state.policy.parameters(), cfg.max_grad_norm or float("inf"))
    # a finite loss can still have a gradient that is not: clipping spreads it to every parameter
    bad = not math.isfinite(step_loss) or (state.scaler is None and not bool(torch.isfinite(grad_norm)))
    finite = not broadcast_flag(bad, state.dist, state.device)
    stepped = True
    if not finite and state.scaler is None:
        if cfg.on_nan == "stop":
            what = (f"loss is {step_loss}" if not math.isfinite(step_loss) else
                    f"gradient norm is {float(grad_norm)} (the loss {step_loss:.4g})")
            raise TrainingError(f"step {state.step + 1}: {what} (not finite); stopping. "
                                f"{last_good_checkpoint(cfg)}; lower --lr or use --on-nan skip")
        stepped = False
    elif state.scaler is not None:
        scale_before = state.scaler.get_scale()
        state.scaler.step(state.optimizer)  # skipped by the scaler when a gradient overflowed
        state.scaler.update()
        stepped = state.scaler.get_scale() >= scale_before
        state.overflow_steps += int(not stepped)
    else:
        state.optimizer.step()
    state.optimizer.zero_grad(set_to_none=True)
    state.skipped_steps += int(not stepped)
    return grad_norm, stepped


def step_record(state: TrainState, stats: PairMetrics, lr: float, grad_norm: torch.Tensor, tokens: float,
                flops: float, elapsed: float) -> dict[str, Any]:
    """A step's logged metrics: the pairs' loss and rewards, lr, gradient norm, speed, MFU, CUDA peak memory."""
    record = {**stats.means(), "lr": lr, "grad_norm": float(grad_norm), "pairs_per_s": stats.num_pairs / elapsed,
              "tokens_per_s": tokens / elapsed, "skipped_steps": state.skipped_steps}
    if state.peak_tflops:  # useful FLOPs of all processes over their time and their peak
        record["mfu"] = flops / elapsed / (state.peak_tflops * 1e12 * state.dist.world_size)
    if state.device.type == "cuda":
        record["cuda_peak_memory_gb"] = torch.cuda.max_memory_allocated(state.device) / 1e9
    if state.scaler is not None:
        record["loss_scale"] = state.scaler.get_scale()
    return record


@torch.no_grad()
def evaluate_pairs(state: TrainState, batch: PairBatch) -> dict[str, Any]:
    """Mean loss and reward metrics over the held-out pairs (every process runs the same number of forwards,
    as DDP / FSDP forwards are collective; a process short of a micro-batch re-scores the first and drops it)."""
    cfg, dist = state.cfg, state.dist
    state.scorer.eval()
    stats = PairMetrics(state.device)
    chunks = micro_batches(range(len(batch)), batch.pairs, cfg.micro_batch_size, cfg.group_by_length,
                           cfg.max_tokens_per_micro_batch, state.layout)
    for round_start in range(0, len(chunks), dist.world_size):
        index = round_start + dist.rank
        ids = chunks[index] if index < len(chunks) else chunks[0]
        with autocast(cfg, state.device):
            logps = score_pairs(state, batch.pairs, ids, batch.reference)
            out = compute_loss(logps, cfg.loss)
        if index < len(chunks):
            stats.add(out, logps)
    state.scorer.train()
    all_reduce_sum(stats.sums, dist)
    return {**stats.means(), "pairs": stats.num_pairs}


def build_win_rate_eval(cfg: TrainSettings, policy: nn.Module, adapters: Adapters | None, tokenizer: Any, *,
                    device: torch.device, dist: DistInfo, resumed: bool,
                    log: Callable[..., None]) -> WinRateEval | None:
    """--eval-generate: the judge, its prompts and the reference's answers, generated before the first update (by
    the policy, which is the reference then; under LoRA with the adapters off) and cached. Main process only."""
    if not cfg.eval_generate:
        return None
    sampler = None
    if dist.is_main:
        sampler = WinRateEval.build(cfg, tokenizer, device)
        identity = model_identity(resolve_model_path(cfg.model), cfg.lora.adapter)
        made = sampler.prepare_reference(json.dumps(identity, sort_keys=True),
                                         lambda: reference_model(cfg, policy, adapters, device, fresh=resumed))
        log(f"--eval-generate: {len(sampler.prompts)} prompts judged by {sampler.judge.name}, reference answers "
            f"{'generated' if made else 'cached'}")
    barrier(dist)
    return sampler


def evaluate_policy(state: TrainState, batch: PairBatch, sampler: WinRateEval | None, trackers: Any) -> dict:
    """An evaluation: the held-out pairs' metrics (every process) and, with --eval-generate, the policy's win rate
    against the reference (the main process samples; its samples table goes to the trackers)."""
    record = evaluate_pairs(state, batch) if len(batch) else {}
    if sampler is not None:
        sampled, rows = sampler.run(state.policy)
        record.update(sampled)
        trackers.log_table(state.step, "samples", SAMPLE_COLUMNS, rows)
    if state.cfg.eval_generate:
        barrier(state.dist)
    return record


def eval_line(record: dict[str, Any]) -> str:
    """An evaluation as one printed line: loss, reward accuracy and margin, and the win rate when sampled."""
    line = (f"step {record['step']}: eval loss {record['loss']:.4f}, reward accuracy "
            f"{record['rewards/accuracies']:.3f}, margin {record['rewards/margins']:.3f}") if "loss" in record \
        else f"step {record['step']}:"
    if "generate/win_rate" in record:
        line += (f"; win rate vs reference {record['generate/win_rate']:.3f} [{record['generate/win_rate_low']:.3f}, "
                 f"{record['generate/win_rate_high']:.3f}]")
    return line


# ---------------------------------------------------------------------------------------------------- saving


def save_weights(state: TrainState, directory: Path, weights: dict[str, torch.Tensor]) -> None:
    """The policy as save_pretrained writes it (its config's dropout as loaded), or under LoRA its trained adapter
    only."""
    if state.adapters is not None:
        state.adapters.save(directory, weights)
    else:
        with dropout_as_loaded(state.policy):
            state.policy.save_pretrained(directory, state_dict=weights)


def save_reference(reference: nn.Module, directory: Path) -> None:
    """--sync-ref-model's moved reference, as save_pretrained writes it (its config's dropout as loaded)."""
    with dropout_as_loaded(reference):
        reference.save_pretrained(directory)


@contextlib.contextmanager
def checkpoint_named(cfg: TrainSettings) -> Iterator[None]:
    """metrics.jsonl that cannot be written (a full disk) stops the run in one line naming the checkpoint it leaves."""
    try:
        yield
    except MetricsWriteError as error:
        raise MetricsWriteError(f"{error}; {last_good_checkpoint(cfg)}") from None


def write_run_config(out_dir: Path, run_config: dict[str, Any]) -> None:
    """run_config.json, whole or not at all (a resumed run writes it again); a full disk is one line."""
    path = out_dir / "run_config.json"
    try:
        write_text_atomically(path, json.dumps(run_config, indent=2))
    except OSError as error:
        raise CheckpointError(f"{path} cannot be written ({first_line(error)})") from None


def last_good_checkpoint(cfg: TrainSettings) -> str:
    """Where a stopped run can resume from, for its error message."""
    path = latest_checkpoint(Path(cfg.output_dir))
    return f"The last good checkpoint, {path}, is intact" if path else "No checkpoint was saved before it"


def observe_health(state: TrainState, record: dict[str, Any]) -> None:
    """The health checks on a metrics record; a --health strict stop says which checkpoint the run leaves."""
    try:
        state.health.observe(record)
    except HealthError as error:
        raise HealthError(f"{error}. {last_good_checkpoint(state.cfg)}") from None


def refuse_non_finite(state: TrainState, weights: dict[str, torch.Tensor], what: str) -> None:
    """Stop every process before `what` is written from weights that hold NaN or inf: a checkpoint or final/ never
    does (the loss of the last step can be finite while the update it made is not)."""
    bad = next((name for name, tensor in weights.items()
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())), None)
    if broadcast_flag(bad is not None, state.dist, state.device):
        raise TrainingError(f"step {state.step}: the weights are not finite ({bad or 'on another process'}), so "
                            f"{what} is not written. {last_good_checkpoint(state.cfg)}; lower --lr or keep "
                            "--max-grad-norm")


def saved_bytes(tokenizer: Any) -> int:
    """What the tokenizer's files take on disk, as each checkpoint and final/ hold them."""
    with tempfile.TemporaryDirectory() as directory:
        tokenizer.save_pretrained(directory)
        return sum(file.stat().st_size for file in Path(directory).rglob("*") if file.is_file())


def card_decoding(model: nn.Module, tokenizer: Any) -> dict[str, Any]:
    """The card's decoding (temperature, top-p) as a generation config holds it, with the tokenizer's pad id and
    every EOS the model stops at (the tokenizer's and those its generation config lists)."""
    # top_k=0: transformers would fill an unset top-k with 50, which the card's decoding does not have
    stop = model_eos_ids(model, tokenizer)
    return dict(do_sample=True, temperature=TEMPERATURE, top_p=TOP_P, top_k=0, pad_token_id=tokenizer.pad_token_id,
                eos_token_id=stop[0] if len(stop) == 1 else stop)


def save_usable_policy(state: TrainState, directory: Path, weights: dict[str, torch.Tensor], tokenizer: Any,
                       run_config: dict[str, Any]) -> None:
    """The policy (or its adapter) as generate.py and dpo.evaluate load it, final/'s or a checkpoint's model/: with
    the card's decoding defaults, its tokenizer and the run's settings (dpo_run.json). The live policy's generation
    config is left as it was (online sampling and --eval-generate read its EOS ids)."""
    live = state.policy.generation_config
    state.policy.generation_config = copy.deepcopy(live)
    state.policy.generation_config.update(**card_decoding(state.policy, tokenizer))
    try:
        save_weights(state, directory, weights)
    finally:
        state.policy.generation_config = live
    tokenizer.save_pretrained(directory)
    (directory / RUN_SETTINGS_FILE).write_text(json.dumps(run_config, indent=2))


def save(state: TrainState, total_steps: int, tokenizer: Any, run_config: dict[str, Any]) -> Path | None:
    """checkpoint-<step>/ in --output-dir (collective under torchrun; the main process writes). Under LoRA it
    holds the adapter and its optimizer state only; under --sync-ref-model also the reference. Its model/ is
    usable as final/ is (save_usable_policy)."""
    weights = full_model_state(state.scorer, trainable_only=state.adapters is not None)
    refuse_non_finite(state, weights, f"checkpoint-{state.step}")
    optimizer_state = full_optimizer_state(state.scorer, state.optimizer)
    rng_per_process = gather([rng_state()], state.dist)  # each process's own: their dropout draws differ
    path = None
    reference = state.reference_scorer.model if state.cfg.sync_ref_model else None  # TR-DPO's moves: kept
    if state.dist.is_main:
        path = save_checkpoint(
            Path(state.cfg.output_dir), state.step,
            save_model=lambda directory: save_usable_policy(state, directory, weights, tokenizer, run_config),
            save_reference=None if reference is None else lambda directory: save_reference(reference, directory),
            optimizer_state=optimizer_state, scaler_state=state.scaler.state_dict() if state.scaler else None,
            trainer_state={"total_steps": total_steps, "skipped_steps": state.skipped_steps,
                           "overflow_steps": state.overflow_steps, "layout": state.layout,
                           "settings": state.cfg.run_identity(state.dist.world_size),
                           "health": state.health.state_dict(),
                           "data": state.data, "model": state.model_identity},
            loss_state=state.loss_state, keep=state.cfg.save_total_limit, rng_per_process=rng_per_process)
    barrier(state.dist)
    return path


def save_final(state: TrainState, tokenizer: Any, run_config: dict[str, Any]) -> None:
    """final/: the policy with the card's decoding defaults, its tokenizer and the run's settings (collective).
    Under LoRA a peft adapter directory, and with --merge-lora final/merged/, the base with the adapter merged."""
    weights = full_model_state(state.scorer, trainable_only=state.adapters is not None)
    refuse_non_finite(state, weights, "final/")
    if not state.dist.is_main:
        return
    out_dir = Path(state.cfg.output_dir)
    final_dir, tmp_dir = out_dir / "final", out_dir / "final.tmp"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    with removed_if_unwritable(tmp_dir, "final/", out_dir):  # a full disk: one line, checkpoints untouched
        save_usable_policy(state, tmp_dir, weights, tokenizer, run_config)
        if state.adapters is not None and state.cfg.lora.merge_lora:
            merged = load_causal_lm(str(tmp_dir))  # the base, loaded again on the CPU, with the adapter merged in
            merged.generation_config.update(**card_decoding(state.policy, tokenizer))
            merged.save_pretrained(tmp_dir / "merged")
            tokenizer.save_pretrained(tmp_dir / "merged")
            # the run's template and prompt budget, and its reference (the base) for dpo.evaluate
            shutil.copyfile(tmp_dir / RUN_SETTINGS_FILE, tmp_dir / "merged" / RUN_SETTINGS_FILE)
        publish(tmp_dir, final_dir)  # its fsync can be where a full disk (NFS, a quota) shows


class StopRequest:
    """SIGINT / SIGTERM while training: finish the step, checkpoint, exit cleanly (handlers restored after)."""

    def __enter__(self) -> "StopRequest":
        self.signal_name: str | None = None
        self._previous = {s: signal.signal(s, self._request) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _request(self, signum: int, frame: Any) -> None:
        self.signal_name = signal.Signals(signum).name

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class ProgressBar:
    """The main process's tqdm bar with the step's loss, reward accuracy and margin; without it, `write` logs."""

    def __init__(self, enabled: bool, total: int, initial: int, log: Callable[..., None] = print):
        self.bar, self.log = None, log
        if enabled:
            self.bar = tqdm(total=total, initial=initial, desc="dpo", dynamic_ncols=True)

    def step(self, record: dict[str, Any]) -> None:
        """Advance one step, showing its loss, reward accuracy and margin."""
        if self.bar is not None:
            self.bar.update(1)
            if "loss" in record:  # a step without pairs (online DPO, every sample tied) has no loss
                self.bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['rewards/accuracies']:.2f}",
                                     margin=f"{record['rewards/margins']:.3f}")

    def write(self, text: str) -> None:
        """Print a line above the bar (or log it without one)."""
        if self.bar is not None:
            self.bar.write(text)
        else:
            self.log(text)

    def close(self) -> None:
        """Close the bar."""
        if self.bar is not None:
            self.bar.close()


def finish(state: TrainState, tokenizer: Any, run_config: dict[str, Any], last: dict[str, Any],
           evaluation: dict[str, Any], log: Callable[..., None]) -> None:
    """After the last step: final/, the training curves (--plot) and the summary table."""
    cfg, out_dir = state.cfg, Path(state.cfg.output_dir)
    save_final(state, tokenizer, run_config)
    records = read_metrics(out_dir / "metrics.jsonl")
    if state.dist.is_main and cfg.plot:
        plot_training_curves(records, out_dir / "training_curves.png", title=f"DPO {cfg.loss.loss_type} beta {cfg.loss.beta}")
    history = [r for r in records if r.get("split") == "train"]
    log(summary(history[0] if history else last, last, evaluation, out_dir, state.skipped_steps))


def summary(first: dict, last: dict, evaluation: dict, out_dir: Path, skipped: int) -> str:
    """The table printed at the end: the first and last logged steps' and the last evaluation's metrics, and the
    outputs; each step's column is headed by its number (with --log-steps N the first logged step is N)."""
    steps = [f"step {record['step']}" if "step" in record else "-" for record in (first, last)]
    lines = ["", f"{'':24}{steps[0]:>12}{steps[1]:>12}{'eval':>12}"]
    for key in ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected",
                "generate/win_rate"):
        if key.startswith("generate/") and key not in evaluation:
            continue
        cells = [first.get(key), last.get(key), evaluation.get(key)]
        lines.append(f"{key:24}" + "".join(f"{c:12.4f}" if isinstance(c, float) else f"{'-':>12}" for c in cells))
    if skipped:
        lines.append(f"skipped steps (no pair to train on, an overflow or a non-finite loss): {skipped}")
    lines.append(f"model: {out_dir / 'final'}   metrics: {out_dir / 'metrics.jsonl'}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    """A training run from command-line arguments (train.py's flags); returns the exit status."""
    cfg = parse_settings(argv)  # checked: also that the loss resolves and the libraries it names are installed
    transformers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()
    device, dist = start_processes(cfg)
    try:
        run_training(cfg, device, dist)
        gc.collect()
        barrier(dist)
    except Exception as error:
        # a process that stops with its one-line error (the main one checking the output directory or writing
        # checkpoints, any one judging its share of online samples) fails the others' next collective: their
        # tracebacks would bury that line
        if dist.enabled and peer_stopped(error):
            raise PeerStoppedError(f"process {dist.rank} stopped because another process did (its error is "
                                   "above)") from None
        raise
    finally:
        # The wrapped model keeps the process group alive through reference cycles. Collect them while the
        # interpreter is whole, and take the group down on the error path too: left to its shutdown, gloo's threads
        # can abort a process (SIGABRT) that has finished its work.
        gc.collect()
        shutdown_distributed()
    return 0


def run_training(cfg: TrainSettings, device: torch.device, dist: DistInfo) -> None:
    """The run itself, top to bottom: data, models, reference log-probs, the loop, final/. Its models and
    optimizer live in this frame only, so they are gone when it returns."""
    cfg.precision = resolve_precision(cfg.precision, device)  # what ran is recorded, checked on resume and cached
    log = print if dist.is_main else (lambda *args, **kwargs: None)
    if batch_coupled(cfg.loss):
        log(f"note: --loss {cfg.loss.loss_type} compares the pairs of each micro-batch, so its result depends on "
            "--micro-batch-size, --group-by-length, --max-tokens-per-micro-batch (and under it --layout) and the "
            "number of processes")
    out_dir = Path(cfg.output_dir)
    progress: ProgressBar | None = None  # the loop's, once it starts
    resume, replaced = open_run_dir(cfg, dist, log)
    with replacing(replaced, log):  # a bad input restores the run --overwrite replaces
        torch.manual_seed(cfg.seed)

        # ------------------------------------------------ data, models, and what the steps train on
        tokenizer = load_tokenizer(cfg.model)
        data = load_preference_pairs(cfg, tokenizer, log=log)
        state_data = training_data(cfg, data)
        check_resumed_data(resume, state_data)
        policy, adapters = build_policy(cfg, device, weights=str(resume["model_dir"]) if resume else None)
        # after the load, which fetches a hub model: its snapshot is then known
        state_model = content_identity(model_identity(resolve_model_path(cfg.model), cfg.lora.adapter))
        check_resumed_model(cfg, resume, state_model)
        if cfg.lora.adapter is not None and (note := adapter_base_note(cfg.lora.adapter, policy)) is not None:
            log(note)
        check_positions(cfg, data, policy)
        check_vocabulary(cfg, data, policy, tokenizer)
        if dist.is_main:
            check_disk_space(out_dir, policy, merged=cfg.lora.merge_lora or adapters is None,
                             keep=cfg.save_total_limit, reference_bytes=synced_reference_bytes(cfg, policy, device),
                             files_bytes=saved_bytes(tokenizer))
        layout, collate = collator(cfg, tokenizer.pad_token_id, policy)
        check_resumed_layout(cfg, resume, layout)
        source = pair_source(cfg, data, tokenizer, policy, adapters, collate, device, log, layout)
        total_steps = run_length(cfg, source.steps_per_epoch)
        check_stop_step(cfg.stop_at_step, resume["trainer_state"]["step"] if resume else 0, total_steps)
        used = source.used_ids(total_steps)

        # ------------------------------------------------ reference log-probs, the run's record, optimizer
        reference = reference_logps(cfg, policy, adapters, data, used, device=device, dist=dist, collate=collate,
                                    resumed=resume is not None, log=log, layout=layout)
        win_rate = build_win_rate_eval(cfg, policy, adapters, tokenizer, device=device, dist=dist,
                                       resumed=resume is not None, log=log)
        starting_model = cfg.lora.adapter or cfg.model
        run_config = {**cfg.to_dict(), "reference_model": starting_model,
                      "reference_model_path": local_model_path(starting_model), "total_steps": total_steps,
                      "steps_per_epoch": source.steps_per_epoch, "world_size": dist.world_size,
                      "accumulation_steps": cfg.batch_size // (cfg.micro_batch_size * dist.world_size),
                      "dataset_path": dataset_path(cfg.dataset), "held_out_digest": data.held_out_digest,
                      "held_out_by": HELD_OUT_BY if data.held_out_digest is not None else None}
        if dist.is_main:
            write_run_config(out_dir, run_config)
        first_step = resume["trainer_state"]["step"] if resume else 0
        trackers = open_trackers(cfg.report_to, out_dir, out_dir.name, run_config, first_step, enabled=dist.is_main)

        def alert(event: Alert) -> None:
            if not event.stops:  # one that stops the run is its error line; above the progress bar once it runs
                (progress.write if progress is not None else log)(str(event))
            trackers.log_event(event.step, event.name, event.message)

        trainable = [p for p in policy.parameters() if p.requires_grad]
        decay_all = resume is not None and decays_every_parameter(resume["optimizer"], trainable)
        if decay_all:
            log(f"--resume: checkpoint-{resume['trainer_state']['step']} decays biases and norms as well (written "
                "before they were left out of weight decay); the run goes on as it began")
        state = build_state(cfg, policy, adapters, device=device, dist=dist, collate=collate, on_alert=alert,
                            workspace_pairs=[data.train[i] for i in used], resume=resume, layout=layout,
                            decay_all=decay_all)
        state.data, state.model_identity = state_data, state_model
        if resume:
            log(f"resumed from checkpoint-{state.step} (step {state.step} of {total_steps})")

    # ------------------------------------------------ the loop
    pairs = f"{len(data.instructions)} instructions" if cfg.on_policy.enabled else f"{len(data.train)} pairs"
    log(f"training {total_steps} steps: {pairs}, batch {cfg.batch_size} = micro "
        f"{cfg.micro_batch_size} x accumulation {run_config['accumulation_steps']} x processes {dist.world_size}, "
        f"{layout} layout, {cfg.precision} on {device}")
    if cfg.sync_ref_model:
        log(f"TR-DPO: the reference, a model of its own scored at step time, becomes {cfg.ref_model_mixup_alpha:g} x "
            f"policy + {1 - cfg.ref_model_mixup_alpha:g} x reference every {cfg.ref_model_sync_steps} steps")
    progress = ProgressBar(dist.is_main and cfg.progress, total_steps, state.step, log)
    eval_batch = PairBatch(data.eval, reference["eval"])
    train_record: dict = {}
    eval_record: dict = {}
    with trackers, StopRequest() as stop, checkpoint_named(cfg):
        while state.step < total_steps:
            # a step the fp16 GradScaler skipped leaves the schedule where it was, as in transformers' Trainer
            lr = lr_at(state.step - state.overflow_steps, total_steps=total_steps, peak_lr=cfg.lr,
                       warmup_ratio=cfg.warmup_ratio, min_lr_ratio=cfg.min_lr_ratio)
            try:
                batch = source.step_batch(state.step, reference["train"], state.policy, dist)
                started = time.perf_counter()
                step_metrics = {**batch.metrics, **train_step(state, batch, lr)}
                if batch.metrics:  # online / iterative DPO: sampling time beside training time
                    step_metrics["online/train_s"] = time.perf_counter() - started
            except TrainingError as error:
                trackers.log({"split": "train", "step": state.step + 1, "error": str(error)})
                raise
            epoch = round(state.step / source.steps_per_epoch, 4)
            train_record = {"split": "train", "step": state.step, "epoch": epoch, **step_metrics}
            if state.step % cfg.log_steps == 0 or state.step == total_steps:
                trackers.log(train_record)
            progress.step(train_record)
            observe_health(state, train_record)
            if (cfg.eval_steps and state.step % cfg.eval_steps == 0) or state.step == total_steps:
                if record := evaluate_policy(state, eval_batch, win_rate, trackers):
                    eval_record = {"split": "eval", "step": state.step, "epoch": epoch, **record}
                    trackers.log(eval_record)
                    progress.write(eval_line(eval_record))
                    if cfg.on_nan == "stop" and not math.isfinite(eval_record.get("loss", 0.0)):
                        raise TrainingError(f"step {state.step}: the held-out loss is {eval_record['loss']} (not "
                                            f"finite); stopping. {last_good_checkpoint(cfg)}; lower --lr or use "
                                            "--on-nan skip")
                    observe_health(state, eval_record)
            # a signal at the last step lets the run finish: final/ is written, no checkpoint to resume from
            stop_now = broadcast_flag(stop.signal_name is not None, dist, device) and state.step < total_steps
            planned_stop = cfg.stop_at_step == state.step and state.step < total_steps
            if (cfg.save_steps and state.step % cfg.save_steps == 0 and state.step < total_steps) or stop_now \
                    or planned_stop:
                progress.write(f"saved {save(state, total_steps, tokenizer, run_config)}")
            if stop_now or planned_stop:
                reason = f"{stop.signal_name or 'a signal'} received" if stop_now else f"--stop-at-step {state.step}"
                progress.write(f"{reason}: checkpoint saved at step {state.step}; continue with --resume")
                break
        progress.close()
        if state.step == total_steps:
            finish(state, tokenizer, run_config, train_record, eval_record, log)


def cli(argv: list[str] | None = None) -> int:
    """The command line: main with the allocator tuned first (dpo.memory) and a one-line error for bad input."""
    tune_cpu_allocator()
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
