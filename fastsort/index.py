"""Dataset index: which files, which labels, which folds, and the pre-flight scan that runs before training.

Two layouts are read:

* class folders: ``ROOT/<class>/**/<image>``; images in sub-folders count for the top-level class;
* a CSV of ``image_id,label`` beside an image folder (the Haihua 2020 layout); ids may carry a file
  extension or not; labels may be integers (mapped in numeric order) or strings (sorted), with padding
  spaces stripped.

Every problem is collected with the file, row or value it concerns, so a user sees all of them at once.
"""

from __future__ import annotations

import csv
import io
import json
import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


class DataWarning(UserWarning):
    """Something in the data was left out on purpose (an empty folder, loose files); said once, by name."""


class DataError(ValueError):
    """Bad input data. ``problems`` holds one line per offending file, row or value."""

    def __init__(self, summary: str, problems: Sequence[str] = ()):
        self.summary = summary
        self.problems = list(problems)
        lines = [summary] + [f"  - {p}" for p in self.problems]
        super().__init__("\n".join(lines))


@dataclass(frozen=True)
class Index:
    """An ordered list of images with integer labels (-1 = unlabelled) and the class names they index."""

    paths: tuple[str, ...]
    labels: np.ndarray
    classes: tuple[str, ...]
    ids: tuple[str, ...]
    origins: tuple[str, ...] = field(default=())  # where each sample came from, for messages ("train.csv line 7")

    def __post_init__(self):
        labels = np.asarray(self.labels, dtype=np.int64)
        object.__setattr__(self, "labels", labels)
        if not self.origins:
            object.__setattr__(self, "origins", tuple(self.paths))
        n = len(self.paths)
        if not (len(labels) == len(self.ids) == len(self.origins) == n):
            raise ValueError("Index: paths, labels, ids and origins must have the same length")

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def subset(self, positions: Iterable[int]) -> "Index":
        pos = np.asarray(list(positions) if not isinstance(positions, np.ndarray) else positions, dtype=np.int64)
        return Index(
            paths=tuple(self.paths[i] for i in pos),
            labels=self.labels[pos],
            classes=self.classes,
            ids=tuple(self.ids[i] for i in pos),
            origins=tuple(self.origins[i] for i in pos),
        )

    def class_map(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.classes)}

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.labels[self.labels >= 0], minlength=self.num_classes)


def save_class_map(classes: Sequence[str], path: str | Path) -> None:
    """Write ``{"name": id}`` as JSON, atomically."""
    write_text_atomic(Path(path), json.dumps({c: i for i, c in enumerate(classes)}, indent=2, ensure_ascii=False))


def load_class_map(path: str | Path) -> tuple[str, ...]:
    mapping = json.loads(Path(path).read_text())
    return tuple(sorted(mapping, key=mapping.__getitem__))


