"""Shared test set-up: the repository on sys.path, offline hubs, the markers, and fixtures used by several files.

The whole suite is `python -m pytest` (what the README and .ci/run run; markers only select, nothing is skipped by
default). The fast loop, for editing (about a minute on 2 CPU cores):

    python -m pytest -m "not slow and not distributed"

Markers:
    slow         a test of seconds: training runs in this process (tiny models, but several optimizer steps with
                 checkpoints, resumes, evaluation), the demo's promise, child processes that train, benchmark or
                 import the whole stack; together most of the suite's time
    distributed  launches train.py under torchrun (2 CPU processes, gloo); slow too, but marked only distributed
    cuda         needs a CUDA GPU (skipped without one; benchmarks/gpu_check.sh runs them)

The fast loop keeps the loss closed forms, masking, data, settings, the small model checks and a few one- and
two-step runs; `-m "slow or distributed"` runs the rest. The ways tests run train.py (tiny-run flags, an
in-process run, torchrun, a child process) are in tests/harness.py.
"""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # train.py, generate.py and the dpo package, also without an install

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one; benchmarks/gpu_check.sh runs "
                                       "them)")
    config.addinivalue_line("markers", "slow: seconds each: training runs, the demo, child processes that train or "
                                       "import the stack (deselect with -m 'not slow')")
    config.addinivalue_line("markers", "distributed: launches train.py under torchrun, several processes (deselect "
                                       "with -m 'not distributed')")


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The `shared` folder beside the repository (tokenizer, real preference pairs); skip where absent."""
    if not SHARED.is_dir():
        pytest.skip("../shared is not present")
    return SHARED


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`): tiny models decode
    token by token, and one thread avoids contention with other test processes."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    """A saved tiny Phi model + tokenizer (harness.make_model_dir), one per module; a str, as CLIs take it."""
    from harness import make_model_dir

    return str(make_model_dir(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture(scope="module")
def gpt2(shared_dir):
    """The GPT-2 BPE from the shared folder (Phi-2's tokenizer family); skip where absent."""
    from transformers import AutoTokenizer

    path = shared_dir / "tokenizers" / "gpt2"
    if not path.is_dir():
        pytest.skip("shared GPT-2 tokenizer not available")
    return AutoTokenizer.from_pretrained(str(path))


@pytest.fixture(scope="module")
def pair_rows(shared_dir) -> list[dict]:
    """The rows of the shared real preference pairs (AlpacaEval prompts, Phi-2 answers); skip where absent."""
    import json

    path = shared_dir / "data" / "alpacaeval-phi2-prefs" / "pairs.jsonl"
    if not path.is_file():
        pytest.skip("shared preference pairs not available")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
