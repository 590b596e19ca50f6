"""Comparing two detectors' outputs (exported vs eager, batched vs alone)."""
import torch

from codetr.config import build_detector


def random_detector(preset: str, **overrides) -> torch.nn.Module:
    """A preset's inference model (3 classes) with random weights, off the structured init
    (so that a wrongly computed op changes the output), and one content query shared by all
    queries. The encoder's top-k scores of random weights lie ~1e-6 apart, so float rounding
    alone (another runtime, another padding) reorders the selected proposals; with equal
    content queries the decoder is then only permuted (its self-attention is
    permutation-equivariant) and the detections are the same set."""
    torch.manual_seed(0)
    detector = build_detector(preset, 3, **{"backbone.pretrained": False, **overrides}).eval()
    with torch.no_grad():
        for p in detector.parameters():
            p.add_(torch.randn_like(p), alpha=0.02)
        detector.query_content.weight.copy_(detector.query_content.weight[:1].clone())
    return detector


def assert_same_detections(expected: dict, got: dict, box_atol=1e-3, score_atol=1e-4) -> None:
    """The same detections: each expected one has an unused counterpart with its label, its
    score within score_atol and its box within box_atol px (order may differ among equal
    scores)."""
    assert got["scores"].shape == expected["scores"].shape
    assert (got["scores"][:-1] >= got["scores"][1:]).all()
    used = torch.zeros(len(got["scores"]), dtype=torch.bool)
    for box, score, label in zip(expected["boxes"], expected["scores"], expected["labels"]):
        ok = ((got["labels"] == label) & ((got["scores"] - score).abs() <= score_atol)
              & ((got["boxes"] - box).abs().amax(-1) <= box_atol) & ~used)
        assert ok.any(), f"no detection matches label {int(label)} score {float(score):.6f} box {box.tolist()}"
        used[int(ok.nonzero()[0])] = True
