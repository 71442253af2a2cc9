"""Backbones (MobileNet v1, ResNet-50 v1 in TF-slim layout), DAL/LAM/GAM heads, registry and
pretrained-weight loading. See ``build_model`` and ``load_pretrained``."""
from upm_jax.models.heads import DALHead, GlobalHead, LocalHead, slim_avgpool, stripe_pool
from upm_jax.models.layers import BatchNorm, ConvBN
from upm_jax.models.mobilenet_v1 import MobileNetV1
from upm_jax.models.pretrained import PretrainedMismatchError, WeightsFileError, load_pretrained
from upm_jax.models.registry import BACKBONES, HEADS, MATMUL_PRECISIONS, ReidModel, build_model
from upm_jax.models.resnet_v1 import ResNetV1_50

__all__ = [
    "BACKBONES", "HEADS", "MATMUL_PRECISIONS", "BatchNorm", "ConvBN", "DALHead", "GlobalHead", "LocalHead",
    "MobileNetV1", "PretrainedMismatchError", "ReidModel", "ResNetV1_50", "WeightsFileError",
    "build_model", "load_pretrained", "slim_avgpool", "stripe_pool",
]
