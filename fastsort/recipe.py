"""The whole competition plan in one file: stage-1 runs, averaging, ensemble inference, pseudo-labels, stage 2,
final inference and submission, each step's outputs under one run folder.

A step is finished when its output exists (every output is written atomically), so rerunning the recipe skips
finished steps; an interrupted training run resumes from its ``last.pt``. The recipe is checked whole (keys,
model names, files) before the first step runs.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .index import write_text_atomic
from .train import TrainConfig

TOP_KEYS = {"name", "out", "data", "test", "test_labels", "image_root", "train", "stage1", "average", "predict",
            "pseudo_label", "stage2", "scorecard"}
RUN_KEYS = {"model", "folds"}  # plus any TrainConfig field
AVERAGE_KEYS = {"top_k", "tta", "bn"}
PREDICT_KEYS = {"tta", "temperature", "weights", "label_offset", "batch_size"}
STAGE2_KEYS = {"lr_scale", "epoch_scale"}
# Settings the recipe owns for every run; a run or the train defaults must not set them.
RECIPE_OWNED = {"data", "out", "fold", "resume", "pseudo", "init", "image_root"}


@dataclass
class Run:
    """One training run of stage 1 or stage 2."""

    name: str  # folder name, e.g. tf_efficientnet_lite0-224-fold0
    config: TrainConfig


@dataclass
class Recipe:
    out: Path
    data: str
    test: str
    test_labels: str | None
    image_root: str | None
    stage1: list[Run]
    average: dict
    predict: dict
    pseudo_label: dict
    stage2: dict | None
    scorecard: bool
    source: dict = field(default_factory=dict)


def _check_keys(where: str, given: dict, allowed: set[str]) -> None:
    if not isinstance(given, dict):
        raise ValueError(f"recipe: {where} must be a mapping, got {type(given).__name__}")
    unknown = sorted(set(given) - allowed)
    if unknown:
        raise ValueError(f"recipe: unknown key(s) {unknown} in {where}; allowed: {sorted(allowed)}")


def _check_model(name: str, where: str) -> None:
    import timm

    if name.startswith("pretrainedmodels:"):
        import pretrainedmodels

        if name.split(":", 1)[1] not in pretrainedmodels.model_names:
            raise ValueError(f"recipe: {where} names an unknown model {name!r} (pretrainedmodels has "
                             f"{', '.join(pretrainedmodels.model_names)})")
    elif not timm.is_model(name):
        raise ValueError(f"recipe: {where} names an unknown model {name!r} (not a timm model name)")


def load_recipe(path: str | Path, *, out: str | None = None, check_files: bool = True) -> Recipe:
    """Read and check a recipe file; every error names the key, step or model at fault.

    ``check_files=False`` checks everything but the existence of the data and weight files.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark else ""
        raise ValueError(f"recipe {path}{where}: not valid YAML ({getattr(exc, 'problem', None) or exc})") from None
    _check_keys(str(path), raw, TOP_KEYS)
    for key in ("data", "test", "stage1"):
        if key not in raw:
            raise ValueError(f"recipe {path}: missing required key {key!r}")
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    defaults = raw.get("train") or {}
    _check_keys("train", defaults, train_fields - RECIPE_OWNED)
    root = Path(out or raw.get("out") or f"runs/{raw.get('name', path.stem)}")
    data, image_root = str(raw["data"]), raw.get("image_root")

    stage1 = []
    if not isinstance(raw["stage1"], list) or not raw["stage1"]:
        raise ValueError("recipe: stage1 must be a non-empty list of runs")
    for i, entry in enumerate(raw["stage1"]):
        where = f"stage1[{i}]"
        _check_keys(where, entry, (RUN_KEYS | train_fields) - RECIPE_OWNED)
        if "model" not in entry:
            raise ValueError(f"recipe: {where} has no model")
        _check_model(entry["model"], where)
        folds = entry.get("folds", [0])
        folds = [folds] if isinstance(folds, int) else list(folds)
        for fold in folds:
            values = {**defaults, **{k: v for k, v in entry.items() if k != "folds"}, "data": data,
                      "image_root": image_root, "fold": fold}
            cfg = TrainConfig.from_dict(values)
            if not 0 <= fold < cfg.n_folds:
                raise ValueError(f"recipe: {where} fold {fold} is outside 0..{cfg.n_folds - 1}")
            try:
                cfg.validate()
            except ValueError as exc:
                raise ValueError(f"recipe: {where} (fold {fold}): {exc}") from None
            if check_files and cfg.pretrained not in ("auto", "none", "") and not Path(cfg.pretrained).is_file():
                raise FileNotFoundError(f"recipe: {where} pretrained weights {cfg.pretrained} do not exist")
            name = f"{cfg.model.replace(':', '-').replace('/', '-')}-{cfg.image_size}-fold{fold}"
            if any(r.name == name for r in stage1):
                raise ValueError(f"recipe: {where} repeats the run {name}")
            cfg.out = str(root / "stage1" / name)
            stage1.append(Run(name, cfg))

    average = {"top_k": 0, "tta": "flip", "bn": "recompute", **(raw.get("average") or {})}
    _check_keys("average", average, AVERAGE_KEYS)
    predict = {"tta": "flip", "temperature": 1.0, "weights": None, "label_offset": 0, "batch_size": 64,
               **(raw.get("predict") or {})}
    _check_keys("predict", predict, PREDICT_KEYS)
    pseudo = {"threshold": 0.8, **(raw.get("pseudo_label") or {})}
    _check_keys("pseudo_label", pseudo, {"threshold"})
    if not 0 < float(pseudo["threshold"]) <= 1:
        raise ValueError(f"recipe: pseudo_label.threshold must be in (0, 1], got {pseudo['threshold']}")
    stage2 = raw.get("stage2")
    if stage2 is not None:
        stage2 = {"lr_scale": 0.5, "epoch_scale": 0.25, **stage2}
        _check_keys("stage2", stage2, STAGE2_KEYS)
    for tta in (average["tta"], predict["tta"]):
        if tta not in ("none", "flip", "dihedral"):
            raise ValueError(f"recipe: unknown tta {tta!r} (none, flip, dihedral)")
    if average["bn"] not in ("recompute", "average"):
        raise ValueError(f"recipe: average.bn must be recompute or average, got {average['bn']!r}")
    if predict["weights"] is not None and len(predict["weights"]) != len(stage1):
        raise ValueError(f"recipe: predict.weights has {len(predict['weights'])} values for {len(stage1)} runs")
    for key in ("data", "test"):
        if check_files and not Path(raw[key]).exists():
            raise FileNotFoundError(f"recipe: {key} {raw[key]} does not exist")
    labels = raw.get("test_labels")
    if check_files and labels and not Path(labels).is_file():
        raise FileNotFoundError(f"recipe: test_labels {labels} does not exist")
    return Recipe(root, data, str(raw["test"]), labels, image_root, stage1, average, predict, pseudo, stage2,
                  bool(raw.get("scorecard", bool(labels))), source=raw)


