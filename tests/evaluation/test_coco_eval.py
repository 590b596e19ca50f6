import contextlib
import io
import json

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from codetr.evaluation import CocoEvaluator

KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


@pytest.fixture(scope="module")
def val(shared_data):
    root = shared_data / "coco-mini"
    ann = root / "instances_val2017.json"
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(ann))
    data = json.loads(ann.read_text())
    cats = sorted(c["id"] for c in data["categories"])
    return coco, data, {i: c for i, c in enumerate(cats)}, ann


def gt_predictions(data, label_to_cat):
    """Non-crowd ground truth as xyxy predictions with score 1, straight from the json."""
    cat_to_label = {c: l for l, c in label_to_cat.items()}
    preds = {im["id"]: {"boxes": [], "scores": [], "labels": []} for im in data["images"]}
    for a in data["annotations"]:
        if a["iscrowd"]:
            continue
        x, y, w, h = a["bbox"]
        p = preds[a["image_id"]]
        p["boxes"].append([x, y, x + w, y + h])
        p["scores"].append(1.0)
        p["labels"].append(cat_to_label[a["category_id"]])
    return {k: {n: torch.tensor(v, dtype=torch.float64 if n != "labels" else torch.int64).reshape(-1, 4)
                if n == "boxes" else torch.tensor(v) for n, v in p.items()} for k, p in preds.items()}


def test_ground_truth_scores_perfect(val):
    coco, data, l2c, _ = val
    ev = CocoEvaluator(coco, l2c)
    ev.update(gt_predictions(data, l2c))
    s = ev.summarize()
    assert s["AP"] == s["AP50"] == s["AP75"] == 1.0
    for k in ("APs", "APm", "APl"):
        assert s[k] in (1.0, -1.0)
    names_with_gt = {coco.cats[a["category_id"]]["name"] for a in data["annotations"] if not a["iscrowd"]}
    assert len(s["per_class"]) == 80
    for name, ap in s["per_class"].items():
        assert ap == pytest.approx(1.0 if name in names_with_gt else -1.0, abs=1e-12), name
    table = ev.format_table()
    assert "AP50" in table and "person" in table


def _perturbed(data, l2c, seed):
    """Ground truth with jitter, wrong labels, misses, false positives and random scores.
    Returns (predictions for the evaluator, the same detections as a COCO results list)."""
    rng = np.random.default_rng(seed)
    preds, results = {}, []
    sizes = {im["id"]: (im["width"], im["height"]) for im in data["images"]}
    by_img = {im["id"]: [] for im in data["images"]}
    for a in data["annotations"]:
        by_img[a["image_id"]].append(a)
    for img_id, anns in by_img.items():
        boxes, scores, labels = [], [], []
        for a in anns:
            if rng.random() < 0.15:
                continue  # missed
            x, y, w, h = a["bbox"]
            jit = rng.normal(0, 0.08, 4) * [w, h, w, h]
            boxes.append([x + jit[0], y + jit[1], x + w + jit[2], y + h + jit[3]])
            labels.append(int(rng.integers(80)) if rng.random() < 0.1 else
                          next(l for l, c in l2c.items() if c == a["category_id"]))
            scores.append(float(rng.random()))
        W, H = sizes[img_id]
        for _ in range(int(rng.integers(0, 4))):  # false positives
            x, y = rng.uniform(0, W - 20), rng.uniform(0, H - 20)
            boxes.append([x, y, x + rng.uniform(5, 200), y + rng.uniform(5, 200)])
            labels.append(int(rng.integers(80)))
            scores.append(float(rng.random()))
        preds[img_id] = {"boxes": np.array(boxes, dtype=np.float64).reshape(-1, 4),
                         "scores": np.array(scores), "labels": np.array(labels, dtype=np.int64)}
        for b, s, l in zip(boxes, scores, labels):
            results.append({"image_id": img_id, "category_id": l2c[l],
                            "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "score": s})
    return preds, results


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_pycocotools_directly(val, seed, tmp_path):
    coco, data, l2c, ann = val
    preds, results = _perturbed(data, l2c, seed)
    ev = CocoEvaluator(coco, l2c)
    # feed in two chunks, as an eval loop over batches would
    ids = list(preds)
    ev.update({i: preds[i] for i in ids[:10]})
    ev.update({i: preds[i] for i in ids[10:]})
    s = ev.summarize()

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann))  # fresh gt object: independent of the evaluator's
        ref = COCOeval(gt, gt.loadRes(results), iouType="bbox")
        ref.evaluate()
        ref.accumulate()
        ref.summarize()
    got = [s[k] for k in KEYS]
    np.testing.assert_allclose(got, ref.stats[:6], rtol=0, atol=1e-12)
    assert 0.1 < s["AP"] < 0.95  # the perturbation is neither trivial nor destructive

    # per-class AP from the reference's precision array
    prec = ref.eval["precision"]
    for k, cat_id in enumerate(ref.params.catIds):
        p = prec[:, :, k, 0, -1]
        expect = p[p > -1].mean() if (p > -1).any() else -1.0
        assert s["per_class"][gt.cats[cat_id]["name"]] == pytest.approx(expect, abs=1e-12)

    # the results file is a valid COCO results json with the same detections
    path = ev.write_results(tmp_path / "res.json")
    written = json.loads(path.read_text())
    assert len(written) == len(results)
    assert set(written[0]) == {"image_id", "category_id", "bbox", "score"}
    with contextlib.redirect_stdout(io.StringIO()):
        ref2 = COCOeval(gt, gt.loadRes(str(path)), iouType="bbox")
        ref2.evaluate()
        ref2.accumulate()
        ref2.summarize()
    np.testing.assert_allclose(ref2.stats[:6], ref.stats[:6], atol=1e-9)


def test_empty_predictions_do_not_crash(val, capsys):
    coco, data, l2c, _ = val
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}
    ev = CocoEvaluator(coco, l2c)
    ev.update({im["id"]: empty for im in data["images"]})
    s = ev.summarize()
    assert all(s[k] == 0.0 for k in KEYS)  # objects exist in every area bucket, none found
    assert set(s["per_class"].values()) == {0.0, -1.0}
    assert capsys.readouterr().out == ""  # verbose=False: pycocotools kept quiet
    # nothing ever passed: all images evaluated, still no crash
    assert CocoEvaluator(coco, l2c).summarize()["AP"] == 0.0


def test_only_updated_images_are_evaluated(val, capsys):
    coco, data, l2c, _ = val
    preds = gt_predictions(data, l2c)
    some = dict(list(preds.items())[:5])
    ev = CocoEvaluator(coco, l2c, verbose=True)
    ev.update(some)
    assert ev.summarize()["AP"] == 1.0  # images never seen don't count as misses
    assert "Average Precision" in capsys.readouterr().out
    # an image passed with no detections does count as misses
    first = next(i for i, p in preds.items() if len(p["boxes"]))
    ev2 = CocoEvaluator(coco, l2c)
    ev2.update({**some, first: {"boxes": np.zeros((0, 4)), "scores": [], "labels": []}})
    assert ev2.summarize()["AP"] < 1.0
