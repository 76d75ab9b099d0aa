"""Checkpoints are plain dicts of tensors and primitives, written atomically.

Keys: ``format`` (version), ``model`` (the evaluated weights: Lookahead's slow weights, unwrapped key
names), ``classes``, ``model_name``, ``model_info`` (normalisation, image size), ``config``, ``epoch``,
``metrics``, and ``train_state`` (fast weights, optimizer with Lookahead's slow buffers, scheduler,
GradScaler, step counters) for ``--resume``. ``torch.load(weights_only=True)`` reads them.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .models import strip_wrapper_prefixes

FORMAT = 1


def unwrapped_state_dict(model: torch.nn.Module) -> dict:
    """The state dict with key names of a freshly built model (no DDP/compile prefixes), on the CPU."""
    inner = getattr(model, "_orig_mod", model)
    inner = getattr(inner, "module", inner)
    return {k: v.detach().cpu().clone() for k, v in strip_wrapper_prefixes(inner.state_dict()).items()}


def save_checkpoint(state: dict, path: str | Path) -> Path:
    """Write ``state`` to a temporary file beside ``path``, flush it to disk, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OSError(f"could not write checkpoint {path}: {exc.strerror or exc}") from exc
    return path


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ValueError(f"{path} is not a readable fastsort checkpoint ({type(exc).__name__}: {first[:200]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not a fastsort checkpoint (format {FORMAT})")
    state["model"] = strip_wrapper_prefixes(state["model"])
    return state
