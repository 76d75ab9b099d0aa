"""Mish and BatchNorm+Mish through fastsort's Triton kernels (``kernels/``), PyTorch's ops as the reference.

Everything is a PyTorch custom op (``fastsort::*``) with a fake (meta) implementation and an autograd
formula, so ``torch.compile`` traces through it. Policy:

* ``FASTSORT_KERNELS=0`` switches every fused module back to ``F.mish`` / ``nn.BatchNorm2d``.
* The Triton path runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (how CI tests it).
  Anywhere else (a CPU without the interpreter, float64, Triton missing) the native ops run, after a
  one-time warning that says why. The result is never silently different: both paths compute the same
  function, and a test holds them to a float64 reference.
* ``BatchNormMish2d`` saves only its input for backward (and per-channel statistics) and recomputes the
  normalised activation there: one full-size tensor per layer instead of BatchNorm's input plus Mish's
  input. In eval mode BatchNorm folds into a per-channel scale/shift applied inside the Mish kernel.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def kernels_enabled() -> bool:
    return os.environ.get("FASTSORT_KERNELS", "1") != "0"


def _kernels():
    """The Triton module, imported on first use only (``import fastsort`` never imports Triton).

    Installed, it is ``fastsort.kernels.mish``; run from a checkout that was never installed (a GPU box
    without network), it is loaded from ``kernels/mish.py`` beside the package.
    """
    try:
        from fastsort.kernels import mish  # cached by Python's module table after the first call
    except ModuleNotFoundError:
        import importlib.util
        import sys
        from pathlib import Path

        name = "fastsort.kernels.mish"
        if name not in sys.modules:
            source = Path(__file__).resolve().parent.parent / "kernels" / "mish.py"
            if not source.is_file():
                raise
            spec = importlib.util.spec_from_file_location(name, source)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            sys.modules[name] = module
        mish = sys.modules[name]
    return mish


def fused_unavailable_reason(x: torch.Tensor) -> str | None:
    """None when the Triton path can take ``x``, else a short reason."""
    if not kernels_enabled():
        return "FASTSORT_KERNELS=0"
    if x.dtype not in SUPPORTED_DTYPES:
        return f"dtype {x.dtype} is not one of fp32/fp16/bf16"
    if x.device.type != "cuda" and not (x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"):
        return f"device {x.device.type} (Triton needs CUDA, or TRITON_INTERPRET=1 on the CPU)"
    try:
        _kernels()
    except ImportError as exc:
        return f"Triton is not importable ({exc}); pip install triton"
    return None


_warned: set[str] = set()


def _warn_once(what: str, reason: str) -> None:
    if reason != "FASTSORT_KERNELS=0" and reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"fastsort: fused {what} unavailable for {reason}; using the native PyTorch op", stacklevel=3)


def _is_dense(x: torch.Tensor) -> bool:
    return x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))


def _dense(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself when the kernels can walk its storage linearly, else a contiguous copy (costs a copy)."""
    return x if _is_dense(x) else x.contiguous()


