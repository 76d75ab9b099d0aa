"""Faults lose nothing: signals stop between steps, checkpoint writes are atomic, disk errors name the path;
and --seed makes CPU runs bit-identical."""

import errno
import os
import signal
import subprocess
import sys

import pytest
import torch

from conftest import write_csv_dataset
from fastsort.checkpoint import load_checkpoint, save_checkpoint
from fastsort.train import Interrupted, TrainConfig, train

T = sys.modules["fastsort.train"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    write_csv_dataset(root, n=30)  # 3 folds: 20 train (batches 8, 8, 4), 10 val
    return root


def _cfg(data, out, **kw):
    base = dict(data=str(data), out=str(out), model="test_efficientnet", pretrained="none", image_size=32,
                batch_size=8, epochs=3, lr=0.05, workers=1, n_folds=3, loader="threads")
    base.update(kw)
    return TrainConfig(**base)


def _signal_at_batch(monkeypatch, k: int, sig=signal.SIGTERM):
    """Deliver ``sig`` to this process while batch ``k`` (counted over the whole run) is being prepared."""
    real, calls = T.mix_batch, []

    def mix(*a, **kw):
        calls.append(1)
        if len(calls) == k:
            os.kill(os.getpid(), sig)
        return real(*a, **kw)

    monkeypatch.setattr(T, "mix_batch", mix)


@pytest.fixture(scope="module")
def full(data, tmp_path_factory):
    return train(_cfg(data, tmp_path_factory.mktemp("full") / "run"), progress=False)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_after_the_step_and_resume_matches_an_uninterrupted_run(data, full, tmp_path, monkeypatch, sig):
    before = signal.getsignal(sig)
    _signal_at_batch(monkeypatch, 5, sig)  # epoch 2, second batch
    with pytest.raises(Interrupted, match=f"{signal.Signals(sig).name} in epoch 2.*holds epoch 1.*--resume") as info:
        train(_cfg(data, tmp_path / "cut"), progress=False)
    assert info.value.signum == sig
    assert signal.getsignal(sig) == before  # the handlers are restored
    state = load_checkpoint(tmp_path / "cut" / "last.pt")  # the last complete epoch, intact
    assert state["epoch"] == 0 and state["train_state"]["global_step"] == 3
    monkeypatch.undo()
    resumed = train(_cfg(data, tmp_path / "cut", resume=True), progress=False)
    a = [(r["train_loss"], r["val_loss"], r["step"], r["lr"]) for r in full.history]
    b = [(r["train_loss"], r["val_loss"], r["step"], r["lr"]) for r in resumed.history]
    assert a == b  # bit-identical on the CPU, the schedule included
    wa, wb = load_checkpoint(full.last_checkpoint)["model"], load_checkpoint(resumed.last_checkpoint)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


_KILL_MID_WRITE = r"""
import os, signal, sys, torch
from fastsort.checkpoint import save_checkpoint
real = torch.save
def half_then_die(obj, f, *a, **k):
    f.write(b"PK\x03\x04 half a checkpoint")
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = half_then_die
save_checkpoint({"model": {"w": torch.zeros(3)}}, sys.argv[1])
"""


def test_kill_during_a_checkpoint_write_leaves_the_previous_one_intact(tmp_path):
    path = save_checkpoint({"model": {"w": torch.ones(3)}}, tmp_path / "last.pt")
    proc = subprocess.run([sys.executable, "-c", _KILL_MID_WRITE, str(path)], capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(3))


def test_disk_full_during_training_names_the_path_and_keeps_the_last_checkpoint(data, tmp_path, monkeypatch):
    C = sys.modules["fastsort.checkpoint"]
    real, calls = C.torch.save, []

    def full_disk_in_epoch_2(obj, f, *a, **k):
        calls.append(1)
        if obj.get("epoch") == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *a, **k)

    monkeypatch.setattr(C.torch, "save", full_disk_in_epoch_2)
    with pytest.raises(OSError, match=r"epoch_002.pt.*No space left on device"):
        train(_cfg(data, tmp_path / "run"), progress=False)
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "run" / "last.pt")["epoch"] == 0
    assert not list((tmp_path / "run").glob(".*tmp*"))


def test_disk_full_on_metrics_names_the_path(data, tmp_path, monkeypatch):
    def no_space(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(T, "_write_metrics", no_space)
    with pytest.raises(OSError, match=r"could not write .*metrics.json: No space left on device"):
        train(_cfg(data, tmp_path / "run", epochs=1, limit_batches=1), progress=False)


def test_unwritable_run_folder_is_named_before_training(data, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(OSError, match="a_file"):
        train(_cfg(data, blocker / "run", epochs=1), progress=False)
    if os.geteuid() != 0:  # root ignores permission bits
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        with pytest.raises(PermissionError, match="ro/run"):
            train(_cfg(data, ro / "run", epochs=1), progress=False)


def test_signal_during_the_epoch_end_stops_after_its_checkpoint(data, tmp_path, monkeypatch):
    real = T.evaluate

    def signalled_during_validation(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)

    monkeypatch.setattr(T, "evaluate", signalled_during_validation)
    with pytest.raises(Interrupted, match="SIGTERM after epoch 1; .*holds epoch 1"):
        train(_cfg(data, tmp_path / "run"), progress=False)
    assert load_checkpoint(tmp_path / "run" / "last.pt")["epoch"] == 0  # written completely before stopping


def test_signal_in_the_first_epoch_says_there_is_nothing_to_resume(data, tmp_path, monkeypatch):
    _signal_at_batch(monkeypatch, 1)
    with pytest.raises(Interrupted, match="in epoch 1 after step 1; no epoch had completed"):
        train(_cfg(data, tmp_path / "run"), progress=False)
    assert not (tmp_path / "run" / "last.pt").exists()


@pytest.mark.parametrize("loader", ["threads", "dali"])
def test_two_seeded_cpu_runs_write_bit_identical_checkpoints(data, tmp_path, loader):
    if loader == "dali":
        pytest.importorskip("nvidia.dali")
    kw = dict(epochs=2, loader=loader, seed=7, deterministic=True)
    a = load_checkpoint(train(_cfg(data, tmp_path / "a", **kw), progress=False).best_checkpoint)
    b = load_checkpoint(train(_cfg(data, tmp_path / "b", **kw), progress=False).best_checkpoint)
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    c = load_checkpoint(train(_cfg(data, tmp_path / "c", **{**kw, "seed": 8}), progress=False).best_checkpoint)
    assert not all(torch.equal(a["model"][k], c["model"][k]) for k in a["model"])
