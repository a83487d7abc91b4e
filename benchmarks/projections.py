"""Wall time of PCA and UMAP (PCA-50 first) for 5k and 20k points at the model's width.

    .venv/bin/python benchmarks/projections.py [--width 640] [--sizes 5000 20000]

Points are a synthetic mixture of 20 anisotropic Gaussian clusters (hidden states are far from
isotropic). UMAP's one-time numba compilation is measured separately (the warm-up) and the
ratios are against the PCA time of the same size, measured in the same run.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.geometry.projections import project, warm_up_umap  # noqa: E402


def points(n: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scales = 1.0 / np.arange(1, width + 1) ** 0.5  # decaying spectrum
    centres = rng.normal(size=(20, width)) * 3 * scales
    return (centres[rng.integers(0, 20, n)] + rng.normal(size=(n, width)) * scales).astype(np.float32)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--width", type=int, default=640, help="640 = gemma-3-270m's d_model")
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 20000])
    args = parser.parse_args()

    warm = timed(lambda: warm_up_umap(background=False))
    print(f"UMAP warm-up (numba compilation, once per process): {warm:.1f} s")
    for n in args.sizes:
        X = points(n, args.width)
        pca_2d = timed(lambda: project(X, "pca", 2))
        pca_3d = timed(lambda: project(X, "pca", 3))
        umap_2d = timed(lambda: project(X, "umap", 2))
        print(f"{n:>6} x {args.width}: PCA 2-D {pca_2d:6.2f} s | PCA 3-D {pca_3d:6.2f} s | "
              f"UMAP 2-D (PCA-50 + UMAP) {umap_2d:6.2f} s = {umap_2d / pca_2d:6.0f}x PCA")


if __name__ == "__main__":
    main()
