"""DPO training, the whole loop in one file.

    python train.py                                   # the embedded demo: tiny SFT model, synthetic preferences
    python train.py --config configs/phi2_ultrafeedback.json    # the phi-2-dpo recipe
    torchrun --nproc_per_node 4 train.py --config ...           # DDP (add --fsdp to shard)

`python train.py --help` lists every setting. Outputs in --output-dir: metrics.jsonl, checkpoint-<step>/,
final/ (save_pretrained format with the tokenizer), run_config.json and training_curves.png.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import shutil
import signal
import sys
import time
from pathlib import Path

from dpo.memory import tune_cpu_allocator

# keep freed CPU memory for reuse instead of faulting in fresh pages every micro-batch (see dpo/memory.py);
# it has to happen before torch is imported
tune_cpu_allocator()

import huggingface_hub  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from dpo.activations import fuse_gelu
from dpo.cli import run_cli
from dpo.errors import UserError
from dpo.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, set_rng_state
from dpo.config import ConfigError, TrainConfig, parse_config
from dpo.data import DataError, collate_pairs, epoch_permutation
from dpo.distributed import (all_reduce_sum, barrier, broadcast_flag, full_model_state, full_optimizer_state,
                             init_distributed, load_full_optimizer_state, no_sync, shutdown_distributed, wrap_model)
from dpo.logprobs import SequenceScorer, disable_dropout
from dpo.loss import (LossConfig, PreferenceLogps, compute_loss,
                      needs_reference_model)
from dpo.metrics import MetricsWriter, PairMetrics, read_metrics
from dpo.modeling import load_causal_lm, load_tokenizer, resolve_model_path
from dpo.packing import collate_packed, collate_shared_prompt, group_by_length
from dpo.pipeline import check_disk_space, load_preference_pairs, prepare_output_dir
from dpo.reference import ReferenceLogps, cache_key, compute_reference_logps, load_or_compute
from dpo.schedule import lr_at


class TrainingError(UserError):
    """The run cannot continue (e.g. a NaN loss); the last good checkpoint is left intact."""


def loss_config_from(cfg: TrainConfig) -> LossConfig:
    return LossConfig(loss_type=cfg.loss, beta=cfg.beta, label_smoothing=cfg.label_smoothing,
                      reference_free=cfg.reference_free, rpo_alpha=cfg.rpo_alpha, f_divergence=cfg.f_divergence,
                      f_alpha=cfg.f_alpha, use_weighting=cfg.use_weighting, simpo_gamma=cfg.simpo_gamma)


def main(argv: list[str] | None = None) -> int:
    # ---------------------------------------------------------------- settings, checked before any work
    cfg = parse_config(argv)
    transformers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()
    needs_reference_model(loss_config_from(cfg))  # resolves the loss: an unknown name fails here, listing the known ones
    device = torch.device(cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    dist_info = init_distributed(device.type)
    if device.type == "cuda" and dist_info.enabled:
        device = torch.device("cuda", dist_info.local_rank)
        torch.cuda.set_device(device)
    main_process = dist_info.is_main
    log = print if main_process else (lambda *args, **kwargs: None)
    world = dist_info.world_size
    if cfg.batch_size % (cfg.micro_batch_size * world):
        raise ConfigError(f"--batch-size {cfg.batch_size} is not a multiple of --micro-batch-size x processes "
                          f"({cfg.micro_batch_size} x {world})")
    accumulation = cfg.batch_size // (cfg.micro_batch_size * world)
    out_dir = Path(cfg.output_dir)
    if main_process:
        prepare_output_dir(out_dir, resume=cfg.resume, overwrite=cfg.overwrite)
    barrier(dist_info)
    resume_from = latest_checkpoint(out_dir) if cfg.resume else None
    if cfg.resume and resume_from is None:
        log(f"--resume: no complete checkpoint in {out_dir}, starting from step 0")

    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.model)
    pad_id = tokenizer.pad_token_id

    # ---------------------------------------------------------------- data
    data = load_preference_pairs(cfg, tokenizer, log=log)
    train_pairs, eval_pairs = data.train, data.eval
    steps_per_epoch = len(train_pairs) // cfg.batch_size
    if steps_per_epoch == 0:
        raise DataError(f"{cfg.dataset}: {len(train_pairs)} usable training pairs, fewer than one batch of "
                        f"--batch-size {cfg.batch_size}")
    total_steps = cfg.max_steps or max(1, math.floor(cfg.epochs * steps_per_epoch))

    # ---------------------------------------------------------------- model, reference, optimizer
    model_path = resolve_model_path(cfg.model)
    resume_state = load_checkpoint(resume_from) if resume_from is not None else None
    policy = load_causal_lm(str(resume_state["model_dir"]) if resume_state else cfg.model, device=device)
    if main_process:
        check_disk_space(out_dir, sum(p.numel() for p in policy.parameters()), cfg.save_total_limit)
    disable_dropout(policy)
    if cfg.fused_gelu:
        fuse_gelu(policy)
    if cfg.gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    loss_config = loss_config_from(cfg)
    needs_reference = needs_reference_model(loss_config)
    scorer_kwargs = dict(completion_only=cfg.completion_only, chunk_size=cfg.logps_chunk_size,
                         fused_lm_head=cfg.fused_lm_head, recompute_softmax=cfg.recompute_softmax,
                         with_wpo=cfg.use_weighting)
    collate = {"padded": functools.partial(collate_pairs, pad_id=pad_id), "packed": collate_packed,
               "shared_prompt": collate_shared_prompt}[cfg.layout]
    amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.precision]

    def autocast():
        if amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=amp_dtype)

    reference_scorer = None
    reference_logps: dict[str, ReferenceLogps] = {}
    if needs_reference and cfg.precompute_ref:
        # At step 0 the policy is the reference: score every pair with it before any update.
        settings = {"precision": cfg.precision, "completion_only": cfg.completion_only}
        for split, pairs in (("train", train_pairs), ("eval", eval_pairs)):
            if not pairs:
                continue
            cache_file = out_dir / "reference_cache" / f"{split}-{cache_key(model_path, pairs, settings)}.pt"
            if resume_from is not None and not cache_file.is_file():
                # the policy has moved on: the frozen reference must be loaded to recompute
                ref_model = load_causal_lm(cfg.model, device=device)
            else:
                ref_model = policy
            disable_dropout(ref_model)
            if cfg.fused_gelu:
                fuse_gelu(ref_model)
            if main_process:
                reference_logps[split], cached = load_or_compute(cache_file, lambda: compute_reference_logps(
                    SequenceScorer(ref_model, **scorer_kwargs), pairs, micro_batch_size=cfg.micro_batch_size,
                    collate=collate, device=device, autocast=autocast))
                log(f"reference log-probs for {len(pairs)} {split} pairs: {'cached' if cached else 'computed'}")
            barrier(dist_info)
            if not main_process:
                reference_logps[split], _ = load_or_compute(cache_file, lambda: None)
            if ref_model is not policy:
                del ref_model
    elif needs_reference:
        reference = load_causal_lm(cfg.model, device=device).eval().requires_grad_(False)
        disable_dropout(reference)
        if cfg.fused_gelu:
            fuse_gelu(reference)
        reference_scorer = SequenceScorer(reference, **scorer_kwargs)

    policy.train()
    if cfg.compile:
        policy.base_model.compile()
    policy_scorer = SequenceScorer(policy, **scorer_kwargs)
    policy_scorer.reserve_workspace(train_pairs, cfg.micro_batch_size)
    scorer = wrap_model(policy_scorer, dist_info, fsdp=cfg.fsdp, device=device)
    # the fused kernel updates every parameter in one pass (5x faster than the per-tensor loop on CPU)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.lr,
                                  betas=cfg.adam_betas, weight_decay=cfg.weight_decay,
                                  fused=device.type in ("cpu", "cuda") and not cfg.fsdp)
    scaler = torch.amp.GradScaler(device.type) if cfg.precision == "fp16" else None
    loss_state: dict = {}
    metrics = MetricsWriter(out_dir / "metrics.jsonl", enabled=main_process)
    start_step, skipped_steps = 0, 0
    if resume_from is not None:
        load_full_optimizer_state(scorer, optimizer, resume_state["optimizer"])
        if scaler is not None and resume_state["scaler"]:
            scaler.load_state_dict(resume_state["scaler"])
        set_rng_state(resume_state["rng"])
        loss_state = resume_state["loss_state"]
        start_step = resume_state["trainer_state"]["step"]
        skipped_steps = resume_state["trainer_state"].get("skipped_steps", 0)
        metrics.truncate_after(start_step)
        log(f"resumed from {resume_from.name} (step {start_step} of {total_steps})")
    if main_process:
        (out_dir / "run_config.json").write_text(json.dumps(
            {**cfg.to_dict(), "reference_model": cfg.model, "total_steps": total_steps,
             "steps_per_epoch": steps_per_epoch, "accumulation_steps": accumulation, "world_size": world}, indent=2))

    def pair_logps(model, batch: dict, ids: list[int], split: str) -> PreferenceLogps:
        """Policy log-probs of a collated micro-batch (+ reference ones), as the loss wants them."""
        batch = {k: v.to(device) for k, v in batch.items()}
        n = len(ids)
        policy_logps = model(batch)
        ref_chosen = ref_rejected = None
        if split in reference_logps:
            ref_chosen, ref_rejected = reference_logps[split].take(ids, device)
        elif reference_scorer is not None:
            with torch.no_grad():
                ref = reference_scorer(batch)
            ref_chosen, ref_rejected = ref.sum[:n], ref.sum[n:]
        wpo = policy_logps.wpo
        return PreferenceLogps(
            policy_chosen_logps=policy_logps.sum[:n], policy_rejected_logps=policy_logps.sum[n:],
            reference_chosen_logps=ref_chosen, reference_rejected_logps=ref_rejected,
            chosen_lengths=policy_logps.count[:n], rejected_lengths=policy_logps.count[n:],
            chosen_wpo_logps=None if wpo is None else wpo[:n], rejected_wpo_logps=None if wpo is None else wpo[n:],
            state=loss_state)

    @torch.no_grad()
    def evaluate(step: int) -> dict:
        scorer.eval()
        stats = PairMetrics(device)
        batches = [list(range(len(eval_pairs)))[i : i + cfg.micro_batch_size]
                   for i in range(0, len(eval_pairs), cfg.micro_batch_size)]
        # every process runs the same number of forwards (DDP/FSDP forwards are collective);
        # a process short of a batch re-scores the first one and discards the result
        for round_start in range(0, len(batches), world):
            index = round_start + dist_info.rank
            ids = batches[index] if index < len(batches) else batches[0]
            with autocast():
                logps = pair_logps(scorer, collate([eval_pairs[i] for i in ids]), ids, "eval")
                out = compute_loss(logps, loss_config)
            if index < len(batches):
                stats.add(out.losses, out.chosen_rewards, out.rejected_rewards,
                          logps.policy_chosen_logps, logps.policy_rejected_logps)
        scorer.train()
        all_reduce_sum(stats.sums, dist_info)
        record = {"split": "eval", "step": step, "epoch": round(step / steps_per_epoch, 4), **stats.means(),
                  "pairs": stats.num_pairs}
        metrics.write(record)
        return record

    stop_signal = {"name": None}

    def request_stop(signum, frame):
        stop_signal["name"] = signal.Signals(signum).name

    previous_handlers = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}

    def save(step: int) -> None:
        weights, optimizer_state = full_model_state(scorer), full_optimizer_state(scorer, optimizer)  # collective
        if main_process:
            path = save_checkpoint(
                out_dir, step, save_model=lambda d: policy.save_pretrained(d, state_dict=weights),
                optimizer_state=optimizer_state, scaler_state=scaler.state_dict() if scaler else None,
                trainer_state={"total_steps": total_steps, "skipped_steps": skipped_steps}, loss_state=loss_state,
                keep=cfg.save_total_limit)
            log(f"saved {path}")
        barrier(dist_info)

    # ---------------------------------------------------------------- the loop
    log(f"training {total_steps} steps: {len(train_pairs)} pairs, batch {cfg.batch_size} = micro "
        f"{cfg.micro_batch_size} x accumulation {accumulation} x processes {world}, {cfg.precision} on {device}")
    progress = None
    if main_process and cfg.progress:
        from tqdm.auto import tqdm
        progress = tqdm(total=total_steps, initial=start_step, desc="dpo", dynamic_ncols=True)
    train_record: dict = {}
    eval_record: dict = {}
    step = start_step
    while step < total_steps:
        t0 = time.perf_counter()
        epoch, position = divmod(step, steps_per_epoch)
        order = epoch_permutation(len(train_pairs), epoch, cfg.seed)
        batch_ids = order[position * cfg.batch_size : (position + 1) * cfg.batch_size]
        local_ids = batch_ids[dist_info.rank * len(batch_ids) // world : (dist_info.rank + 1) * len(batch_ids) // world]
        lr = lr_at(step, total_steps=total_steps, peak_lr=cfg.lr, warmup_ratio=cfg.warmup_ratio,
                   min_lr_ratio=cfg.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr

        stats = PairMetrics(device)
        tokens = 0
        if cfg.group_by_length:
            micro_batches = group_by_length(local_ids, train_pairs, cfg.micro_batch_size)
        else:
            micro_batches = [local_ids[i : i + cfg.micro_batch_size] for i in range(0, len(local_ids), cfg.micro_batch_size)]
        for k, ids in enumerate(micro_batches):
            micro_pairs = [train_pairs[i] for i in ids]
            batch = collate(micro_pairs)
            tokens += sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in micro_pairs)
            with no_sync(scorer, sync=k == len(micro_batches) - 1):
                with autocast():
                    logps = pair_logps(scorer, batch, ids, "train")
                    out = compute_loss(logps, loss_config)
                # sum over this process's pairs / global batch; DDP averages over processes, hence x world
                loss = out.losses.sum() * (world / cfg.batch_size)
                (scaler.scale(loss) if scaler else loss).backward()
            stats.add(out.losses, out.chosen_rewards, out.rejected_rewards,
                      logps.policy_chosen_logps, logps.policy_rejected_logps)

        all_reduce_sum(stats.sums, dist_info)
        step_loss = stats.means()["loss"]
        if scaler is not None:
            scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm or float("inf"))
        nonfinite = broadcast_flag(not math.isfinite(step_loss), dist_info, device)
        if nonfinite and scaler is None:
            if cfg.on_nan == "stop":
                metrics.write({"split": "train", "step": step + 1, "error": f"non-finite loss {step_loss}"})
                raise TrainingError(f"step {step + 1}: loss is {step_loss} (not finite); stopping. The last "
                                    f"good checkpoint in {out_dir} is intact; lower --lr or use --on-nan skip")
            optimizer.zero_grad(set_to_none=True)
            skipped_steps += 1
        elif scaler is not None:
            scale_before = scaler.get_scale()
            scaler.step(optimizer)  # skipped by the scaler when a gradient overflowed
            scaler.update()
            skipped_steps += int(scaler.get_scale() < scale_before)
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        elapsed = time.perf_counter() - t0
        token_count = all_reduce_sum(torch.tensor([float(tokens)], device=device), dist_info).item()
        train_record = {"split": "train", "step": step, "epoch": round(step / steps_per_epoch, 4), **stats.means(),
                        "lr": lr, "grad_norm": float(grad_norm), "pairs_per_s": stats.num_pairs / elapsed,
                        "tokens_per_s": token_count / elapsed, "skipped_steps": skipped_steps}
        if scaler is not None:
            train_record["loss_scale"] = scaler.get_scale()
        if step % cfg.log_steps == 0 or step == total_steps:
            metrics.write(train_record)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{step_loss:.4f}", acc=f"{train_record['rewards/accuracies']:.2f}",
                                 margin=f"{train_record['rewards/margins']:.3f}")
        if eval_pairs and ((cfg.eval_steps and step % cfg.eval_steps == 0) or step == total_steps):
            eval_record = evaluate(step)
            if progress is not None:
                progress.write(f"step {step}: eval loss {eval_record['loss']:.4f}, reward accuracy "
                               f"{eval_record['rewards/accuracies']:.3f}, margin {eval_record['rewards/margins']:.3f}")
        stop_now = broadcast_flag(stop_signal["name"] is not None, dist_info, device)
        planned_stop = cfg.stop_at_step == step and step < total_steps
        if (cfg.save_steps and step % cfg.save_steps == 0 and step < total_steps) or stop_now or planned_stop:
            save(step)
        if stop_now or planned_stop:
            reason = f"{stop_signal['name'] or 'a signal'} received" if stop_now else f"--stop-at-step {step}"
            log(f"{reason}: checkpoint saved at step {step}; continue with --resume")
            break
    if progress is not None:
        progress.close()
    for sig, handler in previous_handlers.items():
        signal.signal(sig, handler)

    # ---------------------------------------------------------------- final model and summary
    final_weights = full_model_state(scorer) if step == total_steps else None  # collective
    if step == total_steps and main_process:
        final_dir = out_dir / "final"
        tmp_dir = out_dir / "final.tmp"
        shutil.rmtree(tmp_dir, ignore_errors=True)
        policy.generation_config.update(do_sample=True, temperature=0.7, top_p=0.9,
                                        pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id)
        policy.save_pretrained(tmp_dir, state_dict=final_weights)
        tokenizer.save_pretrained(tmp_dir)
        (tmp_dir / "dpo_run.json").write_text((out_dir / "run_config.json").read_text())
        shutil.rmtree(final_dir, ignore_errors=True)
        tmp_dir.rename(final_dir)
        if cfg.plot:
            from dpo.plot import plot_training_curves
            plot_training_curves(read_metrics(out_dir / "metrics.jsonl"), out_dir / "training_curves.png",
                                 title=f"DPO {cfg.loss} beta {cfg.beta}")
        history = [r for r in read_metrics(out_dir / "metrics.jsonl") if r.get("split") == "train"]
        first = history[0] if history else train_record
        log(summary(first, train_record, eval_record, out_dir, skipped_steps))
    barrier(dist_info)
    shutdown_distributed()
    return 0


def summary(first: dict, last: dict, evaluation: dict, out_dir: Path, skipped: int) -> str:
    lines = ["", f"{'':24}{'first step':>12}{'last step':>12}{'eval':>12}"]
    for key in ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected"):
        cells = [first.get(key), last.get(key), evaluation.get(key)]
        lines.append(f"{key:24}" + "".join(f"{c:12.4f}" if isinstance(c, float) else f"{'-':>12}" for c in cells))
    if skipped:
        lines.append(f"skipped steps (overflow or non-finite loss): {skipped}")
    lines.append(f"model: {out_dir / 'final'}   metrics: {out_dir / 'metrics.jsonl'}")
    return "\n".join(lines)


def cli(argv: list[str] | None = None) -> int:
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
