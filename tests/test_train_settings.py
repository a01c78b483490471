"""Settings: declared once (flags, config keys, checks, docs/training.md's flag tables come from the dataclasses)."""

import dataclasses
import json
import subprocess
import re
import sys
from pathlib import Path

import pytest

from dpo.train_settings import DEMO_SETTINGS, TrainSettings, build_parser, flag_tables, parse_settings
from dpo.logprobs import ScoringSettings
from dpo.loss import LossSettings
from dpo.on_policy import OnPolicySettings
from dpo.errors import UserError
from dpo.settings import ConfigError, from_flat, setting_fields

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- flag tables: python -m dpo.train_settings -->", "<!-- end of flag tables -->"


def flags_of(parser) -> set[str]:
    return {option for action in parser._actions for option in action.option_strings}


def test_every_field_of_every_settings_class_is_a_flag_and_a_config_key(tmp_path):
    flags = flags_of(build_parser())
    for cls in (LossSettings, ScoringSettings):
        for f in dataclasses.fields(cls):
            flag = "--" + (f.metadata["flag"] or f.name).replace("_", "-")
            assert flag in flags, f"{cls.__name__}.{f.name} has no flag"
    assert {"--discopop-tau", "--simpo-gamma", "--f-alpha", "--loss", "--logps-chunk-size", "--vocab-chunk"} <= flags
    names = [s.name for s in setting_fields(TrainSettings)]
    assert len(names) == len(set(names))
    file = tmp_path / "c.json"
    file.write_text(json.dumps({"loss": "discopop", "discopop_tau": 0.2, "logps-chunk-size": 64, "model": "x"}))
    cfg = parse_settings(["--config", str(file), "--vocab-chunk", "512"])
    assert (cfg.loss.loss_type, cfg.loss.discopop_tau, cfg.scoring.chunk_size, cfg.scoring.vocab_chunk) == \
        ("discopop", 0.2, 64, 512)


@pytest.mark.parametrize("argv,message", [
    (["--beta", "-1"], "--beta must be positive, got -1.0"),
    (["--label-smoothing", "0.5"], "--label-smoothing must be in [0.0, 0.5)"),
    (["--discopop-tau", "0"], "--discopop-tau must be positive"),
    (["--rpo-alpha", "-2"], "--rpo-alpha must be a non-negative number"),
    (["--vocab-chunk", "0"], "--vocab-chunk must be positive"),
    (["--warmup-ratio", "1.5"], "--warmup-ratio must be in [0.0, 1.0)"),
    (["--save-total-limit", "0"], "--save-total-limit must be at least 1"),
])
def test_a_bad_value_is_rejected_in_one_place_whatever_builds_the_config(argv, message):
    with pytest.raises(ConfigError) as from_flags:
        parse_settings(argv)
    assert str(from_flags.value).startswith(message)
    values = {k: v for k, v in vars(build_parser().parse_args(argv)).items() if k != "config"}
    with pytest.raises(ConfigError) as from_python:
        from_flat(TrainSettings, values)
    assert str(from_python.value) == str(from_flags.value)


@pytest.mark.parametrize("loss", ["aot", "simpo", "orpo,sft"])
def test_an_f_divergence_no_term_reads_is_refused(loss):
    with pytest.raises(ConfigError, match=f"--f-divergence js_divergence changes nothing for --loss {loss}: "):
        parse_settings(["--loss", loss, "--f-divergence", "js_divergence"])
    assert parse_settings(["--loss", f"{loss},sigmoid", "--f-divergence", "js_divergence"]).loss.f_divergence == \
        "js_divergence"


@pytest.mark.parametrize("loss", ["hinge", "ipo", "orpo,sft"])
def test_label_smoothing_no_term_reads_is_refused(loss):
    with pytest.raises(ConfigError, match=rf"^--label-smoothing 0.1 changes nothing for --loss {loss}: no term of it "
                                          r"reads it \(the losses that do: aot, aot_unpaired, exo_pair, robust, "
                                          r"sigmoid, simpo\)$"):
        parse_settings(["--loss", loss, "--label-smoothing", "0.1"])
    assert parse_settings(["--loss", f"{loss},sigmoid", "--label-smoothing", "0.1"]).loss.label_smoothing == 0.1
    assert parse_settings(["--loss", loss]).loss.label_smoothing == 0.0


