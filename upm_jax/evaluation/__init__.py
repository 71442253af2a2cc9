"""NumPy-only evaluation: features files, tracklet pooling, fusion of models' features,
CMC/mAP (paper and standard protocols), k-reciprocal re-ranking and pictures. Importable
without JAX or TensorFlow."""
from upm_jax.evaluation.distances import DISTANCES, pairwise_distances
from upm_jax.evaluation.features import (FeaturesError, load_features, montage_paths_file,
                                         save_features, save_frame_features, save_montage_paths,
                                         validate_features)
from upm_jax.evaluation.fusion import fuse_features
from upm_jax.evaluation.metrics import evaluate, evaluate_files, mean_results
from upm_jax.evaluation.plots import plot_cmc, plot_montage, rank_lists
from upm_jax.evaluation.pooling import (DegenerateFeaturesWarning, SpreadMeter, normalize_parts,
                                        pool_tracklets, tracklet_features)
from upm_jax.evaluation.rerank import k_reciprocal_distances

__all__ = [
    "DISTANCES", "DegenerateFeaturesWarning", "FeaturesError", "SpreadMeter",
    "evaluate", "evaluate_files", "fuse_features", "k_reciprocal_distances", "load_features",
    "mean_results", "montage_paths_file", "normalize_parts", "pairwise_distances", "plot_cmc",
    "plot_montage", "pool_tracklets", "rank_lists", "save_features", "save_frame_features",
    "save_montage_paths", "tracklet_features", "validate_features",
]
