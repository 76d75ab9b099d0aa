"""The Triton kernels against float64 references, on the CPU under TRITON_INTERPRET=1 (set in conftest)."""

import os
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

pytest.importorskip("triton")
from fastsort import ops  # noqa: E402

TOL = {torch.float32: (2e-6, 2e-6), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


def _layouts(x):
    yield "contiguous", x
    yield "channels_last", x.contiguous(memory_format=torch.channels_last)
    yield "strided", x.transpose(2, 3)[:, :, 1:, ::2]  # neither contiguous nor channels-last


def _ref_mish(x64):
    x64 = x64.detach().requires_grad_()
    y = F.mish(x64)
    return x64, y


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_mish_forward_backward_match_float64(dtype):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, 5, 7, 9, generator=g) * 4
    for name, x in _layouts(base.to(dtype)):
        xf = x.detach().clone().requires_grad_() if name != "strided" else x.detach().requires_grad_()
        y = ops.mish(xf)
        gy = torch.randn(y.shape, generator=g).to(dtype)
        y.backward(gy)
        x64, y64 = _ref_mish(x.double())
        y64.backward(gy.double())
        rtol, atol = TOL[dtype]
        assert y.dtype == dtype and y.shape == x.shape, name
        torch.testing.assert_close(y.double(), y64.detach(), rtol=rtol, atol=atol, msg=name)
        torch.testing.assert_close(xf.grad.double(), x64.grad, rtol=rtol * 2, atol=atol * 2, msg=name)
        if name == "channels_last":
            assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("numel", [1, 1023, 1025, 3001])
def test_mish_odd_sizes(numel):
    x = torch.linspace(-30, 30, numel)
    torch.testing.assert_close(ops.mish(x), F.mish(x.double()).float(), rtol=2e-6, atol=2e-6)


def test_mish_fp16_whole_range_is_finite():
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    x = bits.view(torch.float16)
    x = x[torch.isfinite(x)].clone().requires_grad_()
    y = ops.mish(x)
    y.backward(torch.ones_like(y))
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    big = x.detach() > 30
    assert torch.equal(y[big], x.detach()[big])  # mish(x) == x once tanh(softplus) rounds to 1
    torch.testing.assert_close(y.double(), F.mish(x.detach().double()).half().double(), rtol=2e-3, atol=1e-3)


def test_reference_mish_gradcheck():
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True) * 3
    assert torch.autograd.gradcheck(F.mish, (x.detach().requires_grad_(),))


def test_opcheck_of_the_custom_ops():
    x = torch.randn(2, 3, 4, 5, requires_grad=True)
    torch.library.opcheck(ops.mish_op, (x,))
    torch.library.opcheck(ops.mish_backward_op, (x.detach(), torch.randn(2, 3, 4, 5)))
    scale, shift = torch.rand(3) + 0.5, torch.randn(3)
    torch.library.opcheck(ops.affine_mish_op, (x, scale.requires_grad_(), shift.requires_grad_()))
    w, b = torch.rand(3, requires_grad=True), torch.randn(3, requires_grad=True)
    torch.library.opcheck(ops.batch_norm_mish_op, (x, w, b, 1e-5))


def _bn_pair(c, dtype=torch.float64):
    ref = nn.BatchNorm2d(c).to(dtype)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-0.5, 0.5)
    fused = ops.BatchNormMish2d(c)
    fused.load_state_dict(ref.state_dict())
    return ref, fused


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_batchnorm_mish_train_matches_batchnorm_then_mish(layout):
    ref, fused = _bn_pair(6)
    g = torch.Generator().manual_seed(1)
    for step in range(3):
        x = (torch.randn(4, 6, 5, 7, generator=g) * 2 + 1).float()
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        gy = torch.randn(4, 6, 5, 7, generator=g)
        xf = x.clone().requires_grad_()
        y = fused(xf)
        y.backward(gy)
        x64 = x.double().requires_grad_()
        y64 = F.mish(ref(x64))
        y64.backward(gy.double())
        torch.testing.assert_close(y.double(), y64.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(xf.grad.double(), x64.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(fused.weight.grad.double(), ref.weight.grad, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(fused.bias.grad.double(), ref.bias.grad, rtol=1e-4, atol=1e-4)
        for p in (*ref.parameters(), *fused.parameters()):
            p.grad = None
    torch.testing.assert_close(fused.running_mean.double(), ref.running_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fused.running_var.double(), ref.running_var, rtol=1e-6, atol=1e-6)
    assert int(fused.num_batches_tracked) == int(ref.num_batches_tracked) == 3


def test_batchnorm_mish_eval_folds_into_scale_shift():
    ref, fused = _bn_pair(5)
    with torch.no_grad():
        ref.running_mean.uniform_(-1, 1)
        ref.running_var.uniform_(0.5, 2)
    fused.load_state_dict(ref.state_dict())
    ref.eval(), fused.eval()
    x = torch.randn(3, 5, 6, 4).contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(fused(x).double(), F.mish(ref(x.double())), rtol=1e-5, atol=1e-5)


def test_batchnorm_mish_saves_one_tensor_per_layer():
    """Count the full-size tensors autograd keeps: fused keeps x, BatchNorm2d + Mish keeps two."""
    x = torch.randn(2, 4, 8, 8, requires_grad=True)

    def saved_full_size(fn):
        sizes = []

        def pack(t):
            if t.numel() == x.numel():
                sizes.append(t.data_ptr())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(x)
        return len(set(sizes))

    ref, fused = _bn_pair(4, torch.float32)
    assert saved_full_size(lambda t: F.mish(ref(t))) == 2
    assert saved_full_size(fused) == 1


def test_off_switch_and_fallbacks(monkeypatch):
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    ops._warned.clear()
    with pytest.warns(UserWarning, match="float64"):
        y = ops.mish(x)
    torch.testing.assert_close(y, F.mish(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.mish(x)  # warned once only
    monkeypatch.setenv("FASTSORT_KERNELS", "0")
    assert ops.fused_unavailable_reason(x.float()) == "FASTSORT_KERNELS=0"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(ops.mish(x.float()), F.mish(x.float()))
    monkeypatch.delenv("FASTSORT_KERNELS")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET" in ops.fused_unavailable_reason(x.float())


def test_torch_compile_traces_through_the_ops():
    torch._dynamo.reset()
    bn = ops.BatchNormMish2d(3)
    fn = torch.compile(lambda t: ops.mish(bn(t)).sum(), backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    out = fn(x)
    out.backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_mish_and_batchnorm_mish_match_native(dtype):
    x = (torch.randn(8, 32, 24, 24, device="cuda") * 3).to(dtype).contiguous(memory_format=torch.channels_last)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(ops.mish(x).float(), F.mish(x.float()), rtol=rtol, atol=atol)
    ref, fused = _bn_pair(32, torch.float32)
    ref, fused = ref.cuda(), fused.cuda()
    torch.testing.assert_close(fused(x.float()), F.mish(ref(x.float())), rtol=1e-4, atol=1e-4)


if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():  # pragma: no cover
    pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)
