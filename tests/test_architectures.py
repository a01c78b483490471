"""Llama, Mistral, Qwen2, GPT-2 and Gemma-2 train, and every fast scoring path equals the plain one on each and on
Granite and Cohere.

Gemma-2 is the odd one: transformers has no SDPA path for its attention (eager, padded layout only) and it
soft-caps its logits, which the completion-only log-probs must reproduce; Granite and Cohere scale theirs.
"""

import math

import pytest
import torch
from transformers import (AutoConfig, AutoModelForCausalLM, CohereConfig, FalconConfig, Gemma2Config, GPT2Config,
                          GraniteConfig, LlamaConfig, MistralConfig, PersimmonConfig, Qwen2Config, StableLmConfig)

import train
from dpo import logprobs
from dpo.data import collate_pairs
from dpo.logprobs import SequenceScorer, disable_dropout, dropout_as_loaded
from dpo.modeling import ModelLoadError, attention_implementation, load_causal_lm
from dpo.packing import PackingError, collate_packed, collate_shared_prompt
from test_speed_paths import dpo_loss_and_grads
from harness import random_pairs, run_metrics, tiny_run_args, tiny_tokenizer, write_pairs

VOCAB = 97
LAYOUTS = {"padded": lambda pairs: collate_pairs(pairs, pad_id=0), "packed": collate_packed,
           "shared_prompt": collate_shared_prompt}


def tiny_config(arch: str, vocab_size: int = VOCAB):
    ids = dict(bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if arch == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=128, resid_pdrop=0.0,
                          embd_pdrop=0.0, attn_pdrop=0.0, **ids)
    common = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, **ids)
    if arch == "gemma2":
        # Gemma-2's cap of 30 on logits of random weights (|logit| < 0.5 at the usual init) would change the
        # log-probs by ~1e-5 only: larger weights make the soft-capping matter
        return Gemma2Config(head_dim=8, initializer_range=0.25, **common)
    # logits scaled by a constant of the config (LOGIT_SCALES), with weights large enough for the scale to matter
    if arch == "granite":
        return GraniteConfig(logits_scaling=8.0, initializer_range=0.25, **common)
    if arch == "cohere":
        return CohereConfig(logit_scale=0.0625, initializer_range=0.25, **common)
    return {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[arch](**common)


def tiny_model(arch: str, vocab_size: int = VOCAB, seed: int = 0):
    """A random model of `arch` with the attention load_causal_lm would choose, dropout off."""
    config = tiny_config(arch, vocab_size)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attention_implementation(config))
    disable_dropout(model)
    return model


ARCHITECTURES = ["llama", "mistral", "qwen2", "gpt2", "gemma2"]
FAST_PATHS = {"fused": ("padded", {}), "unfused": ("padded", dict(fused_lm_head=False)),
              "packed": ("packed", {}), "shared_prompt": ("shared_prompt", {})}
SCALED_LOGITS = ["granite", "cohere"]
CASES = [(arch, path) for arch in ARCHITECTURES + SCALED_LOGITS for path in FAST_PATHS
         if arch != "gemma2" or FAST_PATHS[path][0] == "padded"]


def plain_and_fast(model, path: str, pairs, with_wpo: bool = True):
    """Log-prob statistics of the plain path (full logits, padded rows) and of the fast path `path`."""
    layout, overrides = FAST_PATHS[path]
    plain = SequenceScorer(model, completion_only=False, with_wpo=with_wpo, with_stats=True)(LAYOUTS["padded"](pairs))
    fast = SequenceScorer(model, with_wpo=with_wpo, with_stats=True, **overrides)(LAYOUTS[layout](pairs))
    return plain, fast


def test_attention_is_sdpa_except_where_transformers_has_none():
    assert [tiny_model(arch).config._attn_implementation for arch in ARCHITECTURES] == ["sdpa"] * 4 + ["eager"]
    assert logprobs.logit_softcap(tiny_model("gemma2")) == 30.0
    assert {logprobs.logit_softcap(tiny_model(arch)) for arch in ARCHITECTURES[:4]} == {None}


