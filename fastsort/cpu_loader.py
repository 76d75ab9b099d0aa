"""The fastest CPU input path: one process, a thread pool of OpenCV uint8 ops, reused channels-last buffers.

Why not DALI or a DataLoader on the CPU: DALI's CPU operators are 3-10x slower than OpenCV's SIMD kernels
on these machines, and a DataLoader pays for float conversion per image, float collation and IPC
(``reference/cpu-loader-measurements.md``). Here each image stays uint8 from decode to the last op; the
per-image parameters come from the same sampler as every other backend (``sample_seed_chain``), so the
augmentation distribution is the seed's by construction; normalisation is one float lookup table per
channel written straight into a preallocated (B, S, S, 3) float batch, which read as NCHW is channels-last
without a copy. OpenCV releases the GIL, so threads run in parallel.

Exact rewrites of the seed chain (flip -> colour -> blur -> geometry) that save work:

* the flip moves to the end: colour ops are per-pixel and every blur kernel is symmetric, so they commute
  with it; through the geometry it is folded into the warp matrix (``M @ F``) or into a mirrored crop box,
  then applied to the uint8 result with ``cv2.flip`` (a memcpy-speed pass);
* a resize that changes nothing is skipped;
* decode goes straight to RGB (``IMREAD_COLOR_RGB``), grey files replicated to three channels (the
  reference loader shares this decoder).

A batch is a view of one buffer of a ring; it stays valid until the consumer asks for ``prefetch + 1``
more batches. The training loop uses each batch before asking for the next, which is all this needs.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Sequence

import numpy as np
import torch

from .index import DataError
from .loader import (BLUR_BOX, BLUR_GAUSS, BLUR_MEDIAN, COLOUR_BC, COLOUR_GAMMA, COLOUR_HSV, FLIP_H, FLIP_HV, FLIP_V,
                     GEO_RRC, GEO_SSR, decode_resize_cv2)

_CV2_FLIP = {FLIP_V: 0, FLIP_H: 1, FLIP_HV: -1}
_ARANGE = np.arange(256, dtype=np.float32)


def _flip_matrix(flip: int, size: int) -> np.ndarray:
    f = np.eye(3, dtype=np.float64)
    if flip in (FLIP_H, FLIP_HV):
        f[0, 0], f[0, 2] = -1.0, size - 1.0
    if flip in (FLIP_V, FLIP_HV):
        f[1, 1], f[1, 2] = -1.0, size - 1.0
    return f


def augment_uint8(img: np.ndarray, p: dict, i: int) -> np.ndarray:
    """The seed chain on one uint8 RGB image, reordered as the module docstring says; same result."""
    import cv2

    size = img.shape[0]
    colour = int(p["colour"][i])
    if colour == COLOUR_BC:
        img = cv2.LUT(img, np.clip(_ARANGE * p["alpha"][i] + p["beta"][i] * 255, 0, 255).astype(np.uint8))
    elif colour == COLOUR_GAMMA:
        img = cv2.LUT(img, np.clip(255 * (_ARANGE / 255.0) ** p["gamma"][i], 0, 255).astype(np.uint8))
    elif colour == COLOUR_HSV:
        hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
        lut = np.empty((256, 1, 3), dtype=np.uint8)
        lut[:, 0, 0] = np.arange(256)
        lut[:, 0, 1] = np.clip(np.arange(256) + np.int16(round(float(p["sat"][i]))), 0, 255)
        lut[:, 0, 2] = np.clip(np.arange(256) + np.int16(round(float(p["val"][i]))), 0, 255)
        img = cv2.cvtColor(cv2.LUT(hsv, lut), cv2.COLOR_HSV2RGB)
    blur, k = int(p["blur"][i]), int(p["ksize"][i])
    if blur == BLUR_GAUSS:
        img = cv2.GaussianBlur(img, (k, k), 0)
    elif blur == BLUR_BOX:
        img = cv2.blur(img, (k, k))
    elif blur == BLUR_MEDIAN:
        img = cv2.medianBlur(np.ascontiguousarray(img), k)
    flip, geo = int(p["flip"][i]), int(p["geo"][i])
    if geo == GEO_SSR:
        m = p["matrix"][i].astype(np.float64)
        if flip:  # warp(flip(x), M) == warp(x, M @ F): the flip costs nothing here
            m = (np.vstack([m, [0, 0, 1]]) @ _flip_matrix(flip, size))[:2]
        return cv2.warpAffine(img, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    if geo == GEO_RRC:
        y0, x0, h, w = (int(v) for v in p["crop"][i])
        if flip in (FLIP_V, FLIP_HV):  # the box on the flipped image is the mirrored box on this one
            y0 = size - y0 - h
        if flip in (FLIP_H, FLIP_HV):
            x0 = size - x0 - w
        img = cv2.resize(img[y0 : y0 + h, x0 : x0 + w], (size, size), interpolation=cv2.INTER_LINEAR)
    return cv2.flip(img, _CV2_FLIP[flip]) if flip else img


def normalize_lut(mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(256, 1, 3) float32: value v of channel c -> (v / 255 - mean[c]) / std[c]."""
    lut = (_ARANGE[:, None] / 255.0 - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(lut.reshape(256, 1, 3).astype(np.float32))


def thread_batches(paths: Sequence[str], batches: list[np.ndarray], params: dict | None, *, size: int, mean, std,
                   threads: int = 0, prefetch: int = 2) -> Iterator[torch.Tensor]:
    """Yield one (B, 3, S, S) float32 channels-last batch per entry of ``batches`` (see the module docstring)."""
    import cv2

    threads = threads or min(4, os.cpu_count() or 1)
    lut = normalize_lut(mean, std)
    max_b = max((len(b) for b in batches), default=1)
    ring = [torch.empty((max_b, size, size, 3), dtype=torch.float32) for _ in range(prefetch + 1)]
    views = [r.numpy() for r in ring]

    def work(slot: int, j: int, pos: int) -> None:
        try:
            img = decode_resize_cv2(paths[pos], size)
            if params is not None:
                img = augment_uint8(img, params, pos)
            cv2.LUT(img, lut, dst=views[slot][j])
        except Exception as exc:  # name the file: a pre-flight scan passed, so this is new breakage
            raise DataError(f"{paths[pos]}: could not load ({type(exc).__name__}: {exc})") from exc

    def submit(pool, b: int):
        slot = b % len(ring)
        return [pool.submit(work, slot, j, int(pos)) for j, pos in enumerate(batches[b])]

    # OpenCV's own thread pool would oversubscribe the cores this pool already fills.
    previous = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        with ThreadPoolExecutor(threads, thread_name_prefix="fastsort-cpu") as pool:
            pending = [submit(pool, b) for b in range(min(prefetch, len(batches)))]
            for b in range(len(batches)):
                if b + prefetch < len(batches):
                    pending.append(submit(pool, b + prefetch))
                for f in pending.pop(0):
                    f.result()  # re-raises a worker's error here, naming nothing lost
                n = len(batches[b])
                yield ring[b % len(ring)][:n].permute(0, 3, 1, 2)
    finally:
        cv2.setNumThreads(previous)
