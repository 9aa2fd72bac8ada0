"""The fine-tuning recipe: :class:`Recipe` (every setting that shapes the training result),
:func:`resolve_recipe` (its defaults, derived from the model) and the checks of its values."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from convnext_keras import preprocess, registry
from convnext_keras.api import OFFICIAL
from convnext_keras.finetune import optim
from convnext_keras.nets.convnext import PRECISIONS
from convnext_keras.weights import hfhub

#: The drop-path rate for variants the original published no fine-tuning rate for (its
#: smallest rate, ConvNeXt-T's on ImageNet-1k).
DEFAULT_DROP_PATH = 0.1


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Every setting that shapes the training result (a resumed run must keep them all).

    Defaults are the original's ImageNet-22k -> 1k fine-tuning recipe (facebookresearch/ConvNeXt
    TRAINING.md, main.py); ``None`` means "derived from the model" (see :func:`resolve_recipe`).
    ConvNeXt V2 models take ConvNeXt-V2's per-size settings instead (``registry.FINETUNE``):
    layer-decay type and rate, drop path, weight decay, and ``lr = base lr x batch / 256``.
    """

    model: str = "convnext_tiny_1k_224"
    #: "official", None (random init) or a checkpoint file; None by default for architecture
    #: names such as ``convnext_atto``.
    weights: str | None = OFFICIAL
    epochs: int = 30
    #: Global batch per step (split over devices); times ``accumulation`` per update.
    batch_size: int = 32
    accumulation: int = 1
    lr: float = 5e-5
    min_lr: float = 1e-6
    warmup_epochs: float = 0.0
    layer_decay: float = 0.8
    #: "group" (ConvNeXt's 12 groups of blocks) or "single" (one group per block, ConvNeXt V2's
    #: for atto..tiny); see finetune.optim.
    layer_decay_type: str = "group"
    weight_decay: float = 1e-8
    drop_path: float | None = None
    label_smoothing: float = 0.1
    mixup: float = 0.0
    cutmix: float = 0.0
    #: EMA decay of the weights (the original uses 0.9999 where it uses EMA), None = off.
    ema: float | None = None
    head_init_scale: float = 0.001
    resolution: int | None = None
    crop_pct: float | None = None
    interpolation: str = "bicubic"
    crop_scale: tuple[float, float] = (0.08, 1.0)
    hflip: float = 0.5
    #: RandAugment ops per image (0 = off); magnitude ``randaugment_magnitude`` in [0, 1].
    randaugment: int = 0
    randaugment_magnitude: float = 0.9
    precision: str = "fp32"
    remat: bool = False
    clip_grad: float | None = None
    val_fraction: float = 0.1
    seed: int = 0

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["crop_scale"] = list(self.crop_scale)
        return d

    @classmethod
    def from_json(cls, d: dict) -> Recipe:
        d = dict(d)
        d["crop_scale"] = tuple(d["crop_scale"])
        return cls(**d)


RECIPE_FIELDS = tuple(f.name for f in dataclasses.fields(Recipe))
#: Options for which None is a setting (random init, no EMA, no clipping), not "default".
_NONE_IS_A_VALUE = ("weights", "ema", "clip_grad")


def resolve_recipe(**options) -> Recipe:
    """A complete, checked :class:`Recipe` from user options (None = default)."""
    unknown = sorted(set(options) - set(RECIPE_FIELDS))
    if unknown:
        raise ValueError(
            f"Unknown fine-tuning option(s) {unknown}; valid ones: {', '.join(RECIPE_FIELDS)}."
        )
    given = {k: v for k, v in options.items() if v is not None or k in _NONE_IS_A_VALUE}
    resolved = registry.resolve(given.get("model", Recipe.model))
    given["model"] = resolved.name
    if resolved.head == "pooled":
        raise ValueError(
            f"{given['model']!r} is a feature extractor name; fine-tune the classifier name "
            f"without '{registry.FEATURE_EXTRACTOR_SUFFIX}' (its head is replaced anyway)."
        )
    if "weights" not in given:
        given["weights"] = OFFICIAL if resolved.checkpoint else None
    config = preprocess.config_for(given.get("model", Recipe.model))
    published = registry.FINETUNE.get(resolved.variant.name)
    given.setdefault("drop_path", published.drop_path if published else DEFAULT_DROP_PATH)
    if published:
        given.setdefault("layer_decay_type", published.layer_decay_type)
        for field in ("layer_decay", "weight_decay"):
            if getattr(published, field) is not None:
                given.setdefault(field, getattr(published, field))
        if published.base_lr is not None:  # the original's lr = blr * effective batch / 256
            batch = given.get("batch_size", Recipe.batch_size)
            batch *= given.get("accumulation", Recipe.accumulation)
            given.setdefault("lr", published.base_lr * batch / 256)
    given.setdefault("resolution", config.resolution)
    given.setdefault("crop_pct", config.crop_pct)
    if "crop_scale" in given:
        given["crop_scale"] = tuple(float(s) for s in given["crop_scale"])
    if given.get("weights") not in (None, OFFICIAL):
        given["weights"] = _weights_option(given["weights"])
    recipe = Recipe(**given)
    _check(recipe)
    return recipe


