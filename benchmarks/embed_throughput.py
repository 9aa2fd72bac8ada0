"""Does ``convnext embed`` keep the model busy?  Its features/s against ``convnext bench``.

For one model (random weights: speed does not depend on them), in one process, ``rounds``
times in turn:

* ``convnext bench``'s inference rate (``tasks.bench.benchmark``, the same engine ``embed`` picks:
  onnxruntime on a CPU), batches already in memory: the model alone;
* ``embed`` of ``n`` JPEG photos (500x375, ImageNet's usual size) into a fresh folder:
  decoding, the evaluation transform, the model and the Parquet parts.  Its steady rate is read
  off the progress: images done after the first batch / time from the first batch to the last
  (the start-up - building the model and its engine, Ray's workers - is left out; it is
  reported apart as ``seconds_total``);
* the same with ``ray=True`` on a local Ray instance (``ray.init(num_cpus=CPUs)``, one model
  actor) when ``--ray`` is given.

Prints one JSON line per measurement and a summary line with the ratios (paired by round:
the load of a shared machine moves between rounds) and the load average.
Usage::

    KERAS_BACKEND=tensorflow python benchmarks/embed_throughput.py --model convnext_tiny \\
        --images 160 --batch-size 16 --rounds 3 --ray
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import tempfile
import time
from pathlib import Path


def photos(folder: Path, count: int, seed: int = 0) -> Path:
    """``count`` smooth random JPEGs of 500x375 (decode cost of a real photo)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        small = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((500, 375), Image.Resampling.BICUBIC)
        image.save(folder / f"{i:05d}.jpg", quality=90)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="convnext_tiny")
    parser.add_argument("--images", type=int, default=160)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--ray", action="store_true")
    args = parser.parse_args()

    import convnext_keras as ck
    from convnext_keras.tasks import bench

    work = Path(tempfile.mkdtemp(prefix="embed_bench_"))
    folder = photos(work / "photos", args.images)
    embed_lib = importlib.import_module("convnext_keras.tasks.embed")
    advance = embed_lib._Progress.advance
    stamps: list[tuple[float, int]] = []

    def recording_advance(self, n):
        stamps.append((time.perf_counter(), n))
        advance(self, n)

    embed_lib._Progress.advance = recording_advance
    if args.ray:
        import ray

        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    results: dict[str, list[float]] = {"bench": [], "embed": [], "embed_ray": []}

    def timed_embed(ray) -> dict:
        out = Path(tempfile.mkdtemp(dir=work))
        stamps.clear()
        began = time.perf_counter()
        ck.embed(folder, out, model=args.model, weights=None, batch_size=args.batch_size,
                 ray=ray, actors=1 if ray else None, verbose=0)  # fmt: skip
        total = time.perf_counter() - began
        (first, _), (last, _) = stamps[0], stamps[-1]
        after_first = sum(n for _, n in stamps[1:])
        return {"seconds_total": round(total, 2), "features_per_s": after_first / (last - first)}

    for round_ in range(args.rounds):
        result = bench.benchmark(args.model, batch_size=args.batch_size, warmup=2, repeats=5)
        rate = result.timing.images_per_second
        results["bench"].append(rate)
        print(json.dumps({"round": round_, "what": "bench", "img_per_s": rate,
                          "engine": result.engine}), flush=True)  # fmt: skip
        for key, ray in (("embed", None), ("embed_ray", True)):
            if ray and not args.ray:
                continue
            line = {"round": round_, "what": key, **timed_embed(ray)}
            results[key].append(line["features_per_s"])
            print(json.dumps(line), flush=True)
    # Ratios paired by round (the machine's load moves between rounds), then their median.
    summary = {k: statistics.median(v) for k, v in results.items() if v}
    for key in ("embed", "embed_ray"):
        if results[key]:
            paired = [a / b for a, b in zip(results[key], results["bench"])]
            summary[f"{key}_vs_bench_by_round"] = paired
            summary[f"{key}_vs_bench"] = statistics.median(paired)
    summary["load_average"] = os.getloadavg()
    summary["cpus"] = os.cpu_count()
    print(json.dumps({"summary": summary}), flush=True)


if __name__ == "__main__":
    main()
