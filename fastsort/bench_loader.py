"""``fastsort bench loader``: input pipelines side by side on the same files, cores and augmentation.

Each variant runs alone in a child process (``python -m fastsort.bench_loader VARIANT ...``) pinned to
the same ``--cpus`` cores, so one variant's threads, caches and allocator cannot help or hurt another.
The child times a warm-up epoch (not counted) and then ``epochs`` epochs, synchronising the device
before each clock read, and prints one JSON line. CPU time covers the timed epochs of the child's
whole process tree (its own threads plus ``RUSAGE_CHILDREN``: DataLoader workers are joined at each
epoch's end, so they count).

Variants (all at the same batch and size, all with the seed chain, ``reference/seed-recipe.md`` §3.3):

* ``fastsort``: the default path for the device (``threads`` on a CPU, ``dali`` on a GPU);
* ``dali``: the DALI graph (``mixed`` decode and GPU ops with a GPU, CPU operators without one);
* ``seed``: the seed's loader: DataLoader + ``cv2.imread`` + albumentations chain + Normalize + ToTensorV2;
* ``timm``: ``timm.data.create_loader`` over the same albumentations chain (its prefetcher on a GPU);
* ``torchvision``: ``transforms.v2`` on uint8 tensors in DataLoader workers (no box or median blur in
  torchvision: those branches use a Gaussian blur of the same kernel);
* ``decode-dali`` / ``decode-cv2``: the ceilings: each fastsort path's decoder alone, no augmentation.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .bench import sync
from .index import DataError, Index, load_dataset
from .loader import IMAGENET_MEAN, IMAGENET_STD, batch_positions, make_loader

VARIANTS = ("fastsort", "dali", "seed", "timm", "torchvision", "decode-dali", "decode-cv2")
NEEDS = {"seed": ("albumentations", "pip install albumentations"), "timm": ("albumentations", "pip install albumentations"),
         "dali": ("nvidia.dali", "pip install nvidia-dali-cuda120"),
         "decode-dali": ("nvidia.dali", "pip install nvidia-dali-cuda120")}


# ----------------------------------------------------------------------------------------------- the chains


def seed_albumentations(size: int, normalize: bool = True):
    """The seed's chain in albumentations 2 (``Flip`` and ``ShiftScaleRotate`` have become the equivalents)."""
    import albumentations as A
    import cv2

    steps = [
        A.OneOf([A.VerticalFlip(p=1), A.HorizontalFlip(p=1),
                 A.Compose([A.VerticalFlip(p=1), A.HorizontalFlip(p=1)])], p=0.75),
        A.OneOf([A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=1),
                 A.RandomGamma(gamma_limit=(80, 120), p=1),
                 A.HueSaturationValue(hue_shift_limit=0, sat_shift_limit=20, val_shift_limit=50, p=1)], p=0.5),
        A.OneOf([A.GaussianBlur(blur_limit=(3, 7), p=1), A.Blur(blur_limit=(3, 7), p=1),
                 A.MedianBlur(blur_limit=(3, 7), p=1)], p=0.5),
        A.OneOf([A.RandomResizedCrop(size=(size, size), scale=(0.5, 1.0), p=0.25),
                 A.Affine(translate_percent=(-0.0625, 0.0625), scale=(0.8, 1.2), rotate=(-45, 45),
                          border_mode=cv2.BORDER_REFLECT_101, p=0.75)], p=0.5),
    ]
    if normalize:
        from albumentations.pytorch import ToTensorV2

        steps += [A.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD), ToTensorV2()]
    return A.Compose(steps)


class _SeedDataset(torch.utils.data.Dataset):
    """What the seed's Dataset did: cv2.imread, resize only if needed, the albumentations chain."""

    def __init__(self, index: Index, size: int, transform, uint8_chw: bool = False):
        self.paths, self.labels, self.size, self.transform, self.uint8_chw = index.paths, index.labels, size, \
            transform, uint8_chw

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        import cv2

        img = cv2.cvtColor(cv2.imread(self.paths[i], cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        if img.shape[:2] != (self.size, self.size):
            img = cv2.resize(img, (self.size, self.size), interpolation=cv2.INTER_AREA)
        out = self.transform(image=img)["image"]
        if self.uint8_chw:
            out = torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1)))
        return out, int(self.labels[i])


