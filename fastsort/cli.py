"""The ``fastsort`` command line. Each command parses its options, calls one library function, prints."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="fastsort: the Haihua 2020 winning recipe on a GPU input pipeline.")
data_app = typer.Typer(no_args_is_help=True, help="Prepare real datasets from registry packages.")
app.add_typer(data_app, name="data")


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
    dali: bool = typer.Option(True, "--dali/--no-dali", help="DALI pipeline, or the plain PyTorch reference loader"),
    workers: int = typer.Option(0, help="loader threads (0: up to 4)"),
    fold: int = typer.Option(0, help="validation fold"),
    n_folds: int = typer.Option(5),
    seed: int = typer.Option(2020),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="skip unreadable files and bad rows instead of stopping"),
    resume: bool = typer.Option(False, "--resume", help="continue the run in --out from its last.pt"),
    limit_batches: int = typer.Option(0, help="train on at most this many batches per epoch (smoke tests)"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bars"),
) -> None:
    """Train one fold: pre-flight scan, DALI loader, CutMix/GridMask, Lookahead+SGD one-cycle, checkpoints."""
    from .index import DataError
    from .train import TrainConfig, train as run

    cfg = TrainConfig(data=data, image_root=image_root, id_col=id_col, label_col=label_col, out=out, model=model,
                      pretrained=pretrained, act=act, mish=mish, image_size=image_size, batch_size=batch_size, epochs=epochs,
                      lr=lr, weight_decay=weight_decay, accum_steps=accum_steps, cutmix_fraction=cutmix_fraction,
                      gridmask_ratio=gridmask_ratio, precision=precision, device=device, dali=dali, workers=workers,
                      fold=fold, n_folds=n_folds, seed=seed, skip_bad=skip_bad, resume=resume,
                      limit_batches=limit_batches)
    if data == "data/elpv" and not Path(data).exists():
        _fail(FileNotFoundError("the default dataset is missing: run `fastsort data elpv` first (or pass --data)"))
    try:
        result = run(cfg, echo=typer.echo, progress=not quiet and sys.stderr.isatty())
    except (DataError, ValueError, FileNotFoundError, FileExistsError, ImportError, OSError) as exc:
        _fail(exc)
    typer.echo(f"validation accuracy (best epoch): {result.best_val_acc:.4f}")


@app.command()
def check(
    data: str = typer.Argument(..., help="class-folder root, a CSV, or a folder holding train.csv"),
    image_root: Optional[str] = typer.Option(None),
    id_col: str = typer.Option("image_id"),
    label_col: str = typer.Option("label"),
) -> None:
    """Run the pre-flight scan alone: list every missing or undecodable file, empty class and bad label."""
    from .index import DataError, load_dataset, preflight

    try:
        result = preflight(load_dataset(data, image_root=image_root, id_col=id_col, label_col=label_col))
    except (DataError, FileNotFoundError) as exc:
        _fail(exc)
    counts = ", ".join(f"{c}: {n}" for c, n in zip(result.index.classes, result.index.class_counts()))
    typer.echo(f"ok: {len(result.index)} images, {result.index.num_classes} classes ({counts})")


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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
