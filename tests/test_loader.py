import numpy as np
import pytest
import torch

from conftest import write_csv_dataset
from fastsort.index import read_csv
from fastsort.loader import (BLUR_BOX, BLUR_GAUSS, BLUR_MEDIAN, COLOUR_BC, COLOUR_GAMMA, COLOUR_HSV, FLIP_H, FLIP_HV,
                             FLIP_V, GEO_RRC, GEO_SSR, Loader, batch_positions, epoch_rng, make_loader,
                             sample_seed_chain)

pytest.importorskip("nvidia.dali")


@pytest.fixture(scope="module")
def index33(tmp_path_factory):
    root = tmp_path_factory.mktemp("n33")
    return read_csv(write_csv_dataset(root, n=33, labels=list(range(33)))).index  # label identifies the sample


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_batch_shape_dtype_layout(index33, backend):
    loader = make_loader(index33, batch_size=16, image_size=40, train=True, backend=backend, device="cpu", workers=1)
    x, y = next(iter(loader.epoch(0)))
    assert x.shape == (16, 3, 40, 40) and x.dtype == torch.float32
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert y.dtype == torch.int64 and y.shape == (16,)


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_every_sample_once_per_epoch_and_fresh_shuffle(index33, backend):
    loader = make_loader(index33, batch_size=16, image_size=24, train=True, backend=backend, device="cpu", workers=1)
    orders = []
    for epoch in range(3):
        sizes, labels = [], []
        for x, y in loader.epoch(epoch):
            sizes.append(len(y))
            labels += y.tolist()
            assert len(x) == len(y)
        assert sizes == [16, 17]  # the 1-sample tail joins the batch before it, every epoch
        assert sorted(labels) == list(range(33))
        orders.append(labels)
    assert orders[0] != orders[1] != orders[2]
    assert len(loader) == 2


def test_eval_order_is_index_order_with_partial_batch(index33):
    loader = make_loader(index33, batch_size=16, image_size=24, train=False, backend="dali", device="cpu")
    sizes, labels = [], []
    for _, y in loader.epoch(0):
        sizes.append(len(y))
        labels += y.tolist()
    assert sizes == [16, 16, 1] and labels == list(range(33))


def test_batch_policy_small_and_exact():
    assert [len(b) for b in batch_positions(5, 16, shuffle=True)] == [5]
    assert [len(b) for b in batch_positions(32, 16, shuffle=True)] == [16, 16]
    assert [len(b) for b in batch_positions(33, 16, shuffle=False)] == [16, 16, 1]


def test_epoch_is_a_function_of_seed_and_epoch(index33):
    a = make_loader(index33, batch_size=16, image_size=24, train=True, backend="dali", device="cpu", workers=1)
    b = make_loader(index33, batch_size=16, image_size=24, train=True, backend="dali", device="cpu", workers=2)
    xa = [x for x, _ in a.epoch(1)]
    xb = [x for x, _ in b.epoch(1)]
    assert all(torch.equal(p, q) for p, q in zip(xa, xb))
    x0 = [x for x, _ in a.epoch(0)]
    assert not torch.equal(x0[0], xa[0])


def test_dali_eval_matches_reference_loader(index33):
    kw = dict(batch_size=8, image_size=32, train=False, device="cpu", mean=(0, 0, 0), std=(1 / 255,) * 3)
    dali = torch.cat([x for x, _ in make_loader(index33, backend="dali", **kw).epoch(0)])
    ref = torch.cat([x for x, _ in make_loader(index33, backend="torch", workers=1, **kw).epoch(0)])
    # DALI's antialiased linear resize vs OpenCV's area/linear: a few grey levels apart on average.
    assert (dali - ref).abs().mean() < 4.0


@pytest.fixture(scope="module")
def index48(tmp_path_factory):
    """Images already 48 x 48, so the resize is exact in both paths and only the op under test differs."""
    from conftest import make_image

    root = tmp_path_factory.mktemp("s48")
    for i in range(11):
        make_image(root / "a" / f"{i}{'.png' if i % 2 else '.jpg'}", (48, 48), seed=i, mode="L" if i % 3 else "RGB")
    make_image(root / "b" / "x.png", (48, 48), seed=99)
    from fastsort.index import scan_folder

    return scan_folder(root).index.subset(range(11))


