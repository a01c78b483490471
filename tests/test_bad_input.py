"""The bad-input matrix: every case is one clear line (exit 2, nothing trained) or a counted, reported skip."""

import json
import re
from types import SimpleNamespace
from pathlib import Path

import pytest

import train
from harness import run_metrics, tiny_run_args, write_pairs

GOOD_ROWS = 24  # model_dir: conftest's


def dataset_with(tmp_path, bad_lines: list[str], name: str = "data.jsonl", good: int = GOOD_ROWS):
    path = tmp_path / name
    write_pairs(path, good)
    with open(path, "ab") as handle:
        for line in bad_lines:
            handle.write(line.encode("utf-8", "surrogateescape") + b"\n")
    return path


def run_cli(model_dir, dataset, out, *extra):
    """train.cli on a one-step tiny run (seed: the default) of these absolute paths; its exit code."""
    return train.cli(tiny_run_args(Path(out), out, "--batch-size", "8", "--micro-batch-size", "4", "--max-steps", "1",
                                   "--max-eval-pairs", "4", *extra, model=model_dir, dataset=dataset, test_size="4",
                                   seed=None))


def assert_one_line_error(capsys, code, *fragments):
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert code == 2, captured.out[-2000:] + captured.err[-2000:]
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err


# ------------------------------------------------------------------ errors: one line, before any training
def test_malformed_jsonl_line(model_dir, tmp_path, capsys):
    data = dataset_with(tmp_path, ['{"prompt": "x", "chosen": "a", "rejected": '])
    assert_one_line_error(capsys, run_cli(model_dir, data, tmp_path / "out"), "data.jsonl", f"line {GOOD_ROWS + 1}",
                          "not valid JSON (Expecting value, column 44)")
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_non_utf8_bytes(model_dir, tmp_path, capsys):
    data = tmp_path / "latin1.jsonl"
    write_pairs(data, GOOD_ROWS)
    with open(data, "ab") as handle:
        handle.write(b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n')
    assert_one_line_error(capsys, run_cli(model_dir, data, tmp_path / "out"), f"line {GOOD_ROWS + 1}", "not UTF-8",
                          "0xe9")


@pytest.mark.parametrize("name", ["data.jsonl", "data.json"])
def test_a_lone_surrogate_escape(model_dir, tmp_path, capsys, name):
    """JSON's \\ud800 parses to a string no tokenizer can encode: the line (or record) is named, not a TypeError."""
    bad = '{"prompt": "x", "chosen": [{"role": "assistant", "content": "a\\ud800b"}], "rejected": "c"}'
    if name == "data.jsonl":
        data, where = dataset_with(tmp_path, [bad]), f"line {GOOD_ROWS + 1}"
    else:
        data, where = tmp_path / name, "record 1"
        data.write_text(f'[{{"prompt": "x", "chosen": "a", "rejected": "b"}}, {bad}]')
    assert_one_line_error(capsys, run_cli(model_dir, data, tmp_path / "out"), f"{name}, {where}: not Unicode text",
                          "a lone surrogate '\\ud800' at character 2")


BIG_INT = "9" * 5000  # more digits than Python converts (sys.get_int_max_str_digits)
DEEP = "[" * 100_000 + "]" * 100_000  # deeper than json recurses


@pytest.mark.parametrize("value, message", [
    (BIG_INT, "not valid JSON (Exceeds the limit (4300 digits) for integer string conversion"),
    (DEEP, "not valid JSON (nested too deeply)"),
], ids=["big_int", "deep_nesting"])
def test_json_that_python_cannot_hold_is_one_line(model_dir, tmp_path, capsys, value, message):
    """An integer of thousands of digits or a nesting thousands deep: json raises ValueError / RecursionError."""
    from dpo.data import DataError, load_records

    bad = f'{{"prompt": {value}, "chosen": "a", "rejected": "b"}}'
    data = dataset_with(tmp_path, [bad])
    assert_one_line_error(capsys, run_cli(model_dir, data, tmp_path / "out"), f"data.jsonl, line {GOOD_ROWS + 1}: "
                          + message)
    array = tmp_path / "array.json"
    array.write_text(f'[{{"prompt": "x", "chosen": "a", "rejected": "b"}},\n {bad}]')
    with pytest.raises(DataError, match=re.escape(f"{array}: {message}")):
        load_records(str(array))


def test_a_pretty_printed_json_file_names_the_line_of_its_error(tmp_path):
    """Not the first line of the file read again as JSON Lines."""
    from dpo.data import DataError, load_records

    path = tmp_path / "pretty.json"
    rows = [{"prompt": f"p{i}", "chosen": "a", "rejected": "b"} for i in range(3)]
    text = json.dumps(rows, indent=2)
    path.write_text(text.replace('"p2"', "p2", 1))
    line = text.splitlines().index('    "prompt": "p2",') + 1
    with pytest.raises(DataError, match=re.escape(f"{path}, line {line}: not valid JSON (Expecting value, column 15)")):
        load_records(str(path))
    path.write_text(text)
    assert load_records(str(path))[0] == rows


@pytest.mark.parametrize("name", ["data.jsonl", "data.json"])
def test_a_byte_order_mark_is_read_as_the_start_of_the_text(tmp_path, name):
    from dpo.data import load_records

    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}] * 2
    text = json.dumps(rows) if name == "data.json" else "".join(json.dumps(r) + "\n" for r in rows)
    (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert load_records(str(tmp_path / name))[0] == rows


def test_a_bad_line_in_a_dataset_directory_names_what_went_wrong(model_dir, tmp_path, capsys):
    folder = tmp_path / "folder"
    folder.mkdir()
    dataset_with(folder, ['{"prompt": "x", "chosen": '], name="train.jsonl")
    assert_one_line_error(capsys, run_cli(model_dir, folder, tmp_path / "out"), "cannot load dataset",
                          f"from file '{folder / 'train.jsonl'}'",
                          f"JSON parse error: Invalid value. in row {GOOD_ROWS}")


def test_a_dataset_directory_whose_splits_differ_in_columns_says_why(model_dir, tmp_path, capsys):
    folder = tmp_path / "folder"
    folder.mkdir()
    write_pairs(folder / "train.jsonl", GOOD_ROWS)
    (folder / "test.jsonl").write_text('{"a": 1}\n')
    assert_one_line_error(capsys, run_cli(model_dir, folder, tmp_path / "out"), "cannot load dataset",
                          "CastError: Couldn't cast ... because column names don't match")


def test_a_prompt_repeated_with_other_kwargs_trains_offline(model_dir, tmp_path):
    """"kwargs" is IFEval's constraint field only for an IFEval judge: a preference file may repeat a prompt with
    other values of its own fields."""
    rows = [json.dumps({"prompt": "what color is the sun?", "chosen": f"yellow {i}", "rejected": "blue",
                        "kwargs": [{"temperature": 0.5 + i}]}) for i in range(2)]
    assert run_cli(model_dir, dataset_with(tmp_path, rows), tmp_path / "out") == 0


def test_unknown_loss_name(model_dir, tmp_path, capsys):
    data = dataset_with(tmp_path, [])
    assert_one_line_error(capsys, run_cli(model_dir, data, tmp_path / "out", "--loss", "sigmod"), "sigmod", "sigmoid")


@pytest.mark.parametrize("flag,value,message", [
    ("--beta", "abc", "invalid float value: 'abc'"),
    ("--precision", "fp8", "invalid choice: 'fp8'"),
    ("--batch-size", "1.5", "invalid int value: '1.5'"),
    ("--lora-alpha", "x", "'x' is not a number or auto"),  # not argparse's "invalid _lora_alpha value"
    ("--max-prompt-length", "half", "'half' is not an integer, auto or none"),
])
def test_wrong_flag_value(model_dir, tmp_path, capsys, flag, value, message):
    """One line, as every user error (argparse prints its whole usage first: 60 lines for train.py)."""
    data = dataset_with(tmp_path, [])
    with pytest.raises(SystemExit) as exit_info:
        run_cli(model_dir, data, tmp_path / "out", flag, value)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: argument {flag}: {message}") and err.count("\n") == 1, err
    assert err.rstrip().endswith("(train.py --help lists the flags)")


@pytest.mark.parametrize("flag,value,message", [("--beta", "-1", "--beta must be positive"),
                                                ("--warmup-ratio", "1.5", "--warmup-ratio"),
                                                ("--batch-size", "6", "multiple of --micro-batch-size"),
                                                ("--test-size", "1.5", "--test-size must be a fraction below 1 or a "
                                                                       "whole count, got 1.5")])
def test_flag_value_out_of_range(model_dir, tmp_path, capsys, flag, value, message):
    data = dataset_with(tmp_path, [])
    assert_one_line_error(capsys, run_cli(model_dir, data, tmp_path / "out", flag, value), message)


def test_missing_model_directory(tmp_path, capsys):
    data = dataset_with(tmp_path, [])
    assert_one_line_error(capsys, run_cli(tmp_path / "no-model", data, tmp_path / "out"), "does not exist")


def test_model_directory_without_tokenizer(model_dir, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((Path(model_dir) / "config.json").read_text())
    data = dataset_with(tmp_path, [])
    assert_one_line_error(capsys, run_cli(bare, data, tmp_path / "out"), "tokenizer")


def test_dataset_with_zero_usable_rows(model_dir, tmp_path, capsys):
    rows = [json.dumps({"prompt": "p", "chosen": "same", "rejected": "same"}) for _ in range(10)]
    data = dataset_with(tmp_path, rows, good=0)
    assert_one_line_error(capsys, run_cli(model_dir, data, tmp_path / "out"), "no usable preference pairs",
                          "identical")


def test_fewer_pairs_than_one_batch(model_dir, tmp_path, capsys):
    data = dataset_with(tmp_path, [], good=8)
    assert_one_line_error(capsys, run_cli(model_dir, data, tmp_path / "out"), "fewer than one batch")


# ------------------------------------------------------------------ counted, reported skips: the run goes on
SKIPPED_ROWS = {  # reason reported -> a row that has it
    "missing_field": json.dumps({"prompt": "p", "chosen": "a"}),
    "wrong_type": json.dumps({"prompt": "p", "chosen": 3, "rejected": "b"}),
    "empty_response": json.dumps({"prompt": "p", "chosen": "   ", "rejected": "b"}),
    "identical_responses": json.dumps({"prompt": "p", "chosen": "same", "rejected": "same"}),
    "prompt_mismatch": json.dumps({
        "chosen": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a"}],
        "rejected": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "b"}]}),
}


