"""Views of the guided tours: each tour figure's plain data (``TourResult.figures[name]``) as a Plotly figure,
a table or an HTML snippet. Pure functions (no Streamlit); existing components are reused where they exist.
"""
from __future__ import annotations

from types import SimpleNamespace

import pandas as pd
import plotly.graph_objects as go
from plotly.colors import cyclical, sample_colorscale
from plotly.subplots import make_subplots

from components.concept_plots import PALETTE, geometry_figure
from components.feature_views import highlight_tokens_html, logit_table
from components.intervention_plots import dose_response_figure, tongue_thought_figure
from components.lens_plots import latent_language_figure, show_token

View = tuple[str, object]  # ("figure", go.Figure) | ("table", pd.DataFrame) | ("html", str)


def hub_figure(data: dict) -> go.Figure:
    """Cosine of translations vs unrelated pairs per layer; the band where translations are closest is shaded."""
    fig = go.Figure()
    lo, hi = data["band"]
    fig.add_vrect(x0=lo - 0.5, x1=hi + 0.5, fillcolor="rgba(44,160,44,0.12)", line_width=0,
                  annotation_text="translations closest", annotation_position="top left")
    fig.add_trace(go.Scatter(x=data["layers"], y=data["same"], mode="lines+markers", name="same concept, other language"))
    fig.add_trace(go.Scatter(x=data["layers"], y=data["other"], mode="lines+markers", name="other concept, other language",
                             line={"dash": "dot"}))
    fig.update_layout(xaxis_title="layer", yaxis_title=data["measure"], height=380, margin={"t": 40},
                      legend={"orientation": "h", "y": 1.12})
    return fig


def kl_figure(data: dict) -> go.Figure:
    """KL(final ‖ lens) per layer, one line per lens, on a log axis (the last layer's 0 floored at 1e-4)."""
    fig = go.Figure()
    for k, (name, values) in enumerate(data["curves"].items()):
        fig.add_trace(go.Scatter(x=data["layers"], y=[max(float(v), 1e-4) for v in values], mode="lines+markers",
                                 name=name, line={"color": ["#1f77b4", "#d62728"][k % 2]}))
    fig.update_layout(xaxis={"title": "layer", "type": "category"}, yaxis={"title": "KL to final (nats)", "type": "log"},
                      height=380, margin={"t": 40}, legend={"orientation": "h", "y": 1.12})
    return fig


def probe_curves_figure(data: dict) -> go.Figure:
    """Probe accuracy per layer for several concepts, each with its chance line and first layer at 90 % of best."""
    fig = go.Figure()
    for k, curve in enumerate(data["curves"]):
        color = PALETTE[k]
        fig.add_trace(go.Scatter(x=data["layers"], y=curve["accuracy"], mode="lines+markers", name=curve["label"],
                                 line={"color": color}))
        fig.add_hline(y=curve["chance"], line_dash="dash", line_color=color, opacity=0.5)
        if curve["first_at_90"] is not None:
            fig.add_vline(x=curve["first_at_90"], line_dash="dot", line_color=color,
                          annotation_text=f"90 % of best: {curve['first_at_90']}", annotation_position="bottom right")
    fig.update_layout(xaxis_title="layer", yaxis={"title": "grouped cross-validated accuracy", "range": [0, 1.02]},
                      height=400, margin={"t": 40}, legend={"orientation": "h", "y": 1.12})
    return fig


def cycle_colors(n: int) -> list[str]:
    """``n`` colours around a cyclic scale: neighbours in the calendar get neighbouring hues, and the last item's
    hue runs back into the first's, so the colours alone show whether the order goes round."""
    return sample_colorscale(cyclical.Phase, [i / n for i in range(n)])


