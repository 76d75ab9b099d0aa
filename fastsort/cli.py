"""The ``fastsort`` command line. Each command parses its options, calls one library function, prints."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="fastsort: the Haihua 2020 winning recipe on a GPU input pipeline.")
data_app = typer.Typer(no_args_is_help=True, help="Prepare real datasets from registry packages.")
app.add_typer(data_app, name="data")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks: medians, machine facts, JSON results, tables.")
app.add_typer(bench_app, name="bench")
recipe_app = typer.Typer(no_args_is_help=True, help="The whole plan in one file: stage 1, averaging, ensemble, "
                         "pseudo-labels, stage 2, submission.")
app.add_typer(recipe_app, name="recipe")


def _command_line(prefix: str) -> str:
    """The command as typed, for results files (the prefix alone when called from Python)."""
    argv = sys.argv
    return " ".join(["fastsort", *argv[1:]]) if argv and Path(argv[0]).name == "fastsort" else prefix


def _fail(exc: BaseException) -> None:
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@app.command()
def train(
    data: str = typer.Option("data/elpv", help="class-folder root, a CSV, or a folder holding train.csv"),
    image_root: Optional[str] = typer.Option(None, help="image folder of a CSV (default <csv folder>/images)"),
    id_col: str = typer.Option("image_id", help="CSV column of image ids (with or without extension)"),
    label_col: str = typer.Option("label", help="CSV column of labels (ints or strings)"),
    out: str = typer.Option("", help="run folder (default runs/<model>-fold<k>)"),
    model: str = typer.Option("tf_efficientnet_lite0", help="a timm name or pretrainedmodels:<name>"),
    pretrained: str = typer.Option("auto", help="local weights file, 'auto' (registry package if known) or 'none'"),
    act: str = typer.Option("mish", help="mish: ReLU/SiLU/Swish -> Mish (the seed); keep: leave them"),
    mish: str = typer.Option("native", help="native (nn.Mish), fused (fastsort's Triton kernels, BatchNorm+Mish "
                             "fused), compile (native Mish under torch.compile)"),
    image_size: int = typer.Option(384, help="training and validation side in pixels"),
    batch_size: int = typer.Option(64),
    epochs: int = typer.Option(16),
    lr: float = typer.Option(0.2, help="one-cycle peak learning rate"),
    weight_decay: float = typer.Option(5e-4),
    accum_steps: int = typer.Option(1, help="gradient accumulation: batches per optimizer step"),
    cutmix_fraction: float = typer.Option(0.5, help="share of each batch that gets CutMix (the rest GridMask)"),
    gridmask_ratio: float = typer.Option(0.6, help="GridMask kept-stripe ratio; 1 disables GridMask"),
    precision: str = typer.Option("auto", help="auto (bf16 on GPU, fp32 on CPU), fp32, bf16, fp16"),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N"),
    loader: str = typer.Option("auto", help="auto (DALI on a GPU, the OpenCV thread pool on the CPU), dali, threads, "
                               "or torch (the plain PyTorch reference)"),
    dali: Optional[bool] = typer.Option(None, "--dali/--no-dali",
                                        help="shortcuts: --dali = --loader dali (on the CPU: the same DALI graph "
                                             "with CPU operators), --no-dali = --loader torch"),
    workers: int = typer.Option(0, help="loader threads (0: up to 4)"),
    fold: int = typer.Option(0, help="validation fold"),
    n_folds: int = typer.Option(5),
    seed: int = typer.Option(2020),
    bad_images: str = typer.Option("error", "--bad-images",
                                   help="error: stop before training, listing every bad file and row; skip: leave "
                                        "them out, print the count and write them to <run>/skipped.csv"),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="the same as --bad-images skip"),
    pseudo: str = typer.Option("", help="stage 2: pseudo-label CSV from `fastsort pseudo-label`, added to this "
                               "fold's training part only"),
    init: str = typer.Option("", help="stage 2: start from this checkpoint (same --model and classes); the seed's "
                             "stage 2 used half the stage-1 --lr and a quarter of its --epochs"),
    resume: bool = typer.Option(False, "--resume", help="continue the run in --out from its last.pt"),
    limit_batches: int = typer.Option(0, help="train on at most this many batches per epoch (smoke tests)"),
    weight_dtype: str = typer.Option("fp32", help="fp32, or bf16 with --precision bf16 (pure-bf16 weights)"),
    sync_bn: bool = typer.Option(False, "--sync-bn", help="under torchrun: SyncBatchNorm (statistics over all ranks)"),
    scale_lr: bool = typer.Option(True, "--scale-lr/--no-scale-lr",
                                  help="under torchrun: peak LR = --lr x world size (linear scaling rule)"),
    deterministic: bool = typer.Option(False, "--deterministic",
                                       help="deterministic torch algorithms, no cuDNN autotuning (slower on GPU)"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bars"),
) -> None:
    """Train one fold: pre-flight scan, DALI loader, CutMix/GridMask, Lookahead+SGD one-cycle, checkpoints."""
    from .index import DataError
    from .train import Interrupted, TrainConfig, train as run

    if bad_images not in ("skip", "error"):
        _fail(ValueError(f"--bad-images must be skip or error, got {bad_images!r}"))
    skip_bad = skip_bad or bad_images == "skip"
    cfg = TrainConfig(data=data, image_root=image_root, id_col=id_col, label_col=label_col, out=out, model=model,
                      pretrained=pretrained, act=act, mish=mish, image_size=image_size, batch_size=batch_size, epochs=epochs,
                      lr=lr, weight_decay=weight_decay, accum_steps=accum_steps, cutmix_fraction=cutmix_fraction,
                      gridmask_ratio=gridmask_ratio, precision=precision, device=device,
                      loader=loader if dali is None else ("dali" if dali else "torch"), workers=workers,
                      fold=fold, n_folds=n_folds, seed=seed, skip_bad=skip_bad, pseudo=pseudo, init=init,
                      resume=resume, limit_batches=limit_batches, weight_dtype=weight_dtype, sync_bn=sync_bn,
                      scale_lr=scale_lr, deterministic=deterministic)
    if data == "data/elpv" and not Path(data).exists():
        _fail(FileNotFoundError("the default dataset is missing: run `fastsort data elpv` first (or pass --data)"))
    try:
        result = run(cfg, echo=typer.echo, progress=not quiet and sys.stderr.isatty())
    except Interrupted as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(128 + exc.signum)
    except (DataError, ValueError, FileNotFoundError, FileExistsError, ImportError, OSError) as exc:
        _fail(exc)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 speaks for all
        typer.echo(f"validation accuracy (best epoch): {result.best_val_acc:.4f}")


@app.command()
def check(
    data: str = typer.Argument(..., help="class-folder root, a CSV, or a folder holding train.csv"),
    image_root: Optional[str] = typer.Option(None),
    id_col: str = typer.Option("image_id"),
    label_col: str = typer.Option("label"),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="list the problems, then report what would be left"),
) -> None:
    """Run the pre-flight scan alone: list every missing or undecodable file, empty class and bad label."""
    from .index import DataError, load_dataset, preflight

    try:
        result = preflight(load_dataset(data, image_root=image_root, id_col=id_col, label_col=label_col),
                           skip_bad=skip_bad)
    except (DataError, FileNotFoundError) as exc:
        _fail(exc)
    for problem in result.problems:
        typer.echo(f"skipped: {problem}")
    counts = ", ".join(f"{c}: {n}" for c, n in zip(result.index.classes, result.index.class_counts()))
    typer.echo(f"ok: {len(result.index)} images, {result.index.num_classes} classes ({counts})")


@app.command()
def preprocess(
    src: str = typer.Argument(..., help="dataset folder (class folders, or CSVs beside an image folder)"),
    dst: str = typer.Argument(..., help="new folder with the same layout"),
    size: int = typer.Option(384, help="side of the square output"),
    format: str = typer.Option("jpeg", "--format", help="jpeg or png"),
    quality: int = typer.Option(95, help="JPEG quality"),
    workers: int = typer.Option(0, help="threads (0: up to 8)"),
    force: bool = typer.Option(False, "--force", help="replace DST if it exists"),
) -> None:
    """Resize every image once (area filter to shrink, RGB kept), mirroring folders and CSVs."""
    from rich.progress import Progress

    from .index import DataError
    from .preprocess import preprocess as run

    with Progress(transient=True, disable=not sys.stderr.isatty()) as bar:
        task = bar.add_task("preprocess", total=None)
        try:
            result = run(src, dst, size=size, fmt=format, quality=quality, workers=workers, force=force,
                         progress=lambda done, total: bar.update(task, completed=done, total=total))
        except DataError as exc:
            _fail(exc)
    typer.echo(f"{result['images']} images -> {result['dst']} ({size} px {format}), {result['csv_files']} CSV file(s)")


@app.command()
def predict(
    checkpoints: list[str] = typer.Argument(..., help="one or more checkpoints (best.pt, ...); any architectures"),
    test: str = typer.Option(..., help="test CSV of ids, a folder holding test.csv, or a folder of images"),
    image_root: Optional[str] = typer.Option(None, help="image folder of a CSV (default <csv folder>/images)"),
    id_col: str = typer.Option("image_id", help="CSV column of image ids"),
    tta: str = typer.Option("flip", help="none, flip (the seed's 4 flips) or dihedral (all 8)"),
    temperature: float = typer.Option(1.0, help="sharpening T of each model's probabilities (the seed used 10)"),
    weights: str = typer.Option("", help="comma list, one weight per checkpoint (default: equal per architecture)"),
    label_offset: int = typer.Option(0, help="submission label = int(class name) + offset (1: 1-based ids)"),
    out: str = typer.Option("runs/predict", help="folder for probs.csv, submission.csv, predictions.json"),
    batch_size: int = typer.Option(64),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N"),
    loader: str = typer.Option("auto", help="auto, dali, threads, torch"),
    workers: int = typer.Option(0, help="loader threads (0: up to 4)"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bars"),
) -> None:
    """Predict a test set: TTA per model, temperature, weighted ensemble; write probs and a submission."""
    from .index import DataError
    from .predict import predict as run

    try:
        weight_list = [float(w) for w in weights.split(",") if w.strip()] if weights else None
    except ValueError:
        _fail(ValueError(f"--weights must be a comma list of numbers, got {weights!r}"))
    try:
        result = run(checkpoints, test, tta=tta, temperature=temperature, weights=weight_list,
                     label_offset=label_offset, out=out, batch_size=batch_size, device=device, loader=loader,
                     image_root=image_root, id_col=id_col, workers=workers,
                     progress=not quiet and sys.stderr.isatty())
    except (DataError, ValueError, FileNotFoundError, OSError, ImportError) as exc:
        _fail(exc)
    counts = ", ".join(f"{c}: {n}" for c, n in result.counts.items())
    typer.echo(f"{len(result.ids)} images, {len(checkpoints)} model(s), weights "
               f"{', '.join(f'{w:.3g}' for w in result.weights)}; predicted {counts}")
    typer.echo(f"wrote {', '.join(str(p) for p in result.files.values())}")


@app.command("pseudo-label")
def pseudo_label_cmd(
    predictions: str = typer.Argument(..., help="predict's output folder, or its probs.csv"),
    threshold: float = typer.Option(0.8, help="keep images whose top probability is at least this, in (0, 1]"),
    out: str = typer.Option("", help="CSV to write (default pseudo_labels.csv beside probs.csv)"),
) -> None:
    """Write image_id,label,path for the test images the ensemble is sure of (stage-2 training data)."""
    from .index import DataError
    from .predict import pseudo_label

    try:
        result = pseudo_label(predictions, out or None, threshold=threshold)
    except (DataError, ValueError, OSError) as exc:
        _fail(exc)
    typer.echo(f"kept {result.kept} of {result.total} images (top probability >= {threshold}) -> {result.out}")


@app.command()
def score(
    submission: str = typer.Argument(..., help="a submission CSV (id,label) from fastsort predict"),
    labels: str = typer.Option("data/elpv/test_labels.csv", help="image_id,label CSV of the true class names"),
    png: Optional[str] = typer.Option(None, help="also save the confusion matrix as this PNG"),
    label_offset: int = typer.Option(0, help="the --label-offset the submission was written with"),
) -> None:
    """Accuracy, macro-F1 and the confusion matrix of a submission against held-out labels."""
    from .index import DataError
    from .predict import format_confusion, score as run

    if labels == "data/elpv/test_labels.csv" and not Path(labels).exists():
        _fail(FileNotFoundError("the default labels file is missing: run `fastsort data elpv` first "
                                "(or pass --labels)"))
    try:
        result = run(submission, labels, out_png=png, label_offset=label_offset)
    except (DataError, ValueError, OSError) as exc:
        _fail(exc)
    typer.echo(f"{result['n']} images: accuracy {result['accuracy']:.4f}, macro-F1 {result['macro_f1']:.4f}")
    typer.echo(format_confusion(result))
    if result["unseen_labels"]:
        typer.echo(f"note: the submission predicts label(s) {result['unseen_labels']} that {labels} never uses; "
                   "if it was written with --label-offset, pass the same --label-offset here")
    if result["png"]:
        typer.echo(f"confusion matrix: {result['png']}")


@app.command()
def average(
    checkpoints: Optional[list[str]] = typer.Argument(None, help="epoch checkpoints of one run (or use --run)"),
    run: str = typer.Option("", help="a run folder: its epoch_*.pt are the candidates"),
    top_k: int = typer.Option(0, help="keep the k candidates with the best validation accuracy under --tta (0: all)"),
    tta: str = typer.Option("flip", help="views used to score candidates and the average: none, flip, dihedral"),
    bn: str = typer.Option("recompute", help="BatchNorm statistics: recompute (one pass over the fold's training "
                           "images) or average"),
    out: str = typer.Option("", help="output checkpoint (default <run>/averaged.pt)"),
    batch_size: int = typer.Option(64),
    device: str = typer.Option("auto"),
    loader: str = typer.Option("auto", help="auto, dali, threads, torch"),
) -> None:
    """Average the weights of epoch checkpoints (all, or the top-k on validation with TTA) into one checkpoint."""
    from .average import average_checkpoints, run_checkpoints
    from .index import DataError

    try:
        if bool(run) == bool(checkpoints):
            raise ValueError("give either checkpoint files or --run, not both")
        paths = run_checkpoints(run) if run else checkpoints
        target = out or str(Path(run or Path(paths[0]).parent) / "averaged.pt")
        average_checkpoints(paths, target, top_k=top_k, tta=tta, bn=bn, batch_size=batch_size, device=device,
                            loader=loader, echo=typer.echo)
    except (DataError, ValueError, FileNotFoundError, OSError) as exc:
        _fail(exc)


@recipe_app.command("run")
def recipe_run(
    recipe: str = typer.Argument(..., help="a recipe file, e.g. recipes/elpv-cpu.yaml"),
    out: str = typer.Option("", help="run folder (default: the recipe's `out`)"),
    device: str = typer.Option("auto"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bars"),
) -> None:
    """Run every unfinished step of a recipe; rerunning skips finished steps and resumes an interrupted one."""
    from .index import DataError
    from .recipe import load_recipe, run_recipe

    try:
        plan = load_recipe(recipe, out=out or None)
        result = run_recipe(plan, device=device, echo=typer.echo, progress=not quiet and sys.stderr.isatty())
    except (DataError, ValueError, FileNotFoundError, FileExistsError, ImportError, OSError) as exc:
        _fail(exc)
    typer.echo(f"done: {result['submission']}")


@recipe_app.command("check")
def recipe_check(recipe: str = typer.Argument(...)) -> None:
    """Check a recipe (keys, model names, files) without running anything."""
    from .recipe import load_recipe

    try:
        plan = load_recipe(recipe)
    except (ValueError, FileNotFoundError) as exc:
        _fail(exc)
    for r in plan.stage1:
        typer.echo(f"stage 1: {r.name}: {r.config.epochs} epochs, lr {r.config.lr:g}, {r.config.image_size} px")
    typer.echo(f"ok: {len(plan.stage1)} run(s) -> {plan.out}")


@data_app.command("elpv")
def data_elpv(
    out: str = typer.Option("data/elpv", help="where to write train.csv, test.csv and images/"),
    force: bool = typer.Option(False, "--force", help="rewrite it even if it exists"),
) -> None:
    """ELPV (PyPI elpv-dataset, CC BY-NC-SA 4.0) as CSV + images, with a held-out 25% test split."""
    from .prepare import prepare_elpv

    try:
        path = prepare_elpv(out, force=force)
    except ImportError as exc:
        _fail(exc)
    typer.echo(f"ELPV ready in {path} (train.csv, test.csv, test_labels.csv, images/)")


@bench_app.command("mish")
def bench_mish(
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N"),
    numel: int = typer.Option(0, help="elements for the op benchmark (0: 64x32x192x192 on GPU, 2**21 on CPU)"),
    dtypes: str = typer.Option("", help="comma list of fp32,fp16,bf16 (default: bf16,fp16,fp32 on GPU, fp32 on CPU)"),
    models: str = typer.Option("", help="comma list of model names for the train-step table (default: the seed's "
                               "four on GPU, efficientnet_b4 on CPU; 'none' skips it)"),
    batch: int = typer.Option(0, help="train-step batch (0: 64 on GPU, 4 on CPU)"),
    size: int = typer.Option(0, help="train-step image side (0: 384 on GPU, 128 on CPU)"),
    modes: str = typer.Option("", help="comma list of native,fused,compile (default: all on GPU, native on CPU)"),
    iters: int = typer.Option(10, help="timed iterations per measurement (after warm-up)"),
    out: str = typer.Option("", help="results JSON (default benchmarks/results/mish-<cpu|gpu>.json)"),
    readme: bool = typer.Option(False, "--readme", help="also regenerate the README's Mish table from the results"),
) -> None:
    """Mish fwd+bwd (fused vs F.mish eager vs compiled vs naive) and per-model train steps per Mish mode."""
    import torch
    from rich.console import Console

    from . import bench
    from .loader import resolve_device

    try:
        dev = resolve_device(device)
    except ValueError as exc:
        _fail(exc)
    gpu = dev.type == "cuda"
    dtype_map = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    names = [d for d in (dtypes or ("bf16,fp16,fp32" if gpu else "fp32")).split(",") if d]
    bad = [d for d in names if d not in dtype_map]
    if bad:
        _fail(ValueError(f"--dtypes: unknown {bad}; use fp32, fp16, bf16"))
    mode_list = [m for m in (modes or ("native,fused,compile" if gpu else "native")).split(",") if m]
    from .models import MISH_MODES

    if any(m not in MISH_MODES for m in mode_list):
        _fail(ValueError(f"--modes: use {', '.join(MISH_MODES)}"))
    model_list = [] if models == "none" else [m for m in (models or (
        "efficientnet_b4,legacy_seresnext50_32x4d,inception_v4,mixnet_xl" if gpu else "efficientnet_b4")).split(",")
        if m]
    numel = numel or (64 * 32 * 192 * 192 if gpu else 2**21)
    batch, size = batch or (64 if gpu else 4), size or (384 if gpu else 128)
    console = Console(stderr=True)
    results = {"machine": bench.machine_info(dev), "command": _command_line("fastsort bench mish"),
               "params": {"numel": numel, "dtypes": names, "models": model_list, "batch": batch, "size": size,
                          "modes": mode_list, "iters": iters}, "op": [], "models": []}
    with console.status("benchmarking Mish") as status:
        for d in names:
            results["op"].append(bench.bench_mish_op(numel=numel, dtype=dtype_map[d], device=dev, iters=iters,
                                                     progress=lambda n, d=d: status.update(f"Mish op {d}: {n}")))
        if model_list:
            results["models"] = bench.bench_mish_models(
                models=model_list, batch=batch, size=size, modes=mode_list, device=dev,
                precision="bf16" if gpu else "fp32", iters=max(3, iters // 2),
                progress=lambda n: status.update(f"train step: {n}"))
    path = bench.write_results(results, out or f"benchmarks/results/mish-{'gpu' if gpu else 'cpu'}.json")
    table = bench.mish_markdown(results)
    typer.echo(table)
    typer.echo(f"results: {path}")
    if readme:
        bench.regenerate_readme()
        typer.echo("README.md tables regenerated")


@bench_app.command("loader")
def bench_loader_cmd(
    data: str = typer.Argument(..., help="benchmark images: class folders or a CSV (tools/make_bench_data.py)"),
    variants: str = typer.Option(",".join(("fastsort", "dali", "seed", "timm", "torchvision", "decode-dali",
                                           "decode-cv2")), help="comma list of variants"),
    batch: int = typer.Option(64),
    size: int = typer.Option(384),
    cpus: int = typer.Option(0, help="cores every variant may use (0: all this process may use)"),
    epochs: int = typer.Option(3, help="timed epochs per variant (after one warm-up epoch)"),
    device: str = typer.Option("auto", help="auto, cpu, cuda"),
    quick: bool = typer.Option(False, "--quick", help="256 images, 1 timed epoch: a smoke test, not a measurement"),
    out: str = typer.Option("", help="results JSON (default benchmarks/results/loader-<data>-<cpu|gpu>.json)"),
    readme: bool = typer.Option(False, "--readme", help="also regenerate the README tables from the results"),
) -> None:
    """Input pipelines side by side on the same files, cores and augmentation: img/s, CPU-ms/img, memory."""
    import os

    import torch
    from rich.console import Console

    from . import bench, bench_loader as bl
    from .index import DataError
    from .loader import resolve_device

    names = [v for v in variants.split(",") if v]
    unknown = [v for v in names if v not in bl.VARIANTS]
    if unknown:
        _fail(ValueError(f"--variants: unknown {unknown}; known: {', '.join(bl.VARIANTS)}"))
    try:
        dev = resolve_device(device)
        cpus = cpus or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
        index = bl.check_inputs(data, cpus)
    except (DataError, ValueError) as exc:
        _fail(exc)
    limit, epochs = (256, 1) if quick else (0, epochs)
    console = Console(stderr=True)
    with console.status("loader benchmark") as status:
        rows = bl.bench_loader(data, variants=names, batch=batch, size=size, cpus=cpus, epochs=epochs,
                               device=str(dev), limit=limit, progress=lambda n: status.update(f"loader: {n}"))
        status.update("batch CutMix/GridMask")
        mix = bl.mix_cost(batch, size, dev)
    results = {"machine": bench.machine_info(dev), "command": _command_line("fastsort bench loader"),
               "params": {"data": data, "batch": batch, "size": size, "cpus": cpus, "epochs": epochs,
                          "variants": names, "quick": quick},
               "images": min(limit, len(index)) if limit else len(index), "rows": rows, "mix": mix}
    tag = Path(data.rstrip("/")).name + ("-quick" if quick else "")
    path = bench.write_results(results, out or f"benchmarks/results/loader-{tag}-{'gpu' if dev.type == 'cuda' else 'cpu'}.json")
    chart = bl.bar_chart(results, path.with_suffix(".png"))
    typer.echo(bl.loader_markdown(results))
    typer.echo(f"results: {path}\nchart: {chart}")
    if readme:
        bench.regenerate_readme()
        typer.echo("README.md tables regenerated")


@bench_app.command("step")
def bench_step_cmd(
    data: str = typer.Argument(..., help="images for the real-data run (class folders or a CSV)"),
    model: str = typer.Option("", help="timm name (default efficientnet_b4 on GPU, tf_efficientnet_lite0 on CPU)"),
    batch: int = typer.Option(0, help="0: 64 on GPU, 16 on CPU"),
    size: int = typer.Option(0, help="0: 384 on GPU, 224 on CPU"),
    steps: int = typer.Option(10, help="timed steps per setting"),
    loader: str = typer.Option("auto", help="auto, dali, threads, torch"),
    precisions: str = typer.Option("", help="comma list (default bf16,fp32 on GPU, fp32 on CPU)"),
    layouts: str = typer.Option("channels-last,nchw", help="comma list of channels-last, nchw"),
    device: str = typer.Option("auto"),
    out: str = typer.Option("", help="results JSON (default benchmarks/results/step-<cpu|gpu>.json)"),
    readme: bool = typer.Option(False, "--readme", help="also regenerate the README tables from the results"),
) -> None:
    """Train-step img/s fed by fastsort's loader vs synthetic data on the device: the loader-bound share."""
    from rich.console import Console

    from . import bench
    from .index import DataError
    from .loader import resolve_device

    try:
        dev = resolve_device(device)
    except DataError as exc:
        _fail(exc)
    gpu = dev.type == "cuda"
    precision_list = [p for p in (precisions or ("bf16,fp32" if gpu else "fp32")).split(",") if p]
    layout_list = [v for v in layouts.split(",") if v]
    bad = [v for v in layout_list if v not in ("channels-last", "nchw")]
    if bad:
        _fail(ValueError(f"--layouts: {bad} not understood; use channels-last, nchw"))
    bad = [p for p in precision_list if p not in ("fp32", "bf16", "fp16")]
    if bad:
        _fail(ValueError(f"--precisions: {bad} not understood; use fp32, bf16, fp16"))
    console = Console(stderr=True)
    params = {"data": data, "model": model or ("efficientnet_b4" if gpu else "tf_efficientnet_lite0"),
              "batch": batch or (64 if gpu else 16), "size": size or (384 if gpu else 224), "steps": steps,
              "loader": loader}
    try:
        with console.status("train-step benchmark") as status:
            rows = bench.bench_step(data, model=params["model"], batch=params["batch"], size=params["size"],
                                    device=dev, loader=loader, precisions=precision_list,
                                    channels_last=[v == "channels-last" for v in layout_list], steps=steps,
                                    progress=lambda n: status.update(f"train step: {n}"))
    except (DataError, ValueError, FileNotFoundError) as exc:
        _fail(exc)
    results = {"machine": bench.machine_info(dev), "command": _command_line("fastsort bench step"),
               "params": params, "rows": rows}
    path = bench.write_results(results, out or f"benchmarks/results/step-{'gpu' if gpu else 'cpu'}.json")
    typer.echo(bench.step_markdown(results))
    typer.echo(f"results: {path}")
    if readme:
        bench.regenerate_readme()
        typer.echo("README.md tables regenerated")


@bench_app.command("readme")
def bench_readme(readme: str = typer.Option("README.md", help="the README to rewrite")) -> None:
    """Regenerate the README's benchmark tables from the results files in benchmarks/results/."""
    from . import bench

    try:
        sections = bench.regenerate_readme(readme)
    except (ValueError, FileNotFoundError) as exc:
        _fail(exc)
    typer.echo(f"regenerated {', '.join(sections)} in {readme}")


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    # A user needs the warning, not the library line that raised it.
    typer.secho(f"warning: {message}", fg=typer.colors.YELLOW, err=True)


def main() -> None:
    import warnings

    warnings.showwarning = _show_warning
    app()


if __name__ == "__main__":
    main()
