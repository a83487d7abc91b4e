"""Plotly figures and small HTML views for interventions (no model code: they take engine results)."""
from __future__ import annotations

import html

import numpy as np
import plotly.graph_objects as go

from components.lens_plots import metric_values, position_labels, show_token

DELTA_METRICS = {"tracked_prob": "Δ P(tracked token)", "top1": "Δ top-1 probability", "entropy": "Δ entropy (nats)",
                 "kl": "Δ KL to final (nats)"}


def sweep_heatmap(result, height: int | None = None) -> go.Figure:
    """Patching sweep: the metric after each patch, centred on the unpatched target; both baselines are marked
    on the colour bar and in the title."""
    z = np.asarray(result.values, dtype=float)
    rows, cols = z.shape
    # symmetric around the unpatched target, so "no effect" is white (plotly ignores zmid once zmin/zmax are set)
    bound = max(float(np.abs(z - result.target_value).max()), abs(result.source_value - result.target_value)) or 1e-9
    lo, hi = result.target_value - bound, result.target_value + bound
    what = "P" if result.metric == "prob" else "logit diff"
    token = show_token(result.token, 20) + (f" − {show_token(result.token_b, 20)}" if result.token_b else "")
    xlabels = [show_token(label, 12) for label in result.col_labels]
    hover = [[f"{'target layer' if result.kind == 'layer_layer' else 'layer'} {result.row_labels[r]} · "
              f"{'source layer' if result.kind == 'layer_layer' else 'position'} {html.escape(xlabels[c])}<br>"
              f"{what}({html.escape(token)}) = {z[r, c]:.4g}" for c in range(cols)] for r in range(rows)]
    ticks = [result.target_value, result.source_value]
    fig = go.Figure(go.Heatmap(
        z=z, x=list(range(cols)), y=list(range(rows)), text=hover, hoverinfo="text", colorscale="RdBu_r",
        zmin=lo, zmax=hi,
        colorbar={"title": {"text": f"{what}({token})"}, "tickvals": ticks,
                  "ticktext": [f"target {ticks[0]:.3g}", f"source {ticks[1]:.3g}"]},
    ))
    fig.update_layout(
        title=f"{what}({token}) after patching {result.site} · target (unpatched) {result.target_value:.4g} · "
              f"source {result.source_value:.4g}",
        xaxis={"tickmode": "array", "tickvals": list(range(cols)), "ticktext": xlabels, "tickangle": -45,
               "title": "source layer" if result.kind == "layer_layer" else "position: token"},
        yaxis={"tickmode": "array", "tickvals": list(range(rows)), "ticktext": result.row_labels,
               "title": "target layer" if result.kind == "layer_layer" else "layer"},
        height=height or max(360, 22 * rows + 170), margin={"l": 60, "r": 20, "t": 60, "b": 90},
    )
    return fig


def delta_lens_heatmap(clean, hit, metric: str = "tracked_prob", tracked: int = 0) -> go.Figure:
    """Intervened minus clean lens, per layer and position; cells show the intervened run's top-1 token."""
    z = metric_values(hit, metric, tracked) - metric_values(clean, metric, tracked)
    rows, cols = z.shape
    bound = float(np.abs(z).max()) or 1e-9
    text = [[show_token(hit.top_tokens[r][c][0], 7) for c in range(cols)] for r in range(rows)]
    hover = [[f"layer {hit.row_names[r]} · pos {hit.positions[c]}<br>clean top-1 "
              f"{html.escape(show_token(clean.top_tokens[r][c][0], 20))} {clean.top_probs[r, c, 0]:.3f}<br>"
              f"intervened top-1 {html.escape(show_token(hit.top_tokens[r][c][0], 20))} {hit.top_probs[r, c, 0]:.3f}"
              f"<br>{DELTA_METRICS[metric]} = {z[r, c]:+.4g}" for c in range(cols)] for r in range(rows)]
    fig = go.Figure(go.Heatmap(
        z=z, x=list(range(cols)), y=list(range(rows)), text=text, texttemplate="%{text}", textfont={"size": 10},
        customdata=hover, hovertemplate="%{customdata}<extra></extra>", colorscale="RdBu_r", zmid=0,
        zmin=-bound, zmax=bound, colorbar={"title": {"text": DELTA_METRICS[metric]}},
    ))
    fig.update_layout(
        xaxis={"tickmode": "array", "tickvals": list(range(cols)), "ticktext": position_labels(hit),
               "tickangle": -45, "title": "input position: token"},
        yaxis={"tickmode": "array", "tickvals": list(range(rows)), "ticktext": hit.row_names, "title": "layer"},
        height=max(360, 22 * rows + 160), margin={"l": 60, "r": 20, "t": 30, "b": 90},
    )
    return fig


