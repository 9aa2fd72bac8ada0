"""The originals' fine-tuning optimizer: AdamW with layer-wise learning-rate decay.

Two ways of grouping layers, ``layer_decay_type``:

``"group"`` - facebookresearch/ConvNeXt (``optim_factory.py``, ``get_num_layer_for_convnext``;
ConvNeXt-V2 uses it for base and larger) splits the network into 14 groups and scales the
learning rate of group ``i`` by ``layer_decay ** (13 - i)``::

    stem (downsample 0)         0
    stage 0 blocks              1
    downsample 1, stage 1       2
    downsample 2                3
    stage 2, block b            3 + b // 3      (27 blocks -> groups 3..11)
    downsample 3, stage 3       12
    final norm, head, other     13

The original only accepts small/base/large/xlarge (27 blocks in stage 2).  Here stage 2's
blocks are spread over the same nine groups for any depth, ``3 + b * 9 // depth``, which is
``b // 3`` for 27 blocks and monotone for every variant (tiny: 9 blocks -> 3..11, atto: 6
blocks -> 3, 4, 6, 7, 9, 10).  Parameters with one dimension (biases, LayerNorm scale and
shift, layer-scale ``gamma``, GRN ``gamma`` / ``beta``) get no weight decay, as in the originals'
``get_parameter_groups``.

``"single"`` - facebookresearch/ConvNeXt-V2 (``optim_factory.py``,
``get_num_layer_for_convnext_single``; its recipe for atto..tiny): one group per block.  With
``n = sum(depths)`` blocks, block ``b`` of stage ``s`` is group ``sum(depths[:s]) + b + 1``, the
downsampling layers before stage ``s`` (the stem for ``s = 0``) join that stage's first block,
and the final norm, the head and anything else are group ``n + 1``; group ``i`` learns at
``layer_decay ** (n + 1 - i)``.

The isotropic ConvNeXt (one stage of ``n`` blocks behind a patch stem, no downsampling) has
no stages to group by: ``"group"`` spreads its blocks evenly over the same 12 groups (block
``b`` is group ``1 + b * 12 // n``: 18 blocks in pairs and ones, 36 in threes), the stem is
group 0 and the final norm and head group 13, as for the hierarchical networks; ``"single"``
gives each block its own group as above (the stem joins the first block).  The original
publishes no layer-decay setting for the isotropic models (``main.py`` refuses layer decay
for them); this grouping keeps its rule, consecutive blocks sharing a rate.

Everything is written with ``keras.ops`` on top of Keras' own ``AdamW``, so it runs on the
TensorFlow, JAX and PyTorch backends and under ``tf.distribute`` / ``keras.distribution``.
"""

from __future__ import annotations

import re

import keras
from keras import ops

from convnext_keras import registry
from convnext_keras._registration import PACKAGE

#: Groups of blocks the original divides ConvNeXt into (``num_max_layer``); ids run 0..13.
NUM_LAYER_GROUPS = 12
#: Group id of the final norm, the head and any layer that is not part of ConvNeXt.
HEAD_GROUP = NUM_LAYER_GROUPS + 1
#: Stage 2's blocks are spread over groups 3 .. 3 + STAGE2_GROUPS - 1.
_STAGE2_FIRST_GROUP = 3
_STAGE2_GROUPS = 9

_DOWNSAMPLE = re.compile(r"stage(\d)_downsample_")
_BLOCK = re.compile(r"stage(\d)_block(\d+)_")


def layer_group(layer_name: str, stage2_depth: int) -> int:
    """The layer-decay group (0..13) of a ConvNeXt layer name; 13 for anything else."""
    if layer_name.startswith("stem_"):
        return 0
    m = _DOWNSAMPLE.match(layer_name)
    if m:
        return {1: 2, 2: 3, 3: NUM_LAYER_GROUPS}[int(m.group(1))]
    m = _BLOCK.match(layer_name)
    if m:
        stage, block = int(m.group(1)), int(m.group(2))
        if stage in (0, 1):
            return stage + 1
        if stage == 2:
            return _STAGE2_FIRST_GROUP + block * _STAGE2_GROUPS // stage2_depth
        return NUM_LAYER_GROUPS
    return HEAD_GROUP


LAYER_DECAY_TYPES = ("group", "single")


def isotropic_layer_group(layer_name: str, depth: int) -> int:
    """The ``"group"`` layer-decay group (0..13) of a layer of an isotropic ConvNeXt of
    ``depth`` blocks: stem 0, block ``b`` ``1 + b * 12 // depth``, anything else 13."""
    if layer_name.startswith("stem_"):
        return 0
    m = _BLOCK.match(layer_name)
    if m:
        return 1 + int(m.group(2)) * NUM_LAYER_GROUPS // depth
    return HEAD_GROUP


