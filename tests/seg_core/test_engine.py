"""Training math: a tiny U-Net overfits, schedules resume exactly, clipping and decay groups."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from seg_core.config import ModelConfig
from seg_core.config import MaskSpec
from seg_core.engine import WarmupDecay, build_optimizer, build_scheduler, train_step
from seg_core.losses import build_loss
from seg_core.metrics import compute_metrics, mask_counts
from seg_core.model import UNet

IGN = 255


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _synthetic_batch(n: int = 4, size: int = 16) -> dict[str, torch.Tensor]:
    """Noisy images with a bright square; the mask marks the square (class 1)."""
    g = torch.Generator().manual_seed(0)
    images = 0.3 * torch.randn(n, 1, size, size, generator=g)
    masks = torch.zeros(n, size, size, dtype=torch.long)
    for i in range(n):
        top, left = (int(v) for v in torch.randint(0, size - 6, (2,), generator=g))
        masks[i, top:top + 6, left:left + 6] = 1
    images += masks.unsqueeze(1).float()
    masks[:, 0, 0] = IGN  # some ignored pixels
    return {"image": images, "mask": masks}


def _tiny_unet() -> nn.Module:
    torch.manual_seed(0)
    return UNet(ModelConfig(in_channels=1, num_classes=2, depth=2, base_width=8, norm="group"))


def test_tiny_unet_overfits_a_tiny_batch() -> None:
    model, batch = _tiny_unet(), _synthetic_batch()
    optimizer = build_optimizer(model, lr=1e-2)
    scheduler = build_scheduler(optimizer, total_steps=30, warmup_steps=3)
    loss_fn = build_loss("ce", num_classes=2)
    losses = [
        train_step(model, batch, loss_fn, optimizer, scheduler=scheduler, clip_grad=5.0)["loss"]
        for _ in range(30)
    ]
    assert losses[-1] < 0.3 * losses[0]  # about 0.59 -> 0.11
    with torch.inference_mode():
        pred = model.eval()(batch["image"]).argmax(dim=1)  # N,H,W
    counts = mask_counts(pred, batch["mask"], MaskSpec(num_classes=2, ignore_index=IGN))
    assert compute_metrics(**counts)["per_class"]["iou"][1] > 0.8


def test_train_step_with_bf16_autocast_returns_finite_numbers() -> None:
    model, batch = _tiny_unet(), _synthetic_batch(n=2)
    optimizer = build_optimizer(model, lr=1e-3)
    loss_fn = build_loss("ce", num_classes=2)
    out = train_step(model, batch, loss_fn, optimizer, amp_dtype=torch.bfloat16)
    assert set(out) == {"loss", "grad_norm", "lr"}
    assert math.isfinite(out["loss"]) and out["grad_norm"] > 0 and out["lr"] == pytest.approx(1e-3)


def test_grad_clipping_bounds_the_update() -> None:
    model, batch = _tiny_unet(), _synthetic_batch(n=2)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    out = train_step(model, batch, build_loss("ce", num_classes=2), optimizer, clip_grad=1e-3)
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert out["grad_norm"] > 1e-2  # the raw norm is reported ...
    # ... but the SGD step is the clipped gradient
    assert (after - before).norm().item() == pytest.approx(1e-3, rel=1e-3)


def test_no_weight_decay_on_biases_and_norms() -> None:
    optimizer = build_optimizer(_tiny_unet(), lr=1e-3, weight_decay=0.05)
    decays = {g["weight_decay"]: g["params"] for g in optimizer.param_groups}
    assert all(p.ndim > 1 for p in decays[0.05]) and all(p.ndim == 1 for p in decays[0.0])


def test_schedule_values_by_hand() -> None:
    cosine = WarmupDecay(total_steps=10, warmup_steps=2)
    assert [cosine(0), cosine(1), cosine(2)] == pytest.approx([0.5, 1.0, 1.0])
    assert cosine(6) == pytest.approx(0.5)  # halfway through the 8 decay steps
    assert cosine(10) == pytest.approx(0.0) and cosine(50) == pytest.approx(0.0)
    poly = WarmupDecay(total_steps=10, warmup_steps=2, schedule="poly", power=2.0, min_lr_ratio=0.1)
    assert poly(6) == pytest.approx(0.1 + 0.9 * 0.25)
    with pytest.raises(ValueError, match="got total_steps=5, warmup_steps=6"):
        WarmupDecay(total_steps=5, warmup_steps=6)


def test_scheduler_resumes_at_the_scheduled_lr() -> None:
    def make(total: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        optimizer = build_optimizer(nn.Linear(2, 2), lr=0.1)
        return optimizer, build_scheduler(optimizer, total_steps=total, warmup_steps=2)

    opt_a, sched_a = make(total=10)
    for _ in range(5):
        opt_a.step()
        sched_a.step()
    opt_b, sched_b = make(total=999)  # wrong on purpose: the state must bring the real schedule
    opt_b.load_state_dict(opt_a.state_dict())
    sched_b.load_state_dict(sched_a.state_dict())
    rule = WarmupDecay(total_steps=10, warmup_steps=2)
    assert sched_b.get_last_lr()[0] == pytest.approx(0.1 * rule(5))
    assert opt_b.param_groups[0]["lr"] == pytest.approx(0.1 * rule(5))
    opt_b.step()
    sched_b.step()
    assert opt_b.param_groups[0]["lr"] == pytest.approx(0.1 * rule(6))


def test_bad_batches_and_arguments_raise() -> None:
    model = _tiny_unet()
    optimizer = build_optimizer(model)
    with pytest.raises(ValueError, match=r"missing \['mask'\]"):
        no_mask = {"image": torch.zeros(1, 1, 8, 8)}
        train_step(model, no_mask, build_loss("ce", num_classes=2), optimizer)
    with pytest.raises(ValueError, match="need lr > 0"):
        build_optimizer(model, lr=0.0)
