import json
import sys

import pytest
import torch

from conftest import write_csv_dataset
from fastsort.checkpoint import load_checkpoint, save_checkpoint
from fastsort.models import build_model
from fastsort.train import TrainConfig, make_optimizer, make_scheduler, train

pytest.importorskip("nvidia.dali")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    write_csv_dataset(root, n=30)
    return root


def _cfg(data, out, **kw):
    base = dict(data=str(data), out=str(out), model="test_efficientnet", pretrained="none", image_size=32,
                batch_size=8, epochs=2, lr=0.05, workers=1, n_folds=3, loader="dali")
    base.update(kw)
    return TrainConfig(**base)


def test_two_step_run_writes_everything(data, tmp_path):
    result = train(_cfg(data, tmp_path / "run", epochs=1, limit_batches=2), progress=False)
    run = result.run_dir
    for name in ("config.json", "classes.json", "folds.csv", "metrics.json", "metrics.csv", "best.pt", "last.pt",
                 "epoch_001.pt"):
        assert (run / name).is_file(), name
    assert list((run / "tb").iterdir())
    state = load_checkpoint(run / "best.pt")
    assert state["classes"] == ["0", "1", "2"] and state["model_name"] == "test_efficientnet"
    assert state["config"]["image_size"] == 32 and "train_state" not in state
    assert state["metrics"]["step"] == 2
    history = json.loads((run / "metrics.json").read_text())
    assert len(history) == 1 and 0 <= history[0]["val_acc"] <= 1
    # The saved weights load into a plain model of the same name.
    model, _ = build_model("test_efficientnet", 3, pretrained=run / "best.pt")
    assert model is not None
    assert not list(run.glob(".*tmp*")), "no temporary files left behind"


def test_refuses_to_overwrite_and_resume_without_run(data, tmp_path):
    train(_cfg(data, tmp_path / "run", epochs=1, limit_batches=1), progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        train(_cfg(data, tmp_path / "run", epochs=1, limit_batches=1), progress=False)
    with pytest.raises(FileNotFoundError, match="no .*last.pt"):
        train(_cfg(data, tmp_path / "other", resume=True), progress=False)


def test_resume_continues_the_identical_schedule(data, tmp_path, monkeypatch):
    full = train(_cfg(data, tmp_path / "full", epochs=3), progress=False)

    T = sys.modules["fastsort.train"]  # the package exports the function under the same name

    real = T._write_metrics

    def crash_after_first_epoch(run_dir, history):
        real(run_dir, history)
        raise KeyboardInterrupt

    monkeypatch.setattr(T, "_write_metrics", crash_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(data, tmp_path / "cut", epochs=3), progress=False)
    monkeypatch.setattr(T, "_write_metrics", real)
    resumed = train(_cfg(data, tmp_path / "cut", epochs=3, resume=True), progress=False)

    a = [(r["train_loss"], r["val_loss"], r["step"]) for r in full.history]
    b = [(r["train_loss"], r["val_loss"], r["step"]) for r in resumed.history]
    assert len(b) == 3
    for (la, va, sa), (lb, vb, sb) in zip(a, b):
        assert sa == sb and la == pytest.approx(lb, rel=1e-5) and va == pytest.approx(vb, rel=1e-5)
    wa, wb = load_checkpoint(full.last_checkpoint)["model"], load_checkpoint(resumed.last_checkpoint)["model"]
    assert all(torch.allclose(wa[k].float(), wb[k].float(), atol=1e-6) for k in wa)


def test_resume_with_a_changed_config_is_refused(data, tmp_path):
    train(_cfg(data, tmp_path / "run", epochs=1, limit_batches=1), progress=False)
    with pytest.raises(ValueError, match="different configuration.*lr"):
        train(_cfg(data, tmp_path / "run", epochs=1, limit_batches=1, lr=0.3, resume=True), progress=False)


@pytest.mark.parametrize("loader", ["torch", "threads", "auto"])
def test_other_loaders_train_too(data, tmp_path, loader):
    result = train(_cfg(data, tmp_path / loader, epochs=1, limit_batches=2, loader=loader), progress=False)
    assert result.history[0]["step"] == 2
    assert json.loads((result.run_dir / "config.json").read_text())["loader"] == loader


def test_unknown_loader_is_refused(data, tmp_path):
    with pytest.raises(ValueError, match="--loader must be"):
        train(_cfg(data, tmp_path / "x", loader="ffcv"), progress=False)


def test_gradient_accumulation_counts_optimizer_steps(data, tmp_path):
    result = train(_cfg(data, tmp_path / "acc", epochs=1, batch_size=4, accum_steps=2, limit_batches=5),
                   progress=False)
    assert result.history[0]["step"] == 3  # ceil(5 / 2): the last partial group still steps


def test_one_cycle_and_lookahead_follow_the_seed():
    model = torch.nn.Linear(3, 2)
    cfg = TrainConfig(lr=0.2)
    opt = make_optimizer(model, cfg)
    sched = make_scheduler(opt, cfg, 100)
    lrs, moms = [], []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        moms.append(opt.param_groups[0]["momentum"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.2 / 25)
    assert max(lrs) == pytest.approx(0.2) and lrs.index(max(lrs)) == 29  # 30% warm-up
    assert lrs[-1] < 1e-5
    assert moms[0] == pytest.approx(0.9) and min(moms) == pytest.approx(0.8) and moms[-1] == pytest.approx(0.9, abs=1e-3)
    base = opt._base_optimizer if hasattr(opt, "_base_optimizer") else opt
    assert base.param_groups[0]["nesterov"] and base.param_groups[0]["weight_decay"] == 5e-4
    assert opt.defaults["lookahead_alpha"] == 0.5 and opt.defaults["lookahead_k"] == 6


def test_unknown_config_keys_are_errors():
    with pytest.raises(ValueError, match="unknown config key.*bogus"):
        TrainConfig.from_dict({"bogus": 1})


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = save_checkpoint({"model": {"w": torch.ones(2)}}, tmp_path / "c.pt")
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="c.pt.*No space left"):
        save_checkpoint({"model": {"w": torch.zeros(2)}}, path)
    assert path.read_bytes() == before and not list(tmp_path.glob(".*tmp*"))
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(2))


