"""An independent PyTorch reference: Hugging Face transformers' ConvNext, ConvNextV2 and
DINOv3ConvNext, and checkpoint writers.

The renaming tables below are written here from the projects' own module names, on purpose
independently of ``convnext_keras.weights.convert``: a bug in the library's mapping cannot hide
behind the same bug in the test.  The FCMAE writer builds ConvNeXt V2's sparse pre-training
layout (MinkowskiEngine kernels) from a dense network, offset by offset.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from transformers import (
    ConvNextConfig,
    ConvNextForImageClassification,
    ConvNextV2Config,
    ConvNextV2ForImageClassification,
    DINOv3ConvNextConfig,
    DINOv3ConvNextModel,
)

try:  # transformers >= 5
    from transformers.initialization import no_init_weights
except ImportError:  # transformers 4.x
    from transformers.modeling_utils import no_init_weights


def _well_spread(model, seed: int, residual_scale: float = 1.0):
    """Draw every parameter so that every part of the network visibly changes the output:
    unit-scale fan-in kernels (``pwconv2``'s times ``residual_scale``), LayerNorm affine
    parameters away from 1/0, layer-scale values far from their 1e-6 initialisation, GRN scale
    (of both signs) and shift far from their zero initialisation."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        assert not any(b.numel() for b in model.buffers())  # nothing left undrawn
        for name, p in model.named_parameters():
            if name.endswith("layer_scale_parameter"):
                p.copy_(torch.rand(p.shape, generator=gen) * 0.4 + 0.1)
            elif ".grn." in name and name.endswith("weight"):
                sign = torch.where(torch.rand(p.shape, generator=gen) < 0.5, -1.0, 1.0)
                p.copy_(sign * (torch.rand(p.shape, generator=gen) * 0.4 + 0.1))
            elif (
                p.ndim == 1
                and name.endswith("weight")
                and ("layernorm" in name or "hidden_states_norms" in name)
            ):
                p.copy_(torch.rand(p.shape, generator=gen) * 0.6 + 0.7)
            elif p.ndim == 1 or ".grn." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            else:
                fan_in = int(np.prod(p.shape[1:]))
                scale = residual_scale if "pwconv2" in name else 1.0
                p.copy_(torch.randn(p.shape, generator=gen) * scale / np.sqrt(fan_in))
    return model


def _hf(config_class, model_class, depths, dims, num_classes, **config):
    config = config_class(
        depths=list(depths),
        hidden_sizes=list(dims),
        num_labels=num_classes,
        layer_norm_eps=1e-6,
        hidden_act="gelu",
        drop_path_rate=0.0,
        **config,
    )
    # Every parameter is drawn by _well_spread: transformers' own initialisation only costs time.
    with no_init_weights():
        return model_class(config).eval()


def hf_model(depths, dims, num_classes: int, seed: int = 0) -> ConvNextForImageClassification:
    """A transformers ConvNext with the original's hyper-parameters and well-spread weights."""
    model = _hf(
        ConvNextConfig,
        ConvNextForImageClassification,
        depths,
        dims,
        num_classes,
        layer_scale_init_value=1e-6,
    )
    return _well_spread(model, seed)


def hf_backbone(depths, dims, out_features, *, v2: bool, seed: int = 0):
    """transformers' ``ConvNextBackbone`` / ``ConvNextV2Backbone`` (the backbone of its
    ``UperNetForSemanticSegmentation``: a LayerNorm on the output of each stage in
    ``out_features``, ``hidden_states_norms.stageN``), well-spread weights."""
    import transformers

    names = (
        ("ConvNextV2Config", "ConvNextV2Backbone") if v2 else ("ConvNextConfig", "ConvNextBackbone")
    )
    config_class, model_class = (getattr(transformers, n) for n in names)
    extra = {} if v2 else {"layer_scale_init_value": 1e-6}
    config = config_class(
        depths=list(depths),
        hidden_sizes=list(dims),
        layer_norm_eps=1e-6,
        hidden_act="gelu",
        drop_path_rate=0.0,
        out_features=list(out_features),
        **extra,
    )
    with no_init_weights():
        model = model_class(config).eval()
    return _well_spread(model, seed)


def hf_v2_model(depths, dims, num_classes: int, seed: int = 0) -> ConvNextV2ForImageClassification:
    """A transformers ConvNextV2 (``layer_norm_eps=1e-6``, as the original) with well-spread
    weights, GRN's included (at their zero initialisation GRN is the identity and proves
    nothing).  Its residual branches have no layer scale: ``pwconv2`` is drawn at 0.3x so
    that they do not swamp the stream."""
    model = _hf(ConvNextV2Config, ConvNextV2ForImageClassification, depths, dims, num_classes)
    return _well_spread(model, seed, residual_scale=0.3)


def reference(spec, num_classes: int = 1000, seed: int = 0):
    """The transformers model of a registry ``Variant``: ConvNextV2 for GRN blocks."""
    build = hf_v2_model if spec.block == "grn" else hf_model
    return build(spec.depths, spec.dims, num_classes, seed=seed)


def hf_outputs(model, images_nhwc: np.ndarray) -> dict[str, np.ndarray]:
    """Logits, pooled features and the 4 stage outputs (NHWC) of the reference model."""
    x = torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2)))
    with torch.no_grad():
        # One pass: the backbone's outputs, then the model's own classifier on its pooler
        # output (what ``model(pixel_values=x).logits`` computes).
        out = model.base_model(pixel_values=x, output_hidden_states=True)
        logits = model.classifier(out.pooler_output)
    result = {"logits": logits.numpy(), "pooled": out.pooler_output.numpy()}
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
# Hugging Face ConvNextV2 -> official facebookresearch/ConvNeXt-V2 names: as for ConvNext, with
# the "convnextv2." prefix and GRN ("grn.weight/bias" -> "grn.gamma/beta", both (1, 1, 1, C)).
_HF_V2_TO_OFFICIAL = [
    (
        r"^convnextv2\.encoder\.stages\.(\d+)\.layers\.(\d+)\.grn\.weight$",
        r"stages.\1.\2.grn.gamma",
    ),
    (r"^convnextv2\.encoder\.stages\.(\d+)\.layers\.(\d+)\.grn\.bias$", r"stages.\1.\2.grn.beta"),
    *(
        (pattern.replace("^convnext\\.", "^convnextv2\\."), repl)
        for pattern, repl in _HF_TO_OFFICIAL
    ),
]
# Official -> timm names (timm/models/convnext.py: stem, stages.N.downsample, blocks, head).
_OFFICIAL_TO_TIMM = [
    (r"^downsample_layers\.0\.0\.", "stem.0."),
    (r"^downsample_layers\.0\.1\.", "stem.1."),
    (r"^downsample_layers\.(\d+)\.(\d)\.", r"stages.\1.downsample.\2."),
    (r"^stages\.(\d+)\.(\d+)\.dwconv\.", r"stages.\1.blocks.\2.conv_dw."),
    (r"^stages\.(\d+)\.(\d+)\.pwconv1\.", r"stages.\1.blocks.\2.mlp.fc1."),
    (r"^stages\.(\d+)\.(\d+)\.pwconv2\.", r"stages.\1.blocks.\2.mlp.fc2."),
    (r"^stages\.(\d+)\.(\d+)\.grn\.gamma$", r"stages.\1.blocks.\2.mlp.grn.weight"),
    (r"^stages\.(\d+)\.(\d+)\.grn\.beta$", r"stages.\1.blocks.\2.mlp.grn.bias"),
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
    """The official layout (ConvNeXt's, or ConvNeXt V2's for a ConvNextV2 model)."""
    if isinstance(model, ConvNextV2ForImageClassification):
        return _rename(model.state_dict(), _HF_V2_TO_OFFICIAL)
    return _rename(model.state_dict(), _HF_TO_OFFICIAL)


def timm_state_dict(model, conv_mlp: bool = False) -> dict[str, torch.Tensor]:
    state = _rename(official_state_dict(model), _OFFICIAL_TO_TIMM)
    # timm's GlobalResponseNorm holds 1-D weight/bias.
    state = {k: (v.reshape(-1) if ".grn." in k else v) for k, v in state.items()}
    if conv_mlp:  # timm's atto..nano store the MLP as 1x1 convolutions
        state = {
            k: (v[:, :, None, None] if re.search(r"mlp\.fc\d\.weight$", k) else v)
            for k, v in state.items()
        }
    return state


def minkowski_kernel(weight: torch.Tensor) -> torch.Tensor:
    """A dense convolution weight as MinkowskiEngine stores the kernel of the same convolution.

    MinkowskiEngine enumerates a 2-D kernel's offsets with the first spatial axis (height)
    fastest, offset ``(h, w)`` in row ``h + k * w``; each row holds the ``(in, out)`` matrix of
    that offset (``MinkowskiConvolution.kernel``: ``(k*k, in, out)``), or the per-channel
    taps of a depthwise kernel (``MinkowskiDepthwiseConvolution.kernel``: ``(k*k, channels)``).
    Dense weights: ``(out, in, k, k)``; depthwise ``(channels, 1, k, k)``.
    """
    out_ch, in_ch, kh, kw = weight.shape
    assert kh == kw
    depthwise = in_ch == 1 and out_ch > 1
    rows = []
    for w in range(kw):  # row index h + k * w: h runs fastest
        for h in range(kh):
            taps = weight[:, :, h, w]  # (out, in)
            rows.append(taps[:, 0] if depthwise else taps.T)
    return torch.stack(rows).contiguous()


def fcmae_state_dict(model, decoder_dim: int = 32) -> dict[str, torch.Tensor]:
    """The checkpoint of ConvNeXt V2's FCMAE pre-training (``models/fcmae.py``) whose encoder
    is ``model``'s backbone: the sparse encoder under ``encoder.`` (MinkowskiEngine kernels,
    ``(1, C)`` biases and GRN parameters, ``ln.`` / ``linear.`` wrappers, no final norm, no
    head) and the decoder's tensors, random (a projection, the mask token, one dense V2 block,
    the pixel predictor), which the encoder does not use."""
    out = {}
    for key, value in official_state_dict(model).items():
        if key.startswith(("norm.", "head.")):
            continue
        name = "encoder." + key
        if key.startswith("downsample_layers.0."):  # the dense stem: Conv2d + LayerNorm
            out[name] = value
        elif re.search(r"(dwconv|downsample_layers\.\d\.1)\.weight$", key):
            out[name.removesuffix("weight") + "kernel"] = minkowski_kernel(value)
        elif re.search(r"(dwconv|downsample_layers\.\d\.1)\.bias$", key):
            out[name] = value.reshape(1, -1)
        elif re.search(r"(\.norm|downsample_layers\.\d\.0)\.(weight|bias)$", key):
            out[re.sub(r"\.(weight|bias)$", r".ln.\1", name)] = value
        elif re.search(r"pwconv\d\.(weight|bias)$", key):
            out[re.sub(r"\.(weight|bias)$", r".linear.\1", name)] = value
        elif ".grn." in key:
            out[name] = value.reshape(1, -1)
        else:
            raise KeyError(f"no FCMAE name for {key}")
    gen = torch.Generator().manual_seed(7)
    dims = model.config.hidden_sizes
    out["proj.weight"] = torch.randn(decoder_dim, dims[-1], 1, 1, generator=gen)
    out["proj.bias"] = torch.randn(decoder_dim, generator=gen)
    out["mask_token"] = torch.randn(1, decoder_dim, 1, 1, generator=gen)
    block = {
        "dwconv.weight": (decoder_dim, 1, 7, 7),
        "dwconv.bias": (decoder_dim,),
        "norm.weight": (decoder_dim,),
        "norm.bias": (decoder_dim,),
        "pwconv1.weight": (4 * decoder_dim, decoder_dim),
        "pwconv1.bias": (4 * decoder_dim,),
        "grn.gamma": (1, 1, 1, 4 * decoder_dim),
        "grn.beta": (1, 1, 1, 4 * decoder_dim),
        "pwconv2.weight": (decoder_dim, 4 * decoder_dim),
        "pwconv2.bias": (decoder_dim,),
    }
    for key, shape in block.items():
        out[f"decoder.0.{key}"] = torch.randn(*shape, generator=gen)
    out["pred.weight"] = torch.randn(32 * 32 * 3, decoder_dim, 1, 1, generator=gen)
    out["pred.bias"] = torch.randn(32 * 32 * 3, generator=gen)
    return out


def save_fcmae(model, path: Path) -> Path:
    """The FCMAE release format: ``torch.save({"model": fcmae_state_dict})``."""
    torch.save({"model": fcmae_state_dict(model)}, path)
    return path


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


# ---------------------------------------------------------------------------------------------
# DINOv3 ConvNeXt (transformers' DINOv3ConvNextModel; facebookresearch/dinov3 models/convnext.py)


def hf_dinov3_model(depths, dims, seed: int = 0) -> DINOv3ConvNextModel:
    """transformers' DINOv3 ConvNeXt (no classifier) with well-spread weights: layer scale in
    [0.1, 0.5], every LayerNorm scale in [0.7, 1.3] and shift ~ N(0, 0.1), fan-in kernels."""
    config = DINOv3ConvNextConfig(
        depths=list(depths),
        hidden_sizes=list(dims),
        layer_norm_eps=1e-6,
        hidden_act="gelu",
        drop_path_rate=0.0,
        layer_scale_init_value=1e-6,
    )
    with no_init_weights():
        model = DINOv3ConvNextModel(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".gamma"):
                p.copy_(torch.rand(p.shape, generator=gen) * 0.4 + 0.1)
            elif p.ndim == 1 and name.endswith("weight"):  # a LayerNorm's scale
                p.copy_(torch.rand(p.shape, generator=gen) * 0.6 + 0.7)
            elif p.ndim == 1:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            else:
                fan_in = int(np.prod(p.shape[1:]))
                p.copy_(torch.randn(p.shape, generator=gen) / np.sqrt(fan_in))
    return model


def dinov3_outputs(model, images_nhwc: np.ndarray) -> dict[str, np.ndarray]:
    """The global descriptor (``pooled``: the normalised "[CLS]" token), the normalised patch
    tokens as an NHWC map (``dense``, stride 32) and the 4 stage outputs (NHWC)."""
    x = torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2)))
    with torch.no_grad():
        out = model(pixel_values=x, output_hidden_states=True)
    stage4 = out.hidden_states[-1]
    n, c, h, w = stage4.shape
    result = {
        "pooled": out.pooler_output.numpy(),
        "dense": out.last_hidden_state[:, 1:].reshape(n, h, w, c).numpy(),
    }
    for i, hidden in enumerate(out.hidden_states[1:]):
        result[f"stage{i + 1}"] = hidden.numpy().transpose(0, 2, 3, 1)
    return result


