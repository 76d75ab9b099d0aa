"""Real-world broken inputs (/work/shared/cases/README.md): each test builds its case's input with NumPy/Pillow
and asserts the documented behaviour (README "Input policies")."""

from __future__ import annotations

import csv
import io
import json
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from conftest import make_image, write_csv_dataset
from fastsort.augment import (apply_cutmix, cutmix, cutmix_box, cutmix_box_mask, gridmask, gridmask_keep_mask, mix_batch, one_hot,
                              sample_cutmix, sample_gridmask)
from fastsort.average import average_state_dicts
from fastsort.checkpoint import load_checkpoint, save_checkpoint, unwrapped_state_dict
from fastsort.cli import app
from fastsort.index import DataError, DataWarning, Index, load_dataset, preflight, read_csv, scan_folder
from fastsort.loader import BACKENDS, make_loader
from fastsort.models import build_model, load_model_state, load_weights

pytest.importorskip("nvidia.dali")

RAW = dict(mean=(0.0, 0.0, 0.0), std=(1 / 255, 1 / 255, 1 / 255))  # the loader then delivers pixel values


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTSORT_CACHE", str(tmp_path / "cache"))


def _train(data, out, **kw):
    from fastsort.train import TrainConfig, train

    base = dict(data=str(data), out=str(out), model="test_efficientnet", pretrained="none", image_size=32,
                batch_size=4, epochs=1, lr=0.05, workers=1, n_folds=2, loader="threads")
    base.update(kw)
    return train(TrainConfig(**base), progress=False)


def _pixels(index, size, backend, train=False, bs=8, epoch=0):
    """Every image of ``index`` through ``backend`` as (N, S, S, 3) float pixel values, in index order."""
    loader = make_loader(index, batch_size=bs, image_size=size, train=train, backend=backend, device="cpu",
                         workers=1, **RAW)
    xs = [x.permute(0, 2, 3, 1).clone() for x, _ in loader.epoch(epoch)]
    return torch.cat(xs).numpy()


def _save(im: Image.Image, path, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, **kw)
    return path


# ----------------------------------------------------------------------------------------------- C01


def _c01_tree(root):
    g = np.linspace(0, 255, 256, dtype=np.float64)
    grad = np.stack([np.tile(g, (256, 1)), np.tile(g[:, None], (1, 256)), np.full((256, 256), 128.0)], -1)
    grad = grad.astype(np.uint8)
    jpg, png = io.BytesIO(), io.BytesIO()
    Image.fromarray(grad).save(jpg, "JPEG", quality=90)
    Image.fromarray(grad).save(png, "PNG")
    jpg, png = jpg.getvalue(), png.getvalue()
    for c in ("class_a", "class_b"):
        for j in range(6):
            make_image(root / c / f"ok{j}.{'png' if j % 2 else 'jpg'}", (40 + j, 50), seed=j + 10 * (c == "class_b"))
    bad = {
        root / "class_a" / "trunc70.jpg": jpg[: int(0.7 * len(jpg))],
        root / "class_a" / "trunc_header.jpg": jpg[:200],
        root / "class_a" / "empty.jpg": b"",
        root / "class_b" / "fake.jpg": b"<html>not an image</html>",
        root / "class_b" / "trunc.png": png[: int(0.7 * len(png))],
    }
    for p, data in bad.items():
        p.write_bytes(data)
    (root / "class_b" / "png_named.jpg").write_bytes(png)  # a valid PNG under a .jpg name
    return sorted(str(p.absolute()) for p in bad)


def test_c01_bad_files_error_lists_all_of_them_before_training(tmp_path):
    bad = _c01_tree(tmp_path / "data")
    with pytest.raises(DataError) as err:
        preflight(load_dataset(tmp_path / "data"))
    for p in bad:
        assert p in str(err.value)
    assert "png_named.jpg" not in str(err.value)  # content decides, not the extension
    result = CliRunner().invoke(app, ["train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"),
                                      "--model", "test_efficientnet", "--pretrained", "none", "--bad-images", "error",
                                      "--quiet"])
    assert result.exit_code != 0
    for p in bad:
        assert p in result.output
    assert not list((tmp_path / "run").glob("*.pt"))


