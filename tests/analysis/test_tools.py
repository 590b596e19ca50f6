"""The instability callback on a tiny run, and the `codetr analyze` commands end to end."""
import csv
import json
import sys

import pytest
import torch

from codetr.analysis import MatchingInstability, mean_instability
from codetr.cli import main
from codetr.data import ensure_synthetic_dataset
from codetr.engine import Trainer
from tiny_run import TINY, TINY_SETS, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return ensure_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), num_train=4, num_val=2,
                                    image_size=(64, 64), max_objects=3)


def _cfg(data, out, **kw):
    return tiny_config(data, out, **{"epochs": 2, **kw})


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    """A 2-epoch run (4 images, batch 2: 4 iterations) recording instability on 3 images."""
    out = tmp_path_factory.mktemp("run")
    cb = MatchingInstability(num_images=3)
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures run before the function-scoped one_thread
    try:
        trainer = Trainer(_cfg(data, out), callbacks=[cb])
        trainer.train()
    finally:
        torch.set_num_threads(n)
    return {"out": out, "callback": cb, "trainer": trainer}


def test_callback_records_one_row_per_epoch(run):
    out = run["out"]
    with open(out / "instability.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    saved = json.loads((out / "instability_assignments.json").read_text())
    assert sorted(saved["assignments"]) == ["0", "1", "2"]  # the untrained baseline, then each epoch
    assert len(saved["image_ids"]) == 3 and len(set(saved["image_ids"])) == 3
    per_epoch = [saved["assignments"][e] for e in ("0", "1", "2")]
    num_queries = TINY["num_queries"]
    for epoch in per_epoch:
        assert len(epoch) == 3 and all(len(a) == num_queries for a in epoch)
    # each image: its gts matched once each (every synthetic image has <= 3 < Q objects)
    ds = run["trainer"].train_set
    for image_id, a in zip(saved["image_ids"], per_epoch[-1]):
        num_gt = len(ds._targets[image_id][0])
        assert sorted(g for g in a if g >= 0) == list(range(num_gt))
    # IS recomputed from the raw assignments by counting differences directly
    for row, prev, cur in zip(rows, per_epoch, per_epoch[1:]):
        changed = [sum(p != c for p, c in zip(pa, ca)) for pa, ca in zip(prev, cur)]
        assert float(row["IS"]) == pytest.approx(sum(changed) / 3)
        assert float(row["IS"]) == pytest.approx(mean_instability(prev, cur))


def test_recording_is_deterministic_and_leaves_training_state_alone(run):
    trainer, cb = run["trainer"], run["callback"]
    trainer.model.train()
    rng = torch.get_rng_state()
    first = cb.record(trainer)
    assert trainer.model.training  # train mode restored
    assert torch.equal(torch.get_rng_state(), rng)  # the eval transform's draws did not leak
    assert cb.record(trainer) == first
    assert first == cb.assignments[2]  # same weights as at the end of epoch 2


def test_resume_keeps_the_earlier_epochs(data, run, tmp_path):
    import shutil

    out = tmp_path / "resumed"
    shutil.copytree(run["out"], out)
    cb = MatchingInstability(num_images=3)
    Trainer(_cfg(data, out, epochs=3, resume=True), callbacks=[cb]).train()
    with open(out / "instability.csv") as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["1", "2", "3"]
    assert cb.assignments[2] == run["callback"].assignments[2]


def test_cli_train_records_instability(data, tmp_path, capsys):
    args = ["train", "--train-json", str(data["train"]["ann_file"]), "--train-images",
            str(data["train"]["images_dir"]), "--out", str(tmp_path), "--epochs", "1", "--batch-size", "2",
            "--workers", "0", "--eval-every", "0", "--aux-heads", "",
            *TINY_SETS, "--record-instability", "2"]
    assert main(args) == 0
    with open(tmp_path / "instability.csv") as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["1"]
    assert main([*args[:-1], "-1"]) == 2
    assert "--record-instability" in capsys.readouterr().err


def test_cli_analyze_instability(run, tmp_path, capsys):
    out = tmp_path / "plots"
    assert main(["analyze", "instability", str(run["out"]), str(run["out"]), "--labels", "a", "b",
                 "--out", str(out)]) == 0
    with open(out / "instability.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["run"], r["epoch"]) for r in rows] == [("a", "1"), ("a", "2"), ("b", "1"), ("b", "2")]
    assert (out / "instability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # user mistakes: exit 2, a message, no traceback
    assert main(["analyze", "instability", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert main(["analyze", "instability", str(tmp_path), "--out", str(out)]) == 2  # no CSV there
    assert main(["analyze", "instability", str(run["out"]), "--labels", "a", "b", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "instability.csv" in err and "2 labels for 1 runs" in err and "Traceback" not in err


def test_cli_analyze_discriminability(run, data, tmp_path, capsys):
    out = tmp_path / "disc"
    ckpt = str(run["out"] / "last.pt")
    assert main(["analyze", "discriminability", "--checkpoint", ckpt, ckpt, "--labels", "x", "y",
                 "--json", str(data["val"]["ann_file"]), "--images", str(data["val"]["images_dir"]),
                 "--out", str(out), "--num-images", "2", "--num-overlays", "1"]) == 0
    with open(out / "curves.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 101 and {r["label"] for r in rows} == {"x", "y"}
    for r in rows:
        assert 0 <= float(r["IoF"]) <= 1 and 0 <= float(r["IoB"]) <= 1
    first = [r for r in rows if float(r["threshold"]) == 1.0]
    assert all(float(r["IoF"]) == 0 and float(r["IoB"]) == 0 for r in first)  # nothing exceeds 1
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert "curves.png" in pngs and len([p for p in pngs if p.startswith("overlay_")]) == 1
    assert "area under IoF(IoB)" in capsys.readouterr().out


def test_cli_analyze_mistakes_and_missing_matplotlib(run, data, tmp_path, capsys, monkeypatch):
    base = ["analyze", "discriminability", "--json", str(data["val"]["ann_file"]), "--images",
            str(data["val"]["images_dir"]), "--out", str(tmp_path)]
    assert main([*base, "--checkpoint", str(tmp_path / "none.pt")]) == 2
    bad = tmp_path / "bad.pt"
    torch.save({"model": {}}, bad)
    assert main([*base, "--checkpoint", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "none.pt" in err and "not a codetr training checkpoint" in err and "Traceback" not in err

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    assert main([*base, "--checkpoint", str(run["out"] / "last.pt")]) == 2
    assert main(["analyze", "instability", str(run["out"]), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("pip install codetr[analysis]") == 2 and "Traceback" not in err
