"""Inference: TTA views, temperature sharpening, ensembling, submissions, pseudo-labels and scoring.

The seed (reference/seed-recipe.md §5) averaged the softmax of 4 flips per model, sharpened each model's
probabilities with p**T / sum p**T (T = 10), averaged the models and wrote ``argmax + 1``. Two of its bugs
are fixed here: ensemble weights really apply (they cancelled in the seed, item 25), and labels stay class
names from the training class map, converted to integers with an offset only when writing a submission
(item 29).

``predict`` writes into its output folder:

* ``probs.csv``: ``image_id,path,<class 0>,<class 1>,...``, the ensemble's probabilities in test order;
  ``path`` is the absolute image path, so ``pseudo_label`` needs nothing but this folder;
* ``submission.csv``: ``id,label``, the class name (or ``int(name) + label_offset``);
* ``model_probs.npz``: ``probs``, each checkpoint's TTA-averaged probabilities before sharpening,
  (checkpoints, N, C), to re-weigh or re-sharpen an ensemble without running the models again;
* ``predictions.json``: checkpoints, weights used, TTA, temperature, classes, test set and counts.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .checkpoint import load_checkpoint
from .index import DataError, Index, ScanResult, _is_image_name, preflight, read_csv, write_text_atomic
from .loader import BACKENDS, make_loader, resolve_device
from .models import build_model, load_model_state
from .train import _Progress, autocast_for, resolve_precision

# ----------------------------------------------------------------------------------------------- TTA views


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _flip_w(x: torch.Tensor) -> torch.Tensor:
    return x.flip(3)


def _flip_h(x: torch.Tensor) -> torch.Tensor:
    return x.flip(2)


def _flip_hw(x: torch.Tensor) -> torch.Tensor:
    return x.flip((2, 3))  # a 180 degree rotation


def _transposed(view: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    def transposed(x: torch.Tensor) -> torch.Tensor:
        return view(x.transpose(2, 3))

    transposed.__name__ = f"transpose_then{view.__name__}"
    return transposed


_FLIPS = [_identity, _flip_w, _flip_h, _flip_hw]

# View functions on a (B, C, H, W) batch. "flip" is the seed's 4 flips; "dihedral" adds the transpose of each,
# which gives the 90/270 degree rotations and the two diagonal mirrors: the whole dihedral group of order 8.
TTA: dict[str, list[Callable[[torch.Tensor], torch.Tensor]]] = {
    "none": [_identity],
    "flip": list(_FLIPS),
    "dihedral": list(_FLIPS) + [_transposed(v) for v in _FLIPS],
}

# ----------------------------------------------------------------------------------------------- one model

_CHECKPOINT_KEYS = ("model", "classes", "model_name", "model_info")


def _as_state(checkpoint: str | Path | dict) -> dict:
    state = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint)
    missing = [k for k in _CHECKPOINT_KEYS if k not in state]
    if missing:
        raise ValueError(f"checkpoint lacks key(s) {missing}; is it a fastsort training checkpoint?")
    return state


def model_from_checkpoint(state: dict, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """The checkpoint's model in eval mode on ``device`` (built without downloads), and its model_info."""
    cfg, info = state.get("config") or {}, state["model_info"]
    # Fused Mish keeps the state-dict keys of native Mish and falls back to it where Triton cannot run;
    # "compile" is native Mish under torch.compile, which is not worth its compile time for one pass.
    mish = "fused" if cfg.get("mish") == "fused" else "native"
    model, _ = build_model(state["model_name"], len(state["classes"]), act=cfg.get("act", info.get("act", "mish")),
                           pretrained=None, channels_last=cfg.get("channels_last", True),
                           drop_rate=cfg.get("drop_rate"), mish=mish)
    load_model_state(model, state["model"], source=f"checkpoint of {state['model_name']}")
    return model.to(device).eval(), info


