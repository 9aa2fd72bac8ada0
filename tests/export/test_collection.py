"""The TF-Hub-style collection: model cards from the registry, the index, and a real build of a
collection from a local checkpoint (with one model missing and one failing)."""

from __future__ import annotations

import json
import shutil

import keras
import numpy as np
import pytest
import torch_reference as ref
from click.testing import CliRunner

import convnext_keras as ck
from convnext_keras import registry
from convnext_keras.cli import main
from convnext_keras.export import cards, collection

TF = keras.backend.backend() == "tensorflow"


@pytest.mark.parametrize("name", registry.families("convnext"))
def test_model_card_says_what_the_registry_says(name):
    ckpt = registry.CHECKPOINTS[name]
    card = cards.model_card(name)
    fe = name + "_fe"
    assert card.startswith(f"# {name}\n")
    assert f"| Resolution | {ckpt.resolution}x{ckpt.resolution} |" in card
    params = ck.count_params(ckpt.variant, ckpt.num_classes)
    assert f"{params:,} (classifier), {ck.count_params(ckpt.variant):,} (feature extractor)" in card
    if ckpt.reported_acc1 is None:
        assert "not reported" in card and ckpt.num_classes == registry.NUM_CLASSES_21K
    else:
        assert f"| ImageNet-1k top-1 | {ckpt.reported_acc1:.1f}% (reported" in card
    training = {
        "imagenet-1k": "| Training data | ImageNet-1k (",
        "imagenet-21k": "| Training data | ImageNet-21k (",
        "imagenet-21k -> imagenet-1k": "| Training data | ImageNet-21k pre-training, then "
        "ImageNet-1k fine-tuning |",
    }[ckpt.dataset]
    assert training in card
    assert f"`logits`: {ckpt.num_classes} classes" in card
    assert f"{ckpt.spec.num_features}-d pooled" in card
    assert f"({registry.OFFICIAL_BASE_URL}{ckpt.filename})" in card
    # input contract, usage for classification and for fine-tuning, references
    assert "NHWC" in card and str(registry.IMAGENET_MEAN) in card
    assert str(registry.IMAGENET_STD) in card
    assert f'tf.saved_model.load("{name}")' in card
    assert 'model.signatures["serving_default"](images=' in card
    assert f'hub.KerasLayer("{fe}", trainable=True)' in card
    assert f"tf_keras.Input(({ckpt.resolution}, {ckpt.resolution}, 3))" in card
    assert "arXiv:2201.03545" in card and "https://github.com/facebookresearch/ConvNeXt" in card
    assert "| Weights licence | MIT, " in card and "ConvNeXt-V2" not in card
    if ckpt.resolution >= registry.SQUASH_RESOLUTION:
        assert f"resize to {ckpt.resolution}x{ckpt.resolution} (bicubic, no crop)" in card
    else:
        assert "resize the shorter side to 256 (bicubic), centre-crop 224x224" in card


@pytest.mark.parametrize("name", registry.families("convnextv2"))
def test_v2_model_cards_name_the_v2_paper_licence_and_encoders(name):
    ckpt = registry.CHECKPOINTS[name]
    card = cards.model_card(name)
    fe = name + "_fe"
    assert card.startswith(f"# {name}\n")
    size = ckpt.spec.size.capitalize()
    assert f"| Architecture | ConvNeXt V2-{size}: depths" in card
    assert "| Weights licence | CC-BY-NC-4.0 (non-commercial use only), " in card
    assert "https://creativecommons.org/licenses/by-nc/4.0/" in card
    assert "arXiv:2301.00808" in card and "https://github.com/facebookresearch/ConvNeXt-V2" in card
    assert "arXiv:2201.03545" not in card
    url = f"https://dl.fbaipublicfiles.com/convnext/{ckpt.source.path}"
    assert f"[`{ckpt.filename}`]({url})" in card
    assert f'hub.KerasLayer("{fe}", trainable=True)' in card
    if ckpt.has_head:
        params = ck.count_params(ckpt.variant, ckpt.num_classes)
        assert f"| ImageNet-1k top-1 | {ckpt.reported_acc1:.1f}% (reported" in card
        assert f"{params:,} (classifier)" in card and f'tf.saved_model.load("{name}")' in card
        assert "FCMAE pre-training on ImageNet-1k" in card
    else:
        assert "encoder pre-trained self-supervised on ImageNet-1k (FCMAE" in card
        assert "not reported (a self-supervised encoder without head)" in card
        assert "classifier" not in card.split("## Usage")[0].replace("classification head", "")
        assert f'tf.saved_model.load("{fe}")' in card and "`logits`" not in card