def _torchvision_chain(size: int):
    from torchvision.transforms import v2

    def blur(k):
        return v2.GaussianBlur(k, sigma=0.3 * ((k - 1) * 0.5 - 1) + 0.8)

    flips = v2.RandomChoice([v2.RandomVerticalFlip(1.0), v2.RandomHorizontalFlip(1.0),
                             v2.Compose([v2.RandomVerticalFlip(1.0), v2.RandomHorizontalFlip(1.0)])])
    colour = v2.RandomChoice([v2.ColorJitter(brightness=0.2, contrast=0.2),
                              v2.Lambda(lambda x: v2.functional.adjust_gamma(x, float(np.random.uniform(0.8, 1.2)))),
                              v2.ColorJitter(saturation=0.157, brightness=0.196)])
    blurs = v2.RandomChoice([blur(3), blur(5), blur(7)])
    geo = v2.RandomChoice([v2.RandomResizedCrop(size, scale=(0.5, 1.0), antialias=False),
                           v2.RandomAffine(degrees=45, translate=(0.0625, 0.0625), scale=(0.8, 1.2))], p=[0.25, 0.75])
    return v2.Compose([v2.RandomApply([flips], p=0.75), v2.RandomApply([colour], p=0.5),
                       v2.RandomApply([blurs], p=0.5), v2.RandomApply([geo], p=0.5)])


class _TorchvisionDataset(torch.utils.data.Dataset):
    def __init__(self, index: Index, size: int):
        self.paths, self.labels, self.size = index.paths, index.labels, size
        self.chain = _torchvision_chain(size)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from torchvision.io import ImageReadMode, decode_image, read_file
        from torchvision.transforms.v2 import functional as TF

        img = decode_image(read_file(self.paths[i]), mode=ImageReadMode.RGB)
        if img.shape[1:] != (self.size, self.size):
            img = TF.resize(img, [self.size, self.size], antialias=True)
        return self.chain(img), int(self.labels[i])


# ----------------------------------------------------------------------------------------------- variants


def _normalizer(device):
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
    inv_std = 1 / (torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255)
    return lambda u8: ((u8.float() - mean) * inv_std).contiguous(memory_format=torch.channels_last)


def variant_epochs(name: str, index: Index, *, batch: int, size: int, cpus: int, device: torch.device, seed: int = 0):
    """A function ``epoch -> iterator of batches on the device`` for one variant."""
    gpu = device.type == "cuda"
    if name in ("fastsort", "dali"):
        backend = "auto" if name == "fastsort" else "dali"
        loader = make_loader(index, batch_size=batch, image_size=size, train=True, backend=backend, device=str(device),
                             precision="bf16" if gpu else "fp32", seed=seed, workers=cpus)
        return lambda e: (x for x, _ in loader.epoch(e))
    if name == "decode-cv2":
        return _cv2_decode_only(index, batch, size, cpus, seed)
    if name == "decode-dali":
        return _dali_decode_only(index, batch, size, cpus, device, seed)
    if name in ("seed", "timm", "torchvision"):
        return _dataloader_variant(name, index, batch, size, cpus, device)
    raise ValueError(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")


def _dataloader_variant(name, index, batch, size, cpus, device):
    gpu = device.type == "cuda"
    if name == "seed":
        dl = torch.utils.data.DataLoader(_SeedDataset(index, size, seed_albumentations(size)), batch_size=batch,
                                         shuffle=True, drop_last=False, num_workers=cpus, pin_memory=gpu)
        return lambda e: (x.to(device, non_blocking=True) for x, _ in dl)
    if name == "timm":
        from timm.data import create_loader

        ds = _SeedDataset(index, size, seed_albumentations(size, normalize=False), uint8_chw=True)
        dl = create_loader(ds, input_size=(3, size, size), batch_size=batch, is_training=True, use_prefetcher=gpu,
                           num_workers=cpus, device=device, pin_memory=gpu, persistent_workers=False)
        ds.transform = seed_albumentations(size, normalize=False)  # create_loader installs its own; use the seed's
        if gpu:  # timm's PrefetchLoader normalises on the GPU
            return lambda e: (x for x, _ in dl)
        norm = _normalizer(device)
        return lambda e: (norm(x) for x, _ in dl)
    ds = _TorchvisionDataset(index, size)
    dl = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=cpus, pin_memory=gpu)
    norm = _normalizer(device)
    return lambda e: (norm(x.to(device, non_blocking=True)) for x, _ in dl)


def _cv2_decode_only(index, batch, size, cpus, seed):
    """The threads path's decoder (and its skip-if-same-size resize) in the same thread pool, nothing else."""
    from concurrent.futures import ThreadPoolExecutor

    import cv2

    from .loader import decode_resize_cv2

    def epoch(e):
        cv2.setNumThreads(1)
        with ThreadPoolExecutor(cpus) as pool:
            for b in batch_positions(len(index), batch, shuffle=True, seed=seed, epoch=e):
                images = list(pool.map(lambda i: decode_resize_cv2(index.paths[i], size), b))
                yield torch.empty(len(images), 0)

    return epoch


