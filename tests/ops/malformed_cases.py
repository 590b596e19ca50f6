"""Malformed and edge inputs of every op, run on the compiled path, the reference path and
the fake kernel, each case in its own process so that a crash or a hang fails that case
instead of killing the run.

`CASES[op]` lists `Case`s; each builds the arguments of the op's public function from
valid ones. A case with `error` must raise on every path with the same exception type and
message (the compiled message must also match the `error` regex, so the case tests what
it says). A case without `error` is an edge input: compiled and reference must agree in
value (NaN where NaN) and, with `grad`, in gradient; the fake kernel must give the
compiled output's shape and dtype. `reads_values` marks checks that read tensor data (sizes
inside spatial_shapes, gt counts, batch indices): a fake tensor has none, so there the
fake kernel returns an output instead (as the CUDA kernels skip those checks, DESIGN.md).

The processes fork from a server that has imported torch and codetr once (multiprocessing
"forkserver"), so a case costs milliseconds, not an interpreter start.
"""
from __future__ import annotations

import dataclasses
import io
import math
import multiprocessing
import os
import re
import traceback
from typing import Callable

import torch

META = "meta"  # stands in for another device on a CPU-only machine
INF, NAN = math.inf, math.nan
TIMEOUT_S = 120


@dataclasses.dataclass
class Case:
    name: str
    build: Callable[[], tuple[Callable, tuple, dict]]  # -> (public function, args, kwargs)
    error: str | None = None  # regex the compiled path's message must match
    reads_values: bool = False
    grad: bool = False  # edge case: compare the gradients of the float inputs too

    def __str__(self):
        return self.name


def _ops():
    import codetr.ops as ops

    return ops


# -- ms_deform_attn ---------------------------------------------------------------------

def _msda(levels=((4, 5), (2, 2)), N=1, Q=3, M=2, D=4, P=2, dtype=torch.float32, **changes):
    g = torch.Generator().manual_seed(0)
    shapes = torch.as_tensor(levels, dtype=torch.long).view(-1, 2)
    sizes = shapes[:, 0] * shapes[:, 1]
    starts = sizes.cumsum(0) - sizes
    L, S = shapes.shape[0], int(sizes.sum())
    args = dict(
        value=torch.randn(N, S, M, D, generator=g).to(dtype),
        spatial_shapes=shapes,
        level_start_index=starts,
        sampling_locations=torch.rand(N, Q, M, L, P, 2, generator=g) * 1.4 - 0.2,
        attention_weights=torch.rand(N, Q, M, L, P, generator=g),
    )
    for k, v in changes.items():
        args[k] = v(args[k]) if callable(v) else v
    return _ops().ms_deform_attn, tuple(args.values()), {}


def _set_first(values):
    """A change for _msda(): the tensor with its first elements replaced by `values`."""
    def change(t):
        flat = t.clone().view(-1)
        flat[: len(values)] = torch.tensor(values, dtype=t.dtype)
        return flat.view(t.shape)
    return change


