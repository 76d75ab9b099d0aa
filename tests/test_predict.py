"""Inference: TTA views, sharpening, ensemble weights, predict's files, pseudo-labels, scoring, the CLI."""

import csv
import json
import math
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import make_image, write_csv_dataset
from fastsort.checkpoint import save_checkpoint, unwrapped_state_dict
from fastsort.cli import app
from fastsort.index import DataError
from fastsort.models import build_model
from fastsort.predict import (TTA, ensemble, ensemble_weights, load_test_set, predict, predict_probs, pseudo_label,
                              score, sharpen)

P = sys.modules["fastsort.predict"]  # the package exports the function `predict` under the module's name
runner = CliRunner()


def _checkpoint(path, model_name="test_efficientnet", classes=("0", "1", "2"), image_size=32, seed=0):
    """A checkpoint as train writes it, of a randomly initialised model (built offline, no training)."""
    torch.manual_seed(seed)
    model, info = build_model(model_name, len(classes), pretrained=None)
    state = {"model": unwrapped_state_dict(model), "classes": list(classes), "model_name": model_name,
             "model_info": {"mean": list(info.mean), "std": list(info.std), "image_size": image_size, "act": "mish",
                            "num_classes": len(classes)},
             "config": {"act": "mish", "mish": "native", "drop_rate": None, "channels_last": True},
             "epoch": 0, "metrics": {}}
    return save_checkpoint(state, path)


def _write_test_csv(path, ids):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_id"])
        w.writerows([i] for i in ids)
    return path


@pytest.fixture(scope="module")
def testset(tmp_path_factory):
    """10 test images (odd sizes, JPEG/PNG, grey/RGB) with a test.csv and a labels file."""
    root = tmp_path_factory.mktemp("testset")
    write_csv_dataset(root, n=10)
    ids = [f"img{i:03d}" for i in range(10)]
    _write_test_csv(root / "test.csv", ids)
    (root / "train.csv").rename(root / "test_labels.csv")
    return root


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    return {"eff": _checkpoint(root / "eff.pt"), "eff2": _checkpoint(root / "eff2.pt", seed=1),
            "res40": _checkpoint(root / "res.pt", "test_resnet", image_size=40, seed=2)}


# ----------------------------------------------------------------------------------------------- TTA


