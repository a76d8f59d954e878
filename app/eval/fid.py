"""The Fréchet distance between Gaussians fitted to feature sets (Heusel et al. 2017), numpy only.

d^2 = ||mu_1 - mu_2||^2 + tr(S_1) + tr(S_2) - 2 tr((S_1 S_2)^(1/2)),
with tr((S_1 S_2)^(1/2)) = tr((S_1^(1/2) S_2 S_1^(1/2))^(1/2)): the matrix under the root is
symmetric positive semi-definite, so both roots come from symmetric eigendecompositions (eigh),
with no complex parts to discard as scipy.linalg.sqrtm leaves them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class GaussianStats:
    """Mean and (unbiased) covariance of n feature vectors."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int


def gaussian_stats(features: np.ndarray) -> GaussianStats:
    """Fit mu and sigma to features [n, d] (n >= 2), in float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"need at least 2 feature vectors of shape [n, d], got {f.shape}")
    return GaussianStats(mu=f.mean(0), sigma=np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1]), n=len(f))


def sqrtm_psd(a: np.ndarray) -> np.ndarray:
    """The symmetric square root of a symmetric PSD matrix (negative round-off eigenvalues -> 0)."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def trace_sqrt_product(s1: np.ndarray, s2: np.ndarray) -> float:
    """tr((S_1 S_2)^(1/2)) as the sum of sqrt-eigenvalues of S_1^(1/2) S_2 S_1^(1/2)."""
    r = sqrtm_psd(s1)
    m = r @ s2 @ r
    w = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(w, 0, None)).sum())


def frechet_distance(a: GaussianStats, b: GaussianStats) -> float:
    """d^2 between N(mu_a, S_a) and N(mu_b, S_b); clipped at 0 against round-off."""
    diff = a.mu - b.mu
    d2 = diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2 * trace_sqrt_product(a.sigma, b.sigma)
    return max(float(d2), 0.0)


def fid(features_a: np.ndarray, features_b: np.ndarray | GaussianStats) -> float:
    """FID between two feature sets (or a feature set and precomputed reference statistics)."""
    ref = features_b if isinstance(features_b, GaussianStats) else gaussian_stats(features_b)
    return frechet_distance(gaussian_stats(features_a), ref)