_MSDA = [
    Case("value_3d", lambda: _msda(value=lambda v: v[0]), "value must be 4-d"),
    Case("spatial_shapes_1d", lambda: _msda(spatial_shapes=lambda s: s[:, 0]), "spatial_shapes must be 2-d"),
    Case("level_start_index_2d", lambda: _msda(level_start_index=lambda s: s[None]), "level_start_index must be 1-d"),
    Case("locations_5d", lambda: _msda(sampling_locations=lambda t: t[0]), "sampling_locations must be 6-d"),
    Case("weights_4d", lambda: _msda(attention_weights=lambda t: t[0]), "attention_weights must be 5-d"),
    Case("value_int", lambda: _msda(value=lambda v: v.long()), "value must be a floating-point"),
    Case("value_bool", lambda: _msda(value=lambda v: v > 0), "value must be a floating-point"),
    Case("spatial_shapes_float", lambda: _msda(spatial_shapes=lambda s: s.float()), "spatial_shapes must have dtype Long"),
    Case("level_start_index_int32", lambda: _msda(level_start_index=lambda s: s.int()), "level_start_index must have dtype Long"),
    Case("locations_on_meta", lambda: _msda(sampling_locations=lambda t: t.to(META)), "sampling_locations must be on the same device"),
    Case("weights_on_meta", lambda: _msda(attention_weights=lambda t: t.to(META)), "attention_weights must be on the same device"),
    Case("spatial_shapes_on_meta", lambda: _msda(spatial_shapes=lambda t: t.to(META)), "spatial_shapes must be on the same device"),
    Case("locations_float64", lambda: _msda(sampling_locations=lambda t: t.double()), "sampling_locations must have the dtype of value"),
    Case("locations_int", lambda: _msda(sampling_locations=lambda t: t.long()), "sampling_locations must have the dtype of value"),
    Case("weights_float64", lambda: _msda(attention_weights=lambda t: t.double()), "attention_weights must have the dtype of sampling_locations"),
    Case("half_value_half_locations", lambda: _msda(dtype=torch.float16, sampling_locations=lambda t: t.half(), attention_weights=lambda t: t.half()), grad=True),
    Case("spatial_shapes_3_columns", lambda: _msda(spatial_shapes=lambda s: torch.cat([s, s[:, :1]], 1)), r"spatial_shapes must be \[L, 2\]"),
    Case("level_start_index_too_short", lambda: _msda(level_start_index=lambda s: s[:1]), "level_start_index must be"),
    Case("locations_other_heads", lambda: _msda(sampling_locations=lambda t: t[:, :, :1]), r"sampling_locations must be \[N, Q, M, L, P, 2\]"),
    Case("fewer_levels_than_locations", lambda: _msda(spatial_shapes=lambda s: s[:1], level_start_index=lambda s: s[:1]), r"sampling_locations must be \[N, Q, M, L, P, 2\]"),
    Case("locations_3_coordinates", lambda: _msda(sampling_locations=lambda t: torch.cat([t, t[..., :1]], -1)), r"sampling_locations must be \[N, Q, M, L, P, 2\]"),
    Case("weights_other_points", lambda: _msda(attention_weights=lambda t: t[..., :1]), r"attention_weights must be \[N, Q, M, L, P\]"),
    Case("weights_other_queries", lambda: _msda(attention_weights=lambda t: t[:, :2]), r"attention_weights must be \[N, Q, M, L, P\]"),
    Case("negative_size", lambda: _msda(spatial_shapes=torch.tensor([[-4, -5], [2, 2]])), "must hold non-negative", reads_values=True),
    Case("wrong_level_start", lambda: _msda(level_start_index=torch.tensor([0, 7])), r"level_start_index\[1\] must be 20", reads_values=True),
    Case("value_too_short", lambda: _msda(value=lambda v: v[:, :-1]), "spatial_shapes sums to", reads_values=True),
    Case("value_not_a_tensor", lambda: _msda(value=lambda v: v.tolist()), "value must be a tensor"),
    Case("locations_not_a_tensor", lambda: _msda(sampling_locations=1.0), "sampling_locations must be a tensor"),
    # Edge inputs: the kernels' documented values.
    Case("infinite_and_nan_locations", lambda: _msda(sampling_locations=_set_first([INF, 0.5, 0.5, -INF, NAN, 0.3, INF, INF])), grad=True),
    Case("huge_locations", lambda: _msda(sampling_locations=_set_first([1e30, 0.5, -1e30, 0.5, 0.5, 3e38])), grad=True),
    Case("nan_weight_off_the_map", lambda: _msda(sampling_locations=_set_first([2.0, 2.0, INF, 0.1]), attention_weights=_set_first([NAN, NAN])), grad=True),
    Case("exact_borders", lambda: _msda(sampling_locations=_set_first([0.0, 0.0, 1.0, 1.0, -0.1, 0.5, 0.5, -0.25, 1.1, 0.0])), grad=True),
    # Q * L * P >= S: the CPU kernel's padded (encoder) layout, where off-map samples read a
    # frame of zeros.
    Case("nan_weight_off_the_map_encoder", lambda: _msda(Q=12, sampling_locations=_set_first([2.0, 2.0, INF, 0.1, -0.6, 0.5]), attention_weights=_set_first([NAN, NAN, NAN])), grad=True),
    Case("zero_size_level", lambda: _msda(levels=((4, 5), (0, 3), (2, 2))), grad=True),
    Case("zero_size_level_encoder", lambda: _msda(levels=((4, 5), (0, 3), (2, 2)), Q=12, attention_weights=_set_first([NAN, 0.5, NAN, 0.3, 1.0, NAN])), grad=True),
    Case("all_levels_empty", lambda: _msda(levels=((0, 5), (2, 0))), grad=True),
    Case("no_levels", lambda: _msda(levels=torch.zeros(0, 2, dtype=torch.long)), grad=True),
    Case("no_queries", lambda: _msda(Q=0), grad=True),
    Case("no_images", lambda: _msda(N=0), grad=True),
    Case("no_points", lambda: _msda(P=0), grad=True),
    Case("no_channels", lambda: _msda(D=0), grad=True),
    Case("nan_and_inf_values", lambda: _msda(value=_set_first([NAN, INF, -INF])), grad=True),
    Case("half_value", lambda: _msda(dtype=torch.float16), grad=True),
    Case("float64", lambda: _msda(dtype=torch.float64, sampling_locations=lambda t: t.double(), attention_weights=lambda t: t.double()), grad=True),
]