@pytest.mark.parametrize("arch,path", CASES)
def test_fast_paths_equal_the_plain_path(arch, path):
    """Log-probs (and WPO's), the sigmoid-DPO loss and every parameter gradient, tied embeddings included."""
    model = tiny_model(arch)
    if arch in ("gpt2", "gemma2"):
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    pairs = random_pairs(6, VOCAB, seed=1)
    with torch.no_grad():
        plain, fast = plain_and_fast(model, path, pairs)
    torch.testing.assert_close(fast.sum, plain.sum, atol=1e-5, rtol=0)
    torch.testing.assert_close(fast.count, plain.count, atol=0, rtol=0)
    torch.testing.assert_close(fast.wpo, plain.wpo, atol=1e-5, rtol=0)
    torch.testing.assert_close(fast.logits, plain.logits, atol=1e-4, rtol=1e-5)  # the mean logit, from W's mean
    torch.testing.assert_close(fast.entropy, plain.entropy, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(fast.top1, plain.top1, atol=0, rtol=0)

    layout, overrides = FAST_PATHS[path]
    steps, reference = [[0, 1, 2], [3, 4, 5]], -torch.arange(6, dtype=torch.float32)
    want = dpo_loss_and_grads(model, SequenceScorer(model, completion_only=False), steps, LAYOUTS["padded"], pairs,
                              reference)
    got = dpo_loss_and_grads(model, SequenceScorer(model, **overrides), steps, LAYOUTS[layout], pairs, reference)
    assert got[0] == pytest.approx(want[0], abs=1e-5)
    assert any(g.abs().max() > 1e-3 for g in want[1])
    for a, b in zip(got[1], want[1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["gemma2"] + SCALED_LOGITS)
@pytest.mark.parametrize("fused_lm_head", [True, False])
def test_log_probs_need_the_soft_cap_or_scale_and_a_model_without_it_takes_the_full_logits(monkeypatch, arch,
                                                                                           fused_lm_head):
    """Without Gemma-2's soft cap or Granite's / Cohere's logit scale, the completion-only log-probs would be wrong:
    the cap or scale is what makes the fast paths above equal the plain one. Each model is checked once, on 8
    tokens: one whose logits are post-processed otherwise (here: the cap or scale unknown) is scored from its full
    logits, exactly, with a warning, in every layout and by sequence_logps as dpo.evaluate and the judges call it."""
    if arch == "gemma2":
        monkeypatch.setattr(logprobs, "logit_softcap", lambda model: None)
    else:
        monkeypatch.setattr(logprobs, "LOGIT_SCALES", {})
    pairs = random_pairs(6, VOCAB, seed=1)
    model = tiny_model(arch)
    with pytest.warns(UserWarning, match=r"its logits are not lm_head\(last hidden state\) .* so its log-probs come "
                                         r"from model\(\.\.\.\)\.logits"):
        fast_scorer = SequenceScorer(model, fused_lm_head=fused_lm_head)
    with torch.no_grad():
        plain = SequenceScorer(model, completion_only=False)(LAYOUTS["padded"](pairs)).sum
        torch.testing.assert_close(fast_scorer(LAYOUTS["padded"](pairs)).sum, plain, atol=1e-5, rtol=0)
        batch = LAYOUTS["padded"](pairs)
        direct = logprobs.sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        torch.testing.assert_close(direct.sum, plain, atol=1e-5, rtol=0)
        if arch != "gemma2":  # packed layouts need SDPA
            torch.testing.assert_close(fast_scorer(LAYOUTS["shared_prompt"](pairs)).sum, plain, atol=1e-5, rtol=0)
    # the check is what keeps the numbers right: the response-only path taken anyway is off by far more than rounding
    monkeypatch.setattr(logprobs, "response_only_exact", lambda model: True)
    with torch.no_grad():
        wrong = SequenceScorer(model, fused_lm_head=fused_lm_head)(LAYOUTS["padded"](pairs)).sum
    assert (wrong - plain).abs().max() > 1e-2


@pytest.mark.parametrize("factor", [1.002, 1.0])
def test_a_fp32_model_whose_logits_are_transformed_by_a_fraction_of_a_percent_is_not_scored_response_only(factor):
    """In fp32 both paths run the same matmul: a logit transform of 0.2% (under half precision's allowance of 1%)
    is found, and the model is scored from its full logits; the plain model passes."""
    model = tiny_model("llama")
    model.register_forward_hook(lambda module, args, output: output.__setitem__("logits", output.logits * factor))
    if factor == 1.0:
        assert logprobs.response_only_exact(model)
        return
    with pytest.warns(UserWarning, match=r"its logits are not lm_head\(last hidden state\)"):
        assert not logprobs.response_only_exact(model)


def test_the_head_check_runs_once_per_model_and_leaves_its_modes(monkeypatch):
    model = tiny_model("llama")
    model.train()
    model.model.layers[0].eval()  # a frozen part of a model that trains
    calls = []
    real = logprobs._head_logits_difference
    monkeypatch.setattr(logprobs, "_head_logits_difference", lambda m: calls.append(m) or real(m))
    for _ in range(2):
        SequenceScorer(model)
    assert len(calls) == 1 and logprobs.response_only_exact(model)
    assert model.training and not model.model.layers[0].training and model.model.layers[1].training


def test_logit_scales_are_read_from_the_config():
    assert logprobs.logit_scale(tiny_model("granite")) == 1 / 8 and logprobs.logit_scale(tiny_model("cohere")) == 0.0625
    assert {logprobs.logit_scale(tiny_model(arch)) for arch in ARCHITECTURES} == {None}


def test_gemma2_scorer_reserves_no_fused_workspace():
    pairs = random_pairs(4, VOCAB, seed=2)
    assert SequenceScorer(tiny_model("gemma2")).reserve_workspace(pairs, 2) == 0
    assert SequenceScorer(tiny_model("llama")).reserve_workspace(pairs, 2) > 0
    logprobs.workspace_pool.clear()


def test_gemma2_packed_layouts_fail_in_one_line():
    model = tiny_model("gemma2")
    for layout in ("packed", "shared_prompt"):
        with pytest.raises(PackingError, match=r"^[^\n]*'eager'; use --layout padded$"):
            SequenceScorer(model)(LAYOUTS[layout](random_pairs(2, VOCAB)))


@pytest.fixture(scope="module")
def gemma2_dir(tmp_path_factory):
    """A saved tiny Gemma-2 with the tiny tokenizer (EOS = BOS = pad), and 40 preference pairs."""
    root = tmp_path_factory.mktemp("gemma2")
    tokenizer = tiny_tokenizer()
    model = tiny_model("gemma2", vocab_size=len(tokenizer))
    eos = tokenizer.eos_token_id
    for config in (model.config, model.generation_config):
        config.bos_token_id = config.eos_token_id = config.pad_token_id = eos
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    write_pairs(root / "pairs.jsonl", 40)
    return root


def test_load_causal_lm_falls_back_to_eager_only_where_sdpa_is_missing(gemma2_dir, tmp_path):
    assert load_causal_lm(str(gemma2_dir / "model")).config._attn_implementation == "eager"
    tiny_model("llama").save_pretrained(tmp_path / "llama")
    assert load_causal_lm(str(tmp_path / "llama")).config._attn_implementation == "sdpa"
    (tmp_path / "llama" / "config.json").write_text('{"model_type": "no-such-architecture"}')
    with pytest.raises(ModelLoadError, match=r"^model .*llama: could not be loaded \([^\n]*\)$"):
        load_causal_lm(str(tmp_path / "llama"))


def test_soft_capped_attention_is_never_given_to_sdpa(monkeypatch):
    """SDPA cannot soft-cap attention scores: a config that sets attn_logit_softcapping loads eager and is refused
    by the packed layouts, even where transformers' class would claim an SDPA path."""
    from transformers import Gemma2ForCausalLM

    from dpo.packing import packing_problem

    monkeypatch.setattr(Gemma2ForCausalLM, "_supports_sdpa", True)
    config = tiny_config("gemma2")
    assert config.attn_logit_softcapping is not None and attention_implementation(config) == "eager"
    model = tiny_model("llama")
    model.config.attn_logit_softcapping = 50.0
    assert "soft-cap" in packing_problem(model, 16)



@pytest.mark.parametrize("config, why", [
    (StableLmConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128),
     "PackingError: the model's layers do not pass the packed blocks on to its attention"),
    (FalconConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, alibi=True),
     "ValueError: too many values to unpack")], ids=["stablelm", "falcon_alibi"])
