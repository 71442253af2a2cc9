"""Query-gallery distances: Euclidean (default) or cosine, from one float32 BLAS product."""
import numpy as np

DISTANCES = ("euclidean", "cosine")


def pairwise_distances(a, b, *, distance="euclidean", a_sqnorm=None, b_sqnorm=None,
                       squared=False):
    """Distances [n, m] float32 between rows of `a` [n, F] and `b` [m, F]; one BLAS product.

    Euclidean: sqrt(max(|a|^2 + |b|^2 - 2 a.b, 0)); cosine: max(1 - a.b / (|a||b|), 0).
    `a_sqnorm` [n] / `b_sqnorm` [m]: squared row norms, when already known. `squared=True`
    returns squared Euclidean distances (same ranking, one pass less).
    """
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
    a = np.asarray(a, dtype=np.float32)
    b = np.asarray(b, dtype=np.float32)
    prod = a @ b.T  # [n, m]
    a2 = np.einsum("nf,nf->n", a, a) if a_sqnorm is None else a_sqnorm
    b2 = np.einsum("mf,mf->m", b, b) if b_sqnorm is None else b_sqnorm
    if distance == "euclidean":
        prod *= -2.0
        prod += a2[:, None]
        prod += b2[None, :]
        np.maximum(prod, 0.0, out=prod)
        return prod if squared else np.sqrt(prod, out=prod)
    inv = 1.0 / np.maximum(np.sqrt(a2), 1e-12)
    prod *= inv[:, None]
    prod *= (1.0 / np.maximum(np.sqrt(b2), 1e-12))[None, :]
    np.subtract(1.0, prod, out=prod)
    return np.maximum(prod, 0.0, out=prod)