def test_c01_bad_files_skip_writes_a_report_and_trains_on_the_rest(tmp_path):
    bad = _c01_tree(tmp_path / "data")
    result = _train(tmp_path / "data", tmp_path / "run", skip_bad=True)
    with open(result.run_dir / "skipped.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["path"] for r in rows) == bad and all(r["reason"] for r in rows)
    folds = (result.run_dir / "folds.csv").read_text()
    assert folds.count("\n") == 1 + 13 and "png_named.jpg" in folds  # 12 ok + the PNG named .jpg
    # The PNG named .jpg reads the same on every loader (all sniff the content).
    index = preflight(load_dataset(tmp_path / "data"), skip_bad=True).index
    one = index.subset([index.ids.index("class_b/png_named.jpg")])
    ref = _pixels(one, 64, "torch")
    for backend in BACKENDS:
        assert np.abs(_pixels(one, 64, backend) - ref).max() <= 3, backend


def test_c01_skip_bad_alias_and_policy_flag(tmp_path):
    _c01_tree(tmp_path / "data")
    result = CliRunner().invoke(app, ["train", "--data", str(tmp_path / "data"), "--bad-images", "maybe"])
    assert result.exit_code != 0 and "--bad-images" in result.output


# ----------------------------------------------------------------------------------------------- C04


def _c04_files(root):
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[:, :32] = (255, 0, 0, 0)  # red, fully transparent
    rgba[:, 32:] = (0, 0, 255, 255)
    a = _save(Image.fromarray(rgba, "RGBA"), root / "x" / "alpha.png")
    ramp = np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (64, 1))
    b = _save(Image.fromarray(ramp), root / "x" / "grey16.png")
    p = Image.new("P", (8, 8), 0)
    p.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    p.paste(1, (0, 0, 8, 4))  # top half opaque blue, bottom half palette entry 0: red, transparent
    c = _save(p, root / "x" / "palette.png", transparency=0)
    make_image(root / "y" / "plain.jpg", (30, 30), seed=1)
    return a, b, c


def test_c04_png_alpha_16bit_palette_are_normalised_alike_on_every_loader(tmp_path):
    a, b, c = _c04_files(tmp_path / "data")
    assert Image.open(a).convert("RGB").getpixel((0, 0)) == (255, 0, 0)  # the naive fallback shows the red
    checked = preflight(scan_folder(tmp_path / "data"))
    assert checked.converted == 3
    by_id = {i: k for k, i in enumerate(checked.index.ids)}
    assert checked.index.paths[by_id["y/plain.jpg"]].endswith("plain.jpg")  # plain files are read as they are
    assert str(a) in checked.index.origins[by_id["x/alpha.png"]]  # messages still name the original
    for backend in BACKENDS:
        px = _pixels(checked.index.subset([by_id["x/alpha.png"]]), 64, backend)[0]
        assert np.abs(px[:, :32] - 255).max() <= 1, backend  # white background, no hidden red
        assert np.abs(px[:, 40:] - (0, 0, 255)).max() <= 1, backend
        ramp = _pixels(checked.index.subset([by_id["x/grey16.png"]]), 256, backend)[0][32, :, 0]
        assert (np.diff(ramp) >= 0).all() and len(np.unique(ramp)) >= 200, backend
        pal = _pixels(checked.index.subset([by_id["x/palette.png"]]), 8, backend)[0]
        assert np.abs(pal[:4] - (0, 0, 255)).max() <= 1 and np.abs(pal[4:] - 255).max() <= 1, backend
    # Prediction reads test sets through the same pre-flight, so the same copies.
    from fastsort.predict import load_test_set

    test = load_test_set(tmp_path / "data" / "x")
    assert all("cache" in p for p in test.paths)


# ----------------------------------------------------------------------------------------------- C05


