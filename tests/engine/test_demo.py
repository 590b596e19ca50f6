"""The demo's pipeline end to end at a tiny size: both models train and evaluate, and it
leaves the table, the curves and the side-by-side predictions it promises."""
import json

from PIL import Image

from codetr import demo


def test_demo_leaves_its_table_curves_and_pictures(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "NUM_TRAIN", 8)
    monkeypatch.setattr(demo, "NUM_VAL", 3)
    monkeypatch.setattr(demo, "TRAIN", {**demo.TRAIN, "batch_size": 2})
    assert demo.main(str(tmp_path), iters=8) == 0  # two epochs

    rows = json.loads((tmp_path / "summary.json").read_text())
    assert [r["model"] for r in rows] == list(demo.VARIANTS)
    for r in rows:
        assert all(-1 <= r[k] <= 1 for k in demo.METRICS) and r["s_per_iter"] > 0
    table = (tmp_path / "results.md").read_text().splitlines()
    assert len(table) == 2 + len(rows) and all(name in "\n".join(table) for name in demo.VARIANTS)
    for run in ("k0", "k2"):  # a validation point on each curve, and the final one
        evals = [json.loads(l) for l in (tmp_path / run / "log.jsonl").read_text().splitlines() if '"eval"' in l]
        assert [e["iter"] for e in evals] == [4, 8]
    with Image.open(tmp_path / "curves.png") as im:
        assert im.width > 500
    pictures = sorted((tmp_path / "predictions").glob("*.png"))
    assert len(pictures) == 3  # NUM_VAL < 4: every validation image
    with Image.open(pictures[0]) as im:  # ground truth | K=0 | K=2, each at 2x
        assert im.width == 3 * 2 * demo.IMAGE_SIZE and im.height > 2 * demo.IMAGE_SIZE