def stage2_runs(recipe: Recipe, pseudo_csv: Path) -> list[Run]:
    """Each stage-1 run fine-tuned from its average with the pseudo-labels: scaled lr and epochs, same fold."""
    runs = []
    for run in recipe.stage1:
        cfg = dataclasses.replace(run.config, out=str(recipe.out / "stage2" / run.name), pseudo=str(pseudo_csv),
                                  init=str(recipe.out / "stage1" / run.name / "averaged.pt"),
                                  lr=run.config.lr * recipe.stage2["lr_scale"],
                                  epochs=max(1, round(run.config.epochs * recipe.stage2["epoch_scale"])))
        runs.append(Run(run.name, cfg))
    return runs


# ----------------------------------------------------------------------------------------------- steps


def _train_step(run: Run, device: str, echo, progress) -> Path:
    from .checkpoint import load_checkpoint
    from .train import train

    run_dir = Path(run.config.out)
    last = run_dir / "last.pt"
    if last.is_file() and load_checkpoint(last)["epoch"] + 1 >= run.config.epochs:
        echo(f"[skip] {run_dir}: trained")
        return run_dir
    cfg = dataclasses.replace(run.config, resume=last.is_file(), device=device)
    echo(f"[run] train {run_dir}" + (" (resuming)" if cfg.resume else ""))
    train(cfg, echo=echo, progress=progress)
    return run_dir


def _done(path: Path, echo) -> bool:
    if path.exists():
        echo(f"[skip] {path}: done")
        return True
    return False


