"""An isotropic ConvNeXt in PyTorch, written for the tests from the paper, not from any code.

Liu et al., "A ConvNet for the 2020s" (CVPR 2022), section 3.3 and appendix: an isotropic
ConvNeXt is a ViT-style network built from ConvNeXt blocks - a non-overlapping 16x16 patch
embedding (stride 16), then ``depth`` identical blocks at one width ``dim`` with no
downsampling, global average pooling, a final LayerNorm and the linear classifier.  Each block
is ``x + gamma * MLP(LN(dwconv7x7(x)))`` with an inverted-bottleneck MLP (``4 * dim`` hidden,
GELU); ``gamma`` (layer scale) is optional.  ConvNeXt-S/B/L (iso.) are 384/768/1024 wide and
18/18/36 deep.

The computation is written here in the paper's "1x1 convolution" form, channels first, with
LayerNorm, GELU and pooling spelled out by hand, so that it shares no code path with the
library (which works channels last with Dense layers).  :func:`save_official` writes the
weights in the layout facebookresearch/ConvNeXt publishes for these models (``stem``,
``blocks.N.dwconv`` / ``norm`` / ``pwconv1`` / ``pwconv2`` / ``gamma``, ``norm``, ``head``;
``torch.save({"model": ...})``).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

EPS = 1e-6


def _layer_norm_channels(x: torch.Tensor, weight, bias) -> torch.Tensor:
    """LayerNorm over the channel axis of an NCHW tensor (biased variance, eps 1e-6)."""
    mean = x.mean(dim=1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=1, keepdim=True)
    return (x - mean) / torch.sqrt(var + EPS) * weight[:, None, None] + bias[:, None, None]


def _gelu(x: torch.Tensor) -> torch.Tensor:
    """The exact GELU, x * Phi(x)."""
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


class IsotropicBlock(nn.Module):
    def __init__(self, dim: int, layer_scale: bool):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm_weight = nn.Parameter(torch.ones(dim))
        self.norm_bias = nn.Parameter(torch.zeros(dim))
        self.pw1 = nn.Conv2d(dim, 4 * dim, 1)  # the MLP as 1x1 convolutions
        self.pw2 = nn.Conv2d(4 * dim, dim, 1)
        self.gamma = nn.Parameter(torch.ones(dim)) if layer_scale else None

    def forward(self, x):
        y = _layer_norm_channels(self.dwconv(x), self.norm_weight, self.norm_bias)
        y = self.pw2(_gelu(self.pw1(y)))
        if self.gamma is not None:
            y = y * self.gamma[:, None, None]
        return x + y


class IsotropicConvNeXt(nn.Module):
    def __init__(self, depth: int, dim: int, num_classes: int, layer_scale: bool, patch: int = 16):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.blocks = nn.ModuleList(IsotropicBlock(dim, layer_scale) for _ in range(depth))
        self.final_weight = nn.Parameter(torch.ones(dim))
        self.final_bias = nn.Parameter(torch.zeros(dim))
        self.fc = nn.Linear(dim, num_classes)

    def features(self, x):
        """The blocks' output, NCHW at stride 16."""
        x = self.patch_embed(x)
        for block in self.blocks:
            x = block(x)
        return x

    def forward(self, x):
        """``(logits, pooled features, last feature map NCHW)``."""
        fmap = self.features(x)
        pooled = fmap.mean(dim=(2, 3))
        mean = pooled.mean(-1, keepdim=True)
        var = ((pooled - mean) ** 2).mean(-1, keepdim=True)
        pooled = (pooled - mean) / torch.sqrt(var + EPS) * self.final_weight + self.final_bias
        return self.fc(pooled), pooled, fmap


def model(depth: int, dim: int, num_classes: int, layer_scale: bool, seed: int = 0):
    """An isotropic ConvNeXt with well-spread random weights: unit-scale fan-in kernels (the
    residual branch's last at 0.3x, so that 18-36 blocks without layer scale do not swamp the
    stream), LayerNorm scales in [0.7, 1.3], shifts and biases ~ N(0, 0.1), layer scale in
    [0.1, 0.5]."""
    net = IsotropicConvNeXt(depth, dim, num_classes, layer_scale).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("gamma"):
                p.copy_(torch.rand(p.shape, generator=gen) * 0.4 + 0.1)
            elif name.endswith("norm_weight") or name == "final_weight":
                p.copy_(torch.rand(p.shape, generator=gen) * 0.6 + 0.7)
            elif p.ndim == 1:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            else:
                fan_in = int(np.prod(p.shape[1:]))
                scale = 0.3 if name.endswith("pw2.weight") else 1.0
                p.copy_(torch.randn(p.shape, generator=gen) * scale / np.sqrt(fan_in))
    return net


def official_state_dict(net: IsotropicConvNeXt) -> dict[str, torch.Tensor]:
    """The names and shapes of facebookresearch/ConvNeXt's isotropic checkpoints."""
    out = {"stem.weight": net.patch_embed.weight, "stem.bias": net.patch_embed.bias}
    for i, block in enumerate(net.blocks):
        p = f"blocks.{i}"
        out[f"{p}.dwconv.weight"] = block.dwconv.weight
        out[f"{p}.dwconv.bias"] = block.dwconv.bias
        out[f"{p}.norm.weight"] = block.norm_weight
        out[f"{p}.norm.bias"] = block.norm_bias
        out[f"{p}.pwconv1.weight"] = block.pw1.weight[:, :, 0, 0]  # nn.Linear (out, in)
        out[f"{p}.pwconv1.bias"] = block.pw1.bias
        out[f"{p}.pwconv2.weight"] = block.pw2.weight[:, :, 0, 0]
        out[f"{p}.pwconv2.bias"] = block.pw2.bias
        if block.gamma is not None:
            out[f"{p}.gamma"] = block.gamma
    out.update({"norm.weight": net.final_weight, "norm.bias": net.final_bias})
    out.update({"head.weight": net.fc.weight, "head.bias": net.fc.bias})
    return {k: v.detach().contiguous() for k, v in out.items()}


def save_official(net: IsotropicConvNeXt, path: Path) -> Path:
    torch.save({"model": official_state_dict(net)}, path)
    return path


def outputs(net: IsotropicConvNeXt, images_nhwc: np.ndarray) -> dict[str, np.ndarray]:
    """Logits, pooled features and the last feature map (NHWC) of the reference."""
    x = torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2)))
    with torch.no_grad():
        logits, pooled, fmap = net(x)
    return {
        "logits": logits.numpy(),
        "pooled": pooled.numpy(),
        "stage1": fmap.numpy().transpose(0, 2, 3, 1),
    }
