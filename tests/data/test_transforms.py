import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from codetr.data import collate
from codetr.data import transforms as T


def make_target(boxes, labels=None):
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    labels = torch.arange(len(boxes)) if labels is None else torch.tensor(labels)
    return {"boxes": boxes, "labels": labels, "iscrowd": torch.zeros(len(boxes), dtype=torch.int64)}


def test_hflip_boxes_and_pixels():
    img = torch.rand(3, 20, 50)
    target = make_target([[5, 2, 15, 10], [0, 0, 50, 20]])
    out, t = T.hflip(img, target)
    torch.testing.assert_close(out, img.flip(-1))
    # manual mirror: x -> 50 - x, swapping x1/x2
    torch.testing.assert_close(t["boxes"], torch.tensor([[35.0, 2, 45, 10], [0, 0, 50, 20]]))
    # PIL path agrees with the tensor path
    pil = Image.fromarray((img.permute(1, 2, 0).numpy() * 255).astype(np.uint8))
    pil_out, t2 = T.hflip(pil, target)
    np.testing.assert_array_equal(np.asarray(pil_out), np.asarray(pil)[:, ::-1])
    torch.testing.assert_close(t2["boxes"], t["boxes"])


def test_random_flip_probability():
    img, target = torch.rand(3, 4, 6), make_target([[0, 0, 1, 1]])
    assert torch.equal(T.RandomHorizontalFlip(1.0)(img, target)[0], img.flip(-1))
    assert torch.equal(T.RandomHorizontalFlip(0.0)(img, target)[0], img)


@pytest.mark.parametrize("hw,size,max_size,expect", [
    ((480, 640), 800, 1333, (800, 1066)),     # short side reaches 800
    ((200, 1000), 800, 1333, (266, 1330)),    # long side capped by max_size
    ((640, 480), 600, None, (800, 600)),      # portrait
    ((300, 300), 300, 1333, (300, 300)),      # already right: unchanged
])
def test_resize_keeps_ratio_and_max_size(hw, size, max_size, expect):
    h, w = hw
    img = Image.new("RGB", (w, h))
    target = make_target([[10, 20, 110, 120]])
    out, t = T.resize(img, target, size, max_size)
    assert (out.height, out.width) == expect
    assert t["size"].tolist() == list(expect)
    assert abs(out.width / out.height - w / h) < 2 / min(expect)  # aspect ratio up to 1 px
    if max_size is not None:
        assert max(out.height, out.width) <= max_size
    rw, rh = out.width / w, out.height / h
    torch.testing.assert_close(t["boxes"], torch.tensor([[10 * rw, 20 * rh, 110 * rw, 120 * rh]]))


def test_random_resize_many_shapes_respects_bounds():
    torch.manual_seed(0)
    rr = T.RandomResize([480, 640, 800], max_size=1000)
    for _ in range(30):
        h, w = (int(v) for v in torch.randint(50, 2000, (2,)))
        out, _ = rr(torch.zeros(3, h, w), None)
        oh, ow = out.shape[-2:]
        assert max(oh, ow) <= 1000
        # either the short side is one of the scales, or the long side was capped near max_size
        # (flooring the shrunken short side costs at most ratio + 1 pixels on the long side)
        assert min(oh, ow) in (480, 640, 800) or max(oh, ow) >= 1000 - max(h, w) / min(h, w) - 1
        assert abs(ow / oh - w / h) <= (w / h) * 2 / min(oh, ow)


def test_crop_functional_known_region():
    img = torch.arange(100.0).reshape(1, 10, 10).expand(3, 10, 10)
    target = make_target([[1, 1, 4, 4], [3, 3, 9, 9], [8, 0, 10, 2], [5, 5, 6, 6]], labels=[10, 11, 12, 13])
    out, t = T.crop(img, target, (2, 3, 5, 4))  # top=2, left=3, h=5, w=4
    torch.testing.assert_close(out, img[:, 2:7, 3:7])
    # shift by (-3, -2), clip to [0,4]x[0,5]; box 12 is outside the crop: removed with its label
    torch.testing.assert_close(t["boxes"], torch.tensor([[0.0, 0, 1, 2], [0, 1, 4, 5], [2, 3, 3, 4]]))
    assert t["labels"].tolist() == [10, 11, 13]
    assert t["iscrowd"].tolist() == [0, 0, 0]
    assert t["size"].tolist() == [5, 4]


