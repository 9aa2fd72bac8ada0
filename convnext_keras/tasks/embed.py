"""``convnext embed`` / ``ck.embed``: pooled features of a whole image collection.

Every image file below a folder goes through the model's official evaluation transform
(:func:`convnext_keras.preprocess.eval_transform`) and a ConvNeXt with the pooled head (the
TF-Hub ``_fe`` models' output: global average pool + LayerNorm; any name of the registry works,
its classifier is left out).  The features land in *parts*, each written to a temporary file
and renamed when complete, and a *manifest* that lists the parts, the files that could not be
read and the settings (its leading underscore keeps it out of Arrow's dataset discovery:
``pd.read_parquet("features/")`` reads the parts as one table)::

    features/
      _manifest.json                         (_manifest-00003-of-00008.json with --shard 3/8)
      part-00000-of-00001-000000.parquet     path, path_bytes, feature (float32 x dim), model,
      part-00000-of-00001-000001.parquet     preprocessing ...
      (or part-...npy + part-....paths.json with format="npy")

``path`` is the file's path relative to the folder as UTF-8 text (a name whose bytes are not
UTF-8 has them as ``\\xNN``), ``path_bytes`` its exact bytes (:func:`os.fsencode`), which
:func:`load_features` returns decoded as Python names them.  The manifest records each part's
SHA-256: :func:`load_features` refuses a part whose bytes changed, and a run that continues a
folder embeds the images of such a part again.

A run continues where a killed one stopped: the files already in a listed part (or listed as
unreadable) are skipped, so a resumed run writes exactly the features the uninterrupted one
would have; a part that was being written when the run died was never renamed or listed, and is
written again (its temporary file is removed by the next run's first write, once stale).
Only regular files are embedded: an entry with an image extension that is not one (a FIFO, a
broken link) is listed as unreadable; each real folder is walked once
(:func:`convnext_keras.data.files.image_files`).  ``shard=(i, n)`` embeds every n-th file from
the i-th (in the sorted file list) into its own parts and manifest, so n jobs on any scheduler
fill one folder; :func:`load_features` reads them all back.  With ``ray`` the same parts and
manifest are written by a Ray Data pipeline: file paths in, decode + transform in parallel
tasks, the model in a pool of actors (one model each, batched).

Parquet through pyarrow (columns read without the rest, dictionary-encoded repeated strings,
readable by pandas, Spark, DuckDB); Ray Data for many machines: both the fields' usual tools.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from convnext_keras import preprocess, registry
from convnext_keras.data import files as files_lib
from convnext_keras.errors import check_installed, require
from convnext_keras.interface import fix
from convnext_keras.tasks.graph_route import graph_route
from convnext_keras.weights.cache import atomic_path, clean_stale, file_sha256
from convnext_keras.weights.hfhub import HF_SCHEME

FORMAT = 1
FORMATS = ("parquet", "npy")
#: Images per part file (a kill loses at most the part being written).
PART_SIZE = 4096
#: A manifest's name: ``_manifest.json`` (``_manifest-00003-of-00008.json`` for shard 3/8).  The
#: leading underscore makes Arrow's (and Spark's) dataset discovery skip it, so the folder reads
#: as one Parquet dataset (``pd.read_parquet("features/")``); folders written by 0.2 and earlier
#: have ``manifest.json`` (read as well, and renamed when a run continues them).
_MANIFEST = re.compile(r"(?P<new>_?)manifest(?:-(\d+)-of-(\d+))?\.json")


class EmbedError(ValueError):
    """An embedding job that cannot run (or a features folder that cannot be read)."""


class Features(NamedTuple):
    """What :func:`load_features` returns: ``features, paths = ck.load_features(out)``."""

    #: float32 ``(images, dim)``, one row per image, in the order of ``paths``.
    features: np.ndarray
    #: Paths relative to the embedded folder, sorted.
    paths: list[str]


def parse_shard(value) -> tuple[int, int]:
    """``"3/8"``, ``(3, 8)`` or None -> ``(3, 8)`` (None -> ``(0, 1)``), checked."""
    if value is None:
        return 0, 1
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", value)
        if not match:
            raise EmbedError(f"shard must look like i/n (e.g. 3/8), got {value!r}.")
        value = (int(match[1]), int(match[2]))
    index, count = (int(v) for v in value)
    if count < 1 or not 0 <= index < count:
        raise EmbedError(f"shard {index}/{count}: need 0 <= i < n (e.g. 0/8 ... 7/8).")
    return index, count


def image_files(root: str | os.PathLike) -> list[str]:
    """Paths (relative to ``root``, ``/``-separated, sorted) of the regular files below ``root``
    whose extension PIL reads (``.jpg``, ``.png``, ``.webp``, ...); hidden files and folders
    are left out, each real folder is walked once (a link back up the tree is not followed),
    and FIFOs and other entries that are not regular files are not listed
    (:func:`_entries` reports them).  Whether each one decodes is found when it is embedded."""
    return _entries(root)[0]


def _entries(root: str | os.PathLike) -> tuple[list[str], list[list[str]]]:
    """``(image files, [[entry, why it is skipped]])`` below ``root``, as :func:`image_files`:
    the skipped entries have an image extension but are not regular files (a FIFO named
    ``pipe.jpg``, a broken link); relative ``/``-separated paths, sorted
    (:func:`convnext_keras.data.files.image_files`)."""
    from PIL import Image

    root = Path(root)
    known = {ext.lower() for ext in Image.registered_extensions()}
    listing = files_lib.image_files(root, suffixes=known)
    found = sorted(p.relative_to(root).as_posix() for p in listing.files)
    skipped = sorted(
        [s.path.relative_to(root).as_posix(), f"{s.reason}, not an image file"]
        for s in listing.skipped
    )
    return found, skipped


def manifest_name(shard: tuple[int, int], *, legacy: bool = False) -> str:
    """The manifest of ``shard``: ``_manifest.json`` (one shard) or
    ``_manifest-00003-of-00008.json``; ``legacy``: the name of 0.2 and earlier (no underscore)."""
    index, count = shard
    name = "manifest.json" if count == 1 else f"manifest-{index:05d}-of-{count:05d}.json"
    return name if legacy else "_" + name


def _part_name(shard: tuple[int, int], number: int, fmt: str) -> str:
    index, count = shard
    return f"part-{index:05d}-of-{count:05d}-{number:06d}.{fmt}"


@dataclasses.dataclass
class _Manifest:
    path: Path
    settings: dict
    shard: tuple[int, int]
    parts: list[dict]
    failed: list[list[str]]
    complete: bool = False
    #: The manifest under its name of 0.2 and earlier (``manifest.json``); the first save
    #: removes it.
    legacy: Path | None = None

    def save(self) -> None:
        record = {
            "format": FORMAT,
            **self.settings,
            "shard": list(self.shard),
            "parts": self.parts,
            "failed": self.failed,
            "images": sum(p["count"] for p in self.parts),
            "complete": self.complete,
        }
        with atomic_path(self.path) as tmp:
            tmp.write_text(json.dumps(record, indent=1) + "\n")
        if self.legacy is not None:  # saved under the new name: the old one goes
            self.legacy.unlink(missing_ok=True)
            self.legacy = None


def _read_manifest(path: Path) -> dict:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise EmbedError(f"{path} is not a readable embedding manifest ({e}).") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise EmbedError(
            f"{path} is not an embedding manifest of format {FORMAT} (written by another "
            "version or program); give another --out."
        )
    return record


def _manifests(out: Path) -> dict[Path, dict]:
    """Every shard's manifest in ``out``; of a shard with both names (a run that died between
    writing the new one and removing the old), the new one."""
    found = {}
    for path in sorted(out.glob("*manifest*.json")):
        match = _MANIFEST.fullmatch(path.name)
        if match:
            shard = path.name.lstrip("_")
            if shard not in found or match.group("new"):
                found[shard] = path
    return {p: _read_manifest(p) for p in sorted(found.values())}


_SETTING_NAMES = ("model", "weights", "preprocessing", "output_format", "images_dir")


def _open_manifest(out: Path, settings: dict, shard: tuple[int, int]) -> _Manifest:
    """This shard's manifest (a new one, or the one a previous run left); refuses a folder
    whose features were made with other settings or another sharding."""
    for path, record in _manifests(out).items():
        differ = [k for k in _SETTING_NAMES if record.get(k) != settings[k]]
        if record.get("shard", [0, 1])[1] != shard[1]:
            differ.append(f"shard count ({record['shard'][1]}, asked {shard[1]})")
        if differ:
            listed = ", ".join(
                f"{k}: {record.get(k)!r} vs {settings[k]!r}" if k in settings else k for k in differ
            )
            raise EmbedError(
                f"{out} holds features made with other settings ({path.name}: {listed}). "
                f"Continue with the same settings, or give another {fix('out', '--out')}."
            )
    path = out / manifest_name(shard)
    legacy = out / manifest_name(shard, legacy=True)
    for found in (path, legacy):
        if found.is_file():
            record = _read_manifest(found)
            old = legacy if legacy.is_file() else None
            return _Manifest(path, settings, shard, record["parts"], record["failed"], legacy=old)
    return _Manifest(path, settings, shard, [], [])


# ---------------------------------------------------------------------------------------------
# Parts


def _text_path(path: str) -> str:
    """A path as valid UTF-8 text: a file name whose bytes are not UTF-8 has them written as
    ``\\xNN`` (the exact name is in the ``path_bytes`` column)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _write_part(out: Path, name: str, paths: list[str], features: np.ndarray, settings: dict):
    """One part, atomically: Parquet (path, path_bytes, feature, model, preprocessing) or
    .npy + paths; returns the SHA-256 of each file written (``{"sha256", ["paths_sha256"]}``),
    for the manifest."""
    if settings["output_format"] == "npy":
        digests = {}
        with atomic_path(out / (name[: -len(".npy")] + ".paths.json")) as tmp:
            tmp.write_text(json.dumps(paths) + "\n")  # \udcXX escapes keep any name exactly
            digests["paths_sha256"] = file_sha256(tmp)
        with atomic_path(out / name) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, features.astype(np.float32, copy=False))
            digests["sha256"] = file_sha256(tmp)
        return digests
    pa = _pyarrow()
    pq = _pyarrow("pyarrow.parquet")

    n, dim = features.shape
    flat = pa.array(features.astype(np.float32, copy=False).reshape(-1), pa.float32())
    preprocessing = json.dumps(settings["preprocessing"], sort_keys=True)
    table = pa.table(
        {
            "path": pa.array([_text_path(p) for p in paths], pa.string()),
            "path_bytes": pa.array([os.fsencode(p) for p in paths], pa.binary()),
            "feature": pa.FixedSizeListArray.from_arrays(flat, dim),
            "model": pa.DictionaryArray.from_arrays(
                pa.array(np.zeros(n, np.int32)), pa.array([settings["model"]])
            ),
            "preprocessing": pa.DictionaryArray.from_arrays(
                pa.array(np.zeros(n, np.int32)), pa.array([preprocessing])
            ),
        }
    )
    with atomic_path(out / name) as tmp:
        pq.write_table(table, tmp)
        return {"sha256": file_sha256(tmp)}


