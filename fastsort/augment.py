"""Batch augmentation on the batch's own device: CutMix on one part of a batch, GridMask on the rest.

Contract: ``x`` is a float (B, C, H, W) batch in any memory format, ``y`` a (B, K) soft-target matrix whose
rows sum to 1. Functions return tensors of the same shape, dtype, device and memory format. Randomness is
drawn by ``sample_*`` into a dict of tensors and applied by ``apply_*``, so tests can inject parameters.
No Python loop over samples and no host synchronisation: per-sample choices are broadcast masks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def one_hot(y: torch.Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return F.one_hot(y, num_classes).to(dtype)


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of -sum(target * log_softmax(logits)); computed in float32."""
    return torch.sum(-target.float() * F.log_softmax(logits.float(), dim=1), dim=1).mean()


# ----------------------------------------------------------------------------------------------- CutMix


def sample_cutmix(batch: int, height: int, width: int, *, alpha: float = 1.0, generator=None, device=None):
    """One box per sample and a partner from a random permutation (the seed's CutMix, alpha 1).

    The box has sides ``H*sqrt(1-lam)`` by ``W*sqrt(1-lam)`` with lam ~ Beta(alpha, alpha), a centre
    uniform over all pixels, and is clipped to the image; the label share is then taken from the clipped
    box's exact area (see ``apply_cutmix``).
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    if alpha == 1.0:
        lam = torch.rand(batch, generator=generator, device=device)  # Beta(1, 1) is uniform
    else:
        g1 = torch._standard_gamma(torch.full((batch,), alpha, device=device), generator=generator)
        g2 = torch._standard_gamma(torch.full((batch,), alpha, device=device), generator=generator)
        lam = g1 / (g1 + g2)
    cy = torch.randint(0, height, (batch,), generator=generator, device=device)
    cx = torch.randint(0, width, (batch,), generator=generator, device=device)
    box = cutmix_box(lam, cy, cx, height, width)
    partner = torch.randperm(batch, generator=generator, device=device)
    return {**box, "partner": partner}


def cutmix_box(lam: torch.Tensor, cy: torch.Tensor, cx: torch.Tensor, height: int, width: int) -> dict:
    """The clipped box of each sample: sides ``floor(H*sqrt(1-lam))`` by ``floor(W*sqrt(1-lam))`` (height from
    H, width from W), starting half a side above/left of the centre (cy, cx), clipped to the image."""
    ratio = torch.sqrt(1.0 - lam)
    cut_h = (height * ratio).floor().long()
    cut_w = (width * ratio).floor().long()
    y0 = cy.long() - torch.div(cut_h, 2, rounding_mode="floor")
    x0 = cx.long() - torch.div(cut_w, 2, rounding_mode="floor")
    # The end is start + side (not centre + side/2), so an odd side keeps its size and a 1-pixel box
    # can start on the last row or column: every position is reachable.
    return {"y0": y0.clamp(0, height), "y1": (y0 + cut_h).clamp(0, height),
            "x0": x0.clamp(0, width), "x1": (x0 + cut_w).clamp(0, width)}


def cutmix_box_mask(params: dict, height: int, width: int) -> torch.Tensor:
    """(B, H, W) bool: True where the partner's pixels are pasted."""
    rows = torch.arange(height, device=params["y0"].device).view(1, height, 1)
    cols = torch.arange(width, device=params["y0"].device).view(1, 1, width)
    inside_r = (rows >= params["y0"].view(-1, 1, 1)) & (rows < params["y1"].view(-1, 1, 1))
    inside_c = (cols >= params["x0"].view(-1, 1, 1)) & (cols < params["x1"].view(-1, 1, 1))
    return inside_r & inside_c


