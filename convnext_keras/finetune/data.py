"""Image folders in, reproducible training and validation batches out.

A data directory holds one sub-folder per class, optionally inside ``train/`` and ``val/``
(or ``validation/``); without them a seeded, stratified validation split is drawn.  Every file
is decoded once when the folder is scanned (:func:`_check_image`): files PIL cannot decode are
skipped, counted and reported, never fed to the model.  A file that stops decoding later (it
changed after the scan) never stops a run either: in training it is replaced by the next image
of the epoch's order, in validation left out, and both are counted.

Batches are :class:`keras.utils.PyDataset` objects (no TensorFlow needed): batch ``b`` of epoch
``e`` is a pure function of ``(seed, e, b)`` - the order of the epoch, the random resized crop,
the flip, RandAugment and mixup/cutmix - so a run resumed at any batch sees exactly the batches
the uninterrupted run would have seen, whatever the number of devices, hosts or loader threads.
Row ``r`` of a batch draws its crop, flip and RandAugment from ``(seed, e, b, r)`` alone, so a
host that trains on rows ``[i * n / k, (i + 1) * n / k)`` of every global batch (``shard=(i, k)``)
decodes only those images and gets exactly the rows one host would have made.

Training augmentation follows the original (timm ``create_transform`` + ``Mixup``):
random resized crop (scale 0.08-1, ratio 3/4-4/3, bicubic) and horizontal flip, optionally
RandAugment (Keras' ``RandAugment`` layer, per image as timm applies it) and batch-wise
mixup/cutmix: one lambda (and cutmix box) per batch, each image mixed with its neighbour in the
epoch's random order (rows ``2j`` and ``2j + 1``).  timm pairs the batch with its reverse
instead; both pair every image with a uniformly drawn other image of the batch (the order is a
random permutation), and neighbours keep a pair on one host.  Validation uses the official
evaluation transform (:func:`convnext_keras.preprocess.eval_transform`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import os
from pathlib import Path

import keras
import numpy as np
from PIL import Image

from convnext_keras import preprocess
from convnext_keras.data import files as files_lib

#: Names accepted for the split folders.
TRAIN_DIRS = ("train",)
VAL_DIRS = ("val", "validation")

# Stream ids that keep the random draws of different purposes independent.
_ORDER, _BATCH, _SPLIT, _MIX = 1, 2, 3, 4


class DataError(ValueError):
    """A data directory that cannot be trained on; the message says what to fix."""


@dataclasses.dataclass
class ImageFolder:
    """A scanned data directory: class names and (path, label) samples of each split."""

    root: Path
    classes: list[str]
    train: list[tuple[str, int]]
    val: list[tuple[str, int]]
    #: Files that could not be read as images: (path, reason).
    skipped: list[tuple[str, str]]
    #: "folders" (train/ and val/ given) or "split" (validation drawn from one folder).
    layout: str

    def file_list(self) -> list[str]:
        """``"<split>\t<class>\t<path relative to root>"`` per sample, in order: what a run
        trains and validates on (its fingerprint is :meth:`fingerprint`)."""
        lines = []
        for split, samples in (("train", self.train), ("val", self.val)):
            for path, label in samples:
                name = os.path.relpath(path, self.root)
                lines.append(f"{split}\t{self.classes[label]}\t{name}")
        return lines

    def fingerprint(self) -> str:
        """SHA-256 of :meth:`file_list`: equal iff the same files are in the same splits.
        File names are hashed as their bytes on disk (:func:`os.fsencode`: a name that is not
        valid UTF-8 is kept exactly)."""
        import hashlib

        return hashlib.sha256(encode_lines(self.file_list())).hexdigest()

    def summary(self) -> dict:
        counts = np.bincount([y for _, y in self.train], minlength=len(self.classes))
        return {
            "root": str(self.root),
            "layout": self.layout,
            "classes": len(self.classes),
            "train": len(self.train),
            "val": len(self.val),
            "skipped": len(self.skipped),
            "min_per_class": int(counts.min()),
            "max_per_class": int(counts.max()),
            "fingerprint": self.fingerprint(),
        }


def encode_lines(lines: list[str]) -> bytes:
    """Lines of names as bytes, each name as it is on disk (``surrogateescape``: a file name
    that is not valid UTF-8 round-trips exactly; :func:`decode_lines` reads them back)."""
    return "\n".join(lines).encode("utf-8", "surrogateescape")


def decode_lines(data: bytes) -> list[str]:
    """The inverse of :func:`encode_lines`."""
    return data.decode("utf-8", "surrogateescape").splitlines()


def _class_dirs(folder: Path) -> list[Path]:
    return files_lib.subfolders(folder)


def _files(folder: Path, exclude=()) -> tuple[list[Path], list[tuple[str, str]]]:
    """Every non-hidden regular file below ``folder`` in ``os.walk``'s order (torchvision's
    ImageFolder walks too), each real folder once and never into ``exclude`` (the other class
    folders); and the entries that are not regular files (a FIFO, a broken link), with what
    they are (:func:`convnext_keras.data.files.image_files`)."""
    listing = files_lib.image_files(folder, exclude=exclude)
    return listing.files, [(str(s.path), f"{s.reason}, not an image file") for s in listing.skipped]


def _check_image(path: Path) -> str | None:
    """None if PIL can decode the whole file as an image, else the reason.

    A full decode, not ``Image.verify()`` (which reads no JPEG data: a truncated JPEG passes
    it, then fails mid-training).  JPEGs decode in PIL's draft mode at 1/8 scale: every byte is
    still read and entropy-decoded, so truncation and corrupt data are found, at a fraction of
    the cost of a full-size decode.
    """
    try:
        with Image.open(path) as image:
            image.draft("RGB", (1, 1))
            image.load()
    except (MemoryError, KeyboardInterrupt):
        raise
    except Image.UnidentifiedImageError:
        return files_lib.unidentified_reason(path)
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... on corrupt files
        return f"{type(e).__name__}: {e}"
    return None


def _read_split(folder: Path, classes: list[str] | None, workers: int, claimed=frozenset()):
    """(classes, samples, skipped) of a folder with one sub-folder per class; ``claimed``: the
    identities of every class folder of the data set (walked into by their own class only)."""
    dirs = _class_dirs(folder)
    names = [d.name for d in dirs]
    if classes is not None and names != classes:
        missing = sorted(set(classes) - set(names))
        extra = sorted(set(names) - set(classes))
        raise DataError(
            f"{folder} has other classes than the training folder: "
            + (f"missing {missing}" if missing else "")
            + ("; " if missing and extra else "")
            + (f"unexpected {extra}" if extra else "")
            + ". Give train/ and val/ the same class folders."
        )
    # Every class folder of the data set is claimed: a link from one into another (or back up
    # into the data set) lists nothing twice, in no other class or split.
    listed = [_files(d, exclude=claimed) for d in dirs]
    per_class = [files for files, _ in listed]
    flat = [p for files in per_class for p in files]
    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
        reasons = list(pool.map(_check_image, flat))
    bad = {p: r for p, r in zip(flat, reasons) if r is not None}
    samples = []
    skipped = [s for _, not_files in listed for s in not_files] + [
        (str(p), r) for p, r in bad.items()
    ]
    for label, (d, files) in enumerate(zip(dirs, per_class)):
        good = [str(p) for p in files if p not in bad]
        if not good:
            what = "is empty" if not files else f"has no readable image ({len(files)} skipped)"
            raise DataError(
                f"Class folder {d} {what}. Every class needs at least one image: add images or "
                "remove the folder."
            )
        samples += [(p, label) for p in good]
    return names, samples, skipped


def scan(
    data_dir: str | os.PathLike,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    workers: int = 4,
) -> ImageFolder:
    """Read a data directory (see the module docstring) and check every file once.

    Raises:
        DataError: no such directory, fewer than two classes, an empty class folder,
            train/ and val/ with different classes, or too few images to split.
    """
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DataError(f"Data directory {root} does not exist (or is not a directory).")
    train_dir = next((root / n for n in TRAIN_DIRS if (root / n).is_dir()), None)
    val_dir = next((root / n for n in VAL_DIRS if (root / n).is_dir()), None)
    source = train_dir or root
    if not _class_dirs(source):
        raise DataError(
            f"{source} has no class folders. Expected DATA_DIR/<class>/<image files> (optionally "
            "DATA_DIR/train/<class>/... and DATA_DIR/val/<class>/...)."
        )
    claimed = {
        files_lib.folder_key(d) for split in (source, val_dir) if split for d in _class_dirs(split)
    }
    classes, train, skipped = _read_split(source, None, workers, claimed)
    if len(classes) < 2:
        raise DataError(
            f"{source} has a single class ({classes[0]!r}); a classifier needs at least two "
            "class folders."
        )
    if train_dir is not None and val_dir is not None:
        _, val, skipped_val = _read_split(val_dir, classes, workers, claimed)
        return ImageFolder(root, classes, train, val, skipped + skipped_val, "folders")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}.")
    train, val = stratified_split(train, val_fraction, seed)
    return ImageFolder(root, classes, train, val, skipped, "split")


def describe_change(before: list[str], after: list[str], shown: int = 5) -> str:
    """What differs between two :meth:`ImageFolder.file_list` s, for an error message."""

    def by_path(lines):
        return {line.rsplit("\t", 1)[-1]: line for line in lines}

    old, new = by_path(before), by_path(after)
    parts = []
    for title, names in (
        ("gone", sorted(set(old) - set(new))),
        ("new", sorted(set(new) - set(old))),
        ("moved to another split or class", sorted(p for p in set(old) & set(new)
                                                   if old[p] != new[p])),
    ):  # fmt: skip
        if names:
            more = f", ... ({len(names)} in all)" if len(names) > shown else ""
            parts.append(f"{len(names)} {title} ({', '.join(names[:shown])}{more})")
    return "; ".join(parts) or "the same files in another order"


def stratified_split(samples, val_fraction: float, seed: int):
    """Split (path, label) samples per class: ``round(n * fraction)`` of each class (at least
    one when the class has two or more images and the fraction is positive) go to validation."""
    rng = np.random.default_rng([seed, _SPLIT])
    by_class: dict[int, list] = {}
    for sample in samples:
        by_class.setdefault(sample[1], []).append(sample)
    train, val = [], []
    for label in sorted(by_class):
        items = by_class[label]
        order = rng.permutation(len(items))
        n_val = round(len(items) * val_fraction)
        if val_fraction > 0 and len(items) >= 2:
            n_val = min(max(n_val, 1), len(items) - 1)
        val += [items[i] for i in sorted(order[:n_val])]
        train += [items[i] for i in sorted(order[n_val:])]
    return train, val


# ---------------------------------------------------------------------------------------------
# Augmentation (numpy + PIL; one numpy Generator per batch)


def crop_box(
    width: int,
    height: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """torchvision's ``RandomResizedCrop.get_params``: ``(left, top, width, height)``.

    Ten tries at a box of ``scale`` of the area with a log-uniform aspect ``ratio``; failing
    that, the largest centred box with the aspect clamped into ``ratio``.
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, w, h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def random_resized_crop(
    image: Image.Image,
    rng: np.random.Generator,
    resolution: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    interpolation: str = "bicubic",
) -> Image.Image:
    """torchvision's ``RandomResizedCrop``: a :func:`crop_box` resized to a square."""
    left, top, w, h = crop_box(*image.size, rng, scale, ratio)
    return image.resize(
        (resolution, resolution),
        preprocess.INTERPOLATIONS[interpolation],
        box=(left, top, left + w, top + h),
    )


