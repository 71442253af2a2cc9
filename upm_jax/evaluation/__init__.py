"""NumPy-only evaluation: features files, tracklet pooling, CMC/mAP (paper and standard
protocols), k-reciprocal re-ranking and pictures. Importable without JAX or TensorFlow."""
from upm_jax.evaluation.distances import DISTANCES, pairwise_distances
from upm_jax.evaluation.features import FeaturesError, load_features, save_features, validate_features
from upm_jax.evaluation.metrics import evaluate, evaluate_files, mean_results
from upm_jax.evaluation.plots import plot_cmc, plot_montage, rank_lists
from upm_jax.evaluation.pooling import pool_tracklets, tracklet_features
from upm_jax.evaluation.rerank import k_reciprocal_distances

__all__ = [
    "DISTANCES", "FeaturesError", "evaluate", "evaluate_files", "k_reciprocal_distances",
    "load_features", "mean_results", "pairwise_distances", "plot_cmc", "plot_montage",
    "pool_tracklets", "rank_lists", "save_features", "tracklet_features", "validate_features",
]
