"""Cases C11, C14, C17, C26, C29, C30 of /work/shared/cases/README.md: each builds its input and asserts the
right behaviour."""

import gc
import os
import sys
import weakref

import numpy as np
import pytest
import torch

from conftest import write_csv_dataset
from fastsort.augment import mix_batch
from fastsort.checkpoint import load_checkpoint, save_checkpoint
from fastsort.index import load_dataset
from fastsort.loader import batch_positions, make_loader
from fastsort.train import (TrainConfig, _optimizer_steps_per_epoch, _step_due, augment_seed, check_weight_dtype,
                            make_optimizer, make_scheduler, slow_weights, train)

T = sys.modules["fastsort.train"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cases_train")
    write_csv_dataset(root, n=30)
    return root


def _cfg(data, out, **kw):
    base = dict(data=str(data), out=str(out), model="test_efficientnet", pretrained="none", image_size=32,
                batch_size=8, epochs=1, lr=0.05, workers=1, n_folds=3, loader="threads")
    base.update(kw)
    return TrainConfig(**base)


# ----------------------------------------------------------------------------------------------- C11


def _run_schedule(n: int, epochs: int, accum: int, pct: float, bs: int = 16):
    """The training loop's stepping rule (``_step_due``) over the loader's real batch count."""
    n_batches = len(batch_positions(n, bs, shuffle=True))
    cfg = TrainConfig(lr=0.2, pct_start=pct)
    opt = make_optimizer(torch.nn.Linear(2, 2), cfg)
    sched = make_scheduler(opt, cfg, _optimizer_steps_per_epoch(n_batches, accum) * epochs)
    lrs = []
    for _ in range(epochs):
        for i in range(n_batches):
            if _step_due(i, n_batches, accum):
                lrs.append(opt.param_groups[0]["lr"])
                opt.step()
                sched.step()
    return lrs, sched


@pytest.mark.parametrize("n", [5, 33, 100])
@pytest.mark.parametrize("epochs", [1, 3])
@pytest.mark.parametrize("accum", [1, 2])
@pytest.mark.parametrize("pct", [0.25, 0.3, 0.5])
def test_c11_one_cycle_counts_real_optimizer_steps(n, epochs, accum, pct):
    lrs, sched = _run_schedule(n, epochs, accum, pct)
    assert len(lrs) == sched.total_steps == sched.last_epoch  # one scheduler step per optimizer step, no more
    assert lrs[-1] == pytest.approx(0.2 / (25 * 1e4))  # the last step runs at the configured final LR
    assert max(lrs) <= 0.2 + 1e-12


@pytest.mark.parametrize("total", [1, 2, 3, 4, 5, 6])
@pytest.mark.parametrize("pct", [0.25, 0.3, 0.5])
def test_c11_very_short_runs_work(total, pct):
    cfg = TrainConfig(lr=0.2, pct_start=pct)
    opt = make_optimizer(torch.nn.Linear(2, 2), cfg)
    sched = make_scheduler(opt, cfg, total)  # 4 steps at 0.25 divided by zero in PyTorch's OneCycleLR
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[-1] == pytest.approx(0.2 / (25 * 1e4)) and all(np.isfinite(lrs))
    if total > 1:  # with so few steps the cosine peak can fall between two steps
        assert 0.5 * 0.2 <= max(lrs) <= 0.2 + 1e-12


def test_c11_training_steps_match_the_schedule(data, tmp_path):
    # 20 training images, batch 8 -> 3 batches (8, 8, 4); accumulation 2 -> 2 optimizer steps per epoch.
    result = train(_cfg(data, tmp_path / "run", epochs=3, accum_steps=2), progress=False)
    assert [r["step"] for r in result.history] == [2, 4, 6]
    assert result.history[-1]["lr"] == pytest.approx(0.05 / (25 * 1e4))
    ts = load_checkpoint(result.last_checkpoint)["train_state"]
    assert ts["scheduler"]["last_epoch"] == ts["scheduler"]["total_steps"] == 6


# ----------------------------------------------------------------------------------------------- C14


SUPPORTED_ON_CPU = [("fp32", "fp32"), ("bf16", "fp32"), ("bf16", "bf16")]
REFUSED = [("fp32", "bf16"), ("fp32", "fp16"), ("bf16", "fp16"), ("fp16", "bf16"), ("fp16", "fp16")]


@pytest.mark.parametrize("precision,weights", SUPPORTED_ON_CPU)
def test_c14_supported_precision_and_weight_dtypes_train(data, tmp_path, precision, weights):
    result = train(_cfg(data, tmp_path / "run", precision=precision, weight_dtype=weights, limit_batches=3),
                   progress=False)
    row = result.history[0]
    assert row["step"] == 3 and np.isfinite(row["train_loss"]) and np.isfinite(row["val_loss"])
    state = load_checkpoint(result.best_checkpoint)
    assert state["model"]["conv_stem.weight"].dtype == {"fp32": torch.float32, "bf16": torch.bfloat16}[weights]


@pytest.mark.parametrize("precision,weights", REFUSED)
def test_c14_unsupported_combinations_fail_before_training(data, tmp_path, precision, weights):
    with pytest.raises(ValueError, match=f"--precision {precision} with --weight-dtype {weights}"):
        train(_cfg(data, tmp_path / "run", precision=precision, weight_dtype=weights), progress=False)
    assert not (tmp_path / "run").exists()


def test_c14_scaler_only_for_fp16_over_fp32_weights():
    assert check_weight_dtype("fp16", "fp32") == torch.float32  # GradScaler'd fp16 autocast
    assert check_weight_dtype("bf16", "bf16") == torch.bfloat16  # pure bf16, no scaler
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
            T.resolve_precision("fp16", torch.device("cpu"))


@pytest.mark.gpu
def test_c14_fp16_with_scaler_on_gpu(data, tmp_path):
    result = train(_cfg(data, tmp_path / "run", precision="fp16", device="cuda", limit_batches=3), progress=False)
    assert result.history[0]["step"] == 3 and np.isfinite(result.history[0]["train_loss"])


# ----------------------------------------------------------------------------------------------- C17


def _tiny():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3))