def write_text_atomic(path: Path, text: str) -> None:
    """Write to a temporary name beside ``path`` and rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _is_image_name(name: str) -> bool:
    # Hidden files include macOS AppleDouble junk such as "._x.jpg", which is not an image.
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


# ----------------------------------------------------------------------------------------------- folders


@dataclass
class ScanResult:
    index: Index
    problems: list[str]  # fatal unless skipped (empty classes and the like)
    notes: list[str]  # informational (non-image files skipped, ...)


def scan_folder(root: str | Path) -> ScanResult:
    """Read a class-folder dataset: one sub-folder per class, images at any depth below it."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"data folder not found: {root}")
    if not root.is_dir():
        raise DataError(f"expected a folder of class folders or a CSV file, got: {root}")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    problems, notes, empty = [], [], []
    paths, labels, ids, classes = [], [], [], []
    for class_dir in class_dirs:
        files = []
        for dirpath, dirnames, filenames in os.walk(class_dir):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            files.extend(os.path.join(dirpath, f) for f in sorted(filenames) if _is_image_name(f))
        if not files:
            empty.append(class_dir.name)
            continue
        label = len(classes)
        classes.append(class_dir.name)
        for f in files:
            paths.append(os.path.abspath(f))
            labels.append(label)
            ids.append(os.path.relpath(f, root))
    if not class_dirs:
        loose = [f for f in os.listdir(root) if _is_image_name(f)]
        what = f"{len(loose)} images but no class folders" if loose else "no class folders"
        raise DataError(f"{root} has {what}: put each class's images in its own sub-folder, or pass a CSV")
    loose = sorted(f for f in os.listdir(root) if _is_image_name(f) and (root / f).is_file())
    if empty:
        notes.append(f"{len(empty)} folder(s) in {root} hold no images and are not classes: {', '.join(empty)}")
    if loose:
        notes.append(f"{len(loose)} image(s) directly in {root} belong to no class folder and are not used: "
                     f"{', '.join(loose[:10])}" + (" ..." if len(loose) > 10 else ""))
    for note in notes:
        warnings.warn(note, DataWarning, stacklevel=2)
    if len(classes) < 2:
        raise DataError(f"{root} has {len(classes)} class folder(s) with images ({', '.join(classes) or 'none'}); "
                        "at least 2 are needed", notes)
    index = Index(tuple(paths), np.asarray(labels, dtype=np.int64), tuple(classes), tuple(ids))
    return ScanResult(index, problems, notes)


# ----------------------------------------------------------------------------------------------- CSV


def _list_images(image_root: Path) -> tuple[set[str], dict[str, list[str]]]:
    names, by_stem = set(), {}
    for name in os.listdir(image_root):
        if _is_image_name(name):
            names.add(name)
            by_stem.setdefault(os.path.splitext(name)[0], []).append(name)
    return names, by_stem


def _class_names(raw_labels: Sequence[str]) -> tuple[str, ...]:
    unique = set(raw_labels)
    try:
        as_int = {int(s): s for s in unique}
    except ValueError:
        return tuple(sorted(unique))
    if len(as_int) != len(unique):  # "3" and "03" both present: keep them apart as strings
        return tuple(sorted(unique))
    return tuple(as_int[k] for k in sorted(as_int))


