import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from codetr.data import CocoDetection

BCCD_SPLITS = {"train": 205, "val": 87, "test": 72}
COCO_MINI = {"train2017": 26, "val2017": 25}


def count_valid_boxes(ann_file, include_crowd=False):
    """Independent count, plain json: non-crowd boxes with positive area inside the image."""
    data = json.loads(open(ann_file).read())
    sizes = {im["id"]: (im["width"], im["height"]) for im in data["images"]}
    n = 0
    for a in data["annotations"]:
        if a.get("iscrowd", 0) and not include_crowd:
            continue
        x, y, w, h = a["bbox"]
        W, H = sizes[a["image_id"]]
        if w <= 0 or h <= 0:
            continue
        if min(x + w, W) - max(x, 0) > 0 and min(y + h, H) - max(y, 0) > 0:
            n += 1
    return n, len(data["images"]), data


def dataset_box_count(ds):
    return sum(len(ds._targets[i][0]) for i in ds.ids)


@pytest.mark.parametrize("split,n_images", BCCD_SPLITS.items())
def test_bccd_counts(shared_data, split, n_images):
    root = shared_data / "bccd"
    ds = CocoDetection(root / "images", root / f"{split}.json")
    n_boxes, n_json_images, _ = count_valid_boxes(root / f"{split}.json")
    assert len(ds) == n_images == n_json_images
    assert dataset_box_count(ds) == n_boxes
    assert ds.class_names == ["RBC", "WBC", "Platelets"]
    assert ds.label_to_cat_id == {0: 1, 1: 2, 2: 3}


@pytest.mark.parametrize("split,n_images", COCO_MINI.items())
def test_coco_mini_counts_and_mapping(shared_data, split, n_images):
    root = shared_data / "coco-mini"
    ann = root / f"instances_{split}.json"
    ds = CocoDetection(root / split, ann)
    n_boxes, n_json_images, data = count_valid_boxes(ann)
    assert len(ds) == n_images == n_json_images  # images without annotations are kept
    assert dataset_box_count(ds) == n_boxes
    # mapping: contiguous, sorted by category id, names from the file, round-trips
    cats = sorted(data["categories"], key=lambda c: c["id"])
    assert ds.num_classes == 80
    assert [ds.label_to_cat_id[i] for i in range(80)] == [c["id"] for c in cats]
    assert ds.class_names == [c["name"] for c in cats]
    for label, cat_id in ds.label_to_cat_id.items():
        assert ds.cat_id_to_label[cat_id] == label
    # eval mode keeps crowd regions, flagged
    ds_eval = CocoDetection(root / split, ann, train=False)
    n_all, _, _ = count_valid_boxes(ann, include_crowd=True)
    assert dataset_box_count(ds_eval) == n_all
    n_crowd = sum(int(ds_eval._targets[i][2].sum()) for i in ds_eval.ids)
    assert n_crowd == sum(a["iscrowd"] for a in data["annotations"])


def test_coco_mini_item_matches_json(shared_data):
    root = shared_data / "coco-mini"
    ann = root / "instances_val2017.json"
    ds = CocoDetection(root / "val2017", ann)
    data = json.loads(ann.read_text())
    by_id = {im["id"]: im for im in data["images"]}
    # the image with most annotations: a demanding one
    counts = {}
    for a in data["annotations"]:
        counts[a["image_id"]] = counts.get(a["image_id"], 0) + 1
    img_id = max(counts, key=counts.get)
    image, target = ds[ds.ids.index(img_id)]
    info = by_id[img_id]
    assert image.dtype == torch.float32 and image.shape == (3, info["height"], info["width"])
    assert 0.0 <= image.min() and image.max() <= 1.0
    assert target["image_id"] == img_id
    assert target["orig_size"].tolist() == [info["height"], info["width"]]
    assert target["size"].tolist() == [info["height"], info["width"]]
    expect = [(a["bbox"], a["category_id"]) for a in data["annotations"]
              if a["image_id"] == img_id and not a["iscrowd"]]
    assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64
    assert len(target["boxes"]) == len(expect)
    for box, label, (bbox, cat_id) in zip(target["boxes"], target["labels"], expect):
        x, y, w, h = bbox
        np.testing.assert_allclose(box.numpy(), [x, y, min(x + w, info["width"]), min(y + h, info["height"])],
                                   atol=1e-3)
        assert ds.label_to_cat_id[int(label)] == cat_id


def _write_dataset(tmp_path, annotations, size=(40, 30), make_image=True):
    w, h = size
    (tmp_path / "imgs").mkdir()
    if make_image:
        Image.new("RGB", (w, h), (10, 20, 30)).save(tmp_path / "imgs" / "a.png")
    data = {"images": [{"id": 7, "file_name": "a.png", "width": w, "height": h}],
            "annotations": annotations,
            "categories": [{"id": 5, "name": "five"}, {"id": 2, "name": "two"}]}
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(data))
    return tmp_path / "imgs", ann


def test_invalid_boxes_dropped_with_one_warning_and_clipped(tmp_path):
    mk = lambda i, bbox, **kw: {"id": i, "image_id": 7, "category_id": 5, "bbox": bbox, "iscrowd": 0, **kw}  # noqa: E731
    anns = [
        mk(1, [1, 2, 10, 5]),                 # fine
        mk(2, [3, 3, 0, 5]),                  # zero width
        mk(3, [3, 3, 4, -1]),                 # negative height
        mk(4, [50, 5, 10, 10]),               # right of the 40-px-wide image
        mk(5, [-20, -20, 5, 5]),              # above-left of the image
        mk(6, [35, 25, 10, 10], category_id=2),  # partially outside: clipped
        mk(7, [0, 0, 5, 5], iscrowd=1),       # crowd: excluded, not "invalid"
    ]
    imgs, ann = _write_dataset(tmp_path, anns)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        ds = CocoDetection(imgs, ann)
    msgs = [str(r.message) for r in rec]
    assert len(msgs) == 1 and "dropped 4 invalid boxes" in msgs[0], msgs
    _, t = ds[0]
    torch.testing.assert_close(t["boxes"], torch.tensor([[1.0, 2.0, 11.0, 7.0], [35.0, 25.0, 40.0, 30.0]]))
    # category ids 2, 5 -> labels 0, 1 (sorted by id)
    assert t["labels"].tolist() == [1, 0]
    assert ds.class_names == ["two", "five"]


def test_missing_image_names_file(tmp_path):
    imgs, ann = _write_dataset(tmp_path, [], make_image=False)
    ds = CocoDetection(imgs, ann)
    with pytest.raises(FileNotFoundError, match="a.png"):
        ds[0]


def test_malformed_or_missing_json_names_file(tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text('{"images": [')
    with pytest.raises(ValueError, match="broken.json"):
        CocoDetection(tmp_path, bad)
    no_images = tmp_path / "noimages.json"
    no_images.write_text('{"annotations": [], "categories": []}')
    with pytest.raises(ValueError, match="noimages.json"):
        CocoDetection(tmp_path, no_images)
    with pytest.raises(FileNotFoundError, match="absent.json"):
        CocoDetection(tmp_path, tmp_path / "absent.json")
