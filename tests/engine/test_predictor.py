"""Predictor: lists of images in batches give what each image gives alone."""
import pytest
import torch
from PIL import Image

from codetr.data.transforms import Compose, Normalize, RandomResize, ToTensor
from codetr.engine.predictor import Predictor
from detections import assert_same_detections, random_detector

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def images(shared_data):
    """A BCCD image and two crops of other shapes: after the eval resize they are 384 x 512,
    384 x 240 and 256 x 512, so a batch pads each to 384 x 512."""
    with Image.open(shared_data / "bccd" / "images" / "BloodImage_00000.jpg") as im:
        full = im.convert("RGB")
    return [full, full.crop((100, 50, 340, 434)), full.crop((0, 0, 640, 320))]


def test_batched_prediction_equals_one_image_at_a_time(images):
    """With our variants batch_invariant=True (features zeroed on padding) and
    encoder_head="agnostic" (padded tokens never selected), a batch's padding changes
    nothing: batches of 2 and 3 give each image's detections alone. (One content query for
    all: see random_detector.)"""
    detector = random_detector("deformable_detr_pp_lite0", batch_invariant=True, encoder_head="agnostic")
    transform = Compose([RandomResize([384], max_size=512), ToTensor(), Normalize()])
    alone = Predictor(detector, ["RBC", "WBC", "Platelets"], transform, size_divisibility=32)
    expected = [alone.predict(im) for im in images]
    assert isinstance(expected[0], dict) and len(expected[0]["class_names"]) == len(expected[0]["labels"])
    for batch_size in (2, 3):
        batched = Predictor(detector, ["RBC", "WBC", "Platelets"], transform, batch_size=batch_size,
                            size_divisibility=32)
        got = batched.predict(images)
        assert isinstance(got, list) and len(got) == len(images)
        for e, g in zip(expected, got):
            assert_same_detections(e, g, box_atol=1e-3, score_atol=1e-5)
    with pytest.raises(ValueError, match="batch_size: expected >= 1, got 0"):
        Predictor(detector, [], transform, batch_size=0)