def predict_probs(
    checkpoint: str | Path | dict,
    index: Index,
    *,
    tta: str = "none",
    batch_size: int = 64,
    device: str = "auto",
    loader: str = "auto",
    workers: int = 0,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Softmax probabilities of one checkpoint over ``index``, averaged over the TTA views.

    Args:
        checkpoint: a checkpoint path or an already loaded checkpoint dict.
        index: the images; their labels are ignored.
        tta: a key of ``TTA``.
        progress: called with 1 after each batch.
    Returns:
        (N, C) float32 probabilities in index order.
    """
    if tta not in TTA:
        raise ValueError(f"--tta must be one of {', '.join(TTA)}, got {tta!r}")
    if loader not in ("auto", *BACKENDS):
        raise ValueError(f"--loader must be auto, {', '.join(BACKENDS)}; got {loader!r}")
    state = _as_state(checkpoint)
    dev = resolve_device(device)
    precision = resolve_precision("auto", dev)  # as in training: bf16 (or fp16) on a GPU, fp32 on the CPU
    model, info = model_from_checkpoint(state, dev)
    channels_last = (state.get("config") or {}).get("channels_last", True)
    batches = make_loader(index, batch_size=batch_size, image_size=int(info["image_size"]), train=False,
                          backend=loader, device=str(dev), mean=info["mean"], std=info["std"],
                          precision=precision if dev.type == "cuda" else "fp32", workers=workers)
    views = TTA[tta]
    out = torch.empty((len(index), len(state["classes"])), dtype=torch.float32, device=dev)
    start = 0
    with torch.inference_mode():
        for x, _ in batches.epoch(0):
            acc = torch.zeros((len(x), out.shape[1]), dtype=torch.float32, device=dev)
            for view in views:
                v = view(x)
                if channels_last:
                    v = v.contiguous(memory_format=torch.channels_last)  # flips/transposes break the layout
                with autocast_for(dev, precision):
                    logits = model(v)
                acc += torch.softmax(logits.float(), dim=1)
            out[start:start + len(x)] = acc / len(views)
            start += len(x)
            if progress:
                progress(1)
    if start != len(index):
        raise RuntimeError(f"the loader delivered {start} of {len(index)} images")
    return out.cpu().numpy()  # one host copy for the whole test set


# ----------------------------------------------------------------------------------------------- combine


def sharpen(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Temperature sharpening p**T / sum_c p**T, computed as a softmax of T * log p (T = 1 is the identity)."""
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"--temperature must be a positive number, got {temperature}")
    probs = np.asarray(probs, dtype=np.float32)
    if temperature == 1:
        return probs
    # float64 and a clamp: p**10 of a small p underflows float32, and log 0 is -inf.
    z = temperature * np.log(np.clip(probs.astype(np.float64), 1e-30, None))
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def ensemble_weights(model_names: Sequence[str], weights: Sequence[float] | None = None) -> np.ndarray:
    """Weight of each model, summing to 1.

    Without ``weights`` every architecture (model name) gets an equal share, split equally among its
    checkpoints. Explicit weights (one per checkpoint, non-negative, not all zero) are normalised to sum 1.
    """
    n = len(model_names)
    if n == 0:
        raise ValueError("no models to ensemble")
    if weights is None:
        counts = {name: list(model_names).count(name) for name in model_names}
        return np.asarray([1.0 / (len(counts) * counts[name]) for name in model_names])
    w = np.asarray(list(weights), dtype=np.float64)
    if w.shape != (n,):
        raise ValueError(f"--weights has {w.size} value(s) but there are {n} checkpoint(s); give one per checkpoint")
    if not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"--weights must be non-negative and not all zero, got {list(weights)}")
    return w / w.sum()


def ensemble(prob_list: Sequence[np.ndarray], model_names: Sequence[str],
             weights: Sequence[float] | None = None) -> np.ndarray:
    """Weighted mean of each model's (already normalised) probabilities; weights as in ``ensemble_weights``.

    Returns:
        (N, C) float32.
    """
    if len(prob_list) != len(model_names):
        raise ValueError(f"{len(prob_list)} probability arrays but {len(model_names)} model names")
    w = ensemble_weights(model_names, weights)
    shapes = {np.shape(p) for p in prob_list}
    if len(shapes) != 1:
        raise ValueError(f"the models' probability arrays differ in shape: {sorted(shapes)}")
    # Each model's rows already sum to 1, so weighting after that normalisation is what makes weights count
    # (the seed weighted before it, and the weights cancelled).
    total = np.zeros(prob_list[0].shape, dtype=np.float64)
    for wi, p in zip(w, prob_list):
        total += wi * np.asarray(p, dtype=np.float64)
    return total.astype(np.float32)


