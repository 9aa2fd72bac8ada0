"""The fine-tuning optimizer and schedule against the original's definitions and PyTorch.

* The layer-decay groups of ConvNeXt-B are compared with the table of the issue, which is the
  original's ``get_num_layer_for_convnext`` (facebookresearch/ConvNeXt optim_factory.py).
* Updates are compared with ``torch.optim.AdamW`` given the original's parameter groups
  (``lr_scale`` and ``weight_decay`` per group), an implementation that shares nothing with
  Keras' optimizer.
* The schedule is compared with the original's ``utils.cosine_scheduler``, written out here.
"""

from __future__ import annotations

import numpy as np
import pytest

import convnext_keras as ck
from convnext_keras import registry
from convnext_keras.finetune import optim


def _expected_group_base(layer: str) -> int:
    """The issue's table for ConvNeXt-B (27 blocks in stage 2), written from its text."""
    if layer.startswith("stem_"):
        return 0
    if layer.startswith("stage1_downsample"):
        return 2
    if layer.startswith("stage2_downsample"):
        return 3
    if layer.startswith("stage3_downsample"):
        return 12
    if layer.startswith("stage0_block"):
        return 1
    if layer.startswith("stage1_block"):
        return 2
    if layer.startswith("stage2_block"):
        block = int(layer.split("_")[1].removeprefix("block"))
        return 3 + block // 3
    if layer.startswith("stage3_block"):
        return 12
    return 13  # final norm and head


def test_layer_groups_of_base_match_the_original_table():
    groups = optim.layer_groups("base")
    # stem 2 + downsampling 3 x 2 + 36 blocks x 5 + head 2
    assert len(groups) == 2 + 3 * 2 + (3 + 3 + 27 + 3) * 5 + 2
    for layer, group in groups.items():
        assert group == _expected_group_base(layer), layer
    # Spot checks straight from the issue text.
    assert groups["stem_conv"] == 0 and groups["stage1_downsample_conv"] == 2
    assert groups["stage2_downsample_norm"] == 3 and groups["stage3_downsample_conv"] == 12
    assert groups["stage2_block26_pwconv2"] == 11 and groups["stage2_block5_dwconv"] == 4
    assert groups["head_fc"] == 13 and groups["head_norm"] == 13
    # The original's scale list: layer_decay ** (num_layers + 1 - i) for i in 0..13.
    assert [optim.group_scale(i, 0.8) for i in range(14)] == pytest.approx(
        [0.8 ** (12 + 1 - i) for i in range(14)]
    )