@pytest.mark.parametrize("flags, message", [
    (["--simpo-gamma", "3"], "--simpo-gamma 3 changes nothing for --loss sigmoid: only simpo reads it"),
    (["--loss", "hinge,ipo", "--discopop-tau", "0.5"],
     "--discopop-tau 0.5 changes nothing for --loss hinge,ipo: only discopop reads it"),
    (["--f-alpha", "0.3"], "--f-alpha 0.3 changes nothing with --f-divergence reverse_kl: it is the alpha of "
                           "--f-divergence alpha_divergence"),
    (["--rpo-normalize", "tokens"], "--rpo-normalize tokens changes nothing without --rpo-alpha"),
    (["--loss", "sigmoid:0"], "every term has weight 0"),
])
def test_a_loss_setting_no_term_reads_is_refused(flags, message):
    with pytest.raises(UserError, match=re.escape(message)):
        parse_settings(flags)


@pytest.mark.parametrize("flags, message", [
    (["--num-samples", "6"], "--num-samples 6 changes nothing without --online or --iterations"),
    (["--judge", "ifeval", "--pair-choice", "longest", "--missing-eos-penalty", "0.25"],
     "--judge ifeval, --pair-choice longest, --missing-eos-penalty 0.25 change nothing without --online or "
     "--iterations"),
    (["--subset", "random"], "--subset random changes nothing without --num-pairs"),
])
def test_a_setting_of_a_feature_that_is_off_is_refused(flags, message):
    with pytest.raises(UserError, match=re.escape(message)):
        parse_settings(flags)


def test_a_setting_of_a_feature_that_is_on_is_taken():
    for switch in (["--online"], ["--iterations", "2"]):
        cfg = parse_settings([*switch, "--num-samples", "6", "--judge", "ifeval", "--pair-choice", "longest"])
        assert (cfg.on_policy.num_samples, cfg.on_policy.judge, cfg.on_policy.pair_choice) == (6, "ifeval", "longest")
    assert parse_settings(["--num-pairs", "5", "--subset", "random"]).subset == "random"


def test_replaying_a_run_s_record_neither_replaces_nor_resumes_a_run(tmp_path):
    """run_config.json holds --overwrite, --resume and --stop-at-step as the command gave them: replayed as --config,
    a run started with --overwrite would replace the run it names. A file a user writes keeps them."""
    record = tmp_path / "run_config.json"
    record.write_text(json.dumps({"lr": 1e-3, "overwrite": True, "resume": True, "stop_at_step": 3,
                                  "total_steps": 10, "world_size": 1}))
    replayed = parse_settings(["--config", str(record)])
    assert (replayed.lr, replayed.overwrite, replayed.resume, replayed.stop_at_step) == (1e-3, False, False, None)
    assert parse_settings(["--config", str(record), "--resume"]).resume
    mine = tmp_path / "mine.json"
    mine.write_text(json.dumps({"lr": 1e-3, "resume": True}))
    assert parse_settings(["--config", str(mine)]).resume


def test_the_online_demo_keeps_a_length_given_in_epochs():
    assert parse_settings(["--online"]).max_steps == 64  # the demo's length
    for sampled in (["--online"], ["--iterations", "2"]):
        assert parse_settings([*sampled, "--epochs", "1"]).max_steps is None


@pytest.mark.parametrize("values, message", [
    ({"loss": "sigmoid", "simpo_gamma": 1.0}, "simpo_gamma 1 changes nothing for --loss sigmoid: only simpo reads it"),
    ({"loss": "nosuch"}, "unknown loss 'nosuch'"),
    ({"loss": "sigmoid:0"}, "loss_type 'sigmoid:0': every term has weight 0"),
    ({"lora_alpha": 16, "lora_dropout": 0.1}, "--lora-alpha, --lora-dropout without LoRA"),
    ({"judge": "ifeval"}, "judge ifeval changes nothing without --online or --iterations"),
])
def test_a_requirement_a_config_file_misses_names_the_file(tmp_path, values, message):
    file = tmp_path / "c.json"
    file.write_text(json.dumps(values))
    with pytest.raises(ConfigError) as error:
        parse_settings(["--config", str(file)])
    assert str(error.value).startswith(f"--config {file}: ") and message in str(error.value)


