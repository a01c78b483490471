"""TR-DPO (--sync-ref-model): the reference update's closed form, the runs it gives, resume, and what it refuses."""

import math

import pytest
import torch
from safetensors.torch import load_file

from dpo.reference_sync import mix_into_reference, sync_due
from dpo.train_settings import ConfigError, parse_settings
from harness import make_run_dir, run_metrics, tiny_phi, train_tiny

TIMING_KEYS = {"pairs_per_s", "tokens_per_s"}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return make_run_dir(tmp_path_factory.mktemp("trdpo"), 80)


def run(workdir, out, *extra):
    return train_tiny(workdir, out, "--lr", "1e-3", "--warmup-ratio", "0", "--batch-size", "16",
                      "--micro-batch-size", "8", "--max-eval-pairs", "8", *extra)


def test_the_reference_update_is_alpha_policy_plus_one_minus_alpha_reference():
    reference, policy = tiny_phi(seed=0), tiny_phi(seed=1)
    before = {name: p.detach().clone() for name, p in reference.named_parameters()}
    moved = {name: p.detach().clone() for name, p in policy.named_parameters()}
    assert any(not torch.equal(before[k], moved[k]) for k in before)
    mix_into_reference(reference, policy, 0.25)
    for name, p in reference.named_parameters():
        torch.testing.assert_close(p, 0.25 * moved[name] + 0.75 * before[name], atol=1e-6, rtol=0)
    for name, p in policy.named_parameters():  # the policy is not touched
        assert torch.equal(p, moved[name])
    mix_into_reference(reference, policy, 1.0)
    assert all(torch.equal(p, moved[name]) for name, p in reference.named_parameters())  # a hard update


def test_a_half_precision_reference_is_mixed_in_fp32_and_rounded_once():
    reference, policy = tiny_phi(seed=0).to(torch.bfloat16), tiny_phi(seed=1)
    before = {name: p.detach().float() for name, p in reference.named_parameters()}
    mix_into_reference(reference, policy, 0.6)
    for name, p in reference.named_parameters():
        assert p.dtype == torch.bfloat16
        want = (0.6 * policy.get_parameter(name).detach() + 0.4 * before[name]).to(torch.bfloat16)
        torch.testing.assert_close(p, want, atol=0, rtol=0)


def test_models_of_other_shapes_are_refused():
    with pytest.raises(ValueError, match="different parameters"):
        mix_into_reference(tiny_phi(), torch.nn.Linear(2, 2), 0.5)


def test_the_updates_come_every_tau_steps():
    assert [step for step in range(1, 13) if sync_due(step, 4)] == [4, 8, 12]
    assert [step for step in range(1, 4) if sync_due(step, 1)] == [1, 2, 3]


@pytest.mark.slow
def test_a_hard_update_every_step_makes_each_step_start_at_its_reference(workdir):
    """alpha 1, tau 1: after every step the reference is the policy, so each step starts with every log-ratio 0:
    the sigmoid loss is ln 2 and the rewards 0 at every step, while the policy moves. With tau 2 only the steps
    after an update (1 and 3) start there."""
    every = run(workdir, "every", "--max-steps", "4", "--sync-ref-model", "--ref-model-sync-steps", "1",
                "--ref-model-mixup-alpha", "1")
    records = run_metrics(every, "train")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:
        assert r["loss"] == pytest.approx(math.log(2), abs=1e-6)
        assert abs(r["rewards/chosen"]) < 1e-5 and abs(r["rewards/margins"]) < 1e-5
    assert all(r["grad_norm"] > 0 for r in records)
    second = run_metrics(run(workdir, "second", "--max-steps", "4", "--sync-ref-model", "--ref-model-sync-steps", "2",
                             "--ref-model-mixup-alpha", "1"), "train")
    assert [r["loss"] == pytest.approx(math.log(2), abs=1e-6) for r in second] == [True, False, True, False]
    fixed = run_metrics(run(workdir, "fixed", "--max-steps", "4"), "train")
    assert [r["loss"] for r in second[:2]] == [r["loss"] for r in fixed[:2]]  # no update before step 2's end
    assert all(abs(r["loss"] - math.log(2)) > 1e-4 for r in fixed[1:])


@pytest.mark.slow
def test_a_resumed_run_goes_on_with_the_reference_it_had(workdir):
    """6 steps straight == 3 steps, stop, --resume, 3 more, with the reference updated at steps 2 and 4: the
    checkpoint keeps the moved reference, so weights and metrics are the same."""
    common = ("--max-steps", "6", "--eval-steps", "3", "--sync-ref-model", "--ref-model-sync-steps", "2",
              "--ref-model-mixup-alpha", "0.5", "--save-steps", "3")
    straight = run(workdir, "straight", *common)
    split = run(workdir, "split", *common, "--stop-at-step", "3")
    kept = load_file(split / "checkpoint-3" / "reference" / "model.safetensors")
    initial = load_file(workdir / "model" / "model.safetensors")
    assert any(not torch.equal(kept[k], initial[k]) for k in kept)  # moved at step 2, not the SFT model
    run(workdir, "split", *common, "--resume")
    a, b = (load_file(out / "final" / "model.safetensors") for out in (straight, split))
    for key in a:
        assert torch.equal(a[key], b[key]), key
    strip = lambda records: [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]  # noqa: E731
    assert strip(run_metrics(straight)) == strip(run_metrics(split))


@pytest.mark.parametrize("flags,message", [
    (["--lora-r", "8"], "does not run with LoRA"),
    (["--loss", "simpo"], "reads no reference model"),
    (["--reference-free"], "reads no reference model"),
    (["--fsdp"], "does not run under --fsdp"),
    (["--iterations", "2"], "does not run with --iterations"),
    (["--ref-model-mixup-alpha", "0"], r"must be in \(0, 1\]"),
])
def test_runs_whose_reference_cannot_follow_the_policy_are_refused(flags, message):
    with pytest.raises(ConfigError, match=message):
        parse_settings(["--sync-ref-model", *flags])