# -- box_iou, generalized_box_iou_loss, nms, batched_nms ---------------------------------

def _boxes(n, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 50
    wh = torch.rand(n, 2, generator=g) * 30 + 1
    return torch.cat([xy, xy + wh], -1).to(dtype)


def _box_iou(b1=None, b2=None, **kwargs):
    return (_ops().box_iou, (_boxes(4) if b1 is None else b1, _boxes(3, 1) if b2 is None else b2),
            kwargs)


_SPECIAL_BOXES = torch.tensor([[0.0, 0.0, INF, INF], [NAN, 0.0, 1.0, 1.0], [5.0, 5.0, 5.0, 5.0],
                               [10.0, 10.0, 2.0, 2.0], [-1e30, -1e30, 1e30, 1e30]])

_BOX_IOU = [
    Case("boxes1_3_coordinates", lambda: _box_iou(b1=_boxes(4)[:, :3]), "boxes1 must be"),
    Case("boxes2_1d", lambda: _box_iou(b2=_boxes(1)[0]), "boxes2 must be"),
    Case("boxes1_bool", lambda: _box_iou(b1=_boxes(4) > 0), "boxes1 must be a real"),
    Case("boxes2_on_meta", lambda: _box_iou(b2=_boxes(3).to(META)), "boxes2 must be on the device"),
    Case("bad_mode", lambda: _box_iou(mode="dice"), "mode must be"),
    Case("batches_do_not_broadcast", lambda: _box_iou(b1=_boxes(8).view(2, 4, 4), b2=_boxes(9).view(3, 3, 4)), "must broadcast"),
    Case("aligned_counts_differ", lambda: _box_iou(aligned=True), "as many boxes"),
    Case("boxes1_not_a_tensor", lambda: _box_iou(b1=[[0, 0, 1, 1]]), "boxes1 must be a tensor"),
    Case("special_values", lambda: _box_iou(b1=_SPECIAL_BOXES, b2=torch.cat([_SPECIAL_BOXES, _boxes(2)])), grad=True),
    Case("special_values_giou", lambda: _box_iou(b1=_SPECIAL_BOXES, b2=_SPECIAL_BOXES.flip(0), mode="giou", aligned=True), grad=True),
    Case("empty", lambda: _box_iou(b1=_boxes(0)), grad=True),
    Case("integer_boxes", lambda: _box_iou(b1=_boxes(4).long(), b2=_boxes(3).int())),
    Case("half_boxes", lambda: _box_iou(b1=_boxes(4).half(), b2=_boxes(3).bfloat16(), mode="iof"), grad=True),
]


def _giou(pred=None, target=None, **kwargs):
    return (_ops().generalized_box_iou_loss,
            (_boxes(5) if pred is None else pred, _boxes(5, 1) if target is None else target), kwargs)


_GIOU = [
    Case("shapes_differ", lambda: _giou(target=_boxes(4)), "target must have the shape of pred"),
    Case("pred_5_coordinates", lambda: _giou(pred=torch.zeros(5, 5)), "pred must be"),
    Case("target_on_meta", lambda: _giou(target=_boxes(5).to(META)), "target must be on the device"),
    Case("bad_reduction", lambda: _giou(reduction="max"), "reduction must be"),
    Case("special_values", lambda: _giou(pred=_SPECIAL_BOXES, target=_SPECIAL_BOXES.flip(0)), grad=True),
    Case("empty_mean", lambda: _giou(pred=_boxes(0), target=_boxes(0), reduction="mean"), grad=True),
    Case("batched", lambda: _giou(pred=_boxes(6).view(2, 3, 4), target=_boxes(6, 1).view(2, 3, 4), reduction="sum"), grad=True),
]


def _nms(boxes=None, scores=None, idxs=None, threshold=0.5):
    boxes = _boxes(6) if boxes is None else boxes
    scores = torch.rand(6, generator=torch.Generator().manual_seed(3)) if scores is None else scores
    if idxs is None:
        return _ops().nms, (boxes, scores, threshold), {}
    return _ops().batched_nms, (boxes, scores, idxs, threshold), {}


_CLASSES = torch.tensor([0, 1, 0, 1, 2, 0])
_NMS = [
    Case("boxes_3_coordinates", lambda: _nms(boxes=_boxes(6)[:, :3]), "boxes must be"),
    Case("scores_2d", lambda: _nms(scores=torch.rand(6, 1)), "scores must be"),
    Case("scores_count", lambda: _nms(scores=torch.rand(5)), "scores must be"),
    Case("scores_int", lambda: _nms(scores=torch.ones(6, dtype=torch.long)), "scores must be a floating-point"),
    Case("scores_on_meta", lambda: _nms(scores=torch.rand(6, device=META)), "scores must be on the device"),
    Case("idxs_float", lambda: _nms(idxs=_CLASSES.float()), "idxs must be an integer"),
    Case("idxs_count", lambda: _nms(idxs=_CLASSES[:4]), "idxs must be"),
    Case("idxs_on_meta", lambda: _nms(idxs=_CLASSES.to(META)), "idxs must be on the device"),
    Case("special_values", lambda: _nms(boxes=torch.cat([_SPECIAL_BOXES, _boxes(1)]), scores=torch.tensor([0.9, NAN, 0.5, INF, 0.1, -INF]))),
    Case("special_values_batched", lambda: _nms(boxes=torch.cat([_SPECIAL_BOXES, _boxes(1)]), scores=torch.tensor([0.9, 0.2, 0.5, 0.3, 0.1, 0.4]), idxs=_CLASSES)),
    Case("empty", lambda: _nms(boxes=_boxes(0), scores=torch.rand(0))),
    Case("threshold_nan", lambda: _nms(threshold=NAN)),
]


# -- atss_assign, max_iou_assign ----------------------------------------------------------

def _gts():
    gt = torch.stack([_boxes(3, 5), _boxes(3, 6)])
    return gt, torch.tensor([3, 1])


def _atss(anchors=None, levels=(6, 4), gt_boxes=None, gt_counts=None, topk=3):
    gt, counts = _gts()
    anchors = _boxes(10, 7) if anchors is None else anchors
    return (_ops().atss_assign, (anchors, list(levels), gt if gt_boxes is None else gt_boxes,
                                 counts if gt_counts is None else gt_counts), {"topk": topk})


_ATSS = [
    Case("anchors_1d", lambda: _atss(anchors=_boxes(1)[0]), "anchors must be 2-d"),
    Case("anchors_5_coordinates", lambda: _atss(anchors=torch.zeros(10, 5)), r"anchors must be \[A, 4\]"),
    Case("anchors_int", lambda: _atss(anchors=_boxes(10).long()), "anchors must be a floating-point"),
    Case("gt_boxes_2d", lambda: _atss(gt_boxes=_boxes(3)), "gt_boxes must be 3-d"),
    Case("gt_boxes_3_coordinates", lambda: _atss(gt_boxes=torch.zeros(2, 3, 3)), r"gt_boxes must be \[B, G, 4\]"),
    Case("gt_boxes_int", lambda: _atss(gt_boxes=torch.zeros(2, 3, 4, dtype=torch.long)), "gt_boxes must be a floating-point"),
    Case("gt_counts_2d", lambda: _atss(gt_counts=torch.tensor([[3, 1]])), "gt_counts must be 1-d"),
    Case("gt_counts_batch", lambda: _atss(gt_counts=torch.tensor([3])), "gt_counts must be"),
    Case("gt_counts_int32", lambda: _atss(gt_counts=torch.tensor([3, 1], dtype=torch.int32)), "gt_counts must have dtype Long"),
    Case("gt_boxes_on_meta", lambda: _atss(gt_boxes=_gts()[0].to(META)), "gt_boxes must be on the same device"),
    Case("gt_counts_on_meta", lambda: _atss(gt_counts=torch.tensor([3, 1], device=META)), "gt_counts must be on the same device"),
    Case("anchors_on_meta", lambda: _atss(anchors=_boxes(10).to(META)), "gt_boxes must be on the same device"),
    Case("topk_zero", lambda: _atss(topk=0), "topk must be positive"),
    Case("negative_level", lambda: _atss(levels=(12, -2)), "must be non-negative"),
    Case("levels_do_not_sum", lambda: _atss(levels=(6, 3)), "must sum to A = 10"),
    Case("count_above_g", lambda: _atss(gt_counts=torch.tensor([4, 1])), r"gt_counts must lie in \[0, G = 3\]", reads_values=True),
    Case("negative_count", lambda: _atss(gt_counts=torch.tensor([3, -1])), r"gt_counts must lie in \[0, G = 3\]", reads_values=True),
    Case("gt_boxes_not_a_tensor", lambda: _atss(gt_boxes=_gts()[0].tolist()), "gt_boxes must be a tensor"),
    Case("no_gts", lambda: _atss(gt_boxes=torch.zeros(2, 0, 4), gt_counts=torch.tensor([0, 0]))),
    Case("no_images", lambda: _atss(gt_boxes=torch.zeros(0, 3, 4), gt_counts=torch.zeros(0, dtype=torch.long))),
    Case("empty_level", lambda: _atss(levels=(0, 10))),
    Case("special_gts", lambda: _atss(gt_boxes=torch.stack([_SPECIAL_BOXES[:3], _SPECIAL_BOXES[2:]]))),
    Case("special_anchors", lambda: _atss(anchors=torch.cat([_SPECIAL_BOXES, _boxes(5)]))),
]


def _max_iou(priors=None, gt_boxes=None, gt_counts=None):
    gt, counts = _gts()
    priors = _boxes(8, 7) if priors is None else priors
    return (_ops().max_iou_assign, (priors, gt if gt_boxes is None else gt_boxes,
                                    counts if gt_counts is None else gt_counts, 0.5, 0.4), {})


_MAX_IOU = [
    Case("priors_3_coordinates", lambda: _max_iou(priors=torch.zeros(8, 3)), r"priors must be \[A, 4\] or \[B, A, 4\]"),
    Case("priors_4d", lambda: _max_iou(priors=torch.zeros(1, 2, 8, 4)), r"priors must be \[A, 4\] or \[B, A, 4\]"),
    Case("priors_int", lambda: _max_iou(priors=torch.zeros(8, 4, dtype=torch.long)), "priors must be a floating-point"),
    Case("priors_batch", lambda: _max_iou(priors=torch.zeros(3, 8, 4)), r"priors must be \[B, A, 4\] with B = 2"),
    Case("gt_boxes_on_meta", lambda: _max_iou(gt_boxes=_gts()[0].to(META)), "gt_boxes must be on the same device"),
    Case("gt_counts_on_meta", lambda: _max_iou(gt_counts=torch.tensor([3, 1], device=META)), "gt_counts must be on the same device"),
    Case("gt_boxes_4d", lambda: _max_iou(gt_boxes=torch.zeros(2, 3, 4, 1)), "gt_boxes must be 3-d"),
    Case("count_above_g", lambda: _max_iou(gt_counts=torch.tensor([3, 9])), r"gt_counts must lie in \[0, G = 3\]", reads_values=True),
    Case("priors_not_a_tensor", lambda: (_ops().max_iou_assign, ("priors", *_gts(), 0.5, 0.4), {}), "priors must be a tensor"),
    Case("no_gts", lambda: _max_iou(gt_boxes=torch.zeros(2, 0, 4), gt_counts=torch.tensor([0, 0]))),
    Case("per_image_priors", lambda: _max_iou(priors=torch.stack([_boxes(8, 1), _boxes(8, 2)]))),
    Case("special_values", lambda: _max_iou(priors=torch.cat([_SPECIAL_BOXES, _boxes(3)]), gt_boxes=torch.stack([_SPECIAL_BOXES[:3], _SPECIAL_BOXES[2:]]))),
]


# -- roi_align ------------------------------------------------------------------------------

def _roi_align(input=None, rois=None, output_size=(2, 3), **kwargs):
    g = torch.Generator().manual_seed(0)
    input = torch.randn(2, 3, 8, 9, generator=g) if input is None else input
    if rois is None:
        rois = torch.cat([torch.tensor([[0.0], [1.0], [1.0]]), _boxes(3) / 8], 1)
    return _ops().roi_align, (input, rois, output_size), {"spatial_scale": 0.5, **kwargs}


def _rois(rows):
    return torch.tensor(rows, dtype=torch.float32)


_ROI_ALIGN = [
    Case("input_3d", lambda: _roi_align(input=torch.zeros(3, 8, 9)), "input must be 4-d"),
    Case("input_int", lambda: _roi_align(input=torch.zeros(2, 3, 8, 9, dtype=torch.long)), "input must be a floating-point"),
    Case("rois_4_columns", lambda: _roi_align(rois=torch.zeros(3, 4)), r"rois must be \[K, 5\]"),
    Case("rois_1d", lambda: _roi_align(rois=torch.zeros(5)), "rois must be 2-d"),
    Case("rois_on_meta", lambda: _roi_align(rois=torch.zeros(3, 5, device=META)), "rois must be on the same device"),
    Case("input_on_meta", lambda: _roi_align(input=torch.zeros(2, 3, 8, 9, device=META)), "rois must be on the same device"),
    Case("rois_float64", lambda: _roi_align(rois=torch.zeros(3, 5, dtype=torch.float64)), "rois must have the dtype of input"),
    Case("bad_output_size", lambda: _roi_align(output_size=(0, 2)), "output_size must be"),
    Case("huge_sampling_ratio", lambda: _roi_align(sampling_ratio=2**20), "sampling_ratio must be"),
    Case("batch_index_out_of_range", lambda: _roi_align(rois=_rois([[2, 0, 0, 4, 4]])), r"rois\[:, 0\] must hold batch indices", reads_values=True),
    Case("batch_index_nan", lambda: _roi_align(rois=_rois([[0, 0, 0, 4, 4], [NAN, 0, 0, 4, 4]])), r"got rois\[1, 0\] = nan", reads_values=True),
    Case("rois_not_a_tensor", lambda: _roi_align(rois=[[0, 0, 0, 4, 4]]), "rois must be a tensor"),
    Case("no_rois", lambda: _roi_align(rois=torch.zeros(0, 5)), grad=True),
    Case("no_channels", lambda: _roi_align(input=torch.zeros(2, 0, 8, 9)), grad=True),
    Case("special_rois", lambda: _roi_align(rois=_rois([[0, NAN, 0, 4, 4], [1, 0, 0, INF, 4], [0, -1e30, -1e30, 1e30, 1e30], [1, 6, 6, 2, 2], [0.9, 1, 1, 1, 1]])), grad=True),
    Case("special_rois_aligned", lambda: _roi_align(rois=_rois([[0, 0, -INF, 4, 4], [1, 20, 20, 30, 30], [0, 3, 3, 3.2, 3.2]]), aligned=True, sampling_ratio=2), grad=True),
    Case("half_input", lambda: _roi_align(input=torch.randn(2, 3, 8, 9).half()), grad=True),
]

CASES = {
    "ms_deform_attn": _MSDA,
    "box_iou": _BOX_IOU,
    "generalized_box_iou_loss": _GIOU,
    "nms": _NMS,
    "atss_assign": _ATSS,
    "max_iou_assign": _MAX_IOU,
    "roi_align": _ROI_ALIGN,
}


# -- the runner ---------------------------------------------------------------------------------

def _first(out):
    return out if isinstance(out, (tuple, list)) else (out,)


def _run(case: Case, path: str) -> dict:
    """Runs `case` on one path; returns {"error": (type, message)} or {"out": tensors,
    "grads": tensors}."""
    import codetr.ops as ops

    torch.manual_seed(0)  # the same inputs on every path
    fn, args, kwargs = case.build()
    ops.set_ops_mode("reference" if path == "reference" else "compiled")
    if path == "fake":
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx.experimental.symbolic_shapes import ShapeEnv

        mode = FakeTensorMode(shape_env=ShapeEnv())
        args = tuple(mode.from_tensor(a, static_shapes=True) if isinstance(a, torch.Tensor) else a
                     for a in args)
        try:
            with mode:
                out = _first(fn(*args, **kwargs))
        except Exception as exc:
            return {"error": (type(exc).__name__, str(exc))}
        return {"out": [(tuple(int(s) if isinstance(s, int) else -1 for s in o.shape), str(o.dtype))
                        for o in out]}
    leaves = []
    if case.grad:
        args = tuple(a.detach().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point()
                     and a.device.type == "cpu" else a for a in args)
        leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    try:
        out = _first(fn(*args, **kwargs))
        grads = []
        if leaves:
            g = torch.Generator().manual_seed(1)
            total = sum((o.float() * torch.rand(o.shape, generator=g)).sum() for o in out
                        if o.is_floating_point())
            grads = torch.autograd.grad(total, leaves, allow_unused=True)
            grads = [torch.zeros_like(l) if gr is None else gr for gr, l in zip(grads, leaves)]
    except Exception as exc:
        return {"error": (type(exc).__name__, str(exc))}
    return {"out": [o.detach() for o in out], "grads": [gr.detach() for gr in grads]}


def _child(op: str, index: int, conn) -> None:
    try:
        case = CASES[op][index]
        results = {path: _run(case, path) for path in ("compiled", "reference", "fake")}
        # As bytes: a pickled tensor would be shared through a file descriptor that dies
        # with this process.
        buffer = io.BytesIO()
        torch.save(results, buffer)
        conn.send_bytes(buffer.getvalue())
    except BaseException:
        buffer = io.BytesIO()
        torch.save({"crash": traceback.format_exc()}, buffer)
        conn.send_bytes(buffer.getvalue())


_CTX = None


def _context():
    global _CTX
    if _CTX is None:
        from multiprocessing import forkserver

        _CTX = multiprocessing.get_context("forkserver")
        _CTX.set_forkserver_preload(["fork_warmup", "malformed_cases"])
        # The server is a new interpreter that ignores our sys.path (and a preload it cannot
        # import): it finds this directory through PYTHONPATH.
        here, saved = os.path.dirname(os.path.abspath(__file__)), os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (here, saved) if p)
        try:
            forkserver.ensure_running()
        finally:
            if saved is None:
                del os.environ["PYTHONPATH"]
            else:
                os.environ["PYTHONPATH"] = saved
    return _CTX


