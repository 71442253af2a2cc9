"""DAL on MARS: SGD 0.01 then 0.001, 100k steps, warm-up 1 epoch, 6 cameras, 224x112."""
from upm_jax.config import apply_shortcuts, get_base_config


def get_config(arg=None):
    config = get_base_config()
    config.method = "dal"
    config.data.layout = "mars"
    config.data.root = "data/MARS"
    config.data.num_cameras = 6
    config.data.image_size = 224
    config.model.pretrained = "weights/mobilenet_v1.npz"
    config.train.steps = 100000
    config.train.optimizer = "sgd"
    config.train.learning_rate = 0.01
    config.train.learning_rate_2 = 0.001
    config.train.warm_up_epochs = 1.0
    config.eval.frame_features = False
    return apply_shortcuts(config, arg)
