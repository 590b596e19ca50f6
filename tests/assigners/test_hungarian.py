import itertools

import pytest
import torch

from codetr.assigners import HungarianMatcher


def _random_case(g, Q, G, C=4):
    cxcy = torch.rand(Q, 2, generator=g) * 0.6 + 0.2
    wh = torch.rand(Q, 2, generator=g) * 0.3 + 0.05
    gt = torch.cat((torch.rand(G, 2, generator=g) * 0.6 + 0.2, torch.rand(G, 2, generator=g) * 0.3 + 0.05), 1)
    return (torch.randn(Q, C, generator=g), torch.cat((cxcy, wh), 1),
            torch.randint(0, C, (G,), generator=g), gt)


@pytest.mark.parametrize("Q,G", [(4, 2), (5, 3), (3, 3), (6, 1)])
def test_matches_brute_force(Q, G):
    g = torch.Generator().manual_seed(Q * 10 + G)
    matcher = HungarianMatcher()
    for _ in range(5):
        logits, boxes, labels, gt = _random_case(g, Q, G)
        cost = matcher.cost_matrix(logits, boxes, labels, gt)
        best = min(sum(cost[q, j].item() for j, q in enumerate(perm))
                   for perm in itertools.permutations(range(Q), G))
        (qi, gi), = matcher({"pred_logits": logits[None], "pred_boxes": boxes[None]},
                            [{"labels": labels, "boxes": gt}])
        assert len(qi) == G and sorted(gi.tolist()) == list(range(G))
        assert cost[qi, gi].sum().item() == pytest.approx(best, rel=1e-6, abs=1e-6)


def test_batched_equals_per_image_and_empty_targets():
    g = torch.Generator().manual_seed(0)
    cases = [_random_case(g, 6, G) for G in (3, 0, 2)]
    outputs = {"pred_logits": torch.stack([c[0] for c in cases]), "pred_boxes": torch.stack([c[1] for c in cases])}
    targets = [{"labels": c[2], "boxes": c[3]} for c in cases]
    matcher = HungarianMatcher()
    batched = matcher(outputs, targets)
    for b, c in enumerate(cases):
        (qi, gi), = matcher({"pred_logits": c[0][None], "pred_boxes": c[1][None]}, [targets[b]])
        assert torch.equal(qi, batched[b][0]) and torch.equal(gi, batched[b][1])
    assert batched[1][0].numel() == 0 and batched[1][1].dtype == torch.int64


def test_costs_fp32_and_finite_under_bf16_autocast():
    g = torch.Generator().manual_seed(1)
    logits, boxes, labels, gt = _random_case(g, 8, 3)
    matcher = HungarianMatcher()
    ref = matcher.cost_matrix(logits, boxes, labels, gt)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cost = matcher.cost_matrix(logits.bfloat16(), boxes.bfloat16(), labels, gt)
    assert cost.dtype == torch.float32 and torch.isfinite(cost).all()
    # only the bf16 rounding of the inputs differs
    assert torch.allclose(cost, ref, atol=0.1)


def test_non_finite_cost_raises():
    g = torch.Generator().manual_seed(2)
    logits, boxes, labels, gt = _random_case(g, 4, 2)
    logits[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        HungarianMatcher()({"pred_logits": logits[None], "pred_boxes": boxes[None]},
                           [{"labels": labels, "boxes": gt}])
