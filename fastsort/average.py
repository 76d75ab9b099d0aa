"""Weight averaging of epoch checkpoints (the seed's Merge notebook, as a function).

BatchNorm policy (``bn``):

* ``recompute`` (default): the averaged weights get fresh running statistics, measured in one pass over the
  fold's training images with the evaluation transform (no augmentation, no batch mixing), as a cumulative
  mean over batches. Averaged weights rarely match any checkpoint's statistics, so measuring them is right.
* ``average``: the running statistics are averaged like every other float tensor (what the seed did).

Integer and bool buffers (BatchNorm's ``num_batches_tracked``) are counters, not weights: the largest is kept,
in its own dtype.
The seed averaged them and stored the result in fp16; here every float tensor is averaged in float64 and
stored in its own dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .checkpoint import load_checkpoint, save_checkpoint
from .index import DataError, Index, load_dataset, preflight, split_fold
from .loader import make_loader, resolve_device
from .models import build_model, load_model_state

BN_POLICIES = ("recompute", "average")


@dataclass
class AverageResult:
    path: Path
    sources: list[str]
    val_acc: float  # of the average, on the fold's validation part, with the selection TTA
    scores: dict[str, float]  # validation accuracy (with TTA) of each candidate, when top-k selected them


def average_state_dicts(states: Sequence[dict], names: Sequence[str] | None = None) -> dict:
    """The uniform mean of each float tensor (in float64, cast back to its dtype); integer and bool tensors
    keep their largest value. Keys, shapes and dtypes must agree; ``names`` (e.g. the files) name culprits."""
    if not states:
        raise ValueError("nothing to average")
    names = list(names) if names is not None else [f"checkpoint {i}" for i in range(len(states))]
    keys = list(states[0])
    for name, s in zip(names[1:], states[1:]):
        missing, extra = [k for k in keys if k not in s], [k for k in s if k not in states[0]]
        if missing or extra:
            raise ValueError(f"{name} has other tensors than {names[0]}: missing {missing[:5]}, extra {extra[:5]}")
    out = {}
    for k in keys:
        tensors = [s[k] for s in states]
        for name, t in zip(names[1:], tensors[1:]):
            if t.shape != tensors[0].shape:
                raise ValueError(f"tensor {k!r} has shape {tuple(t.shape)} in {name} but {tuple(tensors[0].shape)} "
                                 f"in {names[0]}")
            if t.is_floating_point() != tensors[0].is_floating_point():
                raise ValueError(f"tensor {k!r} is {t.dtype} in {name} but {tensors[0].dtype} in {names[0]}")
        if tensors[0].is_floating_point():
            out[k] = torch.stack([t.double() for t in tensors]).mean(0).to(tensors[0].dtype)
        else:  # counters (num_batches_tracked) and flags: not averaged, the largest is kept, dtype unchanged
            out[k] = torch.stack(tensors).amax(0) if tensors[0].dtype != torch.bool else torch.stack(tensors).any(0)
    return out


def fold_parts(state: dict) -> tuple[Index, Index]:
    """(training part, validation part) of the fold a checkpoint was trained on, from its saved config."""
    cfg = state["config"]
    scan = load_dataset(cfg["data"], image_root=cfg.get("image_root"), id_col=cfg.get("id_col", "image_id"),
                        label_col=cfg.get("label_col", "label"), classes=state["classes"])
    if scan.problems and not cfg.get("skip_bad"):
        raise DataError(f"the training data of this checkpoint ({cfg['data']}) has changed:", scan.problems[:20])
    # The same pre-flight as training: the same files skipped (so the same folds), the same RGB copies read.
    index = preflight(scan, skip_bad=bool(cfg.get("skip_bad"))).index
    train_idx, val_idx, _ = split_fold(index, cfg["fold"], cfg["n_folds"], cfg["seed"])
    return train_idx, val_idx


@torch.no_grad()
def recompute_bn(model: torch.nn.Module, index: Index, *, image_size: int, mean, std, batch_size: int,
                 device: torch.device, loader: str = "auto", workers: int = 0,
                 progress: Callable[[int], None] | None = None) -> int:
    """Reset every BatchNorm's running statistics and measure them again over ``index``; returns the count."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved_momentum = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch counts equally
    model.train()
    ld = make_loader(index, batch_size=batch_size, image_size=image_size, train=False, backend=loader,
                     device=str(device), mean=mean, std=std, workers=workers)
    for x, _ in ld.epoch(0):
        model(x)
        if progress:
            progress(len(x))
    for m, momentum in zip(bns, saved_momentum):
        m.momentum = momentum
    model.eval()
    return len(bns)