def test_a_loss_setting_is_taken_where_a_term_reads_it():
    assert parse_settings(["--loss", "simpo", "--simpo-gamma", "3"]).loss.simpo_gamma == 3
    assert parse_settings(["--loss", "sigmoid,discopop", "--discopop-tau", "0.5"]).loss.discopop_tau == 0.5
    assert parse_settings(["--f-divergence", "alpha_divergence", "--f-alpha", "0.3"]).loss.f_alpha == 0.3
    assert parse_settings(["--rpo-alpha", "1", "--rpo-normalize", "tokens"]).loss.rpo_normalize == "tokens"
    custom = parse_settings(["--loss", "examples/my_loss.py:my_loss", "--simpo-gamma", "2", "--f-alpha", "0.5"])
    assert (custom.loss.simpo_gamma, custom.loss.f_alpha) == (2, 0.5)  # a custom loss may read them


@pytest.mark.parametrize("values,message", [
    ({"overwrite": "false"}, "--overwrite must be true or false, got 'false'"),  # a non-empty string is truthy
    ({"resume": "no"}, "--resume must be true or false, got 'no'"),
    ({"seed": "abc"}, "--seed must be a whole number, got 'abc'"),
    ({"max_length": 48.5}, "--max-length must be a whole number, got 48.5"),
    ({"batch_size": 8.0}, "--batch-size must be a whole number, got 8.0"),
    ({"lr": "3e-5"}, "--lr must be a number, got '3e-5'"),
    ({"model": 5}, "--model must be a string, got 5"),
    ({"dataset": None}, "--dataset must be a string, got None"),
    ({"loss": 5}, "--loss must be a string, got 5"),
    ({"max_prompt_length": "none"}, "--max-prompt-length must be a whole number or null, got 'none'"),
    ({"eval_split": 5}, "--eval-split must be a string or null, got 5"),
    ({"seed": -1}, "--seed must be an integer in [0, 2**63), got -1"),
    ({"seed": 2 ** 63}, "--seed must be an integer in [0, 2**63), got 9223372036854775808"),  # torch.manual_seed's
    ({"sample_temperature": 1e-38}, "--sample-temperature must be at least 1e-05, got 1e-38"),
    ({"missing_eos_penalty": -0.5}, "--missing-eos-penalty must be a non-negative number, got -0.5"),
    ({"device": "foo"}, "--device must be cpu, cuda, cuda:N or auto, got 'foo'"),
    ({"sample_top_p": 1.0000005}, "--sample-top-p must be in (0, 1], got 1.0000005"),
])
def test_a_config_value_of_the_wrong_type_is_refused_naming_its_flag(tmp_path, values, message):
    """Given as a setting, the value is refused naming its flag; in a config file, naming the file and its key."""
    [key] = values
    flag = "--" + key.replace("_", "-")
    with pytest.raises(ConfigError) as error:
        from_flat(TrainSettings, values)
    assert str(error.value) == message
    file = tmp_path / "c.json"
    file.write_text(json.dumps(values))
    with pytest.raises(ConfigError) as error:
        parse_settings(["--config", str(file)])
    assert str(error.value) == f"--config {file}: {key}{message[len(flag):]}"


def test_values_of_the_declared_types_pass():
    cfg = parse_settings(["--max-prompt-length", "none", "--eval-split", "none", "--lr", "1", "--device", "cuda:1"])
    assert (cfg.max_prompt_length, cfg.eval_split, cfg.lr, cfg.device) == (None, None, 1.0, "cuda:1")
    assert from_flat(TrainSettings, {"lr": 1, "adam_betas": [0.8, 0.9]}).adam_betas == (0.8, 0.9)