def _check(r: Recipe) -> None:
    def need(ok, message):
        if not ok:
            raise ValueError(message)

    need(r.epochs >= 1, f"epochs must be >= 1, got {r.epochs}.")
    need(r.batch_size >= 1, f"batch_size must be >= 1, got {r.batch_size}.")
    need(r.accumulation >= 1, f"accumulation must be >= 1, got {r.accumulation}.")
    need(r.lr > 0, f"lr must be positive, got {r.lr}.")
    need(0 <= r.min_lr <= r.lr, f"min_lr must be in [0, lr={r.lr}], got {r.min_lr}.")
    need(r.warmup_epochs >= 0, f"warmup_epochs must be >= 0, got {r.warmup_epochs}.")
    need(r.warmup_epochs < r.epochs, "warmup_epochs must be shorter than the training.")
    need(0 < r.layer_decay <= 1, f"layer_decay must be in (0, 1], got {r.layer_decay}.")
    need(
        r.layer_decay_type in optim.LAYER_DECAY_TYPES,
        f"layer_decay_type must be one of {', '.join(optim.LAYER_DECAY_TYPES)}, got "
        f"{r.layer_decay_type!r}.",
    )
    need(r.weight_decay >= 0, f"weight_decay must be >= 0, got {r.weight_decay}.")
    need(0 <= r.drop_path < 1, f"drop_path must be in [0, 1), got {r.drop_path}.")
    need(0 <= r.label_smoothing < 1, f"label_smoothing must be in [0, 1), got {r.label_smoothing}.")
    need(r.mixup >= 0 and r.cutmix >= 0, "mixup and cutmix alphas must be >= 0 (0 = off).")
    need(r.ema is None or 0 < r.ema < 1, f"ema decay must be in (0, 1), got {r.ema}.")
    need(r.head_init_scale > 0, f"head_init_scale must be positive, got {r.head_init_scale}.")
    minimum = registry.resolve(r.model).variant.min_input_size
    need(
        r.resolution >= minimum,
        f"resolution must be at least {minimum} pixels, got {r.resolution}.",
    )
    need(0 < r.crop_pct <= 1, f"crop_pct must be in (0, 1], got {r.crop_pct}.")
    need(
        r.interpolation in preprocess.INTERPOLATIONS,
        f"interpolation must be one of {', '.join(preprocess.INTERPOLATIONS)}.",
    )
    lo, hi = r.crop_scale
    need(0 < lo <= hi <= 1, f"crop_scale must be 0 < min <= max <= 1, got {r.crop_scale}.")
    need(0 <= r.hflip <= 1, f"hflip is a probability in [0, 1], got {r.hflip}.")
    need(r.randaugment >= 0, f"randaugment (ops per image) must be >= 0, got {r.randaugment}.")
    need(0 <= r.randaugment_magnitude <= 1, "randaugment_magnitude must be in [0, 1].")
    need(
        r.precision in PRECISIONS,
        f"precision must be one of {', '.join(PRECISIONS)}, got {r.precision!r}.",
    )
    need(r.clip_grad is None or r.clip_grad > 0, f"clip_grad must be > 0, got {r.clip_grad}.")
    need(0 <= r.val_fraction < 1, f"val_fraction must be in [0, 1), got {r.val_fraction}.")
    if r.weights not in (None, OFFICIAL) and not str(r.weights).startswith(hfhub.HF_SCHEME):
        if not Path(r.weights).is_file():
            raise FileNotFoundError(f"Weights file {r.weights} does not exist.")


def _weights_option(value) -> str:
    """A ``weights`` value other than None / official: a Hub address as it is, a path expanded."""
    if str(value).startswith(hfhub.HF_SCHEME):
        return str(value)
    return str(Path(value).expanduser())
