"""Plotly figures for the lens views (no model code: they take engine results)."""
from __future__ import annotations

import html

import numpy as np
import pandas as pd
import plotly.graph_objects as go

METRICS = {
    "top1": "Top-1 probability",
    "entropy": "Entropy (nats)",
    "kl": "KL to final (nats)",
    "tracked_prob": "P(tracked token)",
    "tracked_rank": "Rank of tracked token",
}


def show_token(token: str, limit: int = 10) -> str:
    """Make whitespace visible and keep labels short: ' Paris' -> '·Paris', '\\n' -> '⏎'."""
    shown = token.replace("\n", "⏎").replace("\t", "⇥").replace(" ", "·")
    return shown if len(shown) <= limit else shown[: limit - 1] + "…"


def metric_values(result, metric: str, tracked: int = 0) -> np.ndarray:
    if metric == "top1":
        return result.top_probs[..., 0]
    if metric == "entropy":
        return result.entropy
    if metric == "kl":
        return result.kl_to_final
    if result.tracked_probs is None:
        raise ValueError("no tracked token")
    if metric == "tracked_prob":
        return result.tracked_probs[..., tracked]
    return result.tracked_ranks[..., tracked].astype(float)


ROBUST_PERCENTILES = (2.0, 98.0)  # colour range of the unbounded metrics (see robust_range)
# Perceptually ordered, light to dark: the top of every colour bar (the largest value) is the darkest colour.
PROBABILITY_SCALE = "Blues"
NATS_SCALE = "Viridis_r"
RANK_SCALE = "Purples"


def robust_range(result, values: np.ndarray, percentiles: tuple[float, float] = ROBUST_PERCENTILES
                 ) -> tuple[float, float]:
    """Colour range of an unbounded metric over the rows other than the embedding row: from the 2nd percentile
    to the 98th, or to the far-out fence Q3 + 3·IQR where that is lower.

    Read through the final norm, the embedding row's KL can be a thousand nats and the first layers' a few
    hundred, which would push every later layer into the bottom sliver of the colour bar (on a short prompt a
    row or two is more than 2% of the cells, hence the fence). Cells outside the range take the end colours;
    the hover shows their true value."""
    rows = [r for r, name in enumerate(result.row_names) if name != "embed"] or list(range(len(values)))
    finite = values[rows][np.isfinite(values[rows])]
    if not finite.size:
        return 0.0, 1.0
    low, high, q1, q3 = (float(v) for v in np.percentile(finite, [*percentiles, 25, 75]))
    high = min(high, q3 + 3 * (q3 - q1))
    if high <= low:
        low, high = float(finite.min()), float(finite.max())
    return low, high if high > low else low + 1.0


def color_scale(result, metric: str, z: np.ndarray) -> dict:
    """Heatmap colour arguments (z, colorscale, zmin, zmax, colorbar) for one metric: high values dark."""
    title = METRICS[metric]
    if metric in ("top1", "tracked_prob"):
        return {"z": z, "colorscale": PROBABILITY_SCALE, "zmin": 0.0, "zmax": 1.0,
                "colorbar": {"title": {"text": title}}}
    if metric == "tracked_rank":  # -log10(rank): rank 1 at the top of the bar, darkest
        shown = -np.log10(z + 1)
        worst = max(1, int(np.ceil(-float(shown.min()))))
        ticks = [10 ** e for e in range(worst + 1)]
        return {"z": shown, "colorscale": RANK_SCALE, "zmin": -float(worst), "zmax": 0.0,
                "colorbar": {"title": {"text": "Rank of tracked token<br>(1 = top)"},
                             "tickvals": [-float(e) for e in range(worst + 1)],
                             "ticktext": [f"{t:,}" for t in ticks]}}
    zmin, zmax = robust_range(result, z)
    clipped = bool((z > zmax).any() or (z < zmin).any())
    note = "<br><sup>robust range (layers);<br>true value on hover</sup>" if clipped else ""
    return {"z": z, "colorscale": NATS_SCALE, "zmin": zmin, "zmax": zmax, "colorbar": {"title": {"text": title + note}}}


def position_labels(result) -> list[str]:
    return [f"{p}:{show_token(result.tokens[p], 8)}" for p in result.positions]


