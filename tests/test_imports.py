"""Importing the package changes no global registry: registration happens where a feature is used."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
before = (set(AttentionInterface._global_mapping), set(ALL_MASK_ATTENTION_FUNCTIONS._global_mapping))
import dpo.data, dpo.packing, dpo.splits, dpo.logprobs, dpo.evaluate, train  # noqa: E401,F401
after = (set(AttentionInterface._global_mapping), set(ALL_MASK_ATTENTION_FUNCTIONS._global_mapping))
assert before == after, [sorted(b - a) for a, b in zip(before, after)]
assert sorted(dpo.data.BUILTIN_SOURCES) == ["demo"]
assert "dpo.demo.task" not in __import__("sys").modules  # the demo's data is loaded only when asked for
print("ok")
"""


@pytest.mark.slow
def test_importing_the_package_registers_nothing():
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_packed_attention_is_registered_when_a_model_is_switched_to_it():
    from transformers import AttentionInterface

    from dpo.packing import PACKED_ATTENTION, enable_packed_attention
    from harness import tiny_phi

    model = tiny_phi()
    model.config._attn_implementation = "sdpa"
    enable_packed_attention(model)
    assert model.config._attn_implementation == PACKED_ATTENTION and PACKED_ATTENTION in AttentionInterface()
