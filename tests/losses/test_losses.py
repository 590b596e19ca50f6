import pytest
import torch
import torch.nn.functional as F

from codetr.assigners import HungarianMatcher
from codetr.losses import SetCriterion, sigmoid_focal_loss

tv_ops = pytest.importorskip("torchvision.ops")


def _boxes(n, seed):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 50
    return torch.cat((xy, xy + torch.rand(n, 2, generator=g) * 40 + 1), 1)


def test_focal_matches_torchvision():
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(6, 4, generator=g), (torch.rand(6, 4, generator=g) > 0.7).float()
    torch.testing.assert_close(sigmoid_focal_loss(x, t), tv_ops.sigmoid_focal_loss(x, t))
    # gamma 0, alpha -1 is plain BCE
    torch.testing.assert_close(sigmoid_focal_loss(x, t, alpha=-1, gamma=0.0),
                               F.binary_cross_entropy_with_logits(x, t, reduction="none"))


def _outputs(B=2, Q=6, C=3, L=2, seed=0):
    g = torch.Generator().manual_seed(seed)

    def one(c):
        boxes = torch.cat((torch.rand(B, Q, 2, generator=g) * 0.5 + 0.25, torch.rand(B, Q, 2, generator=g) * 0.2 + 0.1), -1)
        return {"pred_logits": torch.randn(B, Q, c, generator=g, requires_grad=True),
                "pred_boxes": boxes.requires_grad_()}
    out = one(C)
    out["aux_outputs"] = [one(C) for _ in range(L - 1)]
    out["enc_outputs"] = one(1)
    return out


def test_criterion_keys_and_zero_targets():
    crit = SetCriterion(3, HungarianMatcher())
    out = _outputs()
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
    losses = crit(out, [empty, empty])
    names = ["loss_cls", "loss_bbox", "loss_giou"]
    assert set(losses) == {p + n for p in ("", "d0.", "enc.") for n in names}
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_bbox"].item() == 0 and losses["loss_cls"].item() > 0  # all negatives
    sum(losses.values()).backward()
    assert torch.isfinite(out["pred_logits"].grad).all()


def test_criterion_normalisation_and_encoder_is_class_agnostic():
    crit = SetCriterion(3, HungarianMatcher())
    out = _outputs(B=1)
    t = {"labels": torch.tensor([2, 1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.3, 0.4, 0.1, 0.2]])}
    losses = crit(out, [t])
    # encoder output has 1 class: any target label must have been mapped to 0
    assert torch.isfinite(losses["enc.loss_cls"])
    # doubling the batch with a copy keeps the per-box normalised loss
    out2 = {k: (torch.cat([v, v]) if torch.is_tensor(v) else v) for k, v in out.items() if k != "aux_outputs"}
    out2["enc_outputs"] = {k: torch.cat([v, v]) for k, v in out["enc_outputs"].items()}
    out2["aux_outputs"] = [{k: torch.cat([v, v]) for k, v in a.items()} for a in out["aux_outputs"]]
    losses2 = crit(out2, [t, t])
    for k in losses:
        torch.testing.assert_close(losses2[k], losses[k])