def _dali_decode_only(index, batch, size, cpus, device, seed):
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def
    from nvidia.dali.plugin.pytorch import feed_ndarray

    gpu = device.type == "cuda"

    @pipeline_def
    def decode(source):
        enc = fn.external_source(source=source, batch=True)
        return fn.decoders.image(enc, device="mixed" if gpu else "cpu", output_type=types.RGB)

    def epoch(e):
        batches = batch_positions(len(index), batch, shuffle=True, seed=seed, epoch=e)
        src = iter([[np.fromfile(index.paths[i], dtype=np.uint8) for i in b] for b in batches])
        pipe = decode(source=lambda: next(src), batch_size=max(len(b) for b in batches), num_threads=cpus,
                      device_id=(device.index or 0) if gpu else None, prefetch_queue_depth=2)
        pipe.build()
        for b in batches:
            (out,) = pipe.run()
            if not out.is_dense_tensor():  # files of several sizes: the decode is the work; nothing to stack
                yield torch.empty(len(b), 0)
                continue
            t = out.as_tensor()
            if gpu:
                x = torch.empty(t.shape(), dtype=torch.uint8, device=device)
                feed_ndarray(t, x, cuda_stream=torch.cuda.current_stream(device))
                yield x
            else:
                yield torch.from_numpy(np.array(t))
        del pipe

    return epoch


# ----------------------------------------------------------------------------------------------- child


def run_variant(name: str, data: str, *, batch: int, size: int, cpus: int, epochs: int, device: str,
                limit: int = 0) -> dict:
    """Warm-up epoch + ``epochs`` timed epochs of one variant, in this process."""
    dev = torch.device(device)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:cpus])
    torch.set_num_threads(cpus)
    index = load_dataset(data).index
    if limit:
        index = index.subset(range(min(limit, len(index))))
    epochs_fn = variant_epochs(name, index, batch=batch, size=size, cpus=cpus, device=dev)
    gpu_sampler = _GpuSampler() if dev.type == "cuda" else None
    times, counts = [], []
    cpu0 = None
    for e in range(epochs + 1):
        if e == 1:
            cpu0 = _cpu_seconds()
            if gpu_sampler:
                gpu_sampler.start()
        n, t0 = 0, time.perf_counter()
        for x in epochs_fn(e):
            n += x.shape[0]
        sync(dev)  # the last batch's device work belongs to this epoch's time
        if e:  # epoch 0 is the warm-up
            times.append(time.perf_counter() - t0)
            counts.append(n)
    cpu_s = _cpu_seconds() - cpu0
    out = {"variant": name, "images_per_epoch": counts[0], "epoch_s": times,
           "img_per_s": statistics.median(c / t for c, t in zip(counts, times)),
           "cpu_ms_per_img": 1000 * cpu_s / max(sum(counts), 1),
           "peak_rss_mib": max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                               resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024}
    if gpu_sampler:
        out.update(gpu_sampler.stop())
        out["gpu_peak_alloc_mib"] = torch.cuda.max_memory_allocated(dev) / 2**20
    return out