def _part_files(name: str, fmt: str) -> dict[str, str]:
    """The files of a part, by the manifest key of their SHA-256."""
    if fmt == "npy":
        return {"sha256": name, "paths_sha256": name[: -len(".npy")] + ".paths.json"}
    return {"sha256": name}


def _part_problem(out: Path, part: dict, fmt: str) -> str | None:
    """Why a listed part cannot be trusted - a file missing, or not the bytes whose SHA-256
    the manifest recorded - or None.  A part listed without SHA-256 (an older version's) is
    ``"unverified"``."""
    for key, file in _part_files(part["file"], fmt).items():
        recorded = part.get(key)
        if recorded is None:
            return "unverified: the manifest records no SHA-256 for it (an older version's part)"
        try:
            digest = file_sha256(out / file)
        except OSError as e:
            return f"{file} cannot be read ({e.strerror or e})"
        if digest != recorded:
            return (
                f"{file} is damaged: its SHA-256 {digest[:12]}... is not the {recorded[:12]}... "
                "recorded when it was written"
            )
    return None


def _drop_bad_parts(out: Path, manifest: _Manifest) -> None:
    """Before a run continues: every listed part whose files differ from their recorded
    SHA-256 (or have none) is moved aside (``<file>.corrupt-<time>``) and unlisted, so its
    images are embedded again."""
    fmt = manifest.settings["output_format"]
    kept = []
    for part in manifest.parts:
        problem = _part_problem(out, part, fmt)
        if problem is None:
            kept.append(part)
            continue
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for file in _part_files(part["file"], fmt).values():
            with contextlib.suppress(OSError):
                os.replace(out / file, out / f"{file}.corrupt-{stamp}")
        logging.getLogger("convnext_keras").warning(
            f"convnext_keras: {out / part['file']}: {problem}; moved it aside and embedding its "
            f"{part['count']} images again."
        )
    if len(kept) != len(manifest.parts):
        manifest.parts = kept
        manifest.save()