@pytest.mark.parametrize("case", sorted(SKIPPED_ROWS))
def test_bad_rows_are_counted_and_reported(model_dir, tmp_path, capsys, case):
    data = dataset_with(tmp_path, [SKIPPED_ROWS[case]] * 3)
    assert run_cli(model_dir, data, tmp_path / "out", "--test-size", "0.01") == 0
    out = capsys.readouterr().out
    report = next(line for line in out.splitlines() if line.startswith("train:"))
    # 3 bad rows (source rows 24-26), one of which may have been split off into the held-out set; the first is named
    # by its row in the file, not in the split
    assert f"skipped: {case} 3 (first: row {GOOD_ROWS}:" in report or \
        f"skipped: {case} 2 (first: row {GOOD_ROWS}:" in report or \
        f"skipped: {case} 2 (first: row {GOOD_ROWS + 1}:" in report, report
    assert [r["step"] for r in run_metrics(tmp_path / "out", "train")] == [1]


def test_a_skipped_row_is_named_by_its_row_in_the_file_not_in_the_split(model_dir, tmp_path, capsys):
    data = dataset_with(tmp_path, [SKIPPED_ROWS["missing_field"]])
    # 8 of the 25 rows split off: in either split, the bad row's place in it is not its row in the file
    assert run_cli(model_dir, data, tmp_path / "out", "--test-size", "8", "--max-eval-pairs", "100") == 0
    out = capsys.readouterr().out
    assert f"missing_field 1 (first: row {GOOD_ROWS}: field 'rejected' is missing)" in out, out


