"""Export (codetr.export, ``codetr export``): the ONNX lowering of multi-scale deformable
attention against the op, and the exported inference models (ONNX in onnxruntime, the
ExportedProgram) against the eager model on real BCCD images, for the CPU preset and the r50
preset with random weights."""
import dataclasses
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from codetr import export as E
from codetr.data import collate
from codetr.data.transforms import Compose, Normalize, RandomResize, ToTensor
from codetr.ops import ms_deform_attn
from detections import assert_same_detections, random_detector

ort = pytest.importorskip("onnxruntime")


# ------------------------------------------------------------------ the ONNX lowering of MSDA

class _Attention(torch.nn.Module):
    """ms_deform_attn over two levels whose sizes come from the inputs' shapes."""

    def forward(self, level0, level1, locations, weights):
        from codetr.models.ms_deform_attn import level_index

        shapes = [(level0.shape[1], level0.shape[2]), (level1.shape[1], level1.shape[2])]
        N, M, D = level0.shape[0], locations.shape[2], level0.shape[-1] // locations.shape[2]
        value = torch.cat((level0.flatten(1, 2), level1.flatten(1, 2)), 1).view(N, -1, M, D)
        spatial_shapes, level_start_index = level_index(shapes, value.device)
        return ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights)


def _attention_inputs(g, N, Q, sizes, M=2, D=4, P=3):
    (h0, w0), (h1, w1) = sizes
    loc = torch.rand(N, Q, M, 2, P, 2, generator=g) * 1.4 - 0.2  # some samples off the map
    loc[0, 0, 0, 0, 0] = torch.tensor([float("inf"), 0.5])  # non-finite: contributes nothing
    loc[0, 1, 0, 1, 0] = torch.tensor([0.5, float("nan")])
    return (torch.randn(N, h0, w0, M * D, generator=g), torch.randn(N, h1, w1, M * D, generator=g), loc,
            torch.rand(N, Q, M, 2, P, generator=g))


def test_onnx_lowering_of_ms_deform_attn_matches_the_op_at_every_size(tmp_path):
    g = torch.Generator().manual_seed(0)
    args = _attention_inputs(g, 2, 5, [(6, 7), (3, 4)])
    n, q = torch.export.Dim("n", min=1, max=64), torch.export.Dim("q", min=1, max=4096)
    h0, w0, h1, w1 = (torch.export.Dim(name, min=1, max=512) for name in ("h0", "w0", "h1", "w1"))
    dynamic = ({0: n, 1: h0, 2: w0}, {0: n, 1: h1, 2: w1}, {0: n, 1: q}, {0: n, 1: q})
    program = torch.export.export(_Attention(), args, dynamic_shapes=dynamic)
    onnx_program = torch.onnx.export(program, (), dynamo=True, opset_version=E.ONNX_OPSET, optimize=False,
                                     custom_translation_table=E.onnx_translations())
    onnx_program.save(str(tmp_path / "msda.onnx"))
    session = ort.InferenceSession(str(tmp_path / "msda.onnx"))
    names = [i.name for i in session.get_inputs()]
    for N, Q, sizes in [(2, 5, [(6, 7), (3, 4)]), (1, 9, [(11, 5), (1, 1)]), (3, 2, [(2, 16), (8, 8)])]:
        inputs = _attention_inputs(g, N, Q, sizes)
        expected = _Attention()(*inputs)
        got = session.run(None, dict(zip(names, (t.numpy() for t in inputs))))[0]
        assert got.shape == tuple(expected.shape)
        np.testing.assert_allclose(got, expected.numpy(), rtol=0, atol=2e-6)


# ------------------------------------------------------------------ exported vs eager detectors

def _batch(shared_data, items):
    """BCCD images, each resized as the eval transform does to (short side, long side max):
    ``items`` [(file name, short, long)] -> (images, masks) padded to a multiple of 32."""
    out = []
    for name, short, long in items:
        transform = Compose([RandomResize([short], max_size=long), ToTensor(), Normalize()])
        with Image.open(shared_data / "bccd" / "images" / name) as im:
            out.append(transform(im.convert("RGB"), None))
    images, masks, _ = collate(out, 32)
    return images, masks


A, B = ("BloodImage_00000.jpg", 320, 416), ("BloodImage_00001.jpg", 256, 352)


@pytest.fixture(scope="module", params=["deformable_detr_pp_lite0", "deformable_detr_pp_r50"])
def exported(request, tmp_path_factory):
    """(eager detector, {format: ExportedDetector}) of one preset, exported with dynamic
    batch and image size."""
    torch.set_num_threads(1)
    detector = random_detector(request.param)
    out = tmp_path_factory.mktemp(request.param)
    files = {"onnx": out / "model.onnx", "torch-export": out / "model.pt2"}
    runners = {}
    for fmt, path in files.items():
        E.export_file(detector, path, fmt, ["RBC", "WBC", "Platelets"], (320, 416), dynamic=True)
        runners[fmt] = E.ExportedDetector(path)
    return detector, runners


@pytest.mark.parametrize("fmt", ["onnx", "torch-export"])
def test_exported_model_gives_the_eager_detections(exported, fmt, shared_data):
    """Two BCCD images alone at two sizes, then as a padded batch of two: boxes within
    1e-3 px, scores within 1e-4, the same labels."""
    detector, runners = exported
    runner = runners[fmt]
    assert runner.class_names == ["RBC", "WBC", "Platelets"] and runner.image_size is None
    assert dataclasses.asdict(runner.config) == dataclasses.asdict(detector.config)
    cases = [_batch(shared_data, [A]), _batch(shared_data, [B]), _batch(shared_data, [A, B])]
    for images, masks in cases:
        orig = torch.tensor([[480, 640]] * len(images))
        with torch.no_grad():
            expected = detector(images, masks, orig_sizes=orig)
        got = runner(images, masks, orig)
        for e, g in zip(expected, got):
            assert_same_detections(e, g)


