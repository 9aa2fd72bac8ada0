"""Fine-tuning with the original ConvNeXt recipe: ``optimizer()`` for your own ``model.fit``,
``run()`` for the whole job (what ``convnext finetune`` calls).

    import convnext_keras as ck
    model = ck.load_model("convnext_tiny_1k_224", num_classes=5, head_init_scale=0.001)
    model.compile(optimizer=ck.finetune.optimizer(model, lr=5e-5, layer_decay=0.8), ...)

    ck.finetune.run("flowers/", "runs/flowers", model="convnext_tiny_1k_224", epochs=10)

Names are imported from their modules on first use (as the package's own), so that importing
``convnext_keras.finetune.optim`` when Keras is imported pulls in nothing else.
"""

import lazy_loader as _lazy

#: Module -> the public names it defines, imported on first access.
_PUBLIC = {
    "data": ["DataError", "ImageFolder", "mix_batch", "random_resized_crop", "scan", "shard_rows"],
    "hosts": ["HostLost", "connect_hosts"],
    "loop": ["RunResult", "run"],
    "optim": [
        "LayerDecayAdamW",
        "WarmupCosine",
        "group_scale",
        "layer_group",
        "layer_groups",
        "optimizer",
        "parameter_groups",
        "schedule",
    ],
    "recipe": ["Recipe", "resolve_recipe"],
    "rundir": ["load_run", "plot_curves"],
    "state": ["StateError"],
    "trainer": ["TrainingDiverged"],
}

__getattr__, __dir__, _ = _lazy.attach(
    __name__,
    ["data", "devices", "hosts", "loop", "optim", "recipe", "rundir", "state", "trainer"],
    _PUBLIC,
)
__all__ = sorted(n for names in _PUBLIC.values() for n in names)
