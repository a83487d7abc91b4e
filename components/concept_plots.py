"""Figures of the concept-space view: projection scatter, spread curves per layer, probe curve.

Pure functions (no Streamlit). Scatter points carry their index in the point cloud in
``customdata`` as Python lists (numpy customdata comes back malformed from a real browser).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

PALETTE = qualitative.Dark24 + qualitative.Light24
MAX_LEGEND = 48  # more categories than this: one trace, colour by category index
WEBGL_FROM = 6000  # 2-D scatters with more points switch to WebGL


def _is_numeric(values: Sequence[str]) -> bool:
    try:
        [float(v) for v in values]
    except (TypeError, ValueError):
        return False
    return True


def scatter_figure(coords: np.ndarray, color: Sequence[str], hover: Sequence[str], color_name: str,
                   title: str = "", height: int = 620) -> go.Figure:
    """2-D or 3-D scatter of projected points coloured by a label; ``customdata`` = point index."""
    coords = np.asarray(coords)
    dims = coords.shape[1]
    color = [str(c) for c in color]
    index = np.arange(len(color))
    fig = go.Figure()
    categories = list(dict.fromkeys(color))
    numeric = _is_numeric(categories) and len(categories) > 12

    def add(points: np.ndarray, name: str, marker: dict, showlegend: bool) -> None:
        custom = [[int(i)] for i in points]  # Python lists, not numpy
        text = [hover[i] for i in points]
        common = dict(mode="markers", name=name, customdata=custom, text=text, marker=marker,
                      hovertemplate=f"%{{text}}<br>{color_name}: {name if showlegend else '%{marker.color}'}"
                                    "<extra></extra>", showlegend=showlegend)
        if dims == 3:
            fig.add_trace(go.Scatter3d(x=coords[points, 0], y=coords[points, 1], z=coords[points, 2], **common))
        else:
            cls = go.Scattergl if len(color) >= WEBGL_FROM else go.Scatter
            fig.add_trace(cls(x=coords[points, 0], y=coords[points, 1], **common))

    size = 4 if dims == 3 else (5 if len(color) > 2000 else 7)
    if numeric or len(categories) > MAX_LEGEND:
        values = [float(c) for c in color] if numeric else [categories.index(c) for c in color]
        marker = dict(size=size, color=values, colorscale="Viridis" if numeric else "Turbo", opacity=0.8,
                      colorbar=dict(title=color_name) if numeric else None)
        add(index, color_name, marker, showlegend=False)
    else:
        for k, category in enumerate(categories):
            points = index[np.asarray(color) == category]
            add(points, category, dict(size=size, color=PALETTE[k % len(PALETTE)], opacity=0.85), True)
    fig.update_layout(title=title, height=height, margin=dict(l=10, r=10, t=40, b=10), dragmode="lasso",
                      legend=dict(title=color_name, itemsizing="constant"))
    if dims == 2:
        fig.update_xaxes(showticklabels=False, zeroline=False)
        fig.update_yaxes(showticklabels=False, zeroline=False, scaleanchor="x", scaleratio=1)
    return fig


def geometry_figure(result: dict, height: int = 520) -> go.Figure:
    """One small panel per spread measure, value against layer; translation similarity in its own panel."""
    layers = result["layers"]
    measures = dict(result["measures"])
    translation = {k: measures.pop(k) for k in list(measures) if k.startswith("cosine:")}
    panels = list(measures) + (["translations (centred cosine)"] if translation else [])
    cols = 3 if len(panels) > 4 else 2
    rows = (len(panels) + cols - 1) // cols
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=panels, horizontal_spacing=0.08,
                        vertical_spacing=0.18)
    for k, name in enumerate(panels):
        row, col = k // cols + 1, k % cols + 1
        curves = translation if name.startswith("translations") else {name: measures[name]}
        for j, (label, values) in enumerate(curves.items()):
            fig.add_trace(go.Scatter(x=layers, y=values, mode="lines+markers", name=label.removeprefix("cosine: "),
                                     line=dict(color=PALETTE[j]), showlegend=len(curves) > 1), row=row, col=col)
    fig.update_xaxes(title_text="layer", row=rows)
    fig.update_layout(height=height, margin=dict(l=40, r=20, t=40, b=40),
                      legend=dict(orientation="h", y=-0.15))
    return fig


def probe_figure(curve: dict, height: int = 380) -> go.Figure:
    """Probe accuracy per layer with the chance line and the first layer reaching 90% of the best."""
    layers, accuracy = curve["layers"], curve["accuracy"]
    grouped = curve.get("grouped_by")
    fig = go.Figure(go.Scatter(x=layers, y=accuracy, mode="lines+markers",
                               name=f"probe accuracy (folds grouped by {grouped})" if grouped else "probe accuracy"))
    if curve.get("ungrouped_accuracy"):
        fig.add_trace(go.Scatter(x=layers, y=curve["ungrouped_accuracy"], mode="lines", line_dash="dot",
                                 line_color="gray", name=f"ungrouped (same {grouped} in training and test)"))
    fig.add_hline(y=curve["chance"], line_dash="dash", line_color="gray",
                  annotation_text=f"chance {curve['chance']:.2f}", annotation_position="bottom right")
    first = curve.get("first_layer_at_90")
    if first is not None:
        fig.add_vline(x=first, line_dash="dot", line_color="firebrick",
                      annotation_text=f"90% of best at layer {first}")
    fig.update_layout(height=height, margin=dict(l=40, r=20, t=40, b=40), yaxis=dict(range=[0, 1.02],
                      title="cross-validated accuracy"), xaxis_title="layer",
                      title=f"Linear probe for '{curve['label']}' ({curve['n_classes']} classes, "
                            f"{curve['n_points']} points, {curve['folds']}-fold"
                            f"{f', grouped by {grouped}' if grouped else ''})",
                      legend=dict(orientation="h", y=-0.2))
    return fig
