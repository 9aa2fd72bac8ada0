"""A plain-PyTorch reference of mmdetection 2.x inference for the two detectors of
facebookresearch/ConvNeXt ``object_detection`` (Mask R-CNN and Cascade Mask R-CNN on a ConvNeXt
with an FPN), and a writer of their checkpoint layout.

Written for the tests from the sources, separately from ``convnext_keras`` (no shared code):
facebookresearch/ConvNeXt ``object_detection/mmdet/models/backbones/convnext.py`` and
``configs/_base_/models/{mask_rcnn,cascade_mask_rcnn}_convnext_fpn.py`` /
``configs/convnext/*.py``; mmdetection 2.11 (SwinTransformer/Swin-Transformer-Object-Detection
@6a979e2, the tree the configs ran in): ``FPN``, ``AnchorGenerator``, ``delta2bbox``,
``RPNHead._get_bboxes``, ``SingleRoIExtractor``, ``ConvFCBBoxHead``, ``BBoxHead.get_bboxes`` /
``regress_by_class``, ``multiclass_nms``, ``StandardRoIHead`` / ``CascadeRoIHead.simple_test``,
``FCNMaskHead`` with ``get_seg_masks`` / ``_do_paste_mask``, the test pipeline
(``coco_instance.py``); mmcv 1.3: ``batched_nms``, ``nms`` (the CUDA kernel's overlap test,
``inter > thr * union``) and ``RoIAlign`` (``roi_align_cpu.cpp``, ``aligned=True``).

Deliberately simple and close to those sources: one image at a time, Python loops where the
originals loop (NMS over kept boxes, RoIAlign over RoIs).  ``roi_align`` and ``nms`` are proved
against brute force in ``tests/nets/test_detection_ops.py`` before the reference is used.

The module names of :class:`Detector` are mmdetection's, so ``Detector.state_dict()`` is the
released checkpoints' layout (``backbone.*`` with ``norm0..3``, ``neck.*``, ``rpn_head.*``,
``roi_head.*``, BatchNorm's ``num_batches_tracked`` included).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

#: COCO's classes; the test settings of the configs (test_cfg) and the pipeline.
CLASSES = 80
MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)
IMG_SCALE = (1333, 800)
SIZE_DIVISOR = 32
RPN_CFG = dict(nms_pre=1000, max_per_img=1000, iou_threshold=0.7, min_bbox_size=0)
RCNN_CFG = dict(score_thr=0.05, iou_threshold=0.5, max_per_img=100, mask_thr_binary=0.5)
CASCADE_STDS = ((0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1), (0.033, 0.033, 0.067, 0.067))
MASK_RCNN_STDS = (0.1, 0.1, 0.2, 0.2)


# ---------------------------------------------------------------------------------------------
# The backbone (object_detection/mmdet/models/backbones/convnext.py)


class LayerNorm(nn.Module):
    def __init__(self, dim, eps=1e-6, channels_first=False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps
        self.channels_first = channels_first

    def forward(self, x):
        if not self.channels_first:
            return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class Block(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = LayerNorm(dim)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pwconv2(F.gelu(self.pwconv1(self.norm(y))))
        return x + (self.gamma * y).permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    def __init__(self, depths, dims):
        super().__init__()
        self.downsample_layers = nn.ModuleList(
            [
                nn.Sequential(
                    nn.Conv2d(3, dims[0], 4, stride=4), LayerNorm(dims[0], channels_first=True)
                )
            ]
        )
        for i in range(3):
            self.downsample_layers.append(
                nn.Sequential(
                    LayerNorm(dims[i], channels_first=True),
                    nn.Conv2d(dims[i], dims[i + 1], 2, stride=2),
                )
            )
        self.stages = nn.ModuleList(
            nn.Sequential(*[Block(d) for _ in range(n)]) for n, d in zip(depths, dims)
        )
        for i, d in enumerate(dims):
            self.add_module(f"norm{i}", LayerNorm(d, channels_first=True))

    def forward(self, x):
        outs = []
        for i in range(4):
            x = self.stages[i](self.downsample_layers[i](x))
            outs.append(getattr(self, f"norm{i}")(x))
        return outs


# ---------------------------------------------------------------------------------------------
# FPN, RPN, heads (mmdet/models/...)


class ConvModule(nn.Module):
    """mmcv's ConvModule: ``conv`` (+ ``bn``) (+ ReLU)."""

    def __init__(self, cin, cout, k, padding=0, norm=False, act=True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=padding, bias=not norm)
        if norm:
            self.bn = nn.BatchNorm2d(cout)
        self.act = act

    def forward(self, x):
        x = self.conv(x)
        if hasattr(self, "bn"):
            x = self.bn(x)
        return F.relu(x) if self.act else x


