"""Read checkpoint files safely: ``.pth`` / ``.pt`` / ``.bin`` (PyTorch zip or legacy pickle)
and ``.safetensors`` -> ``{name: numpy array}``.  Never executes pickled code.

PyTorch files are read with ``torch.load(weights_only=True)`` (tensors and plain containers
only; a pickle that asks for anything else raises :class:`UnsafeCheckpointError`); a zip whose
records declare far more bytes than the file holds is refused as a zip bomb (:func:`check_zip`);
an mmcv checkpoint's pickled ``meta`` objects are replaced by inert stand-ins, never built.
"""

from __future__ import annotations

import argparse
import logging
import struct
from pathlib import Path

import numpy as np

from convnext_keras.errors import plain


class CheckpointError(ValueError):
    """A checkpoint that cannot be used for the requested model."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint whose pickle wants to run code or build objects other than tensors."""


_LOG = logging.getLogger(__name__)

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


def _numpy_knows_bfloat16() -> None:
    """Teach numpy the dtypes of ``ml_dtypes`` (``bfloat16``, the ``float8`` kinds) before a
    safetensors file is read: ``safetensors.numpy`` asks numpy for them by name, which works
    only once ``ml_dtypes`` is imported (Keras imports it; this reader must not depend on the
    order).  ``ml_dtypes`` ships with Keras."""
    try:
        import ml_dtypes  # noqa: F401  (registers the dtypes with numpy)
    except ImportError:
        pass


#: The weights file of a folder, in the order looked for: transformers' ``save_pretrained``
#: names (safetensors first, as transformers loads them).
FOLDER_FILES = ("model.safetensors", "pytorch_model.bin")
#: The index of a sharded ``save_pretrained`` folder (``weight_map``: tensor -> shard file).
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
#: Suffixes of checkpoint files, for a folder holding one under another name.
CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


def folder_files(folder: str | Path) -> list[Path]:
    """The checkpoint file(s) a folder stands for, as transformers finds them: the shards its
    ``model.safetensors.index.json`` (or ``pytorch_model.bin.index.json``) names, else its
    ``model.safetensors``, else its ``pytorch_model.bin``, else its only file ending in
    ``.safetensors`` / ``.pth`` / ``.pt`` / ``.bin``.

    Raises ``CheckpointError`` for a folder with no such file, with several (name one), or
    with an index that cannot be read or names a shard that is not there.
    """
    import json

    folder = Path(folder)
    for index in INDEX_FILES:
        path = folder / index
        if path.is_file():
            try:
                mapping = json.loads(path.read_text())["weight_map"]
                shards = sorted({folder / name for name in mapping.values()})
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                raise CheckpointError(
                    f"{path} is not a readable shard index ({type(e).__name__}: {e})."
                ) from None
            missing = [p.name for p in shards if not p.is_file()]
            if missing:
                raise CheckpointError(
                    f"{path} names shard(s) that are not in {folder}: {', '.join(missing[:3])}."
                )
            return shards
    for name in FOLDER_FILES:
        if (folder / name).is_file():
            return [folder / name]
    found = sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and p.suffix in CHECKPOINT_SUFFIXES and not p.name.startswith(".")
    )
    if len(found) == 1:
        return found
    if found:
        raise CheckpointError(
            f"{folder} holds several checkpoint files ({', '.join(p.name for p in found[:4])}"
            f"{', ...' if len(found) > 4 else ''}); name the one to load."
        )
    raise CheckpointError(
        f"{folder} is a folder without a checkpoint file: looked for {', '.join(INDEX_FILES)}, "
        f"{', '.join(FOLDER_FILES)} (transformers' save_pretrained) or one file ending in "
        f"{', '.join(CHECKPOINT_SUFFIXES)}."
    )


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Read ``.pth`` / ``.bin`` / ``.safetensors`` into ``{name: float32 numpy array}``.

    PyTorch pickles are read with ``torch.load(weights_only=True)`` (crafted files are refused
    with ``UnsafeCheckpointError``); safetensors files are read without PyTorch, in any of
    their floating-point dtypes (float16, bfloat16, float64 ... made float32), whatever was
    imported before.  ``path`` may also be a folder, as transformers' ``save_pretrained``
    writes one: its weights file(s) (:func:`folder_files`; the shards of a sharded folder are
    read together).
    """
    path = Path(path)
    if path.is_dir():
        state: dict[str, np.ndarray] = {}
        for file in folder_files(path):
            part = read_state_dict(file)
            twice = sorted(set(part) & set(state))
            if twice:
                raise CheckpointError(f"{file} repeats tensors of another shard ({twice[0]}).")
            state.update(part)
        return state
    if not path.is_file():
        raise FileNotFoundError(f"No such checkpoint file or folder: {path}")
    fmt = sniff_format(path)
    if fmt == "safetensors":
        from safetensors.numpy import load_file

        _numpy_knows_bfloat16()
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