def _cpu_seconds() -> float:
    """User + system CPU of this process and of its joined children (DataLoader workers end with each epoch)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


class _GpuSampler:
    """GPU utilisation and memory, sampled from nvidia-smi every 0.5 s while the timed epochs run."""

    def __init__(self):
        self.samples, self.proc = [], None

    def start(self):
        try:
            self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used",
                                          "--format=csv,noheader,nounits", "-lms", "500"], stdout=subprocess.PIPE,
                                         text=True)
        except OSError:
            self.proc = None

    def stop(self) -> dict:
        if not self.proc:
            return {}
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=5)
        rows = [tuple(float(v) for v in line.split(",")[:2]) for line in out.splitlines() if line.strip()]
        if not rows:
            return {}
        return {"gpu_util_pct": statistics.median(r[0] for r in rows), "gpu_mem_used_mib": max(r[1] for r in rows)}


# ----------------------------------------------------------------------------------------------- parent


def missing_library(name: str) -> str | None:
    if name not in NEEDS:
        return None
    import importlib.util

    module, how = NEEDS[name]
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        found = False
    return None if found else f"{module} is not installed ({how})"


def check_inputs(data: str, cpus: int) -> Index:
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if cpus < 1 or cpus > available:
        raise DataError(f"--cpus {cpus}: this machine gives this process {available} core(s); use 1..{available}")
    path = Path(data)
    if not path.exists():
        raise DataError(f"benchmark data not found: {path}; make it with `python tools/make_bench_data.py` "
                        "(see benchmarks/README.md)")
    index = load_dataset(path).index
    if len(index) == 0:
        raise DataError(f"benchmark data {path} holds no images")
    return index


def bench_loader(data: str, *, variants: list[str], batch: int = 64, size: int = 384, cpus: int = 0, epochs: int = 3,
                 device: str = "cpu", limit: int = 0, timeout: float = 1800,
                 progress: Callable[[str], None] | None = None) -> list[dict]:
    """Run each variant in its own child process; a failing or missing variant becomes a 'skipped' row."""
    rows = []
    for name in variants:
        reason = missing_library(name)
        if reason:
            rows.append({"variant": name, "skipped": reason})
            continue
        if progress:
            progress(name)
        cmd = [sys.executable, "-m", "fastsort.bench_loader", name, data, "--batch", str(batch), "--size", str(size),
               "--cpus", str(cpus), "--epochs", str(epochs), "--device", device, "--limit", str(limit)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            rows.append({"variant": name, "skipped": f"timed out after {timeout:.0f} s"})
            continue
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            rows.append({"variant": name, "skipped": f"failed: {last[:300]}"})
            continue
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return rows


def mix_cost(batch: int, size: int, device: torch.device, iters: int = 10) -> dict:
    """Batch CutMix/GridMask on the device, timed apart from the loaders (every variant would add it)."""
    from .augment import mix_batch
    from .bench import time_median

    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=device)
    t = time_median(lambda: mix_batch(x, y, 10), device, warmup=2, iters=iters)
    return {"ms_per_batch": 1000 * t["median_s"], "img_per_s": batch / t["median_s"]}


def loader_markdown(results: dict) -> str:
    m, p = results["machine"], results["params"]
    where = m.get("gpu") or f"CPU, {p['cpus']} of {m['host_cpus']} cores"
    rows = [r for r in results["rows"] if "img_per_s" in r]
    base = next((r["img_per_s"] for r in rows if r["variant"] == "seed"), None)
    lines = [f"`{results['command']}` — {p['data']} ({results['images']} images), batch {p['batch']}, {p['size']} px, "
             f"{where}, median of {p['epochs']} epochs after a warm-up; {m['date'][:10]}, commit {m.get('git_commit')}.",
             "", "| variant | img/s | × seed loader | CPU-ms/img | peak RSS MiB |"
             + (" GPU util % | GPU MiB |" if m.get("gpu") else ""),
             "|---|---:|---:|---:|---:|" + ("---:|---:|" if m.get("gpu") else "")]
    for r in results["rows"]:
        if "skipped" in r:
            lines.append(f"| {r['variant']} | skipped: {r['skipped']} | | | |" + (" | |" if m.get("gpu") else ""))
            continue
        ratio = f"{r['img_per_s'] / base:.2f}" if base else "–"
        line = f"| {r['variant']} | {r['img_per_s']:.0f} | {ratio} | {r['cpu_ms_per_img']:.2f} | {r['peak_rss_mib']:.0f} |"
        if m.get("gpu"):
            line += f" {r.get('gpu_util_pct', '–')} | {r.get('gpu_mem_used_mib', '–')} |"
        lines.append(line)
    mix = results.get("mix")
    if mix:
        lines += ["", f"Batch CutMix/GridMask on {m['device']}: {mix['ms_per_batch']:.1f} ms per batch of "
                      f"{p['batch']} ({mix['img_per_s']:.0f} img/s), reported apart from the loaders."]
    return "\n".join(lines) + "\n"


def bar_chart(results: dict, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["rows"] if "img_per_s" in r]
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(rows) + 1.2))
    names = [r["variant"] for r in rows][::-1]
    values = [r["img_per_s"] for r in rows][::-1]
    ax.barh(names, values, color=["#d62728" if n == "fastsort" else "#1f77b4" for n in names])
    for y, v in enumerate(values):
        ax.text(v, y, f" {v:.0f}", va="center")
    ax.set_xlabel("images / s (median)")
    ax.set_title(f"{Path(results['params']['data']).name}: batch {results['params']['batch']}, "
                 f"{results['params']['size']} px, {results['params']['cpus']} CPU(s)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _main(argv: list[str]) -> None:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m fastsort.bench_loader", description="one loader variant (a child)")
    ap.add_argument("variant", choices=VARIANTS)
    ap.add_argument("data")
    for flag, default in (("--batch", 64), ("--size", 384), ("--cpus", 1), ("--epochs", 3), ("--limit", 0)):
        ap.add_argument(flag, type=int, default=default)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args(argv)
    row = run_variant(a.variant, a.data, batch=a.batch, size=a.size, cpus=a.cpus, epochs=a.epochs, device=a.device,
                      limit=a.limit)
    print(json.dumps(row))


if __name__ == "__main__":
    _main(sys.argv[1:])
