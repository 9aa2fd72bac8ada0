"""Read checkpoints safely, detect their layout, and map them onto the Keras model.

Conversion is a chain of pure functions on ``{name: numpy array}`` dictionaries:

    read_state_dict(path)            file -> state dict (never executes pickled code)
    to_official_layout(sd)           official | isotropic | timm | Hugging Face | FCMAE |
                                     DINOv3 (Hugging Face) names -> official
    convert_state_dict(sd, variant)  official names -> {keras layer name: [weights]}
    assign_weights(model, weights)   set them on a built model, checking every layer

The layouts, detected from the tensor names (never asked for): the original repositories'
(facebookresearch/ConvNeXt and ConvNeXt-V2 ``models/convnext*.py``; facebookresearch/dinov3
``models/convnext.py`` is the same, without head), the isotropic ConvNeXt's
(``models/convnext_isotropic.py``: ``stem``, ``blocks.N``; renamed to the official names of a
network with one stage), timm's (``timm/models/convnext.py``), Hugging Face transformers'
(``ConvNext*`` / ``ConvNextV2*``, and ``DINOv3ConvNext*`` as the Hub's
``facebook/dinov3-convnext-*`` files store it) and the sparse encoder of ConvNeXt V2's FCMAE
pre-training (``models/fcmae.py``, ``models/convnextv2_sparse.py``: MinkowskiEngine kernels).

Every tensor is accounted for: missing, unexpected or wrongly shaped tensors raise a
``CheckpointError`` naming the key, both shapes and what to do about it.  A ConvNeXt checkpoint
given to a ConvNeXt V2 name (or the reverse) is an error naming the model it fits.
"""

from __future__ import annotations

import argparse
import logging
import math
import re
import struct
from pathlib import Path

import numpy as np

from convnext_keras import registry
from convnext_keras.errors import plain
from convnext_keras.interface import fix


class CheckpointError(ValueError):
    """A checkpoint that cannot be used for the requested model."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint whose pickle wants to run code or build objects other than tensors."""


LAYOUTS = ("official", "isotropic", "timm", "huggingface", "dinov3-huggingface", "fcmae")

_LOG = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------------------------

_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = b"\x80"


