"""Losses: hand-computed values, ignore_index, class weights, multi-label, argument errors."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from seg_core.losses import LOSS_NAMES, build_loss

IGN = 255


def _random_case(k: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, k, 5, 4, generator=g)
    target = torch.randint(0, k, (2, 5, 4), generator=g)
    target[0, 0, :] = IGN
    return logits, target


def test_ce_matches_torch_with_weights_and_ignore() -> None:
    logits, target = _random_case()
    weights = torch.tensor([0.2, 1.0, 3.0])
    loss = build_loss("ce", num_classes=3, class_weights=weights.tolist())(logits, target)
    expected = F.cross_entropy(logits, target, weight=weights, ignore_index=IGN)
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("name", ["ce", "focal", "dice", "dice_ce"])
def test_a_uint8_target_gives_the_int64_targets_loss_with_class_weights(name: str) -> None:
    """The training cache keeps masks as uint8; torch reads a uint8 index as a boolean mask."""
    logits, target = _random_case()
    loss = build_loss(name, num_classes=3, class_weights=[0.2, 1.0, 3.0])
    torch.testing.assert_close(loss(logits, target.to(torch.uint8)), loss(logits, target))
    expected = F.cross_entropy(logits, target, weight=torch.tensor([0.2, 1.0, 3.0]),
                               ignore_index=IGN)
    if name == "ce":
        torch.testing.assert_close(loss(logits, target.to(torch.uint8)), expected)


def test_ce_uniform_logits_is_log_k() -> None:
    target = torch.tensor([[[0, 1, 2], [IGN, 1, 0]]])
    loss = build_loss("ce", num_classes=3)(torch.zeros(1, 3, 2, 3), target)
    assert loss.item() == pytest.approx(math.log(3))


@pytest.mark.parametrize("name", ["ce", "dice", "dice_ce", "focal"])
def test_all_ignored_gives_zero_with_gradient(name: str) -> None:
    logits = torch.randn(1, 2, 3, 3, requires_grad=True)
    loss = build_loss(name, num_classes=2)(logits, torch.full((1, 3, 3), IGN))
    loss.backward()
    assert logits.grad is not None
    assert loss.item() == 0.0  # dice: every class is empty, (0 + s) / (0 + s) = 1


def test_ignored_pixels_do_not_change_the_loss() -> None:
    logits, target = _random_case()
    for name in ("ce", "dice", "focal", "dice_ce"):
        fn = build_loss(name, num_classes=3)
        changed = logits.clone()
        changed[0, :, 0, :] = torch.tensor([50.0, -50.0, 0.0]).view(3, 1)  # only ignored row
        torch.testing.assert_close(fn(changed, target), fn(logits, target))


def test_focal_gamma_zero_is_ce_and_hand_value() -> None:
    logits, target = _random_case()
    w = [1.0, 2.0, 0.5]
    ce = build_loss("ce", num_classes=3, class_weights=w)(logits, target)
    focal0 = build_loss("focal", num_classes=3, class_weights=w, focal_gamma=0.0)(logits, target)
    torch.testing.assert_close(focal0, ce)
    # one pixel, p = (0.75, 0.25), target 0: -(1 - 0.75)**2 * ln 0.75
    one = torch.tensor([math.log(3.0), 0.0]).view(1, 2, 1, 1)
    focal = build_loss("focal", num_classes=2, focal_gamma=2.0)
    focal2 = focal(one, torch.zeros(1, 1, 1, dtype=torch.long))
    assert focal2.item() == pytest.approx(-(0.25**2) * math.log(0.75), rel=1e-5)


def test_soft_dice_hand_values() -> None:
    dice = build_loss("dice", num_classes=2, dice_smooth=0.0)
    logits = torch.zeros(1, 2, 2, 2)  # every probability is 0.5
    # class 0: I = 1.5, |P|+|T| = 2 + 3 -> 0.6; class 1: I = 0.5, 2 + 1 -> 1/3
    target = torch.tensor([[[0, 0], [0, 1]]])
    assert dice(logits, target).item() == pytest.approx(1 - (0.6 + 1 / 3) / 2)
    # with one pixel ignored: class 0: 1 / (1.5 + 2) ; class 1: 0.5 / (1.5 + 1) -> x2
    target_ign = torch.tensor([[[0, 0], [IGN, 1]]])
    assert dice(logits, target_ign).item() == pytest.approx(1 - (2 / 3.5 + 1 / 2.5) / 2)
    weighted = build_loss("dice", num_classes=2, dice_smooth=0.0, class_weights=[0.0, 1.0])
    assert weighted(logits, target).item() == pytest.approx(1 - 1 / 3)


def test_dice_is_near_zero_for_confident_correct_prediction() -> None:
    target = torch.tensor([[[0, 1, 2], [2, 1, 0]]])
    logits = 40.0 * F.one_hot(target, 3).permute(0, 3, 1, 2).float()
    assert build_loss("dice", num_classes=3)(logits, target).item() < 1e-6
    assert build_loss("dice", num_classes=3)(-logits, target).item() > 0.7


def test_dice_ce_is_the_sum() -> None:
    logits, target = _random_case(seed=3)
    total = build_loss("dice_ce", num_classes=3)(logits, target)
    dice = build_loss("dice", num_classes=3)(logits, target)
    parts = dice + build_loss("ce", num_classes=3)(logits, target)
    torch.testing.assert_close(total, parts)


def test_bce_hand_values_ignore_and_channel_weights() -> None:
    logits = torch.zeros(1, 2, 1, 3)
    target = torch.tensor([[[[1, 0, IGN]], [[1, 1, 0]]]], dtype=torch.uint8)  # overlapping labels
    bce = build_loss("bce", num_classes=2)
    assert bce(logits, target).item() == pytest.approx(math.log(2))
    logits2 = torch.tensor([[[[0.0, 0.0, 99.0]], [[2.0, 0.0, 0.0]]]])  # 99 is on the ignored item
    expected = (4 * math.log(2) + math.log(1 + math.exp(-2.0))) / 5  # 5 kept items
    assert bce(logits2, target).item() == pytest.approx(expected, rel=1e-6)
    only_first = build_loss("bce", num_classes=2, class_weights=[1.0, 0.0])
    assert only_first(logits2, target).item() == pytest.approx(math.log(2), rel=1e-6)
    assert getattr(bce, "multilabel") is True


def test_bce_dice_is_the_sum_and_learns_overlap() -> None:
    # the two channels overlap at pixel (0, 0)
    target = torch.tensor([[[[1, 1], [0, 0]], [[1, 0], [1, 0]]]]).float()
    good = 30.0 * (2 * target - 1)
    fn = build_loss("bce_dice", num_classes=2, dice_smooth=0.0)
    assert fn(good, target).item() < 1e-6
    assert fn(-good, target).item() > 10
    bce = build_loss("bce", num_classes=2)(torch.zeros(1, 2, 2, 2), target)
    # sigmoid(0) = .5: channel 0: 2*1/(2+2) = .5; channel 1 the same -> dice loss .5
    assert fn(torch.zeros(1, 2, 2, 2), target).item() == pytest.approx(bce.item() + 0.5)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_gradients_are_finite(name: str) -> None:
    multilabel = name in ("bce", "bce_dice")
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    target = torch.randint(0, 2 if multilabel else 3, (2, 3, 4, 4) if multilabel else (2, 4, 4))
    build_loss(name, num_classes=3)(logits, target).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    assert logits.grad.abs().sum() > 0


def test_bad_arguments_raise_value_error_with_expected_and_got() -> None:
    with pytest.raises(ValueError, match=r"expected one of .*'ce'.*got 'nope'"):
        build_loss("nope", num_classes=2)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"must be 3 non-negative numbers, got \[1.0, 2.0\]"):
        build_loss("ce", num_classes=3, class_weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="num_classes must be >= 1, got 0"):
        build_loss("ce", num_classes=0)
    ce = build_loss("ce", num_classes=3)
    with pytest.raises(ValueError, match=r"expected logits N,3,H,W, got \(1, 2, 4, 4\)"):
        ce(torch.zeros(1, 2, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"expected target of shape \(1, 4, 4\).*got \(1, 4, 5\)"):
        ce(torch.zeros(1, 3, 4, 4), torch.zeros(1, 4, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="expected integer target"):
        ce(torch.zeros(1, 3, 4, 4), torch.zeros(1, 4, 4))
    with pytest.raises(ValueError, match=r"0..2 or ignore_index=255, got \[7\]"):
        ce(torch.zeros(1, 3, 2, 2), torch.tensor([[[0, 7], [1, IGN]]]))
    with pytest.raises(ValueError, match=r"0, 1 or ignore_index=255, got \[2\]"):
        build_loss("bce", num_classes=1)(torch.zeros(1, 1, 1, 2), torch.tensor([[[[1, 2]]]]))


def test_median_frequency_weights_by_hand() -> None:
    from seg_core.losses import median_frequency_weights

    # shares 0.5, 0.3, 0.15, 0.05 -> lower median 0.15: 0.3, 0.5, 1, 3
    assert median_frequency_weights([500, 300, 150, 50]) == pytest.approx((0.3, 0.5, 1.0, 3.0))
    # a class at 0.1% would weigh 200: capped at 10; an absent class gets 1
    assert median_frequency_weights([799, 200, 1, 0], max_weight=10) == pytest.approx(
        (200 / 799, 1.0, 10.0, 1.0))
    assert median_frequency_weights([0, 0]) == (1.0, 1.0)
    with pytest.raises(ValueError, match="non-negative pixel counts"):
        median_frequency_weights([3, -1])


def test_positive_weights_and_bce_pos_weight_by_hand() -> None:
    from seg_core.losses import positive_weights

    # 1000 labelled pixels: on in 500 -> 1; in 100 -> 9; in 10 -> 99 capped at 10; never -> 1
    assert positive_weights([500, 100, 10, 0], 1000) == (1.0, 9.0, 10.0, 1.0)
    with pytest.raises(ValueError, match="0 <= on_pixels <= labelled_pixels"):
        positive_weights([5], 4)
    logits = torch.tensor([0.0, 0.0]).view(1, 2, 1, 1)
    target = torch.tensor([1, 0], dtype=torch.uint8).view(1, 2, 1, 1)
    loss = build_loss("bce", num_classes=2, pos_weight=[3.0, 3.0])(logits, target)
    # log 2 for each channel; the positive one weighs 3: (3 log 2 + log 2) / 2 channels
    assert float(loss) == pytest.approx(2 * math.log(2))
    with pytest.raises(ValueError, match="pos_weight is for the multi-label losses"):
        build_loss("ce", num_classes=2, pos_weight=[1.0, 1.0])