def test_a_model_whose_forward_cannot_run_packed_blocks_is_padded(config, why):
    """StableLM's layers call attention without the forward's extra arguments, so the blocks never reach it (plain
    SDPA then met an empty mask: a raw size error mid-run); Falcon with ALiBi computes attention its own way. A
    packed row of two short sequences, run once, finds it: auto takes padded, a packed layout is refused in one
    line, and the model is left in its own attention."""
    from dpo.packing import check_packable, packing_problem

    model = AutoModelForCausalLM.from_config(config, attn_implementation=attention_implementation(config))
    assert model.config._attn_implementation == "sdpa"
    assert why in packing_problem(model, 16) and model.config._attn_implementation == "sdpa"
    with pytest.raises(PackingError, match="fail in the model's forward .*; use --layout padded$"):
        check_packable(model, 16)
    layout, _ = train.collator(train.parse_settings(["--layout", "auto"]), 0, model)
    assert layout == "padded" and packing_problem(tiny_model("llama"), 16) is None


def _drop_kwargs(module: torch.nn.Module, names: tuple[str, ...]) -> None:
    def hook(module, args, kwargs):
        return args, {k: v for k, v in kwargs.items() if k not in names}
    module.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("flaw", ["blocks", "positions"])
def test_a_model_that_silently_computes_a_packed_row_otherwise_is_padded(flaw):
    """A model can run a packed row without an error and still not compute each sequence's own log-probs: attention
    that never receives the blocks (nor the empty mask) runs the row as one causal sequence, the later sequences
    attending to the earlier ones; a body that ignores position_ids counts positions across the row. The probe
    compares the row's log-probs with the sequences run alone: auto takes padded, a packed layout is refused."""
    from dpo.packing import check_packable, packing_problem

    if flaw == "blocks":
        model = tiny_model("llama")
        for layer in model.model.layers:
            _drop_kwargs(layer.self_attn, ("packed_blocks", "attention_mask"))
    else:  # absolute positions: a tiny random RoPE model's attention is too flat to tell positions apart
        model = tiny_model("gpt2")
        _drop_kwargs(model.transformer, ("position_ids",))
    assert "do not compute what the model computes for each sequence alone" in packing_problem(model, 16)
    with pytest.raises(PackingError, match="differ by up to .*; use --layout padded$"):
        check_packable(model, 16)
    layout, _ = train.collator(train.parse_settings(["--layout", "auto"]), 0, model)
    assert layout == "padded"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("arch", [a for a in ARCHITECTURES + SCALED_LOGITS if a != "gemma2"])
