"""Comparing two detectors' outputs (exported vs eager, batched vs alone)."""
import torch


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