# transformers' DINOv3ConvNext -> facebookresearch/dinov3's names (its ConvNeXt is the original
# ConvNeXt's, no head).
_DINOV3_HF_TO_OFFICIAL = [
    (r"^model\.stages\.(\d+)\.downsample_layers\.(\d)\.", r"downsample_layers.\1.\2."),
    (r"^model\.stages\.(\d+)\.layers\.(\d+)\.depthwise_conv\.", r"stages.\1.\2.dwconv."),
    (r"^model\.stages\.(\d+)\.layers\.(\d+)\.layer_norm\.", r"stages.\1.\2.norm."),
    (r"^model\.stages\.(\d+)\.layers\.(\d+)\.pointwise_conv1\.", r"stages.\1.\2.pwconv1."),
    (r"^model\.stages\.(\d+)\.layers\.(\d+)\.pointwise_conv2\.", r"stages.\1.\2.pwconv2."),
    (r"^model\.stages\.(\d+)\.layers\.(\d+)\.gamma$", r"stages.\1.\2.gamma"),
    (r"^layer_norm\.", "norm."),
]


def dinov3_official_state_dict(model) -> dict[str, torch.Tensor]:
    """facebookresearch/dinov3's state dict of its ConvNeXt: the original ConvNeXt's names, and
    the final LayerNorm a second time as ``norms.3`` (``self.norms.append(self.norm)``)."""
    state = _rename(model.state_dict(), _DINOV3_HF_TO_OFFICIAL)
    state["norms.3.weight"] = state["norm.weight"]
    state["norms.3.bias"] = state["norm.bias"]
    return state


def save_dinov3_official(model, path: Path) -> Path:
    """The released ``.pth``: the bare state dict (dinov3's hub loads it with
    ``load_state_dict(strict=True)``)."""
    torch.save(dinov3_official_state_dict(model), path)
    return path


def save_dinov3_hub(model, path: Path) -> Path:
    """The Hub's ``model.safetensors`` of ``facebook/dinov3-convnext-*``: transformers' names as
    4.56 wrote them (``stages.N``, without the ``model.`` prefix transformers 5 adds; its
    ``conversion_mapping`` renames them on load)."""
    from safetensors.torch import save_file

    state = {re.sub(r"^model\.", "", k): v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path))
    return path