def _like(ref: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``t`` with exactly ``ref``'s strides (the kernels index every operand by the same linear offset)."""
    return t if t.stride() == ref.stride() else torch.empty_like(ref, dtype=t.dtype).copy_(t)


def _channels_last(x: torch.Tensor) -> bool:
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


# ----------------------------------------------------------------------------------------------- Mish


@torch.library.custom_op("fastsort::mish", mutates_args=())
def mish_op(x: torch.Tensor) -> torch.Tensor:
    k = _kernels()
    x = _dense(x)
    y = torch.empty_like(x)
    if x.numel():
        k.mish_fwd_kernel[k.grid(x.numel())](x, y, x.numel(), BLOCK=k.BLOCK)
    return y


@mish_op.register_fake
def _(x):
    return torch.empty_like(x) if _is_dense(x) else torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.custom_op("fastsort::mish_backward", mutates_args=())
def mish_backward_op(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    k = _kernels()
    x = _dense(x)
    grad = _like(x, grad)
    dx = torch.empty_like(x)
    if x.numel():
        k.mish_bwd_kernel[k.grid(x.numel())](x, grad, dx, x.numel(), BLOCK=k.BLOCK)
    return dx


@mish_backward_op.register_fake
def _(x, grad):
    return torch.empty_like(x) if _is_dense(x) else torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _mish_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _mish_grad(ctx, grad):
    (x,) = ctx.saved_tensors
    return mish_backward_op(x, grad)


mish_op.register_autograd(_mish_grad, setup_context=_mish_setup)


def mish(x: torch.Tensor) -> torch.Tensor:
    """Mish through the fused kernel where it can run, else ``F.mish`` (with a one-time warning)."""
    reason = fused_unavailable_reason(x)
    if reason is None:
        return mish_op(x)
    _warn_once("Mish", reason)
    return F.mish(x)


class FusedMish(nn.Module):
    """Drop-in for ``nn.Mish``; the ``inplace`` flag is accepted and ignored (the kernel writes a new tensor)."""

    def __init__(self, inplace: bool = False):
        super().__init__()
        self.inplace = inplace

    def forward(self, x):
        return mish(x)


# ----------------------------------------------------------------------------------------------- affine + Mish


def _affine_dims(x: torch.Tensor) -> tuple[int, int, bool]:
    return x.shape[1], x.shape[2] * x.shape[3], _channels_last(x)


@torch.library.custom_op("fastsort::affine_mish", mutates_args=())
def affine_mish_op(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """mish(x * scale[c] + shift[c]) for a 4-D ``x``; scale and shift are fp32 per-channel vectors."""
    k = _kernels()
    x = _dense(x)
    c, hw, cl = _affine_dims(x)
    y = torch.empty_like(x)
    if x.numel():
        k.affine_mish_fwd_kernel[k.grid(x.numel())](x, scale.float().contiguous(), shift.float().contiguous(), y,
                                                   x.numel(), c, hw, CHANNELS_LAST=cl, BLOCK=k.BLOCK)
    return y


@affine_mish_op.register_fake
def _(x, scale, shift):
    return torch.empty_like(x) if _is_dense(x) else torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.custom_op("fastsort::affine_mish_dz", mutates_args=())
def affine_mish_dz_op(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """grad * mish'(x * scale + shift) in fp32, with ``x``'s strides (the affine input is recomputed)."""
    k = _kernels()
    x = _dense(x)
    grad = _like(x, grad)
    c, hw, cl = _affine_dims(x)
    dz = torch.empty_like(x, dtype=torch.float32)
    if x.numel():
        k.affine_mish_bwd_kernel[k.grid(x.numel())](x, scale.float().contiguous(), shift.float().contiguous(), grad,
                                                   dz, x.numel(), c, hw, CHANNELS_LAST=cl, BLOCK=k.BLOCK)
    return dz


@affine_mish_dz_op.register_fake
def _(x, scale, shift, grad):
    if _is_dense(x):
        return torch.empty_like(x, dtype=torch.float32)
    return torch.empty(x.shape, dtype=torch.float32, device=x.device)


def _affine_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _affine_grad(ctx, grad):
    x, scale, shift = ctx.saved_tensors
    dz = affine_mish_dz_op(x, scale, shift, grad)
    dx = (dz * scale.float().view(1, -1, 1, 1)).to(x.dtype)
    dscale = (dz * x.float()).sum((0, 2, 3)).to(scale.dtype)
    dshift = dz.sum((0, 2, 3)).to(shift.dtype)
    return dx, dscale, dshift


affine_mish_op.register_autograd(_affine_grad, setup_context=_affine_setup)


# ----------------------------------------------------------------------------------------------- BN(train) + Mish


@torch.library.custom_op("fastsort::batch_norm_mish", mutates_args=())
def batch_norm_mish_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training-mode BatchNorm (batch statistics) then Mish. Returns (y, batch mean, biased batch var)."""
    var, mean = torch.var_mean(x.float(), dim=(0, 2, 3), correction=0)  # fp32 statistics, temporary copy
    scale = weight.float() * torch.rsqrt(var + eps)
    shift = bias.float() - mean * scale
    return affine_mish_op(x, scale, shift), mean, var


@batch_norm_mish_op.register_fake
def _(x, weight, bias, eps):
    c = x.shape[1]
    y = torch.empty_like(x) if _is_dense(x) else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return y, x.new_empty(c, dtype=torch.float32), x.new_empty(c, dtype=torch.float32)


def _bn_setup(ctx, inputs, output):
    x, weight, bias, eps = inputs
    _, mean, var = output
    ctx.eps = eps
    ctx.save_for_backward(x, weight, bias, mean, var)  # x is the only full-size tensor kept


def _bn_grad(ctx, grad, _gmean, _gvar):
    x, weight, bias, mean, var = ctx.saved_tensors
    invstd = torch.rsqrt(var + ctx.eps)
    scale = weight.float() * invstd
    shift = bias.float() - mean * scale
    dz = affine_mish_dz_op(x, scale, shift, grad)  # gradient at the BatchNorm output, recomputed activation
    m = x.numel() // x.shape[1]
    xhat = (x.float() - mean.view(1, -1, 1, 1)) * invstd.view(1, -1, 1, 1)
    sum_dz = dz.sum((0, 2, 3))
    sum_dz_xhat = (dz * xhat).sum((0, 2, 3))
    dx = scale.view(1, -1, 1, 1) * (dz - (sum_dz / m).view(1, -1, 1, 1) - xhat * (sum_dz_xhat / m).view(1, -1, 1, 1))
    return dx.to(x.dtype), sum_dz_xhat.to(weight.dtype), sum_dz.to(bias.dtype), None


batch_norm_mish_op.register_autograd(_bn_grad, setup_context=_bn_setup)


class BatchNormMish2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` followed by Mish in one block; its state dict is a plain BatchNorm2d's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        reason = fused_unavailable_reason(x)
        if reason is None and x.dim() != 4:
            reason = f"a {x.dim()}-D input"
        if reason is not None:
            _warn_once("BatchNorm+Mish", reason)
            return F.mish(super().forward(x))
        weight = self.weight if self.affine else torch.ones(x.shape[1], device=x.device)
        bias = self.bias if self.affine else torch.zeros(x.shape[1], device=x.device)
        use_batch_stats = self.training or self.running_mean is None
        if not use_batch_stats:
            scale = weight.float() * torch.rsqrt(self.running_var.float() + self.eps)
            shift = bias.float() - self.running_mean.float() * scale
            return affine_mish_op(x, scale, shift)
        y, mean, var = batch_norm_mish_op(x, weight, bias, self.eps)
        if self.training and self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = (1.0 / float(self.num_batches_tracked)) if self.momentum is None else self.momentum
                n = x.numel() // x.shape[1]
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
                self.running_var.lerp_((var * (n / max(n - 1, 1))).to(self.running_var.dtype), momentum)
        return y
