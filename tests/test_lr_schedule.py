"""`lr_at`: linear warm-up then cosine decay to lr * min_lr_ratio at max_steps, a pure function of
the (1-based) optimizer step. Checked against values worked out by hand and an independent
formula (cos^2 form of the half-cosine)."""
from __future__ import annotations

import math

import pytest

from ftcluster.config import OptimConfig
from ftcluster.optim import lr_at


def reference(step: int, *, lr: float, warmup: int, max_steps: int, ratio: float) -> float:
    """Written independently of the implementation: (1 + cos(pi t)) / 2 == cos(pi t / 2) ** 2."""
    if step <= warmup:
        return lr * step / warmup
    t = min(1.0, (step - warmup) / (max_steps - warmup))
    return lr * (ratio + (1.0 - ratio) * math.cos(math.pi * t / 2) ** 2)


def test_values_worked_out_by_hand() -> None:
    cfg = OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    # warm-up: step k of 10 is k/10 of the peak; cosine midpoint (step 60 of 10..110) is half way
    expected = {1: 0.1, 5: 0.5, 10: 1.0, 60: 0.55, 110: 0.1, 111: 0.1, 500: 0.1}
    got = {s: lr_at(s, cfg=cfg, max_steps=110) for s in expected}
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("lr, warmup, max_steps, ratio", [
    (2e-4, 10, 100, 0.1), (3e-5, 1, 7, 0.0), (1e-3, 50, 51, 0.5), (1.0, 3, 1000, 1.0),
])
def test_matches_independent_formula(lr: float, warmup: int, max_steps: int, ratio: float) -> None:
    cfg = OptimConfig(lr=lr, warmup_steps=warmup, min_lr_ratio=ratio)
    steps = sorted({1, warmup, warmup + 1, (warmup + max_steps) // 2, max_steps - 1, max_steps, max_steps + 5})
    for s in steps:
        assert lr_at(s, cfg=cfg, max_steps=max_steps) == pytest.approx(
            reference(s, lr=lr, warmup=warmup, max_steps=max_steps, ratio=ratio), rel=1e-12, abs=1e-18), s


def test_warmup_is_linear_from_lr_over_warmup_to_lr() -> None:
    cfg = OptimConfig(lr=6e-4, warmup_steps=6, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg=cfg, max_steps=60) for s in range(1, 7)]
    assert lrs[0] == pytest.approx(6e-4 / 6, rel=1e-12)
    assert lrs[-1] == pytest.approx(6e-4, rel=1e-12)
    steps = [b - a for a, b in zip(lrs, lrs[1:])]
    assert steps == pytest.approx([1e-4] * 5, rel=1e-9), "equal increments: linear"


def test_reaches_the_floor_exactly_at_max_steps_and_stays() -> None:
    cfg = OptimConfig(lr=2e-4, warmup_steps=5, min_lr_ratio=0.25)
    floor = 2e-4 * 0.25
    assert lr_at(40, cfg=cfg, max_steps=40) == pytest.approx(floor, rel=1e-12)
    assert lr_at(39, cfg=cfg, max_steps=40) > floor
    assert all(lr_at(s, cfg=cfg, max_steps=40) == pytest.approx(floor, rel=1e-12) for s in range(40, 60))


def test_monotone_non_increasing_after_warmup() -> None:
    cfg = OptimConfig(lr=1e-3, warmup_steps=20, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg=cfg, max_steps=300) for s in range(20, 320)]
    assert all(b <= a for a, b in zip(lrs, lrs[1:]))
    assert lrs[0] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-4)
    assert max(lr_at(s, cfg=cfg, max_steps=300) for s in range(1, 320)) == pytest.approx(1e-3)


def test_no_warmup_starts_the_cosine_at_step_one() -> None:
    cfg = OptimConfig(lr=1.0, warmup_steps=0, min_lr_ratio=0.0)
    assert lr_at(1, cfg=cfg, max_steps=4) == pytest.approx(reference(1, lr=1.0, warmup=0, max_steps=4, ratio=0.0))
    assert lr_at(1, cfg=cfg, max_steps=4) == pytest.approx(math.cos(math.pi / 8) ** 2)  # ~0.854, not 0
    assert lr_at(2, cfg=cfg, max_steps=4) == pytest.approx(0.5)
    assert lr_at(4, cfg=cfg, max_steps=4) == pytest.approx(0.0, abs=1e-15)
    assert lr_at(1, cfg=cfg, max_steps=1) == pytest.approx(0.0, abs=1e-15), "a one-step run ends at the floor"


def test_max_steps_equal_to_warmup_is_all_warmup() -> None:
    cfg = OptimConfig(lr=1.0, warmup_steps=4, min_lr_ratio=0.1)
    assert [lr_at(s, cfg=cfg, max_steps=4) for s in range(1, 5)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lr_at(5, cfg=cfg, max_steps=4) == pytest.approx(0.1), "past the end: the floor, no division by zero"
