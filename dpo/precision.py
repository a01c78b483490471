"""Numeric precision of a run: what `--precision auto` means on a device, its autocast, and the clock of a step.

    fp32   weights, activations and matmuls in fp32 (on CUDA the matmuls use TF32 tensor cores)
    bf16   fp32 master weights, the forward and backward under bf16 autocast
    fp16   fp32 master weights, fp16 autocast and a GradScaler against gradient underflow
    auto   bf16 on a CUDA GPU that computes it natively (Ampere and later), fp16 on an older GPU, fp32 elsewhere
           (half precision matmuls are slow on CPUs)
"""

from __future__ import annotations

import contextlib
import time

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str, device: torch.device) -> str:
    """`precision` with 'auto' replaced by what it means on `device`."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        native_bf16 = torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] >= 8
        return "bf16" if native_bf16 else "fp16"
    return "fp32"


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast of a resolved precision (none for fp32)."""
    dtype = AUTOCAST_DTYPES[precision]
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type=device.type, dtype=dtype)


def frozen_dtype(precision: str) -> torch.dtype:
    """The weights' dtype of a model that never trains (LoRA's base, a reference model, a judge) in a run of this
    resolved precision: the autocast dtype, in which its matmuls run anyway, or fp32."""
    return AUTOCAST_DTYPES[precision] or torch.float32


def matmul_precision(precision: str, device: torch.device) -> str:
    """What the matmuls compute in: 'tf32' for fp32 on CUDA (see use_tensor_cores), else the precision."""
    return "tf32" if precision == "fp32" and device.type == "cuda" else precision


# The relative tolerance of a log-prob computed two ways (other batch shapes, another layout), keyed by what the
# matmuls compute in: a difference beyond 1e-3 + LOGP_TOLERANCE x |log-prob| is no rounding. TF32 keeps fp16's 10
# mantissa bits.
LOGP_TOLERANCE = {"fp32": 1e-4, "tf32": 4e-3, "bf16": 2e-2, "fp16": 4e-3}


# The machine epsilon (the spacing of numbers at 1) of what the matmuls compute in: TF32 and fp16 keep 10 mantissa
# bits, bf16 7.
EPSILON = {"fp32": 2.0 ** -23, "tf32": 2.0 ** -10, "bf16": 2.0 ** -7, "fp16": 2.0 ** -10}


def weights_matmul_precision(model: torch.nn.Module) -> str:
    """What a model's matmuls compute in outside autocast: its lowest-precision floating weights' dtype (TF32 for
    fp32 on CUDA)."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    for dtype, name in ((torch.bfloat16, "bf16"), (torch.float16, "fp16")):
        if dtype in dtypes:
            return name
    return matmul_precision("fp32", next(model.parameters()).device)


def use_fast_cuda_kernels(device: torch.device) -> None:
    """On CUDA: fp32 matmuls through TF32 tensor cores (the master weights, the fp32 parts of autocast: 10 mantissa
    bits per product, fp32 accumulation, at tensor-core rates); and SDPA attention without the cuDNN backend, which
    builds a graph for each new sequence width: with padded micro-batches of varying width that CPU work takes
    much of a step's CPU time and leaves the GPU idle. The flash and memory-efficient kernels remain."""
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
        torch.backends.cuda.enable_cudnn_sdp(False)


def synced_clock(device: torch.device) -> float:
    """perf_counter once the work queued on `device` has finished: a CUDA step's time does not leak into the
    next one's (kernels run asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