class _PoolLinear(torch.nn.Module):
    """Global average pooling then a linear layer: blind to every flip and transpose."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(3, 4)

    def forward(self, x):
        return self.fc(x.float().mean((2, 3)))


def test_dihedral_is_the_whole_group_and_contains_the_flips():
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).reshape(2, 3, 5, 5)  # no symmetry at all
    views = [v(x) for v in TTA["dihedral"]]
    assert len(views) == 8
    assert all(not torch.equal(a, b) for i, a in enumerate(views) for b in views[i + 1:]), "8 distinct views"
    group = [torch.rot90(y, k, (2, 3)) for y in (x, x.flip(3)) for k in range(4)]
    assert all(any(torch.equal(v, g) for g in group) for v in views), "each view is a dihedral element"
    flips = [x, x.flip(3), x.flip(2), x.flip((2, 3))]
    assert all(torch.equal(v(x), f) for v, f in zip(TTA["flip"], flips)), "the seed's 4 flips, in order"
    assert all(torch.equal(a(x), b(x)) for a, b in zip(TTA["flip"], TTA["dihedral"][:4]))
    assert [v(x) for v in TTA["none"]][0] is x


def test_a_symmetric_model_gives_the_same_probabilities_for_every_view(testset, monkeypatch):
    model = _PoolLinear()
    x = torch.randn(3, 3, 6, 6)
    ref = model(x)
    for view in TTA["dihedral"]:
        torch.testing.assert_close(model(view(x)), ref, atol=1e-6, rtol=1e-6)
    # The same through predict_probs: the views' mean of a flip-blind model is its identity view.
    monkeypatch.setattr(P, "model_from_checkpoint", lambda state, dev: (model.eval(), state["model_info"]))
    state = {"model": {}, "classes": ["a", "b", "c", "d"], "model_name": "pool", "config": {},
             "model_info": {"mean": [0.5] * 3, "std": [0.25] * 3, "image_size": 24}}
    index = load_test_set(testset / "test.csv")
    probs = {t: predict_probs(state, index, tta=t, batch_size=4, device="cpu") for t in TTA}
    np.testing.assert_allclose(probs["flip"], probs["none"], atol=1e-6)
    np.testing.assert_allclose(probs["dihedral"], probs["none"], atol=1e-6)


def test_predictions_keep_index_order_with_a_short_last_batch(testset, ckpts):
    index = load_test_set(testset / "test.csv")
    assert len(index) % 4 != 0
    batched = predict_probs(ckpts["eff"], index, batch_size=4, device="cpu")
    alone = np.concatenate([predict_probs(ckpts["eff"], index.subset([i]), batch_size=1, device="cpu")
                            for i in range(len(index))])
    assert batched.shape == (10, 3) and batched.dtype == np.float32
    np.testing.assert_allclose(batched.sum(1), 1, atol=1e-5)
    np.testing.assert_allclose(batched, alone, atol=2e-5)
    assert not np.allclose(batched, batched[::-1]), "rows differ, so the comparison above checks order"


# ----------------------------------------------------------------------------------------------- combine


def test_sharpen_matches_the_hand_computation():
    p = np.array([[0.5, 0.3, 0.2]], dtype=np.float32)
    np.testing.assert_allclose(sharpen(p, 2.0), [[0.25 / 0.38, 0.09 / 0.38, 0.04 / 0.38]], rtol=1e-6)
    assert np.array_equal(sharpen(p, 1.0), p)
    extreme = sharpen(np.array([[1.0, 0.0, 0.0], [1e-20, 1e-30, 1.0]], dtype=np.float32), 10.0)
    assert np.isfinite(extreme).all() and np.allclose(extreme.sum(1), 1)
    with pytest.raises(ValueError, match="--temperature.*-1"):
        sharpen(p, -1.0)


def test_ensemble_weights_apply_and_are_normalised():
    a = np.array([[0.9, 0.1], [0.2, 0.8]], dtype=np.float32)
    b = np.array([[0.3, 0.7], [0.6, 0.4]], dtype=np.float32)
    assert np.array_equal(ensemble([a, b], ["x", "y"], weights=[1, 0]), a)
    np.testing.assert_allclose(ensemble([a, b], ["x", "y"], weights=[1, 3]), 0.25 * a + 0.75 * b, rtol=1e-6)
    np.testing.assert_allclose(ensemble([a, b], ["x", "y"], weights=[2, 6]), 0.25 * a + 0.75 * b, rtol=1e-6)
    assert not np.allclose(ensemble([a, b], ["x", "y"], weights=[1, 3]), ensemble([a, b], ["x", "y"]))
    # Default: each architecture an equal share, split among its checkpoints.
    np.testing.assert_allclose(ensemble_weights(["X", "X", "Y"]), [0.25, 0.25, 0.5])
    c = np.array([[0.5, 0.5], [0.0, 1.0]], dtype=np.float32)
    np.testing.assert_allclose(ensemble([a, b, c], ["X", "X", "Y"]), 0.25 * a + 0.25 * b + 0.5 * c, rtol=1e-6)
    with pytest.raises(ValueError, match="2 value.*3 checkpoint"):
        ensemble([a, b, c], ["X", "X", "Y"], weights=[1, 2])
    with pytest.raises(ValueError, match="non-negative"):
        ensemble([a, b], ["x", "y"], weights=[0, 0])
    with pytest.raises(ValueError, match="non-negative"):
        ensemble([a, b], ["x", "y"], weights=[-1, 2])


# ----------------------------------------------------------------------------------------------- predict


def test_predict_writes_probs_submission_and_record(testset, ckpts, tmp_path):
    out = tmp_path / "pred"
    result = predict([ckpts["eff"], ckpts["eff2"], ckpts["res40"]], testset / "test.csv", tta="flip",
                     temperature=2.0, out=out, batch_size=10, device="cpu")
    assert sorted(p.name for p in out.iterdir()) == ["model_probs.npz", "predictions.json", "probs.csv",
                                                     "submission.csv"]
    with open(out / "probs.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["image_id", "path", "0", "1", "2"]
    assert [r[0] for r in rows[1:]] == [f"img{i:03d}" for i in range(10)]
    assert all(r[1].startswith("/") and r[1].endswith((".png", ".jpg")) for r in rows[1:])
    probs = np.array([[float(v) for v in r[2:]] for r in rows[1:]])
    np.testing.assert_allclose(probs, result.probs, rtol=1e-6)
    # the ensemble is rebuilt from the saved per-model probabilities: sharpen, weigh 1/4, 1/4, 1/2
    per_model = np.load(out / "model_probs.npz")["probs"]
    assert per_model.shape == (3, 10, 3)
    np.testing.assert_allclose(ensemble([sharpen(p, 2.0) for p in per_model], ["a", "a", "b"]), result.probs,
                               rtol=1e-5)
    with open(out / "submission.csv") as f:
        sub = list(csv.reader(f))
    assert sub[0] == ["id", "label"] and [r[1] for r in sub[1:]] == [str(k) for k in result.probs.argmax(1)]
    record = json.loads((out / "predictions.json").read_text())
    assert record["weights"] == pytest.approx([0.25, 0.25, 0.5]) and record["tta"] == "flip"
    assert record["temperature"] == 2.0 and record["classes"] == ["0", "1", "2"]
    assert record["counts"]["images"] == 10 and sum(record["counts"]["predicted"].values()) == 10
    assert [c["image_size"] for c in record["checkpoints"]] == [32, 32, 40]
    assert record["image_root"] == str((testset / "images").absolute())
    assert not list(out.glob(".*tmp*"))


def test_submission_label_offset(testset, ckpts, tmp_path):
    result = predict([ckpts["eff"]], testset / "test.csv", tta="none", label_offset=1, out=tmp_path / "p",
                     batch_size=16, device="cpu")
    with open(tmp_path / "p" / "submission.csv") as f:
        sub = list(csv.DictReader(f))
    assert [r["label"] for r in sub] == [str(k + 1) for k in result.probs.argmax(1)]
    named = _checkpoint(tmp_path / "named.pt", classes=("cat", "dog", "eel"))
    with pytest.raises(DataError, match=r"integer class names.*\['cat', 'dog', 'eel'\]"):
        predict([named], testset / "test.csv", label_offset=1, out=tmp_path / "q", device="cpu")


@pytest.fixture
def no_model_runs(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a model ran before the inputs were checked")

    monkeypatch.setattr(P, "predict_probs", boom)
    monkeypatch.setattr(P, "model_from_checkpoint", boom)


def test_different_class_maps_fail_naming_both(testset, ckpts, tmp_path, no_model_runs):
    other = _checkpoint(tmp_path / "other.pt", classes=("0", "1", "3"))
    with pytest.raises(DataError, match=r"eff\.pt and .*other\.pt have different class lists.*'2'.*'3'"):
        predict([ckpts["eff"], other], testset / "test.csv", out=tmp_path / "p", device="cpu")
    assert not (tmp_path / "p").exists()


def test_missing_test_image_and_checkpoint_fail_before_work(testset, ckpts, tmp_path, no_model_runs):
    csv_path = _write_test_csv(testset / "test_missing.csv", ["img000", "ghost", "img001", "ghost2"])
    with pytest.raises(DataError, match=r"(?s)2 problem.*line 3: no image file for id 'ghost'.*line 5.*'ghost2'"):
        predict([ckpts["eff"]], csv_path, out=tmp_path / "p", device="cpu")
    with pytest.raises(DataError, match=r"(?s)1 of 2 checkpoint.*nope\.pt"):
        predict([ckpts["eff"], tmp_path / "nope.pt"], testset / "test.csv", out=tmp_path / "p", device="cpu")
    with pytest.raises(ValueError, match="--weights has 1 value"):
        predict([ckpts["eff"], ckpts["eff2"]], testset / "test.csv", weights=[1], out=tmp_path / "p", device="cpu")
    with pytest.raises(ValueError, match="--tta must be one of none, flip, dihedral, got 'rot'"):
        predict([ckpts["eff"]], testset / "test.csv", tta="rot", out=tmp_path / "p", device="cpu")
    assert not (tmp_path / "p").exists()


def test_test_set_from_image_folders(testset, tmp_path):
    assert load_test_set(testset).ids == tuple(f"img{i:03d}" for i in range(10))  # a folder holding test.csv
    flat = tmp_path / "flat"
    for i, ext in enumerate((".png", ".jpg", ".png")):
        make_image(flat / f"t{i}{ext}", (20 + i, 31), seed=i)
    (flat / "notes.txt").write_text("not an image")
    index = load_test_set(flat)
    assert index.ids == ("t0.png", "t1.jpg", "t2.png") and (index.labels == -1).all()
    nested = tmp_path / "nested"
    make_image(nested / "cat" / "a.jpg", (20, 20), seed=1)
    make_image(nested / "dog" / "b.png", (20, 20), seed=2)
    assert load_test_set(nested).ids == ("cat/a.jpg", "dog/b.png")
    (flat / "t1.jpg").write_bytes(b"broken")
    with pytest.raises(DataError, match="t1.jpg: cannot decode"):
        load_test_set(flat)


# ----------------------------------------------------------------------------------------------- pseudo-labels


def _write_probs(path, rows, classes=("a", "b", "c")):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_id", "path", *classes])
        for i, p in enumerate(rows):
            w.writerow([f"t{i}", f"/data/t{i}.png", *p])
    return path


def test_pseudo_label_keeps_exactly_the_confident_rows(tmp_path):
    src = _write_probs(tmp_path / "probs.csv", [(0.8, 0.1, 0.1), (0.1, 0.79, 0.11), (0.02, 0.03, 0.95),
                                                 (0.5, 0.25, 0.25)])
    result = pseudo_label(tmp_path, threshold=0.8)
    assert (result.kept, result.total) == (2, 4) and result.out == tmp_path / "pseudo_labels.csv"
    with open(result.out) as f:
        rows = list(csv.reader(f))
    assert rows == [["image_id", "label", "path"], ["t0", "a", "/data/t0.png"], ["t2", "c", "/data/t2.png"]]
    assert pseudo_label(src, tmp_path / "all.csv", threshold=0.5).kept == 4
    for bad in (0.0, 1.5, -0.1, math.nan):
        with pytest.raises(ValueError, match=f"--threshold must be in \\(0, 1\\], got {bad}"):
            pseudo_label(src, threshold=bad)


# ----------------------------------------------------------------------------------------------- score


def _write_labels(path, pairs, id_col="image_id"):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([id_col, "label"])
        w.writerows(pairs)
    return path


def test_score_hand_case_png_and_missing_ids(tmp_path):
    truth = _write_labels(tmp_path / "labels.csv", [("i1", "a"), ("i2", "a"), ("i3", "b"), ("i4", "b"), ("i5", "c")])
    sub = _write_labels(tmp_path / "sub.csv", [("i1", "a"), ("i2", "b"), ("i3", "b"), ("i4", "b"), ("i5", "c")],
                        id_col="id")
    result = score(sub, truth, out_png=tmp_path / "cm.png")
    assert result["accuracy"] == pytest.approx(0.8)
    # F1 per class: a 2*1*.5/1.5 = 2/3, b 2*(2/3)*1/(5/3) = .8, c 1.
    assert result["macro_f1"] == pytest.approx((2 / 3 + 0.8 + 1) / 3)
    assert result["confusion"] == [[1, 1, 0], [0, 2, 0], [0, 0, 1]] and result["labels"] == ["a", "b", "c"]
    assert (tmp_path / "cm.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    broken = _write_labels(tmp_path / "bad.csv", [("i1", "a"), ("i2", "a"), ("i4", "b"), ("i5", "c"), ("zz", "a")],
                           id_col="id")
    with pytest.raises(DataError, match=r"id missing from bad.csv: 'i3'(.|\n)*unknown to labels.csv: 'zz'"):
        score(broken, truth)


def test_score_with_label_offset(tmp_path):
    truth = _write_labels(tmp_path / "labels.csv", [("i1", "0"), ("i2", "1"), ("i3", "2")])
    sub = _write_labels(tmp_path / "sub.csv", [("i1", "1"), ("i2", "2"), ("i3", "2")], id_col="id")
    assert score(sub, truth, label_offset=1)["accuracy"] == pytest.approx(2 / 3)


# ----------------------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A real (one-step) training run's best.pt, via the threads loader (no DALI needed)."""
    from fastsort.train import TrainConfig, train

    root = tmp_path_factory.mktemp("trained")
    write_csv_dataset(root, n=18)
    cfg = TrainConfig(data=str(root), out=str(root / "run"), model="test_efficientnet", pretrained="none",
                      image_size=32, batch_size=8, epochs=1, limit_batches=1, workers=1, n_folds=3, loader="threads")
    return train(cfg, progress=False, echo=lambda s: None).best_checkpoint