class FPN(nn.Module):
    def __init__(self, in_channels, out_channels=256, num_outs=5):
        super().__init__()
        self.lateral_convs = nn.ModuleList(
            ConvModule(c, out_channels, 1, act=False) for c in in_channels
        )
        self.fpn_convs = nn.ModuleList(
            ConvModule(out_channels, out_channels, 3, padding=1, act=False) for _ in in_channels
        )
        self.num_outs = num_outs

    def forward(self, inputs):
        laterals = [conv(inputs[i]) for i, conv in enumerate(self.lateral_convs)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(
                laterals[i], size=laterals[i - 1].shape[2:], mode="nearest"
            )
        outs = [self.fpn_convs[i](laterals[i]) for i in range(len(laterals))]
        for _ in range(self.num_outs - len(outs)):
            outs.append(F.max_pool2d(outs[-1], 1, stride=2))
        return outs


class RPNHead(nn.Module):
    def __init__(self, channels=256, anchors=3):
        super().__init__()
        self.rpn_conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.rpn_cls = nn.Conv2d(channels, anchors, 1)
        self.rpn_reg = nn.Conv2d(channels, anchors * 4, 1)

    def forward(self, x):
        x = F.relu(self.rpn_conv(x))
        return self.rpn_cls(x), self.rpn_reg(x)


class BBoxHead(nn.Module):
    """ConvFCBBoxHead with shared convs / fcs only (Shared2FCBBoxHead, the 4conv1f head)."""

    def __init__(self, num_convs, num_fcs, norm, channels=256, fc=1024, roi=7, classes=CLASSES):
        super().__init__()
        self.shared_convs = nn.ModuleList(
            ConvModule(channels, channels, 3, padding=1, norm=norm) for _ in range(num_convs)
        )
        self.shared_fcs = nn.ModuleList(
            nn.Linear(channels * roi * roi if i == 0 else fc, fc) for i in range(num_fcs)
        )
        self.fc_cls = nn.Linear(fc, classes + 1)
        self.fc_reg = nn.Linear(fc, 4 * classes)

    def forward(self, x):
        for conv in self.shared_convs:
            x = conv(x)
        x = x.flatten(1)
        for fc in self.shared_fcs:
            x = F.relu(fc(x))
        return self.fc_cls(x), self.fc_reg(x)


class FCNMaskHead(nn.Module):
    def __init__(self, channels=256, classes=CLASSES):
        super().__init__()
        self.convs = nn.ModuleList(ConvModule(channels, channels, 3, padding=1) for _ in range(4))
        self.upsample = nn.ConvTranspose2d(channels, channels, 2, stride=2)
        self.conv_logits = nn.Conv2d(channels, classes, 1)

    def forward(self, x):
        for conv in self.convs:
            x = conv(x)
        return self.conv_logits(F.relu(self.upsample(x)))


class RoIHead(nn.Module):
    def __init__(self, cascade: bool):
        super().__init__()
        if cascade:
            self.bbox_head = nn.ModuleList(BBoxHead(4, 1, True) for _ in range(3))
            self.mask_head = nn.ModuleList(FCNMaskHead() for _ in range(3))
        else:
            self.bbox_head = BBoxHead(0, 2, False)
            self.mask_head = FCNMaskHead()


class Detector(nn.Module):
    """``MaskRCNN`` (``cascade=False``) or ``CascadeRCNN`` with mask heads, on a ConvNeXt."""

    def __init__(self, depths, dims, cascade: bool):
        super().__init__()
        self.cascade = cascade
        self.backbone = ConvNeXt(depths, dims)
        self.neck = FPN(list(dims))
        self.rpn_head = RPNHead()
        self.roi_head = RoIHead(cascade)


# ---------------------------------------------------------------------------------------------
# Boxes (mmdet/core/anchor, mmdet/core/bbox/coder) and the two CUDA-free operators (mmcv/ops)


def base_anchors(stride, scales=(8,), ratios=(0.5, 1.0, 2.0)):
    ratios, scales = torch.Tensor(ratios), torch.Tensor(scales)
    h_ratios = torch.sqrt(ratios)
    w_ratios = 1 / h_ratios
    ws = (stride * w_ratios[:, None] * scales[None, :]).view(-1)
    hs = (stride * h_ratios[:, None] * scales[None, :]).view(-1)
    return torch.stack([-0.5 * ws, -0.5 * hs, 0.5 * ws, 0.5 * hs], dim=-1)


def grid_anchors(base, feat_h, feat_w, stride):
    shift_x = torch.arange(0, feat_w) * stride
    shift_y = torch.arange(0, feat_h) * stride
    xx = shift_x.repeat(shift_y.shape[0])
    yy = shift_y.view(-1, 1).repeat(1, shift_x.shape[0]).view(-1)
    shifts = torch.stack([xx, yy, xx, yy], dim=-1).type_as(base)
    return (base[None, :, :] + shifts[:, None, :]).view(-1, 4)


def delta2bbox(rois, deltas, stds, max_shape=None, wh_ratio_clip=16 / 1000):
    means = deltas.new_tensor((0.0, 0.0, 0.0, 0.0)).view(1, -1).repeat(1, deltas.size(-1) // 4)
    stds = deltas.new_tensor(stds).view(1, -1).repeat(1, deltas.size(-1) // 4)
    denorm = deltas * stds + means
    dx, dy, dw, dh = denorm[:, 0::4], denorm[:, 1::4], denorm[:, 2::4], denorm[:, 3::4]
    max_ratio = np.abs(np.log(wh_ratio_clip))
    dw = dw.clamp(min=-max_ratio, max=max_ratio)
    dh = dh.clamp(min=-max_ratio, max=max_ratio)
    px = ((rois[:, 0] + rois[:, 2]) * 0.5).unsqueeze(1).expand_as(dx)
    py = ((rois[:, 1] + rois[:, 3]) * 0.5).unsqueeze(1).expand_as(dy)
    pw = (rois[:, 2] - rois[:, 0]).unsqueeze(1).expand_as(dw)
    ph = (rois[:, 3] - rois[:, 1]).unsqueeze(1).expand_as(dh)
    gw = pw * dw.exp()
    gh = ph * dh.exp()
    gx = px + pw * dx
    gy = py + ph * dy
    x1, y1 = gx - gw * 0.5, gy - gh * 0.5
    x2, y2 = gx + gw * 0.5, gy + gh * 0.5
    bboxes = torch.stack([x1, y1, x2, y2], dim=-1).view(deltas.size())
    if max_shape is not None:
        h, w = max_shape
        bboxes[:, 0::2] = bboxes[:, 0::2].clamp(min=0, max=w)
        bboxes[:, 1::2] = bboxes[:, 1::2].clamp(min=0, max=h)
    return bboxes


def nms(boxes, scores, iou_threshold, max_keep=None):
    """mmcv's ``nms``: indices of the kept boxes, best first (greedy; the CUDA kernel's test
    ``inter > iou_threshold * union``).  ``max_keep``: stop after that many (the callers keep
    only the first ``max_per_img``, which the later boxes cannot change)."""
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long)
    x1, y1, x2, y2 = boxes.unbind(1)
    areas = (x2 - x1) * (y2 - y1)
    order = scores.sort(descending=True)[1]
    suppressed = torch.zeros(len(boxes), dtype=torch.bool)
    keep = []
    for i in order.tolist():
        if suppressed[i]:
            continue
        keep.append(i)
        if max_keep is not None and len(keep) == max_keep:
            break
        w = (torch.minimum(x2[i], x2) - torch.maximum(x1[i], x1)).clamp(min=0)
        h = (torch.minimum(y2[i], y2) - torch.maximum(y1[i], y1)).clamp(min=0)
        inter = w * h
        suppressed |= inter > iou_threshold * (areas[i] + areas - inter)
    return torch.tensor(keep, dtype=torch.long)


def batched_nms(boxes, scores, idxs, iou_threshold, max_keep=None):
    """mmcv's ``batched_nms``: NMS per ``idxs`` group by shifting each group's boxes apart;
    returns (kept boxes with scores (k, 5), kept indices), best first."""
    max_coordinate = boxes.max()
    offsets = idxs.to(boxes) * (max_coordinate + torch.tensor(1).to(boxes))
    keep = nms(boxes + offsets[:, None], scores, iou_threshold, max_keep)
    return torch.cat([boxes[keep], scores[keep][:, None]], -1), keep


def _bilinear(feat, y, x):
    """mmcv ``pre_calc_for_bilinear_interpolate`` for one sample: (C,) or zeros."""
    height, width = feat.shape[1:]
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return feat.new_zeros(feat.shape[0])
    y, x = max(y, 0.0), max(x, 0.0)
    y_low, x_low = int(y), int(x)
    if y_low >= height - 1:
        y_high = y_low = height - 1
        y = float(y_low)
    else:
        y_high = y_low + 1
    if x_low >= width - 1:
        x_high = x_low = width - 1
        x = float(x_low)
    else:
        x_high = x_low + 1
    ly, lx = y - y_low, x - x_low
    hy, hx = 1.0 - ly, 1.0 - lx
    return (
        hy * hx * feat[:, y_low, x_low]
        + hy * lx * feat[:, y_low, x_high]
        + ly * hx * feat[:, y_high, x_low]
        + ly * lx * feat[:, y_high, x_high]
    )


def roi_align(feat, rois, output_size, spatial_scale, sampling_ratio=0):
    """mmcv ``RoIAlign(output_size, spatial_scale, sampling_ratio, pool_mode='avg',
    aligned=True)`` on one (C, H, W) map: rois (n, 4) -> (n, C, S, S).  The RoIs with the same
    sampling grid are computed together, every sample at once, with ``_bilinear``'s rules."""
    channels, height, width = feat.shape
    out = feat.new_zeros((len(rois), channels, output_size, output_size))
    table = feat.permute(1, 2, 0).reshape(height * width, channels)  # pixel rows
    roi_start_w = rois[:, 0] * spatial_scale - 0.5
    roi_start_h = rois[:, 1] * spatial_scale - 0.5
    roi_w = (rois[:, 2] * spatial_scale - 0.5) - roi_start_w
    roi_h = (rois[:, 3] * spatial_scale - 0.5) - roi_start_h
    bin_h, bin_w = roi_h / output_size, roi_w / output_size
    if sampling_ratio > 0:
        grids_h = torch.full((len(rois),), sampling_ratio)
        grids_w = torch.full((len(rois),), sampling_ratio)
    else:
        grids_h = torch.ceil(roi_h / output_size).long()
        grids_w = torch.ceil(roi_w / output_size).long()
    p = torch.arange(output_size, dtype=torch.float32)
    for grid_h, grid_w in sorted(set(zip(grids_h.tolist(), grids_w.tolist()))):
        if grid_h <= 0 or grid_w <= 0:
            continue  # no samples: zeros
        group = ((grids_h == grid_h) & (grids_w == grid_w)).nonzero(as_tuple=False).squeeze(1)
        iy = torch.arange(grid_h, dtype=torch.float32)
        ix = torch.arange(grid_w, dtype=torch.float32)
        bh, bw = bin_h[group, None, None], bin_w[group, None, None]
        ys = (roi_start_h[group, None, None] + p[None, :, None] * bh) + (
            iy[None, None, :] + 0.5
        ) * bh / grid_h
        xs = (roi_start_w[group, None, None] + p[None, :, None] * bw) + (
            ix[None, None, :] + 0.5
        ) * bw / grid_w
        n = len(group)
        y = ys.reshape(n, -1, 1).expand(n, -1, xs[0].numel()).reshape(-1)  # (n, S*gh, S*gw)
        x = xs.reshape(n, 1, -1).expand(n, ys[0].numel(), -1).reshape(-1)
        empty = (y < -1.0) | (y > height) | (x < -1.0) | (x > width)
        y, x = y.clamp(min=0), x.clamp(min=0)
        y_low, x_low = y.long(), x.long()
        y_last, x_last = y_low >= height - 1, x_low >= width - 1
        y_low = torch.where(y_last, height - 1, y_low)
        x_low = torch.where(x_last, width - 1, x_low)
        y_high = torch.where(y_last, y_low, y_low + 1)
        x_high = torch.where(x_last, x_low, x_low + 1)
        y = torch.where(y_last, y_low.float(), y)
        x = torch.where(x_last, x_low.float(), x)
        ly, lx = y - y_low, x - x_low
        hy, hx = 1.0 - ly, 1.0 - lx
        keep = (~empty).float()
        val = (
            (hy * hx * keep)[:, None] * table[y_low * width + x_low]
            + (hy * lx * keep)[:, None] * table[y_low * width + x_high]
            + (ly * hx * keep)[:, None] * table[y_high * width + x_low]
            + (ly * lx * keep)[:, None] * table[y_high * width + x_high]
        )  # (samples, C), samples in (roi, ph, iy, pw, ix) order
        val = val.view(n, output_size, grid_h, output_size, grid_w, channels).sum(dim=(2, 4))
        out[group] = val.permute(0, 3, 1, 2) / max(grid_h * grid_w, 1)
    return out


def roi_extract(feats, rois, output_size, strides=(4, 8, 16, 32), finest_scale=56):
    """``SingleRoIExtractor`` for one image: rois (n, 4) -> (n, C, S, S)."""
    scale = torch.sqrt((rois[:, 2] - rois[:, 0]) * (rois[:, 3] - rois[:, 1]))
    levels = (
        torch.floor(torch.log2(scale / finest_scale + 1e-6))
        .clamp(min=0, max=len(strides) - 1)
        .long()
    )
    out = feats[0].new_zeros((len(rois), feats[0].shape[1], output_size, output_size))
    for i, stride in enumerate(strides):
        inds = (levels == i).nonzero(as_tuple=False).squeeze(1)
        if inds.numel():
            out[inds] = roi_align(feats[i][0], rois[inds], output_size, 1.0 / stride)
    return out


# ---------------------------------------------------------------------------------------------
# The test pipeline (coco_instance.py: Resize keep_ratio, Normalize, Pad)


def rescale_size(w, h, scale=IMG_SCALE):
    """mmcv ``rescale_size`` (keep ratio) -> (new_w, new_h)."""
    max_long, max_short = max(scale), min(scale)
    factor = min(max_long / max(h, w), max_short / min(h, w))
    return int(w * float(factor) + 0.5), int(h * float(factor) + 0.5)


def preprocess(photo: np.ndarray, scale=IMG_SCALE, resize=None, pad_to=None):
    """An RGB uint8 photo -> (img (1, 3, Hp, Wp), meta): resized (``resize(photo, h, w)``,
    default ``F.interpolate`` bilinear, rounded), normalised, padded to 32 (or to ``pad_to`` =
    (Hp, Wp): the batch's size, as mmcv's ``collate`` pads a batch)."""
    h, w = photo.shape[:2]
    new_w, new_h = rescale_size(w, h, scale)
    if resize is None:
        img = torch.from_numpy(photo.copy()).permute(2, 0, 1)[None].float()
        img = F.interpolate(img, size=(new_h, new_w), mode="bilinear", align_corners=False)
        img = torch.floor(img + 0.5).clamp(0, 255)
    else:
        img = (
            torch.from_numpy(np.ascontiguousarray(resize(photo, new_h, new_w)))
            .permute(2, 0, 1)[None]
            .float()
        )
    img = (img - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    pad_h = int(np.ceil(new_h / SIZE_DIVISOR)) * SIZE_DIVISOR
    pad_w = int(np.ceil(new_w / SIZE_DIVISOR)) * SIZE_DIVISOR
    if pad_to is not None:
        pad_h, pad_w = pad_to
    img = F.pad(img, (0, pad_w - new_w, 0, pad_h - new_h))
    meta = {
        "ori_shape": (h, w),
        "img_shape": (new_h, new_w),
        "scale_factor": np.array([new_w / w, new_h / h, new_w / w, new_h / h], np.float32),
    }
    return img, meta


# ---------------------------------------------------------------------------------------------
# Inference (TwoStageDetector.simple_test with rescale=True)


def _rpn(model, feats, meta, cfg):
    level_ids, scores_all, deltas_all, anchors_all = [], [], [], []
    for idx, x in enumerate(feats):
        cls, reg = model.rpn_head(x)
        stride = (4, 8, 16, 32, 64)[idx]
        anchors = grid_anchors(base_anchors(stride), x.shape[2], x.shape[3], stride)
        scores = cls.permute(0, 2, 3, 1).reshape(-1).sigmoid()
        deltas = reg.permute(0, 2, 3, 1).reshape(-1, 4)
        if scores.shape[0] > cfg["nms_pre"]:
            ranked, rank_inds = scores.sort(descending=True)
            topk = rank_inds[: cfg["nms_pre"]]
            scores, deltas, anchors = ranked[: cfg["nms_pre"]], deltas[topk], anchors[topk]
        scores_all.append(scores)
        deltas_all.append(deltas)
        anchors_all.append(anchors)
        level_ids.append(scores.new_full((scores.size(0),), idx, dtype=torch.long))
    proposals = delta2bbox(
        torch.cat(anchors_all), torch.cat(deltas_all), (1.0,) * 4, meta["img_shape"]
    )
    scores, ids = torch.cat(scores_all), torch.cat(level_ids)
    if cfg["min_bbox_size"] > 0:
        w, h = proposals[:, 2] - proposals[:, 0], proposals[:, 3] - proposals[:, 1]
        valid = (w >= cfg["min_bbox_size"]) & (h >= cfg["min_bbox_size"])
        proposals, scores, ids = proposals[valid], scores[valid], ids[valid]
    dets, _ = batched_nms(proposals, scores, ids, cfg["iou_threshold"], cfg["max_per_img"])
    return dets[: cfg["max_per_img"]]


def multiclass_nms(multi_bboxes, multi_scores, cfg):
    num_classes = multi_scores.size(1) - 1
    bboxes = multi_bboxes.view(multi_scores.size(0), -1, 4)
    scores = multi_scores[:, :-1]
    labels = torch.arange(num_classes, dtype=torch.long).view(1, -1).expand_as(scores)
    bboxes, scores, labels = bboxes.reshape(-1, 4), scores.reshape(-1), labels.reshape(-1)
    inds = (scores > cfg["score_thr"]).nonzero(as_tuple=False).squeeze(1)
    bboxes, scores, labels = bboxes[inds], scores[inds], labels[inds]
    if bboxes.numel() == 0:
        return bboxes.new_zeros((0, 5)), labels
    dets, keep = batched_nms(bboxes, scores, labels, cfg["iou_threshold"], cfg["max_per_img"])
    return dets[: cfg["max_per_img"]], labels[keep][: cfg["max_per_img"]]


def get_bboxes(rois, cls_score, bbox_pred, stds, meta, cfg):
    """``BBoxHead.get_bboxes`` with ``rescale=True``."""
    scores = F.softmax(cls_score, dim=-1)
    bboxes = delta2bbox(rois, bbox_pred, stds, meta["img_shape"])
    scale = bboxes.new_tensor(meta["scale_factor"]).repeat(bboxes.size(-1) // 4)
    bboxes = bboxes / scale
    return multiclass_nms(bboxes, scores, cfg)


def regress_by_class(rois, label, bbox_pred, stds, meta):
    label = label * 4
    inds = torch.stack((label, label + 1, label + 2, label + 3), 1)
    return delta2bbox(rois, torch.gather(bbox_pred, 1, inds), stds, meta["img_shape"])


def do_paste_mask(masks, boxes, img_h, img_w):
    """``_do_paste_mask`` with ``skip_empty=False``: (n, 1, M, M) -> (n, img_h, img_w)."""
    x0, y0, x1, y1 = torch.split(boxes, 1, dim=1)
    n = masks.shape[0]
    img_y = torch.arange(0, img_h, dtype=torch.float32) + 0.5
    img_x = torch.arange(0, img_w, dtype=torch.float32) + 0.5
    img_y = (img_y - y0) / (y1 - y0) * 2 - 1
    img_x = (img_x - x0) / (x1 - x0) * 2 - 1
    img_x[torch.isinf(img_x)] = 0
    img_y[torch.isinf(img_y)] = 0
    gx = img_x[:, None, :].expand(n, img_y.size(1), img_x.size(1))
    gy = img_y[:, :, None].expand(n, img_y.size(1), img_x.size(1))
    grid = torch.stack([gx, gy], dim=3)
    return F.grid_sample(masks.float(), grid, align_corners=False)[:, 0]


def simple_test(model, img, meta, rpn_cfg=RPN_CFG, rcnn_cfg=RCNN_CFG, paste=True):
    """One image through the detector: a dict of the stage outputs (``fpn``: the 5 levels
    (1, 256, h, w); ``proposals`` (k, 5)), the detections in the photo's pixels (``boxes``
    (n, 4), ``scores`` (n,), ``labels`` (n,)), their mask probabilities (``mask_probs``
    (n, 28, 28)) and, with ``paste``, the binary masks in the photo (``masks`` (n, H, W))."""
    with torch.no_grad():
        feats = model.neck(model.backbone(img))
        proposals = _rpn(model, feats, meta, rpn_cfg)
        rois = proposals[:, :4]
        roi_feats = feats[:4]
        if model.cascade:
            ms_scores = []
            for i, stds in enumerate(CASCADE_STDS):
                cls_score, bbox_pred = model.roi_head.bbox_head[i](roi_extract(roi_feats, rois, 7))
                ms_scores.append(cls_score)
                if i < 2:
                    label = cls_score[:, :-1].argmax(dim=1)
                    rois = regress_by_class(rois, label, bbox_pred, stds, meta)
            cls_score = sum(ms_scores) / float(len(ms_scores))
            stds = CASCADE_STDS[-1]
            mask_heads = list(model.roi_head.mask_head)
        else:
            cls_score, bbox_pred = model.roi_head.bbox_head(roi_extract(roi_feats, rois, 7))
            # StandardRoIHead.simple_test_bboxes's padding mask catches rois with y2 == 0
            top = rois[:, -1] == 0
            cls_score[top, :] = 0
            bbox_pred[top, :] = 0
            stds = MASK_RCNN_STDS
            mask_heads = [model.roi_head.mask_head]
        dets, labels = get_bboxes(rois, cls_score, bbox_pred, stds, meta, rcnn_cfg)
        result = {
            "fpn": feats,
            "proposals": proposals,
            "boxes": dets[:, :4],
            "scores": dets[:, 4],
            "labels": labels,
        }
        if len(dets) == 0:
            result["mask_probs"] = dets.new_zeros((0, 28, 28))
            return result
        scale = dets.new_tensor(meta["scale_factor"])
        mask_rois = dets[:, :4] * scale
        mask_feats = roi_extract(roi_feats, mask_rois, 14)
        probs = [head(mask_feats).sigmoid() for head in mask_heads]
        merged = torch.stack(probs).mean(0) if len(probs) > 1 else probs[0]
        merged = merged[torch.arange(len(labels)), labels]  # (n, 28, 28)
        result["mask_probs"] = merged
        if paste:
            bboxes = mask_rois / scale  # get_seg_masks(rescale=True)
            h, w = meta["ori_shape"]
            result["masks"] = (
                do_paste_mask(merged[:, None], bboxes, h, w) >= rcnn_cfg["mask_thr_binary"]
            )
        return result


# ---------------------------------------------------------------------------------------------
# Weights and the release format


def build(spec, cascade: bool, seed: int = 0) -> Detector:
    """A detector on a registry ``Variant`` with well-spread weights: layer scale in
    [0.1, 0.5], LayerNorm / BatchNorm scales in [0.7, 1.3] and shifts ~ N(0, 0.1), BatchNorm
    running means ~ N(0, 0.3) and variances in [0.5, 2], fan-in kernels; the RPN's and box
    heads' last layers scaled so that proposals are boxes of sensible sizes and the class
    scores clear the score threshold often (real detections, not all below 0.05)."""
    torch.manual_seed(seed)
    model = Detector(spec.depths, spec.dims, cascade).eval()
    gen = torch.Generator().manual_seed(seed)

    def uniform(shape, low, high):
        return torch.rand(shape, generator=gen) * (high - low) + low

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".gamma"):
                p.copy_(uniform(p.shape, 0.1, 0.5))
            elif p.ndim == 1 and name.endswith("weight"):  # LayerNorm and BatchNorm scales
                p.copy_(uniform(p.shape, 0.7, 1.3))
            elif p.ndim == 1:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            else:
                fan_in = int(np.prod(p.shape[1:])) if "upsample" not in name else p.shape[0]
                p.copy_(torch.randn(p.shape, generator=gen) / np.sqrt(fan_in))
        # Proposals of sensible sizes (small deltas) and objectness spread out.
        model.rpn_head.rpn_reg.weight.mul_(0.1)
        model.rpn_head.rpn_cls.weight.mul_(2.0)
        heads = model.roi_head.bbox_head if cascade else [model.roi_head.bbox_head]
        for head in heads:
            # peaked class scores, many above the threshold (the cascade averages three)
            head.fc_cls.weight.mul_(8.0 if cascade else 3.0)
            head.fc_reg.weight.mul_(0.5)
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=gen) * 0.3)
            elif name.endswith("running_var"):
                b.copy_(uniform(b.shape, 0.5, 2.0))
            elif name.endswith("num_batches_tracked"):
                b.fill_(270000)
    return model


def checkpoint_state_dict(model: Detector) -> dict[str, torch.Tensor]:
    """The released checkpoints' ``state_dict``: the module names are mmdetection's."""
    return dict(model.state_dict())


def training_meta(config: str) -> dict:
    """A ``meta`` entry as mmcv's checkpoint hook writes it (plain Python values)."""
    return {
        "env_info": "sys.platform: linux\nPython: 3.7.10",
        "config": f"model = dict(type='{config}', ...)",
        "seed": 0,
        "exp_name": f"{config}.py",
        "mmdet_version": "2.11.0",
        "CLASSES": tuple(f"class{i}" for i in range(CLASSES)),
        "epoch": 36,
        "iter": 263844,
        "hook_msgs": {"last_ckpt": "/work_dirs/epoch_36.pth"},
    }


def save_mmdet(model: Detector, path: Path, meta=None) -> Path:
    """The release format: ``torch.save({"meta": ..., "state_dict": ...})``."""
    config = "CascadeRCNN" if model.cascade else "MaskRCNN"
    torch.save(
        {
            "meta": training_meta(config) if meta is None else meta,
            "state_dict": checkpoint_state_dict(model),
        },
        path,
    )
    return Path(path)


def count_params(model: Detector) -> int:
    """Parameters plus BatchNorm's running mean and variance (what Keras counts)."""
    params = sum(p.numel() for p in model.parameters())
    stats = sum(
        b.numel() for n, b in model.named_buffers() if n.endswith(("running_mean", "running_var"))
    )
    return params + stats
