"""The learning-rate schedule (``schedule.lr_at``, ``schedule.Schedule``) and the paper's warmup scaled to short runs.

Expected values are computed by hand in the comments, never with the code under test.
"""

from __future__ import annotations

import math

import pytest

from vit_repro.core import paper
from vit_repro.core.config import TrainConfig
from vit_repro.core.schedule import Schedule, lr_at

BASE = 1e-3


# ----------------------------------------------------------------------------- warmup

@pytest.mark.parametrize("decay", ["none", "cosine", "linear"])
def test_warmup_starts_at_zero_and_rises_linearly_to_base(decay):
    total, warmup = 80, 9
    assert lr_at(0, BASE, total, warmup, decay) == 0.0
    rates = [lr_at(s, BASE, total, warmup, decay) for s in range(warmup + 1)]
    # a straight line through (0, 0) and (9, base): every step adds base / 9
    for s, lr in enumerate(rates):
        assert lr == pytest.approx(BASE * s / warmup, rel=1e-12, abs=1e-18)
    diffs = [b - a for a, b in zip(rates, rates[1:])]
    assert all(d == pytest.approx(BASE / 9, rel=1e-9) for d in diffs)
    # the full rate is reached exactly at warmup_steps, whatever the decay does afterwards
    assert lr_at(warmup, BASE, total, warmup, decay) == pytest.approx(BASE)


def test_hand_computed_warmup_value():
    # base 1e-3, warmup 9 steps: step 4 -> 4/9 * 1e-3 = 4.444...e-4
    assert lr_at(4, 1e-3, 80, 9, "cosine") == pytest.approx(4.0 / 9.0 * 1e-3, rel=1e-12)
    assert lr_at(4, 1e-3, 80, 9, "cosine") == pytest.approx(4.4444444444e-4, rel=1e-9)


def test_no_warmup_starts_at_full_rate():
    for decay in ("none", "cosine", "linear"):
        assert lr_at(0, BASE, 80, 0, decay) == pytest.approx(BASE)


# ----------------------------------------------------------------------------- decay

@pytest.mark.parametrize("decay", ["cosine", "linear"])
@pytest.mark.parametrize("warmup", [0, 9])
def test_decay_reaches_zero_at_total_steps_and_never_rises(decay, warmup):
    total = 80
    after = [lr_at(s, BASE, total, warmup, decay) for s in range(warmup, total + 1)]
    assert after[0] == pytest.approx(BASE)
    assert after[-1] == pytest.approx(0.0, abs=1e-15)  # 0 at total_steps
    assert all(b <= a + 1e-18 for a, b in zip(after, after[1:])), "the rate rose during decay"
    assert all(b < a for a, b in zip(after, after[1:])), "the rate stalled during decay"
    # the last optimisation step (total - 1) still learns a little
    assert 0 < lr_at(total - 1, BASE, total, warmup, decay) <= BASE / (total - warmup)  # linear: 1/span


def test_cosine_and_linear_hand_computed():
    # warmup 9, total 89 -> the decay spans 80 steps; step 49 is its halfway point (progress 0.5)
    # cosine: 0.5 * (1 + cos(pi/2)) = 0.5; linear: 1 - 0.5 = 0.5
    assert lr_at(49, 1e-3, 89, 9, "cosine") == pytest.approx(0.5e-3, rel=1e-12)
    assert lr_at(49, 1e-3, 89, 9, "linear") == pytest.approx(0.5e-3, rel=1e-12)
    # a quarter of the way (step 29, progress 0.25): cosine 0.5 * (1 + cos(pi/4)) = 0.853553..., linear 0.75
    assert lr_at(29, 1e-3, 89, 9, "cosine") == pytest.approx(0.8535533906e-3, rel=1e-9)
    assert lr_at(29, 1e-3, 89, 9, "linear") == pytest.approx(0.75e-3, rel=1e-12)
    # total 80, warmup 9: the span is 71 steps, so step 79 has progress 70/71
    # cosine: 0.5 * (1 + cos(70 pi / 71)) = 0.5 * (1 - cos(pi / 71)) = 4.8943e-4 of base
    assert lr_at(79, 1e-3, 80, 9, "cosine") == pytest.approx(0.5 * (1 - math.cos(math.pi / 71)) * 1e-3, rel=1e-9)
    assert lr_at(79, 1e-3, 80, 9, "linear") == pytest.approx(1e-3 / 71, rel=1e-9)


