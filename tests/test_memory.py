"""The CPU allocator settings of dpo.memory: applied by train.py's command line (not by importing it) before the
first tensor, and the user's own win."""

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


HUGE_PAGES_PROBE = (
    "import os, sys, torch, transformers, train; from dpo.memory import tune_cpu_allocator\n"
    "assert 'THP_MEM_ALLOC_ENABLE' not in os.environ, 'importing train tuned the allocator'\n"
    "tune_cpu_allocator()\n"
    "x = torch.ones(64 * 2**20 // 4)\n"
    "print(sum(int(l.split()[1]) for l in open('/proc/self/smaps_rollup') if l.startswith('AnonHugePages')))\n")


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").is_file()
                    or "[never]" in (Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
                                     if Path("/sys/kernel/mm/transparent_hugepage/enabled").is_file() else "[never]"),
                    reason="needs Linux transparent huge pages")
@pytest.mark.slow
def test_importing_train_does_nothing_and_tuning_after_the_imports_still_takes_effect():
    clean = {k: v for k, v in os.environ.items() if k not in ("THP_MEM_ALLOC_ENABLE", "DPO_TUNE_ALLOCATOR")}

    def huge_kb(**env) -> int:
        out = subprocess.run([sys.executable, "-c", HUGE_PAGES_PROBE], cwd=ROOT, env={**clean, **env},
                             capture_output=True, text=True, check=True)
        return int(out.stdout.strip().splitlines()[-1])

    assert huge_kb() >= 32 * 1024  # the 64 MB tensor sits (mostly) in 2 MB pages
    if "[always]" not in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text():
        assert huge_kb(DPO_TUNE_ALLOCATOR="0") == 0  # untuned, the same tensor does not: the setting is what did it


def test_dpo_tune_allocator_0_leaves_everything_alone():
    applied, thp = probe(DPO_TUNE_ALLOCATOR="0")
    assert applied == [] and thp is None