def test_the_packing_probe_passes_the_models_packed_rows_compute_exactly(arch, dtype):
    from dpo.packing import packing_problem

    assert packing_problem(tiny_model(arch).to(dtype), 16) is None


def test_the_packing_probe_allows_the_rounding_of_its_precision():
    """The probe's packed row and its sequences alone run in other batch shapes, whose half-precision logits may round
    apart: a few steps of bf16 at the largest logit (0.125 at 30) are rounding, in fp32 they are a difference; a
    difference of context is one in every precision."""
    from dpo.packing import logp_difference

    torch.manual_seed(0)
    alone = torch.randn(5, 50) * 10
    alone[0, 0] = 30.0
    step = torch.zeros_like(alone)
    step[1, 3] = 2 * 0.125  # two bf16 steps of the largest logit
    assert logp_difference(alone + step, alone, "bf16") is None
    assert logp_difference(alone + step, alone, "fp32") == pytest.approx(0.25, abs=0.01)
    other = alone.clone()
    other[2] = torch.randn(50) * 10  # another context's prediction
    for precision in ("fp32", "tf32", "bf16", "fp16"):
        assert logp_difference(other, alone, precision) > 1.0


def test_the_packing_probe_runs_once_per_check_never_per_forward():
    """The probe is a whole forward of the model: packing_problem runs it once, a packed micro-batch's forward
    (the policy's, the reference's, every step's) never."""
    from dpo.packing import packing_problem

    model = tiny_model("llama")
    probes = []  # the probe calls the whole model with packed blocks (the scorer calls its body)
    model.register_forward_pre_hook(lambda module, args, kwargs: probes.append("packed_blocks" in kwargs),
                                    with_kwargs=True)
    torch.manual_seed(3)
    state = torch.random.get_rng_state()
    attention = [m for m in model.modules() if hasattr(m, "attention_dropout")]
    for m in attention:
        m.attention_dropout = 0.5  # dropout draws in train mode: the probe leaves the RNG as it was
    assert packing_problem(model.train(), 16) is None and probes.count(True) == 1
    assert torch.equal(torch.random.get_rng_state(), state)
    for m in attention:
        m.attention_dropout = 0.0
    probes.clear()
    scorer = SequenceScorer(model)
    for layout in ("shared_prompt", "packed", "shared_prompt"):
        scorer(LAYOUTS[layout](random_pairs(3, VOCAB, seed=0)))
    assert True not in probes

