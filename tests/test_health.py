"""Health alerts: each check on records built to trip it (and not on healthy ones), the monitor's once / strict /
off behaviour, and training runs built to cause each alert."""

import math

import pytest

import train
from dpo.health import (LN2, ExplodingLogRatios, HealthError, HealthMonitor, LikelihoodDisplacement,
                        LossScaleCollapse, NothingScored)
from harness import make_run_dir, run_metrics, train_tiny


def train_record(step, **values):
    base = {"split": "train", "step": step, "loss": 0.6, "grad_norm": 0.5, "logps/chosen": -20.0,
            "logps/rejected": -25.0, "logps/chosen_per_token": -1.0, "logps/rejected_per_token": -1.25,
            "rewards/margins": 0.1}
    return {**base, **values}


def eval_record(step, chosen, margin, tokens=10):
    return {"split": "eval", "step": step, "logps/chosen": chosen, "rewards/margins": margin,
            "logps/chosen_per_token": chosen / tokens}


# ---------------------------------------------------------------------------------------------------- the checks


def test_nothing_scored_after_window_steps_and_resets():
    check = NothingScored(window=3)
    empty = dict(loss=LN2, grad_norm=0.0, **{"logps/chosen": 0.0, "logps/rejected": 0.0})
    assert check.train(train_record(1, **empty)) is None
    assert check.train(train_record(2, **empty)) is None
    assert check.train(train_record(3, grad_norm=0.1)) is None  # a scored step resets the count
    assert [check.train(train_record(s, **empty)) is None for s in (4, 5)] == [True, True]
    message = check.train(train_record(6, **empty))
    assert "no response token is being scored" in message and "--template" in message and "\n" not in message
    stuck = NothingScored(window=2)  # the loss at ln 2 with a zero gradient, log-probs not 0
    assert stuck.train(train_record(1, loss=LN2, grad_norm=0.0)) is None
    assert "ln 2" in stuck.train(train_record(2, loss=LN2, grad_norm=0.0))
    healthy = NothingScored(window=1)  # step 1 of every DPO run: the loss is ln 2, the gradient is not 0
    assert healthy.train(train_record(1, loss=LN2, grad_norm=0.45)) is None
    # resumed with a shorter --health-window than the run of zero steps already counted: it is past the window
    shortened = NothingScored(window=2)
    shortened.run = 2
    assert shortened.train(train_record(3, **empty)) is not None


def test_likelihood_displacement_needs_window_falls_with_rising_margins():
    check = LikelihoodDisplacement(window=3)
    falling = [eval_record(10 * i, -2.0 - i, 0.1 * i) for i in range(4)]
    assert [check.eval(r) for r in falling[:3]] == [None, None, None]
    message = check.eval(falling[3])
    assert "likelihood displacement" in message and "--rpo-alpha" in message and "-2 -> -5" in message
    demo_like = LikelihoodDisplacement(window=3)  # chosen rising while margins rise: healthy DPO
    assert all(demo_like.eval(eval_record(i, -2.0 + 0.3 * i, 0.1 * i)) is None for i in range(6))
    flat_margin = LikelihoodDisplacement(window=3)  # both falling but margins not rising: not this alert
    assert all(flat_margin.eval(eval_record(i, -2.0 - i, 0.3)) is None for i in range(6))
    rounding = LikelihoodDisplacement(window=3)  # falling by 1e-4 nats in all (1e-5 per token): not displacement
    assert all(rounding.eval(eval_record(i, -2.0 - 3e-5 * i, 0.1 * i)) is None for i in range(6))
    assert "0.3 nats per token" in message


def chosen_per_token(check, values, start=1):
    """The check's messages over train records whose chosen log-prob per token is each of `values` in turn."""
    return [check.train(train_record(step, **{"logps/chosen_per_token": v})) for step, v in enumerate(values, start)]


def test_exploding_log_ratios():
    """Beyond 3x the opening value (the median of the first three steps' within the bound) + 1 nat, three steps in
    a row."""
    check = ExplodingLogRatios(window=3)
    # opening -1.0, -0.3 (a confident batch), -1.2: the median, 1.0, bounds at 4.0 nats
    assert chosen_per_token(check, [-1.0, -0.3, -1.2, -4.0, -4.1, -4.1, -1.0, -4.1, -4.1]) == [None] * 9
    message = check.train(train_record(10, **{"logps/chosen_per_token": -4.1}))
    assert message.startswith("mean chosen log-prob per token -4.1 has been beyond 3x its opening value (-1) for 3 "
                              "steps") and "--lr" in message
    rejected = ExplodingLogRatios(window=3)  # the rejected answers pushed far down: what DPO does
    assert [rejected.train(train_record(i, **{"logps/rejected_per_token": -50.0 * i})) for i in range(1, 9)] == \
        [None] * 8
    exploded = ExplodingLogRatios(window=3)  # steps beyond the bound do not enter the opening value
    messages = chosen_per_token(exploded, [-1.0, -5.0, -9.0, -12.0])
    assert messages[:3] == [None] * 3 and "has been beyond 3x its opening value (-1) for 3 steps" in messages[3]
    at_once = ExplodingLogRatios(window=3)  # 30x + 10 nats: at the step it happens
    assert chosen_per_token(at_once, [-1.0, -40.0]) == [None, None]
    assert "-40.1 is beyond 30x its opening value (-1):" in at_once.train(
        train_record(3, **{"logps/chosen_per_token": -40.1}))
    longer = ExplodingLogRatios(window=3)  # a step of longer pairs: its sums are 20x the first's, the policy unmoved
    assert longer.train(train_record(1, **{"logps/chosen": -36.5})) is None
    assert longer.train(train_record(2, **{"logps/chosen": -869.0, "logps/rejected": -900.0})) is None
    nan = ExplodingLogRatios(window=3)
    assert "not finite" in nan.train(train_record(1, **{"rewards/margins": math.nan}))


