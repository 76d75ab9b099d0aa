"""Index -> batches of (images, labels) on the training device. All DALI code lives here.

Three backends yield the same thing, a float batch ``x`` of shape (B, 3, S, S) in channels-last memory
format and int64 labels ``y``, both on the requested device:

* ``dali``: an NVIDIA DALI pipeline. With a GPU, decode is ``mixed`` (nvJPEG / nvImageCodec) and every
  later op runs on the GPU; without one the very same graph is built from CPU operators
  (``device_id=None``).
* ``threads``: the fastest CPU path (``cpu_loader``): OpenCV uint8 ops in a thread pool, normalised by a
  lookup table into reused channels-last buffers.
* ``torch``: the plain-PyTorch reference, a ``DataLoader`` whose workers run the chain with OpenCV.

``auto`` picks ``dali`` on a GPU and ``threads`` on the CPU, which is what ``fastsort bench loader``
measured fastest on each.

Both draw the seed's per-image augmentation parameters from one sampler (``sample_seed_chain``) and get
them as data, so their augmentation distributions are the same by construction and a test can count op
rates exactly. Epoch ``e`` of a loader depends only on (seed, rank, e): its shuffle, its augmentation
parameters and the DALI pipeline's own seed. A resumed run therefore sees the batches an uninterrupted
run would have seen.

Epoch policy: every sample exactly once per epoch. Training batches come from a fresh seeded
permutation; when the last batch would hold a single sample it is merged into the one before it
(BatchNorm cannot train on one sample), so every epoch has the same batches count; fewer images than the
batch size make one batch of all of them. Evaluation keeps index order, with a short last batch.

Sharding (``world_size`` > 1, distributed training): the permutation is seeded by (seed, epoch) only, so
every rank draws the same one; it is cut into global batches of ``batch_size * world_size`` and each is
split across the ranks (``np.array_split``: parts differ by at most one sample). Every rank therefore runs
the same number of batches and, across ranks, every sample is seen exactly once per epoch -- nothing is
dropped or padded. A last global batch that would give some rank fewer than 2 samples is merged into the
one before it (the single-process rule above is the case ``world_size`` = 1). Evaluation gives rank r the
r-th contiguous part of the index. Augmentation parameters follow (seed, global rank, epoch), apart from
the shuffle.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from .index import DataError, Index

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The seed's chain (albumentations 0.4.5 semantics, see reference/seed-recipe.md §3.3).
FLIP_P = 0.75  # then V, H or both, uniformly
COLOUR_P, BLUR_P, GEO_P = 0.5, 0.5, 0.5  # each "one of" block fires with p .5, children uniform...
GEO_RRC_SHARE = 0.25  # ...except geometry: random-resized-crop 1 : shift-scale-rotate 3
BLUR_KERNELS = (3, 5, 7)

FLIP_NONE, FLIP_V, FLIP_H, FLIP_HV = 0, 1, 2, 3
COLOUR_NONE, COLOUR_BC, COLOUR_GAMMA, COLOUR_HSV = 0, 1, 2, 3
BLUR_NONE, BLUR_GAUSS, BLUR_BOX, BLUR_MEDIAN = 0, 1, 2, 3
GEO_NONE, GEO_RRC, GEO_SSR = 0, 1, 2


def epoch_rng(seed: int, *stream: int) -> np.random.Generator:
    """A NumPy generator for one named stream of one epoch, independent of any global state."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, *[int(s) & 0xFFFFFFFF for s in stream]])


def batch_positions(n: int, batch_size: int, *, shuffle: bool, seed: int = 0, epoch: int = 0, rank: int = 0,
                    world_size: int = 1) -> list[np.ndarray]:
    """Positions of each batch of one epoch for one rank (the module docstring gives the policy)."""
    if n == 0:
        return []
    if not shuffle:  # evaluation: rank r takes the r-th contiguous part, in index order, short last batch
        part = np.array_split(np.arange(n), world_size)[rank]
        return [part[i : i + batch_size] for i in range(0, len(part), batch_size)]
    # Training: one permutation shared by every rank (seeded by (seed, epoch) only), cut into global batches
    # of batch_size x world_size; each global batch is split across the ranks, so every rank has the same
    # number of batches and every sample is seen exactly once per epoch.
    order = epoch_rng(seed, epoch, 0).permutation(n)
    step = batch_size * world_size
    batches = [order[i : i + step] for i in range(0, n, step)]
    if len(batches) > 1 and len(batches[-1]) < 2 * world_size:
        tail = batches.pop()  # a rank would train on fewer than 2 samples (BatchNorm needs 2): merge it
        batches[-1] = np.concatenate([batches[-1], tail])
    return [np.array_split(b, world_size)[rank] for b in batches]