# models that read a dropout probability from their config at every forward, not from a module built with it
CONFIG_DROPOUT = {
    "falcon": lambda vocab_size=VOCAB, **ids: FalconConfig(
        vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, hidden_dropout=0.5,
        attention_dropout=0.5, **ids),
    "persimmon": lambda vocab_size=VOCAB, **ids: PersimmonConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        hidden_dropout=0.5, attention_dropout=0.5, **ids),
}


@pytest.mark.parametrize("arch", CONFIG_DROPOUT)
def test_dropout_read_from_the_config_is_off_and_saved_as_loaded(arch, tmp_path):
    """Falcon adds its residuals through a dropout of `config.hidden_dropout`, Persimmon's attention drops with
    `config.attention_dropout`, read at every forward: disable_dropout zeroes the config's values too, and a model
    saved within dropout_as_loaded writes them as loaded."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIG_DROPOUT[arch]()).train()
    ids = torch.randint(1, VOCAB, (2, 16))
    assert not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)  # dropout is on at first
    disable_dropout(model)
    disable_dropout(model)  # twice: the values as loaded are still the first ones
    torch.testing.assert_close(model(input_ids=ids).logits, model(input_ids=ids).logits, atol=0, rtol=0)
    with dropout_as_loaded(model):
        model.save_pretrained(tmp_path)
    assert (model.config.hidden_dropout, model.config.attention_dropout) == (0.0, 0.0)
    torch.testing.assert_close(model(input_ids=ids).logits, model(input_ids=ids).logits, atol=0, rtol=0)
    saved = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert (saved.config.hidden_dropout, saved.config.attention_dropout) == (0.5, 0.5)


@pytest.mark.slow
def test_a_config_with_dropout_trains_from_its_reference_and_is_saved_as_loaded(tmp_path):
    """Full fine-tuning of a Falcon whose config asks for dropout 0.5: the step-0 check (the policy equals its
    reference) passes, the first loss is log 2, and the checkpoint and final/ keep the config's dropout."""
    tokenizer = tiny_tokenizer()
    eos = tokenizer.eos_token_id
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIG_DROPOUT["falcon"](bos_token_id=eos, eos_token_id=eos,
                                                                      pad_token_id=eos, vocab_size=len(tokenizer)))
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    write_pairs(tmp_path / "pairs.jsonl", 40)
    assert train.main(train_args(tmp_path, "run", "--save-steps", "1")) == 0
    records = run_metrics(tmp_path / "run", "train")
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    for directory in ("final", "checkpoint-1/model"):
        saved = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / directory)
        assert (saved.config.hidden_dropout, saved.config.attention_dropout) == (0.5, 0.5)


