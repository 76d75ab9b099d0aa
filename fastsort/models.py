"""Models: any timm name or ``pretrainedmodels:<name>``, a fresh head, Mish, channels-last, local weights.

Nothing is downloaded: models are built without hub weights and ``pretrained`` must be a local file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _swish_types() -> tuple[type, ...]:
    """Activation classes the seed turned into Mish: ReLU and every flavour of swish/SiLU."""
    types: list[type] = [nn.ReLU, nn.SiLU]
    try:
        from timm.layers import activations as act, activations_me as act_me

        types += [getattr(act, n) for n in ("Swish",) if hasattr(act, n)]
        types += [getattr(act_me, n) for n in ("SwishMe", "SwishJit") if hasattr(act_me, n)]
    except ImportError:  # pragma: no cover - older timm layouts
        pass
    return tuple(types)


ACTIVATIONS = {"mish": nn.Mish, "keep": None}
MISH_MODES = ("native", "fused", "compile")  # compile: native Mish, the model is torch.compile'd by train


def fuse_mish(model: nn.Module) -> tuple[int, int]:
    """Swap Mish for fastsort's fused kernels: BatchNorm->Mish pairs become one ``BatchNormMish2d``.

    Pairs are found where the order is certain: timm's ``BatchNormAct2d`` with a Mish act and no drop,
    and a BatchNorm2d directly followed by Mish inside an ``nn.Sequential``. Elsewhere (e.g. ResNet's
    bn -> add -> act) only the Mish becomes ``FusedMish``. State-dict keys do not change, so the weights
    stay loadable by plain timm. Returns (BatchNorm blocks fused, Mish modules swapped).
    """
    from .ops import BatchNormMish2d, FusedMish

    def fused_bn(bn: nn.BatchNorm2d) -> BatchNormMish2d:
        new = BatchNormMish2d(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                              track_running_stats=bn.track_running_stats)
        new.load_state_dict(bn.state_dict())
        ref = bn.running_mean if bn.running_mean is not None else bn.weight
        return new.to(ref.device) if ref is not None else new

    try:
        from timm.layers import BatchNormAct2d
    except ImportError:  # pragma: no cover
        BatchNormAct2d = ()
    n_bn = n_act = 0
    for parent in list(model.modules()):
        children = list(parent.named_children())
        for i, (name, child) in enumerate(children):
            if BatchNormAct2d and type(child) is BatchNormAct2d and type(child.act) is nn.Mish \
                    and isinstance(child.drop, nn.Identity):
                setattr(parent, name, fused_bn(child))
                n_bn += 1
            elif isinstance(parent, nn.Sequential) and type(child) is nn.BatchNorm2d and i + 1 < len(children) \
                    and type(children[i + 1][1]) is nn.Mish:
                setattr(parent, name, fused_bn(child))
                setattr(parent, children[i + 1][0], nn.Identity())
                n_bn += 1
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Mish:
                setattr(parent, name, FusedMish(inplace=child.inplace))
                n_act += 1
    return n_bn, n_act


def swap_activations(model: nn.Module, new: type[nn.Module] = nn.Mish) -> int:
    """Replace ReLU/SiLU/Swish modules (anywhere, including inside timm's BatchNormAct2d) by ``new``.

    ReLU6, GELU, sigmoid gates and functional activations are left alone, as in the seed.
    Returns the number of modules replaced.
    """
    targets = _swish_types()
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) in targets:
                inplace = bool(getattr(child, "inplace", False))
                setattr(parent, name, new(inplace=inplace))
                count += 1
    return count


@dataclass
class ModelInfo:
    name: str
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    head_prefixes: tuple[str, ...]  # state-dict key prefixes of the classifier head
    activations_replaced: int = 0
    weights: str = "random init"
    mish: str = "native"
    fused_blocks: int = 0


def _build_cadene(name: str, num_classes: int) -> tuple[nn.Module, ModelInfo]:
    try:
        import pretrainedmodels
    except ImportError as exc:  # pragma: no cover
        raise ImportError("pretrainedmodels:<name> needs the pretrainedmodels package: pip install pretrainedmodels") from exc
    if name not in pretrainedmodels.model_names:
        raise ValueError(f"unknown pretrainedmodels model {name!r}; known: {', '.join(pretrainedmodels.model_names)}")
    model = pretrainedmodels.__dict__[name](num_classes=1000, pretrained=None)
    features = model.last_linear.in_features
    model.last_linear = nn.Linear(features, num_classes)
    if isinstance(getattr(model, "avg_pool", None), nn.AvgPool2d):
        # The Cadene SENet pools with a fixed 7x7 window, wrong at 384 px (seed bug 19): pool globally.
        model.avg_pool = nn.AdaptiveAvgPool2d(1)
    # Built without weights, the model carries no mean/std; the ImageNet settings of its weights say them.
    settings = pretrainedmodels.pretrained_settings.get(name, {}).get("imagenet", {})
    mean = tuple(float(v) for v in settings.get("mean", (0.485, 0.456, 0.406)))
    std = tuple(float(v) for v in settings.get("std", (0.229, 0.224, 0.225)))
    return model, ModelInfo(f"pretrainedmodels:{name}", num_classes, mean, std, ("last_linear.",))


def _build_timm(name: str, num_classes: int, drop_rate: float | None) -> tuple[nn.Module, ModelInfo]:
    import timm

    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('.')[0][:12]}*")[:8]
        hint = f"; similar: {', '.join(close)}" if close else ""
        raise ValueError(f"unknown timm model {name!r}{hint}")
    kwargs = {"drop_rate": drop_rate} if drop_rate is not None else {}
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    cfg = model.pretrained_cfg
    classifier = model.get_classifier()
    head = tuple(f"{n}." for n, m in model.named_modules() if m is classifier and n)
    return model, ModelInfo(name, num_classes, tuple(cfg.get("mean", (0.485, 0.456, 0.406))),
                            tuple(cfg.get("std", (0.229, 0.224, 0.225))), head)


def build_model(
    name: str,
    num_classes: int,
    *,
    act: str = "mish",
    pretrained: str | Path | None = None,
    channels_last: bool = True,
    drop_rate: float | None = None,
    mish: str = "native",
) -> tuple[nn.Module, ModelInfo]:
    """Build a classifier with a fresh ``num_classes`` head.

    Args:
        name: a timm model name, or ``pretrainedmodels:<name>`` (Cadene ``se_resnext50_32x4d``, ``inceptionv4``).
        act: ``mish`` swaps ReLU/SiLU/Swish for Mish (the seed's choice); ``keep`` leaves them.
        pretrained: a local weights file (state dict, fastsort checkpoint, or a same-architecture state dict
            with other key names, matched by order and shape); the head is skipped when its shape differs.
        mish: ``native`` (``nn.Mish``), ``fused`` (fastsort's kernels, BatchNorm+Mish fused) or ``compile``
            (native Mish; the caller compiles the model).
    """
    if act not in ACTIVATIONS:
        raise ValueError(f"--act must be one of {list(ACTIVATIONS)}, got {act!r}")
    if mish not in MISH_MODES:
        raise ValueError(f"--mish must be one of {list(MISH_MODES)}, got {mish!r}")
    if name.startswith("pretrainedmodels:"):
        model, info = _build_cadene(name.split(":", 1)[1], num_classes)
    else:
        model, info = _build_timm(name, num_classes, drop_rate)
    if pretrained and str(pretrained) != "none":  # the CLI and TrainConfig spell "no weights" as "none"
        info.weights = load_weights(model, pretrained, head_prefixes=info.head_prefixes)
    if ACTIVATIONS[act] is not None:
        info.activations_replaced = swap_activations(model, ACTIVATIONS[act])
    info.mish = mish
    if mish == "fused":
        info.fused_blocks, _ = fuse_mish(model)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, info


# ----------------------------------------------------------------------------------------------- weights


HOLDER_KEYS = ("n_averaged",)  # torch.optim.swa_utils.AveragedModel's own counter, not a model weight


def strip_wrapper_prefixes(state: dict) -> dict:
    """Key names of the bare model, whatever wrapped it when it was saved.

    Removes leading DataParallel/DDP/EMA-holder ``module.`` and torch.compile ``_orig_mod.`` prefixes in any
    nesting and order, ``_orig_mod.`` also inside a key (a compiled sub-module), and an averaging holder's
    ``n_averaged`` counter.
    """
    wrapped = any(k.startswith(WRAPPER_PREFIXES) for k in state)
    out = {}
    for key, value in state.items():
        if wrapped and key in HOLDER_KEYS:
            continue
        changed = True
        while changed:
            changed = False
            for prefix in WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        key = key.replace("._orig_mod.", ".")
        if key in out:
            raise ValueError(f"state dict has key {key!r} twice once wrapper prefixes are removed")
        out[key] = value
    return out


def load_model_state(model: nn.Module, state: dict, *, source: str = "state dict") -> None:
    """Load ``state`` into ``model`` strictly after removing wrapper prefixes; a mismatch is a
    ``ValueError`` naming ``source`` and every missing, unexpected and misshapen key."""
    state = strip_wrapper_prefixes(state)
    target = model.state_dict()
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    bad_shape = [k for k in target if k in state and tuple(state[k].shape) != tuple(target[k].shape)]
    if missing or unexpected or bad_shape:
        lines = [f"{source}: weights do not fit this model ({len(missing)} missing, {len(unexpected)} unexpected, "
                 f"{len(bad_shape)} of another shape)"]
        lines += [f"  missing: {k}" for k in missing[:20]]
        lines += [f"  unexpected: {k}" for k in unexpected[:20]]
        lines += [f"  shape mismatch: {k} {tuple(state[k].shape)} vs {tuple(target[k].shape)}" for k in bad_shape[:20]]
        raise ValueError("\n".join(lines))
    model.load_state_dict(state, strict=True)


def read_state_dict(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "format" in obj and "model" in obj:  # a fastsort checkpoint
        obj = obj["model"]
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return strip_wrapper_prefixes(obj)


def load_weights(model: nn.Module, path: str | Path, *, head_prefixes: tuple[str, ...] = ()) -> str:
    """Load a local weights file into ``model`` strictly, except for a head of a different shape.

    Returns a one-line description of what was loaded. Raises ``ValueError`` naming missing and
    unexpected keys for any other mismatch.
    """
    source = read_state_dict(path)
    target = model.state_dict()
    is_head = lambda k: any(k.startswith(p) for p in head_prefixes)  # noqa: E731
    how = "by name"
    if not set(source) & set(target):
        source, how = _match_by_order(source, target, path)
    skipped = [k for k in target if k in source and source[k].shape != target[k].shape and is_head(k)]
    bad_shape = [k for k in target if k in source and source[k].shape != target[k].shape and not is_head(k)]
    missing = [k for k in target if k not in source and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in source if k not in target]
    if bad_shape or missing or unexpected:
        lines = [f"{path}: weights do not fit this model"]
        lines += [f"  shape mismatch: {k} {tuple(source[k].shape)} vs {tuple(target[k].shape)}" for k in bad_shape[:20]]
        lines += [f"  missing: {k}" for k in missing[:20]]
        lines += [f"  unexpected: {k}" for k in unexpected[:20]]
        raise ValueError("\n".join(lines))
    for k in skipped:
        del source[k]
    # The only partial load: the head, replaced on purpose; everything else must have loaded.
    result = model.load_state_dict(source, strict=False)
    left_out = [k for k in result.missing_keys if k not in skipped and not k.endswith("num_batches_tracked")]
    if left_out or result.unexpected_keys:
        raise ValueError(f"{path}: partial load left out {left_out[:20]}, unexpected {result.unexpected_keys[:20]}")
    note = f", fresh head ({', '.join(skipped)})" if skipped else ""
    return f"{Path(path).name} ({len(source)} tensors matched {how}{note})"


def _match_by_order(source: dict, target: dict, path) -> tuple[dict, str]:
    """Same architecture, other key names (e.g. efficientnet_pytorch -> timm): pair tensors in order."""
    src = [(k, v) for k, v in source.items() if not k.endswith("num_batches_tracked")]
    dst = [k for k in target if not k.endswith("num_batches_tracked")]
    if len(src) != len(dst):
        raise ValueError(f"{path}: no key names in common with the model and {len(src)} vs {len(dst)} tensors")
    out = {}
    for i, ((sk, sv), dk) in enumerate(zip(src, dst)):
        last = i >= len(dst) - 2  # a head of another class count may differ in shape
        if sv.shape != target[dk].shape and not last:
            raise ValueError(f"{path}: no key names in common, and tensor {i} ({sk} {tuple(sv.shape)}) "
                             f"does not fit {dk} {tuple(target[dk].shape)}")
        out[dk] = sv
    return out, "by order and shape"
