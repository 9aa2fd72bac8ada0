"""Fine-tuning with the original ConvNeXt recipe: ``optimizer()`` for your own ``model.fit``,
``run()`` for the whole job (what ``convnext finetune`` calls).

    import convnext_keras as ck
    model = ck.load_model("convnext_tiny_1k_224", num_classes=5, head_init_scale=0.001)
    model.compile(optimizer=ck.finetune.optimizer(model, lr=5e-5, layer_decay=0.8), ...)

    ck.finetune.run("flowers/", "runs/flowers", model="convnext_tiny_1k_224", epochs=10)
"""

from .data import DataError, ImageFolder, mix_batch, random_resized_crop, scan
from .loop import Recipe, RunResult, TrainingDiverged, load_run, plot_curves, resolve_recipe, run
from .optim import (
    LayerDecayAdamW,
    WarmupCosine,
    group_scale,
    layer_group,
    layer_groups,
    optimizer,
    parameter_groups,
    schedule,
)
from .state import StateError

__all__ = [
    "DataError",
    "ImageFolder",
    "LayerDecayAdamW",
    "Recipe",
    "RunResult",
    "StateError",
    "TrainingDiverged",
    "WarmupCosine",
    "group_scale",
    "layer_group",
    "layer_groups",
    "load_run",
    "mix_batch",
    "optimizer",
    "parameter_groups",
    "plot_curves",
    "random_resized_crop",
    "resolve_recipe",
    "run",
    "scan",
    "schedule",
]
