"""An independent PyTorch reference: Hugging Face transformers' ConvNext, and checkpoint writers.

The renaming tables below are written here from the three projects' own module names, on
purpose independently of ``convnext_keras.checkpoints``: a bug in the library's mapping cannot
hide behind the same bug in the test.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from transformers import ConvNextConfig, ConvNextForImageClassification


def hf_model(depths, dims, num_classes: int, seed: int = 0) -> ConvNextForImageClassification:
    """A transformers ConvNext with the original's hyper-parameters and well-spread weights.

    Weights are drawn so that every part of the network visibly changes the output: unit-scale
    fan-in kernels, LayerNorm affine parameters away from 1/0, and layer-scale values far from
    their 1e-6 initialisation (with which the blocks would contribute nothing measurable).
    """
    config = ConvNextConfig(
        depths=list(depths),
        hidden_sizes=list(dims),
        num_labels=num_classes,
        layer_norm_eps=1e-6,
        hidden_act="gelu",
        drop_path_rate=0.0,
        layer_scale_init_value=1e-6,
    )
    torch.manual_seed(seed)
    model = ConvNextForImageClassification(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layer_scale_parameter"):
                p.copy_(torch.rand(p.shape, generator=gen) * 0.4 + 0.1)
            elif p.ndim == 1 and "layernorm" in name and name.endswith("weight"):
                p.copy_(torch.rand(p.shape, generator=gen) * 0.6 + 0.7)
            elif p.ndim == 1:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            else:
                fan_in = int(np.prod(p.shape[1:]))
                p.copy_(torch.randn(p.shape, generator=gen) / np.sqrt(fan_in))
    return model


def hf_outputs(model, images_nhwc: np.ndarray) -> dict[str, np.ndarray]:
    """Logits, pooled features and the 4 stage outputs (NHWC) of the reference model."""
    x = torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2)))
    with torch.no_grad():
        out = model(pixel_values=x, output_hidden_states=True)
        pooled = model.convnext(pixel_values=x).pooler_output
    result = {"logits": out.logits.numpy(), "pooled": pooled.numpy()}
    for i, h in enumerate(out.hidden_states[1:]):
        result[f"stage{i + 1}"] = h.numpy().transpose(0, 2, 3, 1)
    return result


# Hugging Face -> official facebookresearch/ConvNeXt names.
_HF_TO_OFFICIAL = [
    (r"^convnext\.embeddings\.patch_embeddings\.", "downsample_layers.0.0."),
    (r"^convnext\.embeddings\.layernorm\.", "downsample_layers.0.1."),
    (r"^convnext\.encoder\.stages\.(\d+)\.downsampling_layer\.0\.", r"downsample_layers.\1.0."),
    (r"^convnext\.encoder\.stages\.(\d+)\.downsampling_layer\.1\.", r"downsample_layers.\1.1."),
    (r"^convnext\.encoder\.stages\.(\d+)\.layers\.(\d+)\.dwconv\.", r"stages.\1.\2.dwconv."),
    (r"^convnext\.encoder\.stages\.(\d+)\.layers\.(\d+)\.layernorm\.", r"stages.\1.\2.norm."),
    (r"^convnext\.encoder\.stages\.(\d+)\.layers\.(\d+)\.pwconv1\.", r"stages.\1.\2.pwconv1."),
    (r"^convnext\.encoder\.stages\.(\d+)\.layers\.(\d+)\.pwconv2\.", r"stages.\1.\2.pwconv2."),
    (
        r"^convnext\.encoder\.stages\.(\d+)\.layers\.(\d+)\.layer_scale_parameter$",
        r"stages.\1.\2.gamma",
    ),
    (r"^convnext\.layernorm\.", "norm."),
    (r"^classifier\.", "head."),
]
# Official -> timm names (timm/models/convnext.py: stem, stages.N.downsample, blocks, head).
_OFFICIAL_TO_TIMM = [
    (r"^downsample_layers\.0\.0\.", "stem.0."),
    (r"^downsample_layers\.0\.1\.", "stem.1."),
    (r"^downsample_layers\.(\d+)\.(\d)\.", r"stages.\1.downsample.\2."),
    (r"^stages\.(\d+)\.(\d+)\.dwconv\.", r"stages.\1.blocks.\2.conv_dw."),
    (r"^stages\.(\d+)\.(\d+)\.pwconv1\.", r"stages.\1.blocks.\2.mlp.fc1."),
    (r"^stages\.(\d+)\.(\d+)\.pwconv2\.", r"stages.\1.blocks.\2.mlp.fc2."),
    (r"^stages\.(\d+)\.(\d+)\.(norm|gamma)", r"stages.\1.blocks.\2.\3"),
    (r"^norm\.", "head.norm."),
    (r"^head\.", "head.fc."),
]


def _rename(state: dict, rules) -> dict:
    out = {}
    for key, value in state.items():
        for pattern, repl in rules:
            new, n = re.subn(pattern, repl, key)
            if n:
                out[new] = value
                break
        else:
            raise KeyError(f"no rule for {key}")
    return out


def official_state_dict(model) -> dict[str, torch.Tensor]:
    return _rename(model.state_dict(), _HF_TO_OFFICIAL)


def timm_state_dict(model, conv_mlp: bool = False) -> dict[str, torch.Tensor]:
    state = _rename(official_state_dict(model), _OFFICIAL_TO_TIMM)
    if conv_mlp:  # timm's atto..nano store the MLP as 1x1 convolutions
        state = {
            k: (v[:, :, None, None] if re.search(r"mlp\.fc\d\.weight$", k) else v)
            for k, v in state.items()
        }
    return state


def save_official(model, path: Path) -> Path:
    """The official release format: ``torch.save({"model": state_dict})``."""
    torch.save({"model": official_state_dict(model)}, path)
    return path


def save_hf(model, directory: Path) -> Path:
    """transformers' own ``save_pretrained`` (``model.safetensors`` in the HF layout)."""
    model.save_pretrained(directory)
    return Path(directory) / "model.safetensors"


def save_hf_bin(model, path: Path) -> Path:
    """The older ``pytorch_model.bin`` format (a pickled HF-layout state dict)."""
    torch.save(model.state_dict(), path)
    return path


def save_timm(model, path: Path, conv_mlp: bool = False) -> Path:
    """timm's hub format: ``model.safetensors`` with timm's names."""
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in timm_state_dict(model, conv_mlp).items()}
    save_file(state, str(path))
    return path