def test_c05_grey_la_and_1bit_files_become_three_equal_channels(tmp_path, monkeypatch):
    import fastsort.loader as L

    root = tmp_path / "data"
    ramp = np.tile(np.linspace(0, 255, 128).astype(np.uint8), (128, 1))
    _save(Image.fromarray(ramp, "L"), root / "a" / "grey.jpg", quality=95)
    la = np.stack([np.tile(np.linspace(0, 255, 64).astype(np.uint8), (64, 1)), np.full((64, 64), 255, np.uint8)], -1)
    _save(Image.fromarray(la, "LA"), root / "a" / "greyalpha.png")
    _save(Image.fromarray(np.indices((16, 16)).sum(0) % 2 == 0).convert("1"), root / "a" / "bits.png")
    assert [Image.open(root / "a" / n).mode for n in ("grey.jpg", "greyalpha.png", "bits.png")] == ["L", "LA", "1"]
    for j in range(20):
        make_image(root / "a" / f"rgb{j}.jpg", (30 + j, 40), seed=j)
    for j in range(6):
        make_image(root / "b" / f"rgb{j}.png", (35, 30 + j), seed=50 + j)
    index = preflight(scan_folder(root)).index
    monkeypatch.setattr(L, "COLOUR_P", 1.0)  # every image gets a colour op: the bug cannot hide
    model, _ = build_model("test_efficientnet", 2, channels_last=True)
    model.train()
    for backend in BACKENDS:
        for x, y in make_loader(index, batch_size=8, image_size=32, train=True, backend=backend, device="cpu",
                                workers=1).epoch(0):
            assert x.shape[1:] == (3, 32, 32), backend
            x, target = mix_batch(x.clone(), y, 2)
            torch.nn.functional.cross_entropy(model(x), target).backward()
        for name in ("a/grey.jpg", "a/greyalpha.png", "a/bits.png"):
            px = _pixels(index.subset([index.ids.index(name)]), 32, backend)[0]
            assert (px[..., 0] == px[..., 1]).all() and (px[..., 1] == px[..., 2]).all(), (backend, name)


# ----------------------------------------------------------------------------------------------- C07


def _c07_tree(root):
    for w, h in [(1, 1), (3, 3), (31, 31), (8, 200), (200, 8)]:
        for ext in ("png", "jpg"):
            _save(Image.new("RGB", (w, h), (200, 60, 30)), root / "small" / f"s{w}x{h}.{ext}")
    for j in range(10):
        make_image(root / "normal" / f"n{j}.jpg", (60, 50), seed=j)
    return root


def test_c07_tiny_and_extreme_images_give_full_size_on_every_loader_path(tmp_path):
    index = preflight(scan_folder(_c07_tree(tmp_path / "data"))).index
    small = index.subset([i for i, s in enumerate(index.ids) if s.startswith("small")])
    for backend in BACKENDS:
        for train in (True, False):
            loader = make_loader(small, batch_size=4, image_size=224, train=train, backend=backend, device="cpu",
                                 workers=1)
            shapes = [tuple(x.shape[1:]) for x, _ in loader.epoch(0)]
            assert sum(1 for _ in shapes) == len(loader) and set(shapes) == {(3, 224, 224)}, (backend, train)
        px = _pixels(small, 64, backend)
        assert np.abs(px - (200, 60, 30)).max() <= 3, backend  # a flat colour stays that colour


def test_c07_train_validate_and_predict_with_tta_on_tiny_images(tmp_path):
    from fastsort.predict import predict

    data = _c07_tree(tmp_path / "data")
    result = _train(data, tmp_path / "run")
    assert 0 <= result.history[-1]["val_acc"] <= 1
    pred = predict([result.best_checkpoint], data / "small", tta="dihedral", out=tmp_path / "pred", loader="threads",
                   device="cpu", batch_size=4)
    assert pred.probs.shape == (10, 2) and np.allclose(pred.probs.sum(1), 1, atol=1e-5)


# ----------------------------------------------------------------------------------------------- C08


def _write_csv(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["image_id", "label"])
        w.writerows(rows)
    return path


def _c08_images(root):
    names = ["my cat 01.jpg", "a,b.png", "café_ü_猫.jpg"] + [f"img{i}.{'png' if i % 2 else 'jpg'}" for i in range(8)]
    for k, n in enumerate(names):
        make_image(root / "images" / n, (30, 34), seed=k)
    return names