@pytest.mark.parametrize("variant", list(registry.VARIANTS))
def test_layer_groups_are_monotone_for_every_variant(variant):
    groups = optim.layer_groups(variant)
    order = list(groups.values())  # layer_names() lists the network from input to head
    assert order[0] == 0 and order[-1] == 13
    assert all(a <= b for a, b in zip(order, order[1:])), order
    spec = registry.VARIANTS[variant]
    if spec.isotropic:  # one stage: its blocks spread over groups 1..12 (test_families.py)
        return
    stage2 = [g for name, g in groups.items() if name.startswith("stage2_block")]
    assert min(stage2) == 3 and max(stage2) <= 11
    # Each stage-2 block sits in one group, and deeper blocks never in a lower one.
    per_block = [groups[f"stage2_block{b}_dwconv"] for b in range(spec.depths[2])]
    assert per_block == sorted(per_block)
    if spec.depths[2] == 27:
        assert per_block == [3 + b // 3 for b in range(27)]


#: ConvNeXt-V2 optim_factory.py ``get_num_layer_for_convnext_single`` for V2-atto (depths 2, 2,
#: 6, 2; n = 12 blocks), written out: "downsample_layers.s" -> sum(depths[:s]) + 1,
#: "stages.s.b" -> sum(depths[:s]) + b + 1, anything else -> n + 1.
V2_ATTO_SINGLE = {
    "stem": 1,  # downsample_layers.0
    "stage0_block0": 1,
    "stage0_block1": 2,
    "stage1_downsample": 3,
    "stage1_block0": 3,
    "stage1_block1": 4,
    "stage2_downsample": 5,
    **{f"stage2_block{b}": 5 + b for b in range(6)},  # 5 .. 10
    "stage3_downsample": 11,
    "stage3_block0": 11,
    "stage3_block1": 12,
    "head": 13,  # norm, head
}


def test_single_layer_decay_of_v2_atto_matches_the_original_table():
    groups = optim.layer_groups("convnextv2_atto", "single")
    assert len(groups) == 2 + 3 * 2 + 12 * 5 + 2  # stem, downsampling, blocks (with GRN), head
    for layer, group in groups.items():
        key = next(k for k in V2_ATTO_SINGLE if layer.startswith(k + "_"))
        assert group == V2_ATTO_SINGLE[key], layer
    # main_finetune.py: values = [layer_decay ** (num_layers + 1 - i) for i in 0 .. n + 1]
    model = ck.build_model("convnextv2_atto", num_classes=3, input_shape=(32, 32, 3))
    params = optim.parameter_groups(model, 0.9, "single")
    for g, v in zip(params, model.trainable_variables):
        assert g["group"] == groups[g["layer"]]
        assert g["lr_scale"] == pytest.approx(0.9 ** (12 + 1 - g["group"]))
        # optim_factory: no decay for 1-D, ".bias", ".gamma", ".beta" (GRN's included)
        assert g["weight_decay"] == (len(v.shape) > 1), g["path"]
    assert {"stage2_block3_grn/gamma", "stage2_block3_grn/beta"} <= {
        g["path"] for g in params if not g["weight_decay"]
    }
    with pytest.raises(ValueError, match="layer_decay_type must be one of group, single"):
        optim.parameter_groups(model, 0.9, "layerwise")


def test_group_layer_decay_of_v2_base_is_the_v1_table():
    """ConvNeXt-V2's 'group' type (for base/large) is get_num_layer_for_convnext: the same
    table as ConvNeXt-B, GRN layers in their block's group."""
    groups = optim.layer_groups("convnextv2_base", "group")
    for layer, group in groups.items():
        assert group == _expected_group_base(layer), layer
    assert groups["stage2_block26_grn"] == 11


def test_parameter_groups_decay_only_kernels():
    model = ck.build_model("atto", num_classes=3, input_shape=(32, 32, 3))
    groups = optim.parameter_groups(model, 0.7)
    table = optim.layer_groups("atto")
    assert len(groups) == len(model.trainable_variables)
    for g, v in zip(groups, model.trainable_variables):
        assert g["group"] == table[g["layer"]]
        assert g["lr_scale"] == pytest.approx(0.7 ** (13 - g["group"]))
        # No decay for biases, LayerNorm gamma/beta and layer-scale gamma (all 1-D).
        assert g["weight_decay"] == (len(v.shape) > 1), g["path"]
    names = {g["path"] for g in groups if not g["weight_decay"]}
    assert "stage0_block0_layer_scale/gamma" in names and "stem_norm/beta" in names
    assert "head_fc/bias" in names and "head_fc/kernel" not in names


#: A small ConvNeXt (every kind of layer, stage 2 with 3 blocks) that keeps eager steps quick.
MINI = registry.Variant("mini", (1, 1, 3, 1), (8, 16, 16, 24))
#: Adam's epsilon sits outside the bias correction in Keras and inside it in PyTorch; with a
#: negligible epsilon both are the same algorithm, so the comparison is exact to float32.
EPS = 1e-12


def _torch_reference(values, groups, grads_per_update, lr, weight_decay, ema=None):
    """torch.optim.AdamW with the original's param groups; returns params (and their EMA)."""
    import torch

    params = [torch.tensor(v.astype(np.float64), requires_grad=True) for v in values]
    param_groups = [
        {
            "params": [p],
            "lr": lr * g["lr_scale"],
            "weight_decay": weight_decay if g["weight_decay"] else 0.0,
        }
        for p, g in zip(params, groups)
    ]
    opt = torch.optim.AdamW(param_groups, lr=lr, betas=(0.9, 0.999), eps=EPS)
    averages = None
    for grads in grads_per_update:
        for p, g in zip(params, grads):
            p.grad = torch.tensor(g.astype(np.float64))
        opt.step()
        now = [p.detach().numpy().copy() for p in params]
        if ema is not None:
            # timm ModelEma after each update (Keras starts the average at the first update).
            averages = (
                now
                if averages is None
                else [ema * a + (1 - ema) * p for a, p in zip(averages, now)]
            )
    return [p.detach().numpy() for p in params], averages


def _apply(opt, variables, steps):
    """Apply gradient steps: eagerly, or on JAX as fit() does (jitted stateless_apply)."""
    import keras

    if keras.backend.backend() != "jax":
        for grads in steps:
            opt.apply([keras.ops.convert_to_tensor(g) for g in grads], variables)
        return
    import jax

    opt.build(variables)
    apply = jax.jit(opt.stateless_apply)
    values, opt_values = [v.value for v in variables], [v.value for v in opt.variables]
    for grads in steps:
        values, opt_values = apply(opt_values, grads, values)
    for v, x in zip([*variables, *opt.variables], [*values, *opt_values]):
        v.assign(x)


@pytest.mark.backends
def test_optimizer_updates_equal_torch_adamw_with_param_groups():
    import keras

    model = ck.build_model(MINI, num_classes=3, input_shape=(32, 32, 3))
    variables = model.trainable_variables
    rng = np.random.default_rng(0)
    for v in variables:  # move everything off its initial value so decay is visible
        v.assign(rng.normal(0, 0.5, v.shape).astype("float32"))
    start = [np.array(keras.ops.convert_to_numpy(v)) for v in variables]
    lr, wd, decay = 1e-2, 0.1, 0.5
    opt = ck.finetune.optimizer(model, lr=lr, layer_decay=decay, weight_decay=wd, epsilon=EPS)
    grads = [[rng.normal(0, 1, v.shape).astype("float32") for v in variables] for _ in range(3)]
    _apply(opt, variables, grads)

    expected, _ = _torch_reference(start, optim.parameter_groups(model, decay), grads, lr, wd)
    for v, want in zip(variables, expected):
        got = keras.ops.convert_to_numpy(v)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-6, err_msg=v.path)
    # The stem learns at decay**13 of the head's rate: it barely moved, the head moved a lot.
    moved = {
        v.path: np.abs(keras.ops.convert_to_numpy(v) - s).max() for v, s in zip(variables, start)
    }
    assert moved["stem_conv/kernel"] < 1e-5 < 1e-2 < moved["head_fc/kernel"]