def sniff_format(path: str | Path) -> str:
    """``"safetensors"``, ``"torch-zip"`` or ``"torch-pickle"`` from the first bytes of a file."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(_ZIP_MAGIC):
        return "torch-zip"
    if head.startswith(_PICKLE_PROTO):
        return "torch-pickle"
    if len(head) >= 9:
        (header_len,) = struct.unpack("<Q", head[:8])
        if head[8:9] == b"{" and 0 < header_len < 100_000_000:
            return "safetensors"
    text = head.lstrip().lower()
    if text.startswith((b"<!doctype", b"<html", b"<?xml", b"{")):
        what = "an HTML/XML/JSON document (an error page?)"
    elif not head:
        what = "empty"
    else:
        what = f"not a checkpoint (first bytes {head[:16]!r})"
    raise CheckpointError(
        f"{path} is {what}. Expected a PyTorch checkpoint (.pth/.bin) or a .safetensors file."
    )


def _torch_to_numpy(tensor) -> np.ndarray:
    import torch

    tensor = tensor.detach().cpu()
    if tensor.is_floating_point() and tensor.dtype != torch.float32:
        tensor = tensor.float()
    return tensor.numpy()


#: A zip checkpoint may declare at most this many times its own size of content, or
#: ``ZIP_MIN_LIMIT`` bytes if that is more (:func:`check_zip`).  PyTorch stores tensors
#: uncompressed (ratio 1); a record that inflates far beyond its file is a zip bomb.
ZIP_INFLATION = 4
ZIP_MIN_LIMIT = 16 << 20


def check_zip(path: Path) -> None:
    """Refuse a ``.pth`` zip whose records claim more bytes than the file can hold, or whose
    bytes changed, before PyTorch reads (and allocates) anything.

    The uncompressed sizes the zip declares (``ZipInfo.file_size``) must total at most
    ``ZIP_INFLATION`` times the file's size (``ZIP_MIN_LIMIT`` at least); then every record's
    CRC-32 is checked (``zipfile.testzip``), which PyTorch itself skips: one changed byte in a
    tensor is found here.
    """
    import zipfile

    size = path.stat().st_size
    limit = max(ZIP_INFLATION * size, ZIP_MIN_LIMIT)
    try:
        with zipfile.ZipFile(path) as archive:
            declared = sum(info.file_size for info in archive.infolist())
            if declared > limit:
                raise CheckpointError(
                    f"Refused {path}: its records declare {declared:,} bytes of content in a "
                    f"{size:,}-byte file (more than {limit:,}), so it was not read. It is damaged "
                    "or built to exhaust memory (a zip bomb); PyTorch checkpoints store tensors "
                    "uncompressed."
                )
            damaged = archive.testzip()
    except (zipfile.BadZipFile, EOFError) as e:
        raise CheckpointError(
            f"{path} is not a complete PyTorch checkpoint ({e}); it is truncated or damaged: "
            "download it again."
        ) from e
    if damaged is not None:
        raise CheckpointError(
            f"{path} is damaged: the CRC-32 of its record {damaged!r} does not match its bytes "
            "(changed in transit or on disk); download it again."
        )


def _load_torch(path: Path):
    if sniff_format(path) == "torch-zip":
        check_zip(path)
    try:
        import torch
    except ImportError as e:
        raise CheckpointError(
            f"Reading {path.name} (a PyTorch checkpoint) needs PyTorch: "
            "pip install 'convnext-keras[torch]'. Safetensors files need no PyTorch."
        ) from e
    import argparse
    import pickle

    # weights_only=True: the unpickler builds tensors and plain containers only and refuses any
    # other global, so a crafted file cannot run code. argparse.Namespace is allowed because the
    # original training script stores its arguments in full checkpoints.
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        loaded = _load_skipping_meta(path)
        if loaded is not None:
            return loaded
        # PyTorch's first line advises weights_only=False; the line naming the global says why.
        lines = [line.strip() for line in plain(str(e)).splitlines() if line.strip()] or [""]
        reason = next((line for line in lines if "global" in line.lower()), lines[0])
        raise UnsafeCheckpointError(
            f"Refused to load {path}: its pickle asks for objects other than tensors and plain "
            f"containers, which could run arbitrary code ({reason}). "
            "Only load checkpoints from sources you trust; if you trust this one, re-save its "
            "state dict with torch.save(model.state_dict(), ...) or as .safetensors."
        ) from e
    except RuntimeError as e:
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint: {plain(str(e)).strip()}"
        ) from e


class _Skipped:
    """Stands in for an object of a checkpoint's ``meta`` entry whose class or function the
    restricted reader does not build: the pickled name is never imported nor called, and the
    stand-in keeps nothing of its arguments or state."""

    def __new__(cls, *args, **kwargs):
        return super().__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


def _holds_skipped(obj) -> bool:
    """Whether ``obj`` (nested containers, cycles included) holds a :class:`_Skipped`
    stand-in or its class."""
    pending, seen = [obj], set()
    while pending:
        item = pending.pop()
        if item is _Skipped or isinstance(item, _Skipped):
            return True
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, dict):
            pending += [*item.keys(), *item.values()]
        elif isinstance(item, (list, tuple, set, frozenset)):
            pending += list(item)
        elif isinstance(item, argparse.Namespace):
            pending.append(vars(item))
    return False


def _load_skipping_meta(path: Path):
    """A zip checkpoint whose only objects beyond tensors and plain containers are in its
    ``meta`` entry (mmsegmentation / mmcv training checkpoints keep the run's environment,
    config and class names there): the file read with every such object replaced by an inert
    :class:`_Skipped`, ``meta`` dropped, a warning naming what was skipped.  None when that is
    not the case - the caller then refuses the file - including globals of modules PyTorch
    blocks outright (``os``, ``sys``...).  Nothing from the pickle is run either way."""
    import pickle

    import torch

    if sniff_format(path) != "torch-zip":
        return None
    try:  # reads the pickle's opcodes; builds nothing
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # not a torch.save zip file: let the first error stand
        return None
    if not names:
        return None
    stand_ins = [(_Skipped, name) for name in names]
    try:
        with torch.serialization.safe_globals([argparse.Namespace, *stand_ins]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, TypeError):
        return None
    if not isinstance(obj, dict) or not _holds_skipped(obj.get("meta")):
        return None
    if any(_holds_skipped(v) for k, v in obj.items() if k != "meta"):
        return None
    del obj["meta"]
    _LOG.warning(
        "%s: its 'meta' entry pickles objects other than tensors and plain containers (%s); "
        "they were skipped without running anything, and the tensors loaded.",
        path,
        ", ".join(sorted(names)),
    )
    return obj


def _unwrap(obj, path: Path) -> dict:
    """Find the state dict inside a checkpoint container (official ``{"model": ...}`` etc.)."""
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"{path} holds a {type(obj).__name__}, not a dict of tensors; save the model's "
            "state_dict() rather than the model object."
        )
    for key in ("model", "state_dict", "model_ema", "state_dict_ema", "module"):
        inner = obj.get(key)
        if isinstance(inner, dict) and inner and _looks_like_tensors(inner):
            return inner
    if _looks_like_tensors(obj):
        return obj
    raise CheckpointError(
        f"{path} holds no state dict: top-level keys are {sorted(map(str, obj))[:10]}; expected "
        "tensors, or a 'model' / 'state_dict' entry holding them."
    )


def _looks_like_tensors(d: dict) -> bool:
    values = list(d.values())
    return bool(values) and all(hasattr(v, "shape") for v in values)


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Read ``.pth`` / ``.bin`` / ``.safetensors`` into ``{name: float32 numpy array}``.

    PyTorch pickles are read with ``torch.load(weights_only=True)`` (crafted files are refused
    with ``UnsafeCheckpointError``); safetensors files are read without PyTorch.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint file not found: {path}")
    fmt = sniff_format(path)
    if fmt == "safetensors":
        from safetensors.numpy import load_file

        try:
            raw = load_file(str(path))
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(
                f"{path} is not a valid safetensors file: {plain(str(e)).strip()}"
            ) from e
        state = {k: np.asarray(v, dtype=np.float32) for k, v in raw.items()}
    else:
        state = {}
        for key, value in _unwrap(_load_torch(path), path).items():
            if not hasattr(value, "detach"):
                raise CheckpointError(
                    f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor."
                )
            state[str(key)] = _torch_to_numpy(value)
    if not state:
        raise CheckpointError(f"{path} contains no tensors.")
    # DistributedDataParallel wraps names in "module."
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


# ---------------------------------------------------------------------------------------------
# Layouts
# ---------------------------------------------------------------------------------------------

# (pattern, replacement) applied in order; the first match wins.
_TIMM_RULES = [
    (r"^stem\.0\.", "downsample_layers.0.0."),
    (r"^stem\.1\.", "downsample_layers.0.1."),
    (r"^stages\.(\d+)\.downsample\.(\d)\.", r"downsample_layers.\1.\2."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.conv_dw\.", r"stages.\1.\2.dwconv."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.mlp\.fc1\.", r"stages.\1.\2.pwconv1."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.mlp\.fc2\.", r"stages.\1.\2.pwconv2."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.mlp\.grn\.weight$", r"stages.\1.\2.grn.gamma"),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.mlp\.grn\.bias$", r"stages.\1.\2.grn.beta"),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.", r"stages.\1.\2."),  # norm, gamma
    (r"^head\.norm\.", "norm."),
    (r"^head\.fc\.", "head."),
]
_HF_RULES = [
    (r"^embeddings\.patch_embeddings\.", "downsample_layers.0.0."),
    (r"^embeddings\.layernorm\.", "downsample_layers.0.1."),
    (r"^encoder\.stages\.(\d+)\.downsampling_layer\.(\d)\.", r"downsample_layers.\1.\2."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.layernorm\.", r"stages.\1.\2.norm."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.layer_scale_parameter$", r"stages.\1.\2.gamma"),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.grn\.weight$", r"stages.\1.\2.grn.gamma"),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.grn\.bias$", r"stages.\1.\2.grn.beta"),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.", r"stages.\1.\2."),  # dwconv, pwconv1/2
    (r"^layernorm\.", "norm."),
    (r"^classifier\.", "head."),
]
# facebookresearch/ConvNeXt models/convnext_isotropic.py: the official names of a network whose
# stem (a patch convolution, no LayerNorm) and one stage of blocks are "downsample_layers.0.0"
# and "stages.0".
_ISOTROPIC_RULES = [
    (r"^stem\.", "downsample_layers.0.0."),
    (r"^blocks\.(\d+)\.", r"stages.0.\1."),
    (r"^(norm|head)\.", r"\1."),
]
# transformers' DINOv3ConvNextModel: "stages.N" as the Hub's files store it (transformers 4.56),
# "model.stages.N" as transformers >= 5 saves it; the final LayerNorm is "layer_norm".
_DINOV3_HF_RULES = [
    (r"^(?:model\.)?stages\.(\d+)\.downsample_layers\.(\d)\.", r"downsample_layers.\1.\2."),
    (r"^(?:model\.)?stages\.(\d+)\.layers\.(\d+)\.depthwise_conv\.", r"stages.\1.\2.dwconv."),
    (r"^(?:model\.)?stages\.(\d+)\.layers\.(\d+)\.layer_norm\.", r"stages.\1.\2.norm."),
    (r"^(?:model\.)?stages\.(\d+)\.layers\.(\d+)\.pointwise_conv1\.", r"stages.\1.\2.pwconv1."),
    (r"^(?:model\.)?stages\.(\d+)\.layers\.(\d+)\.pointwise_conv2\.", r"stages.\1.\2.pwconv2."),
    (r"^(?:model\.)?stages\.(\d+)\.layers\.(\d+)\.gamma$", r"stages.\1.\2.gamma"),
    (r"^layer_norm\.", "norm."),
]
_DINOV3_HF_KEY = re.compile(r"^(?:model\.)?stages\.\d+\.(?:downsample_layers|layers)\.")
# facebookresearch/dinov3 models/convnext.py lists the final LayerNorm a second time as
# "norms.3" (self.norms.append(self.norm)), so its state dict holds the same tensors twice.
_SECOND_NAME = re.compile(r"^norms\.\d+\.(weight|bias)$")
# FCMAE: the sparse encoder under "encoder."; MinkowskiLayerNorm / MinkowskiLinear wrap
# nn.LayerNorm / nn.Linear as ".ln" / ".linear"; convolutions hold a ".kernel" (re-laid out by
# _minkowski_kernel).  The stem is a dense Conv2d + LayerNorm, named as in the official layout.
_FCMAE_RULES = [
    (r"^encoder\.(.*)\.(ln|linear)\.(weight|bias)$", r"\1.\3"),
    (r"^encoder\.(.*)\.kernel$", r"\1.weight"),
    (r"^encoder\.", ""),
]
#: Tensors of an FCMAE file that only the pre-training uses (the decoder: 1x1 projection, mask
#: token, one dense V2 block, pixel prediction); dropped, and listed in a debug message.
_FCMAE_DECODER = re.compile(r"^(decoder\.|proj\.|pred\.|mask_token$)")


def detect_layout(state_dict: dict) -> str:
    """One of :data:`LAYOUTS`, from the tensor names."""
    keys = list(state_dict)
    hf = ("convnext.embeddings.", "convnextv2.embeddings.", "embeddings.patch_embeddings.")
    if any(k.startswith(hf) for k in keys):
        return "huggingface"
    if any(_DINOV3_HF_KEY.match(k) for k in keys):
        return "dinov3-huggingface"
    if any(k.startswith("encoder.downsample_layers.") for k in keys):
        return "fcmae"
    if any(k.startswith("stem.0.") for k in keys) or any(".blocks." in k for k in keys):
        return "timm"
    if "stem.weight" in state_dict or any(k.startswith("blocks.") for k in keys):
        return "isotropic"
    if any(k.startswith("downsample_layers.0.0.") for k in keys):
        return "official"
    raise CheckpointError(
        "Not a ConvNeXt checkpoint in a known layout (official facebookresearch/ConvNeXt, its "
        "isotropic models, ConvNeXt-V2 or DINOv3, the FCMAE pre-training, timm or Hugging Face "
        f"transformers). First keys: {keys[:5]}"
    )


def _drop_second_names(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Drop DINOv3's second name of the final LayerNorm (``norms.3.*``), checking it holds the
    same tensors as ``norm.*``; ``CheckpointError`` when it does not."""
    out = {}
    for key, value in state.items():
        m = _SECOND_NAME.match(key)
        if m is None:
            out[key] = value
            continue
        first = state.get(f"norm.{m.group(1)}")
        if first is None or first.shape != value.shape or not np.array_equal(first, value):
            raise CheckpointError(
                f"{key} is not a second name of norm.{m.group(1)} (as in facebookresearch/dinov3 "
                "models/convnext.py): the two differ, so the file is damaged or not a ConvNeXt."
            )
    return out