def run_in_subprocess(op: str, case: Case) -> dict:
    """The case's results on the three paths, from a fresh process. A crash (signal, abort)
    or a hang becomes an AssertionError naming the case."""
    ctx = _context()
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(op, CASES[op].index(case), send))
    proc.start()
    send.close()
    ready = recv.poll(TIMEOUT_S)
    try:
        result = torch.load(io.BytesIO(recv.recv_bytes()), weights_only=True) if ready else None
    except EOFError:  # it died before sending
        result = None
    proc.join(5 if ready else 0)
    if proc.is_alive():
        proc.kill()
        proc.join()
    assert result is not None, (f"{op}/{case.name}: the process "
                                + ("hung" if not ready else f"died with exit code {proc.exitcode}"))
    assert "crash" not in result, f"{op}/{case.name}: the harness failed:\n{result['crash']}"
    return result


def _same(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype, f"{what}: {a.shape}/{a.dtype} vs {b.shape}/{b.dtype}"
    if a.is_floating_point():
        tol = 1e-2 if a.dtype in (torch.float16, torch.bfloat16) else 1e-5
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, equal_nan=True, msg=lambda m: f"{what}: {m}")
    else:
        assert torch.equal(a, b), f"{what}: {a} vs {b}"


def check_case(op: str, case: Case) -> None:
    """The assertion of one row of the table (see the module docstring)."""
    r = run_in_subprocess(op, case)
    compiled, reference, fake = r["compiled"], r["reference"], r["fake"]
    if case.error is not None:
        assert "error" in compiled, f"compiled path accepted it: {compiled}"
        assert re.search(case.error, compiled["error"][1]), compiled["error"]
        assert reference.get("error") == compiled["error"], (reference, compiled)
        if case.reads_values:
            assert "out" in fake, f"the fake kernel cannot read values, yet raised {fake}"
        else:
            assert fake.get("error") == compiled["error"], (fake, compiled)
        return
    assert "out" in compiled, compiled
    assert "out" in reference, reference
    assert "out" in fake, fake
    assert len(compiled["out"]) == len(reference["out"]) == len(fake["out"])
    for i, (c, ref, f) in enumerate(zip(compiled["out"], reference["out"], fake["out"])):
        _same(c, ref, f"output {i}")
        fake_shape = tuple(s if s >= 0 else c.shape[d] for d, s in enumerate(f[0]))
        assert (fake_shape, f[1]) == (tuple(c.shape), str(c.dtype)), (f, c.shape, c.dtype)
    for i, (c, ref) in enumerate(zip(compiled["grads"], reference["grads"])):
        _same(c, ref, f"gradient of input {i}")


def kernel_and_fake_errors(fn: Callable, *args) -> tuple[str, str]:
    """The messages `fn` (a torch.ops.codetr op, called directly) raises with real CPU
    inputs (the compiled kernel's check) and with fake ones (the fake kernel's), in this
    process: for direct op calls the tests already know do not crash."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    messages = []
    for fake in (False, True):
        mode = FakeTensorMode(shape_env=ShapeEnv()) if fake else None
        call_args = [mode.from_tensor(a, static_shapes=True) if fake and isinstance(a, torch.Tensor)
                     else a for a in args]
        try:
            if fake:
                with mode:
                    fn(*call_args)
            else:
                fn(*call_args)
        except RuntimeError as exc:
            messages.append(str(exc))
        else:
            messages.append(None)
    return messages[0], messages[1]
