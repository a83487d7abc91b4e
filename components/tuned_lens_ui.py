"""Plotly figures comparing the logit lens and the tuned lens (no model code: they take engine results).

- :func:`comparison_figure`: per layer, KL to the final distribution and next-token cross-entropy
  for both lenses over held-out text (an :class:`engine.lens.compare.LensComparison`).
- :func:`disagreement` / :func:`disagreement_heatmap`: per (layer, position) cell of one prompt,
  how much the two lenses' read-outs differ, from two :class:`engine.lens.logit.LensResult` objects of
  the same prompt, rows and positions.
"""
from __future__ import annotations

import html

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from components.lens_plots import position_labels, show_token

LENS_COLORS = {"logit": "#1f77b4", "tuned": "#d62728"}

DISAGREEMENT = {
    "top1": "Top-1 token differs (1) or agrees (0)",
    "overlap": "1 - overlap of the top-k sets",
    "kl_gain": "KL to final: logit lens minus tuned lens (nats)",
    "top1_prob": "Top-1 probability: tuned minus logit",
}


def comparison_figure(comparison, height: int = 420, log_kl: bool = True) -> go.Figure:
    """Two panels: KL(final || lens) and cross-entropy per layer, one line per lens."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("KL to final distribution (nats)",
                                                        "Next-token cross-entropy (nats)"))
    layers = list(comparison.layers)
    series = (("logit", comparison.kl_logit, comparison.ce_logit), ("tuned", comparison.kl_tuned, comparison.ce_tuned))
    for name, kl, ce in series:
        style = {"color": LENS_COLORS[name]}
        fig.add_trace(go.Scatter(x=layers, y=np.asarray(kl, dtype=float).tolist(), mode="lines+markers",
                                 name=f"{name} lens", legendgroup=name, line=style,
                                 hovertemplate=f"{name} lens, layer %{{x}}: KL %{{y:.3f}}<extra></extra>"),
                      row=1, col=1)
        fig.add_trace(go.Scatter(x=layers, y=np.asarray(ce, dtype=float).tolist(), mode="lines+markers",
                                 name=f"{name} lens", legendgroup=name, showlegend=False, line=style,
                                 hovertemplate=f"{name} lens, layer %{{x}}: CE %{{y:.3f}}<extra></extra>"),
                      row=1, col=2)
    fig.add_hline(y=float(comparison.model_ce), line_dash="dot", line_color="gray", row=1, col=2,
                  annotation_text="model", annotation_position="top left")
    if log_kl:
        # the last layer's KL is exactly 0: keep it off a log axis by giving it a floor
        fig.update_yaxes(type="log", row=1, col=1)
        for trace in fig.data[::2]:
            trace.y = [max(v, 1e-4) for v in trace.y]
    fig.update_xaxes(title_text="layer", type="category")
    fig.update_layout(height=height, margin={"l": 50, "r": 20, "t": 50, "b": 40},
                      legend={"orientation": "h", "y": -0.2},
                      title=f"Logit lens vs tuned lens over {comparison.n_tokens} held-out tokens")
    return fig


def _check_pair(logit, tuned) -> None:
    if logit.row_names != tuned.row_names or list(logit.positions) != list(tuned.positions) \
            or list(logit.token_ids) != list(tuned.token_ids):
        raise ValueError("the two lens results must come from the same prompt, rows and positions")


def disagreement(logit, tuned, metric: str = "top1") -> np.ndarray:
    """``[rows, positions]`` disagreement between two lens results of the same prompt (see DISAGREEMENT)."""
    _check_pair(logit, tuned)
    if metric == "top1":
        return (logit.top_ids[..., 0] != tuned.top_ids[..., 0]).astype(float)
    if metric == "overlap":
        k = min(logit.top_ids.shape[-1], tuned.top_ids.shape[-1])
        a, b = logit.top_ids[..., :k], tuned.top_ids[..., :k]
        shared = (a[..., :, None] == b[..., None, :]).any(-1).sum(-1)
        return 1.0 - shared / k
    if metric == "kl_gain":
        return logit.kl_to_final - tuned.kl_to_final
    if metric == "top1_prob":
        return tuned.top_probs[..., 0] - logit.top_probs[..., 0]
    raise ValueError(f"unknown disagreement metric '{metric}'; choose from {', '.join(DISAGREEMENT)}")


def disagreement_heatmap(logit, tuned, metric: str = "top1", height: int | None = None) -> go.Figure:
    """Heatmap of :func:`disagreement`, each cell's hover showing both lenses' top-1 tokens.

    A transparent scatter marker per cell carries ``[row, column]`` in customdata (as plain lists),
    so ``st.plotly_chart(on_select="rerun")`` can report a clicked cell.
    """
    values = disagreement(logit, tuned, metric)
    rows, cols = values.shape
    x = position_labels(logit)
    y = list(logit.row_names)
    hover = [[html.escape(
        f"layer {y[r]}, position {x[c]}<br>logit: {show_token(logit.top_tokens[r][c][0], 16)} "
        f"({logit.top_probs[r, c, 0]:.2f})<br>tuned: {show_token(tuned.top_tokens[r][c][0], 16)} "
        f"({tuned.top_probs[r, c, 0]:.2f})<br>{DISAGREEMENT[metric]}: {values[r, c]:.3g}", quote=False)
        .replace("&lt;br&gt;", "<br>") for c in range(cols)] for r in range(rows)]
    text = [[show_token(tuned.top_tokens[r][c][0], 6) if logit.top_ids[r, c, 0] != tuned.top_ids[r, c, 0] else ""
             for c in range(cols)] for r in range(rows)]
    diverging = metric in ("kl_gain", "top1_prob")
    bound = float(np.abs(values).max()) if values.size else 1.0
    fig = go.Figure(go.Heatmap(
        z=values.tolist(), x=list(range(cols)), y=list(range(rows)), text=text, texttemplate="%{text}",
        textfont={"size": 9}, customdata=hover, hovertemplate="%{customdata}<extra></extra>",
        colorscale="RdBu" if diverging else "Reds", zmid=0 if diverging else None,
        zmin=None if diverging else 0, zmax=None if diverging else max(1.0, bound),
        colorbar={"title": {"text": metric}},
    ))
    ys, xs = np.meshgrid(range(rows), range(cols), indexing="ij")
    fig.add_trace(go.Scatter(
        x=xs.ravel().tolist(), y=ys.ravel().tolist(), mode="markers", marker={"opacity": 0, "size": 14},
        customdata=[[int(r), int(c)] for r, c in zip(ys.ravel(), xs.ravel())], hoverinfo="skip", showlegend=False,
    ))
    fig.update_xaxes(tickvals=list(range(cols)), ticktext=x, tickangle=-45)
    fig.update_yaxes(tickvals=list(range(rows)), ticktext=y, autorange="reversed", title_text="layer")
    fig.update_layout(height=height or max(300, 22 * rows + 140), margin={"l": 60, "r": 20, "t": 40, "b": 80},
                      title=f"Where the lenses disagree: {DISAGREEMENT[metric]} (cell text: tuned top-1 when it differs)")
    return fig


def summary_line(logit, tuned) -> str:
    """One sentence for the page: how often the top-1 tokens agree, per layer band."""
    same = 1.0 - disagreement(logit, tuned, "top1")
    return (f"The two lenses agree on the top-1 token in {same.mean() * 100:.0f}% of cells "
            f"({same[: max(1, len(same) // 2)].mean() * 100:.0f}% in the first half of the layers, "
            f"{same[len(same) // 2:].mean() * 100:.0f}% in the second).")