def test_loss_config_checks_itself_with_the_flag_names():
    with pytest.raises(ConfigError, match="--beta must be positive"):
        LossSettings(beta=0.0)
    with pytest.raises(ConfigError, match="--f-divergence must be one of reverse_kl"):
        LossSettings(f_divergence="kl")


def test_max_prompt_length_follows_max_length_unless_given():
    assert parse_settings(["--model", "m", "--max-length", "128"]).max_prompt_length == 64
    assert parse_settings(["--model", "m"]).max_prompt_length == 512  # the recipe: 1024 -> 512
    assert parse_settings([]).max_prompt_length == DEMO_SETTINGS["max_length"] // 2  # the demo: 96 -> 48
    assert parse_settings(["--model", "m", "--max-length", "128", "--max-prompt-length", "100"]).max_prompt_length == 100
    assert parse_settings(["--model", "m", "--max-prompt-length", "none"]).max_prompt_length is None
    assert TrainSettings(max_length=200).max_prompt_length == 100  # built in Python too
    with pytest.raises(ConfigError, match=r"--max-prompt-length \(300\) must be below --max-length \(128\)"):
        parse_settings(["--model", "m", "--max-length", "128", "--max-prompt-length", "300"])


def test_run_config_round_trips_as_a_config_file(tmp_path):
    cfg = parse_settings(["--model", "m", "--loss", "ipo", "--beta", "0.3", "--adam-betas", "0.8,0.9",
                        "--layout", "packed"])
    file = tmp_path / "run.json"
    file.write_text(json.dumps(cfg.to_dict()))
    assert parse_settings(["--config", str(file)]) == cfg


def test_run_identity_holds_what_changes_data_order_or_math():
    identity = TrainSettings(num_pairs=100).run_identity()
    for name in ("model", "dataset", "train_split", "num_pairs", "subset", "seed", "batch_size", "max_length",
                 "max_prompt_length", "loss", "beta", "lr", "epochs", "max_steps", "precision"):
        assert name in identity, name
    assert "discopop_tau" in TrainSettings(loss=LossSettings(loss_type="discopop")).run_identity()
    for name in ("eval_steps", "save_steps", "log_steps", "progress", "plot", "output_dir", "micro_batch_size",
                 "layout", "fused_lm_head", "logps_chunk_size", "resume", "stop_at_step", "device"):
        assert name not in identity, name


def test_label_smoothing_is_part_of_the_run_only_where_its_loss_reads_it():
    """A checkpoint of an earlier version may record --label-smoothing beside a loss that never read it (now
    refused): resuming it without the flag compares nothing that changes the math."""
    from dpo.checkpoint import settings_differences
    from dpo.loss import LossSettings

    hinge = TrainSettings(loss=LossSettings(loss_type="hinge")).run_identity()
    assert "label_smoothing" not in hinge
    saved = {**hinge, "label_smoothing": 0.1}  # what an earlier version recorded
    assert settings_differences(saved, hinge, TrainSettings().to_dict()) == []
    assert "label_smoothing" in TrainSettings(loss=LossSettings(loss_type="hinge,sigmoid")).run_identity()
    # LoRA's settings likewise where LoRA is off (an earlier version recorded them, as given, beside full fine-tuning)
    full = TrainSettings().run_identity()
    assert not {"lora_alpha", "lora_dropout", "lora_target_modules", "lora_modules_to_save"} & set(full)
    assert settings_differences({**full, "lora_dropout": 0.1}, full, TrainSettings().to_dict()) == []
    # and the loss settings only some losses read (an earlier version recorded them beside any loss)
    plain = TrainSettings().run_identity()
    assert not {"simpo_gamma", "discopop_tau", "f_alpha", "rpo_normalize"} & set(plain)
    old = {**plain, "simpo_gamma": 3.0, "discopop_tau": 9.0, "f_alpha": 0.3, "rpo_normalize": "tokens"}
    assert settings_differences(old, plain, TrainSettings().to_dict()) == []
    # and online DPO's sampling settings where the run samples nothing (an earlier version recorded them as given)
    assert not {"num_samples", "judge", "sample_temperature", "pair_choice", "missing_eos_penalty"} & set(plain)
    assert settings_differences({**plain, "num_samples": 6, "judge": "ifeval"}, plain, TrainSettings().to_dict()) == []
    # and --subset without --num-pairs, which draws every record whichever way (an earlier version took it)
    assert "subset" not in plain and "subset" in TrainSettings(num_pairs=8).run_identity()
    assert settings_differences({**plain, "subset": "random"}, plain, TrainSettings().to_dict()) == []
    online = TrainSettings(on_policy=OnPolicySettings(online=True, num_samples=6)).run_identity()
    assert (online["online"], online["num_samples"], online["judge"]) == (True, 6, "demo")
    simpo = TrainSettings(loss=LossSettings(loss_type="simpo", simpo_gamma=1.0)).run_identity()
    assert simpo["simpo_gamma"] == 1.0
    smoothed = TrainSettings(loss=LossSettings(label_smoothing=0.1)).run_identity()
    assert settings_differences(smoothed, TrainSettings().run_identity(), TrainSettings().to_dict()) == [
        "--label-smoothing 0.1 -> 0.0"]