def test_cuda_device_without_gpu_is_refused_before_work(data, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(Exception, match="no usable CUDA device"):
        train(_cfg(data, tmp_path / "gpu", device="cuda"), progress=False)
    assert not (tmp_path / "gpu").exists()


def test_fused_mish_training_run(data, tmp_path):
    pytest.importorskip("triton")
    import os

    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("the fused path needs CUDA or TRITON_INTERPRET=1")
    result = train(_cfg(data, tmp_path / "fused", epochs=1, limit_batches=2, mish="fused"), progress=False)
    state = load_checkpoint(result.best_checkpoint)
    plain, _ = build_model("test_efficientnet", 3)
    plain.load_state_dict(state["model"])  # a fused run's checkpoint loads into the plain model


def _write_pseudo(root, rows):
    import csv

    from conftest import make_image

    with open(root / "pseudo.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_id", "label", "path"])
        for i, label in enumerate(rows):
            path = make_image(root / "test" / f"t{i}.png", (40, 33), seed=500 + i)
            w.writerow([f"t{i}", label, str(path)])
    return root / "pseudo.csv"


def test_stage2_adds_pseudo_labels_to_training_only_and_starts_from_init(data, tmp_path, monkeypatch):
    T = sys.modules["fastsort.train"]
    stage1 = train(_cfg(data, tmp_path / "s1", epochs=1, limit_batches=1), progress=False)
    pseudo = _write_pseudo(tmp_path, ["0", "1", "2", "1", "0"])
    seen = {}
    real_make_loader = T.make_loader

    def spy(index, *, train, **kw):
        seen["train" if train else "val"] = index
        return real_make_loader(index, train=train, **kw)

    monkeypatch.setattr(T, "make_loader", spy)
    built = {}
    real_build = T.build_model
    monkeypatch.setattr(T, "build_model", lambda *a, **kw: built.update(kw) or real_build(*a, **kw))
    init_weights = load_checkpoint(stage1.best_checkpoint)["model"]
    lines = []
    train(_cfg(data, tmp_path / "s2", epochs=1, limit_batches=1, pseudo=str(pseudo), init=str(stage1.best_checkpoint)),
          progress=False, echo=lines.append)
    pseudo_paths = {str((tmp_path / "test" / f"t{i}.png").absolute()) for i in range(5)}
    assert pseudo_paths <= set(seen["train"].paths)
    assert not pseudo_paths & set(seen["val"].paths), "pseudo-labels never reach validation"
    assert len(seen["train"]) == 20 + 5 and len(seen["val"]) == 10  # 30 labelled images, 3 folds
    assert any("5 pseudo-labelled" in line for line in lines)
    assert built["pretrained"] is None  # --init replaces the pretrained start
    # with lr 0 the stage-2 weights are exactly the stage-1 weights it started from
    frozen = train(_cfg(data, tmp_path / "s2-lr0", epochs=1, limit_batches=1, lr=0.0, weight_decay=0.0,
                        init=str(stage1.best_checkpoint)), progress=False)
    after = load_checkpoint(frozen.best_checkpoint)["model"]
    assert torch.equal(after["conv_stem.weight"], init_weights["conv_stem.weight"])
    fresh = build_model("test_efficientnet", 3)[0].state_dict()["conv_stem.weight"]
    assert not torch.equal(after["conv_stem.weight"], fresh)


def test_stage2_bad_inputs_fail_before_training(data, tmp_path):
    from fastsort.index import DataError

    stage1 = train(_cfg(data, tmp_path / "s1", epochs=1, limit_batches=1), progress=False)
    bad = _write_pseudo(tmp_path, ["0", "cat", "2"])
    with pytest.raises(DataError, match="line 3: unknown label 'cat'"):
        train(_cfg(data, tmp_path / "s2", epochs=1, pseudo=str(bad)), progress=False)
    with open(bad, "a") as f:
        f.write("t9,1\n")  # a short row: no path
    with pytest.raises(DataError, match="line 5: a row needs image_id, label and path"):
        train(_cfg(data, tmp_path / "s2", epochs=1, pseudo=str(bad)), progress=False)
    with pytest.raises(ValueError, match="holds a test_efficientnet model, not --model resnet18"):
        train(_cfg(data, tmp_path / "s3", epochs=1, model="resnet18", init=str(stage1.best_checkpoint)), progress=False)


def test_pseudo_labels_that_are_validation_images_are_refused(data):
    from fastsort.index import DataError, load_dataset, split_fold

    T = sys.modules["fastsort.train"]
    index = load_dataset(data).index
    tr, val, _ = split_fold(index, 0, 3)
    with pytest.raises(DataError, match="1 pseudo-labelled image"):
        T.add_pseudo_labels(tr, val, val.subset([0]))
