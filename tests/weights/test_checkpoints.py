"""Reading checkpoints safely, layout detection, and errors that say what is wrong."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import torch
import torch_reference as ref

import convnext_keras as ck
from convnext_keras import registry
from convnext_keras.weights import layouts

ATTO = registry.VARIANTS["atto"]


@pytest.fixture(scope="module")
def atto_torch():
    return ref.hf_model(ATTO.depths, ATTO.dims, 10, seed=5)


def _same_as_official(state, official):
    converted = ck.convert_state_dict(state, ATTO)
    expected = ck.convert_state_dict(official, ATTO)
    assert converted.keys() == expected.keys()
    for layer in expected:
        for a, b in zip(converted[layer], expected[layer], strict=True):
            np.testing.assert_array_equal(a, b)


def test_layouts_are_detected(atto_torch, tmp_path):
    official = ck.read_state_dict(ref.save_official(atto_torch, tmp_path / "o.pth"))
    hf = ck.read_state_dict(ref.save_hf(atto_torch, tmp_path / "hf"))
    hf_bin = ck.read_state_dict(ref.save_hf_bin(atto_torch, tmp_path / "pytorch_model.bin"))
    timm = ck.read_state_dict(ref.save_timm(atto_torch, tmp_path / "t.safetensors", True))
    assert layouts.detect_layout(official) == "official"
    assert layouts.detect_layout(hf) == "huggingface"
    assert layouts.detect_layout(hf_bin) == "huggingface"
    assert layouts.detect_layout(timm) == "timm"
    for state in (hf, hf_bin, timm):
        _same_as_official(state, official)


def test_containers_and_prefixes(atto_torch, tmp_path):
    state = ref.official_state_dict(atto_torch)
    official = {k: v.numpy() for k, v in state.items()}
    variants = {
        "plain.pth": state,
        "state_dict.pth": {"state_dict": state, "epoch": 3},
        "ddp.pth": {"model": {f"module.{k}": v for k, v in state.items()}},
        # Full training checkpoints of the original's main.py carry an argparse.Namespace.
        "training.pth": {
            "model": state,
            "epoch": 299,
            "args": argparse.Namespace(model="convnext_atto", lr=4e-3),
        },
    }
    for name, obj in variants.items():
        torch.save(obj, tmp_path / name)
        _same_as_official(ck.read_state_dict(tmp_path / name), official)
    # the legacy (pre-1.6, non-zip) torch.save format and half-precision tensors
    half = {k: v.half() for k, v in state.items()}
    torch.save({"model": half}, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    read = ck.read_state_dict(tmp_path / "legacy.pth")
    assert all(v.dtype == np.float32 for v in read.values())
    np.testing.assert_allclose(read["head.weight"], official["head.weight"], atol=1e-2)


class _Exploit:
    """Unpickling this object would run a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"x": torch.zeros(1)}, "payload": _Exploit(marker)}, path)
    with pytest.raises(ck.UnsafeCheckpointError, match="Refused to load") as info:
        ck.read_state_dict(path)
    assert not marker.exists()
    assert "GLOBAL posix.system" in str(info.value) and "weights_only" not in str(info.value)
    # load_model goes through the same reader
    with pytest.raises(ck.UnsafeCheckpointError):
        ck.load_model("convnext_atto", weights=path)
    assert not marker.exists()


def test_safetensors_are_read_without_pytorch(atto_torch, tmp_path):
    path = ref.save_timm(atto_torch, tmp_path / "model.safetensors")
    code = (
        "import sys\n"
        "class NoTorch:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'torch':\n"
        "            raise ImportError('PyTorch is blocked in this test')\n"
        "sys.meta_path.insert(0, NoTorch())\n"
        "from convnext_keras.weights.convert import convert_state_dict\n"
        "from convnext_keras.weights.read import read_state_dict\n"
        f"w = convert_state_dict(read_state_dict({str(path)!r}), 'atto')\n"
        "print(len(w), 'torch' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "KERAS_BACKEND": "jax"},
        check=True,
    )
    assert out.stdout.split()[-2:] == [str(2 + 2 * 3 + 12 * 5 + 1 + 1), "False"]


