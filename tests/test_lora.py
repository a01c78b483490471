"""LoRA (peft): adapters on a frozen base, the reference that base, adapter-only checkpoints, merged models."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train
from dpo.train_settings import parse_settings
from dpo.data import collate_pairs
from dpo.logprobs import SequenceScorer
from dpo.lora import REFERENCE_ADAPTER, LoraError, LoraSettings, add_adapters, check_module_names
from dpo.modeling import load_causal_lm
from harness import make_model_dir, make_run_dir, random_pairs, run_metrics, tiny_phi, tiny_run_args, train_tiny

ROOT = Path(__file__).resolve().parents[1]
TIMING = {"pairs_per_s", "tokens_per_s"}
# peft itself asks transformers' deprecated is_gradient_checkpointing when these tests load adapters directly
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = make_run_dir(tmp_path_factory.mktemp("lora"), 80)
    make_model_dir(root / "other", hidden_size=48)  # another base model: other shapes
    return root


LORA_RUN = ("--lr", "1e-2", "--batch-size", "8", "--micro-batch-size", "4", "--max-eval-pairs", "4", "--warmup-ratio",
            "0", "--lora-r", "4")


def from_adapter(path: Path) -> tuple[str, ...]:
    """--adapter PATH in a run of LORA_RUN's flags, less its --lora-r: the adapter's own rank applies."""
    return "--adapter", str(path), "--lora-r", "0"


def args(workdir: Path, out: str, *extra: str) -> list[str]:
    return tiny_run_args(workdir, out, *LORA_RUN, *extra)


def run(workdir: Path, out: str, *extra: str) -> Path:
    return train_tiny(workdir, out, *LORA_RUN, *extra)


def scored(model, pairs, adapters=None, reference=False):
    scorer = SequenceScorer(model)
    with torch.no_grad():
        if reference:
            with adapters.reference():
                return scorer(collate_pairs(pairs, pad_id=0)).sum
        return scorer(collate_pairs(pairs, pad_id=0)).sum


def policy_of(workdir: Path, *flags: str):
    cfg = parse_settings(args(workdir, "unused", *flags))
    return train.build_policy(cfg, torch.device("cpu"))


def test_at_init_the_policy_is_the_reference_and_the_base(workdir):
    policy, adapters = policy_of(workdir)
    pairs = random_pairs(6, 97, seed=1)
    assert sum(p.numel() for p in policy.parameters() if p.requires_grad) == adapters.trainable_parameters() > 0
    assert all("lora_" in name for name, p in policy.named_parameters() if p.requires_grad)
    base = load_causal_lm(str(workdir / "model"))
    want = scored(base, pairs)
    assert torch.equal(scored(policy, pairs), want)  # B = 0: the adapters add exactly nothing
    assert torch.equal(scored(policy, pairs, adapters, reference=True), want)


@pytest.mark.slow
def test_a_step_changes_only_the_adapters_and_the_reference_stays_the_base(workdir):
    cfg = parse_settings(args(workdir, "unused"))
    policy, adapters = train.build_policy(cfg, torch.device("cpu"))
    frozen = {name: p.detach().clone() for name, p in policy.named_parameters() if not p.requires_grad}
    trained = {name: p.detach().clone() for name, p in policy.named_parameters() if p.requires_grad}
    pairs = random_pairs(8, 97, seed=2)
    state = train.build_state(cfg, policy, adapters, device=torch.device("cpu"), dist=train.DistInfo(),
                              collate=lambda p: collate_pairs(p, pad_id=0), workspace_pairs=pairs)
    reference = train.ReferenceLogps(*[scored(policy, pairs).reshape(2, -1)[i] for i in range(2)])
    for _ in range(2):
        train.train_step(state, train.PairBatch(pairs, reference), lr=1e-2)
    for name, p in policy.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name
    assert any(not torch.equal(p, trained[name]) for name, p in policy.named_parameters() if name in trained)
    base = train.load_model(cfg, str(workdir / "model"), torch.device("cpu"))  # loaded as training loads a model
    assert torch.equal(scored(policy, pairs, adapters, reference=True), scored(base, pairs))
    assert not torch.allclose(scored(policy, pairs), scored(base, pairs), atol=1e-3)
    plain = load_causal_lm(str(workdir / "model"))  # unfused GELU: equal to fp32 rounding
    torch.testing.assert_close(scored(policy, pairs, adapters, reference=True), scored(plain, pairs), atol=1e-5,
                               rtol=0)


@pytest.mark.slow
def test_lora_run_resumes_bit_exactly_from_adapter_only_checkpoints(workdir):
    common = ("--max-steps", "4", "--eval-steps", "2", "--loss", "sigmoid:0.7,bco_pair:0.3")
    straight = run(workdir, "straight", *common)
    split = run(workdir, "split", *common, "--stop-at-step", "2")
    checkpoint = split / "checkpoint-2"
    # the adapter's weights only (beside them the tokenizer and dpo_run.json, as in final/)
    assert sorted(p.name for p in (checkpoint / "model").glob("*.safetensors")) == ["adapter_model.safetensors"]
    assert (checkpoint / "model" / "adapter_config.json").is_file()
    assert not (checkpoint / "model" / "config.json").exists()
    adapter = load_file(checkpoint / "model" / "adapter_model.safetensors")
    assert adapter and all("lora_" in key for key in adapter)
    optimizer = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert all("lora_" in name for name in optimizer["state"])
    run(workdir, "split", *common, "--resume")
    a = load_file(straight / "final" / "adapter_model.safetensors")
    b = load_file(split / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda records: [{k: v for k, v in r.items() if k not in TIMING} for r in records]  # noqa: E731
    assert strip(run_metrics(straight)) == strip(run_metrics(split))


@pytest.mark.slow
def test_final_is_an_adapter_directory_and_merging_gives_the_same_logits(workdir):
    out = run(workdir, "merged", "--max-steps", "3", "--merge-lora")
    from peft import AutoPeftModelForCausalLM

    adapter_model = AutoPeftModelForCausalLM.from_pretrained(str(out / "final")).eval()
    merged = load_causal_lm(str(out / "final" / "merged")).eval()
    ids = torch.randint(1, 97, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = adapter_model(input_ids=ids).logits, merged(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    base = load_causal_lm(str(workdir / "model")).eval()
    with torch.no_grad():
        assert not torch.allclose(base(input_ids=ids).logits, want, atol=1e-3)  # training moved the adapter
    # the adapter directory also loads as a plain model (generate.py, dpo.evaluate): the same logits
    with torch.no_grad():
        torch.testing.assert_close(load_causal_lm(str(out / "final")).eval()(input_ids=ids).logits, want, atol=1e-5,
                                   rtol=0)
    assert json.loads((out / "final" / "dpo_run.json").read_text())["lora_r"] == 4
    # merged/ carries the run's settings too: generate.py and dpo.evaluate prompt it as the run trained
    assert (out / "final" / "merged" / "dpo_run.json").read_text() == (out / "final" / "dpo_run.json").read_text()


@pytest.mark.slow
def test_generate_and_evaluate_take_an_adapter_directory(workdir, tmp_path, capsys):
    import generate
    from dpo import evaluate

    out = run(workdir, "serve", "--max-steps", "2")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"instruction": "what color is the sun?"}\n{"instruction": "tell me about the moon"}\n')
    assert generate.main(["--model", str(out / "final"), "--instructions", str(prompts), "--output",
                          str(tmp_path / "out.json"), "--max-new-tokens", "4", "--no-progress"]) == 0
    assert len(json.loads((tmp_path / "out.json").read_text())) == 2
    # the adapter as --model and as --reference: the policy against itself has zero margins
    capsys.readouterr()
    assert evaluate.main(["--model", str(out / "final"), "--reference", str(out / "final"), "--skip-win-rate",
                          "--implicit-reward", "--max-pairs", "4", "--no-progress"]) == 0
    implicit = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["implicit_reward"]
    assert implicit["pairs"] >= 1 and implicit["reward_margin"] == pytest.approx(0.0, abs=1e-6)


def test_an_adapter_whose_base_is_missing_names_the_adapter_and_its_base(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "./gone/sft",
                                                             "peft_type": "LORA"}))
    from dpo.modeling import ModelLoadError, load_tokenizer

    for load in (load_causal_lm, load_tokenizer):  # a directory without tokenizer files takes its base's
        with pytest.raises(ModelLoadError) as error:
            load(str(adapter))
        assert str(error.value) == (f"adapter {adapter}: its base model ./gone/sft (adapter_config.json) cannot be "
                                    "loaded: model directory ./gone/sft does not exist")


@pytest.mark.slow
def test_sft_adapter_is_the_reference_not_the_bare_base(workdir):
    """--adapter: the policy trains a copy of the SFT adapter; the reference is base + that adapter."""
    sft = run(workdir, "sft", "--max-steps", "2")  # an adapter that differs from the bare base
    policy, adapters = policy_of(workdir, *from_adapter(sft / "final"))
    assert REFERENCE_ADAPTER in adapters.peft_model.peft_config
    pairs = random_pairs(6, 97, seed=3)
    from peft import PeftModel

    separately = PeftModel.from_pretrained(load_causal_lm(str(workdir / "model")), str(sft / "final")).eval()
    base = load_causal_lm(str(workdir / "model"))
    want = scored(separately.get_base_model(), pairs)
    assert torch.allclose(scored(policy, pairs, adapters, reference=True), want, atol=1e-5)
    assert not torch.allclose(want, scored(base, pairs), atol=1e-3)
    assert torch.allclose(scored(policy, pairs), want, atol=1e-5)  # the trained copy starts where the SFT adapter is
    out = run(workdir, "from-sft", *from_adapter(sft / "final"), "--max-steps", "2", "--no-precompute-ref")
    assert json.loads((out / "final" / "dpo_run.json").read_text())["reference_model"] == str(sft / "final")
    assert json.loads((out / "final" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str(workdir / "model")
    # training moved the copy; the reference adapter (frozen) did not move: the run's step-0 check passed too
    trained = load_file(out / "final" / "adapter_model.safetensors")
    start = load_file(sft / "final" / "adapter_model.safetensors")
    assert any(not torch.equal(trained[k], start[k]) for k in start)


@pytest.mark.slow
def test_an_adapter_on_another_base_of_the_same_shapes_is_noted_and_saved_with_the_base_it_trained_on(workdir, tmp_path,
                                                                                                   capsys):
    """No check can see an adapter put on another base of the same shapes (its reference is that base with it): the
    run says which base the adapter was trained on, and its final/ adapter names the base it was trained on now, so
    generate.py, dpo.evaluate and --merge-lora load that model."""
    sft = run(workdir, str(tmp_path / "sft"), "--max-steps", "1")
    same_shapes = make_model_dir(tmp_path / "same-shapes", seed=1)
    argv = args(workdir, str(tmp_path / "moved"), *from_adapter(sft / "final"), "--model", str(same_shapes),
                "--max-steps", "1")
    assert train.main(argv) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note: --adapter")]
    assert notes == [f"note: --adapter {sft / 'final'} was trained on {workdir / 'model'} (its adapter_config.json), "
                     f"and this run loads {same_shapes} as its base: an adapter holds changes to its own base, so the "
                     "two must be the same model"]
    saved = json.loads((tmp_path / "moved" / "final" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(same_shapes)
    assert train.main(args(workdir, str(tmp_path / "same"), *from_adapter(sft / "final"), "--max-steps", "1")) == 0
    assert "note: --adapter" not in capsys.readouterr().out  # the base it was trained on: nothing to say


def test_an_sft_adapter_saved_with_dropout_trains_deterministically(workdir, tmp_path):
    """peft adapters are often saved with lora_dropout 0.05-0.1: loaded with --adapter, its dropout would make the
    policy's first log-probs differ from the reference's and stop the run at the step-0 check."""
    sft = run(workdir, "sft-dropout", "--max-steps", "2")
    config = json.loads((sft / "final" / "adapter_config.json").read_text())
    (sft / "final" / "adapter_config.json").write_text(json.dumps({**config, "lora_dropout": 0.1}))
    policy, adapters = policy_of(workdir, *from_adapter(sft / "final"))
    probabilities = [m.p for m in policy.modules() if isinstance(m, torch.nn.Dropout)]
    assert probabilities and set(probabilities) == {0.0}
    out = run(workdir, str(tmp_path / "from-sft"), *from_adapter(sft / "final"), "--max-steps", "2")  # step-0 check
    # its adapter is saved with the dropout it trained with (peft would apply 0.1 to a run continuing from it)
    assert json.loads((out / "final" / "adapter_config.json").read_text())["lora_dropout"] == 0.0
    with pytest.raises(train.ConfigError, match="--lora-dropout with --adapter"):
        parse_settings(args(workdir, "unused", *from_adapter(sft / "final"), "--lora-dropout", "0.1"))


@pytest.mark.parametrize("given", [dict(lora_r=8), dict(lora_alpha=64.0), dict(lora_target_modules="q_proj"),
                                   dict(lora_modules_to_save="lm_head"), dict(lora_r=8, lora_alpha=16.0)],
                         ids=["r", "alpha", "targets", "to_save", "r_alpha"])
def test_an_adapters_own_configuration_is_not_overridden_in_silence(given):
    """With --adapter its adapter_config.json decides rank, alpha and modules: a --lora-r 8 next to a rank-16 adapter
    trained rank 16 and was recorded in run_config.json as 8. The run's own record of "auto" (2.0 at rank 0) is
    accepted, so a run_config.json of an --adapter run is a --config."""
    flags = ", ".join("--" + name.replace("_", "-") for name in given)
    with pytest.raises(train.ConfigError, match=rf"^{flags} with --adapter: the adapter's own rank, alpha and modules"):
        LoraSettings(adapter="sft", **given)
    assert LoraSettings(adapter="sft", lora_alpha=2.0).lora_alpha == 2.0


@pytest.mark.parametrize("flags,message", [
    (("--lora-r", "-1"), "--lora-r must be a non-negative number"),
    (("--lora-target-modules", "no_such_proj"), "--lora-target-modules no_such_proj:"),
    (("--lora-target-modules", "q_proj,v_prj"), "--lora-target-modules q_proj,v_prj: no module of the model is named "
                                                "v_prj (its modules: "),
    (("--lora-modules-to-save", "lm_haed"), "--lora-modules-to-save lm_haed: no module of the model is named lm_haed"),
    (("--load-in-4bit",), "--load-in-4bit quantizes the base with bitsandbytes, which needs a CUDA device"),
    (("--lora-r", "0", "--merge-lora"), "--merge-lora needs LoRA"),
    (("--lora-r", "0", "--lora-alpha", "16", "--lora-dropout", "0.1"),
     "--lora-alpha, --lora-dropout without LoRA: the run would train the whole model and ignore them; set --lora-r"),
    (("--lora-r", "0", "--lora-modules-to-save", "lm_head"), "--lora-modules-to-save without LoRA"),
    (("--lora-target-modules", "q_proj", "--lora-modules-to-save", "q_proj"),
     "q_proj in both --lora-target-modules and --lora-modules-to-save"),
    (("--lora-target-modules", "layers"), "--lora-target-modules layers: layers names a module that holds others "
                                          "(model.layers, a ModuleList); name its layers"),
    (("--lora-modules-to-save", "model"), "--lora-modules-to-save model: model names a module that holds others"),
])
def test_bad_lora_input_is_one_clear_line(workdir, tmp_path, capsys, flags, message):
    argv = args(workdir, "unused") + ["--output-dir", str(tmp_path / "out"), "--max-steps", "1", *flags]
    assert train.cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_module_names_are_matched_as_peft_matches_them():
    """A target module: the name or a name ending in "." and it; a module to save: any name ending in it (peft's
    modules_to_save matches `key.endswith(name)`, so "head" saves lm_head)."""
    base = tiny_phi()
    check_module_names(base, LoraSettings(lora_r=4, lora_target_modules="q_proj,dense", lora_modules_to_save="head"))
    with pytest.raises(LoraError, match="no module of the model is named head"):
        check_module_names(base, LoraSettings(lora_r=4, lora_target_modules="head"))
    with pytest.raises(LoraError, match="no module of the model is named lm_haed"):
        check_module_names(base, LoraSettings(lora_r=4, lora_modules_to_save="lm_head,lm_haed"))


@pytest.mark.slow
def test_an_adapter_of_another_base_model_is_one_clear_line(workdir, tmp_path, capsys):
    other = tmp_path / "other-run"
    argv = args(workdir, "unused") + ["--model", str(workdir / "other"), "--output-dir", str(other), "--max-steps", "1"]
    assert train.main(argv) == 0
    bad = args(workdir, "unused") + ["--output-dir", str(tmp_path / "out"), *from_adapter(other / "final")]
    assert train.cli(bad) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: adapter {other / 'final'} does not fit this base model, trained on")
    assert "\n" not in err
    assert train.cli(args(workdir, "unused") + ["--output-dir", str(tmp_path / "o2"),
                                                *from_adapter(workdir / "model")]) == 2
    assert "not an adapter directory" in capsys.readouterr().err
    weights = other / "final" / "adapter_model.safetensors"  # cut short (a full disk, a copy that stopped): said so
    whole = weights.read_bytes()
    for cut, reason in [(whole[:len(whole) // 2], "incomplete metadata, file not fully covered"),
                        (b"", "header too small")]:
        weights.write_bytes(cut)
        assert train.cli(bad) == 2
        assert capsys.readouterr().err.strip() == (f"error: adapter {other / 'final'}: adapter_model.safetensors cannot "
                                                   f"be read (Error while deserializing header: {reason}); it is cut "
                                                   "short or damaged")
    weights.unlink()
    assert train.cli(bad) == 2
    assert capsys.readouterr().err.strip() == (f"error: adapter {other / 'final'}: no weights (adapter_model.safetensors "
                                               "or adapter_model.bin)")


@pytest.mark.slow
def test_the_lora_recipe_resolves_and_its_code_path_trains_a_tiny_phi(workdir, shared_dir):
    cfg = parse_settings(["--config", "configs/phi2_ultrafeedback_lora.json"])
    recipe = parse_settings(["--config", "configs/phi2_ultrafeedback.json"]).to_dict()
    changed = {k for k, v in cfg.to_dict().items() if v != recipe[k]}
    assert changed == {"lora_r", "lora_alpha", "lora_dropout", "merge_lora", "output_dir"}
    assert (cfg.lora.lora_r, cfg.lora.lora_alpha, cfg.precision) == (16, 32.0, "fp16")
    data = shared_dir / "data" / "alpacaeval-phi2-prefs" / "ultrafeedback_schema"
    out = workdir / "recipe"
    argv = ["--config", "configs/phi2_ultrafeedback_lora.json", "--model", str(workdir / "model"), "--dataset",
            str(data), "--output-dir", str(out), "--num-pairs", "16", "--batch-size", "8", "--micro-batch-size", "4",
            "--max-steps", "2", "--max-length", "64", "--max-prompt-length", "32", "--max-eval-pairs", "4",
            "--no-progress", "--no-plot"]
    assert train.main(argv) == 0  # fp16 autocast on the fp16 base, GradScaler, LoRA, checkpointing, merge
    records = run_metrics(out, "train")
    assert [r["step"] for r in records] == [1, 2] and all(math.isfinite(r["loss"]) for r in records)
    assert (out / "final" / "adapter_config.json").is_file() and (out / "final" / "merged" / "config.json").is_file()


@pytest.mark.slow
def test_the_step_0_check_stops_a_run_whose_reference_is_not_its_start(workdir, tmp_path, capsys, monkeypatch):
    """A wrong reference (here: the reference pass given another model) stops the run before any update."""
    real = train.reference_model

    def wrong_reference(cfg, policy, adapters, device, *, fresh):
        return train.load_model(cfg, str(workdir / "other"), device), lambda: torch.no_grad()

    monkeypatch.setattr(train, "reference_model", wrong_reference)
    argv = args(workdir, "unused") + ["--output-dir", str(tmp_path / "out"), "--max-steps", "2", "--lora-r", "0",
                                      "--model", str(workdir / "model")]
    assert train.cli(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "step 1: before any update the policy's log-probs must equal the reference's" in err and "\n" not in err
    assert "health alert" not in captured.out  # the error line says it: not printed twice
    assert not (tmp_path / "out" / "final").exists()
    # the health alerts' mechanism: printed once and logged as an event (an alert line in metrics.jsonl)
    alerts = run_metrics(tmp_path / "out", "alert")
    assert [(r["alert"], r["step"]) for r in alerts] == [("reference_mismatch", 1)]
    monkeypatch.setattr(train, "reference_model", real)
    assert train.cli(argv[:-2] + ["--model", str(workdir / "model"), "--overwrite"]) == 0


@pytest.mark.slow
def test_modules_to_save_train_in_full_and_the_reference_keeps_the_original(workdir):
    """--lora-modules-to-save lm_head: a trainable copy of the head is saved with the adapter; the fused LM head
    reads the copy in the policy and the original in the reference."""
    cfg = parse_settings(args(workdir, "unused", "--lora-modules-to-save", "lm_head"))
    policy, adapters = train.build_policy(cfg, torch.device("cpu"))
    head = policy.get_output_embeddings()
    assert head.weight.requires_grad
    pairs = random_pairs(8, 97, seed=4)
    base = load_causal_lm(str(workdir / "model"))
    want = scored(base, pairs)
    torch.testing.assert_close(scored(policy, pairs), want, atol=1e-5, rtol=0)
    state = train.build_state(cfg, policy, adapters, device=torch.device("cpu"), dist=train.DistInfo(),
                              collate=lambda p: collate_pairs(p, pad_id=0), workspace_pairs=pairs)
    reference = train.ReferenceLogps(*want.reshape(2, -1))
    for _ in range(2):
        train.train_step(state, train.PairBatch(pairs, reference), lr=1e-2)
    torch.testing.assert_close(scored(policy, pairs, adapters, reference=True), want, atol=1e-5, rtol=0)
    moved = scored(policy, pairs)
    assert not torch.allclose(moved, want, atol=1e-3)
    out = run(workdir, "to-save", "--lora-modules-to-save", "lm_head", "--max-steps", "2")
    saved = load_file(out / "final" / "adapter_model.safetensors")
    assert any("lm_head" in key for key in saved) and any("lora_" in key for key in saved)


def test_a_lora_adapter_on_the_lm_head_is_scored_and_trained(workdir):
    """--lora-target-modules q_proj,lm_head: the head's LoRA layer adds B A h to W h, which the fused head (it reads
    W and b) would leave out: its log-probs are the unfused path's and its B moves."""
    cfg = parse_settings(args(workdir, "unused", "--lora-target-modules", "q_proj,lm_head"))
    policy, adapters = train.build_policy(cfg, torch.device("cpu"))
    head = policy.get_output_embeddings()
    assert hasattr(head, "lora_A")
    with torch.no_grad():
        for module in (head.lora_B["default"], head.lora_A["default"]):
            module.weight.normal_(0, 0.5)  # an adapter that changes the head's logits
    pairs = random_pairs(8, 97, seed=5)
    plain = SequenceScorer(policy, fused_lm_head=False)
    with torch.no_grad():
        want = plain(collate_pairs(pairs, pad_id=0))
        base = scored(load_causal_lm(str(workdir / "model")), pairs)
    assert not torch.allclose(want.sum, base, atol=1e-2)  # the head's adapter counts
    torch.testing.assert_close(scored(policy, pairs), want.sum, atol=1e-5, rtol=0)  # default (fused) settings
    state = train.build_state(cfg, policy, adapters, device=torch.device("cpu"), dist=train.DistInfo(),
                              collate=lambda p: collate_pairs(p, pad_id=0), workspace_pairs=pairs)
    before = head.lora_B["default"].weight.detach().clone()
    train.train_step(state, train.PairBatch(pairs, train.ReferenceLogps(*want.sum.reshape(2, -1))), lr=1e-2)
    assert not torch.equal(head.lora_B["default"].weight, before)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_half_base_trains_modules_to_save_with_fp32_master_weights(workdir, tmp_path, precision):
    """Under LoRA the base loads in half precision; what trains in full (modules_to_save) gets an fp32 master copy,
    so the GradScaler can unscale its gradients (fp16) and its updates are not rounded to bf16."""
    cfg = parse_settings(args(workdir, "unused", "--precision", precision, "--lora-modules-to-save", "lm_head"))
    policy, adapters = train.build_policy(cfg, torch.device("cpu"))
    trained = {name: p for name, p in policy.named_parameters() if p.requires_grad}
    assert any("lm_head" in name and "lora_" not in name for name in trained)
    assert {p.dtype for p in trained.values()} == {torch.float32}
    assert {p.dtype for p in policy.parameters() if not p.requires_grad} == {AUTOCAST[precision]}
    before = {name: p.detach().clone() for name, p in trained.items()}
    pairs = random_pairs(8, 97, seed=3)
    state = train.build_state(cfg, policy, adapters, device=torch.device("cpu"), dist=train.DistInfo(),
                              collate=lambda p: collate_pairs(p, pad_id=0), workspace_pairs=pairs)
    assert (state.scaler is not None) == (precision == "fp16")
    with train.autocast(cfg, torch.device("cpu")):
        reference = train.ReferenceLogps(*scored(policy, pairs).float().reshape(2, -1))
    record = train.train_step(state, train.PairBatch(pairs, reference), lr=1e-2)
    assert math.isfinite(record["loss"]) and record["skipped_steps"] == 0
    head = [name for name in trained if "lm_head" in name and "lora_" not in name]
    assert all(not torch.equal(trained[name], before[name]) for name in head)  # the head's update was applied
    # loaded again (a resume's checkpoint, --adapter), the fp32 weights are exact, not rounded by the half base's copy
    adapters.save(tmp_path / "adapter")
    reloaded, _ = train.build_policy(cfg, torch.device("cpu"), weights=str(tmp_path / "adapter"))
    again = {name: p for name, p in reloaded.named_parameters() if p.requires_grad}
    assert again.keys() == trained.keys() and all(torch.equal(again[n], trained[n]) for n in trained)