def cycles_figure(data: dict) -> go.Figure:
    """Days and months on their top two principal components: context points (faint) and their averages,
    joined in calendar order (a circle if the order runs around)."""
    sets = data["sets"]
    fig = make_subplots(rows=1, cols=len(sets), subplot_titles=[f"{name} · score {s['score']:.2f}"
                                                                for name, s in sets.items()])
    for col, (name, s) in enumerate(sets.items(), start=1):
        points, means = s["points"], s["means"]
        colors = cycle_colors(len(means))
        fig.add_trace(go.Scatter(x=[p[0] for p in points], y=[p[1] for p in points], mode="markers", showlegend=False,
                                 marker={"size": 5, "opacity": 0.35, "color": [colors[i] for i in s["point_item"]]},
                                 text=[s["items"][i] for i in s["point_item"]], hovertemplate="%{text}<extra></extra>"),
                      row=1, col=col)
        loop = means + means[:1]
        fig.add_trace(go.Scatter(x=[m[0] for m in loop], y=[m[1] for m in loop], mode="lines+markers+text",
                                 showlegend=False, text=[w[:3] for w in s["items"]] + [""], textposition="top center",
                                 line={"color": "gray", "width": 1}, marker={"size": 10, "color": colors + colors[:1]},
                                 hovertext=s["items"] + s["items"][:1], hovertemplate="%{hovertext}<extra></extra>"),
                      row=1, col=col)
        fig.update_xaxes(title_text="PC 1", zeroline=True, row=1, col=col)
        fig.update_yaxes(title_text="PC 2", zeroline=True, row=1, col=col)
    fig.update_layout(height=420, margin={"t": 50}, title=f"layer {data['layer']}")
    return fig


def cycle_scores_figure(data: dict) -> go.Figure:
    """Circular-order score per layer for days and months, each with its chance level (dashed, in the legend, so
    two nearly equal chance levels cannot print their labels over each other) and the projected layer dotted."""
    fig = go.Figure()
    ends = [data["layers"][0], data["layers"][-1]]
    for k, (name, values) in enumerate(data["curves"].items()):
        fig.add_trace(go.Scatter(x=data["layers"], y=values, mode="lines+markers", name=name,
                                 line={"color": PALETTE[k]}))
        fig.add_trace(go.Scatter(x=ends, y=[data["chance"][name]] * 2, mode="lines", name=f"random order, {name}",
                                 line={"color": PALETTE[k], "dash": "dash", "width": 1}, opacity=0.6,
                                 hovertemplate=f"random order, {name}: %{{y:.3f}}<extra></extra>"))
    fig.add_vline(x=data["chosen"], line_dash="dot", line_color="gray")
    fig.update_layout(xaxis_title=f"layer (dotted: layer {data['chosen']}, the one projected)",
                      yaxis={"title": "circular-order score", "range": [-0.02, 1.02]},
                      height=340, margin={"t": 40}, legend={"orientation": "h", "y": 1.12})
    return fig


def contexts_html(data: dict) -> str:
    rows = [highlight_tokens_html(c["tokens"], c["acts"], focus=c["focus"], prefix=f"#{k + 1}")
            for k, c in enumerate(data["contexts"])]
    return "".join(rows) or "<i>no contexts</i>"


def tongue_figure(data: dict) -> go.Figure:
    result = SimpleNamespace(layers=data["layers"], curves=data["curves"], baselines=data["baselines"],
                             tokens=data["tokens"])
    return tongue_thought_figure(result, data.get("names"))


def tour_view(data: dict) -> View:
    """The view of one tour figure, by its ``kind``."""
    kind = data["kind"]
    if kind == "latent_language":
        return "figure", latent_language_figure(data["summary"], data["target_name"])
    if kind == "spread":
        return "figure", geometry_figure({"layers": data["layers"], "measures": data["measures"]}, height=460)
    if kind == "tongue_thought":
        return "figure", tongue_figure(data)
    if kind == "dose":
        return "figure", dose_response_figure(SimpleNamespace(**{k: v for k, v in data.items() if k != "kind"}))
    if kind == "logits":
        return "table", logit_table(pd.DataFrame(data["logits"]))
    if kind in ("shift_table", "pair_table"):
        return "table", pd.DataFrame(data["rows"])
    if kind == "contexts":
        return "html", contexts_html(data)
    builders = {"hub": hub_figure, "kl_curves": kl_figure, "probe_curves": probe_curves_figure,
                "cycles": cycles_figure, "cycle_scores": cycle_scores_figure}
    if kind not in builders:
        raise ValueError(f"unknown tour figure kind '{kind}'")
    return "figure", builders[kind](data)


def verdict_badge(matches: bool | None) -> str:
    """A short Markdown badge for ``TourResult.matches_paper``."""
    return {True: ":green-badge[matches the paper]", False: ":orange-badge[differs from the paper]",
            None: ":gray-badge[cannot tell on this model]"}[matches]


__all__ = ["tour_view", "verdict_badge", "show_token"]
