"""Precision: what --precision auto resolves to, TF32 on CUDA, synced step timing, useful FLOPs and MFU."""

import time

import pytest
import torch

from dpo import flops as flops_module
from dpo import precision
from dpo.flops import FlopCounter, block_weight_count, peak_tflops
from dpo.precision import matmul_precision, resolve_precision, synced_clock
from harness import random_pairs, tiny_phi

CUDA = torch.device("cuda")
CPU = torch.device("cpu")


def test_auto_is_fp32_on_cpu_and_explicit_precisions_stay():
    assert resolve_precision("auto", CPU) == "fp32"
    for name in ("fp32", "bf16", "fp16"):
        assert resolve_precision(name, CPU) == resolve_precision(name, CUDA) == name
    assert matmul_precision("fp32", CPU) == "fp32" and matmul_precision("fp32", CUDA) == "tf32"
    assert matmul_precision("bf16", CUDA) == "bf16"


@pytest.mark.parametrize("major,expected", [(7, "fp16"), (8, "bf16"), (9, "bf16")])
def test_auto_on_cuda_is_bf16_from_ampere_on_else_fp16(monkeypatch, major, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, 0))
    assert resolve_precision("auto", CUDA) == expected


def test_step_clock_waits_for_the_cuda_queue(monkeypatch):
    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    before = time.perf_counter()
    assert synced_clock(CUDA) >= before and synced == [CUDA]
    synced_clock(CPU)
    assert synced == [CUDA]  # a CPU step has nothing queued


def test_cuda_kernels_tf32_and_no_cudnn_attention_only_on_cuda(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "set_float32_matmul_precision", calls.append)
    monkeypatch.setattr(torch.backends.cuda, "enable_cudnn_sdp", lambda enabled: calls.append(("cudnn_sdp", enabled)))
    precision.use_fast_cuda_kernels(CPU)
    assert calls == []
    precision.use_fast_cuda_kernels(CUDA)
    assert calls == ["high", ("cudnn_sdp", False)]


def test_useful_flops_count_by_brute_force():
    model = tiny_phi(hidden_size=64, layers=3)
    # the block weights, counted by hand: per layer q, k, v, dense (h x h) and fc1, fc2 (h x 4h)
    h = 64
    assert block_weight_count(model) == 3 * (4 * h * h + 2 * 4 * h * h)
    counter = FlopCounter.of(model)
    pairs = random_pairs(5, 97, seed=4)
    tokens = sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    scored = sum(len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)  # every prompt is non-empty here
    per_token = counter.block_weights * tokens + h * 97 * scored
    assert counter.pairs(pairs, reference_forward=False) == 6 * per_token
    assert counter.pairs(pairs, reference_forward=True) == 8 * per_token
    for parameter in model.parameters():  # LoRA's base: every weight frozen, 4 FLOPs per weight and token
        parameter.requires_grad_(False)
    frozen = FlopCounter.of(model)
    assert frozen.pairs(pairs, reference_forward=False) == 4 * per_token
    assert frozen.pairs(pairs, reference_forward=True) == 6 * per_token