def _next_part_number(manifest: _Manifest) -> int:
    """One more than the highest part number listed (never a listed part's name)."""
    numbers = [int(m.group(1)) for p in manifest.parts if (m := re.search(r"-(\d+)\.", p["file"]))]
    return max(numbers, default=-1) + 1


def _pyarrow(module: str = "pyarrow"):
    """pyarrow (or one of its modules), or the one-line error naming the ``embed`` extra."""
    return require(
        module,
        extra="embed",
        purpose="Parquet features (convnext embed's default format)",
        alternative="or " + fix("format='npy'", "--format npy"),
    )


def _read_part(out: Path, name: str, fmt: str, columns=("path", "feature")):
    """``(paths, features or None)`` of one part; paths exactly as the file names were (the
    ``path_bytes`` column where the part has it)."""
    path = out / name
    try:
        if fmt == "npy":
            paths = json.loads((out / (name[: -len(".npy")] + ".paths.json")).read_text())
            features = np.load(path) if "feature" in columns else None
            return paths, features
        pq = _pyarrow("pyarrow.parquet")
        names = pq.read_schema(path).names
        wanted = [c for c in columns if c != "path"]
        wanted.append("path_bytes" if "path_bytes" in names else "path")
        table = pq.read_table(path, columns=wanted)
    except (OSError, ValueError) as e:
        raise EmbedError(f"Cannot read the features part {path} ({e}).") from None
    if "path_bytes" in table.column_names:
        paths = [os.fsdecode(b) for b in table.column("path_bytes").to_pylist()]
    else:
        paths = table.column("path").to_pylist()
    if "feature" not in columns:
        return paths, None
    column = table.column("feature").combine_chunks()
    dim = column.type.list_size
    features = column.values.to_numpy(zero_copy_only=False).reshape(-1, dim)
    return paths, features