def read_csv(
    csv_path: str | Path,
    image_root: str | Path | None = None,
    *,
    id_col: str = "image_id",
    label_col: str | None = "label",
    classes: Sequence[str] | None = None,
) -> ScanResult:
    """Read a CSV of ids and labels beside an image folder.

    Args:
        csv_path: the CSV file (any dialect Python's csv module reads; a header row is required).
        image_root: folder holding the images; default ``<csv folder>/images`` if it exists, else the CSV's folder.
        id_col / label_col: column names. ``label_col=None`` reads an unlabelled (test) CSV.
        classes: a fixed class list (e.g. from a trained model); labels outside it are reported as unknown.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DataError(f"CSV file not found: {csv_path}")
    if image_root is None:
        image_root = csv_path.parent / "images" if (csv_path.parent / "images").is_dir() else csv_path.parent
    image_root = Path(image_root)
    if not image_root.is_dir():
        raise DataError(f"image folder not found: {image_root} (given for {csv_path})")

    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        wanted = [id_col] + ([label_col] if label_col else [])
        missing = [c for c in wanted if c not in header]
        if missing:
            raise DataError(
                f"{csv_path}: missing column(s) {', '.join(map(repr, missing))}; the header has {header}. "
                "Name the columns with --id-col / --label-col."
            )
        rows = [(reader.line_num, row) for row in reader]

    names, by_stem = _list_images(image_root)
    problems: list[str] = []
    seen: dict[str, tuple[int, str]] = {}
    seen_files: dict[str, tuple[int, str]] = {}
    kept: list[tuple[int, str, str, str]] = []  # line, id, file, raw label
    for line, row in rows:
        image_id = (row.get(id_col) or "").strip()
        raw = (row.get(label_col) or "").strip() if label_col else ""
        where = f"{csv_path.name} line {line}"
        if not image_id:
            problems.append(f"{where}: empty {id_col!r}")
            continue
        if label_col and not raw:
            problems.append(f"{where}: empty label for id {image_id!r}")
            continue
        if image_id in seen:
            first_line, first_label = seen[image_id]
            conflict = f"with label {first_label!r} vs {raw!r}" if first_label != raw else "(same label)"
            problems.append(f"{where}: duplicate id {image_id!r}, first on line {first_line} {conflict}")
            continue
        seen[image_id] = (line, raw)
        if image_id in names:
            file = image_id
        elif len(by_stem.get(image_id, ())) == 1:
            file = by_stem[image_id][0]
        elif image_id in by_stem:
            problems.append(f"{where}: id {image_id!r} matches several files: {sorted(by_stem[image_id])}")
            continue
        else:
            problems.append(f"{where}: no image file for id {image_id!r} in {image_root}")
            continue
        if file in seen_files:  # "x" and "x.jpg" name the same file
            first_line, first_label = seen_files[file]
            conflict = f"with label {first_label!r} vs {raw!r}" if first_label != raw else "(same label)"
            problems.append(f"{where}: id {image_id!r} names file {file!r} again, first on line {first_line} {conflict}")
            continue
        seen_files[file] = (line, raw)
        kept.append((line, image_id, file, raw))

    if label_col:
        if classes is None:
            classes = _class_names([k[3] for k in kept])
        class_ids = {c: i for i, c in enumerate(classes)}
        labels = []
        survivors = []
        for item in kept:
            if item[3] not in class_ids:
                problems.append(f"{csv_path.name} line {item[0]}: unknown label {item[3]!r} (known: {list(classes)})")
                continue
            survivors.append(item)
            labels.append(class_ids[item[3]])
        kept = survivors
    else:
        classes = tuple(classes or ())
        labels = [-1] * len(kept)
    index = Index(
        paths=tuple(str((image_root / k[2]).absolute()) for k in kept),
        labels=np.asarray(labels, dtype=np.int64),
        classes=tuple(classes),
        ids=tuple(k[1] for k in kept),
        origins=tuple(f"{csv_path.name} line {k[0]} ({image_root / k[2]})" for k in kept),
    )
    if not kept and not problems:
        problems.append(f"{csv_path}: no rows")
    return ScanResult(index, problems, [])


def load_dataset(
    data: str | Path,
    *,
    image_root: str | Path | None = None,
    id_col: str = "image_id",
    label_col: str | None = "label",
    classes: Sequence[str] | None = None,
) -> ScanResult:
    """Class folder or CSV, decided by what ``data`` is. A folder holding ``train.csv`` reads that CSV."""
    data = Path(data)
    if data.is_dir() and (data / "train.csv").is_file() and label_col:
        data = data / "train.csv"
    if data.suffix.lower() == ".csv" or data.is_file():
        return read_csv(data, image_root, id_col=id_col, label_col=label_col, classes=classes)
    result = scan_folder(data)
    if classes is not None and tuple(result.index.classes) != tuple(classes):
        unknown = sorted(set(result.index.classes) - set(classes))
        if unknown:
            result.problems.append(f"class folders not in the model's class map: {unknown}")
    return result


# ----------------------------------------------------------------------------------------------- folds


def stratified_folds(labels: np.ndarray, n_folds: int = 5, seed: int = 2020) -> np.ndarray:
    """Fold number (0..n_folds-1) of each sample, from scikit-learn's StratifiedKFold(shuffle=True)."""
    from sklearn.model_selection import StratifiedKFold

    labels = np.asarray(labels)
    counts = np.bincount(labels)
    counts = counts[counts > 0]
    if n_folds < 2:
        raise DataError(f"--n-folds must be at least 2, got {n_folds}")
    if counts.max(initial=0) < n_folds:
        raise DataError(f"every class has fewer than {n_folds} images; use fewer folds (--n-folds)")
    folds = np.empty(len(labels), dtype=np.int64)
    with warnings.catch_warnings():
        # A class smaller than n_folds only means some validation folds lack it; the caller reports that.
        warnings.filterwarnings("ignore", message="The least populated class")
        splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        for k, (_, val) in enumerate(splitter.split(np.zeros(len(labels)), labels)):
            folds[val] = k
    return folds