def test_tr_dpo_settings_are_part_of_the_run_only_where_it_is_on():
    """--ref-model-sync-steps and --ref-model-mixup-alpha change nothing without --sync-ref-model: a resumed plain
    run may carry other values; a TR-DPO run's are its own, and --sync-ref-model itself always is."""
    plain, synced = TrainSettings().run_identity(), TrainSettings(sync_ref_model=True).run_identity()
    assert "sync_ref_model" in plain and not {"ref_model_sync_steps", "ref_model_mixup_alpha"} & set(plain)
    assert {"sync_ref_model", "ref_model_sync_steps", "ref_model_mixup_alpha", "ld_alpha"} <= set(synced)


def test_documented_flag_tables_are_the_generated_ones():
    page = (ROOT / "docs" / "training.md").read_text()
    assert BEGIN in page and END in page, "docs/training.md lost the markers around its flag tables"
    current = page[page.index(BEGIN) + len(BEGIN):page.index(END)].strip()
    assert current == flag_tables().strip(), \
        "docs/training.md's flag tables are stale: put `python -m dpo.train_settings`'s output between the markers"


def test_flag_tables_script_prints_every_flag():
    done = subprocess.run([sys.executable, "-m", "dpo.train_settings"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    for s in setting_fields(TrainSettings):
        assert f"| `{s.flag}` |" in done.stdout, s.flag


def test_a_loss_that_compares_the_pairs_of_a_micro_batch_makes_the_split_part_of_the_run():
    """AOT sorts over the batch it is given: micro-batch size and length grouping then change its math."""
    sigmoid, aot = TrainSettings().run_identity(), TrainSettings(loss=LossSettings(loss_type="sigmoid:0.5,aot:0.5"))
    assert "micro_batch_size" not in sigmoid and "group_by_length" not in sigmoid
    assert {"micro_batch_size", "group_by_length"} <= set(aot.run_identity())


def test_the_demo_watches_its_win_rate_on_every_held_out_instruction():
    from dpo.demo import task

    assert DEMO_SETTINGS["eval_generate"] == len(task.instructions("test"))
    assert parse_settings([]).eval_generate == len(task.instructions("test"))
    assert parse_settings(["--model", "m"]).eval_generate == 0  # off by default anywhere else
    assert parse_settings(["--eval-generate", "0"]).eval_generate == 0


def test_online_and_iterative_demo_train_the_offline_demos_number_of_steps():
    assert parse_settings([]).max_steps is None  # offline: 2 epochs of 2048 pairs = 64 steps
    assert parse_settings(["--online"]).max_steps == 64
    assert parse_settings(["--online"]).loss.rpo_alpha == 1.0 and parse_settings([]).loss.rpo_alpha is None
    assert parse_settings(["--online", "--rpo-alpha", "none"]).loss.rpo_alpha is None
    assert parse_settings(["--iterations", "8"]).max_steps == 64
    assert parse_settings(["--online", "--max-steps", "10"]).max_steps == 10
    assert parse_settings(["--model", "m", "--online"]).max_steps is None


def test_a_bad_value_in_a_config_file_names_the_file_and_its_key(tmp_path):
    config = tmp_path / "c1.json"
    config.write_text('{"lr": "abc", "beta": 0.2}')
    with pytest.raises(ConfigError, match=f"^--config {config}: lr must be a number, got 'abc'$"):
        parse_settings(["--config", str(config)])
    assert parse_settings(["--config", str(config), "--lr", "1e-4"]).lr == 1e-4  # the flag's value wins
    config.write_text('{"beta": -1}')
    with pytest.raises(ConfigError, match="^--beta must be positive, got -2.0$"):  # the flag's own value
        parse_settings(["--config", str(config), "--beta", "-2"])


def test_a_batch_coupled_run_records_its_number_of_processes():
    """AOT's result depends on the processes a step is split over: a resume under another number is refused."""
    aot = TrainSettings(loss=LossSettings(loss_type="aot"))
    assert aot.run_identity(2)["processes"] == 2 and aot.run_identity()["processes"] == 1
    assert "processes" not in TrainSettings().run_identity(2)
    from dpo.checkpoint import settings_differences

    assert settings_differences(aot.run_identity(2), aot.run_identity(1), {}) == ["torchrun processes 2 -> 1"]
    legacy = {k: v for k, v in aot.run_identity(2).items() if k != "processes"}  # recorded by an earlier version
    assert settings_differences(legacy, aot.run_identity(1), {"processes": 1}) == []


@pytest.mark.slow
def test_the_run_config_train_py_writes_is_a_config_file(tmp_path):
    """run_config.json holds every setting and what the run derived (RUN_RECORDS, nothing else): as a --config file
    it gives the run's settings back."""
    import train
    from dpo.train_settings import RUN_RECORDS

    from harness import make_run_dir, tiny_run_args

    root = make_run_dir(tmp_path, 24)
    argv = tiny_run_args(root, "run", "--max-steps", "1", "--batch-size", "8", "--beta", "0.3")
    assert train.main(argv) == 0
    written = json.loads((root / "run" / "run_config.json").read_text())
    assert set(written) - set(TrainSettings().to_dict()) == set(RUN_RECORDS)
    expected = parse_settings(argv)
    expected.precision = "fp32"  # what 'auto' ran as on the CPU: recorded resolved
    assert parse_settings(["--config", str(root / "run" / "run_config.json")]) == expected



@pytest.mark.parametrize("divergence, alpha", [("forward_kl", "1.0"), ("alpha_divergence", "0.5")])
def test_an_exponential_f_divergence_without_a_reference_is_refused(divergence, alpha):
    """Without a reference the log-ratio is the summed log-prob (below -40 for most answers), where the transform's
    capped exponent leaves every loss at ln 2 with no gradient."""
    import torch

    from dpo.loss import PreferenceLogps, compute_loss

    summed = [torch.tensor([-100.0, -300.0], requires_grad=True), torch.tensor([-120.0, -250.0], requires_grad=True)]
    flat = compute_loss(PreferenceLogps(*summed, torch.zeros(2), torch.zeros(2)),
                        LossSettings(f_divergence=divergence, f_alpha=float(alpha)))  # what it would train on
    assert torch.allclose(flat.losses, torch.full((2,), 0.6931), atol=1e-4)
    assert not any(g.any() for g in torch.autograd.grad(flat.losses.sum(), summed))
    with pytest.raises(ConfigError, match=rf"^--f-divergence {divergence} with --reference-free: .* every pair's "
                                          r"loss would be ln 2 with no gradient; use reverse_kl or js_divergence$"):
        parse_settings(["--reference-free", "--f-divergence", divergence, "--f-alpha", alpha])
    assert parse_settings(["--reference-free", "--f-divergence", "js_divergence"]).loss.reference_free
    assert parse_settings(["--reference-free", "--f-divergence", "alpha_divergence", "--f-alpha", "0"]).loss.f_alpha == 0