def test_model_card_snippet_is_the_official_transform():
    """The card's PIL snippet computes what convnext_keras.preprocess.eval_transform does."""
    import skimage.data
    from PIL import Image

    from convnext_keras.preprocess import eval_transform

    card = cards.model_card("convnext_tiny_1k_224")
    code = card.split("### Classification\n\n```python\n")[1].split("```")[0]
    lines = code.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("w, h = image.size"))
    end = next(i for i, line in enumerate(lines) if line.startswith("x = "))
    snippet = "\n".join(lines[start : end + 1])
    for photo in (skimage.data.chelsea(), skimage.data.astronaut()[:, 40:]):
        scope = {"np": np, "Image": Image, "image": Image.fromarray(photo)}
        exec(snippet, scope)
        want = eval_transform(Image.fromarray(photo), 224, 0.875, "bicubic")
        assert np.max(np.abs(scope["x"] - want)) < 1e-5


def test_model_card_refuses_other_names():
    with pytest.raises(collection.CollectionError, match="convnext_tiny_1k_224"):
        cards.model_card("convnext_atto")
    with pytest.raises(ck.UnknownModelError):
        cards.model_card("convnext_tiny_1k_999")


def test_no_matching_model_lists_the_choices(tmp_path):
    with pytest.raises(collection.CollectionError, match="convnext_xlarge_21k_1k_384"):
        collection.build_collection(tmp_path / "c", "convnext_huge_*")
    with pytest.raises(collection.CollectionError, match="Not checkpoints"):
        collection.build_collection(tmp_path / "c", ["convnext_tiny_1k_224_fe"])
    assert not (tmp_path / "c").exists()


def test_missing_weights_build_nothing(tmp_path, monkeypatch, loopback_server):
    """No file in --weights-dir, nothing cached, a mirror without the files: every model is
    reported missing with the reason, and no model directory appears."""
    monkeypatch.setenv("CONVNEXT_BASE_URL", loopback_server.url)
    weights = tmp_path / "weights"
    weights.mkdir()
    out = tmp_path / "c"
    report = collection.build_collection(out, "convnext_tiny_1k*", weights_dir=weights, log=None)
    assert report.built == [] and not report.ok
    assert set(report.missing) == {"convnext_tiny_1k_224"}
    assert "convnext_tiny_1k_224_ema.pth" in report.missing["convnext_tiny_1k_224"]
    assert str(weights) in report.missing["convnext_tiny_1k_224"]

    report = collection.build_collection(out, "convnext_small_1k*", log=None)  # download path
    assert set(report.missing) == {"convnext_small_1k_224"}
    assert "HTTP 404" in report.missing["convnext_small_1k_224"]
    assert loopback_server.requests == ["/convnext_small_1k_224_ema.pth"]
    assert sorted(p.name for p in out.iterdir()) == ["index.json", "index.md"]
    index = (out / "index.md").read_text()
    assert "(nothing built yet)" in index and "`convnext_small_1k_224`: " in index

    result = CliRunner().invoke(
        main,
        ["collection", "--out", str(out), "--models", "tiny_1k", "--weights-dir", str(weights)],
    )
    assert result.exit_code == 1
    assert "missing weights" in result.output and "convnext_tiny_1k_224_ema.pth" in result.output


@pytest.mark.skipif(not TF, reason="SavedModel export runs on the TensorFlow pass")
def test_build_a_collection(tiny_reference, tmp_path, monkeypatch):
    """A model built from a local checkpoint (classifier + _fe SavedModels, .keras, card,
    manifest) between a corrupt checkpoint, which fails without stopping the others or leaving a
    directory, and a model without weights, reported missing; a second run skips what is built.
    (One model is built: each build is half a minute of SavedModel export on CI's CPU, and the
    cards of all 47 checkpoints are checked above.)"""
    import tensorflow as tf

    torch_model, checkpoint = tiny_reference
    weights = tmp_path / "weights"
    weights.mkdir()
    built = ["convnext_tiny_1k_224"]
    for name in built:
        shutil.copy(checkpoint, weights / registry.CHECKPOINTS[name].filename)
    corrupt = registry.CHECKPOINTS["convnext_small_1k_224"].filename
    (weights / corrupt).write_bytes(b"PK\x03\x04 not a checkpoint")
    names = ["convnext_small_1k_224", built[0], "convnext_base_1k_224"]
    out = tmp_path / "collection"
    lines = []
    report = collection.build_collection(out, names, weights_dir=weights, log=lines.append)

    assert report.built == built and report.skipped == []
    assert list(report.failed) == ["convnext_small_1k_224"]
    assert list(report.missing) == ["convnext_base_1k_224"]
    assert "convnext_base_1k_224_ema.pth" in report.missing["convnext_base_1k_224"]
    assert [line.split(":")[0] for line in lines] == [
        f"[{i}/3] {name}" for i, name in enumerate(names, 1)
    ]
    assert sorted(p.name for p in out.iterdir()) == sorted([*built, "index.json", "index.md"])

    images = np.random.default_rng(6).standard_normal((2, 224, 224, 3)).astype(np.float32)
    expected = ref.hf_outputs(torch_model, images)
    for name in built:
        model_dir = out / name
        assert sorted(p.name for p in model_dir.iterdir()) == sorted(
            ["README.md", "manifest.json", name, f"{name}_fe", f"{name}.keras"]
        )
        manifest = json.loads((model_dir / "manifest.json").read_text())
        assert manifest["model"] == name
        assert manifest["weights"]["file"] == registry.CHECKPOINTS[name].filename
        assert len(manifest["weights"]["sha256"]) == 64
        for artifact in manifest["artifacts"].values():
            assert artifact["max_abs_diff"] <= 1e-4 and artifact["checks"]
        classifier = tf.saved_model.load(str(model_dir / name))
        logits = classifier.signatures["serving_default"](images=images)["logits"]
        assert np.max(np.abs(logits.numpy() - expected["logits"])) <= 1e-4
        features = tf.saved_model.load(str(model_dir / f"{name}_fe"))(images)
        assert np.max(np.abs(features.numpy() - expected["pooled"])) <= 1e-4
        restored = keras.saving.load_model(str(model_dir / f"{name}.keras"))
        assert np.max(np.abs(restored.predict_on_batch(images) - expected["logits"])) <= 1e-4
        card = (model_dir / "README.md").read_text()
        assert card.startswith(cards.model_card(name).split("\n## Verification")[0][:400])
        assert "## Verification" in card and "serving_default signature" in card
        assert manifest["weights"]["description"] in card

    index = (out / "index.md").read_text()
    for name in built:
        assert f"| [{name}]({name}/README.md) |" in index
        assert f"[`{name}_fe`]({name}/{name}_fe)" in index
    assert "`convnext_small_1k_224`: " in index and "`convnext_base_1k_224`: " in index
    assert json.loads((out / "index.json").read_text())["models"][0]["model"] == built[0]

    # A second run (through the CLI) skips the built model, keeping it byte-for-byte; the
    # pattern also matches the two tiny 21k models, whose checkpoints are not there (exit 1).
    before = (out / built[0] / "manifest.json").read_bytes()
    result = CliRunner().invoke(
        main,
        ["collection", "--out", str(out), "--models", "convnext_tiny_*1k_224"]
        + ["--weights-dir", str(weights)],
    )
    assert result.exit_code == 1, result.output
    assert result.output.count("already built and verified, skipped") == 1
    assert "convnext_tiny_21k_224: missing weights: no convnext_tiny_22k_224.pth" in result.output
    assert "convnext_tiny_21k_1k_224: missing weights" in result.output
    assert (out / built[0] / "manifest.json").read_bytes() == before