def test_prompt_longer_than_max_length(model_dir, tmp_path, capsys):
    long_prompt = json.dumps({"prompt": "red " * 200, "chosen": "a", "rejected": "b"})
    data = dataset_with(tmp_path, [long_prompt] * 3)
    # cut to --max-prompt-length (keeping its end) and counted ...
    assert run_cli(model_dir, data, tmp_path / "out", "--test-size", "0.01") == 0
    report = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("train:"))
    assert "with the prompt truncated" in report and "(0 with the prompt" not in report, report
    # ... or, when prompts may fill the whole context, skipped and counted
    assert run_cli(model_dir, data, tmp_path / "out2", "--test-size", "0.01", "--max-prompt-length", "none") == 0
    report = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("train:"))
    assert "skipped: prompt_too_long" in report, report


def test_pairs_longer_than_the_models_positions_are_one_line(model_dir, tmp_path, capsys):
    """A learned position table fails mid-run with an index error (a device assert on CUDA); rotary positions run
    past what the model was trained on: refused before training, for the longest pair actually there."""
    import shutil

    small = tmp_path / "model"
    shutil.copytree(model_dir, small)
    config = json.loads((small / "config.json").read_text())
    (small / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 20}))
    data = dataset_with(tmp_path, [json.dumps({"prompt": "red " * 30, "chosen": "a b c d e f g h i j k l m n o",
                                               "rejected": "b"})])
    assert_one_line_error(capsys, run_cli(small, data, tmp_path / "out", "--test-size", "0.01"),
                          "error: --max-length 48: pairs reach ", "tokens, but the model has 20 positions "
                          "(max_position_embeddings); use --max-length 20 or less")
    assert run_cli(small, data, tmp_path / "out2", "--test-size", "0.01", "--max-length", "20", "--max-prompt-length",
                   "10") == 0