def dose_response_figure(result) -> go.Figure:
    """P(target token) and KL(clean || steered) against alpha, on two y axes."""
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=result.alphas, y=result.target_prob, mode="lines+markers",
                             name=f"P({show_token(result.token, 20)})"))
    fig.add_trace(go.Scatter(x=result.alphas, y=result.kl_to_clean, mode="lines+markers", name="KL to clean",
                             yaxis="y2", line={"dash": "dot"}))
    fig.add_hline(y=result.clean_prob, line={"color": "grey", "dash": "dash"}, annotation_text="clean")
    fig.update_layout(xaxis_title="alpha", yaxis={"title": "probability", "rangemode": "tozero"},
                      yaxis2={"title": "KL (nats)", "overlaying": "y", "side": "right", "rangemode": "tozero"},
                      height=360, legend={"orientation": "h", "y": 1.12}, margin={"t": 40})
    return fig


def tongue_thought_figure(result, names: dict[str, str] | None = None) -> go.Figure:
    """P(concept in language) per patched layer; dashed lines: the unpatched target's values."""
    names = names or {}
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
    fig = go.Figure()
    for i, (label, values) in enumerate(result.curves.items()):
        color = palette[i % len(palette)]
        shown = f"P({names.get(label, label)}) · {show_token(result.tokens[label], 16)}"
        fig.add_trace(go.Scatter(x=result.layers, y=values, mode="lines+markers", name=shown,
                                 line={"color": color}))
        base = result.baselines["target"][label]
        fig.add_trace(go.Scatter(x=result.layers, y=[base] * len(result.layers), mode="lines", showlegend=False,
                                 line={"color": color, "dash": "dash", "width": 1}, hoverinfo="skip"))
    # title at the top left, legend in its own column on the right: a horizontal legend above the plot ran into
    # the title as soon as its four entries (long words, CJK) needed more than one row
    fig.update_layout(xaxis_title="layer patched (last-token latent of the source)", yaxis_title="probability",
                      height=400, margin={"t": 60, "r": 10},
                      title={"text": "P(word) after patching each layer · dashed: target prompt without patching",
                             "x": 0.01, "xanchor": "left", "y": 0.97, "yanchor": "top", "font": {"size": 14}},
                      legend={"orientation": "v", "x": 1.02, "xanchor": "left", "y": 1.0, "yanchor": "top",
                              "title": {"text": "solid: patched"}})
    return fig


def generation_diff_html(comparison) -> str:
    """Two rows of tokens; tokens that differ between the clean and the intervened run are highlighted."""
    def row(tokens, ids, other, colour):
        spans = []
        for i, token in enumerate(tokens):
            differs = i >= len(other) or other[i] != ids[i]
            style = f"background:{colour};border-radius:3px;" if differs else ""
            spans.append(f"<span style='{style}padding:0 1px' title='id {ids[i]}'>"
                         f"{html.escape(show_token(token, 40))}</span>")
        return "".join(spans)

    prompt = html.escape("".join(comparison.prompt_tokens))
    mode = f"sampled, seed {comparison.seed}" if comparison.sampled else "greedy"
    return (f"<div style='font-family:monospace;line-height:1.8'>"
            f"<div style='color:#666'>prompt: {prompt} ({mode})</div>"
            f"<div><b>clean</b> {row(comparison.clean_tokens, comparison.clean_ids, comparison.intervened_ids, '#cde5ff')}</div>"
            f"<div><b>intervened</b> {row(comparison.intervened_tokens, comparison.intervened_ids, comparison.clean_ids, '#ffd6cc')}</div>"
            "</div>")
