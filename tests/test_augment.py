import math

import pytest
import torch

from fastsort.augment import (apply_cutmix, apply_gridmask, cutmix_box_mask, gridmask_keep_mask, mix_batch, one_hot,
                              sample_cutmix, sample_gridmask, soft_cross_entropy)


def _batch(b, h=24, w=31, channels_last=True):
    x = torch.randn(b, 3, h, w)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def test_cutmix_hand_made_box_exact_values():
    x = torch.stack([torch.full((1, 4, 5), float(i)) for i in range(2)])
    y = one_hot(torch.tensor([0, 1]), 2)
    params = {"y0": torch.tensor([1, 0]), "y1": torch.tensor([3, 4]), "x0": torch.tensor([2, 0]),
              "x1": torch.tensor([5, 5]), "partner": torch.tensor([1, 0])}
    xo, yo = apply_cutmix(x, y, params)
    expected0 = torch.zeros(4, 5)
    expected0[1:3, 2:5] = 1.0
    assert torch.equal(xo[0, 0], expected0)
    assert torch.equal(xo[1, 0], torch.zeros(4, 5))  # the whole image replaced by sample 0
    assert torch.allclose(yo[0], torch.tensor([1 - 6 / 20, 6 / 20]))
    assert torch.allclose(yo[1], torch.tensor([1.0, 0.0]))


@pytest.mark.parametrize("b,h,w", [(1, 16, 16), (7, 24, 31), (64, 40, 40)])
def test_cutmix_lambda_is_the_exact_kept_area(b, h, w):
    g = torch.Generator().manual_seed(b)
    x = _batch(b, h, w)
    y = one_hot(torch.arange(b) % 5, 5)
    params = sample_cutmix(b, h, w, generator=g)
    xo, yo = apply_cutmix(x, y, params)
    inside = cutmix_box_mask(params, h, w)
    pasted = inside.flatten(1).float().mean(1)
    own = y + 0  # label weight of the sample's own class, from the soft target
    lam = (yo * own).sum(1)
    partner = params["partner"]
    same = (y.argmax(1) == y[partner].argmax(1))
    assert torch.allclose(lam[~same], 1 - pasted[~same], atol=1e-6)
    assert torch.allclose(yo.sum(1), torch.ones(b))
    pixels_changed = torch.where(inside.unsqueeze(1), x[partner], x)
    assert torch.equal(xo, pixels_changed)
    assert xo.is_contiguous(memory_format=torch.channels_last)


def test_cutmix_box_sizes_follow_uniform_lambda():
    g = torch.Generator().manual_seed(0)
    p = sample_cutmix(20000, 100, 100, generator=g)
    inside = ((p["y1"] - p["y0"]) * (p["x1"] - p["x0"])).float() / 1e4
    assert inside.max() <= 1 and inside.min() >= 0
    # Unclipped boxes have area ~ (1 - lam) with lam uniform: mean 0.5; clipping makes it smaller.
    assert 0.2 < inside.mean() < 0.5


def test_gridmask_drops_about_sixteen_percent():
    g = torch.Generator().manual_seed(0)
    p = sample_gridmask(2000, 96, 96, generator=g)
    dropped = 1 - gridmask_keep_mask(p, 96, 96).float().mean((1, 2))
    assert abs(float(dropped.mean()) - 0.16) < 0.03
    assert float(dropped.min()) >= 0.0 and float(dropped.max()) < 0.45
    assert p["d"].min() >= int(96 / 224 * 96) and p["d"].max() < 96


def test_gridmask_hand_made_grid_without_rotation():
    p = {"d": torch.tensor([4.0]), "keep": torch.tensor([2.0]), "offset": torch.zeros(1, 2),
         "angle": torch.zeros(1)}
    keep = gridmask_keep_mask(p, 8, 8)[0]
    # Coordinates are centred (x - 3.5), so the pattern is periodic with period 4 and half of each period kept.
    assert keep.float().mean() == 0.75
    assert torch.equal(keep[:, :4].repeat(1, 2), keep)
    x = torch.ones(1, 3, 8, 8)
    out = apply_gridmask(x, p)
    assert torch.equal(out[0, 0] == 0, ~keep) and torch.equal(out[0, 1], out[0, 2])