def gaussian_sigma(k: np.ndarray | int) -> np.ndarray:
    """OpenCV's sigma for a Gaussian kernel of size k when sigma=0 is given (what albumentations used)."""
    return 0.3 * ((np.asarray(k, dtype=np.float32) - 1) * 0.5 - 1) + 0.8


def sample_seed_chain(rng: np.random.Generator, n: int, size: int) -> dict[str, np.ndarray]:
    """Per-image parameters of the seed's augmentation chain for ``n`` images of ``size`` x ``size``."""
    u = rng.random((n, 4))
    p = {}
    p["flip"] = np.where(u[:, 0] < FLIP_P, 1 + rng.integers(0, 3, n), FLIP_NONE).astype(np.int32)
    p["colour"] = np.where(u[:, 1] < COLOUR_P, 1 + rng.integers(0, 3, n), COLOUR_NONE).astype(np.int32)
    p["alpha"] = rng.uniform(0.8, 1.2, n).astype(np.float32)  # contrast factor
    p["beta"] = rng.uniform(-0.2, 0.2, n).astype(np.float32)  # brightness, fraction of 255
    p["gamma"] = rng.uniform(0.8, 1.2, n).astype(np.float32)
    p["sat"] = rng.uniform(-20, 20, n).astype(np.float32)  # OpenCV 8-bit HSV units
    p["val"] = rng.uniform(-50, 50, n).astype(np.float32)
    p["blur"] = np.where(u[:, 2] < BLUR_P, 1 + rng.integers(0, 3, n), BLUR_NONE).astype(np.int32)
    p["ksize"] = np.asarray(BLUR_KERNELS, dtype=np.int32)[rng.integers(0, 3, n)]
    geo_child = np.where(rng.random(n) < GEO_RRC_SHARE, GEO_RRC, GEO_SSR)
    p["geo"] = np.where(u[:, 3] < GEO_P, geo_child, GEO_NONE).astype(np.int32)
    p["crop"] = _sample_rrc_boxes(rng, n, size)  # (n, 4): y0, x0, h, w
    p["matrix"] = _sample_ssr_matrices(rng, n, size)  # (n, 2, 3), forward map source -> output
    return p


def _sample_rrc_boxes(rng, n, size, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3), attempts=10) -> np.ndarray:
    """torchvision-style random-resized-crop boxes: up to 10 tries, then the whole (square) image."""
    area = size * size * rng.uniform(*scale, (n, attempts))
    log_r = rng.uniform(math.log(ratio[0]), math.log(ratio[1]), (n, attempts))
    w = np.rint(np.sqrt(area * np.exp(log_r))).astype(np.int64)
    h = np.rint(np.sqrt(area / np.exp(log_r))).astype(np.int64)
    ok = (w > 0) & (w <= size) & (h > 0) & (h <= size)
    first = np.argmax(ok, axis=1)
    any_ok = ok.any(axis=1)
    rows = np.arange(n)
    h = np.where(any_ok, h[rows, first], size)
    w = np.where(any_ok, w[rows, first], size)
    y0 = (rng.random(n) * (size - h + 1)).astype(np.int64)
    x0 = (rng.random(n) * (size - w + 1)).astype(np.int64)
    return np.stack([y0, x0, h, w], axis=1).astype(np.int32)


def _sample_ssr_matrices(rng, n, size, shift=0.0625, scale=(0.8, 1.2), degrees=45.0) -> np.ndarray:
    """Shift-scale-rotate about the image centre, as albumentations' ShiftScaleRotate builds it."""
    angle = np.deg2rad(rng.uniform(-degrees, degrees, n))
    s = rng.uniform(*scale, n)
    dx, dy = rng.uniform(-shift, shift, (2, n)) * size
    c = (size - 1) / 2.0
    a, b = s * np.cos(angle), s * np.sin(angle)
    # cv2.getRotationMatrix2D((c, c), deg, s) with the shift added to the translation column.
    m = np.empty((n, 2, 3), dtype=np.float32)
    m[:, 0, 0], m[:, 0, 1], m[:, 0, 2] = a, b, (1 - a) * c - b * c + dx
    m[:, 1, 0], m[:, 1, 1], m[:, 1, 2] = -b, a, b * c + (1 - a) * c + dy
    return m