def apply_cutmix(x: torch.Tensor, y: torch.Tensor, params: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Paste each partner's box into ``x`` and mix ``y`` by the exact pasted area. Returns new tensors."""
    _, _, h, w = x.shape
    partner = params["partner"]
    inside = cutmix_box_mask(params, h, w)
    # Pasted share from the clipped box itself: exact, and never larger than the box actually pasted.
    pasted = ((params["y1"] - params["y0"]) * (params["x1"] - params["x0"])).to(y.dtype) / (h * w)
    x_out = torch.where(inside.unsqueeze(1), x[partner], x)
    y_out = (1.0 - pasted).unsqueeze(1) * y + pasted.unsqueeze(1) * y[partner]
    return x_out, y_out


def cutmix(x, y, *, alpha: float = 1.0, generator=None):
    params = sample_cutmix(x.shape[0], x.shape[2], x.shape[3], alpha=alpha, generator=generator, device=x.device)
    return apply_cutmix(x, y, params)


# ----------------------------------------------------------------------------------------------- GridMask


def sample_gridmask(
    batch: int,
    height: int,
    width: int,
    *,
    d_min: float = 96 / 224,
    d_max: float = 1.0,
    ratio: float = 0.6,
    rotate: float = 45.0,
    generator=None,
    device=None,
):
    """Per-sample period d, kept stripe width, offsets and rotation (the seed's GridMask defaults).

    The period is an integer in [d_min * side, d_max * side), the kept stripe width round(ratio * d), so
    a (d - l) x (d - l) square is dropped in every period: about (1 - ratio)^2 = 16% of the image.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    side = min(height, width)
    lo, hi = int(d_min * side), max(int(d_min * side) + 1, int(d_max * side))
    d = torch.randint(lo, hi, (batch,), generator=generator, device=device).float()
    keep = torch.floor(ratio * d + 0.5)
    offset = torch.rand(batch, 2, generator=generator, device=device) * d.unsqueeze(1)
    angle = (torch.rand(batch, generator=generator, device=device) * 2 - 1) * math.radians(rotate)
    return {"d": d, "keep": keep, "offset": offset, "angle": angle}


def gridmask_keep_mask(params: dict, height: int, width: int) -> torch.Tensor:
    """(B, H, W) bool: True where pixels are kept. Grid coordinates are rotated about the image centre."""
    device = params["d"].device
    ys = torch.arange(height, device=device, dtype=torch.float32).view(1, height, 1) - (height - 1) / 2
    xs = torch.arange(width, device=device, dtype=torch.float32).view(1, 1, width) - (width - 1) / 2
    cos = torch.cos(params["angle"]).view(-1, 1, 1)
    sin = torch.sin(params["angle"]).view(-1, 1, 1)
    d = params["d"].view(-1, 1, 1)
    keep = params["keep"].view(-1, 1, 1)
    u = cos * xs + sin * ys + params["offset"][:, 0].view(-1, 1, 1)
    v = -sin * xs + cos * ys + params["offset"][:, 1].view(-1, 1, 1)
    dropped = (torch.remainder(u, d) >= keep) & (torch.remainder(v, d) >= keep)
    return ~dropped


def apply_gridmask(x: torch.Tensor, params: dict) -> torch.Tensor:
    """Zero the dropped squares. ``x`` is already normalised, so they read as the mean colour (as the seed)."""
    keep = gridmask_keep_mask(params, x.shape[2], x.shape[3])
    return x * keep.unsqueeze(1).to(x.dtype)


def gridmask(x, *, ratio: float = 0.6, generator=None):
    params = sample_gridmask(x.shape[0], x.shape[2], x.shape[3], ratio=ratio, generator=generator, device=x.device)
    return apply_gridmask(x, params)


# ----------------------------------------------------------------------------------------------- the seed's mix


def mix_batch(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    *,
    cutmix_fraction: float = 0.5,
    cutmix_alpha: float = 1.0,
    gridmask_ratio: float = 0.6,
    generator=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The seed's batch mixing: CutMix on the first ``int(B * fraction)`` samples, GridMask on the rest.

    ``x`` is modified in place (the batch buffer is reused, as on the GPU); ``y`` are integer labels.
    Returns ``(x, soft_targets)``. The loader already shuffled the batch, so a positional split is a
    random one. CutMix pairs samples only within its own part; with one sample there it is left as is.
    ``gridmask_ratio >= 1`` disables GridMask, ``cutmix_fraction == 0`` disables CutMix.
    """
    b, _, h, w = x.shape
    targets = one_hot(y, num_classes)
    pivot = int(b * cutmix_fraction)
    if pivot > 1:
        params = sample_cutmix(pivot, h, w, alpha=cutmix_alpha, generator=generator, device=x.device)
        mixed_x, mixed_y = apply_cutmix(x[:pivot], targets[:pivot], params)
        x[:pivot] = mixed_x
        targets[:pivot] = mixed_y
    if gridmask_ratio < 1.0 and pivot < b:
        params = sample_gridmask(b - pivot, h, w, ratio=gridmask_ratio, generator=generator, device=x.device)
        x[pivot:] = apply_gridmask(x[pivot:], params)
    return x, targets
