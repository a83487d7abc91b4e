"""Figures of the concept-space view: projection scatter, spread curves per layer, probe curve.

Pure functions (no Streamlit). Scatter points carry their index in the point cloud in
``customdata`` as Python lists (numpy customdata comes back malformed from a real browser).
"""
from __future__ import annotations

import html
from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from components.lens_plots import show_token

PALETTE = qualitative.Dark24 + qualitative.Light24
MANY = 24  # more categories than this: the top N (by number of points) get colours, the rest are "other"
TOP_N = 10
OTHER_COLOR = "#b8b8b8"
DIM_OPACITY = 0.12  # the points left out of a highlight
WEBGL_FROM = 6000  # 2-D scatters with more points switch to WebGL


def _is_numeric(values: Sequence[str]) -> bool:
    try:
        [float(v) for v in values]
    except (TypeError, ValueError):
        return False
    return True


def is_numeric_label(values: Sequence[str]) -> bool:
    """Colour by a colour bar (positions, indices), not by category."""
    categories = list(dict.fromkeys(str(v) for v in values))
    return _is_numeric(categories) and len(categories) > 12


def category_count(values: Sequence[str]) -> int:
    return len(set(str(v) for v in values))


def top_categories(values: Sequence[str], n: int) -> list[str]:
    """The ``n`` categories with the most points (ties: first seen first)."""
    counts: dict[str, int] = {}
    for v in values:
        counts[str(v)] = counts.get(str(v), 0) + 1
    order = {c: i for i, c in enumerate(counts)}
    return sorted(counts, key=lambda c: (-counts[c], order[c]))[:n]


def find_highlight(labels: dict[str, Sequence[str]], color_name: str, query: str) -> tuple[list[int], str]:
    """Points whose label matches ``query`` (case-insensitive) and a description of the match.

    An exact value of the colour label first, then an exact value of any other label (so 'dog' finds the concept
    while colouring by language), then values of the colour label containing the query."""
    wanted = " ".join(str(query or "").split()).lower()
    if not wanted:
        return [], ""
    names = [color_name] + [n for n in labels if n not in (color_name, "text")]
    for name in names:
        values = [str(v).strip().lower() for v in labels.get(name, [])]
        hits = [i for i, v in enumerate(values) if v == wanted]
        if hits:
            return hits, f"{name} = '{labels[name][hits[0]]}'"
    values = [str(v) for v in labels.get(color_name, [])]
    hits = [i for i, v in enumerate(values) if wanted in v.lower()]
    if hits:
        found = list(dict.fromkeys(values[i] for i in hits))
        shown = ", ".join(f"'{v}'" for v in found[:6]) + (f" and {len(found) - 6} more" if len(found) > 6 else "")
        return hits, f"{color_name} containing '{wanted}': {shown}"
    return [], ""


def scatter_figure(coords: np.ndarray, color: Sequence[str], hover: Sequence[str], color_name: str,
                   title: str = "", height: int = 620, top_n: int = TOP_N,
                   highlight: Sequence[int] | None = None, highlight_name: str = "") -> go.Figure:
    """2-D or 3-D scatter of projected points coloured by a label; ``customdata`` = point index.

    Numeric labels get a colour bar; up to :data:`MANY` categories one legend entry each; more categories
    the ``top_n`` largest ones plus "other" in grey. ``highlight`` (point indices) draws those points larger
    with an outline, and dims every other point."""
    coords = np.asarray(coords)
    dims = coords.shape[1]
    color = [str(c) for c in color]
    index = np.arange(len(color))
    chosen = np.zeros(len(color), dtype=bool)
    if highlight is not None and len(highlight):
        chosen[np.asarray(list(highlight), dtype=int)] = True
    dim = bool(chosen.any())
    fig = go.Figure()
    size = 4 if dims == 3 else (5 if len(color) > 2000 else 7)

    def add(points: np.ndarray, name: str, marker: dict, showlegend: bool = True, rank: int = 1000) -> None:
        custom = [[int(i)] for i in points]  # Python lists, not numpy
        text = [f"{hover[i]}<br>{color_name}: {color[i]}" for i in points]
        common = dict(mode="markers", name=name, customdata=custom, text=text, marker=marker,
                      hovertemplate="%{text}<extra></extra>", showlegend=showlegend, legendrank=rank)
        if dims == 3:
            fig.add_trace(go.Scatter3d(x=coords[points, 0], y=coords[points, 1], z=coords[points, 2], **common))
        else:
            cls = go.Scattergl if len(color) >= WEBGL_FROM else go.Scatter
            fig.add_trace(cls(x=coords[points, 0], y=coords[points, 1], **common))

    point_color = _point_colors(color, top_n)
    if point_color is None:  # numeric: one trace and a colour bar
        values = np.array([float(c) for c in color])
        scale = dict(colorscale="Viridis", cmin=float(values.min()), cmax=float(values.max()))
        add(index[~chosen], color_name, dict(size=size, color=values[~chosen], opacity=DIM_OPACITY if dim else 0.8,
                                             colorbar=dict(title=color_name), **scale), showlegend=False)
        highlighted = dict(color=values[chosen], **scale)
    else:
        legend, groups, colors = point_color
        # grey "other" first, so it is drawn under the coloured points (its legend entry still comes last)
        for rank, (name, hue) in sorted(enumerate(legend), key=lambda e: e[1][1] != OTHER_COLOR):
            add(index[(groups == name) & ~chosen], name, dict(size=size, color=hue,
                                                               opacity=DIM_OPACITY if dim else 0.85), rank=rank)
        highlighted = dict(color=colors[chosen].tolist())
    if dim:
        add(index[chosen], f"★ {highlight_name or 'highlight'} ({int(chosen.sum())})",
            dict(size=size * 2, opacity=1.0, line=dict(color="black", width=1.5), **highlighted), rank=-1)
    fig.update_layout(title=title, height=height, margin=dict(l=10, r=10, t=40, b=10), dragmode="lasso",
                      legend=dict(title=color_name, itemsizing="constant"))
    if dims == 2:
        fig.update_xaxes(showticklabels=False, zeroline=False)
        fig.update_yaxes(showticklabels=False, zeroline=False, scaleanchor="x", scaleratio=1)
    return fig