def single_layer_group(layer_name: str, depths) -> int:
    """The ``"single"`` layer-decay group of a ConvNeXt layer name: one per block (1..n), the
    head's (and anything else's) ``n + 1`` for ``n = sum(depths)`` blocks."""
    m = _DOWNSAMPLE.match(layer_name)
    stage = int(m.group(1)) if m else (0 if layer_name.startswith("stem_") else None)
    if stage is not None:
        return sum(depths[:stage]) + 1
    m = _BLOCK.match(layer_name)
    if m:
        stage, block = int(m.group(1)), int(m.group(2))
        return sum(depths[:stage]) + block + 1
    return sum(depths) + 1


def _grouping(layer_decay_type: str, depths):
    """``(layer name -> group, head group)`` of a decay type for a network's stage depths
    (one stage: an isotropic ConvNeXt)."""
    if layer_decay_type == "group" and len(depths) == 1:
        return (lambda name: isotropic_layer_group(name, depths[0])), HEAD_GROUP
    if layer_decay_type == "group":
        return (lambda name: layer_group(name, depths[2])), HEAD_GROUP
    if layer_decay_type == "single":
        return (lambda name: single_layer_group(name, depths)), sum(depths) + 1
    raise ValueError(
        f"layer_decay_type must be one of {', '.join(LAYER_DECAY_TYPES)} (ConvNeXt-V2's "
        f"'single': one group per block; 'group': 12 groups of blocks), got {layer_decay_type!r}."
    )


def layer_groups(
    variant: str | registry.Variant, layer_decay_type: str = "group"
) -> dict[str, int]:
    """``{layer name: group}`` for every weight-carrying layer of a variant (the decay table)."""
    # (Imported here: this module is imported when Keras is, see ``_registration``.)
    from convnext_keras.nets.convnext import layer_names

    spec = registry.variant(variant)
    group_of, _ = _grouping(layer_decay_type, spec.depths)
    return {name: group_of(name) for names in layer_names(spec).values() for name in names}


def group_scale(group: int, layer_decay: float, head_group: int = HEAD_GROUP) -> float:
    """Learning-rate multiplier of a group: ``layer_decay ** (head_group - group)`` (13 for
    ``"group"``, ``sum(depths) + 1`` for ``"single"``)."""
    return float(layer_decay) ** (head_group - group)


def _layer_of(variable) -> str:
    # Keras 3 paths are "<layer>/<weight>" (nested models prefix more components).
    parts = variable.path.split("/")
    return parts[-2] if len(parts) >= 2 else parts[0]


def _depths(variables) -> list[int]:
    """Blocks per stage of the ConvNeXt layers among ``variables``: one entry for an isotropic
    ConvNeXt (blocks in stage 0 only, no downsampling layer), else four (at least 1 block in
    stage 2)."""
    depths = [0, 0, 0, 0]
    downsampling = False
    for v in variables:
        layer = _layer_of(v)
        downsampling = downsampling or bool(_DOWNSAMPLE.match(layer))
        m = _BLOCK.match(layer)
        if m:
            stage = int(m.group(1))
            depths[stage] = max(depths[stage], int(m.group(2)) + 1)
    if depths[0] and not any(depths[1:]) and not downsampling:
        return depths[:1]
    depths[2] = depths[2] or 1
    return depths


def parameter_groups(
    model: keras.Model, layer_decay: float, layer_decay_type: str = "group"
) -> list[dict]:
    """The original's parameter groups for ``model``, one dict per trainable variable.

    Each dict has ``path``, ``layer``, ``group``, ``lr_scale`` and ``weight_decay`` (bool).
    Works for any model holding ConvNeXt layers (also nested in a bigger model); variables of
    other layers (a new head, say) go to the head's group with scale 1, as in the originals.
    """
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(
            f"layer_decay must be in (0, 1] (1 disables layer-wise decay; the original "
            f"fine-tunes with 0.7-0.8), got {layer_decay}."
        )
    variables = model.trainable_variables
    # The architecture from every variable (frozen stages included), the groups for the
    # trainable ones.
    group_of, head_group = _grouping(layer_decay_type, _depths(model.variables))
    groups = []
    for v in variables:
        layer = _layer_of(v)
        group = group_of(layer)
        groups.append(
            {
                "path": v.path,
                "layer": layer,
                "group": group,
                "lr_scale": group_scale(group, layer_decay, head_group),
                # The originals: no decay for 1-D parameters (biases, norms, layer scale, GRN).
                "weight_decay": len(v.shape) > 1,
            }
        )
    return groups


