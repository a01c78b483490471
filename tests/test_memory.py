"""The CPU allocator settings of dpo.memory are applied before torch starts, and the user's own win."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROBE = ("import json, os, sys; from dpo.memory import tune_cpu_allocator; applied = tune_cpu_allocator(); "
         "import torch; print(json.dumps([applied, os.environ.get('THP_MEM_ALLOC_ENABLE')]))")


def probe(**env):
    clean = {k: v for k, v in os.environ.items() if k not in ("THP_MEM_ALLOC_ENABLE", "MALLOC_MMAP_THRESHOLD_",
                                                               "MALLOC_TRIM_THRESHOLD_")}
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env={**clean, **env}, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_settings_are_applied_before_torch_starts():
    applied, thp = probe()
    assert thp == "1"
    assert applied == ["THP_MEM_ALLOC_ENABLE=1", "mallopt malloc_mmap_threshold=33554432",
                       "mallopt malloc_trim_threshold=1073741824"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_values_set_by_the_user_win():
    applied, thp = probe(THP_MEM_ALLOC_ENABLE="0", MALLOC_TRIM_THRESHOLD_="131072")
    assert thp == "0"
    assert applied == ["mallopt malloc_mmap_threshold=33554432"]


def test_thp_is_left_alone_once_torch_is_imported():
    code = ("import os, torch; from dpo.memory import tune_cpu_allocator; tune_cpu_allocator(); "
            "print(os.environ.get('THP_MEM_ALLOC_ENABLE'))")
    clean = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=clean, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "None"  # too late to matter: setting it would only mislead


def test_dpo_tune_allocator_0_leaves_everything_alone():
    applied, thp = probe(DPO_TUNE_ALLOCATOR="0")
    assert applied == [] and thp is None
