"""fastsort: the Haihua 2020 1st-place image-classification recipe, fed by an NVIDIA DALI input pipeline.

Importing fastsort imports neither DALI nor Triton; they load when a DALI loader or a kernel is first used.
"""

from .augment import (apply_cutmix, apply_gridmask, cutmix, gridmask, mix_batch, sample_cutmix, sample_gridmask,
                      soft_cross_entropy)
from .checkpoint import load_checkpoint, save_checkpoint
from .index import DataError, Index, load_dataset, preflight, read_csv, scan_folder, split_fold, stratified_folds
from .loader import Loader, make_loader, sample_seed_chain
from .models import build_model, load_weights, swap_activations
from .average import average_checkpoints
from .predict import TTA, ensemble, predict, predict_probs, pseudo_label, score, sharpen
from .recipe import load_recipe, run_recipe
from .train import TrainConfig, TrainResult, evaluate, train

__version__ = "0.1.0"

__all__ = [
    "DataError", "Index", "scan_folder", "read_csv", "load_dataset", "preflight", "stratified_folds", "split_fold",
    "Loader", "make_loader", "sample_seed_chain",
    "sample_cutmix", "apply_cutmix", "cutmix", "sample_gridmask", "apply_gridmask", "gridmask", "mix_batch",
    "soft_cross_entropy",
    "build_model", "swap_activations", "load_weights",
    "save_checkpoint", "load_checkpoint",
    "TTA", "predict_probs", "sharpen", "ensemble", "predict", "pseudo_label", "score",
    "TrainConfig", "TrainResult", "train", "evaluate",
    "average_checkpoints", "load_recipe", "run_recipe",
]
