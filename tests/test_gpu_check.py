"""The GPU check (benchmarks/gpu_check.sh, gpu_check.py) is ready to run as it is: its parts run train.py's own
functions on the CPU at --smoke's tiny sizes, the script calls only parts that exist within its time budget, and the
summary formats every record the parts write."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402

SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


@pytest.fixture
def smoke_records(monkeypatch, capsys):
    """Every measuring part of the check, run with --smoke in this process: the JSON records it printed."""
    import train

    # the parts hand train.py's loader their in-memory model and set the target: both are put back afterwards
    monkeypatch.setattr(train, "load_causal_lm", train.load_causal_lm)
    monkeypatch.setattr(gpu_check, "target", gpu_check.target)
    for part in ("phi2", "lora", "generate", "profile"):
        gpu_check.main([part, "--smoke"])
    out = capsys.readouterr().out
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


@pytest.mark.slow
def test_every_part_runs_train_py_steps_at_smoke_sizes(smoke_records):
    """Each step measurement is train_step's: the first loss is ln 2 (the policy is its reference before any update,
    up to half-precision rounding), later steps move it, the runs are the layouts and precisions the part names, and
    LoRA trains only its adapters. Sampling gives the new tokens asked for; the profiled step trains."""
    steps = [r for r in smoke_records if r["part"] in ("phi2", "lora")]
    assert [(r["part"], r["layout"], r["precision"], r["gradient_checkpointing"]) for r in steps] == [
        ("phi2", "padded", "bf16", False), ("phi2", "padded", "fp16", False), ("phi2", "padded", "bf16", True),
        ("phi2", "shared_prompt", "bf16", True),  # the phi2 part
        ("lora", "shared_prompt", "fp16", True),  # the lora part: the LoRA config, layout auto (CPU)
        ("phi2", "padded", "bf16", True)]  # the profile part's timed run
    # the profile part's checkpointed step at larger micro-batches (the recipe's 4 x 16 becomes 16 x 4 on a GPU)
    assert [r["micro"] for r in steps] == [4] * 5 + [gpu_check.SMOKE.large_micro]
    # the phi2 part's first run times two steps after its warm-up, the others one
    assert [len(r["step_s"]) for r in steps[:4]] == [3, 2, 2, 2]
    assert gpu_check.SMOKE.large_micro == 8 and gpu_check.GPU.large_micro == 16
    for r in steps:
        assert r["losses"][0] == pytest.approx(math.log(2), abs=2e-3)
        assert all(math.isfinite(x) for x in r["losses"]) and r["losses"][-1] != r["losses"][0]
        assert r["batch"] == 8 and r["tokens_per_s"] > 0 and r["device"] == "cpu"
        assert r["mfu"] is None and r["peak_memory_gb"] is None  # CUDA figures only
    # rank 16 on each decoder layer's linear layers: q, k, v, dense (64 -> 64), fc1 (64 -> 128), fc2 (128 -> 64)
    assert steps[4]["trainable_parameters"] == 2 * (4 * 16 * (64 + 64) + 2 * 16 * (64 + 128))
    assert steps[0]["trainable_parameters"] == sum(p.numel() for p in gpu_check.transformers.PhiForCausalLM(
        gpu_check.transformers.PhiConfig(**gpu_check.SMOKE.model)).parameters())
    generated = [r for r in smoke_records if r["part"] == "generate"]
    assert [r["model"] for r in generated] == ["fp32 weights, bf16 autocast", "bf16 weights"]
    assert all(r["new_tokens"] == 8 and r["rows"] == 4 for r in generated)
    profiled = [r for r in smoke_records if r["part"] == "profile"]
    assert [next(iter(r)) for r in profiled] == ["part", "part"]
    assert profiled[1]["profiled_step"]["loss"] != profiled[0]["warmup_step"]["loss"]
    lines = gpu_check.summary_lines(smoke_records)
    assert len(lines) == len(steps) + len(generated)
    step_lines = [line for line in lines if line.startswith(("phi2", "lora"))]
    assert len(step_lines) == len(steps) and all("MFU -" in line and "peak        -" in line for line in step_lines)


def test_the_summary_formats_gpu_records_and_errors():
    step = {"part": "phi2", "layout": "padded", "precision": "bf16", "gradient_checkpointing": True, "micro": 16,
            "step_s": [9.0, 6.0, 6.5], "tokens_per_s": 9881.2, "mfu": 0.156, "peak_memory_gb": 54.07,
            "reference_pass_s": 2.6}
    oom = {"part": "phi2", "layout": "shared_prompt", "precision": "bf16", "gradient_checkpointing": False,
           "error": "out of memory: CUDA out of memory"}
    sample = {"part": "generate", "model": "bf16 weights", "tokens_per_s": 2176.4, "rows": 64, "new_tokens": 128,
              "peak_memory_gb": 27.5}
    equal = {"part": "equality", "precision": "fp16", "loss_abs_diff": 5.5e-5, "logps_max_rel_diff": 1.6e-3,
             "grad_rel_error": 2.3e-3, "grad_cosine": 1.00002}
    profile_oom = {"part": "profile", "gradient_checkpointing": False, "error": "out of memory: CUDA out of memory"}
    lines = gpu_check.summary_lines([step, oom, sample, {"part": "profile"}, equal, profile_oom])
    assert len(lines) == 5 and lines[4] == "profile gc=False out of memory: CUDA out of memory"
    assert "gc=True  micro=16 step   6.25 s" in lines[0] and "9881 tok/s" in lines[0] and "MFU 0.156" in lines[0] \
        and "peak  54.1 GB" in lines[0]  # the timed steps' mean, the warm-up left out
    assert lines[1].endswith("out of memory: CUDA out of memory")
    assert "2176 new tok/s (64 rows x 128)" in lines[2] and "27.5 GB" in lines[2]
    assert "grad rel error 2.30e-03" in lines[3]


def test_an_out_of_memory_run_is_reported_and_what_it_held_freed(capsys):
    """measured: a run's record is emitted; a CUDA out-of-memory error becomes a record of its own (the part goes on
    with its next run) and the fused head's workspace is given back."""
    from dpo.lm_head import workspace_pool

    assert gpu_check.measured(lambda: {"part": "phi2", "ok": 1}, {"part": "phi2"})
    workspace_pool.reserve(1024, torch.device("cpu"))
    assert workspace_pool.free

    def out_of_memory():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    assert not gpu_check.measured(out_of_memory, {"part": "phi2", "layout": "padded"})
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert records == [{"part": "phi2", "ok": 1}, {"part": "phi2", "layout": "padded",
                                                    "error": "out of memory: CUDA out of memory. Tried to allocate 2.00 GiB"}]
    assert not workspace_pool.free


