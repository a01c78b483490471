"""Learning-rate schedule: linear warmup to the peak, then cosine decay to `min_lr_ratio * peak`."""

from __future__ import annotations

import math


def warmup_steps_for(total_steps: int, warmup_ratio: float) -> int:
    """Warmup length as in transformers' TrainingArguments: ceil(ratio * total steps)."""
    return math.ceil(warmup_ratio * total_steps)


def lr_at(step: int, *, total_steps: int, peak_lr: float, warmup_ratio: float, min_lr_ratio: float = 0.0) -> float:
    """Learning rate for optimizer step `step` (0-based).

    warmup (step < W):  peak * step / W
    decay   (step >= W): min + (peak - min) * 0.5 * (1 + cos(pi * (step - W) / (total - W)))
    This matches transformers' get_cosine_schedule_with_warmup when min_lr_ratio = 0.
    """
    warmup = warmup_steps_for(total_steps, warmup_ratio)
    if step < warmup:
        return peak_lr * step / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    floor = peak_lr * min_lr_ratio
    return floor + (peak_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
