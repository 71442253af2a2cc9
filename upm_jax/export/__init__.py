"""Export a finished workdir's feature extractor for deployment, as one artifact plus a
JSON file beside it (`PATH.json`) that states its input contract, output layout, the
evaluation rule, where the weights came from and the parity measured at export:

    python -m upm_jax.export --workdir DIR --format stablehlo|onnx|savedmodel --out PATH

Every artifact takes uint8 RGB frames [N, H, W, 3] at the config's size and returns the
float32 per-frame features [N, P, D] that `--mode extract` computes (for `upm`, LAM and
GAM concatenated per part). Modules: `artifact` (write, check, describe and open one
artifact), one per format: `stablehlo` (jax.export), `onnx_graph` (ONNX, written node by
node), `savedmodel` (TensorFlow, through jax2tf). docs/export.md has the details.
"""
from upm_jax.export.artifact import FORMATS, ExportError, export, open_artifact

__all__ = ["FORMATS", "ExportError", "export", "open_artifact"]
