"""The feature map: a 2-D projection of an SAE's decoder directions, and cosines to one feature for colouring it."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from engine.core.devices import to_host
from engine.features.folder import write_parquet

if TYPE_CHECKING:
    import pandas as pd

    from engine.features.read import Dashboard


def feature_map(dash: Dashboard, method: str = "umap", seed: int = 0) -> pd.DataFrame:
    """``feature, x, y`` per feature: 2-D projection of the decoder directions (cached as ``map_<method>.parquet``
    in the dashboard folder)."""
    import pandas as pd

    from engine.geometry.projections import project

    path = dash.path / f"map_{method}.parquet"
    if path.is_file():
        return pd.read_parquet(path)
    W = to_host(dash.sae().W_dec, torch.float32).numpy()  # [d_sae, d_in]
    coords = project(W, method=method, n_components=2, seed=seed, normalize=True)  # [d_sae, 2]
    write_parquet({"feature": torch.arange(dash.d_sae), "x": coords[:, 0].astype(np.float32),
                   "y": coords[:, 1].astype(np.float32)}, path)
    return pd.read_parquet(path)


@torch.no_grad()
def decoder_cosines(dash: Dashboard, feature: int) -> list[float]:
    """Cosine of every feature's decoder direction to ``feature``'s (``d_sae`` floats)."""
    f = dash.check_feature(feature)
    W = to_host(dash.sae().W_dec, torch.float32)  # [d_sae, d_in]
    unit = W / W.norm(dim=1, keepdim=True).clamp_min(1e-8)
    return (unit @ unit[f]).tolist()