# ----------------------------------------------------------------------------------------------- reference ops


def apply_seed_chain_cv2(img: np.ndarray, p: dict[str, np.ndarray], i: int) -> np.ndarray:
    """The seed chain on one uint8 RGB image with OpenCV, exactly as albumentations 0.4.5 did it."""
    import cv2

    size = img.shape[0]
    flip = int(p["flip"][i])
    if flip:
        img = cv2.flip(img, {FLIP_V: 0, FLIP_H: 1, FLIP_HV: -1}[flip])
    colour = int(p["colour"][i])
    if colour == COLOUR_BC:
        lut = np.clip(np.arange(256) * p["alpha"][i] + p["beta"][i] * 255, 0, 255)
        img = cv2.LUT(img, lut.astype(np.uint8))
    elif colour == COLOUR_GAMMA:
        lut = np.clip(255 * (np.arange(256) / 255.0) ** p["gamma"][i], 0, 255)
        img = cv2.LUT(img, lut.astype(np.uint8))
    elif colour == COLOUR_HSV:
        hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV).astype(np.int16)
        hsv[..., 1] += np.int16(round(float(p["sat"][i])))
        hsv[..., 2] += np.int16(round(float(p["val"][i])))
        img = cv2.cvtColor(np.clip(hsv, 0, 255).astype(np.uint8), cv2.COLOR_HSV2RGB)
    blur, k = int(p["blur"][i]), int(p["ksize"][i])
    if blur == BLUR_GAUSS:
        img = cv2.GaussianBlur(img, (k, k), 0)
    elif blur == BLUR_BOX:
        img = cv2.blur(img, (k, k))
    elif blur == BLUR_MEDIAN:
        img = cv2.medianBlur(np.ascontiguousarray(img), k)
    geo = int(p["geo"][i])
    if geo == GEO_RRC:
        y0, x0, h, w = (int(v) for v in p["crop"][i])
        img = cv2.resize(img[y0 : y0 + h, x0 : x0 + w], (size, size), interpolation=cv2.INTER_LINEAR)
    elif geo == GEO_SSR:
        img = cv2.warpAffine(
            img, p["matrix"][i], (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101
        )
    return np.ascontiguousarray(img)


def decode_resize_cv2(path: str, size: int) -> np.ndarray:
    """Decode any supported file to uint8 RGB and squash-resize it to size x size (see ``resize_square``)."""
    import cv2

    img = cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_COLOR_RGB)  # 3 channels, grey replicated
    if img is None:  # formats or modes OpenCV cannot read: fall back to Pillow
        from PIL import Image

        with Image.open(path) as im:
            img = np.asarray(im.convert("RGB"))
    return resize_square(img, size)


def resize_square(img: np.ndarray, size: int) -> np.ndarray:
    """Area averaging where an axis shrinks (antialiased, like DALI's resize), linear where it grows, and
    nothing at all when the image already has the size."""
    import cv2

    h, w = img.shape[:2]
    if h > size and w < size:
        img = cv2.resize(img, (w, size), interpolation=cv2.INTER_AREA)
    elif w > size and h < size:
        img = cv2.resize(img, (size, h), interpolation=cv2.INTER_AREA)
    h, w = img.shape[:2]
    if (h, w) != (size, size):
        shrink = h > size or w > size
        img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    return img


class _SeedChainDataset(torch.utils.data.Dataset):
    def __init__(self, paths: Sequence[str], size: int, params: dict | None):
        self.paths, self.size, self.params = paths, size, params

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, pos: int) -> np.ndarray:
        img = decode_resize_cv2(self.paths[pos], self.size)
        return apply_seed_chain_cv2(img, self.params, pos) if self.params is not None else img


def _stack_uint8(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images))  # (B, H, W, 3) uint8: 4x fewer bytes than float through IPC


# ----------------------------------------------------------------------------------------------- DALI graph


