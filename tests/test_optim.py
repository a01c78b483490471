"""--optimizer adamw_8bit: AdamW with 8-bit moments (bitsandbytes), on CPU as on CUDA."""

import importlib.util

import pytest
import torch
from safetensors.torch import load_file

import train
from dpo.train_settings import ConfigError, parse_settings
from dpo.data import collate_pairs
from harness import make_run_dir, random_pairs, run_metrics, tiny_run_args

pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    # hidden 64: weight matrices of 4,096+ elements, whose states are quantized
    return make_run_dir(tmp_path_factory.mktemp("optim"), 80, hidden_size=64)


def args(workdir, out, *extra):
    return tiny_run_args(workdir, out, "--lr", "1e-3", "--batch-size", "16", "--micro-batch-size", "8", "--max-steps",
                         "6", "--eval-steps", "3", "--max-eval-pairs", "8", "--warmup-ratio", "0", *extra)


@pytest.mark.slow
def test_8bit_moments_take_a_quarter_of_the_memory_and_follow_adamw(workdir):
    cfg = parse_settings(args(workdir, "unused", "--optimizer", "adamw_8bit"))
    policy, adapters = train.build_policy(cfg, torch.device("cpu"))
    pairs = random_pairs(16, len(policy.get_input_embeddings().weight), seed=7)
    state = train.build_state(cfg, policy, adapters, device=torch.device("cpu"), dist=train.DistInfo(),
                              collate=lambda p: collate_pairs(p, pad_id=0), workspace_pairs=pairs)
    state.reference_checked = True  # zero reference log-probs: no step-0 check
    reference = train.ReferenceLogps(torch.zeros(16), torch.zeros(16))
    train.train_step(state, train.PairBatch(pairs, reference), lr=1e-3)
    big = [p for p in policy.parameters() if p.numel() >= 4096]
    assert big
    for p in big:
        moments = {k: v for k, v in state.optimizer.state[p].items() if k in ("state1", "state2")}
        assert {v.dtype for v in moments.values()} == {torch.uint8} and all(v.numel() == p.numel()
                                                                           for v in moments.values())
    small = [p for p in policy.parameters() if p.numel() < 4096]  # biases, norm scales: fp32 moments (documented)
    assert small and all(state.optimizer.state[p]["state1"].dtype == torch.float32 for p in small)
    eight, full = (run_and_read(workdir, name, *flags) for name, flags in
                   (("8bit", ("--optimizer", "adamw_8bit")), ("fp32-states", ())))
    assert eight[-1] < eight[0] - 0.01  # it trains
    assert eight == pytest.approx(full, abs=5e-4)  # and like AdamW, to the moments' quantization (measured: 2e-5)


def run_and_read(workdir, out, *flags):
    assert train.main(args(workdir, out, *flags)) == 0
    return [r["loss"] for r in run_metrics(workdir / out, "train", "eval")]


@pytest.mark.slow
def test_8bit_run_resumes_bit_exactly(workdir):
    straight = args(workdir, "straight", "--optimizer", "adamw_8bit")
    assert train.main(straight) == 0
    assert train.main(args(workdir, "split", "--optimizer", "adamw_8bit", "--stop-at-step", "3")) == 0
    assert train.main(args(workdir, "split", "--optimizer", "adamw_8bit", "--resume")) == 0
    a, b = (load_file(workdir / run / "final" / "model.safetensors") for run in ("straight", "split"))
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_missing_bitsandbytes_and_fsdp_are_refused_in_one_line(workdir, monkeypatch):
    with pytest.raises(ConfigError, match="adamw_8bit does not run under --fsdp"):
        parse_settings(args(workdir, "x", "--optimizer", "adamw_8bit", "--fsdp"))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ConfigError, match="needs bitsandbytes: pip install bitsandbytes"):
        train.main(args(workdir, "missing", "--optimizer", "adamw_8bit"))
