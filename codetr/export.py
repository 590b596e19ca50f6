"""Export of the inference model: torch.export (our compiled ops kept as custom ops) and ONNX
(multi-scale deformable attention lowered to one GridSample per level, which any ONNX runtime
executes), and the runner that loads either file back.

The exported graph is ``InferenceGraph``: the detector without auxiliary branches, its
post-processing included, on a padded batch described by plain tensors::

    images       [B, 3, H, W] float32, normalised (the eval transform) and zero-padded
    image_sizes  [B, 2] int64 (h, w) of each image inside the padded tensor
    orig_sizes   [B, 2] int64 (h, w) of the original images, to scale boxes to
    ->
    boxes        [B, N, 4] float32 xyxy pixels of the original image
    scores       [B, N] float32, best first
    labels       [B, N] int64

N is the detector's num_detections (or Q * C if smaller). The padding mask is built inside
the graph from image_sizes, so the runtimes never see a bool input.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from codetr.models.detector import image_sizes as unpadded_sizes

INPUT_NAMES = ("images", "image_sizes", "orig_sizes")
OUTPUT_NAMES = ("boxes", "scores", "labels")
FORMATS = ("onnx", "torch-export")
# The smallest side of a dynamic export's inputs: at 128 x 128 the four levels (strides
# 8..64) hold 340 tokens, so the two-stage selection of 300 queries is always a full top-k
# (the traced graph assumes it).
MIN_SIDE = 128


def padding_masks(image_sizes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """image_sizes [B, 2] (h, w) -> masks [B, H, W] bool, True on padding (bottom / right)."""
    ys = torch.arange(height, device=image_sizes.device)
    xs = torch.arange(width, device=image_sizes.device)
    return (ys[None, :, None] >= image_sizes[:, 0, None, None]) | (xs[None, None, :] >= image_sizes[:, 1, None, None])


class InferenceGraph(nn.Module):
    """The tensors-in, tensors-out form of a detector's inference (see the module docstring).

    ``detector``: a base detector in eval mode (``CoDETR.inference_model()``)."""

    def __init__(self, detector: nn.Module):
        super().__init__()
        self.detector = detector.eval()

    def forward(self, images: torch.Tensor, image_sizes: torch.Tensor, orig_sizes: torch.Tensor):
        masks = padding_masks(image_sizes, images.shape[-2], images.shape[-1])
        outputs = self.detector.detect(self.detector.encode(images, masks))
        return self.detector.detections(outputs, orig_sizes)


def check_graph_inputs(images, image_sizes, orig_sizes) -> None:
    """The exported model's input contract, checked before a runtime sees the tensors (the
    runtimes' own errors name no argument, or crash later on a shape)."""
    for name, t in zip(INPUT_NAMES, (images, image_sizes, orig_sizes)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images: expected [B, 3, H, W], got shape {list(images.shape)}")
    if images.dtype != torch.float32:
        raise ValueError(f"images: expected float32 (normalised), got {images.dtype}")
    B = images.shape[0]
    for name, t in (("image_sizes", image_sizes), ("orig_sizes", orig_sizes)):
        if t.shape != (B, 2):
            raise ValueError(f"{name}: expected [B, 2] = [{B}, 2] (h, w), got shape {list(t.shape)}")
        if t.dtype != torch.int64:
            raise ValueError(f"{name}: expected int64, got {t.dtype}")
    H, W = images.shape[-2:]
    if B and ((image_sizes < 1).any() or (image_sizes[:, 0] > H).any() or (image_sizes[:, 1] > W).any()):
        raise ValueError(f"image_sizes: each (h, w) must be within the padded size ({H}, {W}) and >= 1, "
                         f"got {image_sizes.tolist()}")


def example_inputs(batch: int, height: int, width: int) -> tuple[torch.Tensor, ...]:
    """A padded batch for tracing: the last image smaller than the padded size, so that the
    mask is not constant."""
    images = torch.randn(batch, 3, height, width)
    sizes = torch.tensor([[height, width]] * batch, dtype=torch.int64)
    sizes[-1] = torch.tensor([max(1, height * 3 // 4), max(1, width * 3 // 4)])
    return images, sizes, sizes.clone()


def export_program(detector: nn.Module, image_size: tuple[int, int] = (512, 640), dynamic: bool = False,
                   batch: int = 2) -> torch.export.ExportedProgram:
    """torch.export of ``InferenceGraph(detector)``; our ops stay ``torch.ops.codetr.*``
    custom ops (traced through their fake kernels). ``dynamic``: batch, height and width
    are symbolic (height, width >= MIN_SIDE), else the program is for ``image_size`` and
    any batch size."""
    graph = InferenceGraph(detector)
    args = example_inputs(batch, *image_size)
    B = torch.export.Dim("batch", min=1, max=1024)
    if dynamic:
        H = torch.export.Dim("height", min=MIN_SIDE, max=8192)
        W = torch.export.Dim("width", min=MIN_SIDE, max=8192)
        images = {0: B, 2: H, 3: W}
    else:
        images = {0: B}
    shapes = {"images": images, "image_sizes": {0: B}, "orig_sizes": {0: B}}
    with torch.no_grad():
        return torch.export.export(graph, args, dynamic_shapes=shapes)


# ---------------------------------------------------------------------------------- ONNX

ONNX_OPSET = 18


def _onnx_ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """codetr::ms_deform_attn in standard ONNX ops: per level, the level's slice of value as
    [N*M, D, H, W] maps, bilinear GridSample (align_corners=0, zero padding) at 2*loc-1, the
    attention-weighted sum over points. As the kernels, a sample with no corner on the map
    (or a non-finite location) contributes nothing, whatever its weight. The levels' sizes
    are read from spatial_shapes at run time, so one graph serves every image size."""
    from onnxscript import opset18 as op

    _, _, M, D = value.shape
    _, _, _, L, P, _ = sampling_locations.shape
    M, D, L, P = int(M), int(D), int(L), int(P)
    N = op.Shape(value, start=0, end=1)
    Q = op.Shape(sampling_locations, start=1, end=2)
    one = op.Constant(value_ints=[1])
    NM = op.Mul(N, op.Constant(value_ints=[M]))
    # [N, Q, M, L, P, 2] -> [N, M, Q, L, P, 2] -> [N*M, Q, L, P, 2]; weights alike.
    loc = op.Reshape(op.Transpose(sampling_locations, perm=[0, 2, 1, 3, 4, 5]),
                     op.Concat(NM, Q, op.Constant(value_ints=[L, P, 2]), axis=0))
    weights = op.Reshape(op.Transpose(attention_weights, perm=[0, 2, 1, 3, 4]),
                         op.Concat(NM, Q, op.Constant(value_ints=[L, P]), axis=0))
    # [N, S, M, D] -> [N, M, D, S]
    value_t = op.Transpose(value, perm=[0, 2, 3, 1])
    # Coordinates are float32 (the op's contract for every value dtype exported here).
    half, minus_one, one_f, two, minus_two, zero = (op.Constant(value_float=c) for c in (0.5, -1.0, 1.0, 2.0, -2.0, 0.0))
    out = None
    for lvl in range(L):
        index = op.Constant(value_ints=[lvl])
        hw = op.Reshape(op.Gather(spatial_shapes, index, axis=0), op.Constant(value_ints=[2]))  # [2]
        H, W = op.Slice(hw, op.Constant(value_ints=[0]), one), op.Slice(hw, one, op.Constant(value_ints=[2]))
        start = op.Gather(level_start_index, index, axis=0)  # [1]
        v = op.Slice(value_t, start, op.Add(start, op.Mul(H, W)), op.Constant(value_ints=[3]))
        v = op.Reshape(v, op.Concat(NM, op.Constant(value_ints=[D]), H, W, axis=0))
        l_loc = op.Squeeze(op.Gather(loc, index, axis=2), op.Constant(value_ints=[2]))  # [NM, Q, P, 2]
        l_w = op.Squeeze(op.Gather(weights, index, axis=2), op.Constant(value_ints=[2]))  # [NM, Q, P]
        x = op.Squeeze(op.Gather(l_loc, op.Constant(value_ints=[0]), axis=3), op.Constant(value_ints=[3]))
        y = op.Squeeze(op.Gather(l_loc, op.Constant(value_ints=[1]), axis=3), op.Constant(value_ints=[3]))
        Wf, Hf = op.CastLike(W, x), op.CastLike(H, x)
        px, py = op.Sub(op.Mul(x, Wf), half), op.Sub(op.Mul(y, Hf), half)
        inside = op.And(op.And(op.GreaterOrEqual(px, minus_one), op.GreaterOrEqual(py, minus_one)),
                        op.And(op.Less(px, Wf), op.Less(py, Hf)))
        grid = op.Sub(op.Mul(l_loc, two), one_f)
        grid = op.Where(op.Unsqueeze(inside, op.Constant(value_ints=[3])), grid, minus_two)
        sampled = op.GridSample(op.CastLike(v, x), grid, align_corners=0, mode="bilinear",
                                padding_mode="zeros")  # [NM, D, Q, P]
        w = op.Where(inside, l_w, zero)
        term = op.ReduceSum(op.Mul(sampled, op.Unsqueeze(w, one)), op.Constant(value_ints=[3]), keepdims=0)
        out = term if out is None else op.Add(out, term)  # [NM, D, Q]
    # [N*M, D, Q] -> [N, M*D, Q] -> [N, Q, M*D]
    out = op.Reshape(out, op.Concat(N, op.Constant(value_ints=[M * D]), Q, axis=0))
    return op.CastLike(op.Transpose(out, perm=[0, 2, 1]), value)


def onnx_translations() -> dict:
    """torch.onnx.export's custom_translation_table for our ops: the inference graph has one,
    multi-scale deformable attention."""
    return {torch.ops.codetr.ms_deform_attn.default: _onnx_ms_deform_attn}


def export_onnx(detector: nn.Module, path: Union[str, Path], image_size: tuple[int, int] = (512, 640),
                dynamic: bool = False, metadata: Optional[dict] = None):
    """ONNX (opset ONNX_OPSET) of ``InferenceGraph(detector)``, written to ``path`` as one
    file; ``metadata`` (JSON-serialisable) is stored in the model's metadata_props as
    "codetr". Returns the onnx.ModelProto."""
    import onnx

    program = export_program(detector, image_size, dynamic)
    # optimize=False: onnxscript 0.7.2's optimizer removed the constant min / max inputs of a
    # Clip (the clamp in inverse_sigmoid), leaving a graph onnxruntime refuses to load.
    # onnxruntime folds constants itself when it loads the model.
    onnx_program = torch.onnx.export(
        program, (), dynamo=True, opset_version=ONNX_OPSET, input_names=list(INPUT_NAMES),
        output_names=list(OUTPUT_NAMES), external_data=False,
        custom_translation_table=onnx_translations(), optimize=False)
    model = onnx_program.model_proto
    if metadata is not None:
        entry = model.metadata_props.add()
        entry.key, entry.value = "codetr", json.dumps(metadata)
    onnx.save(model, str(path))
    return model


# ------------------------------------------------------------------------- files and runner

def export_file(detector: nn.Module, path: Union[str, Path], fmt: str, class_names: list[str],
                image_size: tuple[int, int] = (512, 640), dynamic: bool = False) -> Path:
    """Export ``detector`` (a base detector with ``.config``) to ``path`` in ``fmt`` ("onnx"
    or "torch-export": an ``torch.export.save`` archive, by convention ``.pt2``), with the
    metadata ``ExportedDetector`` needs (class names, the model config for the eval
    transform, the input size). Written to a temporary file, then renamed."""
    if fmt not in FORMATS:
        raise ValueError(f"format: expected one of {FORMATS}, got {fmt!r}")
    check_image_size(image_size)
    config = getattr(detector, "config", None)
    if config is None:
        raise ValueError("detector: expected a model built by codetr.config (with .config)")
    if len(class_names) != detector.num_classes:
        raise ValueError(f"class_names: expected {detector.num_classes} names, got {len(class_names)}")
    metadata = {"format": fmt, "class_names": list(class_names), "model_config": dataclasses.asdict(config),
                "image_size": None if dynamic else list(image_size)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The temporary name keeps the suffix: torch.export.save warns on anything but .pt2.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    try:
        if fmt == "onnx":
            export_onnx(detector, tmp, image_size, dynamic, metadata)
        else:
            program = export_program(detector, image_size, dynamic)
            torch.export.save(program, tmp, extra_files={METADATA_FILE: json.dumps(metadata)})
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def check_image_size(image_size) -> tuple[int, int]:
    if (not isinstance(image_size, (tuple, list)) or len(image_size) != 2
            or not all(isinstance(v, int) and v >= MIN_SIDE for v in image_size)):
        raise ValueError(f"image_size: expected (height, width), two ints >= {MIN_SIDE}, got {image_size!r}")
    return tuple(image_size)


METADATA_FILE = "codetr.json"


class ExportedDetector:
    """An exported inference model (``export_file``), run in its runtime with the eager
    detector's call: ``detector(images [B, 3, H, W], masks [B, H, W], orig_sizes [B, 2])`` ->
    B dicts {"boxes", "scores", "labels"} (what ``Predictor`` and ``evaluate`` use).

    ``.onnx`` runs in onnxruntime (CPU; CUDA when onnxruntime-gpu is installed and
    ``device="cuda"``), ``.pt2`` as a torch ExportedProgram on ``device``. A program exported
    for a fixed size takes any batch whose padded size fits: images are padded to it.
    Attributes: ``format``, ``class_names``, ``config`` (DetectorConfig), ``image_size``
    ((H, W), or None for a dynamic export).
    """

    def __init__(self, path: Union[str, Path], device="cpu"):
        from codetr.config import config_from_dict

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"exported model not found: {path}")
        self.path, self.device = path, torch.device(device)
        if path.suffix == ".onnx":
            metadata = self._load_onnx(path)
        else:
            metadata = self._load_program(path)
        self.format, self.class_names = metadata["format"], metadata["class_names"]
        self.config = config_from_dict(metadata["model_config"])
        self.image_size = tuple(metadata["image_size"]) if metadata["image_size"] else None
        self.training = False  # read by code written for nn.Modules (evaluate)

    def _load_onnx(self, path: Path) -> dict:
        import onnxruntime

        providers = ["CPUExecutionProvider"]
        if self.device.type == "cuda":
            providers.insert(0, "CUDAExecutionProvider")
        self.session = onnxruntime.InferenceSession(str(path), providers=providers)
        meta = self.session.get_modelmeta().custom_metadata_map
        if "codetr" not in meta:
            raise ValueError(f"{path} is not an ONNX model exported by codetr (no 'codetr' metadata)")
        return json.loads(meta["codetr"])

    def _load_program(self, path: Path) -> dict:
        from codetr.ops import _extension

        extra = {METADATA_FILE: ""}
        try:
            program = torch.export.load(str(path), extra_files=extra)
        except Exception as e:
            if not _extension.LOADED:
                raise RuntimeError(f"{path}: the ExportedProgram calls codetr's compiled ops "
                                   f"(torch.ops.codetr.*), which are not available: {_extension.LOAD_ERROR}. "
                                   f"Build the extension, or export to ONNX instead") from e
            raise RuntimeError(f"cannot load {path} as a torch.export archive: {e}") from e
        if not extra[METADATA_FILE]:
            raise ValueError(f"{path} is not a program exported by codetr (no {METADATA_FILE})")
        self.program = program.module().to(self.device)
        return json.loads(extra[METADATA_FILE])

    def eval(self) -> "ExportedDetector":
        return self

    def train(self, mode: bool = True) -> "ExportedDetector":
        if mode:
            raise RuntimeError("an exported model is inference-only")
        return self

    def run(self, images: torch.Tensor, image_sizes: torch.Tensor, orig_sizes: torch.Tensor):
        """The graph's own inputs and outputs (module docstring): (boxes, scores, labels)."""
        check_graph_inputs(images, image_sizes, orig_sizes)
        if self.image_size is not None:
            H, W = self.image_size
            h, w = images.shape[-2:]
            if h > H or w > W:
                raise ValueError(f"images: padded size ({h}, {w}) exceeds the exported size ({H}, {W}); "
                                 f"export with a larger --image-size or with --dynamic")
            images = F.pad(images, (0, W - w, 0, H - h))
        elif min(images.shape[-2:]) < MIN_SIDE:
            raise ValueError(f"images: both sides must be >= {MIN_SIDE} (the dynamic export's range), got "
                             f"{list(images.shape[-2:])}")
        if self.format == "onnx":
            feeds = dict(zip(INPUT_NAMES, (t.cpu().numpy() for t in (images, image_sizes, orig_sizes))))
            return tuple(torch.from_numpy(a) for a in self.session.run(list(OUTPUT_NAMES), feeds))
        with torch.no_grad():
            return self.program(*(t.to(self.device) for t in (images, image_sizes, orig_sizes)))

    def __call__(self, images: torch.Tensor, masks: torch.Tensor, orig_sizes: Optional[torch.Tensor] = None):
        if not isinstance(masks, torch.Tensor) or masks.dtype != torch.bool or masks.dim() != 3:
            raise ValueError("masks: expected a [B, H, W] bool tensor (True on padding)")
        if masks.shape[0] != images.shape[0] or masks.shape[-2:] != images.shape[-2:]:
            raise ValueError(f"masks: expected shape [{images.shape[0]}, {images.shape[-2]}, {images.shape[-1]}] "
                             f"(images' batch and size), got {list(masks.shape)}")
        sizes = unpadded_sizes(masks).long()
        orig_sizes = sizes if orig_sizes is None else torch.as_tensor(orig_sizes).long()
        boxes, scores, labels = self.run(images, sizes, orig_sizes)
        return [{"boxes": b, "scores": s, "labels": lab} for b, s, lab in zip(boxes, scores, labels)]