def lens_heatmap(result, metric: str = "top1", tracked: int = 0, height: int | None = None,
                 selected: tuple[int, int] | None = None) -> go.Figure:
    """Layers (rows, embeddings at the bottom) x positions, each cell labelled with its top-1 token.

    A transparent scatter marker sits on every cell, carrying ``[row, column]`` in customdata and
    the hover text, because Streamlit does not report selections on heatmap traces (the heatmap
    itself takes no pointer events, so clicks and hovers reach the markers). ``selected`` (row, column) is
    outlined. Probabilities are coloured on [0, 1]; entropy and KL on a robust range (:func:`robust_range`),
    ranks on a log scale; in every case the largest value is the darkest colour.
    """
    z = metric_values(result, metric, tracked)
    rows, cols = z.shape
    k = result.top_ids.shape[-1]
    text = [[show_token(result.top_tokens[r][c][0], 7) for c in range(cols)] for r in range(rows)]
    hover = []
    for r in range(rows):
        line = []
        for c in range(cols):
            tops = "<br>".join(f"{html.escape(show_token(result.top_tokens[r][c][i], 20))}: "
                               f"{result.top_probs[r, c, i]:.3f}" for i in range(k))
            extra = ""
            if result.tracked_probs is not None:
                extra = "<br>" + "<br>".join(
                    f"{html.escape(label)}: p={result.tracked_probs[r, c, t]:.3g}, rank {result.tracked_ranks[r, c, t]}"
                    for t, label in enumerate(result.tracked_labels))
            line.append(f"layer {result.row_names[r]} · pos {result.positions[c]} "
                        f"({html.escape(show_token(result.tokens[result.positions[c]], 20))})<br>"
                        f"entropy {result.entropy[r, c]:.2f} · KL {result.kl_to_final[r, c]:.2f}<br>{tops}{extra}")
        hover.append(line)
    scale = color_scale(result, metric, z)
    fig = go.Figure(go.Heatmap(
        z=scale.pop("z"), x=list(range(cols)), y=list(range(rows)), text=text, texttemplate="%{text}",
        textfont={"size": 10}, hoverinfo="skip", **scale,
    ))
    xs, ys = np.meshgrid(np.arange(cols), np.arange(rows))
    fig.add_trace(go.Scatter(
        x=xs.ravel().tolist(), y=ys.ravel().tolist(), mode="markers",
        marker={"size": 18, "color": "rgba(0,0,0,0)", "symbol": "square"},
        customdata=[[int(r), int(c)] for r, c in zip(ys.ravel(), xs.ravel())],
        hovertext=[hover[r][c] for r, c in zip(ys.ravel(), xs.ravel())],
        hovertemplate="%{hovertext}<extra></extra>", showlegend=False, name="cells",
    ))
    fig.update_layout(
        xaxis={"tickmode": "array", "tickvals": list(range(cols)), "ticktext": position_labels(result),
               "tickangle": -45, "title": "input position: token", "range": [-0.5, cols - 0.5]},
        yaxis={"tickmode": "array", "tickvals": list(range(rows)), "ticktext": result.row_names, "title": "layer",
               "range": [-0.5, rows - 0.5]},
        height=height or max(360, 22 * rows + 160), margin={"l": 60, "r": 20, "t": 30, "b": 90},
        clickmode="event+select", dragmode="zoom",  # with dragmode "select" a plain click selects nothing
    )
    if selected is not None:
        r, c = selected
        fig.add_shape(type="rect", x0=c - 0.5, x1=c + 0.5, y0=r - 0.5, y1=r + 0.5, layer="above",
                      line={"color": "#ff3d00", "width": 3}, name="selected cell")
    return fig


STRIP_SCALE = "Oranges"
STRIP_SHARE = 0.1  # of the plot's height