@pytest.mark.backends
def test_accumulation_and_ema_equal_torch_per_update():
    import keras

    model = ck.build_model(MINI, num_classes=3, input_shape=(32, 32, 3))
    variables = model.trainable_variables
    rng = np.random.default_rng(1)
    start = [np.array(keras.ops.convert_to_numpy(v)) for v in variables]
    lr, wd, steps, ema = 5e-3, 0.05, 2, 0.9
    opt = ck.finetune.optimizer(
        model, lr=lr, layer_decay=0.8, weight_decay=wd, accumulation=steps, ema=ema, epsilon=EPS
    )
    micro = [[rng.normal(0, 1, v.shape).astype("float32") for v in variables] for _ in range(6)]
    _apply(opt, variables, micro)
    # Three updates, each with the mean gradient of two batches.
    updates = [[(a + b) / 2 for a, b in zip(micro[i], micro[i + 1])] for i in (0, 2, 4)]
    expected, averages = _torch_reference(
        start, optim.parameter_groups(model, 0.8), updates, lr, wd, ema=ema
    )
    for v, want in zip(variables, expected):
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(v), want, rtol=1e-4, atol=2e-6, err_msg=v.path
        )
    for v, got, want in zip(variables, opt.ema_values(), averages):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-6, err_msg=v.path)
    assert int(keras.ops.convert_to_numpy(opt.iterations)) == 3


