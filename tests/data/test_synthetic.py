import contextlib
import io

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from codetr.data import SYNTHETIC_CLASSES, CocoDetection, ensure_synthetic_dataset, generate_synthetic_coco
from codetr.data.synthetic import _shape_mask


def _pixels(ann_file):
    return [np.asarray(Image.open(p)) for p in sorted((ann_file.parent / "images").glob("*.png"))]


def test_deterministic_and_seed_dependent(tmp_path):
    a = generate_synthetic_coco(tmp_path / "a", 6, image_size=(96, 128), seed=3)
    b = generate_synthetic_coco(tmp_path / "b", 6, image_size=(96, 128), seed=3)
    c = generate_synthetic_coco(tmp_path / "c", 6, image_size=(96, 128), seed=4)
    assert a.read_bytes() == b.read_bytes()
    pa, pb, pc = _pixels(a), _pixels(b), _pixels(c)
    assert len(pa) == 6 and all(np.array_equal(x, y) for x, y in zip(pa, pb))
    assert a.read_bytes() != c.read_bytes()
    assert not any(np.array_equal(x, y) for x, y in zip(pa, pc))


def test_valid_coco_boxes_inside_all_classes(tmp_path):
    h, w = 128, 160
    ann = generate_synthetic_coco(tmp_path, 20, image_size=(h, w), seed=0, max_objects=6)
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(ann))
    assert len(coco.getImgIds()) == 20
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(SYNTHETIC_CLASSES)
    assert len(SYNTHETIC_CLASSES) >= 4
    per_image = [len(coco.getAnnIds(imgIds=i)) for i in coco.getImgIds()]
    assert min(per_image) >= 1 and max(per_image) <= 6
    anns = coco.loadAnns(coco.getAnnIds())
    assert len({a["id"] for a in anns}) == len(anns)
    assert {a["category_id"] for a in anns} == set(coco.getCatIds())
    sides = []
    for a in anns:
        x, y, bw, bh = a["bbox"]
        assert x >= 0 and y >= 0 and x + bw <= w and y + bh <= h and bw > 0 and bh > 0
        assert a["iscrowd"] == 0 and 0 < a["area"] <= bw * bh
        sides.append(max(bw, bh))
    assert min(sides) <= 12 and max(sides) >= 0.35 * min(h, w)  # tiny to large
    for im in coco.loadImgs(coco.getImgIds()):
        with Image.open(ann.parent / "images" / im["file_name"]) as pil:
            assert pil.size == (w, h) and pil.mode == "RGB"
    # the dataset class reads it without dropping anything
    ds = CocoDetection(ann.parent / "images", ann)
    assert sum(len(ds[i][1]["boxes"]) for i in range(len(ds))) == len(anns)


@pytest.mark.parametrize("cls", SYNTHETIC_CLASSES)
@pytest.mark.parametrize("box", [(3, 4, 10, 11), (10, 5, 49, 30), (0, 0, 63, 47)])
def test_each_shape_fills_its_box(cls, box):
    """Every shape touches all four sides of the box it is drawn in (so the stored tight box
    equals the sampled box and object sizes span what was asked), and leaves no pixel outside."""
    rng = np.random.default_rng(0)
    mask = _shape_mask(cls, 48, 64, box, rng)
    ys, xs = np.nonzero(mask)
    assert (xs.min(), ys.min(), xs.max(), ys.max()) == box
    x0, y0, x1, y1 = box
    assert 0.2 * (x1 - x0 + 1) * (y1 - y0 + 1) < mask.sum() <= (x1 - x0 + 1) * (y1 - y0 + 1)


def test_ensure_reuses(tmp_path):
    splits = ensure_synthetic_dataset(tmp_path, num_train=3, num_val=2, image_size=(64, 64))
    stamp = {k: v["ann_file"].stat().st_mtime_ns for k, v in splits.items()}
    again = ensure_synthetic_dataset(tmp_path, num_train=3, num_val=2, image_size=(64, 64))
    assert again == splits
    assert {k: v["ann_file"].stat().st_mtime_ns for k, v in again.items()} == stamp
    assert len(CocoDetection(**splits["train"])) == 3 and len(CocoDetection(**splits["val"])) == 2
    # train and val differ
    assert splits["train"]["ann_file"].read_bytes() != splits["val"]["ann_file"].read_bytes()
    # different parameters regenerate
    bigger = ensure_synthetic_dataset(tmp_path, num_train=4, num_val=2, image_size=(64, 64))
    assert len(CocoDetection(**bigger["train"])) == 4
