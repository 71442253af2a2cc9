"""Inference from what a run left: a model and its EMA variables restored from a checkpoint
alone (no ImageNet file, no training frames), and the features files written from them."""
import os

import jax

from upm_jax import checkpoint as checkpoint_lib
from upm_jax import experiment
from upm_jax import extract as extract_lib
from upm_jax import train as train_lib
from upm_jax.progress import say


def restore_inference(config, model_dir, mesh):
    """(model, variables) of the model trained in `model_dir` (DIR/split_K/<lam|gam|dal>)
    under the workdir's `config`: the EMA params, frozen params and BatchNorm statistics of
    its latest checkpoint, replicated on `mesh`, ready for `model.apply(variables, x)`."""
    name = os.path.basename(os.path.normpath(model_dir))
    if name not in experiment.HEAD_OF_FOLDER:
        raise experiment.ConfigError(
            f"{model_dir}: not a model folder; expected DIR/split_K/ followed by one of "
            f"{sorted(experiment.HEAD_OF_FOLDER)}")
    model = experiment.build_model(config, experiment.HEAD_OF_FOLDER[name])
    abstract = train_lib.abstract_variables(model, image_shape=experiment.image_shape(config),
                                            mesh=mesh)
    trained, frozen = train_lib.split_frozen(abstract["params"], model.frozen_scopes)
    target = {"ema_params": trained, "frozen_params": frozen,
              "batch_stats": abstract.get("batch_stats", {})}
    checkpoints = checkpoint_lib.Checkpoints(model_dir, read_only=True)
    try:
        restored = checkpoints.restore_inference(target)
    finally:
        checkpoints.close()
    return model, extract_lib.inference_variables(restored)


def extract_model(config, test_set, model_run, mesh):
    """Writes `<model dir>/features.npz` (and `.mat` files on request) from the checkpoint."""
    model, variables = restore_inference(config, model_run.directory, mesh)
    say(f"split {model_run.split} {model_run.name}: extracting {test_set.test.num_frames} "
        "test frames with the checkpoint's EMA weights")
    write_model_features(config, test_set, model, variables, model_run, "features", mesh)


def initial_features(config, test_set, model_run, mesh):
    """Features of the untrained network (its initial weights), for the before/after table.
    Kept once written: a resumed run does not extract them again."""
    path = os.path.join(model_run.directory, "initial_features.npz")
    if os.path.isfile(path):
        say(f"split {model_run.split} {model_run.name}: untrained network's features already "
            f"in {path}")
        return
    if config.model.pretrained:
        experiment.check_weights(config)
    model = experiment.build_model(config, model_run.head)
    variables = train_lib.init_variables(
        model, jax.random.PRNGKey(config.seed), image_shape=experiment.image_shape(config), mesh=mesh,
        pretrained=config.model.pretrained or None)
    os.makedirs(model_run.directory, exist_ok=True)
    say(f"split {model_run.split} {model_run.name}: extracting the untrained network's "
        "features")
    write_model_features(config, test_set, model, variables, model_run, "initial_features",
                         mesh)


def write_model_features(config, test_set, model, variables, model_run, stem, mesh):
    """`<model dir>/<stem>.npz`: per-frame features of every test frame, with their ids,
    streamed to disk as they are extracted; its montage paths file next to it."""
    path = os.path.join(model_run.directory, f"{stem}.npz")
    extract_lib.write_frame_features(
        model, variables, test_set, path, mesh=mesh, batch_size=experiment.extraction_batch(config, mesh),
        image_size=config.data.image_size, pooling=config.eval.pooling,
        desc=f"split {model_run.split} {model_run.name} {stem}")
    say(f"split {model_run.split} {model_run.name}: wrote {path}")
    if config.eval.save_mat and stem == "features":
        directory = os.path.join(model_run.directory, "mat")
        extract_lib.write_mat(directory, path, test_set, config.data.layout)
        say(f"split {model_run.split} {model_run.name}: wrote the MATLAB files in {directory}")