def test_c08_csv_awkward_ids_and_bad_rows(tmp_path):
    _c08_images(tmp_path)
    good = [("my cat 01", "cat"), ("a,b.png", "dog"), ("café_ü_猫.jpg", " cat ")] + \
           [(f"img{i}" if i % 3 else f"img{i}.{'png' if i % 2 else 'jpg'}", "cat" if i % 2 else "dog")
            for i in range(8)]
    bad = [("img1", "dog"), ("img2", ""), ("no_such_file", "dog"), ("img0", "cat")]  # lines 13-16
    _write_csv(tmp_path / "bad.csv", good + bad)
    with pytest.raises(DataError) as err:
        preflight(read_csv(tmp_path / "bad.csv", tmp_path / "images"))
    msg = str(err.value)
    assert "bad.csv line 13: duplicate id 'img1'" in msg and "'cat' vs 'dog'" in msg
    assert "bad.csv line 16: id 'img0' names file 'img0.jpg' again" in msg  # with and without extension
    assert "bad.csv line 14: empty label" in msg and "bad.csv line 15: no image file for id 'no_such_file'" in msg

    result = _train(_write_csv(tmp_path / "train.csv", good), tmp_path / "run")
    assert json.loads((result.run_dir / "classes.json").read_text()) == {"cat": 0, "dog": 1}
    ids = read_csv(tmp_path / "train.csv").index.ids
    assert {"my cat 01", "a,b.png", "café_ü_猫.jpg"} <= set(ids)


def test_c08_sparse_numeric_labels_map_to_0_to_c_minus_1(tmp_path):
    _c08_images(tmp_path)
    rows = [(f"img{i}", (3, 7, 12)[i % 3]) for i in range(8)] + [("my cat 01", 12), ("a,b.png", 7),
                                                                 ("café_ü_猫", 3)]
    csv_path = _write_csv(tmp_path / "train.csv", rows)
    scan = read_csv(csv_path)
    assert scan.index.classes == ("3", "7", "12") and set(scan.index.labels.tolist()) == {0, 1, 2}
    result = _train(csv_path, tmp_path / "run", n_folds=2)
    assert json.loads((result.run_dir / "classes.json").read_text()) == {"3": 0, "7": 1, "12": 2}


# ----------------------------------------------------------------------------------------------- C09


def _c09_tree(root):
    for j in range(10):
        make_image(root / "a" / f"a{j}.jpg", (30, 32), seed=j)
        make_image(root / "b" / f"b{j}.{('JPG', 'jpeg', 'png', 'PNG')[j % 4]}", (33, 30), seed=20 + j)
    for j in range(4):
        make_image(root / "e" / "sub" / f"e{j}.jpg", (31, 31), seed=40 + j)
    (root / "c_empty").mkdir()
    (root / "d").mkdir()
    (root / "d" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "d" / "notes.txt").write_text("notes")
    (root / "readme.txt").write_text("read me")
    (root / "a" / "._x.jpg").write_bytes(b"\0\5\26\7 AppleDouble")
    return root