def test_a_held_out_loss_that_is_not_finite_is_raised_after_exploding_log_ratios():
    """Its own alert: the train side's exploding_log_ratios, usually raised first, does not silence it."""
    monitor = HealthMonitor()
    assert [a.name for a in monitor.observe(train_record(1, **{"rewards/margins": math.nan}))] == [
        "exploding_log_ratios"]
    assert monitor.observe({"split": "eval", "step": 1, "loss": 0.6}) == []
    alerts = monitor.observe({"split": "eval", "step": 2, "loss": math.nan})
    assert [a.name for a in alerts] == ["held_out_not_finite"] and "held-out loss is nan" in alerts[0].message


def test_loss_scale_collapse():
    check = LossScaleCollapse()
    assert check.train(train_record(1)) is None  # no loss_scale: not fp16
    scales = [65536.0 / 2 ** k for k in range(11)]
    results = [check.train(train_record(k + 1, loss_scale=s, skipped_steps=k)) for k, s in enumerate(scales)]
    assert results[:10] == [None] * 10  # 65536 .. 128
    assert "loss scale fell to 64, 2^10 below its highest 65536: at least 10 steps overflowed" in results[10]
    assert "(10 skipped in all)" in results[10] and "bf16" in results[10] and "underflow" not in results[10]
    low = LossScaleCollapse()
    message = low.train(train_record(1, loss_scale=0.5))
    assert message.startswith("the fp16 loss scale fell to 0.5 (") and "small ones underflow" in message


def test_monitor_raises_each_alert_once_strict_stops_off_is_silent():
    seen = []
    monitor = HealthMonitor("warn", window=1, emit=seen.append)
    bad = train_record(1, loss=LN2, grad_norm=0.0, **{"logps/chosen": 0.0, "logps/rejected": 0.0})
    assert [a.name for a in monitor.observe(bad)] == ["nothing_scored"]
    assert monitor.observe({**bad, "step": 2}) == []  # once
    assert [a.name for a in seen] == ["nothing_scored"] and seen[0].step == 1
    assert str(seen[0]).startswith("health alert [nothing_scored] at step 1: zero gradient")
    strict = HealthMonitor("strict", window=1)
    with pytest.raises(HealthError) as error:
        strict.observe(bad)
    assert "\n" not in str(error.value) and str(error.value).endswith("(--health strict)")
    assert HealthMonitor("off", window=1).observe(bad) == []
    off = HealthMonitor("off", emit=seen.append)
    with pytest.raises(HealthError, match="^step 1: the reference"):  # the step-0 check stops whatever the mode
        off.stop("reference_mismatch", 1, "the reference is wrong")
    assert seen[-1].name == "reference_mismatch"


# ---------------------------------------------------------------------------------------------------- runs


USER_LOSSES = '''
import torch.nn.functional as F
from dpo.loss import preference_margin


def enormous(x, cfg):
    """DPO times 1e30: finite in fp32, every fp16 gradient overflows."""
    return -F.logsigmoid(cfg.beta * preference_margin(x, cfg)) * 1e30
'''


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = make_run_dir(tmp_path_factory.mktemp("health"), 48)
    (root / "user_losses.py").write_text(USER_LOSSES)
    return root


def run(workdir, out, *extra):
    return train_tiny(workdir, out, "--batch-size", "8", "--micro-batch-size", "4", *extra)


def alerts(out_dir):
    return [(r["alert"], r["step"]) for r in run_metrics(out_dir, "alert")]


def mask_every_response(monkeypatch):
    """The collate of padded rows, with every label masked: nothing is scored (a masking bug)."""
    original = train.collate_pairs

    def masked(pairs, **kwargs):
        batch = original(pairs, **kwargs)
        batch["labels"].fill_(-100)
        return batch

    monkeypatch.setattr(train, "collate_pairs", masked)