def test_a_trained_embedding_copy_feeds_the_half_base_in_its_dtype(workdir, tmp_path):
    """--lora-modules-to-save embed_tokens under bf16: the fp32 copy's output went into the bf16 base, whose
    LayerNorm on the CPU refuses fp32 input (a traceback at step 1)."""
    out = run(workdir, str(tmp_path / "emb"), "--precision", "bf16", "--lora-modules-to-save", "embed_tokens",
              "--max-steps", "2")
    saved = load_file(out / "final" / "adapter_model.safetensors")
    embedding = [key for key in saved if "embed_tokens" in key]
    assert embedding and all(saved[key].dtype == torch.float32 for key in embedding)
    start = load_causal_lm(str(workdir / "model")).get_input_embeddings().weight
    assert not torch.equal(saved[embedding[0]], start)  # it trained


AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16}


@pytest.mark.parametrize("precision,dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_qlora_computes_in_the_runs_half_precision(monkeypatch, precision, dtype):
    """The 4-bit layers compute in the autocast dtype: fp16 under --precision fp16 (no bf16 before Ampere)."""
    import sys
    import types

    from dpo.lora import LoraSettings, quantization_config

    monkeypatch.setitem(sys.modules, "bitsandbytes", types.ModuleType("bitsandbytes"))
    settings = LoraSettings(lora_r=4, load_in_4bit=True)
    config = quantization_config(settings, torch.device("cuda"), compute_dtype=dtype)
    assert config.load_in_4bit and config.bnb_4bit_compute_dtype == dtype
    assert quantization_config(LoraSettings(lora_r=4), torch.device("cuda"), dtype) is None


def test_quantized_base_under_fsdp_is_refused_in_one_line(workdir):
    with pytest.raises(train.ConfigError, match="--load-in-4bit / --load-in-8bit do not run under --fsdp"):
        parse_settings(args(workdir, "unused", "--load-in-4bit", "--fsdp"))


def test_peft_is_imported_without_bitsandbytes_cpu_kernel_warning():
    """peft imports bitsandbytes where installed, whose CPU backend warns at import that it cannot fetch a hub kernel
    no run uses: import_peft keeps that logger to errors. Where bitsandbytes warns on a plain import (in a fresh
    interpreter), import_peft's import does not."""
    import logging
    import subprocess
    import sys

    from dpo.modeling import BITSANDBYTES_CPU_LOGGER, KERNELS_HUB_LOGGER, import_peft

    assert import_peft().LoraConfig is not None
    assert logging.getLogger(BITSANDBYTES_CPU_LOGGER).getEffectiveLevel() == logging.ERROR
    # offline, `kernels` says it skips the publisher check of that kernel: one stray line per adapter loaded
    assert logging.getLogger(KERNELS_HUB_LOGGER).getEffectiveLevel() == logging.ERROR
    plain = subprocess.run([sys.executable, "-c", "import peft"], capture_output=True, text=True, cwd=ROOT)
    quiet = subprocess.run([sys.executable, "-c", "from dpo.modeling import import_peft; import_peft()"],
                           capture_output=True, text=True, cwd=ROOT)
    assert plain.returncode == 0 and quiet.returncode == 0, plain.stderr + quiet.stderr
    assert "gemm_4bit_forward" not in quiet.stderr


def test_saving_an_adapter_looks_nothing_up_and_warns_nothing(workdir, tmp_path, recwarn):
    """peft's default checks on the hub whether the base's vocabulary changed (warning where it cannot: offline, a
    model from a GGUF file); no run resizes it, so the adapter is saved without that check."""
    base = load_causal_lm(str(workdir / "model"))
    base.config.name_or_path = "no-such-org/no-such-model"  # not a directory: peft would ask the hub
    adapters = add_adapters(base, LoraSettings(lora_r=4))
    for config in adapters.peft_model.peft_config.values():
        config.base_model_name_or_path = "no-such-org/no-such-model"
    adapters.save(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert [str(w.message)[:80] for w in recwarn if "peft" in w.filename] == []


def test_the_adapter_base_note_compares_what_is_recorded_and_never_stops_a_run(tmp_path):
    from types import SimpleNamespace

    from dpo.lora import adapter_base_note

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    for recorded, loaded, noted in [(None, "base", False), ("base", "base", False), ("base", "other", True),
                                    (str(tmp_path), str(tmp_path / "."), False)]:
        (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": recorded}))
        note = adapter_base_note(str(adapter), SimpleNamespace(name_or_path=loaded))
        assert (note is not None) == noted, (recorded, loaded, note)