@pytest.mark.parametrize("op,value,tol", [
    ("flip", FLIP_V, 1.0), ("flip", FLIP_H, 1.0), ("flip", FLIP_HV, 1.0),
    ("colour", COLOUR_BC, 1.5), ("colour", COLOUR_GAMMA, 2.0), ("colour", COLOUR_HSV, 20.0),
    ("blur", BLUR_GAUSS, 1.0), ("blur", BLUR_BOX, 1.0), ("blur", BLUR_MEDIAN, 1.0),
    ("geo", GEO_RRC, 1.5), ("geo", GEO_SSR, 1.5),
])
def test_each_dali_op_matches_its_opencv_reference(index48, op, value, tol):
    """The same injected parameters through the DALI CPU graph and the OpenCV reference chain.

    Documented differences: DALI's hsv scales where albumentations shifts (wide tolerance); the CPU graph
    has no median, so it must equal the box filter of the same aperture; warp_affine clamps borders
    instead of reflecting them, so shift-scale-rotate is compared where the source pixel is inside.
    """
    kw = dict(batch_size=11, image_size=48, train=True, device="cpu", mean=(0, 0, 0), std=(1 / 255,) * 3)
    dali, ref = Loader(index48, backend="dali", **kw), Loader(index48, backend="torch", workers=1, **kw)
    params = dali.params(0)
    for name in ("flip", "colour", "blur", "geo"):
        params[name][:] = 0
    params[op][:] = value
    ref_params = {k: v.copy() for k, v in params.items()}
    if (op, value) == ("blur", BLUR_MEDIAN):
        ref_params["blur"][:] = BLUR_BOX
    dali.params, ref.params = (lambda epoch: params), (lambda epoch: ref_params)
    a = next(iter(dali.epoch(0)))[0]
    b = next(iter(ref.epoch(0)))[0]
    diff = (a - b).abs()
    if (op, value) == ("geo", GEO_SSR):
        inside = _warp_source_inside(params["matrix"][dali.batches(0)[0]], 48)  # batch order, not index order
        diff = diff[inside[:, None].expand_as(diff)]
    assert diff.mean() < tol


def _warp_source_inside(matrices: np.ndarray, size: int) -> torch.Tensor:
    """(N, S, S) bool: output pixels whose source lies inside the image, at least 1 px from the border."""
    ys, xs = np.mgrid[0:size, 0:size]
    out = []
    for m in matrices:
        full = np.vstack([m, [0, 0, 1]])
        inv = np.linalg.inv(full)
        sx = inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2]
        sy = inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]
        out.append((sx >= 1) & (sx <= size - 2) & (sy >= 1) & (sy <= size - 2))
    return torch.from_numpy(np.stack(out))


def test_augmentation_rates_match_the_seed_chain():
    p = sample_seed_chain(epoch_rng(0, 0), 200_000, 64)
    rate = lambda a, v: float(np.mean(a == v))  # noqa: E731
    assert abs(rate(p["flip"], 0) - 0.25) < 0.005
    for v in (FLIP_V, FLIP_H, FLIP_HV):
        assert abs(rate(p["flip"], v) - 0.25) < 0.005
    for key in ("colour", "blur"):
        assert abs(rate(p[key], 0) - 0.5) < 0.005
        for v in (1, 2, 3):
            assert abs(rate(p[key], v) - 1 / 6) < 0.005
    assert abs(rate(p["geo"], GEO_RRC) - 0.125) < 0.005
    assert abs(rate(p["geo"], GEO_SSR) - 0.375) < 0.005
    for k in (3, 5, 7):
        assert abs(rate(p["ksize"], k) - 1 / 3) < 0.005
    y0, x0, h, w = p["crop"].T
    area = h * w / 64**2
    assert area.min() >= 0.45 and area.max() <= 1.0 and (y0 + h <= 64).all() and (x0 + w <= 64).all()
    assert p["alpha"].min() >= 0.8 and p["alpha"].max() <= 1.2 and abs(p["val"]).max() <= 50


def test_cuda_without_gpu_is_a_clear_error(index33):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from fastsort.index import DataError

    with pytest.raises(DataError, match="no usable CUDA device"):
        make_loader(index33, batch_size=4, train=True, device="cuda")