def test_random_size_crop_keeps_boxes_inside():
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    crop = T.RandomSizeCrop(20, 60)
    for _ in range(50):
        xy = torch.rand(30, 2, generator=g) * 90
        wh = torch.rand(30, 2, generator=g) * 30 + 1
        target = make_target(torch.cat([xy, xy + wh], 1).tolist())
        img = torch.rand(3, 100, 120)
        out, t = crop(img, target)
        h, w = out.shape[-2:]
        assert 20 <= h <= 60 and 20 <= w <= 60
        assert t["size"].tolist() == [h, w]
        b = t["boxes"]
        assert len(b) == len(t["labels"]) == len(t["iscrowd"])
        assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all() and (b[:, 2] <= w).all() and (b[:, 3] <= h).all()
        assert ((b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])).all()


def _red_bbox(img: torch.Tensor):
    """Tight xyxy box (pixel-edge coordinates) of the pixels more red than grey, or None.
    R - G is 0 on the grey background and 1 on red; thresholding at the midpoint puts a
    resampled step edge back where it was (interpolation filters are symmetric)."""
    red = (img[0] - img[1]) > 0.5
    ys, xs = torch.nonzero(red, as_tuple=True)
    if len(xs) == 0:
        return None
    return [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


def test_full_train_policy_boxes_track_pixels():
    """A filled red rectangle on a grey image: after the full DETR train policy (flip, resize or
    resize-crop-resize), the transformed box must still be where the red pixels are."""
    policy = T.make_coco_transforms(True, scales=(96, 128, 160), max_size=240, crop_sizes=(48, 96),
                                    resize_before_crop=(80, 100, 120))
    policy.transforms = policy.transforms[:-1]  # drop Normalize to threshold colours directly
    x1, y1, x2, y2 = 118, 84, 146, 106  # near a corner, so some crops cut or miss it
    pil = Image.new("RGB", (160, 120), (128, 128, 128))
    ImageDraw.Draw(pil).rectangle([x1, y1, x2 - 1, y2 - 1], fill=(255, 0, 0))
    seen_crop_removal = seen_kept = 0
    for seed in range(60):
        torch.manual_seed(seed)
        out, t = policy(pil, make_target([[x1, y1, x2, y2]]))
        assert out.dtype == torch.float32 and tuple(out.shape[-2:]) == tuple(t["size"].tolist())
        red = _red_bbox(out)
        if len(t["boxes"]) == 0:
            seen_crop_removal += 1
            # only a blended sliver of red may remain at a crop border
            assert red is None or min(red[2] - red[0], red[3] - red[1]) <= 1
            continue
        seen_kept += 1
        assert red is not None
        np.testing.assert_allclose(t["boxes"][0].numpy(), red, atol=1.0)
    assert seen_kept > 20 and seen_crop_removal > 0


def test_normalize_and_eval_policy():
    pil = Image.new("RGB", (64, 48), (124, 116, 104))  # ~ ImageNet mean
    out, t = T.make_coco_transforms(False, scales=(96,), max_size=200)(pil, make_target([[0, 0, 64, 48]]))
    assert out.shape == (3, 96, 128)
    assert out.abs().max() < 0.02
    torch.testing.assert_close(t["boxes"], torch.tensor([[0.0, 0, 128, 96]]))  # absolute, not normalised


def test_collate_pads_and_masks():
    imgs = [torch.rand(3, 5, 7), torch.rand(3, 9, 4), torch.rand(3, 6, 6)]
    targets = [{"i": i} for i in range(3)]
    images, masks, tgts = collate(list(zip(imgs, targets)))
    assert images.shape == (3, 3, 9, 7) and masks.shape == (3, 9, 7) and masks.dtype == torch.bool
    assert tgts == targets
    for i, im in enumerate(imgs):
        h, w = im.shape[-2:]
        assert torch.equal(images[i, :, :h, :w], im)
        expect = torch.ones(9, 7, dtype=torch.bool)
        expect[:h, :w] = False
        assert torch.equal(masks[i], expect)
        assert images[i][:, masks[i]].abs().sum() == 0  # padding is zero
    images, masks, _ = collate(list(zip(imgs, targets)), size_divisibility=8)
    assert images.shape == (3, 3, 16, 8) and masks.shape == (3, 16, 8)
    assert masks[:, 9:, :].all() and masks[:, :, 7:].all()
    assert int((~masks).sum()) == sum(math.prod(im.shape[-2:]) for im in imgs)