# ----------------------------------------------------------------------------------------------- test set


def _scan_image_folder(root: Path) -> ScanResult:
    """Every image below ``root`` in sorted order; ids are paths relative to it (file names in a flat folder)."""
    paths, ids = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if _is_image_name(name):
                full = os.path.join(dirpath, name)
                paths.append(os.path.abspath(full))
                ids.append(os.path.relpath(full, root).replace(os.sep, "/"))
    if not paths:
        raise DataError(f"no images found in {root}")
    index = Index(tuple(paths), np.full(len(paths), -1, dtype=np.int64), (), tuple(ids))
    return ScanResult(index, [], [])


def load_test_set(path: str | Path, *, image_root: str | Path | None = None, id_col: str = "image_id",
                  progress: Callable[[int], None] | None = None) -> Index:
    """The test images, every one decode-checked; raises ``DataError`` listing every problem.

    Args:
        path: a CSV of ids (read with ``read_csv``, unlabelled), a folder holding ``test.csv``, or a folder of
            images (flat: ids are file names; class folders: ids are relative paths, the folders are ignored).
        image_root: the images of a CSV (default ``<csv folder>/images`` if it exists, else the CSV's folder).
    Returns:
        An ``Index`` with labels -1 and no classes.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"test set not found: {path}")
    if path.is_dir() and (path / "test.csv").is_file() and not any(_is_image_name(n) for n in os.listdir(path)):
        path = path / "test.csv"
    if path.is_file():
        scan = read_csv(path, image_root, id_col=id_col, label_col=None)
    else:
        scan = _scan_image_folder(path)
    checked = preflight(scan, skip_bad=True, progress=progress)  # collects problems; we raise below
    if checked.problems:
        raise DataError(f"{len(checked.problems)} problem(s) in the test set {path}; nothing was predicted:",
                        checked.problems)
    return checked.index


# ----------------------------------------------------------------------------------------------- predict


@dataclass
class PredictResult:
    out: Path
    ids: tuple[str, ...]
    classes: tuple[str, ...]
    probs: np.ndarray  # (N, C) ensemble probabilities
    weights: list[float]  # normalised, one per checkpoint
    counts: dict[str, int]  # predicted images per class
    files: dict[str, Path] = field(default_factory=dict)


def _class_list_difference(a: Sequence[str], b: Sequence[str]) -> str:
    only_a, only_b = [c for c in a if c not in b], [c for c in b if c not in a]
    if only_a or only_b:
        return f"only in the first: {only_a}; only in the second: {only_b}"
    return f"same names in another order: {list(a)} vs {list(b)}"


def _load_checkpoints(paths: Sequence[str | Path]) -> list[dict]:
    """Load every checkpoint, reporting every missing or unreadable one, and check their class lists match."""
    if not paths:
        raise DataError("no checkpoints given")
    problems, states = [], []
    for p in paths:
        try:
            states.append(_as_state(p))
        except (FileNotFoundError, ValueError) as exc:
            problems.append(str(exc))
    if problems:
        raise DataError(f"{len(problems)} of {len(paths)} checkpoint(s) cannot be used:", problems)
    first = tuple(states[0]["classes"])
    for p, s in zip(paths[1:], states[1:]):
        if tuple(s["classes"]) != first:
            raise DataError(f"checkpoints {paths[0]} and {p} have different class lists "
                            f"({len(first)} vs {len(s['classes'])} classes): "
                            f"{_class_list_difference(first, s['classes'])}")
    return states


def submission_labels(classes: Sequence[str], label_offset: int = 0) -> list[str]:
    """What the submission writes for each class: its name, or ``int(name) + label_offset``."""
    if not label_offset:
        return list(classes)
    bad = []
    for c in classes:
        try:
            int(c)
        except ValueError:
            bad.append(c)
    if bad:
        raise DataError(f"--label-offset {label_offset} needs integer class names; these are not: {bad}")
    return [str(int(c) + label_offset) for c in classes]


def _csv_text(header: Sequence[str], rows) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def write_submission(path: str | Path, ids: Sequence[str], pred: np.ndarray, written_labels: Sequence[str]) -> None:
    """``id,label`` rows, the label of class k being ``written_labels[k]`` (see ``submission_labels``)."""
    write_text_atomic(Path(path), _csv_text(["id", "label"], ((i, written_labels[c]) for i, c in zip(ids, pred))))


def save_model_probs(path: Path, probs: np.ndarray) -> None:
    """Each model's TTA-averaged probabilities before sharpening, (models, N, C), written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        np.savez(f, probs=probs)
    os.replace(tmp, path)