def _dali_pipeline_fn():
    """Build the @pipeline_def'd graph function. DALI is imported here, never at ``import fastsort``."""
    try:
        import nvidia.dali.fn as fn
        import nvidia.dali.math as dmath
        import nvidia.dali.types as types
        from nvidia.dali import pipeline_def
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the DALI backend needs NVIDIA DALI: pip install nvidia-dali-cuda120 (or use --no-dali)"
        ) from exc

    @pipeline_def(enable_conditionals=True)
    def seed_chain_pipeline(source, gpu: bool, size: int, train: bool, mean, std, half: bool):
        names = source.names
        nodes = dict(zip(names, fn.external_source(source=source, num_outputs=len(names), batch=True,
                                                   batch_info=True)))
        img = fn.decoders.image(nodes["encoded"], device="mixed" if gpu else "cpu", output_type=types.RGB)
        img = fn.resize(img, size=[size, size], interp_type=types.INTERP_LINEAR, antialias=True)
        if train:
            img = fn.flip(img, horizontal=nodes["flip_h"], vertical=nodes["flip_v"])
            colour = nodes["colour"]
            if colour == COLOUR_BC:
                # albumentations: alpha * x + beta * 255; DALI: shift*255 + brightness*(center + contrast*(x-center))
                img = fn.brightness_contrast(img, contrast=nodes["alpha"], contrast_center=0.0,
                                             brightness_shift=nodes["beta"])
            elif colour == COLOUR_GAMMA:
                img = fn.cast(dmath.pow(img / 255.0, nodes["gamma"]) * 255.0 + 0.5, dtype=types.UINT8)
            elif colour == COLOUR_HSV:
                # fn.hsv scales where albumentations shifted; the shift is mapped to a scale about mid-range.
                img = fn.hsv(img, saturation=1.0 + nodes["sat"] / 128.0, value=1.0 + nodes["val"] / 128.0)
            blur = nodes["blur"]
            if blur == BLUR_GAUSS:
                img = fn.gaussian_blur(img, window_size=nodes["ksize"], sigma=nodes["sigma"])
            elif blur == BLUR_BOX:
                img = fn.filter(img, nodes["box"].gpu() if gpu else nodes["box"])
            elif blur == BLUR_MEDIAN:
                if gpu:
                    k = nodes["ksize"]
                    if k == 3:
                        img = fn.experimental.median_blur(img, window_size=3)
                    elif k == 5:
                        img = fn.experimental.median_blur(img, window_size=5)
                    else:
                        img = fn.experimental.median_blur(img, window_size=7)
                else:
                    # DALI has no CPU median blur; the CPU graph uses the box filter of the same aperture.
                    img = fn.filter(img, nodes["box"])
            geo = nodes["geo"]
            if geo == GEO_RRC:
                img = fn.resize(img, size=[size, size], roi_start=nodes["roi_start"], roi_end=nodes["roi_end"],
                                roi_relative=False, interp_type=types.INTERP_LINEAR, antialias=False)
            elif geo == GEO_SSR:
                img = fn.warp_affine(img, matrix=nodes["matrix"], size=[size, size], inverse_map=False,
                                     interp_type=types.INTERP_LINEAR)
        return fn.crop_mirror_normalize(
            img,
            dtype=types.FLOAT16 if half else types.FLOAT,
            output_layout="HWC",  # HWC batch -> NCHW view with channels-last strides, no copy
            mean=[255.0 * m for m in mean],
            std=[255.0 * s for s in std],
        )

    return seed_chain_pipeline