def _build(cfg):
    model = _tiny()
    opt = make_optimizer(model, cfg)
    sched = make_scheduler(opt, cfg, 10)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return model, opt, sched, scaler


def _steps(model, opt, sched, batches):
    for x, y in batches:
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()


def test_c17_lookahead_checkpoint_round_trip(tmp_path):
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(10)]
    cfg = TrainConfig(lr=0.1, lookahead_k=5)
    a = _build(cfg)
    _steps(a[0], a[1], a[2], batches)

    b = _build(cfg)
    _steps(b[0], b[1], b[2], batches[:7])  # mid k-cycle: 1 sync at step 5, next at 10
    save_checkpoint({"model": {}, "train_state": {"model_fast": b[0].state_dict(), "optimizer": b[1].state_dict(),
                                                  "scheduler": b[2].state_dict(), "scaler": b[3].state_dict()}},
                    tmp_path / "last.pt")
    del b
    ts = load_checkpoint(tmp_path / "last.pt")["train_state"]  # weights_only load, as --resume does
    model, opt, sched, scaler = _build(cfg)
    model.load_state_dict(ts["model_fast"])
    opt.load_state_dict(ts["optimizer"])
    sched.load_state_dict(ts["scheduler"])
    scaler.load_state_dict(ts["scaler"])
    assert opt.param_groups[0]["lookahead_step"] == 7
    assert opt._base_optimizer.param_groups[0]["lr"] == pytest.approx(sched.get_last_lr()[0])
    _steps(model, opt, sched, batches[7:])
    assert opt.param_groups[0]["lookahead_step"] == a[1].param_groups[0]["lookahead_step"] == 10
    for pa, pb in zip(a[0].parameters(), model.parameters()):
        assert torch.allclose(pa, pb, atol=1e-6)
    for (pa, pb) in zip(a[0].parameters(), model.parameters()):  # slow weights and momentum buffers
        sa, sb = a[1]._base_optimizer.state[pa], opt._base_optimizer.state[pb]
        assert torch.allclose(sa["lookahead_slow_buff"], sb["lookahead_slow_buff"], atol=1e-6)
        assert torch.allclose(sa["momentum_buffer"], sb["momentum_buffer"], atol=1e-6)
    assert sched.get_last_lr() == pytest.approx(a[2].get_last_lr())
    # the scheduler's LR reaches the inner SGD after loading
    assert opt._base_optimizer.param_groups[0]["lr"] == pytest.approx(a[1]._base_optimizer.param_groups[0]["lr"])
    with slow_weights(opt), slow_weights(a[1]):
        assert all(torch.allclose(pa, pb, atol=1e-6) for pa, pb in zip(a[0].parameters(), model.parameters()))


# ----------------------------------------------------------------------------------------------- C26


def _epoch_batches(index, rank, epoch):
    ld = make_loader(index, batch_size=8, image_size=32, train=True, backend="threads", device="cpu", seed=5,
                     rank=rank, workers=1)  # world_size 1: sharding off, only the augmentation follows rank
    return [(x.clone(), y.clone()) for x, y in ld.epoch(epoch)]


