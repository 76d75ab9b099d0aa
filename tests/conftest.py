"""Tiny generated datasets (odd sizes, JPEG and PNG, grey and RGB) and the gpu marker."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def make_image(path: Path, size: tuple[int, int], seed: int, mode: str = "RGB") -> Path:
    """A smooth random image (so JPEG keeps it recognisable) of (height, width) in ``mode``."""
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = rng.uniform(0, 255, 3)
    img = np.stack([(base[c] + 80 * np.sin(xx / (5 + c) + yy / (7 + seed % 5))) % 256 for c in range(3)], -1)
    im = Image.fromarray(img.astype(np.uint8), "RGB")
    if mode != "RGB":
        im = im.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, quality=90) if path.suffix.lower() in (".jpg", ".jpeg") else im.save(path)
    return path


SIZES = [(37, 53), (64, 41), (90, 90), (23, 120), (71, 29), (48, 48)]


def write_folder_dataset(root: Path, per_class: int = 6, classes=("cat", "dog", "eel")) -> Path:
    k = 0
    for ci, name in enumerate(classes):
        for j in range(per_class):
            ext = ".png" if (j + ci) % 2 else ".jpg"
            mode = "L" if j % 3 == 0 else "RGB"
            make_image(root / name / f"{name}_{j}{ext}", SIZES[k % len(SIZES)], seed=k, mode=mode)
            k += 1
    return root


def write_csv_dataset(root: Path, n: int = 18, labels=None, with_ext: bool = False) -> Path:
    """``root/train.csv`` (image_id,label) + ``root/images``; label = i % 3 unless given."""
    rows = []
    for i in range(n):
        ext = ".png" if i % 2 else ".jpg"
        make_image(root / "images" / f"img{i:03d}{ext}", SIZES[i % len(SIZES)], seed=100 + i,
                   mode="L" if i % 4 == 0 else "RGB")
        label = labels[i] if labels is not None else i % 3
        rows.append((f"img{i:03d}{ext}" if with_ext else f"img{i:03d}", label))
    with open(root / "train.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_id", "label"])
        w.writerows(rows)
    return root / "train.csv"


@pytest.fixture
def folder_data(tmp_path) -> Path:
    return write_folder_dataset(tmp_path / "folder")


@pytest.fixture
def csv_data(tmp_path) -> Path:
    (tmp_path / "csvdata").mkdir()
    return write_csv_dataset(tmp_path / "csvdata")
