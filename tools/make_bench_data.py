#!/usr/bin/env python3
"""Make the loader benchmark's data from registry packages; nothing is downloaded from elsewhere.

Sets (under --out, default data/bench/):
  elpv-384-jpeg, elpv-384-png  all 2,624 ELPV cells (PyPI elpv-dataset) at 384 px, class folders 0-3
  fmnist-384-jpeg              Fashion-MNIST (Debian dataset-fashion-mnist; 70,000 photos) at 384 px,
                               10 class folders
  mixed-jpeg                   the ELPV cells re-encoded at 224-640 px, to exercise resizing

--quick makes 64 images per class (a CI-sized smoke set). Run with the project's venv:
  .venv/bin/python tools/make_bench_data.py [--quick] [--sets elpv,fmnist,mixed]
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FMNIST_CLASSES = ("tshirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                  "ankle_boot")
MIXED_SIZES = (224, 300, 384, 512, 640)


def elpv_class_folders(out: Path, per_class: int) -> Path:
    """ELPV as class folders of symlinks to the package's PNGs (label k = defect probability k/3)."""
    import elpv_dataset

    pkg = Path(elpv_dataset.__file__).parent / "data"
    out.mkdir(parents=True, exist_ok=True)
    counts: dict[int, int] = {}
    for line in (pkg / "labels.csv").read_text().splitlines():
        parts = line.split()
        if len(parts) < 2:
            continue
        label = int(round(float(parts[1]) * 3))
        if per_class and counts.get(label, 0) >= per_class:
            continue
        counts[label] = counts.get(label, 0) + 1
        (out / str(label)).mkdir(exist_ok=True)
        link = out / str(label) / Path(parts[0]).name
        if not link.exists():
            link.symlink_to(pkg / parts[0])
    return out


def fmnist(out: Path, size: int, per_class: int, workers: int) -> None:
    import cv2

    if not FMNIST_DIR.is_dir():
        if os.geteuid() == 0 and shutil.which("apt-get"):
            subprocess.run(["apt-get", "install", "-y", "-q", "dataset-fashion-mnist"], check=True)
        else:
            sys.exit("Fashion-MNIST comes from Debian: sudo apt-get install dataset-fashion-mnist")
    images, labels = [], []
    for split in ("train", "t10k"):
        with gzip.open(FMNIST_DIR / f"{split}-images-idx3-ubyte.gz") as f:
            images.append(np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28))
        with gzip.open(FMNIST_DIR / f"{split}-labels-idx1-ubyte.gz") as f:
            labels.append(np.frombuffer(f.read(), np.uint8, offset=8))
    images, labels = np.concatenate(images), np.concatenate(labels)
    keep = np.concatenate([np.flatnonzero(labels == c)[:per_class or None] for c in range(10)])
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    for name in FMNIST_CLASSES:
        (tmp / name).mkdir()

    def write(i: int) -> None:
        big = cv2.resize(images[i], (size, size), interpolation=cv2.INTER_CUBIC)  # upsampling: cubic
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(big, cv2.COLOR_GRAY2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
        buf.tofile(str(tmp / FMNIST_CLASSES[labels[i]] / f"{i:05d}.jpg"))

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(write, keep))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    print(f"{len(keep)} Fashion-MNIST images -> {out}")


def mixed(src: Path, out: Path, workers: int) -> None:
    """Re-encode each ELPV cell at one of several sizes (cycling), class folders kept."""
    import cv2

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    files = sorted(p for p in src.rglob("*.png"))

    def write(k: int) -> None:
        p = files[k]
        side = MIXED_SIZES[k % len(MIXED_SIZES)]
        img = cv2.imread(str(p), cv2.IMREAD_COLOR)
        interp = cv2.INTER_AREA if side < img.shape[0] else cv2.INTER_CUBIC
        img = cv2.resize(img, (side, side), interpolation=interp)
        target = tmp / p.parent.name / (p.stem + ".jpg")
        target.parent.mkdir(exist_ok=True)
        cv2.imwrite(str(target), img, [cv2.IMWRITE_JPEG_QUALITY, 95])

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(write, range(len(files))))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    print(f"{len(files)} mixed-size images ({', '.join(map(str, MIXED_SIZES))} px) -> {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="data/bench")
    ap.add_argument("--sets", default="elpv,fmnist,mixed")
    ap.add_argument("--size", type=int, default=384)
    ap.add_argument("--quick", action="store_true", help="64 images per class")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    a = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from fastsort.preprocess import preprocess

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    per_class = 64 if a.quick else 0
    suffix = "-quick" if a.quick else ""
    sets = set(a.sets.split(","))
    src = elpv_class_folders(out / f".elpv-src{suffix}", per_class)
    if "elpv" in sets:
        for fmt in ("jpeg", "png"):
            dst = out / f"elpv-{a.size}-{fmt}{suffix}"
            r = preprocess(src, dst, size=a.size, fmt=fmt, workers=a.workers, force=True)
            print(f"{r['images']} ELPV images -> {dst}")
    if "fmnist" in sets:
        fmnist(out / f"fmnist-{a.size}-jpeg{suffix}", a.size, per_class, a.workers)
    if "mixed" in sets:
        mixed(src, out / f"mixed-jpeg{suffix}", a.workers)


if __name__ == "__main__":
    main()
