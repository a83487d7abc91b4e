"""Views of SAE features: token highlighting (HTML), activation histogram, logit table, feature map.

Pure functions (no Streamlit): pages pass the HTML to ``st.markdown(..., unsafe_allow_html=True)`` and
the figures to ``st.plotly_chart``. Token text is HTML-escaped; whitespace is made visible.
"""
from __future__ import annotations

import html
from collections.abc import Sequence

import pandas as pd
import plotly.graph_objects as go

from components.lens_plots import show_token
from engine.sae.metrics import DEAD_DENSITY

HIGHLIGHT_RGB = (255, 120, 0)


def _token_span(token: str, act: float, scale: float, focus: bool) -> str:
    alpha = 0.0 if scale <= 0 else max(0.0, min(1.0, act / scale))
    text = html.escape(show_token(token, 40)) or "∅"
    border = "border-bottom:2px solid #1f77b4;" if focus else ""
    r, g, b = HIGHLIGHT_RGB
    return (f'<span class="le-tok" title="{html.escape(repr(token))}: {act:.3g}" '
            f'style="background:rgba({r},{g},{b},{alpha:.3f});{border}padding:1px 1px;border-radius:2px;">'
            f"{text}</span>")


def highlight_tokens_html(tokens: Sequence[str], acts: Sequence[float], scale: float | None = None,
                          focus: int | None = None, prefix: str = "") -> str:
    """One line of tokens, each coloured by its activation (relative to ``scale``, default the line's max).

    Hovering a token shows its text and value; ``focus`` underlines the example's token.
    """
    scale = float(scale) if scale else max([float(a) for a in acts] + [0.0])
    spans = "".join(_token_span(t, float(a), scale, i == focus) for i, (t, a) in enumerate(zip(tokens, acts)))
    lead = f'<span style="color:#888;font-size:0.8em;margin-right:6px;">{html.escape(prefix)}</span>' if prefix else ""
    return (f'<div class="le-context" style="font-family:monospace;font-size:0.9em;line-height:1.9;'
            f'white-space:normal;margin:2px 0;">{lead}{spans}</div>')


def histogram_figure(hist: pd.DataFrame, title: str = "Activation histogram (non-zero)",
                     mark: Sequence[float] = ()) -> go.Figure:
    """Bars of ``hist`` (columns lo, hi, count); ``mark`` draws vertical lines (e.g. example values)."""
    centres = ((hist["lo"] + hist["hi"]) / 2).tolist()
    widths = (hist["hi"] - hist["lo"]).tolist()
    fig = go.Figure(go.Bar(x=centres, y=hist["count"].tolist(), width=widths, marker_color="rgb(255,140,30)",
                           marker_line_width=0,
                           hovertemplate="%{x:.3g}: %{y} tokens<extra></extra>"))
    for value in mark:
        fig.add_vline(x=float(value), line_dash="dot", line_color="#1f77b4")
    fig.update_layout(title=title, height=260, margin=dict(l=40, r=10, t=40, b=30), bargap=0.02,
                      xaxis_title="activation", yaxis_title="tokens")
    return fig


def logit_table(logits: pd.DataFrame) -> pd.DataFrame:
    """Side-by-side table: tokens the feature promotes (+) and suppresses (−) with their logit effect."""
    up = logits[logits["sign"] == "+"].sort_values("rank")
    down = logits[logits["sign"] == "-"].sort_values("rank")
    n = max(len(up), len(down))

    def column(frame: pd.DataFrame, field: str) -> list:
        values = frame[field].tolist()
        return values + [None] * (n - len(values))

    return pd.DataFrame({"promotes": [show_token(t, 20) if t is not None else None for t in column(up, "token")],
                         "+logit": column(up, "value"),
                         "suppresses": [show_token(t, 20) if t is not None else None for t in column(down, "token")],
                         "−logit": column(down, "value")})


def density_text(density: float) -> str:
    if density <= DEAD_DENSITY:
        return "dead"
    return f"{100 * density:.3g} % of tokens (1 in {1 / density:,.0f})"


def feature_map_figure(coords: pd.DataFrame, color: Sequence[float], color_title: str,
                       labels: Sequence[str] | None = None, highlight: Sequence[int] = ()) -> go.Figure:
    """Scatter of features (columns feature, x, y); each point carries ``[feature]`` in customdata."""
    features = [int(f) for f in coords["feature"]]
    text = [f"#{f}: {labels[i]}" if labels is not None else f"#{f}" for i, f in enumerate(features)]
    fig = go.Figure(go.Scattergl(
        x=coords["x"].tolist(), y=coords["y"].tolist(), mode="markers", text=text,
        customdata=[[f] for f in features], hovertemplate="%{text}<extra></extra>",
        marker=dict(size=5, color=list(color), colorscale="Viridis", showscale=True,
                    colorbar=dict(title=color_title))))
    chosen = set(int(h) for h in highlight)
    if chosen:
        mask = [f in chosen for f in features]
        fig.add_trace(go.Scatter(x=coords["x"][mask].tolist(), y=coords["y"][mask].tolist(), mode="markers",
                                 customdata=[[f] for f, m in zip(features, mask) if m],
                                 marker=dict(size=11, color="rgba(0,0,0,0)", line=dict(color="red", width=2)),
                                 hoverinfo="skip", showlegend=False))
    fig.update_layout(height=560, margin=dict(l=10, r=10, t=30, b=10), showlegend=False,
                      xaxis=dict(showticklabels=False), yaxis=dict(showticklabels=False), dragmode="pan")
    return fig


