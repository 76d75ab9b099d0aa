"""Real datasets from registry packages, written in the Haihua layout (CSV + image folder) under ``data/``."""

from __future__ import annotations

import csv
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

ELPV_README = """ELPV solar-cell electroluminescence images (Buerhop-Lutz et al. 2018; Deitsch et al. 2019),
from PyPI's elpv-dataset. Licence: CC BY-NC-SA 4.0 (non-commercial, share-alike). Do not commit or
redistribute these files.

label k means defect probability k/3 (0, 1/3, 2/3, 1).
train.csv        image_id,label   the training set (folds are drawn from it)
test.csv         image_id         a stratified 25% held-out set (seed {seed}), labels withheld
test_labels.csv  image_id,label   the held-out labels, kept apart for scoring
images/          the 2,624 original 300x300 grey PNGs
"""


def prepare_elpv(out: str | Path = "data/elpv", *, test_fraction: float = 0.25, seed: int = 2020,
                 force: bool = False) -> Path:
    """Write ELPV as ``out/{train.csv,test.csv,test_labels.csv,images/}``; a no-op if it is already there."""
    from sklearn.model_selection import train_test_split

    out = Path(out)
    if (out / "train.csv").is_file() and not force:
        return out
    try:
        import elpv_dataset
    except ImportError as exc:
        raise ImportError("the ELPV data comes from PyPI: pip install elpv-dataset") from exc
    src = Path(elpv_dataset.__file__).parent / "data"
    rows = []
    with open(src / "labels.csv") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2:
                rows.append((parts[0], float(parts[1])))
    ids = [Path(p).stem for p, _ in rows]
    labels = np.rint(np.array([prob for _, prob in rows]) * 3).astype(int)
    train_ids, test_ids, train_y, test_y = train_test_split(
        ids, labels, test_size=test_fraction, stratify=labels, random_state=seed)

    # Build everything in a temporary sibling folder, then rename: no half-written dataset is ever visible.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (tmp / "images").mkdir()
        for p, _ in rows:
            shutil.copy2(src / p, tmp / "images" / Path(p).name)
        _write_csv(tmp / "train.csv", ["image_id", "label"], zip(train_ids, train_y))
        _write_csv(tmp / "test.csv", ["image_id"], ((i,) for i in test_ids))
        _write_csv(tmp / "test_labels.csv", ["image_id", "label"], zip(test_ids, test_y))
        (tmp / "README.txt").write_text(ELPV_README.format(seed=seed))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_csv(path: Path, header: list[str], rows) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
