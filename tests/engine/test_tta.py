"""Test-time augmentation: the merges against their definitions (weighted box fusion against
ZFTurbo's ensemble-boxes, box voting by hand) and the views' geometry against a detector
whose answer is known."""
import numpy as np
import pytest
import torch

from codetr.engine import tta as T  # (a bare TestTimeAugmentation would look like a test class to pytest)
from codetr.engine.tta import box_voting, weighted_box_fusion


def _clustered_detections(g, views=4, objects=6, size=(480.0, 640.0)):
    """views x objects noisy detections of the same boxes, labels 0..2, distinct scores."""
    h, w = size
    xy = torch.rand(objects, 2, generator=g) * torch.tensor([w - 120, h - 120])
    base = torch.cat((xy, xy + 20 + torch.rand(objects, 2, generator=g) * 100), -1)
    labels = torch.randint(0, 3, (objects,), generator=g)
    boxes, scores, labs = [], [], []
    for _ in range(views):
        keep = torch.rand(objects, generator=g) > 0.2  # a view misses some objects
        boxes.append((base + torch.randn(objects, 4, generator=g) * 3)[keep])
        scores.append(torch.rand(objects, generator=g)[keep] * 0.9 + 0.05)
        labs.append(labels[keep])
    return boxes, scores, labs


@pytest.mark.parametrize("seed", range(5))
def test_weighted_box_fusion_matches_ensemble_boxes(seed):
    ensemble_boxes = pytest.importorskip("ensemble_boxes")
    g = torch.Generator().manual_seed(seed)
    h, w = 480.0, 640.0
    boxes, scores, labels = _clustered_detections(g, size=(h, w))
    scale = torch.tensor([w, h, w, h])
    ref_boxes, ref_scores, ref_labels = ensemble_boxes.weighted_boxes_fusion(
        [(b / scale).numpy() for b in boxes], [s.numpy() for s in scores], [lab.numpy() for lab in labels],
        iou_thr=0.55, skip_box_thr=0.0, conf_type="avg")
    got_boxes, got_scores, got_labels = weighted_box_fusion(
        torch.cat(boxes), torch.cat(scores), torch.cat(labels), num_views=len(boxes), iou_threshold=0.55)
    assert len(got_scores) == len(ref_scores) < sum(len(s) for s in scores)
    np.testing.assert_allclose(got_scores.numpy(), ref_scores, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(got_labels.numpy(), ref_labels.astype(np.int64))
    np.testing.assert_allclose((got_boxes / scale).numpy(), ref_boxes, rtol=0, atol=1e-5)


def test_box_voting_averages_the_overlapping_boxes_of_each_kept_one():
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 1, 11, 11], [0, 0, 10, 10], [50, 50, 60, 60]])
    scores = torch.tensor([0.9, 0.6, 0.8, 0.5])
    labels = torch.tensor([0, 0, 1, 0])
    voted, kept_scores, kept_labels = box_voting(boxes, scores, labels, num_views=2, iou_threshold=0.5)
    # Box 1 overlaps box 0 (IoU 81/119 = 0.68): suppressed, and averaged into it; box 2 has
    # another label; box 3 overlaps nothing.
    torch.testing.assert_close(kept_scores, torch.tensor([0.9, 0.8, 0.5]))
    assert kept_labels.tolist() == [0, 1, 0]
    torch.testing.assert_close(voted, torch.tensor([[0.4, 0.4, 10.4, 10.4], [0, 0, 10, 10], [50, 50, 60, 60]]))
    empty = box_voting(boxes[:0], scores[:0], labels[:0], 2)
    assert [len(t) for t in empty] == [0, 0, 0]
    assert [len(t) for t in weighted_box_fusion(boxes[:0], scores[:0], labels[:0], 2)] == [0, 0, 0]


class _BrightRegion:
    """A detector that knows the answer: the box of the pixels whose first channel is > 0
    in each (unpadded) image, scaled to orig_sizes, score 1, label 0."""

    def eval(self):
        return self

    def __call__(self, images, masks, orig_sizes):
        out = []
        for image, mask, (H, W) in zip(images, masks, orig_sizes.tolist()):
            h, w = int((~mask[:, 0]).sum()), int((~mask[0]).sum())
            ys, xs = torch.nonzero(image[0, :h, :w] > 0, as_tuple=True)
            box = torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=torch.float32)
            out.append({"boxes": box * torch.tensor([W / w, H / h, W / w, H / h]), "scores": torch.ones(1),
                        "labels": torch.zeros(1, dtype=torch.int64)})
        return out


@pytest.mark.parametrize("merge", ["wbf", "vote"])
def test_views_map_back_to_the_original_frame(merge):
    """Flipped and rescaled views of an image with one off-centre object: every view's box
    mapped back lands on the object, so the merge gives one box there with score 1 (a view
    mapped wrongly would form its own cluster, scored below 1 by WBF)."""
    image = -torch.ones(3, 120, 160)
    image[:, 30:70, 20:60] = 1.0  # x 20..60, y 30..70
    images = torch.zeros(2, 3, 128, 160) - 5
    images[0, :, :120] = image
    images[1, :, :120, :] = image
    masks = torch.ones(2, 128, 160, dtype=torch.bool)
    masks[:, :120] = False
    tta = T.TestTimeAugmentation(_BrightRegion(), scales=(0.5, 1.0, 1.5), flip=True, merge=merge)
    for det in tta(images, masks, orig_sizes=torch.tensor([[240, 320], [240, 320]])):
        assert len(det["boxes"]) == 1
        torch.testing.assert_close(det["scores"], torch.ones(1))
        # the object is x 40..120, y 60..140 at the original (2x) size; views resized
        # bilinearly move its edges by up to a pixel of the smallest view (4 px here)
        torch.testing.assert_close(det["boxes"], torch.tensor([[40.0, 60, 120, 140]]), rtol=0, atol=4.0)


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="scales: expected factors in"):
        T.TestTimeAugmentation(_BrightRegion(), scales=(0,))
    with pytest.raises(ValueError, match="merge: expected one of"):
        T.TestTimeAugmentation(_BrightRegion(), merge="nms")