class _DaliSource:
    """External source of one epoch: encoded bytes plus the per-image augmentation parameters as data."""

    def __init__(self, paths: Sequence[str], batches: list[np.ndarray], params: dict | None):
        self.paths, self.batches, self.params = paths, batches, params
        self.names = ["encoded"]
        if params is not None:
            self.names += ["flip_h", "flip_v", "colour", "alpha", "beta", "gamma", "sat", "val", "blur", "ksize",
                           "sigma", "box", "geo", "roi_start", "roi_end", "matrix"]

    def __call__(self, info):
        if info.iteration >= len(self.batches):
            raise StopIteration
        pos = self.batches[info.iteration]
        out = {"encoded": [np.fromfile(self.paths[i], dtype=np.uint8) for i in pos]}
        p = self.params
        if p is not None:
            flip, k = p["flip"][pos], p["ksize"][pos]
            scalar = lambda a: [np.asarray(v) for v in a]  # noqa: E731 - one 0-d array per sample
            out["flip_h"] = scalar(((flip == FLIP_H) | (flip == FLIP_HV)).astype(np.int32))
            out["flip_v"] = scalar(((flip == FLIP_V) | (flip == FLIP_HV)).astype(np.int32))
            for name in ("colour", "alpha", "beta", "gamma", "sat", "val", "blur", "ksize", "geo"):
                out[name] = scalar(p[name][pos])
            out["sigma"] = scalar(gaussian_sigma(k).astype(np.float32))
            out["box"] = [np.full((kk, kk), 1.0 / (kk * kk), dtype=np.float32) for kk in k]
            crop = p["crop"][pos].astype(np.float32)  # y0, x0, h, w
            rows = lambda a: [np.ascontiguousarray(r) for r in a]  # noqa: E731 - DALI wants dense samples
            out["roi_start"] = rows(crop[:, 0:2])  # DALI ROIs are given in (y, x) order for HWC
            out["roi_end"] = rows(crop[:, 0:2] + crop[:, 2:4])
            m = p["matrix"][pos].copy()
            # OpenCV puts pixel centres at integers, DALI at +0.5: t' = t + (I - A) @ (0.5, 0.5).
            m[:, :, 2] += 0.5 - 0.5 * m[:, :, :2].sum(axis=2)
            out["matrix"] = rows(m)
        return tuple(out[n] for n in self.names)


# ----------------------------------------------------------------------------------------------- the loader


BACKENDS = ("dali", "threads", "torch")