def test_the_script_calls_existing_parts_within_its_eight_minutes():
    """bash parses the script; each part it runs with gpu_check.py is one the module has, with --smoke passed
    through (but equality, which has none and runs only where pytest is missing, in place of the CUDA tests), the
    parts' time limits add up to 440 s, and each limit ends in a kill."""
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    text = SCRIPT.read_text()
    parts = re.findall(r"^part (\w+) (\d+) (.*)$", text, flags=re.MULTILINE)
    limits = dict((name, int(seconds)) for name, seconds, _ in parts)
    assert sum(limits.values()) - limits["equality"] <= 440 and limits["equality"] <= limits["cuda_tests"]
    # equality, in place of the tests where pytest is missing, compares with CUDA: never in a --smoke run
    assert re.search(r'elif \[\[ \$\{#SMOKE\[@\]\} == 0 \]\]; then[^\n]*\npart equality ', text)
    assert 'if $PY -c "import pytest"' in text
    assert 'timeout -k 5 "$seconds" "$@"' in text
    called = [re.search(r"gpu_check\.py (\w+)", command) for _, _, command in parts]
    assert sorted(m[1] for m in called if m) == sorted(["phi2", "lora", "equality", "generate", "profile"])
    assert set(m[1] for m in called if m) <= set(gpu_check.PARTS)
    assert all("SMOKE" in command for name, _, command in parts if "gpu_check.py" in command and name != "equality")
    assert 'gpu_check.py summary "$REPORT/results.jsonl"' in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_without_a_gpu_the_check_says_so_in_one_line():
    with pytest.raises(SystemExit) as stop:
        gpu_check.main(["phi2"])
    assert str(stop.value) == "error: the GPU check needs a CUDA device (--smoke runs its code paths on the CPU)"


@pytest.mark.parametrize("argv, message", [
    (["summary"], "summary takes the report's results.jsonl"),
    (["phi2", "results.jsonl"], "only summary takes a file"),
    (["equality", "--smoke"], "equality compares the CPU with a CUDA device: it has no --smoke")])
def test_misused_parts_fail_in_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        gpu_check.main(argv)
    assert stop.value.code == 2 and message in capsys.readouterr().err


def test_a_missing_or_broken_results_file_stops_in_one_line(tmp_path):
    with pytest.raises(SystemExit) as stop:
        gpu_check.main(["summary", str(tmp_path / "absent.jsonl")])
    assert str(stop.value) == f"error: {tmp_path / 'absent.jsonl'}: cannot read it (No such file or directory)"
    broken = tmp_path / "results.jsonl"
    broken.write_text('{"part": "generate"}\n\n{"part": \n')
    with pytest.raises(SystemExit) as stop:
        gpu_check.main(["summary", str(broken)])
    assert str(stop.value).startswith(f"error: {broken}, line 3: not JSON")
