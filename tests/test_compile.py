"""--compile: the compiled policy trains as the eager one does, with a bounded number of compilations."""

import pytest
import torch
from safetensors.torch import load_file

import train
from dpo.settings import ConfigError
from harness import make_run_dir, run_metrics, tiny_run_args


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return make_run_dir(tmp_path_factory.mktemp("compile"), 90)


def args(workdir, out, *extra):
    return tiny_run_args(workdir, out, "--lr", "1e-2", "--batch-size", "8", "--micro-batch-size", "4", "--max-steps",
                         "10", "--eval-steps", "5", "--max-eval-pairs", "8", *extra)


@pytest.mark.slow
def test_compiled_equals_eager_and_compiles_a_bounded_number_of_times(workdir):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    assert train.main(args(workdir, "compiled", "--compile")) == 0
    compiled_frames = counters["frames"]["ok"]
    # 20 micro-batches of 20 different widths and the evaluations: once shapes are seen to vary they are traced as
    # dynamic, so the compilations stop growing with the number of steps (measured: 3 to 4)
    assert 1 <= compiled_frames <= 6, dict(counters["frames"])
    assert train.main(args(workdir, "eager", "--layout", "padded")) == 0
    a, b = (load_file(workdir / run / "final" / "model.safetensors") for run in ("compiled", "eager"))
    for key in a:  # inductor orders the fp32 sums its own way: 10 Adam steps at lr 1e-2 move apart by ~3e-5
        torch.testing.assert_close(a[key], b[key], atol=1e-4, rtol=0)
    ma, mb = (run_metrics(workdir / run) for run in ("compiled", "eager"))
    assert [r.get("loss") for r in ma] == pytest.approx([r.get("loss") for r in mb], abs=1e-5)


@pytest.mark.parametrize("layout", ["packed", "shared_prompt"])
def test_compile_refuses_the_packed_layouts_in_one_line(workdir, layout):
    with pytest.raises(ConfigError, match=f"--compile with --layout {layout}: .* use --layout padded"):
        train.main(args(workdir, f"refused-{layout}", "--compile", "--layout", layout))
