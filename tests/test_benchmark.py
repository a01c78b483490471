"""The throughput benchmark runs train.py's own step with train.py's settings, from a fresh clone (no ../shared)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import throughput  # noqa: E402
from harness import make_model_dir, write_pairs  # noqa: E402

from dpo.data import build_pairs, load_records  # noqa: E402
from dpo.modeling import DEMO_MODEL_DIR, load_tokenizer  # noqa: E402


@pytest.mark.slow
def test_a_run_times_train_step_with_train_py_defaults_on_the_shipped_data(capsys):
    """With the demo's pairs and tokenizer (what a clone without ../shared has): the first step's loss is ln 2
    (policy == reference), the losses fall, and the settings differ from `python train.py`'s only by the
    workload's sizes."""
    throughput.main(["--size", "S", "--dataset", "demo", "--tokenizer", str(DEMO_MODEL_DIR), "--threads", "1"])
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["losses"][0] == pytest.approx(math.log(2), abs=1e-6)
    assert record["losses"][2] < record["losses"][0]
    assert record["pairs_per_s"] > 0 and record["peak_rss_mb"] > 0 and len(record["step_s"]) == 3
    assert record["settings"] == {"batch_size": 16, "micro_batch_size": 4} and record["train_flags"] == []
    assert record["layout"] == "shared_prompt"  # what --layout auto picks for this Phi model


@pytest.mark.slow
def test_train_py_flags_select_the_techniques_and_bad_ones_fail_in_one_line():
    args, flags = throughput.parse_args(["--size", "M", "--preset", "plain", "--layout", "packed"])
    assert flags == throughput.PRESETS["plain"] + ["--layout", "packed"]
    cfg = throughput.workload_config(throughput.SIZES["M"], Path("m"), Path("o"), flags)
    assert (cfg.layout, cfg.scoring.fused_lm_head, cfg.micro_batch_size, cfg.batch_size) == ("packed", False, 4, 32)
    assert throughput.run_spec("dpo:plain --layout packed")[1] == ["--impl", "dpo", "--preset", "plain", "--layout",
                                                                   "packed"]
    fixed = "--max-prompt-length, --seed: fixed by the workload"
    for flags, message in ((["--beta", "-1"], "--beta must be positive"),
                           (["--max-prompt-length", "64", "--seed", "3"], fixed)):
        done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "throughput.py"), *flags],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr


# a chat template that ends every turn with the EOS text, as SmolLM2's ChatML ends it with <|im_end|>
TINY_CHAT = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}<|endoftext|>{% endfor %}"
             "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.mark.slow
def test_a_real_model_gets_train_py_pairs_and_trl_the_same_ids_and_losses(tmp_path, capsys):
    """--model: the pairs are train.py's (its tokenizer loader, --template auto = the model's chat template, its
    truncation defaults at MODEL_SIZE's max_length); TRL's DPOTrainer trains on the same token ids (run_trl checks
    them) and its losses follow this library's step for step."""
    pytest.importorskip("trl")
    model = make_model_dir(tmp_path / "model")
    tokenizer = load_tokenizer(str(model))
    tokenizer.chat_template = TINY_CHAT
    tokenizer.save_pretrained(model)
    data = str(write_pairs(tmp_path / "pairs.jsonl", 12))
    size = {**throughput.MODEL_SIZE, "steps": 1}
    texts, pairs, _ = throughput.model_workload(size, data, str(model))
    count = size["micro"] * size["accum"] * 2
    expected, _ = build_pairs(load_records(data)[0], load_tokenizer(str(model)), template="chat",
                              max_length=size["max_length"], max_prompt_length=size["max_length"] // 2)
    assert pairs == expected[:count] and texts[0]["prompt"].startswith("<user> ")
    assert texts[0]["chosen"].endswith("<|endoftext|>")  # the template's end of turn, the EOS: no second one

    records = {}
    for impl in ("dpo", "trl"):
        throughput.main(["--model", str(model), "--dataset", data, "--steps", "1", "--threads", "1", "--impl", impl])
        records[impl] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert records["dpo"]["losses"] == pytest.approx(records["trl"]["losses"], abs=1e-5)
    assert records["dpo"]["losses"][0] == pytest.approx(math.log(2), abs=1e-6)
    assert records["dpo"]["useful_gflop"] == records["trl"]["useful_gflop"]
    assert records["dpo"]["settings"] == {"batch_size": 4, "micro_batch_size": 2}
    with pytest.raises(SystemExit):
        throughput.parse_args(["--model", str(model), "--size", "S"])  # --size is the Phi workload's
