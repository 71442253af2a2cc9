"""uPMnet on PRID2011 (design.md §5): RMSProp, 20k steps, warm-up 2 epochs, 2 cameras."""
from configs import base


def get_config(arg=None):
    config = base.get_base_config()
    config.data.layout = "prid2011"
    config.data.root = "data/prid_2011"
    config.data.num_cameras = 2
    config.data.resident = True
    config.model.pretrained = "weights/mobilenet_v1.npz"
    config.train.steps = 20000
    config.train.optimizer = "rmsprop"
    config.train.warm_up_epochs = 2.0
    return base.apply_shortcuts(config, arg)
