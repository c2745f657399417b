"""Numerical agreement measures used by converters, runtimes and parity reports (numpy only)."""

from __future__ import annotations

import numpy as np


def snr_db(reference: np.ndarray, test: np.ndarray) -> float:
    """Signal-to-noise ratio of `test` against `reference` in dB: 10 log10(sum ref^2 / sum (ref - test)^2)."""
    ref = np.asarray(reference, np.float64)
    err = ref - np.asarray(test, np.float64)
    noise = float(np.sum(err * err))
    if noise == 0.0:
        return float("inf")
    return float(10 * np.log10(max(float(np.sum(ref * ref)), 1e-30) / noise))


def max_abs_error(reference: np.ndarray, test: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(reference, np.float64) - np.asarray(test, np.float64))))


def psnr(reference: np.ndarray, test: np.ndarray, peak: float = 255.0) -> float:
    """PSNR in dB of two images (uint8 by default, peak 255)."""
    mse = float(np.mean((np.asarray(reference, np.float64) - np.asarray(test, np.float64)) ** 2))
    if mse == 0.0:
        return float("inf")
    return float(10 * np.log10(peak * peak / mse))