def _point_colors(color: list[str], top_n: int) -> tuple[list[tuple[str, str]], np.ndarray, np.ndarray] | None:
    """Legend entries (name, colour), each point's legend entry and colour; None for a numeric label."""
    categories = list(dict.fromkeys(color))
    if _is_numeric(categories) and len(categories) > 12:
        return None
    shown = categories if len(categories) <= MANY else top_categories(color, max(1, min(int(top_n), len(PALETTE))))
    legend = [(c, PALETTE[k % len(PALETTE)]) for k, c in enumerate(shown)]
    hues = dict(legend)
    rest = len(categories) - len(shown)
    other = f"other ({rest} {'category' if rest == 1 else 'categories'})"
    if rest:
        legend.append((other, OTHER_COLOR))
    groups = np.array([c if c in hues else other for c in color], dtype=object)
    colors = np.array([hues.get(c, OTHER_COLOR) for c in color], dtype=object)
    return legend, groups, colors


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


# --- linked views: a token placed in the projection, a selection from a link, the lens of a selection's mean --------
TOKEN_COLOR = "#d62728"


def add_token_point(fig: go.Figure, xy: Sequence[float], label: str, size: int = 22) -> go.Figure:
    """Draw one extra point (a token placed in the projection) as a large labelled star on top of the scatter.

    It carries no ``customdata``, so a box or lasso around it selects only the cloud's points."""
    xy = [float(v) for v in xy]
    common = dict(mode="markers+text", name=f"★ {label}", text=[label], textposition="top center",
                  hovertemplate=f"{html.escape(label)}<extra></extra>", showlegend=True, legendrank=-2,
                  textfont=dict(color=TOKEN_COLOR, size=13))
    if len(xy) == 3:
        fig.add_trace(go.Scatter3d(x=[xy[0]], y=[xy[1]], z=[xy[2]], marker=dict(
            symbol="diamond", size=size // 2, color=TOKEN_COLOR, line=dict(color="black", width=2)), **common))
    else:
        fig.add_trace(go.Scatter(x=[xy[0]], y=[xy[1]], marker=dict(
            symbol="star", size=size, color=TOKEN_COLOR, line=dict(color="black", width=1.5)),
            unselected=dict(marker=dict(opacity=1.0), textfont=dict(color=TOKEN_COLOR)), **common))  # never dimmed
    return fig


def mark_selection(fig: go.Figure, points: Sequence[int]) -> go.Figure:
    """Show ``points`` (cloud indices) as Plotly's own selection: ``selectedpoints`` on every trace that carries
    point indices in ``customdata`` (the others, e.g. a placed token, stay as they are). 3-D scatters have no
    selection: there the selected points are drawn three times larger instead."""
    wanted = {int(p) for p in points}
    for trace in fig.data:
        custom = trace.customdata
        if custom is None or not len(custom):
            continue
        if "selectedpoints" not in trace:  # Scatter3d
            size = trace.marker.size or 4
            trace.marker.size = [size * 3 if int(data[0]) in wanted else size for data in custom]
            continue
        trace.selectedpoints = [i for i, data in enumerate(custom) if int(data[0]) in wanted]
    return fig


def mean_lens_figure(layers: Sequence[int], tokens: Sequence[Sequence[str]], probs: np.ndarray, site: str,
                     n_points: int, height: int | None = None) -> go.Figure:
    """Layer (rows, first layer at the bottom) x rank, each cell the token the lens reads there, coloured by its
    probability."""
    probs = np.asarray(probs, dtype=float)
    rows, k = probs.shape
    text = [[show_token(tokens[r][c], 9) for c in range(k)] for r in range(rows)]
    hover = [[f"layer {layers[r]} · rank {c + 1}<br>{html.escape(repr(tokens[r][c]))}: p = {probs[r, c]:.3f}"
              for c in range(k)] for r in range(rows)]
    fig = go.Figure(go.Heatmap(z=probs, x=[f"#{c + 1}" for c in range(k)], y=[str(layer) for layer in layers],
                               text=text, texttemplate="%{text}", textfont={"size": 11}, customdata=hover,
                               hovertemplate="%{customdata}<extra></extra>", colorscale="Blues", zmin=0.0,
                               zmax=1.0, colorbar=dict(title="p")))
    fig.update_layout(title=f"Logit lens of the mean of {n_points} selected point{'s' * (n_points != 1)} ({site})",
                      xaxis_title="rank", xaxis_type="category", yaxis_title="layer", yaxis_type="category",
                      height=height or max(260, 22 * rows + 120), margin=dict(l=50, r=20, t=40, b=40))
    return fig