def train_args(root, out: str, *extra: str) -> list[str]:
    return tiny_run_args(root, out, "--batch-size", "8", "--micro-batch-size", "4", "--max-steps", "2",
                         "--max-eval-pairs", "4", "--lr", "1e-3", *extra)


@pytest.mark.slow
def test_gemma2_trains_end_to_end_with_the_defaults(gemma2_dir, capsys):
    assert train.main(train_args(gemma2_dir, "run")) == 0
    records = run_metrics(gemma2_dir / "run", "train")
    assert len(records) == 2
    assert all(isinstance(r["loss"], float) and math.isfinite(r["loss"]) for r in records)
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # the policy starts as the reference
    capsys.readouterr()

    assert train.cli(train_args(gemma2_dir, "packed", "--layout", "packed")) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "use --layout padded" in errors[0]


def test_packed_layouts_refuse_a_sliding_window_shorter_than_the_sequences():
    """Packed blocks attend over whole sequences: with a sliding window shorter than a sequence they would not
    compute what the model computes, so they refuse it (one line), while a window longer than every sequence
    gives the plain numbers."""
    from dpo.packing import attention_window, check_packable

    model = tiny_model("mistral")
    pairs = random_pairs(6, VOCAB, seed=1)  # sequences of up to 17 tokens
    model.config.sliding_window = 4
    assert attention_window(model.config) == 4 and attention_window(tiny_model("qwen2").config) is None
    for layout in ("packed", "shared_prompt"):
        with pytest.raises(PackingError, match="sliding window of 4 tokens") as error:
            SequenceScorer(model)(LAYOUTS[layout](pairs))
        assert "\n" not in str(error.value) and "--layout padded" in str(error.value)
    with pytest.raises(PackingError, match="sliding window of 4 tokens and sequences reach 48"):
        check_packable(model, 48)
    model.config.sliding_window = 32
    with torch.no_grad():
        plain, fast = plain_and_fast(model, "packed", pairs)
    torch.testing.assert_close(fast.sum, plain.sum, atol=1e-5, rtol=0)


def tiny_llama4(chunk: int):
    """A tiny Llama-4 text model: its body is `.model` though its base_model_prefix says otherwise, and its layers
    attend within chunks of `chunk` positions."""
    config = AutoConfig.for_model("llama4_text", vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                  intermediate_size_mlp=64, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
                                  attention_chunk_size=chunk, num_local_experts=2, num_experts_per_tok=1,
                                  interleave_moe_layer_step=1, no_rope_layers=[1, 1], initializer_range=0.3,
                                  bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attention_implementation(config))
    disable_dropout(model)
    return model.eval()


def test_llama4_is_scored_response_only_and_its_chunked_attention_refuses_packing():
    """Llama-4 keeps its body as `.model` (base_model is the LM itself): response-only scoring reads the hidden
    states from it. Its layers attend within chunks: packed blocks attend over whole sequences, so sequences longer
    than a chunk are refused in one line, and shorter ones give the plain numbers."""
    from dpo.packing import attention_chunk, check_packable

    pairs = random_pairs(6, VOCAB, seed=1)  # sequences of up to 17 tokens
    model = tiny_llama4(chunk=4)
    assert model.base_model is model and attention_chunk(model.config) == 4
    assert attention_chunk(tiny_model("llama").config) is None
    with torch.no_grad():
        plain, fast = plain_and_fast(model, "fused", pairs)
    torch.testing.assert_close(fast.sum, plain.sum, atol=1e-5, rtol=0)
    for layout in ("packed", "shared_prompt"):
        with pytest.raises(PackingError, match=r"attends within chunks of 4 tokens and sequences reach \d+") as error:
            SequenceScorer(model)(LAYOUTS[layout](pairs))
        assert "\n" not in str(error.value) and "--layout padded" in str(error.value)
    with pytest.raises(PackingError, match="chunks of 4 tokens and sequences reach 48"):
        check_packable(model, 48)
    model = tiny_llama4(chunk=64)
    with torch.no_grad():
        plain, fast = plain_and_fast(model, "shared_prompt", pairs)
    torch.testing.assert_close(fast.sum, plain.sum, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "sampled"])