def test_useful_flops_of_lora_runs_quantized_weights_and_experts():
    """Trained and frozen weights counted each as they run: peft's modules_to_save trains a copy (the original it
    keeps beside does not run); a 4-bit weight at its unpacked size; a mixture of experts at the experts a token
    uses; a model whose blocks are not under .layers or .h by its weight matrices less the embeddings and head."""
    import peft
    from transformers import OPTConfig, OPTForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    h = 64
    model = tiny_phi(hidden_size=h, layers=2)
    per_layer = 4 * h * h + 2 * 4 * h * h
    adapted = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                         modules_to_save=["fc1"]))
    counter = FlopCounter.of(adapted.get_base_model())
    assert counter.trained_block_weights == 2 * 4 * h * h  # the fc1 copies, trained
    assert counter.frozen_block_weights == 2 * (per_layer - 4 * h * h) and not counter.head_trained

    class Packed(torch.nn.Parameter):  # bitsandbytes' Params4bit: two 4-bit weights per byte, the shape kept aside
        pass

    packed = Packed(torch.zeros(64 * 128 // 2, 1), requires_grad=False)
    packed.quant_state = type("QuantState", (), {"shape": torch.Size([64, 128])})()
    assert flops_module._weight_count(packed, config=None) == 64 * 128

    moe = Qwen3MoeForCausalLM(Qwen3MoeConfig(vocab_size=97, hidden_size=32, intermediate_size=64,
                                             moe_intermediate_size=16, num_hidden_layers=1, num_attention_heads=4,
                                             num_key_value_heads=2, head_dim=8, num_experts=8, num_experts_per_tok=2))
    experts = [p for n, p in moe.named_parameters() if p.ndim == 3]  # stacked since transformers 5.x's MoE rewrite
    assert flops_module.block_weight_count(moe) == pytest.approx(
        sum(p.numel() for n, p in moe.model.layers.named_parameters() if p.ndim == 2)
        + sum(p.numel() for p in experts) * 2 / 8)

    opt = OPTForCausalLM(OPTConfig(vocab_size=97, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                   num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32))
    assert flops_module._decoder_layers(opt) is opt.model.decoder.layers  # found through get_decoder()
    assert block_weight_count(opt) == 2 * (4 * 32 * 32 + 2 * 32 * 64)
    # where no blocks are found: every weight matrix less the embeddings (positions too) and the head, the same here
    real = flops_module._decoder_layers
    flops_module._decoder_layers = lambda model: None
    try:
        assert block_weight_count(opt) == 2 * (4 * 32 * 32 + 2 * 32 * 64)
    finally:
        flops_module._decoder_layers = real
    # a second adapter's modules_to_save copy (TRL's and --adapter's reference adapter) does not run: not counted
    adapted.add_adapter("ref", peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["fc1"]))
    assert FlopCounter.of(adapted.get_base_model()) == counter


def test_peak_table_matches_the_longest_name_first(monkeypatch):
    for name, half, tf32 in [("NVIDIA H100 PCIe", 756.0, 378.0), ("NVIDIA H100 80GB HBM3", 989.4, 494.7),
                             ("NVIDIA GeForce RTX 4090", 165.2, 82.6), ("NVIDIA A10", 125.0, 62.5),
                             ("NVIDIA GH200 480GB", 989.4, 494.7),
                             ("NVIDIA H200", 989.4, 494.7), ("NVIDIA L40S", 362.1, 183.0), ("NVIDIA L4", 121.0, 60.0),
                             ("NVIDIA A100-SXM4-80GB", 312.0, 156.0)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, n=name: n)
        assert peak_tflops(CUDA, "bf16") == peak_tflops(CUDA, "fp16") == half, name
        assert peak_tflops(CUDA, "fp32") == tf32, name
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-16GB")
    assert peak_tflops(CUDA, "fp32") is None  # no TF32 on Volta: no MFU rather than a wrong one
    assert peak_tflops(CUDA, "bf16") is None and peak_tflops(CUDA, "fp16") == 125.0  # nor bf16
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100S-PCIE-32GB")
    assert peak_tflops(CUDA, "fp16") == 130.0
    for other in ("NVIDIA RTX A1000", "NVIDIA GeForce RTX 4090 Laptop GPU", "NVIDIA RTX A1000 Laptop GPU"):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, n=other: n)
        assert peak_tflops(CUDA, "bf16") is None, other  # not an A100, and no laptop part
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    assert peak_tflops(CUDA, "bf16") is None and peak_tflops(CUDA, "bf16", override=500.0) == 500.0
    assert peak_tflops(CPU, "fp32") is None and peak_tflops(CPU, "fp32", override=2.0) == 2.0
    names = [key for key, *_ in flops_module.GPU_PEAK_TFLOPS]
    for i, key in enumerate(names):  # no name is shadowed by an earlier, shorter one
        assert not any(earlier in key for earlier in names[:i]), key


@pytest.mark.slow
def test_a_step_reports_its_mfu_against_the_given_peak(tmp_path):
    import train
    from dpo.train_settings import parse_settings
    from dpo.data import collate_pairs
    from harness import make_model_dir

    make_model_dir(tmp_path / "model")
    pairs = random_pairs(8, 97, seed=5)
    records = {}
    for peak in (None, 0.5):
        flags = ["--model", str(tmp_path / "model"), "--output-dir", str(tmp_path / "run"), "--batch-size", "8",
                 "--micro-batch-size", "4", "--no-precompute-ref"] + (["--peak-tflops", str(peak)] if peak else [])
        cfg = parse_settings(flags)
        policy, adapters = train.build_policy(cfg, CPU)
        state = train.build_state(cfg, policy, adapters, device=CPU, dist=train.DistInfo(),
                                  collate=lambda p: collate_pairs(p, pad_id=0), workspace_pairs=pairs)
        records[peak] = train.train_step(state, train.PairBatch(pairs, None), lr=1e-3)
    assert "mfu" not in records[None] and "cuda_peak_memory_gb" not in records[None]  # a CPU has no known peak
    # the reference runs at step time (--no-precompute-ref): 8 FLOPs per weight and token
    useful = FlopCounter.of(policy).pairs(pairs, reference_forward=True)
    seconds = sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs) \
        / records[0.5]["tokens_per_s"]
    assert records[0.5]["mfu"] == pytest.approx(useful / seconds / 0.5e12, rel=1e-9)


@pytest.mark.slow
def test_a_step_time_reference_is_kept_in_half_precision(tmp_path):
    """--no-precompute-ref under bf16: the frozen reference model holds bf16 weights (half the memory of an fp32
    copy) while the policy keeps fp32 master weights; the step-0 check finds them equal within bf16 rounding."""
    import train
    from dpo.train_settings import parse_settings
    from dpo.data import collate_pairs
    from harness import make_model_dir

    make_model_dir(tmp_path / "model")
    cfg = parse_settings(["--model", str(tmp_path / "model"), "--output-dir", str(tmp_path / "run"), "--batch-size", "8",
                        "--micro-batch-size", "4", "--no-precompute-ref", "--precision", "bf16"])
    policy, adapters = train.build_policy(cfg, CPU)
    pairs = random_pairs(8, 97, seed=6)
    state = train.build_state(cfg, policy, adapters, device=CPU, dist=train.DistInfo(),
                              collate=lambda p: collate_pairs(p, pad_id=0), workspace_pairs=pairs)
    assert {p.dtype for p in state.reference_scorer.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in policy.parameters()} == {torch.float32}
    for _ in range(2):
        record = train.train_step(state, train.PairBatch(pairs, None), lr=1e-2)
    assert state.reference_checked and record["skipped_steps"] == 0 and record["rewards/margins"] != 0.0