def _accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    return float((probs.argmax(1) == labels).mean()) if len(labels) else 0.0


def average_checkpoints(
    checkpoints: Sequence[str | Path],
    out: str | Path,
    *,
    top_k: int = 0,
    tta: str = "flip",
    bn: str = "recompute",
    batch_size: int = 64,
    device: str = "auto",
    loader: str = "auto",
    workers: int = 0,
    echo: Callable[[str], None] = print,
) -> AverageResult:
    """Average epoch checkpoints of one run into a new checkpoint usable wherever a checkpoint is.

    Args:
        checkpoints: the candidates (paths); all of one model and class map.
        top_k: 0 averages all of them; k > 0 keeps the k with the best validation accuracy under ``tta``
            (measured on the fold each was trained on, so this score is optimistic, as the seed's was).
        bn: ``recompute`` or ``average`` (see the module docstring).
    """
    from .predict import TTA, predict_probs

    if bn not in BN_POLICIES:
        raise ValueError(f"--bn must be one of {BN_POLICIES}, got {bn!r}")
    if tta not in TTA:
        raise ValueError(f"--tta must be one of {list(TTA)}, got {tta!r}")
    if not checkpoints:
        raise ValueError("no checkpoints to average")
    if top_k < 0 or top_k > len(checkpoints):
        raise ValueError(f"--top-k must be in 0..{len(checkpoints)} (the number of checkpoints), got {top_k}")
    paths = [str(p) for p in checkpoints]
    states = [load_checkpoint(p) for p in paths]
    first = states[0]
    for p, s in zip(paths[1:], states[1:]):
        for key in ("model_name", "classes"):
            if s[key] != first[key]:
                raise ValueError(f"{p} has {key} {s[key]!r} but {paths[0]} has {first[key]!r}: average checkpoints "
                                 "of one model only")
        if s["model_info"]["image_size"] != first["model_info"]["image_size"]:
            raise ValueError(f"{p} was trained at another image size than {paths[0]}")
    dev = resolve_device(device)
    train_idx, val_idx = fold_parts(first)
    labels = val_idx.labels
    predict_kw = dict(tta=tta, batch_size=batch_size, device=str(dev), loader=loader, workers=workers)

    scores: dict[str, float] = {}
    chosen = list(range(len(paths)))
    if top_k:
        for p, s in zip(paths, states):
            scores[p] = _accuracy(predict_probs(s, val_idx, **predict_kw), labels)
            echo(f"  {p}: val acc {scores[p]:.4f} (tta {tta})")
        order = sorted(range(len(paths)), key=lambda i: -scores[paths[i]])  # stable: ties keep the given order
        chosen = sorted(order[:top_k])
    sources = [paths[i] for i in chosen]
    averaged = average_state_dicts([states[i]["model"] for i in chosen], [paths[i] for i in chosen])

    info = first["model_info"]
    if bn == "recompute":
        cfg = first["config"]
        model, _ = build_model(first["model_name"], len(first["classes"]), act=cfg.get("act", "mish"),
                               channels_last=cfg.get("channels_last", True), drop_rate=cfg.get("drop_rate"))
        load_model_state(model, averaged, source=f"average of {', '.join(sources)}")
        model.to(dev)
        n = recompute_bn(model, train_idx, image_size=info["image_size"], mean=info["mean"], std=info["std"],
                         batch_size=batch_size, device=dev, loader=loader, workers=workers)
        echo(f"  BatchNorm statistics of {n} layer(s) recomputed on {len(train_idx)} training images")
        recomputed = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        averaged = {k: recomputed[k].to(averaged[k].dtype) for k in averaged}

    state = {key: first[key] for key in ("classes", "model_name", "model_info", "config")}
    state.update(model=averaged, epoch=max(s["epoch"] for s in states), averaged_from=sources, bn_policy=bn)
    val_acc = _accuracy(predict_probs(state, val_idx, **predict_kw), labels)
    state["metrics"] = {"val_acc": val_acc, "tta": tta, "candidates": scores}
    path = save_checkpoint(state, out)
    echo(f"averaged {len(sources)} checkpoint(s) -> {path}: val acc {val_acc:.4f} (tta {tta}, bn {bn})")
    return AverageResult(path, sources, val_acc, scores)


def run_checkpoints(run_dir: str | Path) -> list[Path]:
    """The per-epoch checkpoints of a run folder, in epoch order."""
    found = sorted(Path(run_dir).glob("epoch_*.pt"))
    if not found:
        raise FileNotFoundError(f"no epoch_*.pt checkpoints in {run_dir}")
    return found