def test_k_samples_from_one_prompt_forward_are_the_repeated_prompts_samples(arch, greedy):
    """generate_batch(num_samples=k) computes each prompt once and repeats its KV cache: the responses are those of
    the prompts repeated k times (left padding, positions and every architecture's cache included)."""
    from dpo.generation import DecodingSettings, generate_batch

    tokenizer = tiny_tokenizer()
    model = tiny_model(arch, vocab_size=len(tokenizer)).eval()
    prompts = ["what color is the sun?", "yes", "tell me about the big blue moon please"]
    decoding = DecodingSettings(greedy=greedy, max_new_tokens=10, seed=3)
    shared = generate_batch(model, tokenizer, prompts, decoding, batch_size=3, num_samples=4)
    repeated = generate_batch(model, tokenizer, [p for p in prompts for _ in range(4)], decoding, batch_size=12)
    assert shared == repeated
    assert len(shared) == 12 and sum(map(len, shared)) > 0
    if not greedy:
        assert len(set(shared[:4])) > 1  # the k samples of a prompt are distinct draws


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_the_preallocated_cache_samples_what_the_dynamic_cache_samples(arch, monkeypatch):
    """generate_batch writes each new token's keys and values in place (PreallocatedLayer): its samples, one and k
    per prompt, are token for token those of transformers' DynamicCache, and a prompt longer than the room left
    for it (the buffers double) as well."""
    from transformers import DynamicCache

    from dpo import generation

    tokenizer = tiny_tokenizer()
    model = tiny_model(arch, vocab_size=len(tokenizer)).eval()
    prompts = ["what color is the sun?", "yes", "tell me about the big blue moon please"]
    decoding = generation.DecodingSettings(max_new_tokens=10, seed=3)

    def samples():
        return [generation.generate_batch(model, tokenizer, prompts, decoding, batch_size=3, num_samples=k)
                for k in (1, 4)]

    preallocated = generation.preallocated_cache
    if arch in ("llama", "qwen2", "gpt2"):  # full attention only; sliding-window layers keep DynamicCache's
        assert all(isinstance(layer, generation.PreallocatedLayer) for layer in preallocated(model, 16).layers)
    in_place = samples()
    monkeypatch.setattr(generation, "preallocated_cache", lambda model, capacity: DynamicCache(config=model.config))
    assert samples() == in_place
    monkeypatch.setattr(generation, "preallocated_cache", lambda model, capacity: preallocated(model, 3))
    assert samples() == in_place


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "sampled"])
def test_decode_gives_what_transformers_generate_gives(arch, greedy):
    """dpo.generation.decode takes finished rows out of the batch and draws tokens by the exponential race: its
    tokens are those of transformers' own sampling, generate(temperature=0.7, top_k=0, top_p=0.9), row for row,
    for a left-padded batch whose rows end at different steps, decoded from the prompts or from a shared prompt
    cache."""
    from transformers import GenerationConfig

    from dpo.generation import (DecodingSettings, decode, left_pad, preallocated_cache, sampling_processors,
                                shared_prompt_cache)
    from dpo.prompts import encode_prompts

    tokenizer = tiny_tokenizer()
    model = tiny_model(arch, vocab_size=len(tokenizer)).eval()
    prompts = ["what color is the sun?", "yes", "tell me about the big blue moon please", "why", "a b c d e f",
               "the moon is made of cheese, is it not?"]
    ids, mask = left_pad(encode_prompts(tokenizer, prompts, "recipe")[0], 0)
    width, new = ids.shape[1], 20
    decoding = DecodingSettings(greedy=greedy, temperature=0.7, top_p=0.9, max_new_tokens=new)

    def generate(eos: list[int]) -> torch.Tensor:
        sampling = {} if greedy else dict(temperature=0.7, top_p=0.9, top_k=0)
        config = GenerationConfig(do_sample=not greedy, max_new_tokens=new, pad_token_id=0, eos_token_id=eos,
                                  **sampling)
        torch.manual_seed(5)
        with torch.no_grad():
            return model.generate(input_ids=ids, attention_mask=mask, generation_config=config)[:, width:]

    endless = generate([len(tokenizer)])  # an id no row draws: every row runs to the end
    first_drawn: dict[int, tuple[int, int]] = {}  # token -> (step, row) of its first draw
    for step in range(endless.shape[1]):
        for row, token in enumerate(endless[:, step].tolist()):
            first_drawn.setdefault(token, (step, row))

    def ends(eos: set[int]) -> list[int]:  # the step after a row's first EOS (its tokens are the same until then)
        return [next((step + 1 for step, token in enumerate(row) if token in eos), new) for row in endless.tolist()]

    # as EOS, tokens first drawn late (later for later rows, or just late): rows that end at different steps
    candidates = [{token for token, (step, row) in first_drawn.items() if step >= 2 + 3 * row}] + [
        {token for token, (step, _) in first_drawn.items() if step >= late} for late in (2, 4, 8)]
    eos = next((c for c in candidates if min(ends(c)) < new and len(set(ends(c))) > 1), set())
    if len(set(map(tuple, endless.tolist()))) > 1:  # (a tiny Gemma-2 repeats one token in every row)
        assert eos, "no tokens end the rows at different steps"
    want = generate(sorted(eos))
    want = torch.nn.functional.pad(want, (0, new - want.shape[1]), value=0)
    torch.manual_seed(5)
    got = decode(model, ids, mask, preallocated_cache(model, width + new), new, sampling_processors(decoding), greedy,
                 sorted(eos), 0)
    assert torch.equal(got, want)

    torch.manual_seed(5)
    got_shared = decode(model, ids, mask, shared_prompt_cache(model, ids, mask, 1, width + new), new,
                        sampling_processors(decoding), greedy, sorted(eos), 0)
    assert torch.equal(got_shared, want)


