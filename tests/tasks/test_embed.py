"""``convnext embed`` / ``ck.embed`` / ``ck.load_features``: one process, shards, Ray, resume.

ConvNeXt-atto with seeded random weights at 32x32 on a dozen small images (two folders, PNG
and JPEG, one truncated JPEG, one text file).  Every way of running the job - one process,
two shards into one folder, the ``.npy`` format, a run interrupted and continued, Ray Data on
a local Ray instance with its driver killed and run again - must give the features the model
gives the official evaluation transform of each image.
"""

from __future__ import annotations

import importlib
import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import convnext_keras as ck
from convnext_keras import preprocess
from convnext_keras.cli import main

# (``ck.embed`` is the function; the module by its name)
embed_lib = importlib.import_module("convnext_keras.tasks.embed")

OPTIONS = dict(model="convnext_atto", weights=None, resolution=32, batch_size=3, part_size=4)
CLI = ["--model", "convnext_atto", "--weights", "none", "--resolution", "32"]
CLI += ["--batch-size", "3", "--part-size", "4"]
PROCESS_TIMEOUT = 300


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """11 readable images in two folders, a truncated JPEG and a text file."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(11):
        folder = root / ("cats" if i % 2 else "dogs")
        folder.mkdir(exist_ok=True)
        size = (int(rng.integers(36, 80)), int(rng.integers(36, 80)))
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:02d}.{'png' if i % 3 else 'jpg'}")
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG")
    (root / "dogs" / "broken.jpg").write_bytes(buffer.getvalue()[:200])
    (root / "dogs" / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def expected(images):
    """What the model gives each readable image (Keras, the official eval transform)."""
    import keras

    keras.utils.set_random_seed(0)
    model = ck.load_model("convnext_atto", weights=None, features="pooled")
    paths = [p for p in embed_lib.image_files(images) if p != "dogs/broken.jpg"]
    config = preprocess.PreprocessConfig(32, *preprocess.config_for("convnext_atto")[1:])
    x = np.stack([preprocess.transform_file(images / p, config) for p in paths])
    return np.asarray(model.predict(x, verbose=0), np.float32), paths


@pytest.fixture(scope="module")
def single(images, tmp_path_factory, expected):
    """One process through the command line."""
    out = tmp_path_factory.mktemp("single")
    result = CliRunner().invoke(main, ["embed", str(images), "--out", str(out), *CLI])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return out, result.output


def _assert_features(out, expected):
    features, paths = ck.load_features(out)
    assert paths == expected[1]
    assert features.dtype == np.float32 and features.shape == expected[0].shape
    np.testing.assert_allclose(features, expected[0], rtol=1e-4, atol=1e-4)
    return features


def test_one_process_writes_parts_manifest_and_the_model_s_features(single, expected):
    out, output = single
    assert "RANDOM WEIGHTS (--weights none)" in output  # on stderr: features go to files
    assert "embedding 12 of 12 images with convnext_atto (32px)" in output
    assert "wrote 11 feature vectors in 2 part(s)" in output and "1 unreadable" in output
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["complete"] and manifest["images"] == 11 and manifest["feature_dim"] == 320
    assert manifest["preprocessing"] == {"resolution": 32, "crop_pct": 0.875,
                                         "interpolation": "bicubic"}  # fmt: skip
    assert [f[0] for f in manifest["failed"]] == ["dogs/broken.jpg"]
    assert [p["count"] for p in manifest["parts"]] == [6, 5]  # whole batches of 3
    import pyarrow.parquet as pq

    table = pq.read_table(out / manifest["parts"][0]["file"])
    assert table.column_names == ["path", "path_bytes", "feature", "model", "preprocessing"]
    assert set(table.column("model").to_pylist()) == {"convnext_atto"}
    assert not list(out.glob(".*part*"))  # no temporary file left
    _assert_features(out, expected)


def test_the_features_folder_is_a_parquet_dataset(single, expected):
    """What docs/embed.md shows: pandas (and Arrow's dataset discovery) read the folder as one
    table - the manifest's leading underscore keeps it out, as Spark's _SUCCESS."""
    import pandas as pd
    import pyarrow.dataset as ds

    out, _ = single
    frame = pd.read_parquet(out)
    assert sorted(frame["path"]) == expected[1]
    by_path = dict(zip(frame["path"], frame["feature"]))
    np.testing.assert_allclose(
        np.stack([by_path[p] for p in expected[1]]), expected[0], rtol=1e-4, atol=1e-4
    )
    assert ds.dataset(out, format="parquet").count_rows() == 11


def test_a_folder_of_an_earlier_version_is_read_and_continued(single, images, expected, tmp_path):
    """Folders written before the rename hold manifest.json: load_features reads them, and a
    run that continues one writes _manifest.json in its place."""
    import shutil

    out = tmp_path / "old"
    shutil.copytree(single[0], out)
    (out / "_manifest.json").rename(out / "manifest.json")
    _assert_features(out, expected)
    result = CliRunner().invoke(main, ["embed", str(images), "--out", str(out), *CLI])
    assert result.exit_code == 0, result.output
    assert "embedding 0 of 12 images" in result.output
    assert sorted(p.name for p in out.glob("*manifest*")) == ["_manifest.json"]
    _assert_features(out, expected)


def test_load_features_imports_no_backend(single, expected):
    """Reading features needs numpy and pyarrow only: Keras and the backends are made
    unimportable in the child, and it still reads them."""
    from test_first_checks import BACKENDS, HIDE

    code = HIDE.replace("HIDDEN", repr(BACKENDS)) + (
        "import convnext_keras as ck\n"
        f"features, paths = ck.load_features({str(single[0])!r})\n"
        "print(features.shape, len(paths), sorted(m for m in sys.modules if m in "
        "('keras', 'tensorflow', 'jax', 'torch')))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=PROCESS_TIMEOUT
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split("\n")[0] == "(11, 320) 11 []"


def test_two_shards_into_one_folder_and_npy_give_the_same_features(images, expected, tmp_path):
    sharded = tmp_path / "sharded"
    for i in range(2):
        assert ck.embed(images, sharded, shard=f"{i}/2", verbose=0, **OPTIONS) == sharded
    assert {p.name for p in sharded.glob("*manifest*")} == {
        "_manifest-00000-of-00002.json",
        "_manifest-00001-of-00002.json",
    }
    _assert_features(sharded, expected)
    npy = ck.embed(images, tmp_path / "npy", format="npy", verbose=0, **OPTIONS)
    assert sorted(p.suffix for p in npy.glob("part-*")) == [".json"] * 2 + [".npy"] * 2
    _assert_features(npy, expected)


def test_an_interrupted_run_continues_where_it_stopped(images, expected, tmp_path, monkeypatch):
    out = tmp_path / "interrupted"
    real_write, written = embed_lib._write_part, []

    def dying_write(out_dir, name, *args):
        if written:  # the second part: die while it is being written
            (out_dir / f".{name}.abc.part").write_bytes(b"half a part")
            raise KeyboardInterrupt
        written.append(name)
        return real_write(out_dir, name, *args)

    monkeypatch.setattr(embed_lib, "_write_part", dying_write)
    with pytest.raises(KeyboardInterrupt):
        ck.embed(images, out, verbose=0, **OPTIONS)
    monkeypatch.undo()
    assert len(json.loads((out / "_manifest.json").read_text())["parts"]) == 1
    result = CliRunner().invoke(main, ["embed", str(images), "--out", str(out), *CLI])
    assert result.exit_code == 0, result.output
    # The first part's 6 images, and the broken file (decoded ahead, listed with that part).
    assert "embedding 5 of 12 images" in result.output and "7 already done" in result.output
    _assert_features(out, expected)
    again = CliRunner().invoke(main, ["embed", str(images), "--out", str(out), *CLI])
    assert "embedding 0 of 12 images" in again.output  # a finished folder is left as it is


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--shard", "2/2"], "shard 2/2: need 0 <= i < n"),
        (["--shard", "x"], "shard must look like i/n"),
        (["--resolution", "64"], "holds features made with other settings"),
        (["--model", "convnext_atoo"], "Did you mean"),
        (["--model", "upernet_convnext_tiny_ade20k_512"], "label images with convnext segment"),
    ],
)
def test_bad_options_are_one_line_errors(single, images, args, message):
    out, _ = single
    cli = [*CLI, *args] if args[0] != "--model" else [*args, "--weights", "none"]
    result = CliRunner().invoke(main, ["embed", str(images), "--out", str(out), *cli])
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "Traceback" not in result.output


def test_weights_from_a_hub_address(images, tmp_path, hub_server):
    """``--weights hf://ORG/REPO`` (served by the loopback Hub): the file's features."""
    import torch_reference as ref

    from convnext_keras import registry

    spec = registry.VARIANTS["atto"]
    file = ref.save_timm(ref.hf_model(spec.depths, spec.dims, 1000, seed=3),
                         tmp_path / "model.safetensors", True)  # fmt: skip
    (hub_server.root / "org/atto").mkdir(parents=True)
    (hub_server.root / "org/atto/model.safetensors").write_bytes(file.read_bytes())
    options = {**OPTIONS, "weights": "hf://org/atto"}
    out = ck.embed(images, tmp_path / "out", **options, verbose=0)
    model = ck.load_model("convnext_atto", weights=file, features="pooled")
    features, paths = ck.load_features(out)
    config = preprocess.PreprocessConfig(32, *preprocess.config_for("convnext_atto")[1:])
    x = np.stack([preprocess.transform_file(images / p, config) for p in paths])
    np.testing.assert_allclose(features, model.predict(x, verbose=0), rtol=1e-4, atol=1e-4)


def test_odd_names_fifos_cycles_stale_leftovers_and_damaged_parts(images, tmp_path, caplog, fifo):
    """A folder with a name that is not UTF-8 (``caf\\xe9.png``), a FIFO named ``pipe.jpg``
    and a link back up the tree (``sub/up -> ..``): every regular image once, the name kept
    exactly (``path_bytes``; ``path`` as text with ``\\xe9``), the FIFO listed as unreadable -
    nothing hangs, nothing is lost.  Then a bit flipped in a written part: ``load_features``
    refuses it, and the next run embeds that part's images again (and removes a stale
    temporary a killed run left), giving the same features."""
    import pyarrow.parquet as pq

    folder = tmp_path / "odd"
    (folder / "sub").mkdir(parents=True)
    name = os.fsdecode(b"caf\xe9.png")
    sources = sorted(p for p in images.rglob("*") if p.suffix in (".png", ".jpg"))[:4]
    for i, source in enumerate(sources):
        target = folder / (name if i == 0 else f"sub/{i}{source.suffix}")
        target.write_bytes(source.read_bytes())
    fifo(folder / "pipe.jpg")
    os.symlink("..", folder / "sub" / "up")
    out = tmp_path / "out"
    args = ["embed", str(folder), "--out", str(out), *CLI, "--part-size", "2"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    features, paths = ck.load_features(out)
    assert paths == sorted([name, "sub/1.jpg", "sub/2.png", "sub/3.png"])  # once each
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["failed"] == [["pipe.jpg", "a FIFO (named pipe), not an image file"]]
    table = pq.read_table(out / manifest["parts"][0]["file"])
    assert table.column("path").to_pylist()[0] == "caf\\xe9.png"
    assert table.column("path_bytes").to_pylist()[0] == b"caf\xe9.png"

    part = manifest["parts"][1]
    path = out / part["file"]
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x10  # Parquet writes no page checksums by default
    path.write_bytes(bytes(data))
    with pytest.raises(embed_lib.EmbedError, match="is damaged: its SHA-256"):
        ck.load_features(out)
    leftover = out / ".part-00000-of-00001-000009.parquet.x1y2z3.part"
    leftover.write_bytes(b"a part being written when the run was killed")
    old = time.time() - 3600
    os.utime(leftover, (old, old))
    with caplog.at_level("WARNING", logger="convnext_keras"):
        again = CliRunner().invoke(main, args)
    assert again.exit_code == 0, again.output
    assert f"embedding {part['count']} of 5 images" in again.output
    assert "is damaged" in caplog.text and not leftover.exists()
    repaired, same_paths = ck.load_features(out)
    assert same_paths == paths
    np.testing.assert_array_equal(repaired, features)


def test_an_empty_folder_and_a_folder_without_features_are_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(main, ["embed", str(tmp_path / "empty"), "--out",
                                       str(tmp_path / "o"), *CLI])  # fmt: skip
    assert result.exit_code == 2 and "holds no image files" in result.stderr
    with pytest.raises(embed_lib.EmbedError, match="holds no embedding manifest"):
        ck.load_features(tmp_path / "empty")


# ---------------------------------------------------------------------------------------------
# Ray Data


@pytest.fixture(scope="module")
def ray_address():
    """One local Ray instance (2 CPUs) for the module: its start-up takes seconds."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.mark.slow
def test_ray_gives_the_same_features_and_resumes_after_the_driver_is_killed(
    images, expected, ray_address, tmp_path
):
    """A `convnext embed --ray ADDRESS` driver is killed with SIGKILL once its first part is
    listed; run again (here from Python, on the same cluster) it finishes the job, and the
    features are the one-process run's."""
    out = tmp_path / "ray"
    env = {**os.environ, "CONVNEXT_NO_PROGRESS": "1"}
    driver = subprocess.Popen(
        [sys.executable, "-c", "from convnext_keras.cli import main; main()", "embed",
         str(images), "--out", str(out), *CLI, "--part-size", "2", "--batch-size", "2",
         "--ray", ray_address],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    manifest = out / "_manifest.json"
    try:
        deadline = time.monotonic() + PROCESS_TIMEOUT
        while time.monotonic() < deadline and driver.poll() is None:
            if manifest.exists() and json.loads(manifest.read_text())["parts"]:
                break
            time.sleep(0.05)
        assert driver.poll() is None, driver.communicate()[0][-3000:]
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    kept = json.loads(manifest.read_text())
    assert not kept["complete"] and 0 < kept["images"] < 11
    assert ck.embed(images, out, ray=True, verbose=0, **{**OPTIONS, "part_size": 2}) == out
    final = json.loads(manifest.read_text())
    assert final["complete"] and final["images"] == 11
    assert [f[0] for f in final["failed"]] == ["dogs/broken.jpg"]
    _assert_features(out, expected)
