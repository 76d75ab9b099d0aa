"""Distributed training: sharding arithmetic, and a real 2-process torchrun (gloo, CPU) run."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import write_csv_dataset
from fastsort.checkpoint import load_checkpoint
from fastsort.loader import batch_positions
from fastsort.models import build_model
from fastsort.train import TrainConfig, train


@pytest.mark.parametrize("n, world, bs", [(n, world, bs) for n in (2, 5, 20, 33, 35, 64) for world in (1, 2, 3)
                                          for bs in (1, 4, 16) if n >= 2 * world])  # a rank needs 2 samples
def test_shards_see_every_sample_once_with_equal_batch_counts(n, world, bs):
    for epoch in (0, 1):
        shards = [batch_positions(n, bs, shuffle=True, seed=3, epoch=epoch, rank=r, world_size=world)
                  for r in range(world)]
        assert len({len(s) for s in shards}) == 1, "every rank runs the same number of batches"
        seen = np.concatenate([b for s in shards for b in s])
        assert sorted(seen.tolist()) == list(range(n)), "every sample exactly once per epoch, across ranks"
        assert bs < 2 or all(len(b) >= 2 for s in shards for b in s), "no rank trains BatchNorm on 1 sample"
        assert all(len(b) <= bs + 2 * world for s in shards for b in s)
        evals = [batch_positions(n, bs, shuffle=False, rank=r, world_size=world) for r in range(world)]
        assert np.concatenate([b for s in evals for b in s]).tolist() == list(range(n))


def test_world_size_one_keeps_the_single_process_policy():
    assert [len(b) for b in batch_positions(33, 16, shuffle=True)] == [16, 17]
    assert [len(b) for b in batch_positions(32, 16, shuffle=True)] == [16, 16]
    assert [len(b) for b in batch_positions(33, 16, shuffle=False)] == [16, 16, 1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    write_csv_dataset(root, n=30)  # 3 folds: 20 train, 10 val
    return root


ARGS = ["--model", "test_efficientnet_gn", "--pretrained", "none", "--image-size", "32", "--epochs", "2",
        "--lr", "0", "--weight-decay", "0", "--workers", "1", "--n-folds", "3", "--loader", "threads", "--quiet"]


def test_two_process_gloo_run_matches_one_process(data, tmp_path):
    single = train(TrainConfig(data=str(data), out=str(tmp_path / "one"), model="test_efficientnet_gn",
                               pretrained="none", image_size=32, epochs=2, lr=0.0, weight_decay=0.0, workers=1, n_folds=3,
                               loader="threads", batch_size=8), progress=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # batch 4 per rank x 2 ranks = the single run's global batch of 8; --no-scale-lr keeps the same peak LR;
    # At LR 0 the weights stay at the seeded start, so the sharded, all-reduced validation must equal the
    # single process's exactly; training losses differ by the augmentation draws, which follow the rank (C26).
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "fastsort", "train", "--data", str(data), "--out", str(tmp_path / "two"), "--batch-size", "4",
           "--no-scale-lr", *ARGS]
    bn = subprocess.run([*cmd[:-len(ARGS)], "--sync-bn", *ARGS[:-1]], capture_output=True, text=True, env=env,
                        timeout=240)
    assert bn.returncode != 0 and "--sync-bn needs CUDA" in bn.stdout + bn.stderr
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "distributed: 2 processes (gloo), batch 4 per rank = 8 global, peak LR 0" in out
    assert out.count("epoch 1/2  train loss") == 1, "only rank 0 prints"
    assert "rank 1, epoch 0" not in out
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    for a, b in zip(single.history, two):
        assert a["images"] == b["images"] == 20 and a["val_images"] == b["val_images"] == 10
        assert a["step"] == b["step"] and a["lr"] == pytest.approx(b["lr"])
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-6) and b["val_acc"] == a["val_acc"]
        assert np.isfinite(b["train_loss"]) and b["augment_seed"] == a["augment_seed"]  # rank 0's seed
    state = load_checkpoint(tmp_path / "two" / "best.pt")
    raw = torch.load(tmp_path / "two" / "best.pt", weights_only=True)["model"]
    assert not any(k.startswith("module.") for k in raw), "checkpoints are saved unwrapped"
    model, _ = build_model("test_efficientnet_gn", 3)
    model.load_state_dict(state["model"])  # strict: a single process loads it
    ref = load_checkpoint(single.best_checkpoint)["model"]
    assert all(torch.equal(ref[k], state["model"][k]) for k in ref)
    assert load_checkpoint(tmp_path / "two" / "last.pt")["train_state"]["world_size"] == 2
    assert sorted(p.name for p in (tmp_path / "two").glob("*.pt")) == ["best.pt", "epoch_001.pt", "epoch_002.pt",
                                                                       "last.pt"]