def add_feature_strip(fig: go.Figure, values, label: str, zmax: float, columns: list[str] | None = None
                      ) -> go.Figure:
    """Draw one SAE feature's activation per input position (``values``, one per heatmap column, NaN where the
    SAE is not read) as a one-row strip above :func:`lens_heatmap`'s grid, on the same x positions.

    Each strip cell shows its value; colour runs from 0 to ``zmax`` (the feature's largest activation on its
    dashboard, so the shade means the same on every prompt). The heatmap's own traces, clicks and colour bar keep
    their places; the strip is the last trace, named ``feature strip``. ``columns`` names the columns in the hover
    (e.g. :func:`position_labels`; default: the column numbers)."""
    values = [float(v) for v in values]
    shown = [None if not np.isfinite(v) else v for v in values]
    top = max([zmax, *[v for v in shown if v is not None]], default=0.0) or 1.0
    text = ["" if v is None else ("0" if v == 0 else f"{v:.2g}") for v in shown]
    gap = 0.03
    fig.update_layout(yaxis={"domain": [0.0, 1.0 - STRIP_SHARE - gap]},
                      yaxis2={"domain": [1.0 - STRIP_SHARE, 1.0], "anchor": "x", "range": [-0.5, 0.5],
                              "tickmode": "array", "tickvals": [0], "ticktext": [label], "fixedrange": True,
                              "showgrid": False, "zeroline": False})
    fig.data[0].colorbar.update(len=1.0 - STRIP_SHARE - gap, y=0.0, yanchor="bottom")
    fig.add_trace(go.Heatmap(
        z=[shown], x=list(range(len(values))), y=[0], yaxis="y2", xaxis="x", colorscale=STRIP_SCALE, zmin=0.0,
        zmax=top, showscale=False, text=[text], texttemplate="%{text}", textfont={"size": 10}, xgap=1,
        customdata=[[html.escape(c) for c in (columns or [str(i) for i in range(len(values))])]],
        hovertemplate="%{customdata}: activation %{z:.3g}<extra>" + html.escape(label) + "</extra>",
        name="feature strip",
    ))
    fig.update_layout(height=int(fig.layout.height or 400) + 70)
    return fig


def topk_table(result, row: int, col: int) -> pd.DataFrame:
    k = result.top_ids.shape[-1]
    return pd.DataFrame({
        "rank": np.arange(1, k + 1),
        "token": [show_token(result.top_tokens[row][col][i], 40) for i in range(k)],
        "id": result.top_ids[row, col],
        "probability": np.round(result.top_probs[row, col], 4),
    })


def tracked_lines(result, col: int, kind: str = "prob") -> go.Figure:
    """Tracked tokens' probability (or rank) across layers at one position."""
    fig = go.Figure()
    rows = list(range(len(result.row_names)))
    for t, label in enumerate(result.tracked_labels):
        values = result.tracked_probs[:, col, t] if kind == "prob" else result.tracked_ranks[:, col, t] + 1
        # x is the row number (names such as '3' and '3.attn' on a category axis would be auto-typed as numbers,
        # dropping 'embed' and the attention rows); the names are the tick labels and part of the hover
        fig.add_trace(go.Scatter(
            x=rows, y=[float(v) for v in values], mode="lines+markers", name=show_token(label, 30),
            customdata=[[name] for name in result.row_names], connectgaps=True,
            hovertemplate="layer %{customdata[0]}: %{y:.3g}<extra>" + html.escape(show_token(label, 30)) + "</extra>",
        ))
    step = max(1, len(rows) // 24)
    fig.update_layout(
        xaxis={"title": "layer", "tickmode": "array", "tickvals": rows[::step],
               "ticktext": result.row_names[::step], "range": [-0.5, len(rows) - 0.5]},
        yaxis_title="probability" if kind == "prob" else "rank (1 = top)",
        yaxis_type="log" if kind == "rank" else "linear", height=320, margin={"t": 30},
        legend={"orientation": "h", "y": 1.12},
    )
    if kind == "prob":
        fig.update_yaxes(range=[0, 1])
    return fig


def latent_language_figure(summary: dict, target_name: str) -> go.Figure:
    """P(answer in the target language) and P(English) per layer, mean with 95% bands."""
    layers = summary["layers"]
    fig = go.Figure()
    for key, name, color in (("target_language", target_name, "31,119,180"), ("english", "English", "214,39,40")):
        band = summary[key]
        fig.add_trace(go.Scatter(x=layers + layers[::-1], y=band["hi"] + band["lo"][::-1], fill="toself",
                                 fillcolor=f"rgba({color},0.18)", line={"width": 0}, hoverinfo="skip",
                                 showlegend=False))
        fig.add_trace(go.Scatter(x=layers, y=band["mean"], mode="lines+markers", name=name,
                                 line={"color": f"rgb({color})"}))
    items = summary["items"]
    fig.update_layout(
        title=f"{summary['lens']} lens · {items['kept']} of {items['total']} items (single-token answers)",
        xaxis_title="layer", yaxis_title="probability", yaxis_range=[0, 1], height=380,
        legend={"orientation": "h", "y": 1.1}, margin={"t": 60},
    )
    return fig
