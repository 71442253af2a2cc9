"""uPMnet on iLIDS-VID: RMSProp, 15k steps, warm-up 2 epochs, 2 cameras."""
from upm_jax.config import apply_shortcuts, get_base_config


def get_config(arg=None):
    config = get_base_config()
    config.data.layout = "ilidsvid"
    config.data.root = "data/i-LIDS-VID"
    config.data.num_cameras = 2
    config.data.resident = True
    config.model.pretrained = "weights/mobilenet_v1.npz"
    config.train.steps = 15000
    config.train.optimizer = "rmsprop"
    config.train.warm_up_epochs = 2.0
    return apply_shortcuts(config, arg)