def _minkowski_kernel(kernel: np.ndarray, key: str) -> np.ndarray:
    """A MinkowskiEngine convolution kernel as the dense PyTorch weight it computes.

    MinkowskiEngine stores a 2-D convolution's kernel as ``(k*k, in, out)`` (a depthwise one as
    ``(k*k, channels)``), one row per kernel offset, the offsets enumerated with the first
    spatial axis (height) fastest: row ``h + k * w``.  The dense weight is
    ``(out, in, k, k)`` (depthwise ``(channels, 1, k, k)``).  This is the re-layout the original
    fine-tuning applies (ConvNeXt-V2 ``utils.py``, ``remap_checkpoint_keys``).
    """
    side = math.isqrt(kernel.shape[0])
    if side * side != kernel.shape[0] or kernel.ndim not in (2, 3):
        raise CheckpointError(
            f"{key}: shape {tuple(kernel.shape)} is not a MinkowskiEngine 2-D kernel "
            "(k*k, in, out) or depthwise (k*k, channels)."
        )
    # (k*k, ...) -> (w, h, ...): row h + k * w is [w, h].
    grid = kernel.reshape(side, side, *kernel.shape[1:])
    if kernel.ndim == 3:  # (w, h, in, out) -> (out, in, h, w)
        return np.ascontiguousarray(grid.transpose(3, 2, 1, 0))
    return np.ascontiguousarray(grid.transpose(2, 1, 0)[:, None])  # (channels, 1, h, w)


