"""uPMnet on DukeMTMC-VideoReID: SGD 4.5e-4 then 4.5e-5, 25k steps, 8 cameras."""
from upm_jax.config import apply_shortcuts, get_base_config


def get_config(arg=None):
    config = get_base_config()
    config.data.layout = "dukev"
    config.data.root = "data/DukeMTMC-VideoReID"
    config.data.num_cameras = 8
    config.model.pretrained = "weights/mobilenet_v1.npz"
    config.train.steps = 25000
    config.train.optimizer = "sgd"
    config.train.learning_rate = 4.5e-4
    config.train.learning_rate_2 = 4.5e-5
    config.train.warm_up_epochs = 1.0
    config.eval.frame_features = False
    return apply_shortcuts(config, arg)
