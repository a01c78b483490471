import math

import pytest
import torch
from transformers import get_cosine_schedule_with_warmup

from dpo.schedule import lr_at, warmup_steps_for


@pytest.mark.parametrize("total,ratio", [(312, 0.03), (62, 0.03), (10, 0.0), (100, 0.1)])
def test_matches_transformers_cosine_schedule(total, ratio):
    peak = 3e-5
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup_steps_for(total, ratio), total)
    for step in range(total):
        assert lr_at(step, total_steps=total, peak_lr=peak, warmup_ratio=ratio) == pytest.approx(
            optimizer.param_groups[0]["lr"], rel=1e-12, abs=1e-18)
        optimizer.step()
        scheduler.step()


def test_recipe_schedule_landmarks():
    # phi-2-dpo: 10k pairs / batch 64 = 156 steps per epoch, 2 epochs, 3% warmup
    total, peak = 312, 3e-5
    warmup = warmup_steps_for(total, 0.03)
    assert warmup == math.ceil(0.03 * 312) == 10
    assert lr_at(0, total_steps=total, peak_lr=peak, warmup_ratio=0.03) == 0.0
    assert lr_at(5, total_steps=total, peak_lr=peak, warmup_ratio=0.03) == pytest.approx(peak / 2)
    assert lr_at(warmup, total_steps=total, peak_lr=peak, warmup_ratio=0.03) == pytest.approx(peak)
    mid = warmup + (total - warmup) // 2
    assert lr_at(mid, total_steps=total, peak_lr=peak, warmup_ratio=0.03) == pytest.approx(peak / 2, rel=1e-2)
    assert lr_at(total, total_steps=total, peak_lr=peak, warmup_ratio=0.03) == pytest.approx(0.0, abs=1e-20)
    assert lr_at(total, total_steps=total, peak_lr=peak, warmup_ratio=0.03, min_lr_ratio=0.1) == pytest.approx(peak * 0.1)
