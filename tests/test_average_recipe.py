"""Weight averaging and the one-file recipe, on tiny generated data."""

import csv
import json
import sys

import pytest
import torch
import yaml

from conftest import make_image, write_csv_dataset
from fastsort.average import average_checkpoints, average_state_dicts
from fastsort.checkpoint import load_checkpoint
from fastsort.recipe import load_recipe, run_recipe
from fastsort.train import TrainConfig, train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("avg")
    write_csv_dataset(root, n=30)
    test_rows = []
    for i in range(7):
        make_image(root / "images" / f"test{i}.jpg", (35 + i, 44), seed=900 + i, mode="L" if i % 3 else "RGB")
        test_rows.append((f"test{i}", i % 3))
    with open(root / "test.csv", "w", newline="") as f:
        csv.writer(f).writerows([("image_id",)] + [(r[0],) for r in test_rows])
    with open(root / "test_labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([("image_id", "label")] + test_rows)
    return root


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "r"
    cfg = TrainConfig(data=str(data / "train.csv"), out=str(out), model="test_efficientnet", pretrained="none",
                      image_size=32, batch_size=8, epochs=2, lr=0.05, workers=1, n_folds=3, loader="threads")
    train(cfg, progress=False)
    return out


def test_average_of_two_checkpoints_is_the_mean_of_their_tensors(run, tmp_path):
    a, b = (load_checkpoint(run / f"epoch_00{k}.pt") for k in (1, 2))
    result = average_checkpoints([run / "epoch_001.pt", run / "epoch_002.pt"], tmp_path / "avg.pt", tta="none",
                                 bn="average", echo=lambda s: None)
    avg = load_checkpoint(result.path)
    for k, t in avg["model"].items():
        if t.is_floating_point():
            torch.testing.assert_close(t, ((a["model"][k].double() + b["model"][k].double()) / 2).to(t.dtype))
        else:  # num_batches_tracked: a counter, the larger is kept
            assert torch.equal(t, torch.maximum(a["model"][k], b["model"][k]))
    assert avg["classes"] == a["classes"] and avg["model_name"] == "test_efficientnet"
    assert avg["averaged_from"] == [str(run / "epoch_001.pt"), str(run / "epoch_002.pt")]
    assert 0 <= avg["metrics"]["val_acc"] <= 1


def test_recomputed_bn_statistics_replace_the_averaged_ones(run, tmp_path):
    paths = [run / "epoch_001.pt", run / "epoch_002.pt"]
    kept = average_checkpoints(paths, tmp_path / "a.pt", tta="none", bn="average", echo=lambda s: None)
    fresh = average_checkpoints(paths, tmp_path / "r.pt", tta="none", bn="recompute", echo=lambda s: None)
    a, r = load_checkpoint(kept.path)["model"], load_checkpoint(fresh.path)["model"]
    stats = [k for k in a if k.endswith("running_var")]
    assert stats and any(not torch.allclose(a[k], r[k]) for k in stats)
    weights = [k for k in a if k.endswith(".weight")]
    assert all(torch.equal(a[k], r[k]) for k in weights), "only the statistics change"


def test_top_k_keeps_the_best_scored_checkpoints(run, tmp_path, monkeypatch):
    P = sys.modules["fastsort.predict"]

    scores = iter([0.2, 0.9, 0.5])  # three candidates scored in order, then the average itself
    real = P.predict_probs

    def fake(state, index, **kw):
        probs = real(state, index, **kw)
        try:
            acc = next(scores)
        except StopIteration:
            return probs
        probs[:] = 0
        n_right = round(acc * len(index))
        probs[range(len(index)), [l if i < n_right else (l + 1) % 3 for i, l in enumerate(index.labels)]] = 1
        return probs

    monkeypatch.setattr(P, "predict_probs", fake)
    paths = [run / "epoch_001.pt", run / "epoch_002.pt", run / "last.pt"]
    result = average_checkpoints(paths, tmp_path / "k.pt", top_k=2, tta="none", bn="average", echo=lambda s: None)
    assert result.sources == [str(paths[1]), str(paths[2])]


def test_average_refuses_mixed_models_and_bad_options(run, tmp_path):
    from fastsort.checkpoint import save_checkpoint

    other = load_checkpoint(run / "epoch_001.pt")
    other["classes"] = ["a", "b", "c"]
    save_checkpoint(other, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt has classes"):
        average_checkpoints([run / "epoch_001.pt", tmp_path / "other.pt"], tmp_path / "x.pt", echo=lambda s: None)
    with pytest.raises(ValueError, match="--bn"):
        average_checkpoints([run / "epoch_001.pt"], tmp_path / "x.pt", bn="median", echo=lambda s: None)
    with pytest.raises(ValueError, match="--top-k"):
        average_checkpoints([run / "epoch_001.pt"], tmp_path / "x.pt", top_k=3, echo=lambda s: None)
    with pytest.raises(ValueError, match="has shape"):
        average_state_dicts([{"w": torch.zeros(2)}, {"w": torch.zeros(3)}])
    assert not (tmp_path / "x.pt").exists()


def _recipe(data, tmp_path, **over):
    raw = {"name": "tiny", "out": str(tmp_path / "recipe-run"), "data": str(data / "train.csv"),
           "test": str(data / "test.csv"), "test_labels": str(data / "test_labels.csv"),
           "train": {"pretrained": "none", "image_size": 32, "batch_size": 8, "lr": 0.05, "workers": 1, "n_folds": 3,
                     "loader": "threads"},
           "stage1": [{"model": "test_efficientnet", "folds": [0, 1], "epochs": 2}],
           "average": {"top_k": 0, "tta": "none", "bn": "average"},
           "predict": {"tta": "flip", "temperature": 10, "batch_size": 4},
           "pseudo_label": {"threshold": 0.34}, "stage2": {"lr_scale": 0.5, "epoch_scale": 0.5}}
    raw.update(over)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_recipe_runs_every_step_and_resumes_after_being_killed(data, tmp_path, monkeypatch):
    R = sys.modules["fastsort.recipe"]
    T = sys.modules["fastsort.train"]
    P = sys.modules["fastsort.predict"]

    calls = []
    real_train, real_predict = T.train, P.predict
    monkeypatch.setattr(T, "train", lambda cfg, **kw: calls.append(("train", cfg.out, cfg.resume))
                        or real_train(cfg, **kw))

    # Kill 1: inside the second stage-1 run, after its first epoch's checkpoint (last.pt holds epoch 0).
    real_write = T._write_metrics

    def dying_write(run_dir, history):
        real_write(run_dir, history)
        if run_dir.name.endswith("fold1") and "stage1" in str(run_dir):
            raise KeyboardInterrupt

    monkeypatch.setattr(T, "_write_metrics", dying_write)
    recipe = load_recipe(_recipe(data, tmp_path))
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe, echo=lambda s: None, progress=False)
    monkeypatch.setattr(T, "_write_metrics", real_write)

    # Kill 2: between steps, when the stage-1 ensemble prediction starts.
    def dying_predict(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(P, "predict", dying_predict)
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        run_recipe(load_recipe(_recipe(data, tmp_path)), echo=lambda s: None, progress=False)
    stage1 = [c for c in calls if "stage1" in c[1]]
    assert [c[2] for c in stage1] == [True], "fold 0 is skipped, the interrupted fold 1 resumes"

    monkeypatch.setattr(P, "predict", real_predict)
    calls.clear()
    lines = []
    result = run_recipe(load_recipe(_recipe(data, tmp_path)), echo=lines.append, progress=False)
    assert not [c for c in calls if "stage1" in c[1]], "finished stage-1 runs are not trained again"
    assert len([c for c in calls if "stage2" in c[1]]) == 2
    out = tmp_path / "recipe-run"
    assert (out / "submission.csv").read_text().splitlines()[0] == "id,label"
    assert len((out / "submission.csv").read_text().splitlines()) == 1 + 7
    card = json.loads((out / "scorecard.json").read_text())["rows"]
    assert [r["stage"].split(" (")[0] for r in card] == ["single model", "+ TTA", "+ weight averaging",
                                                         "+ ensemble", "+ pseudo-labels"]
    assert all(0 <= r["accuracy"] <= 1 for r in card)
    # stage 2 started from the stage-1 average, fine-tuned with half the lr on pseudo-labels
    s2 = json.loads((out / "stage2" / "test_efficientnet-32-fold0" / "config.json").read_text())
    assert s2["init"].endswith("stage1/test_efficientnet-32-fold0/averaged.pt") and s2["lr"] == 0.025
    assert s2["pseudo"] == str(out / "pseudo.csv") and s2["epochs"] == 1

    # A third run does nothing but skip.
    calls.clear()
    run_recipe(load_recipe(_recipe(data, tmp_path)), echo=lines.append, progress=False)
    assert not calls


@pytest.mark.parametrize("change, message", [
    ({"stage1": [{"model": "no_such_net", "folds": [0]}]}, "stage1\\[0\\] names an unknown model 'no_such_net'"),
    ({"stage1": [{"model": "test_efficientnet", "folds": [7]}]}, "fold 7 is outside"),
    ({"stage1": [{"model": "test_efficientnet", "lr_max": 1}]}, "unknown key\\(s\\) \\['lr_max'\\] in stage1\\[0\\]"),
    ({"pseudo_label": {"threshold": 1.5}}, "threshold must be in \\(0, 1\\]"),
    ({"average": {"bn": "median"}}, "average.bn"),
    ({"test": "/no/such/test.csv"}, "test /no/such/test.csv does not exist"),
    ({"stage1": [{"model": "test_efficientnet", "epochs": 0}]}, "stage1\\[0\\] \\(fold 0\\): --epochs must be at least 1"),
])
def test_bad_recipes_fail_before_any_work(data, tmp_path, change, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        load_recipe(_recipe(data, tmp_path, **change))
    assert not (tmp_path / "recipe-run").exists()


def test_shipped_recipes_parse():
    for name in ("recipes/haihua2020.yaml", "recipes/elpv-cpu.yaml"):
        recipe = load_recipe(name, check_files=False)
        assert recipe.stage1 and recipe.stage2
    seed = load_recipe("recipes/haihua2020.yaml", check_files=False)
    assert len(seed.stage1) == 9 and seed.predict["temperature"] == 10 and seed.predict["label_offset"] == 1


def test_a_recipe_that_is_not_yaml_names_the_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nstage1: [\n")
    with pytest.raises(ValueError, match="broken.yaml line 3 column 1: not valid YAML"):
        load_recipe(path)