def run_recipe(recipe: Recipe, *, device: str = "auto", echo: Callable[[str], None] = print,
               progress: bool = True) -> dict:
    """Run every step not yet finished; returns the paths of the submission and scorecard."""
    from .average import average_checkpoints, run_checkpoints
    from .predict import predict, pseudo_label

    t_start = time.time()
    out = recipe.out
    out.mkdir(parents=True, exist_ok=True)
    saved = out / "recipe.json"
    if saved.is_file() and json.loads(saved.read_text()) != recipe.source:
        raise ValueError(f"{out} holds a run of a different recipe ({saved}); choose another out folder")
    write_text_atomic(saved, json.dumps(recipe.source, indent=2))
    test_kw = dict(image_root=None, device=device, batch_size=recipe.predict["batch_size"])
    ens_kw = dict(tta=recipe.predict["tta"], temperature=recipe.predict["temperature"],
                  weights=recipe.predict["weights"], label_offset=recipe.predict["label_offset"])

    averaged = []
    for run in recipe.stage1:
        run_dir = _train_step(run, device, echo, progress)
        avg = run_dir / "averaged.pt"
        if not _done(avg, echo):
            echo(f"[run] average {run_dir}")
            average_checkpoints(run_checkpoints(run_dir), avg, top_k=recipe.average["top_k"],
                                tta=recipe.average["tta"], bn=recipe.average["bn"], device=device, echo=echo)
        averaged.append(avg)

    stage1_pred = out / "stage1" / "predict"
    if not _done(stage1_pred / "predictions.json", echo):
        echo(f"[run] stage-1 ensemble of {len(averaged)} model(s) -> {stage1_pred}")
        predict(averaged, recipe.test, out=stage1_pred, progress=progress, **ens_kw, **test_kw)
    final_pred = stage1_pred

    if recipe.stage2 is not None:
        pseudo_csv = out / "pseudo.csv"
        if not _done(pseudo_csv, echo):
            kept = pseudo_label(stage1_pred, pseudo_csv, threshold=recipe.pseudo_label["threshold"])
            echo(f"[run] pseudo-labels: {kept.kept} of {kept.total} test images at confidence >= "
                 f"{kept.threshold:g} -> {pseudo_csv}")
        finals = []
        for run in stage2_runs(recipe, pseudo_csv):
            finals.append(_train_step(run, device, echo, progress) / "best.pt")
        final_pred = out / "stage2" / "predict"
        if not _done(final_pred / "predictions.json", echo):
            echo(f"[run] stage-2 ensemble of {len(finals)} model(s) -> {final_pred}")
            predict(finals, recipe.test, out=final_pred, progress=progress, **ens_kw, **test_kw)

    result = {"submission": final_pred / "submission.csv"}
    if recipe.scorecard and recipe.test_labels and not _done(out / "scorecard.json", echo):
        result["scorecard"] = scorecard(recipe, averaged, stage1_pred, final_pred if recipe.stage2 else None,
                                        device=device, echo=echo, progress=progress, started=t_start)
    write_text_atomic(out / "submission.csv", result["submission"].read_text())
    echo(f"submission: {out / 'submission.csv'}")
    return result


def scorecard(recipe: Recipe, averaged: list[Path], stage1_pred: Path, stage2_pred: Path | None, *, device: str,
              echo, progress: bool, started: float) -> Path:
    """Held-out accuracy after each stage: single model, + TTA, + averaging, + ensemble, + pseudo-labels."""
    import numpy as np

    from .predict import predict, read_probs_csv, score, submission_labels, write_submission

    first = recipe.stage1[0]
    single = Path(first.config.out) / "best.pt"
    tta = recipe.predict["tta"]
    rows = [("single model", f"{first.name} best epoch, no TTA", single, "none"),
            (f"+ TTA ({tta})", f"{first.name} best epoch", single, tta)]
    table = []
    for stage, what, ckpt, view in rows:
        folder = recipe.out / "scorecard" / stage.replace("+ ", "").split(" (")[0].replace(" ", "-")
        if not _done(folder / "predictions.json", echo):
            predict([ckpt], recipe.test, out=folder, tta=view, temperature=1.0, weights=None,
                    label_offset=recipe.predict["label_offset"], image_root=None, device=device,
                    batch_size=recipe.predict["batch_size"], progress=progress)
        table.append((stage, what, folder))
    # The first averaged model alone, with TTA, is already inside the stage-1 ensemble's per-model output.
    ids, _, classes, _ = read_probs_csv(stage1_pred)
    alone = np.load(stage1_pred / "model_probs.npz")["probs"][0]
    folder = recipe.out / "scorecard" / "weight-averaging"
    write_submission(folder / "submission.csv", ids, alone.argmax(1),
                     submission_labels(classes, recipe.predict["label_offset"]))
    table.append(("+ weight averaging", f"{first.name} averaged", folder))
    table.append((f"+ ensemble (T={recipe.predict['temperature']:g})", f"{len(averaged)} averaged model(s)",
                  stage1_pred))
    if stage2_pred is not None:
        table.append(("+ pseudo-labels (stage 2)", f"{len(averaged)} fine-tuned model(s)", stage2_pred))
    lines = ["| stage | models | held-out accuracy | macro-F1 |", "|---|---|---:|---:|"]
    records = []
    for stage, what, folder in table:
        s = score(folder / "submission.csv", recipe.test_labels, label_offset=recipe.predict["label_offset"])
        records.append({"stage": stage, "models": what, "accuracy": s["accuracy"], "macro_f1": s["macro_f1"]})
        lines.append(f"| {stage} | {what} | {s['accuracy']:.4f} | {s['macro_f1']:.4f} |")
    md = "\n".join(lines) + "\n"
    from .bench import machine_info
    from .loader import resolve_device

    card = {"recipe": recipe.source.get("name"), "machine": machine_info(resolve_device(device)),
            "seconds": time.time() - started, "rows": records}  # seconds: this invocation (less if it resumed)
    write_text_atomic(recipe.out / "scorecard.json", json.dumps(card, indent=2))
    write_text_atomic(recipe.out / "scorecard.md", md)
    echo(md)
    return recipe.out / "scorecard.md"