def test_c09_folder_layout_classes_junk_nesting_and_case(tmp_path):
    root = _c09_tree(tmp_path / "data")
    with pytest.warns(DataWarning) as caught:
        scan = scan_folder(root)
    assert len(caught) == 1 and "c_empty" in str(caught[0].message) and "d" in str(caught[0].message)
    assert scan.index.classes == ("a", "b", "e")
    assert scan.index.class_counts().tolist() == [10, 10, 4]  # e/sub counts for e; ._x.jpg is junk
    assert not preflight(scan).problems

    loose = tmp_path / "loose"
    for j in range(3):
        make_image(loose / f"x{j}.jpg", (20, 20), seed=j)
    with pytest.raises(DataError, match="no class folders"):
        scan_folder(loose)
    (loose / "only").mkdir()
    make_image(loose / "only" / "y.jpg", (20, 20), seed=9)
    with pytest.raises(DataError, match="at least 2"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scan_folder(loose)


def test_c09_predict_returns_class_names_from_the_saved_map(tmp_path):
    from fastsort.predict import predict

    root = _c09_tree(tmp_path / "data")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        result = _train(root, tmp_path / "run")
    assert json.loads((result.run_dir / "classes.json").read_text()) == {"a": 0, "b": 1, "e": 2}
    pred = predict([result.best_checkpoint], root / "b", tta="none", out=tmp_path / "pred", loader="threads",
                   device="cpu")
    with open(tmp_path / "pred" / "submission.csv") as f:
        labels = {row[1] for row in list(csv.reader(f))[1:]}
    assert labels and labels <= {"a", "b", "e"}


# ----------------------------------------------------------------------------------------------- C10


@pytest.mark.parametrize("n", [33, 5, 32])
def test_c10_every_sample_once_per_epoch_on_every_loader(tmp_path, n):
    write_csv_dataset(tmp_path, n=n, labels=list(range(n)))  # label = sample index
    index = read_csv(tmp_path / "train.csv").index
    assert index.labels.tolist() == list(range(n))
    for backend in BACKENDS:
        train = make_loader(index, batch_size=16, image_size=16, train=True, backend=backend, device="cpu",
                            workers=1)
        counts = set()
        for epoch in range(3):
            seen, batches = [], 0
            for x, y in train.epoch(epoch):
                assert x.shape[0] == len(y) >= 2, backend
                seen += y.tolist()
                batches += 1
            assert sorted(seen) == list(range(n)) and batches == len(train), (backend, epoch)
            counts.add(batches)
        assert counts == {max(1, n // 16)}  # a single-sample tail joins the batch before it
        evaluation = make_loader(index, batch_size=16, image_size=16, train=False, backend=backend, device="cpu",
                                 workers=1)
        seen = [v for x, y in evaluation.epoch(0) for v in y.tolist()]
        assert seen == list(range(n)), backend


def test_c10_prediction_returns_n_rows_in_input_order(tmp_path):
    from fastsort.predict import predict_probs

    write_csv_dataset(tmp_path, n=33, labels=list(range(33)))
    index = read_csv(tmp_path / "train.csv").index
    torch.manual_seed(0)
    model, info = build_model("test_efficientnet", 3)
    state = {"model": unwrapped_state_dict(model.eval()), "classes": ["0", "1", "2"],
             "model_name": "test_efficientnet", "config": {},
             "model_info": {"image_size": 16, "mean": info.mean, "std": info.std}}
    batched = predict_probs(state, index, tta="flip", batch_size=16, device="cpu", loader="threads")
    one_by_one = predict_probs(state, index, tta="flip", batch_size=1, device="cpu", loader="threads")
    assert batched.shape == (33, 3)
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5)


# ----------------------------------------------------------------------------------------------- C12


@pytest.mark.parametrize("n,bs", [(33, 16), (21, 7)])
def test_c12_odd_and_single_tail_batches_with_mixing_and_batchnorm(tmp_path, n, bs):
    write_csv_dataset(tmp_path, n=n)
    index = read_csv(tmp_path / "train.csv").index
    model, _ = build_model("test_efficientnet", 3)
    model.train()
    loader = make_loader(index, batch_size=bs, image_size=16, train=True, backend="threads", device="cpu",
                         workers=1)
    sizes = []
    for x, y in loader.epoch(0):
        sizes.append(len(x))
        x, target = mix_batch(x.clone(), y, 3, cutmix_fraction=0.5, gridmask_ratio=0.6)
        assert torch.allclose(target.sum(1), torch.ones(len(x))) and target.min() >= 0 and target.max() <= 1
        torch.nn.functional.cross_entropy(model(x), target).backward()
    assert sum(sizes) == n and min(sizes) >= 2  # BatchNorm never trains on one sample


@pytest.mark.parametrize("b", [1, 2, 3, 7])
def test_c12_batch_mixing_reads_b_from_the_tensor(b):
    g = torch.Generator().manual_seed(b)
    x = torch.rand(b, 3, 12, 20, generator=g)
    y = torch.arange(b) % 3
    t = one_hot(y, 3)
    for fraction in (0.5, 1.0):
        out, target = mix_batch(x.clone(), y, 3, cutmix_fraction=fraction, generator=g)
        assert out.shape == x.shape and target.shape == (b, 3)
        assert torch.allclose(target.sum(1), torch.ones(b)) and target.min() >= 0 and target.max() <= 1
        if b == 1:
            assert torch.equal(target, t)  # one sample: nothing to mix with
    xc, tc = cutmix(x, t, generator=g)
    assert xc.shape == x.shape and torch.allclose(tc.sum(1), torch.ones(b))
    assert gridmask(x, generator=g).shape == x.shape


# ----------------------------------------------------------------------------------------------- C21


def _c21_model():
    torch.manual_seed(0)
    model, _ = build_model("test_efficientnet", 3, channels_last=False)
    return model.eval()


def test_c21_checkpoints_of_wrapped_models_load_into_a_bare_model(tmp_path):
    from torch.optim.swa_utils import AveragedModel

    from fastsort.predict import model_from_checkpoint

    model = _c21_model()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)
    dp = torch.nn.DataParallel
    wrapped = {"dp": dp(model), "compile": torch.compile(model), "dp(compile)": dp(torch.compile(model)),
               "compile(dp)": torch.compile(dp(model)), "dp(dp)": dp(dp(model)), "averaged": AveragedModel(model)}
    meta = {"classes": ["0", "1", "2"], "model_name": "test_efficientnet", "config": {"channels_last": False},
            "model_info": {"image_size": 32, "mean": (0.5,) * 3, "std": (0.5,) * 3}}
    for name, w in wrapped.items():
        raw = w.state_dict()
        assert name == "averaged" or any(k.startswith(("module.", "_orig_mod.")) for k in raw), name
        for how, sd in (("fastsort", unwrapped_state_dict(w)), ("raw", raw)):
            if how == "fastsort" and name != "averaged":
                assert set(sd) == set(model.state_dict()), name
            path = save_checkpoint({**meta, "model": sd}, tmp_path / f"{name}-{how}.pt")
            fresh, _ = model_from_checkpoint(load_checkpoint(path), torch.device("cpu"))
            with torch.no_grad():
                assert torch.equal(fresh(x), ref), (name, how)
            torch.save(raw, tmp_path / "raw.pth")  # a bare state dict file, as --pretrained reads it
            bare = build_model("test_efficientnet", 3, channels_last=False, pretrained=tmp_path / "raw.pth")[0]
            with torch.no_grad():
                assert torch.equal(bare.eval()(x), ref), (name, "pretrained")


def test_c21_mismatches_are_errors_naming_keys_except_a_head_replacement(tmp_path):
    model = _c21_model()
    sd = {f"module._orig_mod.{k}": v for k, v in model.state_dict().items()}
    conv = next(k for k, v in model.state_dict().items() if v.dim() == 4)
    broken = dict(sd)
    del broken[f"module._orig_mod.{conv}"]
    with pytest.raises(ValueError, match=f"missing: {conv}"):
        load_model_state(_c21_model(), broken, source="x.pt")
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match=conv.replace(".", r"\.")):
        build_model("test_efficientnet", 3, pretrained=tmp_path / "broken.pth")
    other = build_model("test_vit", 3)[0].state_dict()
    with pytest.raises(ValueError, match="unexpected"):
        load_model_state(_c21_model(), other, source="vit.pt")
    torch.save(other, tmp_path / "vit.pth")
    with pytest.raises(ValueError):
        build_model("test_efficientnet", 3, pretrained=tmp_path / "vit.pth")
    # The one tolerated partial load: a new head, and exactly the head's keys skipped.
    torch.save(sd, tmp_path / "full.pth")
    new, info = build_model("test_efficientnet", 5, channels_last=False, pretrained=tmp_path / "full.pth")
    assert "fresh head" in info.weights and "classifier.weight" in info.weights
    for k, v in model.state_dict().items():
        if not k.startswith(info.head_prefixes):
            assert torch.equal(new.state_dict()[k], v), k