def test_pairs_beyond_a_longrope_models_switch_length_are_one_line(model_dir, tmp_path, capsys):
    """Longrope (Phi-3's long-context models) switches to its long rotary factors for a whole forward once any of its
    sequences passes original_max_position_embeddings: a short pair's log-probs would depend on the pairs batched
    with it (the step-0 check would stop the run). Refused before training; within the length it trains."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Phi3Config

    from dpo.modeling import rope_switch_length

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = Phi3Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                        original_max_position_embeddings=30, pad_token_id=tokenizer.pad_token_id,
                        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
                        rope_parameters=dict(rope_type="longrope", short_factor=[1.0] * 4, long_factor=[4.0] * 4,
                                             original_max_position_embeddings=30, rope_theta=10000.0))
    assert rope_switch_length(config) == 30
    assert rope_switch_length(Phi3Config(rope_parameters=dict(rope_type="default", rope_theta=1e4))) is None
    torch.manual_seed(0)
    model = tmp_path / "longrope"
    AutoModelForCausalLM.from_config(config).save_pretrained(model)
    tokenizer.save_pretrained(model)
    capsys.readouterr()  # saving's progress bar
    online = SimpleNamespace(max_length=48, on_policy=SimpleNamespace(enabled=True))
    with pytest.raises(train.ConfigError, match=r"^--max-length 48: pairs can reach 48 tokens, beyond the 30 "):
        train.check_positions(online, SimpleNamespace(train=[], eval=[]), SimpleNamespace(config=config))
    data = dataset_with(tmp_path, [json.dumps({"prompt": "red " * 30, "chosen": "a b c", "rejected": "b"})])
    assert_one_line_error(capsys, run_cli(str(model), data, tmp_path / "out", "--test-size", "0.01"),
                          "error: --max-length 48: pairs reach ", "beyond the 30 (original_max_position_embeddings) "
                          "where the model's longrope rotary frequencies switch", "use --max-length 30 or less")
    assert run_cli(str(model), data, tmp_path / "out2", "--test-size", "0.01", "--max-length", "30",
                   "--max-prompt-length", "16") == 0


def test_tokenizer_without_pad_token_trains(model_dir, tmp_path):
    import shutil

    no_pad = tmp_path / "no-pad"
    shutil.copytree(model_dir, no_pad)
    config_file = no_pad / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config.pop("pad_token", None)
    config_file.write_text(json.dumps(config))
    special = no_pad / "special_tokens_map.json"
    if special.exists():
        mapping = json.loads(special.read_text())
        mapping.pop("pad_token", None)
        special.write_text(json.dumps(mapping))
    data = dataset_with(tmp_path, [])
    assert run_cli(no_pad, data, tmp_path / "out") == 0
    assert (tmp_path / "out" / "final" / "model.safetensors").is_file()


def test_output_disk_too_small_fails_before_training(model_dir, tmp_path, capsys, monkeypatch):
    import collections
    import shutil

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    data = dataset_with(tmp_path, [])
    assert_one_line_error(capsys, run_cli(model_dir, data, tmp_path / "out"), "GiB free", "--save-total-limit")
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_output_dir_that_cannot_be_created(model_dir, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    data = dataset_with(tmp_path, [])
    assert_one_line_error(capsys, run_cli(model_dir, data, blocker / "out"), "not writable")


def small_vocabulary_model(path, rows: int):
    """A tiny Phi that embeds only `rows` token ids, saved with the tiny tokenizer (300 tokens, its EOS id 0)."""
    from harness import tiny_phi, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    model = tiny_phi(vocab_size=rows)
    model.config.bos_token_id = model.config.eos_token_id = model.config.pad_token_id = tokenizer.eos_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, tokenizer


def test_a_token_the_model_cannot_embed_is_one_line_naming_the_pair_and_the_token(tmp_path, capsys):
    """A tokenizer of another model (or with tokens added without resizing the model): a raw index error mid-run
    on the CPU, a device assert on CUDA. Training names the pair, generation the instruction. The model embeds 295
    ids: the recipe template's tokens (up to 294, "Human"), not the tiny tokenizer's last five ("al" ... "es")."""
    from dpo.generation import DecodingSettings, GenerationError, generate_samples
    from dpo.modeling import load_causal_lm
    from dpo.prompts import encode_prompts

    model_dir, tokenizer = small_vocabulary_model(tmp_path / "small", rows=295)
    dataset = tmp_path / "pairs.jsonl"
    write_pairs(dataset, 24)
    capsys.readouterr()
    code = run_cli(model_dir, dataset, tmp_path / "run")
    assert_one_line_error(capsys, code, "pair of row ", "is beyond the model's 295 token embeddings: the tokenizer "
                          "is another model's, or has tokens added without resizing the model")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    prompts = tmp_path / "prompts.jsonl"  # online DPO: instructions alone, named by their row before any sampling
    prompts.write_text("".join(json.dumps({"prompt": text}) + "\n" for text in ["a b", "a", "do bo", "b"] * 3))
    code = run_cli(model_dir, prompts, tmp_path / "online", "--online", "--judge", "demo")
    assert_one_line_error(capsys, code, "error: the instruction of row ", ": token id 29", "is beyond the model's 295 "
                          "token embeddings")
    model = load_causal_lm(str(model_dir))
    decoding = DecodingSettings(greedy=True, max_new_tokens=2)
    assert max(encode_prompts(tokenizer, ["a b"], "recipe", None, "keep_end")[0][0]) < 295
    assert len(generate_samples(model, tokenizer, ["a b"], decoding)) == 1
    with pytest.raises(GenerationError, match=r"^instruction 1: token id 29\d \('(al|bo|do|er|es)'\) is beyond the "
                                              r"model's 295 token embeddings"):
        generate_samples(model, tokenizer, ["a b", "do bo"], decoding)


@pytest.mark.parametrize("module, argv, message", [
    ("generate", ["--max-new-tokens", "x"], "error: argument --max-new-tokens: invalid int value: 'x' (generate.py "
                                            "--help lists the flags)"),
    ("dpo.evaluate", [], "error: the following arguments are required: --model (python -m dpo.evaluate --help lists "
                         "the flags)"),
    ("dpo.ifeval", ["--instructions", "f", "--seed", "q"], "error: argument --seed: invalid int value: 'q' (python "
                                                           "-m dpo.ifeval --help lists the flags)"),
])
def test_every_entry_point_s_flag_errors_are_one_line(module, argv, message, capsys):
    import importlib

    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(module).build_parser().parse_args(argv)
    assert exit_info.value.code == 2 and capsys.readouterr().err == message + "\n"


@pytest.mark.parametrize("name", ["meta", "mps", "xpu", "nonsense"])
def test_a_device_this_does_not_run_on_is_refused_before_any_work(name):
    """meta would "train" on tensors without data; mps and xpu are not what this project is tested on."""
    from dpo.generation import GenerationError, resolve_device
    from dpo.settings import ConfigError
    from dpo.train_settings import parse_settings

    with pytest.raises(ConfigError, match=rf"^--device must be cpu, cuda, cuda:N or auto, got '{name}'$"):
        parse_settings(["--device", name])
    with pytest.raises(GenerationError, match=rf"^--device must be cpu, cuda, cuda:N or auto, got '{name}'$"):
        resolve_device(name)  # generate.py's and dpo.evaluate's, in the same words


def test_a_cuda_device_on_a_machine_without_one_is_named_by_its_flag(model_dir, tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    data = dataset_with(tmp_path, [])
    assert_one_line_error(capsys, run_cli(model_dir, data, tmp_path / "out", "--device", "cuda"),
                          "--device cuda: CUDA is not available on this machine")
    assert not (tmp_path / "out").exists()  # before any work
    from dpo.generation import GenerationError, resolve_device

    with pytest.raises(GenerationError, match=r"^--device cuda:1: CUDA is not available on this machine$"):
        resolve_device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(GenerationError, match=r"^--device cuda:1: this machine has 1 CUDA device\(s\)$"):
        resolve_device("cuda:1")
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