@dataclasses.dataclass(frozen=True)
class Mix:
    """One batch's mixing draw: the weight ``lam`` of each image (its partner gets
    ``1 - lam``) and, for cutmix, the pasted box ``(y0, y1, x0, x1)`` (None for mixup)."""

    lam: float
    box: tuple[int, int, int, int] | None = None


def draw_mix(
    rng: np.random.Generator,
    height: int,
    width: int,
    *,
    mixup: float = 0.0,
    cutmix: float = 0.0,
    prob: float = 1.0,
    switch_prob: float = 0.5,
) -> Mix | None:
    """timm's batch-mode ``Mixup`` draw (``_params_per_batch`` + ``cutmix_bbox_and_lam``):
    None (no mixing) with probability ``1 - prob``; else cutmix with ``switch_prob`` when both
    alphas are positive, lambda from Beta(alpha, alpha), the cutmix box clipped at the border
    and lambda corrected to the pasted area."""
    if (mixup <= 0 and cutmix <= 0) or rng.random() >= prob:
        return None
    use_cutmix = cutmix > 0 and (mixup <= 0 or rng.random() < switch_prob)
    lam = float(rng.beta(cutmix, cutmix) if use_cutmix else rng.beta(mixup, mixup))
    if not use_cutmix:
        return Mix(lam)
    cut = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * cut), int(width * cut)
    cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
    y0, y1 = (int(v) for v in np.clip([cy - cut_h // 2, cy + cut_h // 2], 0, height))
    x0, x1 = (int(v) for v in np.clip([cx - cut_w // 2, cx + cut_w // 2], 0, width))
    return Mix(1.0 - (y1 - y0) * (x1 - x0) / float(height * width), (y0, y1, x0, x1))


def mix_partners(n: int) -> np.ndarray:
    """Row ``i``'s mixing partner in a batch of ``n``: its neighbour ``i ^ 1`` (rows ``2j`` and
    ``2j + 1`` pair up); the last row of an odd batch is its own partner (left unmixed, as the
    middle row of timm's reversed batch)."""
    partners = np.arange(n) ^ 1
    return np.where(partners < n, partners, np.arange(n))


def apply_mix(x, y, x_partner, y_partner, mix: Mix) -> tuple[np.ndarray, np.ndarray]:
    """Mix images ``x`` and targets ``y`` with their partners' (same shapes) by ``mix``."""
    if mix.box is None:
        x = x * np.float32(mix.lam) + x_partner * np.float32(1.0 - mix.lam)
    else:
        y0, y1, x0, x1 = mix.box
        x = x.copy()
        x[:, y0:y1, x0:x1] = x_partner[:, y0:y1, x0:x1]
    y = y * np.float32(mix.lam) + y_partner * np.float32(1.0 - mix.lam)
    return x.astype(np.float32, copy=False), y.astype(np.float32, copy=False)


def mix_batch(
    x: np.ndarray,
    y: np.ndarray,
    rng: np.random.Generator,
    *,
    mixup: float = 0.0,
    cutmix: float = 0.0,
    prob: float = 1.0,
    switch_prob: float = 0.5,
) -> tuple[np.ndarray, np.ndarray]:
    """timm's batch-mode ``Mixup`` on a whole batch: one lambda (one cutmix box) per batch,
    each image mixed with its neighbour (:func:`mix_partners`).

    ``x`` are NHWC images, ``y`` one-hot (or soft) targets; label smoothing is left to the
    loss, which gives the same targets.  Returns ``(x, y)`` unchanged when no mixing is drawn.
    """
    mix = draw_mix(
        rng, *x.shape[1:3], mixup=mixup, cutmix=cutmix, prob=prob, switch_prob=switch_prob
    )
    if mix is None:
        return x, y
    partners = mix_partners(len(x))
    return apply_mix(x, y, x[partners], y[partners], mix)


@dataclasses.dataclass(frozen=True)
class Augment:
    """Training augmentation settings (see :func:`convnext_keras.finetune.run`)."""

    resolution: int
    interpolation: str = "bicubic"
    crop_scale: tuple[float, float] = (0.08, 1.0)
    hflip: float = 0.5
    randaugment: int = 0  # number of ops; 0 = off
    randaugment_magnitude: float = 0.9
    mixup: float = 0.0
    cutmix: float = 0.0
    mix_prob: float = 1.0
    mix_switch_prob: float = 0.5


def _randaugment(image: np.ndarray, aug: Augment, seed: int) -> np.ndarray:
    # A fresh layer per image: its seed makes the draw a function of the image's row alone.
    layer = keras.layers.RandAugment(
        value_range=(0, 255),
        num_ops=aug.randaugment,
        factor=aug.randaugment_magnitude,
        interpolation="bilinear",
        seed=seed,
        data_format="channels_last",
    )
    out = keras.ops.convert_to_numpy(layer(image[None].astype(np.float32), training=True))[0]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def shard_rows(batch_size: int, shard: tuple[int, int]) -> range:
    """The rows of a global batch that host ``shard[0]`` of ``shard[1]`` trains on.

    Raises:
        ValueError: the batch does not split evenly, or the shard is out of range.
    """
    index, count = shard
    if not 0 <= index < count:
        raise ValueError(f"shard index must be in [0, {count}), got {index}.")
    if batch_size % count:
        raise ValueError(
            f"batch_size {batch_size} does not split over {count} hosts; use a multiple of {count}."
        )
    per_host = batch_size // count
    return range(index * per_host, (index + 1) * per_host)


class _Failures:
    """Files that stopped decoding after the scan: ``{path: reason}``, shared by the loader
    threads.  A bad file never stops a run: it is replaced (training) or left out (validation)
    and counted here."""

    def __init__(self):
        self.files: dict[str, str] = {}

    def load(self, path: str) -> Image.Image | None:
        try:
            return preprocess.load_image(path)
        except preprocess.ImageError as e:
            self.files[path] = e.reason
            return None


class TrainBatches(keras.utils.PyDataset):
    """Training batches of one epoch, starting at batch ``start`` (for a resumed run).

    The epoch's order is a permutation drawn from ``(seed, epoch)``; incomplete last batches
    are dropped (as the original's ``drop_last=True``).  Yields ``(images, one-hot targets)``:
    the whole global batch, or with ``shard=(i, k)`` the rows :func:`shard_rows` gives host
    ``i`` of ``k`` (bit-equal with those rows of the whole batch).
    """

    def __init__(
        self,
        samples: list[tuple[str, int]],
        num_classes: int,
        aug: Augment,
        *,
        batch_size: int,
        epoch: int,
        seed: int,
        start: int = 0,
        workers: int = 1,
        shard: tuple[int, int] = (0, 1),
    ):
        super().__init__(workers=workers, use_multiprocessing=False)
        self.rows = shard_rows(batch_size, shard)
        self.samples, self.num_classes, self.aug = samples, num_classes, aug
        self.batch_size, self.epoch, self.seed, self.start = batch_size, epoch, seed, start
        self.steps = len(samples) // batch_size
        self.order = np.random.default_rng([seed, _ORDER, epoch]).permutation(len(samples))
        #: Files that failed to decode this epoch (each was replaced by the next one in order).
        self.failures = _Failures()

    def _image(self, position: int) -> tuple[Image.Image, int]:
        """The sample at ``position`` of the epoch's order, or, if its file no longer decodes,
        the next one that does (deterministic: the same files fail the same way on resume)."""
        for step in range(len(self.order)):
            path, label = self.samples[self.order[(position + step) % len(self.order)]]
            image = self.failures.load(path)
            if image is not None:
                return image, label
        raise DataError(
            f"No training image decodes any more ({len(self.failures.files)} failed, e.g. "
            f"{next(iter(self.failures.files), '?')}); check the data directory."
        )

    def __len__(self):
        return self.steps - self.start

    def _row(self, index: int, row: int) -> tuple[np.ndarray, int]:
        """Row ``row`` of batch ``index``: the augmented ``uint8`` image and its label, drawn
        from ``(seed, epoch, index, row)`` alone."""
        aug = self.aug
        rng = np.random.default_rng([self.seed, _BATCH, self.epoch, index, row])
        image, label = self._image(index * self.batch_size + row)
        image = random_resized_crop(
            image, rng, aug.resolution, aug.crop_scale, interpolation=aug.interpolation
        )
        if rng.random() < aug.hflip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = np.asarray(image, dtype=np.uint8)
        if aug.randaugment:
            pixels = _randaugment(pixels, aug, int(rng.integers(1, 2**31 - 1)))
        return pixels, label

    def batch(self, index: int):
        """This host's rows of batch ``index`` of the epoch (counting from the epoch's start,
        not ``start``): ``(normalised images, targets)``."""
        aug = self.aug
        res = aug.resolution
        mix = draw_mix(
            np.random.default_rng([self.seed, _MIX, self.epoch, index]),
            res,
            res,
            mixup=aug.mixup,
            cutmix=aug.cutmix,
            prob=aug.mix_prob,
            switch_prob=aug.mix_switch_prob,
        )
        rows = list(self.rows)
        partners = mix_partners(self.batch_size)[rows] if mix is not None else []
        made = {r: self._row(index, r) for r in sorted({*rows, *(int(p) for p in partners)})}

        def stack(which):
            x = preprocess.normalize(np.stack([made[r][0] for r in which]))
            y = np.eye(self.num_classes, dtype=np.float32)[[made[r][1] for r in which]]
            return x, y

        x, y = stack(rows)
        if mix is None:
            return x, y
        return apply_mix(x, y, *stack(partners), mix)

    def __getitem__(self, i):
        if i >= len(self):
            raise IndexError(i)
        return self.batch(self.start + i)


class EvalBatches(keras.utils.PyDataset):
    """Validation images through the official eval transform, in folder order.

    Every batch has ``batch_size`` rows (the last one padded by repeating its first image) so
    that it splits evenly over devices; :attr:`sizes` says how many rows are real.  With
    ``shard=(i, k)`` a batch holds only the rows :func:`shard_rows` gives host ``i`` of ``k``.
    A file that no longer decodes gives a row of zeros and its sample index in :attr:`failed`
    (leave it out).
    """

    def __init__(
        self,
        samples: list[tuple[str, int]],
        *,
        resolution: int,
        crop_pct: float,
        interpolation: str,
        batch_size: int,
        workers: int = 1,
        shard: tuple[int, int] = (0, 1),
    ):
        super().__init__(workers=workers, use_multiprocessing=False)
        self.rows = shard_rows(batch_size, shard)
        self.samples = samples
        self.config = (resolution, crop_pct, interpolation)
        self.batch_size = batch_size
        n = len(samples)
        self.sizes = [min(batch_size, n - s) for s in range(0, n, batch_size)]
        self.failures = _Failures()
        #: Sample indices whose file failed to decode (their rows are zeros).
        self.failed: set[int] = set()

    @property
    def labels(self) -> np.ndarray:
        return np.asarray([label for _, label in self.samples], dtype=np.int64)

    def __len__(self):
        return len(self.sizes)

    def __getitem__(self, i):
        if i >= len(self):
            raise IndexError(i)
        first = i * self.batch_size
        # Sample index of every row of this batch: the real ones, then the padding (the first).
        indices = [first + (r if r < self.sizes[i] else 0) for r in self.rows]
        made = {}
        for index in sorted(set(indices)):
            image = self.failures.load(self.samples[index][0])
            if image is None:
                self.failed.add(index)
                made[index] = np.zeros((self.config[0], self.config[0], 3), np.float32)
            else:
                made[index] = preprocess.eval_transform(image, *self.config)
        return (np.stack([made[index] for index in indices]),)