def test_bfloat16_safetensors_read_whatever_was_imported_first(atto_torch, tmp_path):
    """A valid bfloat16 ``.safetensors`` (``model.to(torch.bfloat16)`` then saved): read in a
    fresh process that imported nothing else first ("data type 'bfloat16' not understood"
    unless Keras had imported ml_dtypes), each value the float32 of its bfloat16."""
    import torch
    from safetensors.torch import save_file

    state = {k: v.to(torch.bfloat16) for k, v in atto_torch.state_dict().items()}
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "bf16.safetensors"))
    code = (
        "import sys, numpy as np\n"
        "from convnext_keras.weights.read import read_state_dict\n"
        f"s = read_state_dict({str(tmp_path / 'bf16.safetensors')!r})\n"
        "np.savez(sys.argv[1], **s)\n"
        "print('keras' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "read.npz")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.split()[-1] == "False"
    read = np.load(tmp_path / "read.npz")
    for key, value in state.items():
        assert read[key].dtype == np.float32
        np.testing.assert_array_equal(read[key], value.float().numpy(), err_msg=key)


def _follow_hint(message: str, file):
    """Load the model the error's hint names, as it names it (``load_model('NAME',
    weights=FILE, features='F')``)."""
    import re

    call = re.search(r"load_model\('([^']+)', weights=FILE, features='(\w+)'\)", message)
    assert call, message
    return ck.load_model(call.group(1), weights=file, features=call.group(2))


@pytest.mark.equality
@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_transformers_backbone_files_load_as_pyramids_with_their_stage_norms(tmp_path, v2):
    """``ConvNextBackbone`` / ``ConvNextV2Backbone.save_pretrained`` files (stage-output norms
    ``hidden_states_norms.stageN`` for its ``out_features``; loaded under no name before, the
    hint naming a model that failed the same way): pyramid outputs equal transformers'
    ``feature_maps`` within 1e-4, with the norms where the file has them.  Every hint of a
    refusal is followed here, and loads."""
    spec = registry.VARIANTS["convnextv2_atto" if v2 else "atto"]
    features = ["stage1", "stage2", "stage3", "stage4"] if v2 else ["stage2", "stage4"]
    torch_model = ref.hf_backbone(spec.depths, spec.dims, features, v2=v2, seed=3)
    torch_model.save_pretrained(tmp_path / "backbone")
    file = tmp_path / "backbone" / "model.safetensors"
    x = np.random.default_rng(0).standard_normal((1, 64, 96, 3)).astype("float32")
    with torch.no_grad():
        maps = torch_model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).feature_maps
    model = ck.load_model(spec.arch_name, weights=file, features="pyramid")
    normed = sorted(layer.name for layer in model.layers if layer.name.endswith("output_norm"))
    assert normed == [f"stage{int(f[-1]) - 1}_output_norm" for f in features]
    got = model.predict_on_batch(x)
    for name, expected in zip(features, maps, strict=True):
        diff = np.max(np.abs(np.asarray(got[name]) - expected.numpy().transpose(0, 2, 3, 1)))
        assert diff <= 1e-4, (name, diff)

    other = "convnextv2_pico" if v2 else "convnext_femto"  # another size: the hint's call
    for name, feature in ((other, None), (spec.arch_name, None), (spec.arch_name, "pooled")):
        with pytest.raises(ck.CheckpointError, match="feature pyramid") as info:
            ck.load_model(name, weights=file, features=feature)
        followed = _follow_hint(str(info.value), file)
        np.testing.assert_array_equal(followed.predict_on_batch(x)["stage4"], got["stage4"])


