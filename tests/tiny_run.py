"""A tiny Co-DETR training run on a synthetic dataset, shared by the trainer and analysis
tests: the model overrides, their --set form for the CLI, and a TrainConfig factory."""
from codetr.engine import TrainConfig

# d_model 64: GroupNorm(32) keeps 2 channels per group, so that it can normalise the 1 x 1
# maps (strides 64 and 128) of these 64-pixel images in training.
TINY = {"transformer.d_model": 64, "transformer.dim_feedforward": 64, "transformer.num_encoder_layers": 1,
        "transformer.num_decoder_layers": 2, "transformer.n_heads": 2, "transformer.n_points": 2,
        "num_queries": 20, "num_detections": 20, "backbone.pretrained": False,
        "data.train_scales": (64, 72), "data.max_size": 96, "data.crop_sizes": (40, 64),
        "data.resize_before_crop": (64,)}
#: TINY as `codetr train` arguments.
TINY_SETS = [a for k, v in TINY.items() for a in ("--set", f"{k}={v!r}")]


def tiny_config(data: dict, out, **fields) -> TrainConfig:
    """K=1 (ATSS) on ``data`` (``ensure_synthetic_dataset``'s dict), batch 2, no workers, no
    evaluation; ``fields`` override any TrainConfig field."""
    base = dict(train_json=str(data["train"]["ann_file"]), train_images=str(data["train"]["images_dir"]),
                out_dir=str(out), preset="co_deformable_detr_lite0", aux_heads=("atss",), overrides=dict(TINY),
                batch_size=2, num_workers=0, log_every=1, eval_every=0)
    return TrainConfig(**{**base, **fields})