def test_fixed_size_export_pads_its_inputs(shared_data, tmp_path):
    """An export for one padded size takes any smaller batch (padded to it) and gives the
    eager detections on the same padded input; a larger input is refused by name."""
    detector = random_detector("deformable_detr_pp_lite0")
    path = E.export_file(detector, tmp_path / "fixed.onnx", "onnx", ["RBC", "WBC", "Platelets"], (352, 448))
    runner = E.ExportedDetector(path)
    assert runner.image_size == (352, 448)
    images, masks = _batch(shared_data, [A, B])
    padded = torch.nn.functional.pad(images, (0, 448 - images.shape[-1], 0, 352 - images.shape[-2]))
    padded_masks = torch.nn.functional.pad(masks, (0, 448 - masks.shape[-1], 0, 352 - masks.shape[-2]), value=True)
    with torch.no_grad():
        expected = detector(padded, padded_masks)
    for e, g in zip(expected, runner(images, masks)):
        assert_same_detections(e, g)
    big = torch.zeros(1, 3, 384, 448)
    with pytest.raises(ValueError, match=r"images: padded size \(384, 448\) exceeds the exported size \(352, 448\)"):
        runner(big, torch.zeros(1, 384, 448, dtype=torch.bool))


@pytest.mark.parametrize("fmt", ["onnx", "torch-export"])
def test_exported_model_rejects_malformed_inputs_by_name(exported, fmt):
    runner = exported[1][fmt]
    sizes = torch.tensor([[256, 256]])
    cases = [
        ((torch.zeros(3, 256, 256), sizes, sizes), r"images: expected \[B, 3, H, W\], got shape \[3, 256, 256\]"),
        ((torch.zeros(1, 1, 256, 256), sizes, sizes), r"images: expected \[B, 3, H, W\], got shape \[1, 1, 256, 256\]"),
        ((torch.zeros(1, 3, 256, 256, dtype=torch.uint8), sizes, sizes), "images: expected float32"),
        ((torch.zeros(1, 3, 256, 256), sizes[0], sizes), r"image_sizes: expected \[B, 2\] = \[1, 2\]"),
        ((torch.zeros(1, 3, 256, 256), sizes.int(), sizes), "image_sizes: expected int64"),
        ((torch.zeros(1, 3, 256, 256), sizes + 1, sizes), "image_sizes: each .* within the padded size"),
        ((torch.zeros(1, 3, 100, 256), torch.tensor([[100, 256]]), sizes), "images: both sides must be >= 128"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            runner.run(*args)
    with pytest.raises(TypeError, match="images: expected a tensor, got ndarray"):
        runner.run(np.zeros((1, 3, 256, 256), np.float32), sizes, sizes)
    with pytest.raises(ValueError, match=r"masks: expected a \[B, H, W\] bool tensor"):
        runner(torch.zeros(1, 3, 256, 256), torch.zeros(1, 256, 256))


def _checkpoint(tmp_path, detector) -> str:
    path = tmp_path / "model.pt"
    torch.save({"model_config": dataclasses.asdict(detector.config), "class_names": ["RBC", "WBC", "Platelets"],
                "model": {f"detector.{k}": v for k, v in detector.state_dict().items()}}, path)
    return str(path)


def test_export_cli_writes_files_that_predict_and_eval_run(tmp_path, shared_data, capsys):
    """``codetr export`` of a training checkpoint -> ``codetr predict`` / ``codetr eval``
    with the exported file give the checkpoint's detections; bad arguments are named."""
    from codetr.cli import main
    from codetr.engine.predictor import Predictor

    torch.set_num_threads(1)
    detector = random_detector("deformable_detr_pp_lite0")
    ckpt = _checkpoint(tmp_path, detector)
    out = tmp_path / "model.onnx"
    assert main(["export", "--checkpoint", ckpt, "--format", "onnx", "--out", str(out), "--dynamic"]) == 0
    assert "onnx: " in capsys.readouterr().out and out.is_file()
    image = shared_data / "bccd" / "images" / "BloodImage_00000.jpg"
    eager, onnx = Predictor.from_checkpoint(ckpt), Predictor.from_checkpoint(out)
    assert_same_detections(eager.predict(image), onnx.predict(image))
    assert main(["predict", "--checkpoint", str(out), str(image), "--out", str(tmp_path / "pred")]) == 0
    assert (tmp_path / "pred" / "BloodImage_00000.json").is_file()

    bad = [(["--image-size", "big"], "--image-size: expected HxW such as 512x640, got 'big'"),
           (["--image-size", "64x640"], "--image-size: both sides must be >= 128, got 64x640"),
           (["--out", str(tmp_path / "model.pt2")], "--out: a onnx file must end in .onnx")]
    for extra, message in bad:
        args = ["export", "--checkpoint", ckpt, "--format", "onnx", "--out", str(out), *extra]
        assert main(args) == 2
        assert message in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(tmp_path / "none.pt"), "--format", "onnx", "--out", str(out)]) == 2
    assert "--checkpoint: file not found" in capsys.readouterr().err


def test_exported_program_without_the_extension_names_what_is_missing(exported, tmp_path):
    """Loading the .pt2 in a process where codetr._C cannot load: an error that says the
    program needs codetr's compiled ops and how to do without them."""
    path = exported[1]["torch-export"].path
    code = ("import sys\nsys.modules['codetr._C'] = None\n"
            "from codetr.export import ExportedDetector\n"
            f"try:\n    ExportedDetector({str(path)!r})\nexcept RuntimeError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "calls codetr's compiled ops" in out and "export to ONNX instead" in out