def test_cli_predict_pseudo_label_score(trained, ckpts, testset, tmp_path):
    out = tmp_path / "pred"
    result = runner.invoke(app, ["predict", str(trained), str(ckpts["res40"]), "--test", str(testset / "test.csv"),
                                 "--tta", "dihedral", "--temperature", "2", "--weights", "1,3", "--out", str(out),
                                 "--batch-size", "10", "--device", "cpu", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "10 images, 2 model(s), weights 0.25, 0.75" in result.output
    assert json.loads((out / "predictions.json").read_text())["weights_given"] == [1.0, 3.0]
    result = runner.invoke(app, ["pseudo-label", str(out), "--threshold", "0.3"])
    assert result.exit_code == 0, result.output
    assert "kept 10 of 10" in result.output  # 3 classes: the top probability is always above 1/3
    with open(out / "pseudo_labels.csv") as f:
        rows = list(csv.DictReader(f))
    assert all(r["label"] in ("0", "1", "2") and r["path"].startswith("/") for r in rows)
    png = tmp_path / "cm.png"
    result = runner.invoke(app, ["score", str(out / "submission.csv"), "--labels", str(testset / "test_labels.csv"),
                                 "--png", str(png)])
    assert result.exit_code == 0, result.output
    assert "accuracy" in result.output and "macro-F1" in result.output and "true\\pred" in result.output
    assert png.is_file()


@pytest.mark.parametrize("extra, message", [
    (["--tta", "rot"], "--tta must be one of none, flip, dihedral"),
    (["--weights", "1,2"], "--weights has 2 value"),
    (["--weights", "1,x"], "--weights must be a comma list"),
    (["--temperature", "0"], "--temperature must be a positive number"),
])
def test_cli_predict_bad_options_fail(ckpts, testset, tmp_path, extra, message):
    result = runner.invoke(app, ["predict", str(ckpts["eff"]), "--test", str(testset / "test.csv"),
                                 "--out", str(tmp_path / "p"), "--device", "cpu", *extra])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "p").exists()


def test_cli_missing_inputs_fail(ckpts, testset, tmp_path):
    result = runner.invoke(app, ["predict", str(tmp_path / "gone.pt"), "--test", str(testset / "test.csv"),
                                 "--device", "cpu", "--out", str(tmp_path / "p")])
    assert result.exit_code == 2 and "checkpoint not found" in result.output and "gone.pt" in result.output
    result = runner.invoke(app, ["pseudo-label", str(tmp_path), "--threshold", "1.2"])
    assert result.exit_code == 2 and "--threshold must be in (0, 1], got 1.2" in result.output
    result = runner.invoke(app, ["score", str(tmp_path / "sub.csv"), "--labels", str(tmp_path / "l.csv")])
    assert result.exit_code == 2 and "file not found" in result.output