@pytest.mark.skipif(not TF, reason="SavedModel export runs on the TensorFlow pass")
def test_build_a_v2_collection_with_an_encoder(tmp_path):
    """ConvNeXt V2-atto's FCMAE encoder from a local file in its official format: the
    feature-extractor SavedModel and .keras file, verified, equal to transformers'
    ConvNextV2's backbone; the card and index carry the V2 licence.  (A classifier's
    directory is built by the code test_build_a_collection runs for ConvNeXt-T; the V2
    classifier's exports are checked in test_export.)"""
    import tensorflow as tf

    spec = registry.VARIANTS["convnextv2_atto"]
    torch_model = ref.hf_v2_model(spec.depths, spec.dims, 1000, seed=9)
    weights = tmp_path / "weights"
    weights.mkdir()
    name = "convnextv2_atto_fcmae"
    ref.save_fcmae(torch_model, weights / registry.CHECKPOINTS[name].filename)
    out = tmp_path / "collection"
    report = collection.build_collection(out, "convnextv2_atto_*", weights_dir=weights, log=None)
    assert report.built == [name] and list(report.missing) == ["convnextv2_atto_1k_224"]
    assert "convnextv2_atto_1k_224_ema.pt" in report.missing["convnextv2_atto_1k_224"]

    encoder = out / name
    assert sorted(p.name for p in encoder.iterdir()) == sorted(
        ["README.md", "manifest.json", f"{name}_fe", f"{name}_fe.keras"]
    )
    manifest = json.loads((encoder / "manifest.json").read_text())
    assert set(manifest["artifacts"]) == {"feature_extractor_savedmodel", "feature_extractor_keras"}
    assert all(a["max_abs_diff"] <= 1e-4 for a in manifest["artifacts"].values())
    # The encoder's features: the backbone's, through a LayerNorm at scale 1, shift 0.
    images = np.random.default_rng(6).standard_normal((2, 224, 224, 3)).astype(np.float32)
    stage4 = ref.hf_outputs(torch_model, images)["stage4"].mean(axis=(1, 2), dtype=np.float64)
    want = (stage4 - stage4.mean(-1, keepdims=True)) / np.sqrt(stage4.var(-1, keepdims=True) + 1e-6)
    got = tf.saved_model.load(str(encoder / f"{name}_fe"))(images).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)
    restored = keras.saving.load_model(str(encoder / f"{name}_fe.keras"))
    np.testing.assert_allclose(restored.predict_on_batch(images), want, atol=1e-4)
    assert "CC-BY-NC-4.0 (non-commercial use only)" in (encoder / "README.md").read_text()
    index = (out / "index.md").read_text()
    assert f"| CC-BY-NC-4.0 | - (encoder) | [`{name}_fe`]({name}/{name}_fe) |" in index
    assert "`convnextv2_atto_1k_224`: " in index
