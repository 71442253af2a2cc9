"""Query-gallery distances: Euclidean (default) or cosine, from one float32 BLAS product."""
import numpy as np

DISTANCES = ("euclidean", "cosine")


def pairwise_distances(a, b, *, distance="euclidean", a_sqnorm=None, b_sqnorm=None,
                       squared=False):
    """Distances [n, m] float32 between rows of `a` [n, F] and `b` [m, F]; one BLAS product.

    Euclidean: sqrt(max(|a|^2 + |b|^2 - 2 a.b, 0)); cosine: max(1 - a.b / (|a||b|), 0), where a
    zero row has cosine distance 1 to everything.
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
    prod *= _inverse_norms(a2)[:, None]
    prod *= _inverse_norms(b2)[None, :]
    np.subtract(1.0, prod, out=prod)
    return np.maximum(prod, 0.0, out=prod)


def _inverse_norms(sqnorm):
    """1 / |x| from squared norms, 0 for zero rows (any nonzero norm counts, however small)."""
    norms = np.sqrt(np.asarray(sqnorm, dtype=np.float32))
    return np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
