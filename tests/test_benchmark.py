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

from dpo.modeling import DEMO_MODEL_DIR  # noqa: E402


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