# ----------------------------------------------------------------------------------------------- C23


def _c23_net(head=4):
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                               torch.nn.Linear(4 * 6 * 6, head))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_c23_average_floats_exactly_and_keep_integer_buffers(dtype):
    states = []
    for i in range(3):
        sd = _c23_net().state_dict()
        states.append({k: (torch.full_like(v, 10 * (i + 1)) if not v.is_floating_point()
                           else torch.full_like(v, i + 1, dtype=dtype)) for k, v in sd.items()})
    avg = average_state_dicts(states, ["e1.pt", "e2.pt", "e3.pt"])
    for k, v in avg.items():
        if k.endswith("num_batches_tracked"):
            assert v.dtype == torch.int64 and int(v) == 30  # the documented rule: the largest counter
        else:
            assert v.dtype == dtype and bool((v == 2.0).all()), k
    _c23_net().to(dtype).load_state_dict(avg, strict=True)
    other = {k: v.to(dtype) if v.is_floating_point() else v for k, v in _c23_net(head=5).state_dict().items()}
    with pytest.raises(ValueError, match=r"'3\.weight'.*e4\.pt"):
        average_state_dicts(states + [other], ["e1.pt", "e2.pt", "e3.pt", "e4.pt"])


# ----------------------------------------------------------------------------------------------- C24