def test_not_a_checkpoint(tmp_path):
    html = tmp_path / "page.pth"
    html.write_text("<!DOCTYPE html><html>404</html>")
    with pytest.raises(ck.CheckpointError, match="HTML"):
        ck.read_state_dict(html)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(ck.CheckpointError, match="empty"):
        ck.read_state_dict(empty)
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        ck.read_state_dict(tmp_path / "nowhere.pth")
    torch.save({"optimizer": {"lr": 0.1}}, tmp_path / "opt.pth")
    with pytest.raises(ck.CheckpointError, match="no state dict"):
        ck.read_state_dict(tmp_path / "opt.pth")
    torch.save({"layer.weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(ck.CheckpointError, match="known layout"):
        ck.convert_state_dict(ck.read_state_dict(tmp_path / "other.pth"), "atto")


def test_every_tensor_is_accounted_for(atto_torch):
    official = {k: v.numpy() for k, v in ref.official_state_dict(atto_torch).items()}

    missing = dict(official)
    del missing["stages.2.3.pwconv1.bias"]
    with pytest.raises(ck.CheckpointError, match=r"missing: stages\.2\.3\.pwconv1\.bias"):
        ck.convert_state_dict(missing, "atto")

    unexpected = {**official, "stages.2.3.extra": np.zeros(3, "float32")}
    with pytest.raises(ck.CheckpointError, match=r"unexpected: stages\.2\.3\.extra"):
        ck.convert_state_dict(unexpected, "atto")

    wrong = {**official, "stages.1.0.dwconv.weight": np.zeros((80, 1, 5, 5), "float32")}
    with pytest.raises(
        ck.CheckpointError,
        match=r"stages\.1\.0\.dwconv\.weight: checkpoint \(80, 1, 5, 5\), model expects "
        r"\(80, 1, 7, 7\)",
    ):
        ck.convert_state_dict(wrong, "atto")


def test_wrong_variant_names_the_right_one(atto_torch):
    official = {k: v.numpy() for k, v in ref.official_state_dict(atto_torch).items()}
    with pytest.raises(ck.CheckpointError, match="ConvNeXt-atto.*use convnext_atto"):
        ck.convert_state_dict(official, "femto")


def test_head_size_mismatch_suggests_the_right_model(tmp_path):
    tiny = registry.VARIANTS["tiny"]
    torch_model = ref.hf_model(tiny.depths, tiny.dims, registry.NUM_CLASSES_21K, seed=2)
    path = ref.save_official(torch_model, tmp_path / "convnext_tiny_22k_224.pth")
    with pytest.raises(ck.CheckpointError, match="21841-class head.*convnext_tiny_21k_224"):
        ck.load_model("convnext_tiny_1k_224", weights=path)
    # the suggested name loads it, and the _fe twin / a new head for fine-tuning need no head
    assert ck.load_model("convnext_tiny_21k_224", weights=path).output.shape[-1] == 21841
    assert ck.load_model("convnext_tiny_21k_224_fe", weights=path).output.shape[-1] == 768
    model = ck.load_model("convnext_tiny_1k_224", weights=path, num_classes=7)
    assert model.output.shape[-1] == 7


def test_headless_checkpoint(tmp_path, atto_torch):
    state = {k: v for k, v in ref.official_state_dict(atto_torch).items() if "head" not in k}
    torch.save(state, tmp_path / "backbone.pth")
    with pytest.raises(ck.CheckpointError, match="no classification head"):
        ck.load_model("convnext_atto", weights=tmp_path / "backbone.pth")
    fe = ck.load_model("convnext_atto_fe", weights=tmp_path / "backbone.pth")
    assert fe.output.shape[-1] == 320


def test_unknown_names_are_explained():
    with pytest.raises(ck.UnknownModelError, match="Did you mean convnext_tiny_1k_224"):
        ck.load_model("convnext_tiny_1k_244", weights=None)
    with pytest.raises(ValueError, match="without an official checkpoint"):
        ck.load_model("convnext_atto")
    with pytest.raises(ValueError, match="features must be one of"):
        ck.load_model("convnext_atto", weights=None, features="boxes")


def test_names_accept_both_spellings():
    assert registry.resolve("convnext_base_22k_1k_384").checkpoint.name == (
        "convnext_base_21k_1k_384"
    )
    assert registry.resolve("ConvNeXt-Base-21k-224_fe").head == "pooled"
    assert registry.resolve("convnext_xlarge_21k_1k_224").checkpoint.filename == (
        "convnext_xlarge_22k_1k_224_ema.pth"
    )


def test_convert_to_keras_file(tmp_path, tiny_reference):
    import keras

    _, path = tiny_reference
    out = ck.convert_checkpoint(path, "convnext_tiny_1k_224", tmp_path / "tiny.keras")
    loaded = keras.saving.load_model(out)
    expected = ck.load_model("convnext_tiny_1k_224", weights=path)
    x = np.random.default_rng(0).standard_normal((1, 64, 64, 3)).astype("float32")
    np.testing.assert_allclose(loaded.predict_on_batch(x), expected.predict_on_batch(x), atol=1e-5)
    with pytest.raises(FileExistsError, match="overwrite"):
        ck.convert_checkpoint(path, "convnext_tiny_1k_224", out)
    with pytest.raises(ValueError, match=r"\.keras"):
        ck.convert_checkpoint(path, "convnext_tiny_1k_224", tmp_path / "tiny.h5")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.keras"]


# ---------------------------------------------------------------------------------------------
# ConvNeXt V2: its layouts, the FCMAE sparse encoder, and V1/V2 mix-ups

ATTO_V2 = registry.VARIANTS["convnextv2_atto"]


@pytest.fixture(scope="module")
def atto_v2_torch():
    return ref.hf_v2_model(ATTO_V2.depths, ATTO_V2.dims, 1000, seed=6)


def _assert_converted_equal(converted, expected, skip=()):
    assert converted.keys() == expected.keys()
    for layer in expected:
        if layer in skip:
            continue
        for a, b in zip(converted[layer], expected[layer], strict=True):
            np.testing.assert_array_equal(a, b, err_msg=layer)


def test_v2_layouts_are_detected(atto_v2_torch, tmp_path):
    """Official (grn.gamma (1,1,1,C)), timm (mlp.grn.weight (C,), 1x1-conv MLP for atto),
    Hugging Face (convnextv2.*, grn.weight) and FCMAE files convert to the same weights."""
    m = atto_v2_torch
    states = {
        "official": ck.read_state_dict(ref.save_official(m, tmp_path / "o.pt")),
        "huggingface": ck.read_state_dict(ref.save_hf(m, tmp_path / "hf")),
        "timm": ck.read_state_dict(ref.save_timm(m, tmp_path / "t.safetensors", conv_mlp=True)),
        "fcmae": ck.read_state_dict(ref.save_fcmae(m, tmp_path / "f.pt")),
    }
    official = ck.convert_state_dict(states["official"], ATTO_V2)
    assert official["stage1_block1_grn"][0].shape == (320,)
    for layout, state in states.items():
        assert layouts.detect_layout(state) == layout
        if layout == "fcmae":
            continue
        _assert_converted_equal(ck.convert_state_dict(state, "convnextv2_atto"), official)


def _remap_as_the_original_does(kernel: torch.Tensor) -> torch.Tensor:
    """ConvNeXt-V2 utils.py ``remap_checkpoint_keys``' arithmetic, restated in torch: a
    (k*k, in, out) kernel -> permute to (out, in, k*k), reshape to (out, in, k, k), swap the
    two spatial axes; a (k*k, C) depthwise kernel likewise with in = 1."""
    if kernel.ndim == 2:
        kernel = kernel[:, None, :]
    kv, cin, cout = kernel.shape
    side = int(round(kv**0.5))
    return kernel.permute(2, 1, 0).reshape(cout, cin, side, side).transpose(3, 2)


def test_fcmae_sparse_layout_recovers_the_dense_network(atto_v2_torch, tmp_path, caplog):
    """The FCMAE file is built from a known dense network, kernel offset by kernel offset
    (MinkowskiEngine's order); the conversion recovers every dense tensor exactly, transposes
    included, and the decoder's tensors are dropped with a debug message naming them."""
    import logging

    m = atto_v2_torch
    dense = ref.official_state_dict(m)
    official = ck.convert_state_dict({k: v.numpy() for k, v in dense.items()}, ATTO_V2)
    sparse = ref.fcmae_state_dict(m)
    assert sparse["encoder.stages.1.0.dwconv.kernel"].shape == (49, 80)
    assert sparse["encoder.downsample_layers.2.1.kernel"].shape == (4, 80, 160)
    assert sparse["encoder.stages.3.1.grn.gamma"].shape == (1, 4 * 320)
    for key in ("stages.1.0.dwconv.weight", "downsample_layers.2.1.weight"):
        kernel = sparse["encoder." + key.removesuffix("weight") + "kernel"]
        assert torch.equal(_remap_as_the_original_does(kernel), dense[key]), key

    numpy_sparse = {k: v.numpy() for k, v in sparse.items()}
    with caplog.at_level(logging.DEBUG, logger="convnext_keras.weights.layouts.fcmae"):
        converted = ck.convert_state_dict(numpy_sparse, ATTO_V2)
    _assert_converted_equal(
        {k: v for k, v in converted.items() if k != "head_norm"},
        {k: v for k, v in official.items() if k not in ("head_norm", "head_fc")},
    )
    # no final norm in an encoder: it starts at scale 1, shift 0 (the original fine-tuning's)
    np.testing.assert_array_equal(converted["head_norm"][0], np.ones(320, "float32"))
    np.testing.assert_array_equal(converted["head_norm"][1], np.zeros(320, "float32"))
    dropped = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert len(dropped) == 1 and "mask_token" in dropped[0] and "decoder.0.grn.gamma" in dropped[0]
    assert "pred.weight" in dropped[0] and "proj.bias" in dropped[0]

    # a kernel with its two spatial axes swapped is not recovered (the test can fail)
    swapped = dict(numpy_sparse)
    k = swapped["encoder.stages.0.0.dwconv.kernel"].reshape(7, 7, 40)
    swapped["encoder.stages.0.0.dwconv.kernel"] = k.transpose(1, 0, 2).reshape(49, 40)
    wrong = ck.convert_state_dict(swapped, ATTO_V2)["stage0_block0_dwconv"][0]
    assert not np.array_equal(wrong, official["stage0_block0_dwconv"][0])

    # encoder tensors are still all accounted for
    extra = {**numpy_sparse, "encoder.stages.0.0.extra": np.zeros(3, "float32")}
    with pytest.raises(ck.CheckpointError, match=r"unexpected: stages\.0\.0\.extra"):
        ck.convert_state_dict(extra, ATTO_V2)
    bad = {**numpy_sparse, "encoder.stages.0.0.dwconv.kernel": np.zeros((48, 40), "float32")}
    with pytest.raises(ck.CheckpointError, match="not a MinkowskiEngine 2-D kernel"):
        ck.convert_state_dict(bad, ATTO_V2)


def test_fcmae_encoder_loads_as_pyramid_features_or_new_head(atto_v2_torch, tmp_path):
    path = ref.save_fcmae(atto_v2_torch, tmp_path / "convnextv2_atto_1k_224_fcmae.pt")
    pyramid = ck.load_model("convnextv2_atto_fcmae", weights=path)
    assert sorted(pyramid.output) == ["stage1", "stage2", "stage3", "stage4"]
    assert ck.load_model("convnextv2_atto_fcmae_fe", weights=path).output.shape[-1] == 320
    model = ck.load_model(
        "convnextv2_atto_fcmae", weights=path, num_classes=10, head_init_scale=0.5
    )
    assert model.output.shape[-1] == 10
    # the new head is drawn as build_model draws it (std 0.02), times head_init_scale
    kernel, bias = model.get_layer("head_fc").get_weights()
    assert abs(kernel.std() - 0.5 * 0.02) < 0.001 and not bias.any()
    dwconv = model.get_layer("stage0_block0_dwconv")
    assert isinstance(dwconv.depthwise_initializer, keras.initializers.TruncatedNormal)
    with pytest.raises(ValueError, match="encoder without classification head.*num_classes"):
        ck.load_model("convnextv2_atto_fcmae", weights=path, features="classifier")
    # its _fe model from the official V2 file of the fine-tuned model needs no special case
    assert ck.load_model("convnextv2_atto_1k_224", weights=None).output.shape[-1] == 1000


def test_v1_and_v2_checkpoints_name_the_right_model(atto_v2_torch, tmp_path, tiny_reference):
    v2_file = ref.save_official(atto_v2_torch, tmp_path / "convnextv2_atto_1k_224_ema.pt")
    with pytest.raises(
        ck.CheckpointError,
        match=r"not a ConvNeXt-atto .*it is a ConvNeXt V2-atto \(GRN blocks.*1000 classes\): "
        r"use convnextv2_atto_1k_224",
    ):
        ck.load_model("convnext_atto", weights=v2_file)
    _, v1_file = tiny_reference
    with pytest.raises(
        ck.CheckpointError,
        match=r"not a ConvNeXt V2-tiny .*it is a ConvNeXt-tiny \(layer-scale blocks.*: use "
        r"convnext_tiny_1k_224 or ",
    ):
        ck.load_model("convnextv2_tiny_1k_224", weights=v1_file)
    fcmae = {k: v.numpy() for k, v in ref.fcmae_state_dict(atto_v2_torch).items()}
    with pytest.raises(ck.CheckpointError, match="no head\\): use convnextv2_atto_fcmae"):
        ck.convert_state_dict(fcmae, "femto")


def test_a_zip_bomb_is_refused_before_pytorch_reads_it(tmp_path, monkeypatch):
    import zipfile

    path = tmp_path / "bomb.pth"  # 64 MiB of zeros deflate to 64 KiB
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
        archive.writestr("archive/data/0", bytes(64 << 20))
    assert path.stat().st_size < 1 << 20

    def never(*args, **kwargs):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", never)
    with pytest.raises(ck.CheckpointError, match="zip bomb") as info:
        ck.read_state_dict(path)
    assert "67,108,8" in str(info.value)  # the declared size, before anything was inflated


def test_non_finite_weights_are_refused_at_conversion(atto_torch):
    state = {k: v.numpy().copy() for k, v in ref.official_state_dict(atto_torch).items()}
    state["stages.3.1.pwconv2.weight"][0, :5] = np.nan
    state["head.bias"][3] = np.inf
    with pytest.raises(ck.CheckpointError, match="NaN or infinite") as info:
        ck.convert_state_dict(state, ATTO)
    assert "stages.3.1.pwconv2.weight (5 of" in str(info.value)
    assert "head.bias (1 of 10 values)" in str(info.value)