def split_fold(index: Index, fold: int, n_folds: int = 5, seed: int = 2020) -> tuple[Index, Index, np.ndarray]:
    """(train part, validation part, fold of every sample) for fold ``fold``."""
    if not 0 <= fold < n_folds:
        raise DataError(f"--fold must be in 0..{n_folds - 1}, got {fold}")
    folds = stratified_folds(index.labels, n_folds, seed)
    return index.subset(np.flatnonzero(folds != fold)), index.subset(np.flatnonzero(folds == fold)), folds


# ----------------------------------------------------------------------------------------------- pre-flight


@dataclass
class Preflight:
    index: Index  # what survives; paths of converted files point at their normalised RGB copies
    problems: list[str]  # everything wrong, by file or row
    skipped: int  # samples dropped under skip_bad
    sizes: np.ndarray  # (N, 2) height, width of every surviving image
    notes: list[str]
    bad_files: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) of every undecodable file
    converted: int = 0  # files read through a normalised RGB copy (alpha, 16-bit, palette, ...)
    other_problems: list[str] = field(default_factory=list)  # problems that are not an undecodable file


# Files the loaders' decoders (OpenCV, DALI) read alike: 8-bit grey or RGB without transparency. Every other
# mode is converted once, by Pillow, into an RGB PNG in the cache, and all loaders read that copy.
PLAIN_MODES = ("L", "RGB")
BACKGROUND = (255, 255, 255)  # transparent pixels are composited on white


def rgb_cache_dir() -> Path:
    """Where normalised RGB copies live: ``$FASTSORT_CACHE/rgb``, default ``~/.cache/fastsort/rgb``."""
    base = os.environ.get("FASTSORT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fastsort")
    return Path(base) / "rgb"


def _needs_rgb_copy(im) -> bool:
    """True unless the file is 8-bit grey/RGB without transparency; decided from the header, no decode."""
    if im.mode not in PLAIN_MODES or "transparency" in im.info:
        return True
    if im.format == "PNG" and im.tile:  # a 16-bit RGB PNG opens as mode RGB with raw mode "RGB;16B"
        raw = im.tile[0][3]
        return (raw[0] if isinstance(raw, tuple) else raw) not in PLAIN_MODES
    return False