def test_cosine_stays_above_linear_in_first_half_and_below_in_second():
    total, warmup = 89, 9
    for s in range(warmup + 1, 49):
        assert lr_at(s, BASE, total, warmup, "cosine") > lr_at(s, BASE, total, warmup, "linear")
    for s in range(50, total):
        assert lr_at(s, BASE, total, warmup, "cosine") < lr_at(s, BASE, total, warmup, "linear")


def test_none_is_constant_after_warmup():
    assert {lr_at(s, BASE, 80, 0, "none") for s in range(81)} == {BASE}
    assert {lr_at(s, BASE, 80, 9, "none") for s in range(9, 81)} == {BASE}


def test_unknown_decay_is_rejected():
    with pytest.raises(ValueError, match="unknown decay 'exponential'"):
        lr_at(20, BASE, 80, 9, "exponential")


# ----------------------------------------------------------------------------- the paper's warmup, scaled

def test_paper_warmup_fraction_is_computed_from_the_papers_numbers():
    # 300 epochs of ImageNet-1k (1,281,167 images) at batch 4096: 384,350,100 / 4096 = 93,835.47 -> 93,835 steps
    assert paper.IMAGENET_STEPS == 93_835
    assert paper.WARMUP_FRACTION == pytest.approx(10_000 / 93_835)
    assert TrainConfig().warmup_fraction == paper.WARMUP_FRACTION
    assert TrainConfig(warmup_fraction="paper").warmup_fraction == paper.WARMUP_FRACTION  # params.yaml's `paper`


def schedule(images: int, epochs: int = 10, drop_last: bool = False, accum: int = 1, warmup: float = 0.0) -> Schedule:
    return Schedule(images=images, batch_size=32, grad_accum_steps=accum, epochs=epochs, drop_last=drop_last,
                    base_lr=BASE, warmup_fraction=warmup, decay="cosine")


def test_steps_and_warmup_for_the_seed_notebooks_run():
    # 225 images, batch 32: 7 full batches + 1 image -> 8 steps/epoch, 80 in 10 epochs; 0.10657 x 80 = 8.53 -> 9
    s = schedule(225, warmup=paper.WARMUP_FRACTION)
    assert (s.steps_per_epoch, s.total_steps, s.last_batch, s.warmup_steps) == (8, 80, 1, 9)
    # the same with the last batch dropped: 7 steps/epoch, 70 steps, 0.10657 x 70 = 7.46 -> 8
    s = schedule(225, drop_last=True, warmup=paper.WARMUP_FRACTION)
    assert (s.steps_per_epoch, s.total_steps, s.last_batch, s.warmup_steps) == (7, 70, 32, 8)


def test_gradient_accumulation_counts_micro_batches():
    # 225 images in micro-batches of 32 with 2 per step: 8 micro-batches -> 4 steps (the last has 32 + 1 images)
    assert schedule(225, accum=2).steps_per_epoch == 4
    # dropping the 1-image batch leaves 7 micro-batches -> 4 steps, the last of one micro-batch
    assert schedule(225, accum=2, drop_last=True).steps_per_epoch == 4
    assert schedule(450, accum=2, drop_last=True).steps_per_epoch == 7  # 14 full micro-batches


def test_schedule_lr_is_lr_at_with_its_own_numbers():
    s = schedule(225, warmup=paper.WARMUP_FRACTION)
    assert [s.lr(k) for k in range(s.total_steps)] == [lr_at(k, BASE, 80, 9, "cosine") for k in range(80)]


def test_dropping_every_batch_is_refused():
    with pytest.raises(ValueError, match="fewer than one batch"):
        schedule(20, drop_last=True)
