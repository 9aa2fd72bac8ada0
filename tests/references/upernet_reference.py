"""An independent PyTorch reference for UperNet-ConvNeXt: Hugging Face transformers'
``UperNetForSemanticSegmentation`` with a ConvNext backbone, and a writer of the official
mmsegmentation checkpoint layout.

The renaming table (transformers -> mmseg) is the tests' own: the backbone part reuses the
tests' transformers -> official ConvNeXt table (``torch_reference``), with the ``backbone.``
prefix, and adds the segmentation parts from mmseg's module names (``norm{i}`` on the stage
outputs, ``ConvModule``'s ``conv`` / ``bn``, ``conv_seg``), independently of
``convnext_keras.weights.convert``.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
import torch_reference as ref
from transformers import ConvNextConfig, UperNetConfig, UperNetForSemanticSegmentation

#: ADE20K, and the decoder of every official checkpoint (upernet_convnext.py).
CLASSES = 150
CHANNELS = 512
POOL_SCALES = (1, 2, 3, 6)


def hf_upernet(
    spec, classes: int = CLASSES, seed: int = 0, channels: int = CHANNELS
) -> UperNetForSemanticSegmentation:
    """A transformers UperNet-ConvNeXt of a registry ``Variant`` (backbone LayerNorms with
    eps 1e-6, as the original; the auxiliary FCN head on stage 3, as the released files carry
    it) with well-spread weights: every BatchNorm's running mean and variance away from 0 and
    1, its scale and shift away from 1 and 0.  ``channels``: the decoder's width (512 in every
    official checkpoint)."""
    backbone = ConvNextConfig(
        depths=list(spec.depths),
        hidden_sizes=list(spec.dims),
        out_features=["stage1", "stage2", "stage3", "stage4"],
        layer_norm_eps=1e-6,
        layer_scale_init_value=1e-6,
        drop_path_rate=0.0,
    )
    config = UperNetConfig(
        backbone_config=backbone,
        num_labels=classes,
        hidden_size=channels,
        pool_scales=list(POOL_SCALES),
        use_auxiliary_head=True,
        auxiliary_in_channels=spec.dims[2],
    )
    with ref.no_init_weights():
        model = UperNetForSemanticSegmentation(config).eval()
    gen = torch.Generator().manual_seed(seed)

    def uniform(shape, low, high):
        return torch.rand(shape, generator=gen) * (high - low) + low

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layer_scale_parameter"):
                p.copy_(uniform(p.shape, 0.1, 0.5))
            elif p.ndim == 1 and name.endswith("weight"):  # LayerNorm and BatchNorm scales
                p.copy_(uniform(p.shape, 0.7, 1.3))
            elif p.ndim == 1:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            else:
                fan_in = int(np.prod(p.shape[1:]))
                p.copy_(torch.randn(p.shape, generator=gen) / np.sqrt(fan_in))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=gen) * 0.3)
            elif name.endswith("running_var"):
                b.copy_(uniform(b.shape, 0.5, 2.0))
            elif name.endswith("num_batches_tracked"):
                b.fill_(160000)
    return model


def logits(model, images_nhwc: np.ndarray) -> np.ndarray:
    """The model's own forward pass: per-pixel logits at the input size, NHWC."""
    x = torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2)))
    with torch.no_grad():
        out = model(pixel_values=x).logits
    return out.numpy().transpose(0, 2, 3, 1)


# transformers UperNet -> mmsegmentation EncoderDecoder names.
_BACKBONE = [
    (pattern.replace(r"^convnext\.", r"^backbone\."), "backbone." + repl)
    for pattern, repl in ref._HF_TO_OFFICIAL
    if pattern.startswith(r"^convnext\.")
]
_HEADS = [
    (r"^(decode_head|auxiliary_head)\.(.*)\.batch_norm\.", r"\1.\2.bn."),
    (r"^(decode_head|auxiliary_head)\.classifier\.", r"\1.conv_seg."),
    (r"^(decode_head|auxiliary_head)\.", r"\1."),
]


def mmseg_state_dict(model) -> dict[str, torch.Tensor]:
    """The state dict of the official ``upernet_convnext_*.pth`` files."""
    out = {}
    for key, value in model.state_dict().items():
        stage = re.match(r"^backbone\.hidden_states_norms\.stage(\d)\.(weight|bias)$", key)
        if stage:
            out[f"backbone.norm{int(stage.group(1)) - 1}.{stage.group(2)}"] = value
            continue
        for pattern, repl in _BACKBONE + _HEADS:
            new, n = re.subn(pattern, repl, key)
            if n:
                out[new] = value
                break
        else:
            raise KeyError(f"no mmseg name for {key}")
    return out


def training_meta() -> dict:
    """A ``meta`` entry as mmcv's checkpoint hook writes it (plain Python values)."""
    return {
        "mmseg_version": "0.11.0+8b57ed1",
        "config": "model = dict(type='EncoderDecoder', ...)",
        "CLASSES": tuple(f"class{i}" for i in range(CLASSES)),
        "PALETTE": [[i, 255 - i, (7 * i) % 256] for i in range(CLASSES)],
        "env_info": "sys.platform: linux\nPython: 3.7.10",
        "seed": 0,
        "exp_name": "upernet_convnext_tiny_512_160k_ade20k_ss.py",
        "mmcv_version": "1.3.0",
        "time": "Sat Jan  8 10:00:00 2022",
        "epoch": 16,
        "iter": 160000,
        "hook_msgs": {"last_ckpt": "/work_dirs/iter_160000.pth"},
    }


def save_mmseg(model, path: Path, meta=None) -> Path:
    """The release format: ``torch.save({"meta": ..., "state_dict": ...})``."""
    torch.save(
        {"meta": training_meta() if meta is None else meta, "state_dict": mmseg_state_dict(model)},
        path,
    )
    return Path(path)