def test_c26_augmentation_differs_per_rank_and_epoch_and_repeats_on_rebuild(tmp_path):
    write_csv_dataset(tmp_path, n=32)
    index = load_dataset(tmp_path).index
    r0e0, r1e0, r0e1 = _epoch_batches(index, 0, 0), _epoch_batches(index, 1, 0), _epoch_batches(index, 0, 1)
    assert [torch.equal(a[1], b[1]) for a, b in zip(r0e0, r1e0)] == [True] * 4, "shuffle shared across ranks"
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(r0e0, r1e0)), "ranks augment differently"
    same_order = [torch.equal(a[1], b[1]) for a, b in zip(r0e0, r0e1)]
    assert not all(same_order), "epochs shuffle differently"
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
               for a, b in zip(r0e0, _epoch_batches(index, 0, 0))), "a rebuilt (seed, rank, epoch) repeats"
    # The on-device batch mixing follows (seed, rank, epoch) too.
    seeds = {(r, e): augment_seed(5, r, e) for r in range(3) for e in range(3)}
    assert len(set(seeds.values())) == 9 and augment_seed(5, 1, 2) == seeds[(1, 2)]

    def mixed(rank):
        g = torch.Generator().manual_seed(augment_seed(5, rank, 0))
        return mix_batch(r0e0[0][0].clone(), r0e0[0][1], 3, generator=g)[0]

    assert not torch.equal(mixed(0), mixed(1)) and torch.equal(mixed(1), mixed(1))


def test_c26_augmentation_seed_is_logged(data, tmp_path):
    lines = []
    train(_cfg(data, tmp_path / "run", limit_batches=1, seed=11), progress=False, echo=lines.append)
    want = f"augmentation seed {augment_seed(11, 0, 0)} (seed 11, rank 0, epoch 0)"
    assert any(want in line for line in lines)
    assert load_checkpoint(tmp_path / "run" / "best.pt")["metrics"]["augment_seed"] == augment_seed(11, 0, 0)


# ----------------------------------------------------------------------------------------------- C29


class _FakeDevice:
    """Work is queued by the timed function and only 'completes' (advances the clock) on sync."""

    def __init__(self, monkeypatch, module):
        self.now, self.pending = 0.0, 0.0
        monkeypatch.setattr(module.time, "perf_counter", lambda: self.now)
        monkeypatch.setattr(module, "sync", self.sync)

    def launch(self, seconds: float):
        self.pending += seconds  # asynchronous: returns at once

    def sync(self, device=None):
        self.now += self.pending
        self.pending = 0.0


def test_c29_time_median_waits_for_device_work_and_drops_warm_up(monkeypatch):
    import fastsort.bench as B

    dev = _FakeDevice(monkeypatch, B)
    calls = []

    def fn():
        calls.append(1)
        dev.launch(10.0 if len(calls) <= 3 else 0.5)  # the warm-up is slow (compilation, caches)

    t = B.time_median(fn, torch.device("cpu"), warmup=3, iters=5)
    assert len(calls) == 8
    assert t["median_s"] == t["min_s"] == t["max_s"] == 0.5


def test_c29_loader_benchmark_syncs_each_epoch_and_counts_real_images(monkeypatch, tmp_path):
    import fastsort.bench_loader as BL

    write_csv_dataset(tmp_path, n=10)
    dev = _FakeDevice(monkeypatch, BL)

    def fake_epochs(name, index, **kw):
        def epoch(e):
            for b in batch_positions(len(index), 4, shuffle=True, seed=0, epoch=e):
                dev.launch(30.0 if e == 0 else 0.25)  # per batch; epoch 0 is the warm-up
                yield torch.zeros(len(b), 3, 2, 2)
        return epoch

    monkeypatch.setattr(BL, "variant_epochs", fake_epochs)
    monkeypatch.setattr(BL.os, "sched_setaffinity", lambda *a: None, raising=False)
    out = BL.run_variant("fake", str(tmp_path), batch=4, size=2, cpus=1, epochs=2, device="cpu")
    assert out["images_per_epoch"] == 10  # 3 batches (4, 4, 2): each image once
    assert out["epoch_s"] == [0.75, 0.75]
    assert out["img_per_s"] == pytest.approx(10 / 0.75)


# ----------------------------------------------------------------------------------------------- C30


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_c30_five_folds_in_one_process_release_their_loaders_and_models(data, tmp_path, monkeypatch):
    refs = []
    real_loader, real_build = T.make_loader, T.build_model

    def track_loader(*a, **kw):
        ld = real_loader(*a, **kw)
        refs.append(weakref.ref(ld))
        return ld

    def track_model(*a, **kw):
        model, info = real_build(*a, **kw)
        refs.append(weakref.ref(model))
        return model, info

    monkeypatch.setattr(T, "make_loader", track_loader)
    monkeypatch.setattr(T, "build_model", track_model)
    rss, peaks = [], []
    for fold in range(5):
        result = train(_cfg(data, tmp_path / f"fold{fold}", fold=fold, n_folds=5, loader="dali", batch_size=6),
                       progress=False)
        peaks.append(result.history[0]["peak_rss_mib"])  # logged per fold
        del result
        gc.collect()
        assert [r for r in refs if r() is not None] == [], f"fold {fold}: a loader or model is still referenced"
        rss.append(_rss_mib())
    assert len(refs) == 15  # 2 loaders + 1 model per fold
    assert rss[4] <= 1.1 * rss[1], rss
    assert peaks[4] <= 1.1 * peaks[1], peaks