def predict(
    checkpoints: Sequence[str | Path],
    test: str | Path,
    *,
    tta: str = "flip",
    temperature: float = 1.0,
    weights: Sequence[float] | None = None,
    label_offset: int = 0,
    out: str | Path = "runs/predict",
    batch_size: int = 64,
    device: str = "auto",
    loader: str = "auto",
    image_root: str | Path | None = None,
    id_col: str = "image_id",
    workers: int = 0,
    progress: bool = False,
) -> PredictResult:
    """Predict a test set with one or more checkpoints and write probs.csv, submission.csv, predictions.json.

    Every input is checked (options, checkpoints, class lists, weights, every test image) before any model runs.
    """
    # Options first: they cost nothing to check.
    if tta not in TTA:
        raise ValueError(f"--tta must be one of {', '.join(TTA)}, got {tta!r}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"--temperature must be a positive number, got {temperature}")
    if loader not in ("auto", *BACKENDS):
        raise ValueError(f"--loader must be auto, {', '.join(BACKENDS)}; got {loader!r}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    dev = resolve_device(device)
    states = _load_checkpoints(checkpoints)
    names = [s["model_name"] for s in states]
    w = ensemble_weights(names, weights)
    classes = tuple(states[0]["classes"])
    written_labels = submission_labels(classes, label_offset)

    with _Progress(progress) as bar:
        task = bar.task("checking test images", None)
        index = load_test_set(test, image_root=image_root, id_col=id_col, progress=lambda k: bar.update(task, k))
        n_batches = math.ceil(len(index) / batch_size)
        per_model = []
        for k, state in enumerate(states):
            task = bar.task(f"model {k + 1}/{len(states)} {state['model_name']}", n_batches)
            per_model.append(predict_probs(state, index, tta=tta, batch_size=batch_size, device=str(dev),
                                           loader=loader, workers=workers, progress=lambda n, t=task: bar.update(t, n)))
    probs = ensemble([sharpen(p, temperature) for p in per_model], names, w)
    pred = probs.argmax(axis=1)
    conf = probs.max(axis=1)

    out = Path(out)
    files = {"probs": out / "probs.csv", "submission": out / "submission.csv", "model_probs": out / "model_probs.npz",
             "predictions": out / "predictions.json"}
    save_model_probs(files["model_probs"], np.stack(per_model))
    cells = np.char.mod("%.7g", probs)  # formatted once by NumPy, not per value in Python
    write_text_atomic(files["probs"], _csv_text(["image_id", "path", *classes],
                                                ([i, p, *row] for i, p, row in zip(index.ids, index.paths, cells))))
    write_submission(files["submission"], index.ids, pred, written_labels)
    counts = {c: int(n) for c, n in zip(classes, np.bincount(pred, minlength=len(classes)))}
    record = {
        "checkpoints": [{"path": str(Path(p).absolute()) if not isinstance(p, dict) else None,
                         "model_name": s["model_name"], "image_size": s["model_info"]["image_size"],
                         "epoch": s.get("epoch"), "metrics": s.get("metrics")} for p, s in zip(checkpoints, states)],
        "weights": [float(x) for x in w],
        "weights_given": None if weights is None else [float(x) for x in weights],
        "tta": tta, "tta_views": len(TTA[tta]), "temperature": temperature, "label_offset": label_offset,
        "classes": list(classes), "submission_labels": written_labels,
        "test": str(Path(test).absolute()), "image_root": os.path.commonpath(index.paths) if len(index) > 1
        else os.path.dirname(index.paths[0]),
        "counts": {"images": len(index), "predicted": counts},
        # The seed's confidence profile: how many images the ensemble is at most this sure of.
        "confidence_at_most": {str(t): int((conf <= t).sum()) for t in (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)},
        "files": {k: v.name for k, v in files.items()},
    }
    write_text_atomic(files["predictions"], json.dumps(record, indent=2, default=str))
    return PredictResult(out, index.ids, classes, probs, [float(x) for x in w], counts, files)


# ----------------------------------------------------------------------------------------------- pseudo-labels


@dataclass
class PseudoLabelResult:
    out: Path
    kept: int
    total: int
    threshold: float


def read_probs_csv(path: str | Path) -> tuple[list[str], list[str], tuple[str, ...], np.ndarray]:
    """(ids, absolute paths, classes, (N, C) probabilities) of a ``probs.csv`` written by ``predict``."""
    path = Path(path)
    if path.is_dir():
        path = path / "probs.csv"
    if not path.is_file():
        raise DataError(f"probabilities file not found: {path} (give predict's output folder or its probs.csv)")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if not rows or rows[0][:2] != ["image_id", "path"] or len(rows[0]) < 3:
        raise DataError(f"{path}: expected the header image_id,path,<class names...> that predict writes, "
                        f"got {rows[0] if rows else 'an empty file'}")
    header, body = rows[0], rows[1:]
    bad = [f"{path.name} line {i + 2}: {len(r)} fields, expected {len(header)}"
           for i, r in enumerate(body) if len(r) != len(header)]
    if bad:
        raise DataError(f"{path}: malformed rows:", bad)
    try:
        probs = np.asarray([r[2:] for r in body], dtype=np.float64).reshape(len(body), len(header) - 2)
    except ValueError as exc:
        raise DataError(f"{path}: a probability is not a number ({exc})") from exc
    return [r[0] for r in body], [r[1] for r in body], tuple(header[2:]), probs


def pseudo_label(probs_csv: str | Path, out_csv: str | Path | None = None, *,
                 threshold: float = 0.8) -> PseudoLabelResult:
    """Keep the test images whose top probability is at least ``threshold``; write ``image_id,label,path``.

    Args:
        probs_csv: predict's output folder or its ``probs.csv``.
        out_csv: where to write (default ``pseudo_labels.csv`` beside ``probs.csv``). ``label`` is the class
            name (the training convention, no offset); ``path`` is the absolute image path.
    """
    if not (0 < threshold <= 1):  # also false for NaN
        raise ValueError(f"--threshold must be in (0, 1], got {threshold}")
    src = Path(probs_csv)
    ids, paths, classes, probs = read_probs_csv(src)
    out = Path(out_csv) if out_csv else (src if src.is_dir() else src.parent) / "pseudo_labels.csv"
    keep = probs.max(axis=1) >= threshold
    best = probs.argmax(axis=1)
    rows = [(ids[i], classes[best[i]], paths[i]) for i in np.flatnonzero(keep)]
    write_text_atomic(out, _csv_text(["image_id", "label", "path"], rows))
    return PseudoLabelResult(out, len(rows), len(ids), threshold)


# ----------------------------------------------------------------------------------------------- score


def _read_labelled_csv(path: Path, id_cols: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """({id: label}, problems) of a CSV with an id column (first of ``id_cols`` present) and ``label``."""
    if not path.is_file():
        raise DataError(f"file not found: {path}")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        id_col = next((c for c in id_cols if c in header), None)
        if id_col is None or "label" not in header:
            raise DataError(f"{path}: expected columns {' or '.join(id_cols)} and label; the header has {header}")
        labels, problems = {}, []
        for row in reader:
            i, label = (row.get(id_col) or "").strip(), (row.get("label") or "").strip()
            where = f"{path.name} line {reader.line_num}"
            if not i or not label:
                problems.append(f"{where}: empty id or label")
            elif i in labels:
                problems.append(f"{where}: duplicate id {i!r}")
            else:
                labels[i] = label
    return labels, problems


def _listed(what: str, ids: Sequence[str], limit: int = 20) -> list[str]:
    lines = [f"{what}: {i!r}" for i in ids[:limit]]
    if len(ids) > limit:
        lines.append(f"... and {len(ids) - limit} more {what}")
    return lines


def score(submission_csv: str | Path, labels_csv: str | Path, *, out_png: str | Path | None = None,
          label_offset: int = 0) -> dict:
    """Accuracy, macro-F1 and confusion matrix of a submission against a labels file.

    Args:
        submission_csv: ``id,label`` (or ``image_id,label``), as predict writes.
        labels_csv: ``image_id,label`` in class names, e.g. ``data/elpv/test_labels.csv``.
        out_png: also draw the confusion matrix here.
        label_offset: what predict's ``--label-offset`` added to the submission's labels (subtracted here).
    Returns:
        {"accuracy", "macro_f1", "n", "labels", "confusion" (rows: truth, columns: prediction), "png"}.
    """
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

    sub_path, truth_path = Path(submission_csv), Path(labels_csv)
    sub, problems = _read_labelled_csv(sub_path, ("id", "image_id"))
    truth, truth_problems = _read_labelled_csv(truth_path, ("image_id", "id"))
    problems += truth_problems
    if label_offset:
        for i, label in list(sub.items()):
            try:
                sub[i] = str(int(label) - label_offset)
            except ValueError:
                problems.append(f"{sub_path.name}: label {label!r} of id {i!r} is not an integer "
                                f"(needed with --label-offset {label_offset})")
    problems += _listed(f"id missing from {sub_path.name}", [i for i in truth if i not in sub])
    problems += _listed(f"id of {sub_path.name} unknown to {truth_path.name}", [i for i in sub if i not in truth])
    if problems:
        raise DataError(f"cannot score {sub_path} against {truth_path}:", problems)
    ids = list(truth)
    y_true, y_pred = [truth[i] for i in ids], [sub[i] for i in ids]
    try:  # integer labels compare as numbers ("01" == "1") and sort numerically
        y_true, y_pred = [int(v) for v in y_true], [int(v) for v in y_pred]
    except ValueError:
        pass
    labels = sorted(set(y_true) | set(y_pred))
    cm = confusion_matrix(y_true, y_pred, labels=labels)
    result = {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "n": len(ids), "labels": [str(v) for v in labels], "confusion": cm.tolist(), "png": None,
        # Predicted labels the truth never uses: a real miss, or a submission written with a --label-offset.
        "unseen_labels": [str(v) for v in sorted(set(y_pred) - set(y_true))],
    }
    if out_png:
        result["png"] = str(plot_confusion(cm, result["labels"], out_png,
                                           title=f"{sub_path.name}: accuracy {result['accuracy']:.4f}, "
                                                 f"macro-F1 {result['macro_f1']:.4f}"))
    return result


def plot_confusion(cm: np.ndarray, labels: Sequence[str], path: str | Path, title: str = "") -> Path:
    """Draw a confusion matrix (rows: truth, columns: prediction) to a PNG with matplotlib's Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cm = np.asarray(cm)
    side = 2.5 + 0.45 * len(labels)
    fig = Figure(figsize=(side, side))
    FigureCanvasAgg(fig)  # no pyplot: no global backend, no GUI
    ax = fig.add_subplot()
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=90 if len(labels) > 8 else 0)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title, fontsize=9)
    if len(labels) <= 30:
        for (r, c), n in np.ndenumerate(cm):
            ax.text(c, r, str(n), ha="center", va="center", fontsize=8,
                    color="white" if n > cm.max() / 2 else "black")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)
    return path


def format_confusion(result: dict) -> str:
    """The confusion matrix of ``score``'s result as a text table (rows: truth, columns: prediction)."""
    labels, cm = result["labels"], result["confusion"]
    width = max([len(s) for s in labels] + [len(str(v)) for row in cm for v in row] + [4])
    first = max([len(s) for s in labels] + [len("true\\pred")]) + 2
    head = "true\\pred".ljust(first) + " ".join(s.rjust(width) for s in labels)
    rows = [s.ljust(first) + " ".join(str(v).rjust(width) for v in row) for s, row in zip(labels, cm)]
    return "\n".join([head, *rows])
