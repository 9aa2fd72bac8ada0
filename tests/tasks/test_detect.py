"""Detection of image files (``ck.detect_files``): the test pipeline and the mask pasting against
the plain-PyTorch reference of mmdetection 2.x (``tests/references/mmdet_reference.py``), the
detections in the photo's pixels one to one with the reference's on a real photo, the overlay,
the COCO results JSON (RLE masks, pycocotools), a bad file in a batch.

The network itself is proved in ``tests/nets/test_detection.py``; here it runs with the
registry's procedure scaled down (short side 256, 100 proposals) on the same code.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import mmdet_reference as mref
import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as photos

import convnext_keras as ck
from convnext_keras import registry
from convnext_keras.data import coco
from convnext_keras.tasks import detect

MASK = "mask_rcnn_convnext_tiny_coco"
SMALL = dataclasses.replace(
    registry.DetectionEval(), image_scale=(448, 256), rpn_max=100, max_detections=30
)


def _photo():
    return np.ascontiguousarray(photos.coffee()[..., :3])  # 400 x 600


def test_the_test_input_is_the_references():
    photo = _photo()
    image, size, scale = detect.test_input(photo, registry.DetectionEval())
    img, meta = mref.preprocess(photo)
    expected = img[0].permute(1, 2, 0).numpy()
    assert image.shape == expected.shape == (800, 1216, 3) and size == meta["img_shape"]
    np.testing.assert_allclose(scale, meta["scale_factor"][[1, 0]], rtol=1e-6)
    # float32 bilinear rounding: a pixel may land one level apart at an exact .5
    close = np.abs(image - expected) <= 1e-5
    assert close.mean() > 0.999 and np.abs(image - expected).max() <= 1.01 / 57.12
    with pytest.raises(ValueError, match="smaller than the image"):
        detect.test_input(photo, registry.DetectionEval(), pad_to=(32, 32))


def test_paste_masks_is_mmdetections():
    rng = np.random.default_rng(0)
    masks = rng.uniform(0, 1, (7, 28, 28)).astype(np.float32)
    boxes = np.array(
        [
            [10.3, 20.7, 300.2, 210.9],  # large: the mask upsampled
            [50.0, 60.0, 55.5, 62.25],  # smaller than the mask
            [-20.0, -5.0, 40.0, 30.0],  # outside at the top left
            [580.5, 380.0, 640.0, 420.0],  # outside at the bottom right
            [0.0, 0.0, 600.0, 400.0],  # the whole photo
            [100.0, 100.0, 100.0, 150.0],  # zero width
            [200.2, 150.6, 201.1, 151.3],  # under a pixel
        ],
        np.float32,
    )
    got = detect.paste_masks(masks, boxes, 400, 600, threshold=None)
    expected = mref.do_paste_mask(
        torch.from_numpy(masks)[:, None], torch.from_numpy(boxes), 400, 600
    )
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-6)
    binary = detect.paste_masks(masks, boxes, 400, 600)
    assert binary.dtype == bool
    decided = np.abs(expected.numpy() - 0.5) > 1e-5
    np.testing.assert_array_equal(binary[decided], (expected.numpy() >= 0.5)[decided])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("detect")
    model = mref.build(registry.VARIANTS["tiny"], False, seed=0)
    path = mref.save_mmdet(model, folder / "mask.pth")
    photo_path = folder / "coffee.png"
    Image.fromarray(_photo()).save(photo_path)
    return model, path, photo_path


def test_detect_files_matches_the_reference(reference, tmp_path):
    torch_model, weights, photo_path = reference
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    out = tmp_path / "out"
    results = ck.detect_files(
        MASK, [photo_path, broken], weights=weights, out_dir=out, settings=SMALL
    )
    assert [r.ok for r in results] == [True, False] and "broken.jpg" in results[1].error
    got = results[0]
    photo = _photo()

    def library_resize(p, h, w):  # the same resized pixels on both sides (proved above)
        image, size, _ = detect.test_input(p, dataclasses.replace(SMALL, size_divisor=1))
        assert size == (h, w)
        from convnext_keras.preprocess import normalize

        zero = normalize(np.zeros((1, 1, 3), np.uint8))[0, 0]
        one = normalize(np.ones((1, 1, 3), np.uint8))[0, 0] - zero
        return np.rint((image - zero) / one).astype(np.uint8)

    img, meta = mref.preprocess(photo, SMALL.image_scale, resize=library_resize)
    rpn = dict(nms_pre=SMALL.rpn_pre_nms, max_per_img=SMALL.rpn_max, iou_threshold=SMALL.rpn_iou)
    rpn["min_bbox_size"] = SMALL.rpn_min_size
    rcnn = dict(score_thr=SMALL.score_threshold, iou_threshold=SMALL.iou)
    rcnn.update(max_per_img=SMALL.max_detections, mask_thr_binary=SMALL.mask_threshold)
    expected = mref.simple_test(torch_model, img, meta, rpn_cfg=rpn, rcnn_cfg=rcnn)
    n = len(expected["scores"])
    assert n > 5 and abs(len(got.scores) - n) <= 1
    k = min(n, len(got.scores)) - 1  # the last may be a near tie at the limit
    np.testing.assert_allclose(got.boxes[:k], expected["boxes"][:k].numpy(), atol=1e-3, rtol=1e-5)
    np.testing.assert_allclose(got.scores[:k], expected["scores"][:k].numpy(), atol=1e-4)
    np.testing.assert_array_equal(got.labels[:k], expected["labels"][:k].numpy())
    assert got.masks.shape == (len(got.scores), 400, 600) and got.masks[:k].any()
    # a pixel whose probability lies within float32 noise of the threshold may flip
    assert np.mean(got.masks[:k] != expected["masks"][:k].numpy()) < 1e-4
    assert got.names[0] == coco.classes()[got.labels[0]]

    entries = json.loads((out / "coffee_detections.json").read_text())
    assert len(entries) == len(got.scores) and set(got.files) == {"overlay", "json"}
    from pycocotools import mask as mask_utils

    first = entries[0]
    assert first["category_id"] == coco.category_ids()[got.labels[0]] and first["image_id"] == 0
    x0, y0, x1, y1 = got.boxes[0]
    np.testing.assert_allclose(first["bbox"], [x0, y0, x1 - x0, y1 - y0], rtol=1e-6)
    np.testing.assert_array_equal(mask_utils.decode(first["segmentation"]), got.masks[0])
    overlay = Image.open(out / "coffee_overlay.png")
    # the photo and the legend panel at its right (taller than the photo for many detections)
    assert overlay.size[0] > 600 and overlay.size[1] >= 400
    assert overlay.size[1] == 400  # the legend is cut to the photo's height ("... N more")
    listed = json.loads(json.dumps(got.to_dict()))  # JSON-ready, naming the files written
    assert listed["overlay"] == str(out / "coffee_overlay.png") and listed["json"] == str(
        out / "coffee_detections.json"
    )


def test_the_detect_command(reference, tmp_path, monkeypatch):
    """``convnext detect`` calls ``detect_files`` with the row's settings (scaled down here by
    changing the row) and prints the detections; a bad file costs exit status 1."""
    from click.testing import CliRunner

    from convnext_keras.cli import main

    _, weights, photo_path = reference
    row = registry.CHECKPOINTS[MASK]
    small_row = dataclasses.replace(row, detection=dataclasses.replace(row.detection, eval=SMALL))
    monkeypatch.setitem(registry.CHECKPOINTS, MASK, small_row)
    out = tmp_path / "out"
    args = ["detect", str(photo_path), "--model", MASK, "--weights", str(weights)]
    result = CliRunner().invoke(main, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "coffee.png  (600x400, " in result.output and "overlay: " in result.output
    assert (out / "coffee_detections.json").exists()
    # --score (and --json, and a missing file): the model built with a higher threshold keeps
    # exactly the detections the default run kept above it
    every = json.loads((out / "coffee_detections.json").read_text())  # COCO entries, best first
    median = every[len(every) // 2]["score"]
    missing = tmp_path / "missing.jpg"
    result = CliRunner().invoke(main, [*args, str(missing), "--json", "--score", repr(median)])
    assert result.exit_code == 1
    listed = json.loads(result.stdout)
    assert "error" in listed[1] and (listed[0]["width"], listed[0]["height"]) == (600, 400)
    kept = listed[0]["detections"]
    above = [e for e in every if e["score"] > median]
    assert 0 < len(kept) == len(above) < len(every)
    ids = coco.category_ids()
    assert [ids[d["index"]] for d in kept] == [e["category_id"] for e in above]
    np.testing.assert_allclose(
        [[x0, y0, x1 - x0, y1 - y0] for x0, y0, x1, y1 in (d["box"] for d in kept)],
        [e["bbox"] for e in above],
        atol=1e-3,
    )
    bad = CliRunner().invoke(main, [*args, "--score", "1.5"])
    assert bad.exit_code == 2 and "--score" in bad.output
    for bad_args, message in [
        (["--model", "convnext_tiny_1k_224"], "not an object-detection model"),
        (["--model", MASK + "_fe"], "no '_fe' feature-extractor twin"),
    ]:
        bad = CliRunner().invoke(main, ["detect", str(photo_path), "--weights", "none", *bad_args])
        assert bad.exit_code == 2 and message in bad.output, bad.output


def test_eval_det_scores_the_references_detections_as_ground_truth(reference, tmp_path):
    """``eval-det`` end to end: a COCO folder whose ground truth is the reference's detections
    of the photo (boxes, classes, pasted masks) scores the library's detections near 100 box
    and mask AP (one to one, as proved above; COCO's AP is 100 only for a perfect match), and
    lists an unreadable image; the command prints and writes the report."""
    from click.testing import CliRunner
    from pycocotools import mask as mask_utils

    from convnext_keras.cli import main
    from convnext_keras.tasks.detect_eval import evaluate_detection

    torch_model, weights, photo_path = reference
    photo = _photo()
    img, meta = mref.preprocess(photo, SMALL.image_scale)
    rpn = dict(nms_pre=SMALL.rpn_pre_nms, max_per_img=SMALL.rpn_max, iou_threshold=SMALL.rpn_iou)
    rpn["min_bbox_size"] = SMALL.rpn_min_size
    rcnn = dict(score_thr=SMALL.score_threshold, iou_threshold=SMALL.iou)
    rcnn.update(max_per_img=SMALL.max_detections, mask_thr_binary=SMALL.mask_threshold)
    expected = mref.simple_test(torch_model, img, meta, rpn_cfg=rpn, rcnn_cfg=rcnn)
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    (root / "val2017").mkdir()
    Image.fromarray(photo).save(root / "val2017" / "coffee.png")
    (root / "val2017" / "broken.jpg").write_bytes(b"not an image")
    annotations = []
    for box, label, mask in zip(expected["boxes"], expected["labels"], expected["masks"]):
        x0, y0, x1, y1 = (float(v) for v in box)
        rle = mask_utils.encode(np.asfortranarray(mask.numpy().astype(np.uint8)))
        rle["counts"] = rle["counts"].decode("ascii")
        annotations.append(
            {
                "id": len(annotations) + 1,
                "image_id": 7,
                "category_id": coco.category_ids()[int(label)],
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "area": float(mask.sum()),
                "iscrowd": 0,
                "segmentation": rle,
            }
        )
    images = [
        {"id": 7, "file_name": "coffee.png", "height": 400, "width": 600},
        {"id": 9, "file_name": "broken.jpg", "height": 10, "width": 10},
    ]
    (root / "annotations" / "instances_val2017.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": coco.categories()})
    )
    row = registry.CHECKPOINTS[MASK]
    small_row = dataclasses.replace(row, detection=dataclasses.replace(row.detection, eval=SMALL))
    result = evaluate_detection(MASK, root, weights=weights, settings=SMALL)
    assert result.evaluated == 1 and "broken.jpg" in result.unreadable[0]["file"]
    assert result.box_ap > 95 and result.mask_ap > 95, result.stats
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(registry.CHECKPOINTS, MASK, small_row)
        report = tmp_path / "report.json"
        args = ["eval-det", str(root), "--model", MASK, "--weights", str(weights)]
        ran = CliRunner().invoke(main, [*args, "--report", str(report)])
    assert ran.exit_code == 1 and "1 image(s) could not be evaluated" in ran.output
    assert "box       AP " in ran.output and json.loads(report.read_text())["evaluated"] == 1


def test_the_official_path_serves_a_detector(reference, loopback_server, monkeypatch):
    """download -> verify -> convert -> cache for a detection row: a loopback server holds the
    mmdetection file at its official path; the second call reads the converted cache alone
    (no request) and gives the same detections."""
    _, path, photo_path = reference
    row = registry.CHECKPOINTS[MASK]
    served = loopback_server.root / row.source.path
    served.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, served)
    monkeypatch.setenv("CONVNEXT_BASE_URL", loopback_server.url)
    (first,) = ck.detect_files(MASK, [photo_path], settings=SMALL)
    requests = len(loopback_server.requests)
    assert first.ok and len(first.scores) > 5 and requests >= 1
    assert ck.weights.cache.converted_cache_path(row).is_file()
    (again,) = ck.detect_files(MASK, [photo_path], settings=SMALL)
    assert len(loopback_server.requests) == requests  # the cache alone
    np.testing.assert_array_equal(again.boxes, first.boxes)
    np.testing.assert_array_equal(again.labels, first.labels)


def test_a_model_object_takes_its_settings_from_its_name_or_from_settings():
    """Segmentation and detection share one rule for a ``.keras`` file or a model object: the
    settings given, else those of the checkpoint it is named after, else one clear error."""
    import keras

    from convnext_keras.tasks import segment

    mine = keras.Sequential(name="mine")
    for task, inference in (("segmentation", segment._inference), ("detection", detect._inference)):
        with pytest.raises(ValueError, match=f"'mine' is not named after a {task} checkpoint"):
            inference(mine, None, None, None)
        with pytest.raises(ValueError, match="Expected a model name, a .keras file or a keras"):
            inference(42, None, None, None)
    assert detect._inference(mine, None, None, SMALL) == (mine, SMALL)
    named = keras.Sequential(name=MASK)
    row = registry.CHECKPOINTS[MASK].detection.eval
    assert detect._inference(named, None, None, None) == (named, row)