def _fcmae_value(name: str, key: str, value: np.ndarray) -> np.ndarray:
    if key.endswith(".kernel"):
        return _minkowski_kernel(value, key)
    if name.endswith(".bias") and value.ndim == 2 and value.shape[0] == 1:
        return value.reshape(-1)  # MinkowskiConvolution biases are (1, out)
    return value


def to_official_layout(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rename a state dict of any :data:`LAYOUTS` layout to the official names (detected, not
    asked), with the official shapes (GRN parameters ``(1, 1, 1, C)``, dense kernels).  An
    isotropic ConvNeXt's become those of a one-stage network (``downsample_layers.0.0`` its
    stem convolution, ``stages.0.N`` its blocks)."""
    layout = detect_layout(state_dict)
    if layout == "official":
        return _drop_second_names(state_dict)
    rules = {
        "isotropic": _ISOTROPIC_RULES,
        "timm": _TIMM_RULES,
        "huggingface": _HF_RULES,
        "dinov3-huggingface": _DINOV3_HF_RULES,
        "fcmae": _FCMAE_RULES,
    }[layout]
    out, dropped = {}, []
    for key, value in state_dict.items():
        if layout == "fcmae" and _FCMAE_DECODER.match(key):
            dropped.append(key)
            continue
        name = re.sub(r"^convnext(v2)?\.", "", key) if layout == "huggingface" else key
        for pattern, repl in rules:
            new, n = re.subn(pattern, repl, name)
            if n:
                name = new
                break
        else:
            name = f"<{layout}>{key}"  # kept so it is reported as unexpected, by its own name
        if layout == "fcmae":
            value = _fcmae_value(name, key, value)
        # timm's conv_mlp variants store the MLP as 1x1 convolutions.
        if re.search(r"\.pwconv[12]\.weight$", name) and value.ndim == 4:
            value = value.reshape(value.shape[:2])
        if re.search(r"\.grn\.(gamma|beta)$", name) and value.ndim != 4:
            value = value.reshape(1, 1, 1, -1)  # timm: (C,); FCMAE: (1, C)
        out[name] = value
    if dropped:
        _LOG.debug(
            "FCMAE checkpoint: dropped %d pre-training tensors the encoder does not use: %s",
            len(dropped),
            ", ".join(dropped),
        )
    return out


# ---------------------------------------------------------------------------------------------
# Official names -> Keras layers
# ---------------------------------------------------------------------------------------------


def _conv(w):  # torch (out, in, kh, kw) -> keras (kh, kw, in, out)
    return np.ascontiguousarray(w.transpose(2, 3, 1, 0))


def _dwconv(w):  # torch (C, 1, kh, kw) -> keras (kh, kw, C, 1)
    return np.ascontiguousarray(w.transpose(2, 3, 0, 1))


def _linear(w):  # torch (out, in) -> keras (in, out)
    return np.ascontiguousarray(w.T)


def _identity(w):
    return w


def _grn(w):  # official (1, 1, 1, C) -> keras (C,)
    return np.ascontiguousarray(w.reshape(-1))


def _official_plan(spec: registry.Variant):
    """Yield (keras layer, [(official key, expected torch shape, transform), ...])."""
    d0 = spec.dims[0]
    k, p, s = registry.DWCONV_KERNEL, spec.patch_size, registry.DOWNSAMPLE_STRIDE
    yield (
        "stem_conv",
        [
            ("downsample_layers.0.0.weight", (d0, 3, p, p), _conv),
            ("downsample_layers.0.0.bias", (d0,), _identity),
        ],
    )
    if spec.stem_norm:
        yield (
            "stem_norm",
            [
                ("downsample_layers.0.1.weight", (d0,), _identity),
                ("downsample_layers.0.1.bias", (d0,), _identity),
            ],
        )
    for i, (depth, dim) in enumerate(zip(spec.depths, spec.dims)):
        if i > 0:
            prev = spec.dims[i - 1]
            yield (
                f"stage{i}_downsample_norm",
                [
                    (f"downsample_layers.{i}.0.weight", (prev,), _identity),
                    (f"downsample_layers.{i}.0.bias", (prev,), _identity),
                ],
            )
            yield (
                f"stage{i}_downsample_conv",
                [
                    (f"downsample_layers.{i}.1.weight", (dim, prev, s, s), _conv),
                    (f"downsample_layers.{i}.1.bias", (dim,), _identity),
                ],
            )
        hidden = registry.MLP_RATIO * dim
        for j in range(depth):
            src, dst = f"stages.{i}.{j}", f"stage{i}_block{j}"
            yield (
                f"{dst}_dwconv",
                [
                    (f"{src}.dwconv.weight", (dim, 1, k, k), _dwconv),
                    (f"{src}.dwconv.bias", (dim,), _identity),
                ],
            )
            yield (
                f"{dst}_norm",
                [
                    (f"{src}.norm.weight", (dim,), _identity),
                    (f"{src}.norm.bias", (dim,), _identity),
                ],
            )
            yield (
                f"{dst}_pwconv1",
                [
                    (f"{src}.pwconv1.weight", (hidden, dim), _linear),
                    (f"{src}.pwconv1.bias", (hidden,), _identity),
                ],
            )
            if spec.block == "grn":
                yield (
                    f"{dst}_grn",
                    [
                        (f"{src}.grn.gamma", (1, 1, 1, hidden), _grn),
                        (f"{src}.grn.beta", (1, 1, 1, hidden), _grn),
                    ],
                )
            yield (
                f"{dst}_pwconv2",
                [
                    (f"{src}.pwconv2.weight", (dim, hidden), _linear),
                    (f"{src}.pwconv2.bias", (dim,), _identity),
                ],
            )
            if spec.block == "layer_scale":
                yield f"{dst}_layer_scale", [(f"{src}.gamma", (dim,), _identity)]
    c = spec.num_features
    yield "head_norm", [("norm.weight", (c,), _identity), ("norm.bias", (c,), _identity)]


def infer_architecture(official: dict[str, np.ndarray]) -> tuple[tuple, tuple, int | None]:
    """(depths, dims, num_classes or None) of an official-layout state dict: one entry per
    stage the names mention (4; an isotropic ConvNeXt 1)."""
    named = {
        int(m.group(1))
        for k in official
        if (m := re.match(r"(?:stages|downsample_layers)\.(\d+)\.", k))
    }
    depths, dims = [], []
    for i in range(max(named) + 1 if named else 4):
        blocks = {int(m.group(1)) for k in official if (m := re.match(rf"stages\.{i}\.(\d+)\.", k))}
        depths.append(max(blocks) + 1 if blocks else 0)
        w = official.get(f"stages.{i}.0.dwconv.weight")
        dims.append(int(w.shape[0]) if w is not None else 0)
    head = official.get("head.weight")
    return tuple(depths), tuple(dims), (int(head.shape[0]) if head is not None else None)


def infer_block(official: dict[str, np.ndarray]) -> str | None:
    """The block type of an official-layout state dict: ``"grn"`` (ConvNeXt V2),
    ``"layer_scale"`` (ConvNeXt), or None when it has neither (a ConvNeXt without layer
    scale)."""
    if any(re.match(r"stages\.\d+\.\d+\.grn\.", k) for k in official):
        return "grn"
    if any(re.match(r"stages\.\d+\.\d+\.gamma$", k) for k in official):
        return "layer_scale"
    return None


_BLOCK_WORDS = {
    "grn": "GRN blocks",
    "layer_scale": "layer-scale blocks",
    "plain": "blocks without layer scale",
}


def _describe_architecture(official) -> str:
    depths, dims, classes = infer_architecture(official)
    block = infer_block(official)
    for v in registry.VARIANTS.values():
        if v.depths == depths and v.dims == dims and block in (None, v.block):
            names = registry.checkpoints_for(v.name, classes) or [v.arch_name]
            return (
                f"it is a {v.title} ({_BLOCK_WORDS[v.block]}, depths {list(depths)}, dims "
                f"{list(dims)}{f', {classes} classes' if classes else ', no head'}): use "
                f"{' or '.join(names)}"
            )
    return f"it has depths {list(depths)} and dims {list(dims)}, which no known variant has"


def _take(official, entries, used: set, missing: list, wrong: list) -> list[np.ndarray] | None:
    """The Keras weights of one layer's plan ``entries`` ``[(key, torch shape, transform)]``,
    or None when one is missing (listed in ``missing``) or of another shape (in ``wrong``)."""
    arrays = []
    for key, shape, transform in entries:
        if key not in official:
            missing.append(key)
            continue
        used.add(key)
        value = official[key]
        if tuple(value.shape) != shape:
            wrong.append(f"{key}: checkpoint {tuple(value.shape)}, model expects {shape}")
            continue
        arrays.append(transform(value).astype(np.float32, copy=False))
    return arrays if len(arrays) == len(entries) else None


def _misfit(title: str, missing: list, wrong: list, unexpected: list, hint: str) -> CheckpointError:
    """The error listing what does not fit (six of each kind at most), then ``hint``."""
    lines = [title]
    for what, items in (("missing", missing), ("wrong shape", wrong), ("unexpected", unexpected)):
        if items:
            shown = "; ".join(items[:6]) + (
                f"; ... ({len(items)} in all)" if len(items) > 6 else ""
            )
            lines.append(f"  {what}: {shown}")
    lines.append(f"  Hint: {hint}.")
    return CheckpointError("\n".join(lines))


def convert_state_dict(
    state_dict: dict[str, np.ndarray],
    variant: str | registry.Variant,
    *,
    final_norm: bool = True,
) -> dict[str, list[np.ndarray]]:
    """Map a state dict in any supported layout to ``{keras layer name: [weights]}``.

    The classification head (``head_fc``) is included when the checkpoint has one; its size is
    whatever the checkpoint holds (checked against the model by :func:`assign_weights`).  A
    ConvNeXt V2 encoder without final norm and head (FCMAE pre-training) gets the final
    LayerNorm (``head_norm``) at its initialisation, scale 1 and shift 0, as the original
    fine-tuning starts from it.  ``final_norm=False``: a backbone without final LayerNorm (the
    segmentation backbone, :func:`convert_mmseg_state_dict`), whose ``norm.*`` would be
    unexpected.
    """
    spec = registry.variant(variant)
    official = to_official_layout(state_dict)
    depths, dims, _ = infer_architecture(official)
    block = infer_block(official)
    same_shape = (depths, dims) == (spec.depths, spec.dims)
    if (not same_shape and all(depths) and all(dims)) or (block and block != spec.block):
        raise CheckpointError(
            f"The checkpoint is not a {spec.title} ({_BLOCK_WORDS[spec.block]}, depths "
            f"{list(spec.depths)}, dims {list(spec.dims)}): {_describe_architecture(official)}."
        )
    weights: dict[str, list[np.ndarray]] = {}
    missing, wrong = [], []
    used = set()
    encoder = (
        final_norm
        and spec.block == "grn"
        and not ({"norm.weight", "norm.bias", "head.weight", "head.bias"} & set(official))
    )
    if encoder:
        c = spec.num_features
        weights["head_norm"] = [np.ones(c, np.float32), np.zeros(c, np.float32)]
        _LOG.debug(
            "%s encoder without final norm: head_norm starts at scale 1, shift 0", spec.title
        )
    for layer, entries in _official_plan(spec):
        if layer == "head_norm" and (encoder or not final_norm):
            continue
        arrays = _take(official, entries, used, missing, wrong)
        if arrays is not None:
            weights[layer] = arrays
    head_keys = {"head.weight", "head.bias"} & set(official)
    if head_keys:
        used |= head_keys
        hw, hb = official.get("head.weight"), official.get("head.bias")
        if hw is None or hb is None:
            missing.append(({"head.weight", "head.bias"} - head_keys).pop())
        elif hw.ndim != 2 or hw.shape[1] != spec.num_features or hb.shape != (hw.shape[0],):
            wrong.append(
                f"head.weight/head.bias: checkpoint {tuple(hw.shape)}/"
                f"{tuple(hb.shape)}, model expects (classes, {spec.num_features})/"
                "(classes,)"
            )
        else:
            weights["head_fc"] = [
                _linear(hw).astype(np.float32, copy=False),
                hb.astype(np.float32, copy=False),
            ]
    unexpected = sorted(set(official) - used)
    _check_finite(official, used)
    if missing or wrong or unexpected:
        raise _misfit(
            f"The checkpoint does not fit {spec.title}:",
            missing,
            wrong,
            unexpected,
            _describe_architecture(official),
        )
    return weights


def _check_finite(state: dict[str, np.ndarray], keys) -> None:
    """``CheckpointError`` naming the tensors of ``keys`` that hold NaN or infinity."""
    bad = []
    for key in sorted(keys):
        value = state[key]
        if np.issubdtype(value.dtype, np.floating):
            count = value.size - int(np.count_nonzero(np.isfinite(value)))
            if count:
                bad.append(f"{key} ({count} of {value.size} values)")
    if bad:
        shown = "; ".join(bad[:5]) + (f"; ... ({len(bad)} tensors in all)" if len(bad) > 5 else "")
        raise CheckpointError(
            f"The checkpoint holds NaN or infinite weights: {shown}. A trained ConvNeXt has "
            "none; the file is damaged or was saved from a diverged run. Use another copy."
        )


# ---------------------------------------------------------------------------------------------
# mmsegmentation's UperNet checkpoints (the official ADE20K segmentation files)
# ---------------------------------------------------------------------------------------------

#: The parts of an mmsegmentation ``EncoderDecoder`` state dict: the backbone (the official
#: ConvNeXt names plus ``norm0`` ... ``norm3``), the UPerHead and the training-only FCN head.
MMSEG_BACKBONE, MMSEG_DECODER, MMSEG_AUXILIARY = "backbone.", "decode_head.", "auxiliary_head."
#: mmcv's BatchNorm tensors -> Keras' BatchNormalization weights, in Keras' order.
_BATCH_NORM = ("weight", "bias", "running_mean", "running_var")


def is_mmseg_layout(state_dict: dict) -> bool:
    """Whether ``state_dict`` is an mmsegmentation encoder-decoder's (``backbone.*`` and
    ``decode_head.*`` tensors)."""
    keys = list(state_dict)
    return any(k.startswith(MMSEG_BACKBONE) for k in keys) and any(
        k.startswith(MMSEG_DECODER) for k in keys
    )


def _upernet_plan(spec: registry.Variant, head: registry.UperNetHead, num_classes: int):
    """Yield (keras layer, [(mmseg key, torch shape, transform)]) for the stage norms and the
    decoder (mmseg ``UPerHead``: each ``ConvModule`` is ``<name>.conv`` + ``<name>.bn``)."""
    for i, dim in enumerate(spec.dims):
        yield (
            f"stage{i}_output_norm",
            [(f"{MMSEG_BACKBONE}norm{i}.{p}", (dim,), _identity) for p in ("weight", "bias")],
        )
    c = head.channels

    def module(layer, key, inputs, kernel):
        key = MMSEG_DECODER + key
        yield f"{layer}_conv", [(f"{key}.conv.weight", (c, inputs, kernel, kernel), _conv)]
        yield f"{layer}_bn", [(f"{key}.bn.{p}", (c,), _identity) for p in _BATCH_NORM]

    top = spec.dims[-1]
    for i in range(len(head.pool_scales)):
        yield from module(f"decode_ppm{i}", f"psp_modules.{i}.1", top, 1)
    yield from module("decode_bottleneck", "bottleneck", top + len(head.pool_scales) * c, 3)
    for i, dim in enumerate(spec.dims[:-1]):
        yield from module(f"decode_lateral{i}", f"lateral_convs.{i}", dim, 1)
        yield from module(f"decode_fpn{i}", f"fpn_convs.{i}", c, 3)
    yield from module("decode_fpn_bottleneck", "fpn_bottleneck", len(spec.dims) * c, 3)
    yield (
        "decode_conv_seg",
        [
            (f"{MMSEG_DECODER}conv_seg.weight", (num_classes, c, 1, 1), _conv),
            (f"{MMSEG_DECODER}conv_seg.bias", (num_classes,), _identity),
        ],
    )


def _segmentation_models(official_backbone: dict) -> str:
    """What backbone an official-named state dict has, and the segmentation names that fit."""
    depths, dims, _ = infer_architecture(official_backbone)
    for v in registry.VARIANTS.values():
        if (v.depths, v.dims) == (depths, dims):
            names = [
                c.name
                for c in registry.CHECKPOINTS.values()
                if c.segmentation is not None and c.variant == v.name
            ]
            use = f": use {' or '.join(names)}" if names else ""
            return f"its backbone is a {v.title} (depths {list(depths)}, dims {list(dims)}){use}"
    return f"its backbone has depths {list(depths)} and dims {list(dims)}, which no variant has"


def convert_mmseg_state_dict(
    state_dict: dict[str, np.ndarray],
    variant: str | registry.Variant,
    head: registry.UperNetHead | None = None,
    num_classes: int | None = None,
) -> dict[str, list[np.ndarray]]:
    """An mmsegmentation UperNet-ConvNeXt state dict -> ``{keras layer name: [weights]}`` for
    :func:`convnext_keras.nets.upernet.build_upernet`.

    The layout of the official ADE20K files (facebookresearch/ConvNeXt
    ``semantic_segmentation``; mmseg ``EncoderDecoder``): ``backbone.*`` in the official
    ConvNeXt names plus the stage-output norms ``backbone.norm0`` ... ``norm3``,
    ``decode_head.*`` (``psp_modules.{i}.1``, ``bottleneck``, ``lateral_convs.{i}``,
    ``fpn_convs.{i}``, ``fpn_bottleneck``, each ``.conv.weight`` + ``.bn.*``, and ``conv_seg``)
    and ``auxiliary_head.*``, the training-only FCN head: dropped, and listed in an INFO
    message of the ``convnext_keras`` logger.  BatchNorm's ``num_batches_tracked`` counters are
    read and not needed.

    Args:
        variant: the backbone variant; head: the decoder's settings (default
            ``registry.UperNetHead()``); num_classes: the classifier's size (default: the
            checkpoint's).

    Raises:
        CheckpointError: not this layout, another backbone, or a missing, unexpected or wrongly
            shaped tensor (each named), or NaN/inf weights.
    """
    spec = registry.variant(variant)
    head = head or registry.UperNetHead()
    if not is_mmseg_layout(state_dict):
        raise CheckpointError(
            "Not an mmsegmentation segmentation checkpoint (backbone.* and decode_head.* "
            f"tensors); first keys: {list(state_dict)[:5]}. A segmentation model loads the "
            "official ADE20K files (upernet_convnext_*_512x512.pth / *_640x640.pth)."
        )
    stage_norm = re.compile(rf"^{re.escape(MMSEG_BACKBONE)}norm\d+\.")
    in_backbone = [
        k for k in state_dict if k.startswith(MMSEG_BACKBONE) and not stage_norm.match(k)
    ]
    backbone = {k[len(MMSEG_BACKBONE) :]: state_dict[k] for k in in_backbone}
    depths, dims, _ = infer_architecture(backbone)
    if (depths, dims) != (spec.depths, spec.dims):
        raise CheckpointError(
            f"The checkpoint's backbone is not a {spec.title} (depths {list(spec.depths)}, dims "
            f"{list(spec.dims)}): {_segmentation_models(backbone)}."
        )
    weights = convert_state_dict(backbone, spec, final_norm=False)
    if num_classes is None:
        classifier = state_dict.get(f"{MMSEG_DECODER}conv_seg.bias")
        num_classes = int(classifier.shape[0]) if classifier is not None else 0
    missing, wrong, used = [], [], set()
    for layer, entries in _upernet_plan(spec, head, num_classes):
        arrays = _take(state_dict, entries, used, missing, wrong)
        if arrays is not None:
            weights[layer] = arrays
    auxiliary = sorted(k for k in state_dict if k.startswith(MMSEG_AUXILIARY))
    counters = {k for k in state_dict if k.endswith(".num_batches_tracked")}
    unexpected = sorted(set(state_dict) - used - counters - set(auxiliary) - set(in_backbone))
    _check_finite(state_dict, used)
    if missing or wrong or unexpected:
        raise _misfit(
            f"The checkpoint does not fit UperNet-{spec.title} ({num_classes} classes):",
            missing,
            wrong,
            unexpected,
            f"a UperNet with {head.channels} decoder channels and pool scales "
            f"{list(head.pool_scales)} (the official ADE20K checkpoints)",
        )
    if auxiliary:
        logging.getLogger("convnext_keras").info(
            "mmsegmentation checkpoint: dropped the training-only auxiliary FCN head "
            "(%d tensors: %s)",
            len(auxiliary),
            ", ".join(auxiliary),
        )
    return weights


def assign_weights(
    model, weights: dict[str, list[np.ndarray]], *, load_head: bool = True, source: str = ""
) -> None:
    """Set converted weights on every weight-carrying layer of ``model``.

    ``load_head=False`` leaves ``head_fc`` at its fresh initialisation (a new head for
    fine-tuning); layers absent from the model (the head of a feature extractor) are skipped.
    A model layer with no converted weights, or with a different shape, is an error.
    """
    where = f" from {source}" if source else ""
    for layer in model.layers:
        if not layer.weights:
            continue
        if layer.name == "head_fc" and not load_head:
            continue
        if layer.name not in weights:
            if layer.name == "head_fc":
                raise CheckpointError(
                    f"The checkpoint{where} has no classification head; load it as a feature "
                    f"extractor ('_fe' name / {fix('features=', '--features ')}'pooled') or "
                    f"{fix('pass num_classes=N to start a new head', 'fine-tune a new head')}."
                )
            raise CheckpointError(f"No weights for layer {layer.name!r}{where}.")
        arrays = weights[layer.name]
        expected = [tuple(w.shape) for w in layer.weights]
        got = [tuple(a.shape) for a in arrays]
        if expected != got:
            if layer.name == "head_fc":
                ckpt_classes, model_classes = got[-1][0], expected[-1][0]
                hint = (
                    registry.checkpoints_for(_variant_of(model), ckpt_classes)
                    if _variant_of(model)
                    else []
                )
                raise CheckpointError(
                    f"The checkpoint{where} has a {ckpt_classes}-class head but the model has "
                    f"{model_classes} classes. "
                    + (f"Use {' or '.join(hint)} for this checkpoint, or " if hint else "Use ")
                    + "num_classes=N to start a new head for fine-tuning."
                )
            raise CheckpointError(
                f"Layer {layer.name!r}: checkpoint shapes {got}, model expects {expected}{where}."
            )
        layer.set_weights(arrays)


def _variant_of(model) -> str | None:
    from convnext_keras.nets.convnext import variant_of

    spec = variant_of(model)
    return spec.name if spec else None