def _check_part(out: Path, part: dict, fmt: str) -> None:
    """``EmbedError`` for a listed part whose files differ from their recorded SHA-256; a part
    without one (written before this version) is read as it is."""
    problem = _part_problem(out, part, fmt)
    if problem is not None and not problem.startswith("unverified"):
        raise EmbedError(
            f"{out / part['file']}: {problem}. Run convnext embed again with the same settings "
            "and --out: it embeds the images of damaged parts again."
        )


def load_features(out: str | os.PathLike) -> Features:
    """Every feature vector of a ``convnext embed`` folder: ``features, paths``.

    Reads the parts of every shard's manifest (a part being written when a run died is not
    listed, so not read) and returns the rows sorted by path.  ``features`` is float32
    ``(images, dim)``; unreadable images have no row (the manifests list them under
    ``"failed"``).

    Raises:
        EmbedError: no manifest, a part that cannot be read or whose bytes differ from the
            SHA-256 its manifest recorded, an image in two parts, or shards made with other
            settings.
    """
    out = Path(out).expanduser()
    records = _manifests(out) if out.is_dir() else {}
    if not records:
        raise EmbedError(f"{out} holds no embedding manifest (run convnext embed first).")
    first = next(iter(records.values()))
    all_paths, blocks = [], []
    for path, record in records.items():
        differ = [k for k in _SETTING_NAMES if record.get(k) != first.get(k)]
        if differ:
            raise EmbedError(f"{path.name} was made with other settings ({', '.join(differ)}).")
        for part in record["parts"]:
            _check_part(out, part, record["output_format"])
            paths, features = _read_part(out, part["file"], record["output_format"])
            if len(paths) != part["count"] or features.shape[0] != part["count"]:
                raise EmbedError(f"{out / part['file']} does not hold the {part['count']} rows "
                                 "its manifest lists; embed again into another --out.")  # fmt: skip
            all_paths += paths
            blocks.append(features)
    dim = first.get("feature_dim", 0)
    features = np.concatenate(blocks) if blocks else np.zeros((0, dim), np.float32)
    order = np.argsort(np.asarray(all_paths, dtype=object), kind="stable")
    paths = [all_paths[i] for i in order]
    repeated = sorted({a for a, b in zip(paths, paths[1:]) if a == b})
    if repeated:
        raise EmbedError(
            f"{len(repeated)} image(s) appear in two parts of {out} (e.g. {repeated[0]}): "
            "two jobs embedded the same shard; keep one of their outputs."
        )
    return Features(np.ascontiguousarray(features[order], dtype=np.float32), paths)