def to_rgb_array(path: str) -> np.ndarray:
    """Decode any mode to (H, W, 3) uint8: alpha composited on ``BACKGROUND``, 16-bit scaled by 1/257."""
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
            # 16-bit grey (Pillow reads 16-bit PNG as I;16 or I): v -> v/257 keeps the full range.
            grey = np.clip(np.rint(np.asarray(im, dtype=np.float64) / 257.0), 0, 255).astype(np.uint8)
            return np.repeat(grey[:, :, None], 3, axis=2)
        if im.mode in PLAIN_MODES and "transparency" not in im.info:
            return np.asarray(im.convert("RGB"))
        rgba = np.asarray(im.convert("RGBA"), dtype=np.uint32)  # palette/grey transparency become alpha here
    rgb, alpha = rgba[:, :, :3], rgba[:, :, 3:]
    bg = np.asarray(BACKGROUND, dtype=np.uint32)
    return ((rgb * alpha + bg * (255 - alpha) + 127) // 255).astype(np.uint8)


def rgb_copy(path: str, cache: Path) -> str:
    """Path of the normalised RGB PNG copy of ``path`` (made once; named by a hash of the file's bytes)."""
    import hashlib

    from PIL import Image

    digest = hashlib.sha1(Path(path).read_bytes()).hexdigest()
    out = cache / f"{digest}.png"
    if not out.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = cache / f".{digest}.tmp{os.getpid()}.{threading.get_ident()}.png"
        Image.fromarray(to_rgb_array(path), "RGB").save(tmp, compress_level=1)
        os.replace(tmp, out)
    return str(out)


def probe_image(path: str, cache: Path | None = None) -> tuple[int, int, str] | str:
    """(height, width, path to read) of a fully decodable image, or a string saying why it is not.

    The path to read is ``path`` itself for 8-bit grey/RGB files, else its normalised RGB copy in ``cache``.
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            w, h = im.size
            if im.format not in ("JPEG", "PNG", "BMP", "TIFF", "WEBP", "MPO"):
                return f"unsupported image format {im.format}"
            convert = _needs_rgb_copy(im)
            if im.format == "JPEG" and not convert:
                im.draft("RGB", (max(1, w // 8), max(1, h // 8)))  # decode at 1/8 scale, still reads every byte
            im.load()
        if w < 1 or h < 1:
            return f"empty image ({w}x{h})"
        read = rgb_copy(path, cache or rgb_cache_dir()) if convert else path
    except FileNotFoundError:
        return "file not found"
    except Exception as exc:  # PIL raises many types for corrupt data
        return f"cannot decode ({type(exc).__name__}: {exc})"
    return h, w, read


def preflight(
    scan: ScanResult,
    *,
    skip_bad: bool = False,
    workers: int | None = None,
    progress: Callable[[int], None] | None = None,
    report: str | Path | None = None,
    cache: str | Path | None = None,
) -> Preflight:
    """Decode-check every file and gather every problem; raise ``DataError`` listing them unless ``skip_bad``.

    Files that are not 8-bit grey/RGB (alpha, palette, 16-bit, CMYK, ...) get a normalised RGB copy in
    ``cache`` (default ``rgb_cache_dir()``) that every loader reads instead. With ``report``, the skipped
    files and rows are written there as a CSV (path, reason), atomically, even when nothing was skipped.
    """
    index = scan.index
    workers = workers or min(8, os.cpu_count() or 1)
    cache = Path(cache) if cache else rgb_cache_dir()
    problems = list(scan.problems)
    results: list = [None] * len(index)
    with ThreadPoolExecutor(workers) as pool:
        for i, r in enumerate(pool.map(lambda p: probe_image(p, cache), index.paths, chunksize=16)):
            results[i] = r
            if progress and (i + 1) % 64 == 0:
                progress(64)
    if progress:
        progress(len(index) % 64)
    good, bad_files = [], []
    for i, r in enumerate(results):
        if isinstance(r, str):
            problems.append(f"{index.origins[i]}: {r}")
            bad_files.append((index.paths[i], r))
        else:
            good.append(i)
    survivors = index.subset(good)
    read_paths = tuple(results[i][2] for i in good)
    converted = sum(a != b for a, b in zip(read_paths, survivors.paths))
    if converted:
        survivors = Index(read_paths, survivors.labels, survivors.classes, survivors.ids, survivors.origins)
    before = index.class_counts() if index.num_classes else np.zeros(0)
    after = survivors.class_counts() if survivors.num_classes else np.zeros(0)
    other = list(scan.problems)
    for name, n0, n in zip(survivors.classes, before, after):
        if n0 > 0 and n == 0:  # a class that had images and lost every one of them to bad files
            problems.append(f"class {name!r} has no usable images (all {n0} are bad)")
            other.append(problems[-1])
    if problems and not skip_bad:
        raise DataError(
            f"{len(problems)} problem(s) found before training; fix them or pass --bad-images skip "
            "(--skip-bad) to skip them:", problems
        )
    sizes = np.asarray([results[i][:2] for i in good], dtype=np.int64).reshape(-1, 2)
    checked = Preflight(survivors, problems, len(index) - len(survivors), sizes, list(scan.notes), bad_files,
                        converted, other)
    if report is not None:
        write_skip_report(Path(report), checked)
    return checked


def write_skip_report(path: Path, checked: Preflight) -> None:
    """``path,reason`` for every skipped file, then ``,problem`` for every other problem (rows, classes)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "reason"])
    w.writerows(checked.bad_files)
    w.writerows(("", p) for p in checked.other_problems)
    write_text_atomic(path, buf.getvalue())