@pytest.mark.parametrize("b", [1, 2, 3, 7, 64])
def test_mix_batch_odd_sizes_soft_targets_and_in_place(b):
    g = torch.Generator().manual_seed(b)
    x = _batch(b)
    ptr = x.data_ptr()
    y = torch.arange(b) % 4
    xo, t = mix_batch(x, y, 4, generator=g)
    assert xo.data_ptr() == ptr and xo.shape == (b, 3, 24, 31)
    assert xo.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(t.sum(1), torch.ones(b))
    assert (t >= 0).all()
    pivot = int(b * 0.5)
    # GridMask half keeps hard labels.
    assert torch.equal(t[pivot:], one_hot(y[pivot:], 4))


def test_mix_batch_gridmask_half_has_zeros_cutmix_half_has_none_new():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(8, 3, 40, 40) + 1.0  # strictly positive, so zeros are GridMask's
    xo, _ = mix_batch(x, torch.zeros(8, dtype=torch.long), 2, generator=g)
    assert (xo[:4] == 0).sum() == 0
    assert all((xo[i] == 0).any() for i in range(4, 8))


def test_mix_batch_switches():
    x = torch.rand(6, 3, 16, 16) + 1
    ref = x.clone()
    xo, t = mix_batch(x, torch.tensor([0, 1, 0, 1, 0, 1]), 2, cutmix_fraction=0.0, gridmask_ratio=1.0)
    assert torch.equal(xo, ref) and torch.equal(t, one_hot(torch.tensor([0, 1, 0, 1, 0, 1]), 2))


def test_mix_batch_half_precision_keeps_dtype():
    x = _batch(5).to(torch.bfloat16)
    xo, t = mix_batch(x, torch.arange(5) % 3, 3, generator=torch.Generator().manual_seed(0))
    assert xo.dtype == torch.bfloat16 and t.dtype == torch.float32


def test_no_host_sync_in_mixing():
    """The whole mix runs with CUDA sync debugging set to error; on the CPU this checks no .item()-style calls."""
    x = _batch(9)
    y = torch.arange(9) % 3
    # Tensor.item / tolist / nonzero are the usual culprits; forbid them for the duration of the call.
    calls = []
    originals = {name: getattr(torch.Tensor, name) for name in ("item", "tolist", "nonzero", "cpu", "numpy")}

    def spy(name):
        def f(self, *a, **k):
            calls.append(name)
            return originals[name](self, *a, **k)
        return f

    try:
        for name in originals:
            setattr(torch.Tensor, name, spy(name))
        mix_batch(x, y, 3, generator=torch.Generator().manual_seed(1))
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)
    assert calls == []


def test_soft_cross_entropy_equals_hard_for_one_hot():
    logits = torch.randn(5, 4)
    y = torch.tensor([0, 3, 1, 2, 2])
    assert torch.allclose(soft_cross_entropy(logits, one_hot(y, 4)), torch.nn.functional.cross_entropy(logits, y))
    mixed = 0.3 * one_hot(y, 4) + 0.7 * one_hot(y.flip(0), 4)
    expected = 0.3 * torch.nn.functional.cross_entropy(logits, y) + 0.7 * torch.nn.functional.cross_entropy(
        logits, y.flip(0))
    assert math.isclose(float(soft_cross_entropy(logits, mixed)), float(expected), rel_tol=1e-5)


@pytest.mark.gpu
def test_mix_batch_on_cuda_without_host_sync():
    x = _batch(64, 384, 384).cuda().half()
    y = (torch.arange(64) % 10).cuda()
    torch.cuda.set_sync_debug_mode("error")
    try:
        g = torch.Generator(device="cuda").manual_seed(0)
        xo, t = mix_batch(x, y, 10, generator=g)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert xo.is_cuda and torch.allclose(t.sum(1), torch.ones(64, device="cuda"))