def _original_cosine_scheduler(base, final, epochs, niter_per_ep, warmup_epochs=0):
    """facebookresearch/ConvNeXt utils.cosine_scheduler (start_warmup_value=0)."""
    warmup_iters = warmup_epochs * niter_per_ep
    warmup = np.linspace(0, base, warmup_iters) if warmup_epochs > 0 else np.array([])
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate((warmup, cosine))


def _values(schedule, steps):
    import keras

    return np.array([float(keras.ops.convert_to_numpy(schedule(s))) for s in steps])


def test_schedule_equals_the_original_cosine_without_warmup():
    # The fine-tuning recipe: no warmup, 30 epochs (shortened), lr 5e-5 -> 1e-6.
    reference = _original_cosine_scheduler(5e-5, 1e-6, epochs=6, niter_per_ep=7)
    schedule = ck.finetune.schedule(5e-5, total_steps=42, min_lr=1e-6)
    np.testing.assert_allclose(_values(schedule, range(42)), reference, rtol=1e-5)


def test_schedule_with_warmup_matches_the_original_after_warmup():
    reference = _original_cosine_scheduler(4e-3, 1e-6, epochs=5, niter_per_ep=10, warmup_epochs=2)
    schedule = ck.finetune.schedule(4e-3, total_steps=50, warmup_steps=20, min_lr=1e-6)
    got = _values(schedule, range(50))
    np.testing.assert_allclose(got[20:], reference[20:], rtol=1e-5)
    # Warmup: linear from 0; Keras reaches the peak one step after np.linspace does.
    np.testing.assert_allclose(got[:20], np.arange(20) * 4e-3 / 20, rtol=1e-5, atol=1e-12)
    assert np.abs(got[:20] - reference[:20]).max() <= 4e-3 / 19 + 1e-9


def test_schedule_counts_updates_when_accumulating():
    plain = ck.finetune.schedule(1e-3, total_steps=10, warmup_steps=2, min_lr=1e-5)
    accumulated = ck.finetune.schedule(
        1e-3, total_steps=10, warmup_steps=2, min_lr=1e-5, accumulation=4
    )
    raw = np.arange(40)
    np.testing.assert_allclose(_values(accumulated, raw), _values(plain, raw // 4), rtol=1e-6)


def test_optimizer_and_schedule_serialize():
    import keras

    model = ck.build_model("atto", num_classes=2, input_shape=(32, 32, 3))
    schedule = ck.finetune.schedule(1e-3, 100, warmup_steps=10, accumulation=2)
    opt = ck.finetune.optimizer(model, lr=schedule, layer_decay=0.6, accumulation=2)
    clone = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
    assert isinstance(clone, optim.LayerDecayAdamW)
    assert clone.lr_scales == opt.lr_scales and clone.no_decay == opt.no_decay
    assert clone.learning_rate.__class__ is optim.WarmupCosine or isinstance(
        clone._learning_rate, optim.WarmupCosine
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"layer_decay": 0.0}, "layer_decay must be in"),
        ({"layer_decay": 1.5}, "layer_decay must be in"),
        ({"weight_decay": -1.0}, "weight_decay must be >= 0"),
        ({"accumulation": 0}, "accumulation must be a positive integer"),
        ({"ema": 1.0}, "ema decay must be in"),
    ],
)
def test_optimizer_rejects_bad_settings(kwargs, message):
    model = ck.build_model("atto", num_classes=2, input_shape=(32, 32, 3))
    with pytest.raises(ValueError, match=message):
        ck.finetune.optimizer(model, **kwargs)


def test_schedule_rejects_bad_settings():
    with pytest.raises(ValueError, match="min_lr must be in"):
        optim.WarmupCosine(1e-3, 10, min_learning_rate=1e-2)
    with pytest.raises(ValueError, match="warmup_steps < total_steps"):
        ck.finetune.schedule(1e-3, total_steps=10, warmup_steps=10)
    with pytest.raises(ValueError, match="learning rate must be positive"):
        ck.finetune.schedule(0.0, total_steps=10)
