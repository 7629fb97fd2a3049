"""Confidence of a class map: temperature scaling and the expected calibration error.

A head trained with class-balanced cross-entropy and weight decay (``pipeline.finetune``) ranks classes well but
its softmax is not a probability: balanced weights inflate the rare classes, and a linear probe on separable
features grows overconfident. Temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural Networks")
divides the logits by one scalar T fitted by maximum likelihood on held-out pixels: the argmax (the class map)
does not change, the confidence does. T is fitted on the fine-tuning's selection tiles (never its test tiles),
stored in the head file, and inference writes ``round(100 * max softmax(logits / T))`` as a uint8 band.

    T = fit_temperature(logits, labels)                # logits (N, C) float, labels (N,) int
    ece = expected_calibration_error(probs, labels)    # probs (N, C) softmax output
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.labels import CONFIDENCE_NODATA  # noqa: F401  (re-exported: the band this module fills)

__all__ = ["CONFIDENCE_NODATA", "ECE_BINS", "confidence_percent", "expected_calibration_error", "fit_temperature"]

ECE_BINS = 15  # the usual equal-width binning of Guo et al. 2017


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, *, max_iter: int = 100) -> float:
    """The temperature T > 0 minimising the mean negative log-likelihood of ``softmax(logits / T)`` on
    ``labels``: logits (N, C) float, labels (N,) int64 in [0, C). One scalar, optimised as log T by L-BFGS (the
    problem is convex in 1/T, so this converges in a few iterations). Returns 1.0 for an empty set."""
    if len(labels) == 0:
        return 1.0
    z = logits.detach().float().clone()  # a normal tensor, also when made under torch.inference_mode
    y = labels.detach().long().clone()
    log_t = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().exp())
    # [ours] a guard, not a prior: a degenerate set (one class, all correct) drives T to 0 or infinity
    return float(np.clip(t, 0.05, 20.0))


def expected_calibration_error(probs: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray,
                               bins: int = ECE_BINS) -> float:
    """Expected calibration error of the top-class confidence: probs (N, C) class probabilities, labels (N,).
    Pixels are binned by their confidence (``bins`` equal-width bins over [0, 1]); ECE = sum over bins of
    (pixels in bin / N) x |accuracy in bin - mean confidence in bin|. 0 is perfectly calibrated; NaN for N = 0."""
    p = torch.as_tensor(probs).float()
    y = torch.as_tensor(labels).long()
    if len(y) == 0:
        return float("nan")
    conf, pred = p.max(1)
    correct = (pred == y).float()
    edges = torch.linspace(0, 1, bins + 1)
    idx = torch.bucketize(conf, edges[1:-1])  # bin b holds (edges[b], edges[b+1]] (Guo et al.); 0 goes to bin 0
    n = torch.bincount(idx, minlength=bins).float()
    acc = torch.bincount(idx, weights=correct, minlength=bins)
    cs = torch.bincount(idx, weights=conf, minlength=bins)
    used = n > 0
    gap = (acc[used] - cs[used]).abs()
    return float(gap.sum() / len(y))


def confidence_percent(logits: torch.Tensor, temperature: float = 1.0, *, dim: int = 0) -> torch.Tensor:
    """uint8 percent (0..100) of the top class of ``softmax(logits / temperature)`` along ``dim``: logits
    (C, H, W) -> (H, W). Rounded to the nearest percent; the caller sets nodata (:data:`CONFIDENCE_NODATA`)."""
    p = torch.softmax(logits.float() / temperature, dim=dim).amax(dim)
    return (p * 100).round().clamp(0, 100).to(torch.uint8)