def resolve_device(device: str) -> torch.device:
    """'auto' picks CUDA when present; asking for CUDA without it is an error, not a silent CPU run."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DataError(f"--device {device} was asked for, but this machine has no usable CUDA device "
                        "(torch.cuda.is_available() is False); use --device cpu or --device auto")
    return dev


@dataclass
class Loader:
    """Batches of one index. Iterate ``loader.epoch(e)``; ``len(loader)`` is batches per epoch."""

    index: Index
    batch_size: int
    image_size: int
    train: bool
    backend: str = "dali"
    device: str = "cpu"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    dtype: torch.dtype = torch.float32
    seed: int = 2020
    rank: int = 0
    workers: int = 0
    world_size: int = 1

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"loader backend must be one of {list(BACKENDS)}, got {self.backend!r}")
        if self.batch_size < 1:
            raise DataError(f"batch size must be at least 1, got {self.batch_size}")
        if self.world_size > 1 and not 0 <= self.rank < self.world_size:  # world 1: rank seeds augmentation only
            raise ValueError(f"rank {self.rank} is outside world size {self.world_size}")
        if self.train and len(self.index) < 2 * self.world_size:
            raise DataError(f"a training loader needs at least 2 images per rank (BatchNorm cannot train on one): "
                            f"{len(self.index)} image(s) for {self.world_size} rank(s)")
        self.workers = self.workers or min(4, os.cpu_count() or 1)
        self._device = torch.device(self.device)

    def __len__(self) -> int:
        return len(self.batches(0))

    def batches(self, epoch: int) -> list[np.ndarray]:
        return batch_positions(len(self.index), self.batch_size, shuffle=self.train, seed=self.seed, epoch=epoch,
                               rank=self.rank if self.world_size > 1 else 0, world_size=self.world_size)

    def params(self, epoch: int) -> dict | None:
        """This epoch's augmentation parameters, one row per index position (None for evaluation)."""
        if not self.train:
            return None
        return sample_seed_chain(epoch_rng(self.seed, epoch, 1, self.rank), len(self.index), self.image_size)

    def epoch(self, epoch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches of epoch ``epoch``. Use (or ``.clone()``) each batch before asking for the next few: the
        threads backend reuses a small ring of buffers (see ``cpu_loader``)."""
        batches, params = self.batches(epoch), self.params(epoch)
        labels = torch.from_numpy(self.index.labels)
        if self.backend == "dali":
            source = self._dali_epoch(batches, params, epoch)
        elif self.backend == "threads":
            source = self._threads_epoch(batches, params)
        else:
            source = self._torch_epoch(batches, params)
        for pos, x in zip(batches, source):
            y = labels[torch.from_numpy(pos)].to(self._device, non_blocking=True)
            yield x, y

    # -- backends

    def _dali_epoch(self, batches, params, epoch) -> Iterator[torch.Tensor]:
        gpu = self._device.type == "cuda"
        pipe_fn = _dali_pipeline_fn()
        source = _DaliSource(self.index.paths, batches, params)
        max_batch = max((len(b) for b in batches), default=1)
        # The pipeline's own seed (DALI-internal randomness) also follows (seed, rank, epoch).
        pipe_seed = int(epoch_rng(self.seed, epoch, 2, self.rank).integers(0, 2**31 - 1))
        pipe = pipe_fn(
            source=source, gpu=gpu, size=self.image_size, train=self.train, mean=self.mean, std=self.std,
            half=gpu and self.dtype in (torch.float16, torch.bfloat16),
            batch_size=max_batch, num_threads=self.workers, device_id=(self._device.index or 0) if gpu else None,
            seed=pipe_seed, prefetch_queue_depth=2, exec_dynamic=True,
        )
        try:
            pipe.build()
            for _ in batches:
                (out,) = pipe.run()
                yield self._dali_to_torch(out, gpu)
        finally:
            del pipe  # release DALI buffers now, not at some later garbage collection

    def _dali_to_torch(self, out, gpu: bool) -> torch.Tensor:
        if gpu:
            from nvidia.dali.plugin.pytorch import feed_ndarray

            t = out.as_tensor()
            x = torch.empty(t.shape(), dtype=torch.float16 if self.dtype != torch.float32 else torch.float32,
                            device=self._device)
            feed_ndarray(t, x, cuda_stream=torch.cuda.current_stream(self._device))
        else:
            x = torch.from_numpy(np.array(out.as_tensor()))  # copy: DALI reuses its output buffers
        x = x.permute(0, 3, 1, 2)  # NHWC memory, NCHW shape: channels-last without a copy
        return x.to(self.dtype) if x.dtype != self.dtype else x

    def _threads_epoch(self, batches, params) -> Iterator[torch.Tensor]:
        from .cpu_loader import thread_batches

        for x in thread_batches(self.index.paths, batches, params, size=self.image_size, mean=self.mean,
                                std=self.std, threads=self.workers):
            if self._device.type != "cpu":
                x = x.to(self._device)  # synchronous: the host buffer is reused for a later batch
            yield x.to(self.dtype) if x.dtype != self.dtype else x

    def _torch_epoch(self, batches, params) -> Iterator[torch.Tensor]:
        dataset = _SeedChainDataset(self.index.paths, self.image_size, params)
        pin = self._device.type == "cuda"
        dl = torch.utils.data.DataLoader(
            dataset, batch_sampler=[b.tolist() for b in batches], num_workers=self.workers,
            collate_fn=_stack_uint8, pin_memory=pin, prefetch_factor=4 if self.workers else None,
        )
        mean = torch.tensor(self.mean, device=self._device).view(1, 3, 1, 1) * 255
        inv_std = 1.0 / (torch.tensor(self.std, device=self._device).view(1, 3, 1, 1) * 255)
        for u8 in dl:
            u8 = u8.to(self._device, non_blocking=True).permute(0, 3, 1, 2)  # channels-last view
            yield ((u8.float() - mean) * inv_std).to(self.dtype)  # one fused normalize, on the device


def make_loader(
    index: Index,
    *,
    batch_size: int,
    image_size: int = 384,
    train: bool,
    backend: str = "auto",
    device: str = "auto",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    precision: str = "fp32",
    seed: int = 2020,
    rank: int = 0,
    workers: int = 0,
    world_size: int = 1,
) -> Loader:
    """Build a loader; ``backend`` is auto, dali, threads or torch (see the module docstring);
    ``precision`` ('fp32', 'fp16', 'bf16') sets the dtype of the delivered batch; ``rank`` (the global
    rank) seeds the augmentation and, with ``world_size`` > 1, picks this rank's shard."""
    dev = resolve_device(device)
    if backend == "auto":
        backend = "dali" if dev.type == "cuda" else "threads"
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    return Loader(index, batch_size, image_size, train, backend, str(dev), tuple(mean), tuple(std), dtype, seed,
                  rank, workers, world_size)