# ---------------------------------------------------------------------------------------------
# The job


def _settings(images: Path, model: str, weights, config, fmt: str, dim: int | None) -> dict:
    return {
        "images_dir": str(images.resolve()),
        "model": registry.canonical_name(model),
        "weights": weights if weights is None or weights == "official" else str(weights),
        "preprocessing": {
            "resolution": config.resolution,
            "crop_pct": config.crop_pct,
            "interpolation": config.interpolation,
        },
        "output_format": fmt,
        "feature_dim": dim,
        "dtype": "float32",
    }


def _feature_model(model: str, weights):
    """The pooled-feature model (random weights seeded, so every process has the same)."""
    import keras

    from convnext_keras.api import load_model

    if weights is None:
        keras.utils.set_random_seed(0)
    return load_model(model, weights=weights, features="pooled")


def _features_function(model: str, weights, engine: str, resolution: int):
    """``(forward, feature dim)``: the pooled features of a batch.  A registry name with its
    official weights runs on its cached graph (:func:`convnext_keras.tasks.graph_route
    .graph_route`: no Keras once the graph is cached); anything else on the engine
    ``inference_function`` picks for the Keras model."""
    route = graph_route(model, weights, head="pooled", engine=engine)
    if route is not None:
        route.runner(resolution, resolution)  # built and cached on the first call
        return route, route.num_features
    from convnext_keras.engines import runners

    network = _feature_model(model, weights)
    forward, _ = runners.inference_function(network, engine)
    return forward, int(network.output_shape[-1])


