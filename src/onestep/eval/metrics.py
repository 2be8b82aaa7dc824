"""Sample-quality metrics on feature vectors: FID, Inception score, precision/recall, accuracy, PPL.

All statistics are computed in float64 (numpy / torch). Feature extractors live in classifier.py
(``fid_classifier``: the project's own Fashion-MNIST classifier) and inception.py (``fid_inception``).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import scipy.linalg
import torch

from onestep import rng


# ---- Fréchet distance -----------------------------------------------------------------------------------
def feature_stats(features: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of an (N, D) feature matrix, float64, sigma with the unbiased (N - 1) normalisation."""
    f = np.asarray(features.detach().cpu() if isinstance(features, torch.Tensor) else features, dtype=np.float64)
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)).

    tr((S1 S2)^(1/2)) is computed as the sum of square roots of the eigenvalues of
    S1^(1/2) S2 S1^(1/2) (symmetric PSD, so an eigendecomposition is stable and exact up to rounding);
    tiny negative eigenvalues from rounding are clipped to 0.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    w1, v1 = np.linalg.eigh((s1 + s1.T) / 2)
    root1 = (v1 * np.sqrt(np.clip(w1, 0, None))) @ v1.T
    m = root1 @ s2 @ root1
    ev = np.linalg.eigvalsh((m + m.T) / 2)
    tr_covmean = np.sqrt(np.clip(ev, 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def frechet_distance_scipy(mu1, sigma1, mu2, sigma2) -> float:
    """The reference formula with scipy.linalg.sqrtm (as pytorch-fid); used to check :func:`frechet_distance`."""
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid_from_features(f1, f2) -> float:
    return frechet_distance(*feature_stats(f1), *feature_stats(f2))


# ---- Inception score ------------------------------------------------------------------------------------
def inception_score(logits: torch.Tensor | np.ndarray, splits: int = 1) -> float:
    """exp(E_x KL(p(y|x) || p(y))), averaged over ``splits`` equal chunks (mean of the chunk scores)."""
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    scores = []
    for chunk in torch.chunk(logits, splits):
        logp = torch.log_softmax(chunk, -1)
        logpy = torch.logsumexp(logp, 0) - np.log(len(chunk))
        kl = (logp.exp() * (logp - logpy)).sum(-1).mean()
        scores.append(kl.exp().item())
    return float(np.mean(scores))


# ---- precision / recall (Kynkäänniemi et al. 2019) -------------------------------------------------------
def _pairwise_dist(a: torch.Tensor, b: torch.Tensor, batch: int = 2048) -> torch.Tensor:
    return torch.cat([torch.cdist(a[i:i + batch], b) for i in range(0, len(a), batch)])


def _knn_radii(f: torch.Tensor, k: int) -> torch.Tensor:
    """Distance of every point to its k-th nearest neighbour in the same set (itself excluded)."""
    radii = []
    for i in range(0, len(f), 2048):
        d = torch.cdist(f[i:i + 2048], f)
        radii.append(d.kthvalue(k + 1, dim=1).values)  # k + 1: the point itself is at distance 0
    return torch.cat(radii)


def _coverage(query: torch.Tensor, ref: torch.Tensor, radii: torch.Tensor) -> float:
    """Fraction of query points inside the union of k-NN balls of the reference manifold."""
    inside = []
    for i in range(0, len(query), 2048):
        d = torch.cdist(query[i:i + 2048], ref)
        inside.append((d <= radii[None]).any(1))
    return torch.cat(inside).double().mean().item()


def precision_recall(real, fake, k: int = 3) -> tuple[float, float]:
    """Improved precision (fake inside the real manifold) and recall (real inside the fake manifold)."""
    real = torch.as_tensor(np.asarray(real), dtype=torch.float32)
    fake = torch.as_tensor(np.asarray(fake), dtype=torch.float32)
    precision = _coverage(fake, real, _knn_radii(real, k))
    recall = _coverage(real, fake, _knn_radii(fake, k))
    return precision, recall


# ---- class accuracy --------------------------------------------------------------------------------------
def class_accuracy(logits, labels) -> float:
    """Fraction of samples the classifier assigns to the class they were generated for."""
    logits, labels = torch.as_tensor(np.asarray(logits)), torch.as_tensor(np.asarray(labels))
    return (logits.argmax(-1) == labels).double().mean().item()


# ---- perceptual path length ---------------------------------------------------------------------------------
def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation per sample (StyleGAN's z-space interpolation), over all non-batch dims."""
    af, bf = a.flatten(1), b.flatten(1)
    an, bn = af / af.norm(dim=1, keepdim=True), bf / bf.norm(dim=1, keepdim=True)
    omega = torch.acos((an * bn).sum(1).clamp(-1 + 1e-7, 1 - 1e-7))[:, None]
    t = t.reshape(-1, 1)
    so = torch.sin(omega)
    out = (torch.sin((1 - t) * omega) / so) * af + (torch.sin(t * omega) / so) * bf
    return out.reshape(a.shape)


@torch.no_grad()
def perceptual_path_length(generate: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], noise_shape: tuple,
                           labels: torch.Tensor, feature_fn: Callable[[torch.Tensor], torch.Tensor],
                           epsilon: float = 1e-4, seed: int = 0, batch_size: int = 100) -> float:
    """StyleGAN's PPL in noise space: E[ d(G(slerp(z1, z2, t)), G(slerp(z1, z2, t + eps))) / eps^2 ].

    ``generate(noise, labels) -> images`` (float images, decoded continuously so the distance is smooth);
    both ends of a pair share the class label. d is the squared L2 distance between l2-normalised
    features of ``feature_fn`` (the classifier's penultimate layer: LPIPS weights are not available
    here, so this is a feature-space PPL, comparable between methods but not with published values).
    As in StyleGAN, the 1% lowest and highest values are discarded before averaging.
    """
    g = torch.Generator().manual_seed(rng.stream_seed(seed, 0, "ppl"))  # no training stream's noise
    vals = []
    for i in range(0, len(labels), batch_size):
        lab = labels[i:i + batch_size]
        n = len(lab)
        z1, z2 = torch.randn((n, *noise_shape), generator=g), torch.randn((n, *noise_shape), generator=g)
        t = torch.rand(n, generator=g)
        za, zb = slerp(z1, z2, t), slerp(z1, z2, t + epsilon)
        fa = torch.nn.functional.normalize(feature_fn(generate(za, lab)).flatten(1).double(), dim=1)
        fb = torch.nn.functional.normalize(feature_fn(generate(zb, lab)).flatten(1).double(), dim=1)
        vals.append(((fa - fb) ** 2).sum(1) / epsilon ** 2)
    v = torch.cat(vals).numpy()
    lo, hi = np.percentile(v, 1), np.percentile(v, 99)
    return float(v[(v >= lo) & (v <= hi)].mean())