# --- words next to feature ids: cheap labels, explanations and their scores ---------------------------
SCORE_COLUMNS = ("explanation", "explainer", "detection", "detection_n", "fuzzing", "fuzzing_n", "scored_by",
                 "detection_auc", "fuzzing_auc", "score_error")


def feature_name(feature: int, label: str | None = "", limit: int = 48) -> str:
    """``#12 · Paris, London · →city`` (the label cut to ``limit`` characters), or ``#12`` without a label."""
    label = " ".join(str(label or "").split())
    if len(label) > limit:
        label = label[: limit - 1] + "…"
    return f"#{int(feature)} · {label}" if label else f"#{int(feature)}"


def short_label(label: str | None, act_tokens: str | None = None, limit: int = 18) -> str:
    """A button-sized label: the cheap label, else the dashboard's first two activating tokens."""
    text = " ".join(str(label or "").split(" · ")[0].split())
    if not text:
        text = ", ".join(show_token(t, limit) for t in str(act_tokens or "").split(" | ")[:2] if t.strip())
    if not text:
        return "(no top tokens)"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def feature_words(explanations: pd.DataFrame, scores: pd.DataFrame) -> pd.DataFrame:
    """One row per explained or scored feature, columns ``feature`` + :data:`SCORE_COLUMNS`: its newest
    explanation, and the newest successful scores of that explanation's explainer (else of any explainer, whose
    name is then in ``scored_by``; the scored explanation stands in when the feature has no explanation).
    ``score_error`` is the newest failed scoring's reason for a feature with no successful score, else ""."""
    shown = explanations[["feature", "explanation", "explainer"]].astype({"feature": int})
    failed = scores["error"].fillna("") != ""
    ok = scores[~failed].astype({"feature": int})
    reasons = (scores[failed].astype({"feature": int}).sort_values(["feature", "time"], kind="stable")
               .groupby("feature", as_index=False).tail(1)[["feature", "error"]].rename(columns={"error": "score_error"}))
    ok = ok.assign(**{c: ok[c] if c in ok else float("nan") for c in ("detection_auc", "fuzzing_auc")})
    pairs = set(zip(shown["feature"], shown["explainer"]))
    ok = ok.assign(_same=[(f, e) in pairs for f, e in zip(ok["feature"], ok["explainer"])])
    ok = ok.sort_values(["feature", "_same", "time"], kind="stable").groupby("feature", as_index=False).tail(1)
    best = ok[["feature", "explainer", "explanation", "detection", "detection_n", "fuzzing", "fuzzing_n",
               "detection_auc", "fuzzing_auc"]].rename(
        columns={"explainer": "scored_by", "explanation": "scored_text"})
    out = shown.merge(best, on="feature", how="outer").merge(reasons, on="feature", how="left")
    out["score_error"] = out["score_error"].where(out["detection"].isna() & out["fuzzing"].isna(), "").fillna("")
    out["explanation"] = out["explanation"].fillna(out["scored_text"]).fillna("")
    out["explainer"] = out["explainer"].fillna(out["scored_by"]).fillna("")
    out["scored_by"] = out["scored_by"].fillna("")
    for column in ("detection", "detection_n", "fuzzing", "fuzzing_n", "detection_auc", "fuzzing_auc"):
        out[column] = pd.to_numeric(out[column], errors="coerce")
    return out[["feature", *SCORE_COLUMNS]].sort_values("feature").reset_index(drop=True)


def score_text(value, n) -> str:
    """``0.85 (20 trials)``; ``n/a`` without a score."""
    if value is None or pd.isna(value):
        return "n/a"
    trials = "" if n is None or pd.isna(n) else f" ({int(n)} trials)"
    return f"{float(value):.2f}{trials}"


def with_words(table: pd.DataFrame, labels: dict[int, str], words: pd.DataFrame, *, sort: str | None = None,
               descending: bool = True, min_detection: float = 0.0, limit: int = 1000) -> pd.DataFrame:
    """The feature list with ``label`` and (when any exist) explanation and score columns; ``min_detection``
    keeps features whose detection score reaches it, ``sort`` (``detection`` or ``fuzzing``) re-sorts by that
    score (features without one last)."""
    out = table.assign(label=[labels.get(int(f), "") for f in table["feature"]])
    if len(words):
        out = out.merge(words, on="feature", how="left")
        out[["explanation", "explainer"]] = out[["explanation", "explainer"]].fillna("")
    if min_detection > 0:
        out = out[out["detection"].fillna(-1.0) >= float(min_detection)] if "detection" in out else out.iloc[:0]
    if sort in ("detection", "fuzzing") and sort in out:
        out = out.sort_values([sort, "feature"], ascending=[not descending, True], na_position="last",
                              kind="stable")
    return out.head(int(limit)).reset_index(drop=True)
