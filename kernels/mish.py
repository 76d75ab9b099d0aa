"""Triton kernels for Mish and for a per-channel affine (folded BatchNorm) followed by Mish.

Mish(x) = x * tanh(softplus(x)). With n = exp(x), tanh(softplus(x)) = n(n + 2) / (n(n + 2) + 2), which
needs one exp and no log; x is clamped to 20 before the exp (tanh is 1 in fp32 there), so the forward
and backward stay finite over the whole fp16 range and for any finite fp32 input. All arithmetic is in
fp32; inputs and outputs keep their dtype (fp32, fp16 or bf16).

The kernels walk a tensor's storage linearly. That is right for any dense tensor (contiguous or
channels-last) as long as every tensor of a call has the same strides; the Python side guarantees it.
The affine kernels need each element's channel: ``c = (i // HW) % C`` for NCHW memory,
``c = i % C`` for channels-last (NHWC) memory.
"""

from __future__ import annotations

import triton
import triton.language as tl

BLOCK = 1024



@triton.jit
def _tanh_softplus(x):
    n = tl.exp(tl.minimum(x, 20.0))
    t = n * (n + 2.0)
    return t / (t + 2.0), n


@triton.jit
def _mish_grad(x):
    # d/dx mish = tanh(sp) + x * sech^2(sp) * sigmoid(x), sech^2 = 1 - tanh^2, sigmoid = n / (1 + n).
    t, n = _tanh_softplus(x)
    return t + x * (1.0 - t * t) * (n / (1.0 + n))


@triton.jit
def mish_fwd_kernel(x_ptr, y_ptr, numel, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    t, _ = _tanh_softplus(x)
    tl.store(y_ptr + offs, (x * t).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def mish_bwd_kernel(x_ptr, g_ptr, dx_ptr, numel, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(dx_ptr + offs, (g * _mish_grad(x)).to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _channel(offs, C, HW, CHANNELS_LAST: tl.constexpr):
    if CHANNELS_LAST:
        return offs % C
    else:
        return (offs // HW) % C


@triton.jit
def affine_mish_fwd_kernel(x_ptr, scale_ptr, shift_ptr, y_ptr, numel, C, HW, CHANNELS_LAST: tl.constexpr,
                           BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    c = _channel(offs, C, HW, CHANNELS_LAST)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    z = x * tl.load(scale_ptr + c, mask=mask, other=1.0) + tl.load(shift_ptr + c, mask=mask, other=0.0)
    t, _ = _tanh_softplus(z)
    tl.store(y_ptr + offs, (z * t).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def affine_mish_bwd_kernel(x_ptr, scale_ptr, shift_ptr, g_ptr, dz_ptr, numel, C, HW, CHANNELS_LAST: tl.constexpr,
                           BLOCK: tl.constexpr):
    """dz = g * mish'(x * scale + shift), in fp32: the affine input is recomputed, never stored."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    c = _channel(offs, C, HW, CHANNELS_LAST)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    z = x * tl.load(scale_ptr + c, mask=mask, other=1.0) + tl.load(shift_ptr + c, mask=mask, other=0.0)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(dz_ptr + offs, g * _mish_grad(z), mask=mask)


def grid(numel: int):
    return (triton.cdiv(numel, BLOCK),)
