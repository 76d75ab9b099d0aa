"""``fastsort preprocess``: resize a dataset once, keeping its layout (the seed's step, done right).

The seed's notebook squashed each image to a square with OpenCV's default bilinear filter (its Lanczos
flag sat in the wrong argument) and wrote PIL's RGB array with ``cv2.imwrite``, which swapped red and
blue on disk. Here: area averaging where an axis shrinks (antialiased), bilinear where it grows, no
resize when the size is already right, and colours written in the order the format expects. Every
image is written as 3-channel RGB (grey replicated), the form every loader decodes to.

The tree is mirrored: each image under SRC becomes DST/<same path>.<jpg|png>; each CSV is copied with
ids that carried an image extension rewritten to the new one; other files are copied. Everything is
written into a temporary sibling folder, renamed to DST only when complete.
"""

from __future__ import annotations

import csv
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from .index import IMAGE_EXTENSIONS, DataError

FORMATS = {"jpeg": ".jpg", "png": ".png"}


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def preprocess(src: str | Path, dst: str | Path, *, size: int = 384, fmt: str = "jpeg", quality: int = 95,
               workers: int = 0, force: bool = False, progress: Callable[[int, int], None] | None = None) -> dict:
    """Resize every image of ``src`` into ``dst``; returns counts. Raises ``DataError`` naming bad files."""
    import cv2

    from .loader import decode_resize_cv2

    src, dst = Path(src), Path(dst)
    if fmt not in FORMATS:
        raise DataError(f"--format must be jpeg or png, got {fmt!r}")
    if size < 1:
        raise DataError(f"--size must be positive, got {size}")
    if not src.is_dir():
        raise DataError(f"source folder not found: {src}")
    if dst.exists() and not force:
        raise DataError(f"{dst} already exists; pass --force to replace it")
    if dst.resolve() == src.resolve() or src.resolve() in dst.resolve().parents:
        raise DataError(f"destination {dst} must not be inside the source {src}")
    ext = FORMATS[fmt]
    files = sorted(p for p in src.rglob("*") if p.is_file() and not any(part.startswith(".") for part in
                                                                        p.relative_to(src).parts))
    images = [p for p in files if _is_image(p)]
    if not images:
        raise DataError(f"no images under {src}")
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if fmt == "jpeg" else [cv2.IMWRITE_PNG_COMPRESSION, 3]
    targets = {p: p.relative_to(src).with_suffix(ext) for p in images}
    clashes = _clashes(targets)
    if clashes:
        raise DataError(f"{len(clashes)} image(s) would overwrite each other in {dst}:", clashes[:20])

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    failures: list[str] = []

    def work(path: Path) -> None:
        try:
            img = decode_resize_cv2(str(path), size)
        except Exception as exc:
            failures.append(f"{path}: cannot decode ({type(exc).__name__}: {exc})")
            return
        out = tmp / targets[path]
        out.parent.mkdir(parents=True, exist_ok=True)
        ok, buf = cv2.imencode(ext, cv2.cvtColor(img, cv2.COLOR_RGB2BGR), params)  # OpenCV writes BGR
        if not ok:
            failures.append(f"{path}: could not encode as {fmt}")
            return
        buf.tofile(str(out))

    try:
        with ThreadPoolExecutor(workers or min(8, os.cpu_count() or 1)) as pool:
            for done, _ in enumerate(pool.map(work, images), 1):
                if progress:
                    progress(done, len(images))
        if failures:
            raise DataError(f"{len(failures)} image(s) could not be converted; nothing was written to {dst}:",
                            sorted(failures))
        csvs = 0
        for p in files:
            if p in targets:
                continue
            out = tmp / p.relative_to(src)
            out.parent.mkdir(parents=True, exist_ok=True)
            if p.suffix.lower() == ".csv":
                _rewrite_csv(p, out, ext)
                csvs += 1
            else:
                shutil.copy2(p, out)
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"images": len(images), "csv_files": csvs, "format": fmt, "size": size, "dst": str(dst)}


def _clashes(targets: dict) -> list[str]:
    seen, out = {}, []
    for src, rel in targets.items():
        key = str(rel).lower()
        if key in seen:
            out.append(f"{seen[key]} and {src} both become {rel}")
        seen[key] = src
    return out


def _rewrite_csv(src: Path, dst: Path, ext: str) -> None:
    """Copy a CSV, replacing an image extension at the end of any cell by ``ext``."""
    with open(src, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.reader(f))
    for row in rows[1:]:
        for i, cell in enumerate(row):
            stem, old = os.path.splitext(cell)
            if old.lower() in IMAGE_EXTENSIONS and stem:
                row[i] = stem + ext
    with open(dst, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)