@keras.saving.register_keras_serializable(package=PACKAGE)
class LayerDecayAdamW(keras.optimizers.AdamW):
    """Keras' AdamW with a learning-rate scale per variable and per-variable decay on/off.

    ``lr_scales`` maps variable paths to learning-rate multipliers; ``no_decay`` lists the
    paths without weight decay.  Decoupled weight decay uses the variable's scaled learning
    rate, as PyTorch's AdamW does with parameter groups.  Variables not listed get scale 1
    and weight decay when they have more than one dimension.

    With gradient accumulation, the EMA of the weights (``use_ema=True``) advances once per
    optimizer update, not once per accumulated batch, like the original's ``ModelEma``.
    The EMA is never written into the model behind the caller's back:
    :meth:`ema_values` reads it and the fine-tuning loop swaps it in for evaluation.
    """

    def __init__(
        self,
        learning_rate=5e-5,
        weight_decay=1e-8,
        *,
        lr_scales: dict[str, float] | None = None,
        no_decay: list[str] | None = None,
        **kwargs,
    ):
        kwargs.setdefault("epsilon", 1e-8)  # the original's --opt_eps
        super().__init__(learning_rate=learning_rate, weight_decay=weight_decay, **kwargs)
        self.lr_scales = {str(k): float(v) for k, v in (lr_scales or {}).items()}
        self.no_decay = sorted(str(p) for p in (no_decay or []))

    def build(self, variables):
        super().build(variables)
        no_decay = set(self.no_decay)
        # Indexed like the optimizer's own slots (``_get_variable_index``); plain Python
        # floats/bools, so they become constants in the traced update step.
        self._lr_scale_of = [self.lr_scales.get(v.path, 1.0) for v in variables]
        # Variables the groups do not list: decay kernels only, as the original.
        self._decay_of = [
            v.path not in no_decay if v.path in self.lr_scales else len(v.shape) > 1
            for v in variables
        ]

    def update_step(self, gradient, variable, learning_rate):
        index = self._get_variable_index(variable)
        lr = ops.multiply(ops.cast(learning_rate, variable.dtype), self._lr_scale_of[index])
        if self.weight_decay and self._decay_of[index]:
            wd = ops.cast(self.weight_decay, variable.dtype)
            self.assign_sub(variable, ops.multiply(variable, ops.multiply(lr, wd)))
        super().update_step(gradient, variable, lr)

    def _apply_weight_decay(self, variables):
        # Applied per variable in update_step, scaled with the variable's learning rate.
        return

    def _update_model_variables_moving_average(self, trainable_variables):
        steps = self.gradient_accumulation_steps
        for var, average in zip(trainable_variables, self._model_variables_moving_average):
            if average is None:
                continue
            momentum = ops.multiply(
                ops.cast(ops.not_equal(self.iterations, 0), var.dtype), self.ema_momentum
            )
            if steps:
                # Between updates the weights do not change; keep the average as it is.
                is_update = ops.equal(ops.mod(self._iterations + 1, steps), 0)
                momentum = ops.where(is_update, momentum, ops.ones_like(momentum))
            average.assign(momentum * average + (1.0 - momentum) * var)

    def finalize_variable_values(self, var_list):
        # Keras' fit() ends by copying the EMA into the model; a run that calls fit() once per
        # epoch must keep training the raw weights, so the EMA is applied explicitly instead.
        return

    def ema_values(self) -> list | None:
        """The EMA of the trainable variables (numpy, in build order), or None without EMA."""
        if not self.use_ema:
            return None
        return [ops.convert_to_numpy(a) for a in self._model_variables_moving_average]

    def get_config(self):
        return {**super().get_config(), "lr_scales": self.lr_scales, "no_decay": self.no_decay}


