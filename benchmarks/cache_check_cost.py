"""What the cache's integrity check costs a warm ``load_model`` (docs/verification.md).

For each variant: converted weights (random, the size of the real ones) are put in a fresh
cache as ``load_model`` would leave them, then, alternately, ``repeats`` times each:

* ``load_model(name)`` from that warm cache (build + read + check + assign: what a user waits);
* the same with the check switched off (``cache.read_converted`` replaced by the unchecked read
  the library did before: ``safe_open`` + ``get_tensor``);
* the check alone, not overlapped: SHA-256 of the file (``cache.file_sha256``) plus the NaN/inf
  scan, and the unchecked read.

Prints one JSON line per variant (medians, seconds).  Usage::

    KERAS_BACKEND=tensorflow python benchmarks/cache_check_cost.py [tiny base] [--repeats 5]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="*", default=["tiny", "base"])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    os.environ["CONVNEXT_HOME"] = tempfile.mkdtemp(prefix="convnext_cache_cost_")

    import keras
    import numpy as np
    from safetensors import safe_open

    import convnext_keras as ck
    from convnext_keras import registry
    from convnext_keras.weights import cache

    for variant in args.variants:
        ckpt = registry.CHECKPOINTS[f"convnext_{variant}_1k_224"]
        model = ck.build_model(variant)
        weights = {
            layer.name: [np.asarray(w) for w in layer.get_weights()]
            for layer in model.layers
            if layer.weights
        }
        path = cache.converted_cache_path(ckpt)
        cache.save_converted(weights, path, {"source": ckpt.filename, "model": ckpt.name})
        del model
        keras.backend.clear_session()

        def unchecked(path=path):
            with safe_open(str(path), framework="numpy") as f:
                return {k: f.get_tensor(k) for k in f.keys()}

        def check(path=path):
            cache.file_sha256(path)
            for a in unchecked(path).values():
                np.isfinite(a).all()

        def load_unchecked(name=ckpt.name, checked=cache.read_converted):
            def read(p):
                flat = unchecked(p)
                out = {}
                for k in sorted(flat, key=lambda k: (k.rsplit("/", 1)[0], int(k.rsplit("/")[1]))):
                    out.setdefault(k.rsplit("/", 1)[0], []).append(flat[k])
                return out

            cache.read_converted = read
            try:
                return ck.load_model(name)
            finally:
                cache.read_converted = checked

        times = {
            "load_model": [],
            "load_model_unchecked": [],
            "sha256": [],
            "sha256+finite+read": [],
            "read_unchecked": [],
        }
        jobs = [
            ("load_model", lambda name=ckpt.name: ck.load_model(name)),
            ("load_model_unchecked", load_unchecked),
            ("sha256", lambda path=path: cache.file_sha256(path)),
            ("sha256+finite+read", check),
            ("read_unchecked", unchecked),
        ]
        for repeat in range(args.repeats):
            # Alternate which load goes first; each starts from a cleared session.
            order = jobs if repeat % 2 == 0 else [jobs[1], jobs[0], *jobs[2:]]
            for key, fn in order:
                keras.backend.clear_session()
                gc.collect()
                start = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - start)
        medians = {k: round(statistics.median(v), 3) for k, v in times.items()}
        print(
            json.dumps(
                {
                    "model": ckpt.name,
                    "file_mb": round(path.stat().st_size / 2**20, 1),
                    "backend": keras.backend.backend(),
                    "repeats": args.repeats,
                    "median_s": medians,
                    "load_model_overhead": round(
                        medians["load_model"] / medians["load_model_unchecked"] - 1, 3
                    ),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