def test_batch_larger_than_dataset_is_one_batch(index33):
    from fastsort.index import DataError

    loader = make_loader(index33, batch_size=64, train=True, device="cpu")
    assert len(loader) == 1 and sorted(loader.batches(0)[0].tolist()) == list(range(33))
    with pytest.raises(DataError, match="at least 2 images"):
        make_loader(index33.subset([0]), batch_size=64, train=True, device="cpu")


@pytest.mark.gpu
def test_dali_gpu_batch_is_on_device_channels_last_half(index33):
    loader = make_loader(index33, batch_size=16, image_size=64, train=True, backend="dali", device="cuda",
                         precision="bf16")
    sizes = []
    for x, y in loader.epoch(0):
        assert x.is_cuda and x.dtype == torch.bfloat16 and x.is_contiguous(memory_format=torch.channels_last)
        sizes.append(len(y))
    assert sizes == [16, 17]


# ----------------------------------------------------------------------------------------------- threads backend


def test_threads_eval_equals_the_reference_loader_exactly(index33):
    kw = dict(batch_size=8, image_size=32, train=False, device="cpu")
    # .clone(): a threads batch lives in a reused buffer, valid until the ring wraps
    fast = torch.cat([x.clone() for x, _ in make_loader(index33, backend="threads", workers=2, **kw).epoch(0)])
    ref = torch.cat([x for x, _ in make_loader(index33, backend="torch", workers=1, **kw).epoch(0)])
    assert torch.allclose(fast, ref, atol=1e-5)


@pytest.mark.parametrize("op,value", [
    ("flip", FLIP_V), ("flip", FLIP_H), ("flip", FLIP_HV), ("colour", COLOUR_BC), ("colour", COLOUR_GAMMA),
    ("colour", COLOUR_HSV), ("blur", BLUR_GAUSS), ("blur", BLUR_BOX), ("blur", BLUR_MEDIAN), ("geo", GEO_RRC),
    ("geo", GEO_SSR), ("all", 0),
])
def test_threads_chain_equals_the_seed_order(index48, op, value):
    """The reordered fast chain (flip last, folded into the warp / crop) against the seed's order, pixel for pixel."""
    kw = dict(batch_size=11, image_size=48, train=True, device="cpu", mean=(0, 0, 0), std=(1 / 255,) * 3)
    fast, ref = Loader(index48, backend="threads", workers=2, **kw), Loader(index48, backend="torch", workers=1, **kw)
    params = fast.params(0)
    if op != "all":
        for name in ("flip", "colour", "blur", "geo"):
            params[name][:] = 0
        params[op][:] = value
        if op == "geo":
            params["flip"][:] = np.arange(11) % 4  # the flip folded into the geometry, every kind
    fast.params = ref.params = (lambda epoch: params)
    a, b = next(iter(fast.epoch(0)))[0], next(iter(ref.epoch(0)))[0]
    diff = (a - b).abs()
    if op in ("geo", "all"):
        # Folding the flip into the warp matrix moves OpenCV's fixed-point sample grid by < 1/32 px.
        assert diff.mean() < 0.2 and (diff > 8).float().mean() < 0.01
    else:
        assert diff.max() < 1e-3  # same uint8 pixels; the LUT and torch normalize round differently


def test_threads_batches_are_channels_last_and_exactly_once(index33):
    loader = make_loader(index33, batch_size=16, image_size=24, train=True, backend="threads", device="cpu")
    labels = []
    for x, y in loader.epoch(2):
        assert x.is_contiguous(memory_format=torch.channels_last) and x.dtype == torch.float32
        labels += y.tolist()
    assert sorted(labels) == list(range(33))


def test_threads_loader_names_a_file_that_broke_after_the_scan(tmp_path):
    from fastsort.index import DataError

    root = tmp_path / "d"
    write_csv_dataset(root, n=6)
    index = read_csv(root / "train.csv").index
    open(index.paths[3], "wb").write(b"garbage")
    loader = make_loader(index, batch_size=3, image_size=16, train=False, backend="threads", device="cpu")
    with pytest.raises(DataError, match="img003"):
        list(loader.epoch(0))


def test_auto_backend_is_threads_on_the_cpu(index33):
    assert make_loader(index33, batch_size=4, train=False, device="cpu").backend == "threads"