def test_the_preallocated_layer_holds_what_a_dynamic_layer_holds():
    """PreallocatedLayer against DynamicLayer through a prefill, repeats, steps within and past its capacity, a
    selection of rows and a crop: the same keys and values at every step, and no new buffer within the capacity."""
    from transformers.cache_utils import DynamicLayer

    from dpo.generation import PreallocatedLayer

    torch.manual_seed(0)
    fast, plain = PreallocatedLayer(capacity=8), DynamicLayer()

    def step(new: int, batch: int) -> None:
        keys, values = torch.randn(batch, 2, new, 4), torch.randn(batch, 2, new, 4)
        for got, want in zip(fast.update(keys, values), plain.update(keys, values), strict=True):
            assert torch.equal(got, want)
        assert fast.get_seq_length() == plain.get_seq_length()

    step(5, 2)
    for layer in (fast, plain):
        layer.batch_repeat_interleave(3)
    step(1, 6)
    buffer = fast._buffers[0]
    assert buffer.shape == (6, 2, 8, 4)
    step(1, 6)
    step(1, 6)
    assert fast._buffers[0] is buffer  # 8 positions: written in place
    step(1, 6)
    assert fast._buffers[0].shape[-2] == 16  # the ninth doubled the buffers
    for layer in (fast, plain):
        layer.batch_select_indices(torch.tensor([0, 2, 5]))
    step(2, 3)
    for layer in (fast, plain):
        layer.crop(-3)
    step(1, 3)
    assert fast.get_seq_length() == 9