@keras.saving.register_keras_serializable(package=PACKAGE)
class WarmupCosine(keras.optimizers.schedules.CosineDecay):
    """The original's per-step schedule: linear warmup from 0, then cosine to ``min_lr``.

    Keras' ``CosineDecay`` with a warmup phase; ``steps_per_update`` divides the optimizer's
    raw step counter when gradients are accumulated, so the schedule counts updates.  Warmup
    reaches the peak at step ``warmup_steps`` (the original's ``np.linspace`` one step earlier);
    the cosine part equals the original's ``cosine_scheduler`` step for step.
    """

    def __init__(
        self,
        learning_rate: float,
        total_steps: int,
        warmup_steps: int = 0,
        min_learning_rate: float = 0.0,
        steps_per_update: int = 1,
        name: str = "WarmupCosine",
    ):
        if learning_rate <= 0:
            raise ValueError(f"learning rate must be positive, got {learning_rate}.")
        if not 0 <= min_learning_rate <= learning_rate:
            raise ValueError(
                f"min_lr must be in [0, lr] = [0, {learning_rate}], got {min_learning_rate}."
            )
        if total_steps < 1 or not 0 <= warmup_steps < total_steps:
            raise ValueError(
                f"Need total_steps >= 1 and 0 <= warmup_steps < total_steps, got "
                f"total_steps={total_steps}, warmup_steps={warmup_steps}; train longer or "
                "shorten the warmup."
            )
        super().__init__(
            initial_learning_rate=0.0 if warmup_steps else learning_rate,
            decay_steps=total_steps - warmup_steps,
            alpha=min_learning_rate / learning_rate,
            name=name,
            warmup_target=learning_rate if warmup_steps else None,
            warmup_steps=warmup_steps,
        )
        self.learning_rate = float(learning_rate)
        self.total_steps = int(total_steps)
        self.min_learning_rate = float(min_learning_rate)
        self.steps_per_update = int(steps_per_update)

    def __call__(self, step):
        if self.steps_per_update > 1:
            step = ops.floor_divide(step, self.steps_per_update)
        return super().__call__(step)

    def get_config(self):
        return {
            "learning_rate": self.learning_rate,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "min_learning_rate": self.min_learning_rate,
            "steps_per_update": self.steps_per_update,
            "name": self.name,
        }


def schedule(
    lr: float,
    total_steps: int,
    *,
    warmup_steps: int = 0,
    min_lr: float = 1e-6,
    accumulation: int = 1,
) -> WarmupCosine:
    """Warmup + cosine learning rate per optimizer update (pass it as ``optimizer(lr=...)``)."""
    return WarmupCosine(
        lr, total_steps, warmup_steps, min(min_lr, lr), steps_per_update=max(1, accumulation)
    )


def optimizer(
    model: keras.Model,
    *,
    lr: float | keras.optimizers.schedules.LearningRateSchedule = 5e-5,
    layer_decay: float = 0.8,
    layer_decay_type: str = "group",
    weight_decay: float = 1e-8,
    ema: float | None = None,
    accumulation: int = 1,
    **adam_kwargs,
) -> LayerDecayAdamW:
    """AdamW with the original's layer-wise learning-rate decay, for ``model.compile``.

    Args:
        model: a ConvNeXt (or a model containing ConvNeXt layers) whose variables exist.
        lr: peak learning rate, or a schedule (see :func:`schedule`).
        layer_decay: per-group decay; group ``i`` learns at ``lr * layer_decay ** (13 - i)``
            (``"group"``) or ``lr * layer_decay ** (sum(depths) + 1 - i)`` (``"single"``).
            1.0 trains every layer at ``lr``.
        layer_decay_type: ``"group"`` (ConvNeXt's 12 groups of blocks) or ``"single"`` (one
            group per block, ConvNeXt-V2's recipe for atto..tiny).
        weight_decay: decoupled weight decay of kernels (not of biases, norms, layer scale).
        ema: decay of an exponential moving average of the weights (e.g. 0.9999), or None.
        accumulation: number of batches whose gradients are averaged per update.
        adam_kwargs: passed to ``keras.optimizers.AdamW`` (``beta_1``, ``global_clipnorm``...).

    Defaults are the original's ImageNet-22k -> 1k fine-tuning recipe (TRAINING.md).
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}.")
    if not isinstance(accumulation, int) or accumulation < 1:
        raise ValueError(f"accumulation must be a positive integer, got {accumulation!r}.")
    if ema is not None and not 0.0 < ema < 1.0:
        raise ValueError(f"ema decay must be in (0, 1), e.g. 0.9999, got {ema}.")
    if not model.trainable_variables:
        raise ValueError(
            "The model has no trainable variables: build it (call it once or give it an "
            "input shape) and unfreeze what should learn before creating the optimizer."
        )
    groups = parameter_groups(model, layer_decay, layer_decay_type)
    return LayerDecayAdamW(
        learning_rate=lr,
        weight_decay=weight_decay,
        lr_scales={g["path"]: g["lr_scale"] for g in groups},
        no_decay=[g["path"] for g in groups if not g["weight_decay"]],
        use_ema=ema is not None,
        ema_momentum=ema if ema is not None else 0.99,
        gradient_accumulation_steps=accumulation if accumulation > 1 else None,
        **adam_kwargs,
    )