class _Progress:
    """A rich progress bar on stderr with images/s (a terminal only)."""

    def __init__(self, total: int, enabled: bool):
        self.bar = None
        if enabled and sys.stderr.isatty() and not os.environ.get("CONVNEXT_NO_PROGRESS"):
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

            self.bar = Progress(
                "embed",
                BarColumn(),
                MofNCompleteColumn(),
                "{task.fields[rate]}",
                TimeRemainingColumn(),
                console=Console(stderr=True),
            )
            self.bar.start()
            self.task = self.bar.add_task("embed", total=total, rate="")
        self.began, self.done = time.perf_counter(), 0

    def advance(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            rate = self.done / max(time.perf_counter() - self.began, 1e-9)
            self.bar.update(self.task, advance=n, rate=f"{rate:.1f} img/s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _check_finite(features: np.ndarray, paths: Sequence[str]) -> None:
    bad = np.flatnonzero(~np.isfinite(features).all(axis=1))
    if bad.size:
        raise EmbedError(
            f"The model gave NaN/inf features for {bad.size} image(s) (e.g. {paths[bad[0]]}); "
            "nothing was written for them. Check the weights (--weights) and --precision."
        )


def check_options(model: str, format: str, shard, resolution: int | None, ray) -> tuple[int, int]:  # noqa: A002
    """The checks of :func:`embed`'s options that need no file and no model: the name (not a
    segmentation model), ``format`` (and pyarrow for Parquet), ``shard`` (returned parsed),
    ``resolution`` (at least the network's total stride) and Ray for ``ray``.  Keras-free: the
    command line runs them before a backend loads."""
    if format not in FORMATS:
        raise EmbedError(f"format must be one of {', '.join(FORMATS)}, got {format!r}.")
    shard = parse_shard(shard)
    resolved = registry.resolve(model)  # an unknown name fails here
    if resolved.head == "segmentation":
        raise EmbedError(
            f"{model!r} is a semantic-segmentation model (per-pixel labels, no pooled "
            "feature): embed takes a classifier, feature-extractor or encoder name (e.g. "
            "convnext_tiny_1k_224_fe); label images with convnext segment."
        )
    smallest = resolved.variant.min_input_size
    if resolution is not None and resolution < smallest:
        raise EmbedError(
            f"resolution must be at least {smallest} pixels (the network's total stride) for "
            f"{model}, got {resolution}."
        )
    if format == "parquet":
        check_installed(
            "pyarrow",
            extra="embed",
            purpose="Parquet features (convnext embed's default format)",
            alternative="or " + fix("format='npy'", "--format npy"),
        )
    if ray not in (None, False):
        check_installed("ray", extra="ray", purpose=fix("ray=", "--ray"))
    return shard


def embed(
    images: str | os.PathLike,
    out: str | os.PathLike,
    *,
    model: str,
    weights: str | os.PathLike | None = "official",
    batch_size: int = 64,
    format: str = "parquet",  # noqa: A002 (the CLI's --format)
    shard=None,
    resolution: int | None = None,
    part_size: int = PART_SIZE,
    workers: int | None = None,
    engine: str = "auto",
    ray=None,
    actors: int | None = None,
    verbose: int = 1,
) -> Path:
    """Pooled features of every image below ``images`` into the folder ``out``; returns ``out``.

    Args:
        images: a folder; every file with an image extension below it is embedded (paths are
            recorded relative to it).
        out: the features folder (created). A run that finds a manifest of its shard there
            continues it (same settings required).
        model: any registry name: ``convnext_base_21k_224_fe`` (a TF-Hub ``_fe`` name), a
            classifier name (its pooled features), or an architecture (``convnext_atto``).
        weights: "official", a local checkpoint file, or None (random weights, seeded: the
            same in every process).
        batch_size: images per model call.
        format: "parquet" (pyarrow) or "npy" (``part-*.npy`` + ``part-*.paths.json``).
        shard: ``"i/n"`` or ``(i, n)``: embed every n-th file from the i-th only.
        resolution: input size (default: the model's evaluation resolution); crop and
            interpolation stay the model's (``preprocess.config_for``).
        part_size: images per part file, at least: a part ends with the first whole batch
            that reaches it (the last part may hold fewer).
        workers: decoding threads (default: one per CPU).
        engine: "auto" (OpenVINO, else onnxruntime, on a CPU when it can run the model, else
            Keras), "openvino", "onnxruntime" or "keras" (``runners.inference_function``).
        ray: None (this process), True (a Ray cluster: the one this process is connected to,
            else a local one) or an address (``ray.init(address=...)``).
        actors: Ray only: model actors (default: one per 4 CPUs of the cluster, at least one).
        verbose: 0 silent; 1 a line at the start and the end (and a progress bar with img/s on
            a terminal).

    Returns:
        ``out`` (read it with :func:`load_features`).

    Raises:
        EmbedError: bad options, no image files, a folder with other settings, non-finite
            features. FileNotFoundError: no such folder.
    """
    say = print if verbose > 0 else (lambda *a, **k: None)
    images, out = Path(images).expanduser(), Path(out).expanduser()
    if not images.is_dir():
        raise FileNotFoundError(f"Image folder {images} does not exist (or is not a folder).")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise EmbedError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if not isinstance(part_size, int) or part_size < 1:
        raise EmbedError(f"part_size must be a positive integer, got {part_size!r}.")
    shard = check_options(model, format, shard, resolution, ray)
    config = preprocess.config_for(model)
    if resolution is not None:
        config = preprocess.as_config((int(resolution), config.crop_pct, config.interpolation))
    if weights not in (None, "official") and not str(weights).startswith(HF_SCHEME):
        weights = str(Path(weights).expanduser())
        if not Path(weights).exists():
            raise FileNotFoundError(f"No such checkpoint file or folder: {weights}.")
    files, not_files = _entries(images)
    if not files:
        raise EmbedError(f"{images} holds no image files (.jpg, .png, .webp, ...).")
    every = sorted(files + [p for p, _ in not_files])  # one order for every shard
    mine = every[shard[0] :: shard[1]]
    settings = _settings(images, model, weights, config, format, None)
    manifest = _open_manifest(out, settings, shard)
    clean_stale(out)  # the temporaries of a killed run (a part being written), once stale
    _drop_bad_parts(out, manifest)
    done = {p for p, _ in manifest.failed}
    for part in manifest.parts:
        done.update(_read_part(out, part["file"], format, columns=("path",))[0])
    ours = set(mine)
    manifest.failed += [[p, why] for p, why in not_files if p in ours and p not in done]
    done.update(p for p, _ in not_files)
    todo = [p for p in mine if p not in done]
    where = "" if shard == (0, 1) else f" (shard {shard[0]}/{shard[1]}: {len(mine)} of them)"
    say(
        f"embedding {len(todo)} of {len(every)} images{where} with {settings['model']} "
        f"({config.resolution}px) into {out}"
        + (f"; {len(mine) - len(todo)} already done" if len(todo) < len(mine) else "")
    )
    progress = _Progress(len(todo), verbose > 0)
    try:
        if todo:
            run = _run_ray if ray not in (None, False) else _run_local
            run(
                images, out, todo, manifest, config,
                model=model, weights=weights, batch_size=batch_size, part_size=part_size,
                workers=workers, engine=engine, ray=ray, actors=actors, progress=progress,
            )  # fmt: skip
    finally:
        progress.close()
    manifest.complete = True
    if manifest.settings["feature_dim"] is None:  # nothing to embed: the dim of a previous run
        dims = [r.get("feature_dim") for r in _manifests(out).values()]
        manifest.settings["feature_dim"] = next((d for d in dims if d), None)
    manifest.save()
    total = sum(p["count"] for p in manifest.parts)
    say(
        f"wrote {total} feature vectors in {len(manifest.parts)} part(s) to {out}"
        + (f"; {len(manifest.failed)} unreadable file(s) listed in {manifest.path.name}"
           if manifest.failed else "")
    )  # fmt: skip
    return out


def _flush(out, manifest, paths, blocks, failed) -> None:
    """Write the rows gathered so far as the next part, then list it (and the failures)."""
    if paths:
        features = np.concatenate(blocks)
        _check_finite(features, paths)
        manifest.settings["feature_dim"] = int(features.shape[1])
        fmt = manifest.settings["output_format"]
        name = _part_name(manifest.shard, _next_part_number(manifest), fmt)
        digests = _write_part(out, name, paths, features, manifest.settings)
        manifest.parts.append({"file": name, "count": len(paths), **(digests or {})})
    manifest.failed += failed
    manifest.save()


def _run_local(images, out, todo, manifest, config, *, model, weights, batch_size, part_size,
               workers, engine, progress, **_):  # fmt: skip
    forward, _ = _features_function(model, weights, engine, config.resolution)
    batches = preprocess.ImageBatches(
        [images / p for p in todo], config, batch_size, workers=workers, skip_errors=True
    )
    paths, blocks, reported = [], [], 0
    for x, indices in batches:
        blocks.append(np.asarray(forward(x), dtype=np.float32))
        paths += [todo[i] for i in indices]
        progress.advance(len(indices))
        if len(paths) >= part_size:
            failed = [[_relative(e.path, images), e.reason] for e in batches.errors[reported:]]
            reported = len(batches.errors)
            _flush(out, manifest, paths, blocks, failed)
            paths, blocks = [], []
    failed = [[_relative(e.path, images), e.reason] for e in batches.errors[reported:]]
    progress.advance(len(failed))
    _flush(out, manifest, paths, blocks, failed)


def _relative(path, root: Path) -> str:
    return Path(path).relative_to(root).as_posix()


# ---------------------------------------------------------------------------------------------
# Ray Data


def _ray_decode(row: dict, config: tuple) -> dict:
    """Ray Data map task: a file path -> its ``uint8`` evaluation crop (or the error)."""
    config = preprocess.as_config(config)
    try:
        image = preprocess.load_image(row["path"])
        crop = np.asarray(preprocess.resize_and_crop(image, *config), dtype=np.uint8)
        error = ""
    except preprocess.ImageError as e:
        crop, error = np.zeros((config.resolution, config.resolution, 3), np.uint8), e.reason
    return {"index": row["index"], "image": crop, "error": error}


class _RayEmbedder:
    """Ray Data actor: one model, batches of crops -> pooled features."""

    def __init__(self, model: str, weights, engine: str, resolution: int):
        self.forward, self.dim = _features_function(model, weights, engine, resolution)

    def __call__(self, batch: dict) -> dict:
        good = np.asarray([e == "" for e in batch["error"]], dtype=bool)
        features = np.zeros((len(good), self.dim), np.float32)
        if good.any():
            x = preprocess.normalize(np.stack(batch["image"])[good])
            features[good] = np.asarray(self.forward(x), dtype=np.float32)
        return {"index": batch["index"], "feature": features, "error": batch["error"]}


def _connect_ray(ray_option):
    ray = require("ray", extra="ray", purpose=fix("ray=", "--ray"))
    require("ray.data", extra="ray", purpose=fix("ray=", "--ray"))
    if ray.is_initialized():
        return ray, False
    address = None if ray_option is True or ray_option == "local" else str(ray_option)
    ray.init(
        address=address,
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.ERROR,  # (ray.init sets the "ray" logger to this level)
    )
    return ray, True


#: Ray's Python loggers, quiet (errors only) while a job runs on Ray: its start-up notes, Ray
#: Data's plan, progress and "execution finished" lines say nothing a user acts on.
_RAY_LOGGERS = ("ray", "ray.data")


@contextlib.contextmanager
def _quiet_ray():
    """Ray's loggers at ERROR during the job, as they were afterwards."""
    loggers = [logging.getLogger(name) for name in _RAY_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _run_ray(images, out, todo, manifest, config, *, model, weights, batch_size, part_size,
             engine, ray, actors, progress, **_):  # fmt: skip
    with _quiet_ray():
        ray, started = _connect_ray(ray)
        try:
            _ray_pipeline(ray, images, out, todo, manifest, config, model=model, weights=weights,
                          batch_size=batch_size, part_size=part_size, engine=engine,
                          actors=actors, progress=progress)  # fmt: skip
        finally:
            if started:  # a local instance or a connection this job made: not left behind
                ray.shutdown()


def _ray_pipeline(ray, images, out, todo, manifest, config, *, model, weights, batch_size,
                  part_size, engine, actors, progress):  # fmt: skip
    import ray.data

    for name in _RAY_LOGGERS:  # Ray Data sets its loggers' levels when it is imported
        logging.getLogger(name).setLevel(logging.ERROR)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    if actors is None:
        actors = max(1, int(ray.cluster_resources().get("CPU", 1)) // 4)
    # One pipeline over every file (one actor pool); rows arrive in any order and are written
    # as parts of ``part_size`` finished images each (a part needs no particular order: a
    # resumed run skips whatever any listed part holds).
    rows = [{"index": i, "path": str(images / p)} for i, p in enumerate(todo)]
    ds = ray.data.from_items(rows)
    # Decoding asks for half a CPU: other resources than the actors', so that Ray Data keeps
    # it in its own parallel tasks instead of fusing it into the model actors.
    ds = ds.map(functools.partial(_ray_decode, config=tuple(config)), num_cpus=0.5)
    ds = ds.map_batches(
        _RayEmbedder,
        fn_constructor_args=(model, weights, engine, config.resolution),
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=1,
    )
    done: dict[int, np.ndarray] = {}
    failed: list[list[str]] = []

    def flush():
        order = sorted(done)
        blocks = [np.stack([done[i] for i in order])] if order else []
        _flush(out, manifest, [todo[i] for i in order], blocks, failed[:])
        done.clear()
        failed.clear()

    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for index, feature, error in zip(batch["index"], batch["feature"], batch["error"]):
            if error:
                failed.append([todo[int(index)], str(error)])
            else:
                done[int(index)] = feature
        progress.advance(len(batch["index"]))
        if len(done) >= part_size:
            flush()
    flush()
