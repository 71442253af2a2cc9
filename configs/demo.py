"""The CPU demo: a synthetic PRID2011-layout set (generated into the workdir), a small
MobileNet v1 trained from scratch, features, and the before/after evaluation table.

    python -m upm_jax.main --config configs/demo.py --workdir /tmp/demo
"""
from upm_jax.config import apply_shortcuts, get_base_config


def get_config(arg=None):
    config = get_base_config()
    config.method = "upm_local"
    config.data.layout = "prid2011"
    config.data.root = "{workdir}/synthetic_prid2011"
    config.data.split_file = "{workdir}/synthetic_prid2011/prid2011_splits.json"
    config.data.synthetic_ids = 60
    config.data.num_cameras = 2
    config.data.image_size = 128     # the generated frames' own size
    config.data.resident = True
    config.model.depth_multiplier = 0.25
    config.model.n_part = 2
    # 600 steps are too few for slim's BN decay (0.9997^600 = 0.84: the moving statistics
    # would still be mostly their initial 0/1 at extraction).
    config.model.bn_decay = 0.95
    config.model.allow_scratch = True
    config.model.pretrained = ""
    config.train.steps = 600
    # From scratch the association needs a larger step than the papers' 0.045 (which
    # starts from ImageNet weights); with 0.045 the demo gains only about 10 Rank-1 points.
    config.train.learning_rate = 0.15
    config.train.batch_size = 64
    config.train.checkpoint_every = 200
    config.train.log_every = 50
    config.eval.initial = True
    return apply_shortcuts(config, arg)