@pytest.mark.slow
def test_a_run_that_scores_nothing_is_flagged_once_and_strict_stops_it(workdir, monkeypatch, capsys):
    mask_every_response(monkeypatch)
    out = run(workdir, "masked", "--layout", "padded", "--max-steps", "5", "--health-window", "3")
    assert alerts(out) == [("nothing_scored", 3)]
    printed = capsys.readouterr().out
    assert printed.count("health alert [nothing_scored] at step 3") == 1
    with pytest.raises(HealthError, match=r"nothing_scored.*\(--health strict\)\. The last good checkpoint, \S+"
                                          r"checkpoint-2, is intact$"):
        run(workdir, "masked-strict", "--layout", "padded", "--max-steps", "5", "--health", "strict",
            "--save-steps", "2")
    assert "health alert" not in capsys.readouterr().out  # the error says it, once
    assert alerts(workdir / "masked-strict") == [("nothing_scored", 3)]  # and the run's record keeps it
    assert max(r["step"] for r in run_metrics(workdir / "masked-strict")) == 3
    assert alerts(run(workdir, "masked-off", "--layout", "padded", "--max-steps", "4", "--health", "off")) == []


@pytest.mark.slow
def test_likelihood_displacement_run_and_the_flag_that_helps(workdir):
    """These pairs' rejected answers extend the chosen ones (a shared prefix): sigmoid DPO lowers the chosen
    log-probs while the margins grow, the classic displacement. --rpo-alpha 1.0, the flag the alert names, keeps
    the chosen answers up and the alert quiet."""
    flags = ("--lr", "1e-3", "--max-steps", "8", "--eval-steps", "2")
    out = run(workdir, "displaced", *flags)
    evals = run_metrics(out, "eval")
    assert evals[-1]["logps/chosen"] < evals[0]["logps/chosen"] and evals[-1]["rewards/margins"] > 0
    assert alerts(out) == [("likelihood_displacement", 8)]
    helped = run(workdir, "rpo", *flags, "--rpo-alpha", "1.0")
    assert alerts(helped) == []


@pytest.mark.slow
def test_exploding_run(workdir):
    out = run(workdir, "exploding", "--lr", "0.3", "--max-grad-norm", "none", "--max-steps", "6")
    assert ("exploding_log_ratios" in [name for name, _ in alerts(out)])


@pytest.mark.slow
def test_fp16_loss_scale_collapse_run(workdir):
    out = run(workdir, "overflow", "--loss", f"{workdir / 'user_losses.py'}:enormous", "--precision", "fp16",
              "--max-length", "32", "--max-prompt-length", "16", "--max-steps", "11", "--on-nan", "skip")
    records = run_metrics(out, "train")
    assert records[-1]["loss_scale"] == 65536.0 / 2 ** 11 and records[-1]["skipped_steps"] == 11
    # the first record already shows the halved scale (32768): ten more halvings later, at step 11, the alert
    assert alerts(out) == [("loss_scale_collapse", 11)]


def test_exploding_baseline_skips_steps_without_log_probs():
    check = ExplodingLogRatios(window=2)
    assert check.train({"split": "train", "step": 1, "lr": 1e-4}) is None  # online DPO: a step without pairs
    assert check.train(train_record(2, **{"logps/chosen_per_token": math.nan})) is None
    assert check.train(train_record(3, **{"logps/chosen_per_token": 0.0})) is None  # nothing scored: no value
    assert chosen_per_token(check, [-2.0, -7.1], start=4) == [None, None]  # -2.0: the first value
    message = check.train(train_record(6, **{"logps/chosen_per_token": -7.1}))
    assert "chosen log-prob per token -7.1 has been beyond 3x its opening value (-2) for 2 steps" in message


@pytest.mark.slow
def test_alerts_and_windows_continue_across_a_resume(workdir, monkeypatch):
    """The window's count before a stop carries over (the alert comes at step 3, not 2 steps after the resume), and
    an alert raised before a stop is not raised again."""
    mask_every_response(monkeypatch)
    flags = ("--layout", "padded", "--max-steps", "6", "--health-window", "3", "--save-steps", "1")
    out = run(workdir, "masked-resume", *flags, "--stop-at-step", "2")
    assert alerts(out) == []
    run(workdir, "masked-resume", *flags, "--resume", "--stop-at-step", "4")
    run(workdir, "masked-resume", *flags, "--resume")
    assert alerts(out) == [("nothing_scored", 3)]


def test_a_checkpoint_of_the_earlier_exploding_check_resumes_with_a_new_opening():
    """An earlier version kept exploding_log_ratios' first-step values as `first`: a resume reads the rest of the
    state and builds the opening value anew."""
    monitor = HealthMonitor()
    monitor.load_state_dict({"raised": [], "checks": {"exploding_log_ratios": {"first": {
        "logps/chosen_per_token": 1.0}}, "nothing_scored": {"run": 2}}})
    exploding = next(c for c in monitor.checks if c.name == "exploding_log_ratios")
    assert exploding.opening == [] and not hasattr(exploding, "first")
    assert next(c for c in monitor.checks if c.name == "nothing_scored").run == 2