SHAPES = [(224, 224), (224, 320), (320, 224)]


def _two_images(h, w):
    x = torch.stack([torch.zeros(1, h, w), torch.ones(1, h, w)])  # one channel: the geometry is per pixel
    return x, one_hot(torch.tensor([0, 1]), 2)


@pytest.mark.parametrize("h,w", SHAPES)
def test_c24_cutmix_label_share_is_the_pasted_pixel_share(h, w):
    x, y = _two_images(h, w)
    tol = 1.0 / (h * w) + 1e-6
    covered = torch.zeros(h, w, dtype=torch.bool)
    for seed in range(2000):
        p = sample_cutmix(2, h, w, generator=torch.Generator().manual_seed(seed))
        assert bool(((0 <= p["y0"]) & (p["y0"] <= p["y1"]) & (p["y1"] <= h)).all())
        assert bool(((0 <= p["x0"]) & (p["x0"] <= p["x1"]) & (p["x1"] <= w)).all())
        xo, yo = apply_cutmix(x, y, p)
        changed = (xo[:, 0] != x[:, 0]).float().mean((1, 2))
        assert torch.allclose(yo.sum(1), torch.ones(2))
        assert (yo[0, 1] - changed[0]).abs() <= tol and (yo[1, 0] - changed[1]).abs() <= tol
        covered |= cutmix_box_mask(p, h, w).any(0)
    assert covered.all()  # every pixel, first and last rows and columns included, can be pasted
    # Injected parameters: lambda 0.5 at the corners, an edge and the centre; an empty box mixes nothing.
    lam = torch.full((2,), 0.5)
    for cy, cx in [(0, 0), (0, w // 2), (h - 1, w - 1), (h // 2, w // 2)]:
        box = cutmix_box(lam, torch.tensor([cy, cy]), torch.tensor([cx, cx]), h, w)
        xo, yo = apply_cutmix(x, y, {**box, "partner": torch.tensor([1, 0])})
        changed = (xo[0, 0] == 1).float().mean()
        assert abs(float(yo[0, 1] - changed)) <= tol and abs(float(yo[1, 0] - (xo[1, 0] == 0).float().mean())) <= tol
        if (cy, cx) == (0, 0):
            assert abs(float(changed) - 0.125) < 0.01  # about 12%, not the sampled 50%
        if (cy, cx) == (h // 2, w // 2):
            assert abs(float(changed) - 0.5) < 0.01
    box = cutmix_box(torch.ones(2), torch.tensor([5, 5]), torch.tensor([5, 5]), h, w)
    xo, yo = apply_cutmix(x, y, {**box, "partner": torch.tensor([1, 0])})
    assert torch.equal(xo, x) and torch.equal(yo, y)


@pytest.mark.parametrize("h,w", SHAPES)
def test_c24_gridmask_drops_its_configured_share_on_any_shape(h, w):
    p = sample_gridmask(256, h, w, ratio=0.6, generator=torch.Generator().manual_seed(0))
    dropped = 1 - gridmask_keep_mask(p, h, w).float().mean()
    assert abs(float(dropped) - (1 - 0.6) ** 2) <= 0.05 * (1 - 0.6) ** 2 + 0.01
