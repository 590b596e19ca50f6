"""Numbers against an executable reference: mmdetection 3.3's two-stage Deformable-DETR
with box refinement (configs/deformable_detr/deformable-detr-refine-twostage_r50, run on
CPU by ../shared/oracles/mmdet/run_oracle.py, in a subprocess) is the official
Co-Deformable-DETR query head without mixed query selection: same backbone, neck, encoder,
two-stage selection (all-class encoder head ranked by class 0, static query position
LN(Linear(sine(top-300)))), refining decoder and post-processing. Its random weights
(perturbed, so no two layers share values) are mapped into our DeformableDETRPP with
``mixed_selection=False`` and its FFN width 1024; both run on a real BCCD image. Measured:
encoder memory within 4e-6, scores within 7e-8, boxes within 6e-5 px, identical labels."""
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from codetr.config import build_detector

MEAN, STD = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1), torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1)

# mmdet 3 name -> ours (DeformableDETRPP state dict).
RULES = [
    (r"neck\.(convs|extra_convs)\.(\d+)\.conv\.weight", r"neck.\1.\2.weight"),
    (r"neck\.convs\.(\d+)\.gn\.(.*)", r"neck.norms.\1.\2"),
    (r"neck\.extra_convs\.(\d+)\.gn\.(.*)", r"neck.extra_norms.\1.\2"),
    (r"(encoder|decoder)\.layers\.(\d+)\.ffn\.layers\.0\.0\.(.*)", r"\1.layers.\2.ffn.linear1.\3"),
    (r"(encoder|decoder)\.layers\.(\d+)\.ffn\.layers\.1\.(.*)", r"\1.layers.\2.ffn.linear2.\3"),
    (r"encoder\.layers\.(\d+)\.norms\.0\.(.*)", r"encoder.layers.\1.norm.\2"),
    (r"encoder\.layers\.(\d+)\.norms\.1\.(.*)", r"encoder.layers.\1.ffn.norm.\2"),
    (r"decoder\.layers\.(\d+)\.self_attn\.attn\.(.*)", r"decoder.layers.\1.self_attn.\2"),
    (r"decoder\.layers\.(\d+)\.norms\.0\.(.*)", r"decoder.layers.\1.norm1.\2"),
    (r"decoder\.layers\.(\d+)\.norms\.1\.(.*)", r"decoder.layers.\1.norm2.\2"),
    (r"decoder\.layers\.(\d+)\.norms\.2\.(.*)", r"decoder.layers.\1.ffn.norm.\2"),
    (r"memory_trans_(fc|norm)\.(.*)", lambda m: f"enc_output{'' if m[1] == 'fc' else '_norm'}.{m[2]}"),
    (r"pos_trans_fc\.(.*)", r"pos_trans.\1"),
    (r"bbox_head\.cls_branches\.6\.(.*)", r"enc_class_head.\1"),
    (r"bbox_head\.cls_branches\.(\d)\.(.*)", r"class_heads.\1.\2"),
    (r"bbox_head\.reg_branches\.6\.(\d)\.(.*)", lambda m: f"enc_bbox_head.layers.{int(m[1]) // 2}.{m[2]}"),
    (r"bbox_head\.reg_branches\.(\d)\.(\d)\.(.*)", lambda m: f"decoder.bbox_heads.{m[1]}.layers.{int(m[2]) // 2}.{m[3]}"),
]


def to_ours(state):
    out = {}
    for k, v in state.items():
        for pattern, repl in RULES:
            if re.fullmatch(pattern, k):
                k = re.sub(pattern, repl, k)
                break
        out[k] = v
    return out


@pytest.fixture(scope="module")
def oracle(shared_data, tmp_path_factory):
    """Runs the oracle on one BCCD image at 240x320 padded to 256x320 (valid region smaller
    than the tensor: the padding masks matter) and at 288x384 unpadded."""
    oracle_dir = shared_data.parent / "oracles" / "mmdet"
    tmp = tmp_path_factory.mktemp("mmdet")
    image = Image.open(shared_data / "bccd" / "images" / "BloodImage_00000.jpg").convert("RGB")
    runs = {}
    for name, (h, w, H, W) in {"padded": (240, 320, 256, 320), "plain": (288, 384, 288, 384)}.items():
        x = torch.from_numpy(np.asarray(image.resize((w, h), Image.BILINEAR)).copy()).permute(2, 0, 1).float()
        inputs = torch.zeros(3, H, W)
        inputs[:, :h, :w] = (x - MEAN) / STD
        torch.save(inputs, tmp / f"{name}.pt")
        cmd = [sys.executable, "-W", "ignore", str(oracle_dir / "run_oracle.py"), "deformable_detr_refine_twostage_r50",
               "--seed", "0", "--perturb", "0.1", "--threads", "1", "--image", str(tmp / f"{name}.pt"),
               "--img-shape", str(h), str(w), "--out", str(tmp / f"{name}_out.pt")]
        if not runs:
            cmd += ["--state-dict", str(tmp / "sd.pt")]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"the mmdet oracle failed (pip install -r requirements-dev.txt):\n{done.stderr[-3000:]}"
        runs[name] = (torch.load(tmp / f"{name}_out.pt", weights_only=False), (h, w))
    return torch.load(tmp / "sd.pt", weights_only=True), runs


@pytest.fixture(scope="module")
def ours(oracle):
    state, _ = oracle
    model = build_detector("deformable_detr_pp_r50", 80, mixed_selection=False,
                           **{"transformer.dim_feedforward": 1024}).eval()
    mapped = to_ours(state)
    assert mapped.keys() == model.state_dict().keys()
    model.load_state_dict(mapped, strict=True)
    return model


@pytest.mark.parametrize("case", ["padded", "plain"])
def test_same_weights_same_encoder_and_detections_as_mmdetection(oracle, ours, case):
    out, (h, w) = oracle[1][case]
    inputs = out["inputs"]
    masks = torch.ones(1, *inputs.shape[-2:], dtype=torch.bool)
    masks[:, :h, :w] = False
    with torch.no_grad():
        memory = ours.encode(inputs, masks)
        det = ours(inputs, masks)[0]
    theirs = out["capture"]["encoder"][0]  # [1, S, C], batch first
    valid = ~memory.padding_mask[0]
    torch.testing.assert_close(memory.memory[0][valid], theirs[0][valid], rtol=0, atol=5e-5)
    pred = out["pred"]
    torch.testing.assert_close(det["scores"], pred["scores"], rtol=0, atol=1e-6)
    assert torch.equal(det["labels"], pred["labels"])
    torch.testing.assert_close(det["boxes"], pred["bboxes"], rtol=0, atol=1e-3)
