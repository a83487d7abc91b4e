"""Static exports of the explorer's views: one self-contained HTML file each (no Streamlit).

Every file carries its data (tables, token contexts, numbers), Plotly's JavaScript embedded once (the same
bundle ``fig.to_html(include_plotlyjs=True)`` inlines), inline CSS and a system font stack: it opens offline and
makes no network request. PNG export is Plotly's own: each figure's toolbar has "Download plot as a png".

:func:`figure_html` is the generic page (title, source, notes, figures, HTML blocks, tables); the views are a
few lines on top of it: :func:`feature_html` (an SAE feature page), :func:`lens_html` (a lens run) and
:func:`concept_html` (a concept projection). :func:`feature_tables`, :func:`table_csv` and :func:`table_parquet`
give the feature's tables as files.
"""
from __future__ import annotations

import html
import io
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache

import pandas as pd
import plotly.graph_objects as go

from components.feature_views import density_text, highlight_tokens_html, histogram_figure, logit_table
from components.lens_plots import show_token

PNG_NOTE = ("Figures are interactive (zoom, pan, hover). For a PNG, use the camera icon “Download plot as a png” "
            "in a figure's toolbar (top right, on hover).")
FOLD_ROWS = 30  # longer tables are folded into a <details> element
CSS = """
:root { color-scheme: light; }
body { margin: 0; background: #fafafa; color: #1f2328;
       font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1200px; margin: 0 auto; padding: 24px 32px 48px; background: #fff; }
h1 { font-size: 1.6em; margin: 0 0 6px; }
h2 { font-size: 1.15em; margin: 26px 0 8px; border-bottom: 1px solid #e5e7eb; padding-bottom: 4px; }
p { margin: 6px 0; line-height: 1.5; }
.source { color: #57606a; font-size: 0.88em; }
.caption { color: #6e7781; font-size: 0.82em; }
.stats { display: flex; flex-wrap: wrap; gap: 10px 28px; margin: 12px 0; }
.stat { min-width: 120px; }
.stat .k { color: #6e7781; font-size: 0.8em; }
.stat .v { font-size: 1.35em; font-weight: 600; }
table { border-collapse: collapse; font-size: 0.86em; margin: 6px 0 12px; }
th, td { border: 1px solid #d0d7de; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f6f8fa; font-weight: 600; }
td { font-variant-numeric: tabular-nums; }
details { margin: 6px 0 12px; }
summary { cursor: pointer; color: #0969da; }
.le-context { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, "Liberation Mono", monospace; }
.plotly-graph-div { margin: 4px 0 4px; }
"""


@lru_cache(maxsize=1)
def plotly_js() -> str:
    """Plotly's JavaScript bundle (about 4.8 MB), as ``fig.to_html(include_plotlyjs=True)`` inlines it."""
    from plotly.offline import get_plotlyjs

    return get_plotlyjs()


def now_text() -> str:
    """The export time, local, to the second, with the UTC offset."""
    return datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %z")


def file_name(*parts, ext: str = "html") -> str:
    """A safe file name from a few parts: ``feature-12-tiny-sae.html``."""
    stem = "-".join(re.sub(r"[^A-Za-z0-9._-]+", "_", str(p)).strip("_.-") for p in parts if str(p).strip())
    return f"{stem or 'export'}.{ext}"


def esc(text) -> str:
    return html.escape(str(text), quote=True)


def table_html(frame: pd.DataFrame, digits: int = 4) -> str:
    """A plain HTML table (values escaped, floats to ``digits`` significant digits, no index)."""
    return frame.to_html(index=False, escape=True, na_rep="", border=0, classes="data",
                         float_format=lambda v: f"{v:.{digits}g}")


def _figure_div(fig: go.Figure, number: int, png_name: str) -> str:
    config = {"displaylogo": False, "responsive": True,
              "toImageButtonOptions": {"format": "png", "filename": f"{png_name}-{number}", "scale": 2}}
    return fig.to_html(full_html=False, include_plotlyjs=False, config=config, div_id=f"figure-{number}",
                       default_width="100%")


def _figures(fig) -> list[go.Figure]:
    if fig is None:
        return []
    if isinstance(fig, go.Figure):
        return [fig]
    return [f for f in fig if f is not None]


def _source_line(source: Mapping[str, object] | None, created: str) -> str:
    items = [f"<b>{esc(k)}</b>: {esc(v)}" for k, v in (source or {}).items() if v not in (None, "")]
    items.append(f"<b>exported</b>: {esc(created)}")
    return f'<p class="source">{" · ".join(items)}</p>'


def figure_html(fig: go.Figure | Sequence[go.Figure] | None, title: str, notes: Sequence[str] = (),
                tables: Mapping[str, pd.DataFrame] | None = None, *, subtitle: str = "", intro: str = "",
                source: Mapping[str, object] | None = None, blocks: Sequence[tuple[str, str]] = (),
                created: str | None = None, png_name: str = "figure") -> str:
    """One self-contained HTML page: ``title``, the ``source`` line (with the export time), ``notes`` (plain
    text, escaped), ``intro`` (trusted HTML), the figure(s), ``blocks`` (``(heading, trusted HTML)``, e.g. highlighted tokens) and
    ``tables`` (``{heading: DataFrame}``; those over :data:`FOLD_ROWS` rows folded). Plotly's JS is inlined once,
    and only when there is a figure."""
    figures = _figures(fig)
    created = created or now_text()
    parts = [f"<h1>{esc(title)}</h1>"]
    if subtitle:
        parts.append(f"<p><b>{esc(subtitle)}</b></p>")
    parts.append(_source_line(source, created))
    parts += [f"<p>{esc(note)}</p>" for note in notes if str(note).strip()]
    parts.append(intro)
    for number, figure in enumerate(figures, 1):
        parts.append(_figure_div(figure, number, png_name))
    if figures:
        parts.append(f'<p class="caption">{esc(PNG_NOTE)}</p>')
    for heading, block in blocks:
        parts.append((f"<h2>{esc(heading)}</h2>" if heading else "") + block)
    for heading, frame in (tables or {}).items():
        body = table_html(frame) if len(frame) else '<p class="caption">(empty)</p>'
        if len(frame) > FOLD_ROWS:
            body = f"<details><summary>{len(frame):,} rows</summary>{body}</details>"
        parts.append(f"<h2>{esc(heading)}</h2>{body}")
    script = f'<script type="text/javascript">{plotly_js()}</script>\n' if figures else ""
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{esc(title)}</title>\n<style>{CSS}</style>\n{script}</head>\n"
            f"<body><main>\n" + "\n".join(parts) + "\n</main></body>\n</html>\n")


# --- SAE feature page ---------------------------------------------------------------------------------
def dashboard_source(manifest: Mapping, name: str = "") -> dict[str, object]:
    """Where a feature comes from: model, SAE (site, layer, width) and the dashboard build."""
    sae = (f"{manifest.get('sae_name', '?')} ({manifest.get('architecture', '?')}, {manifest.get('site', '?')} "
           f"L{manifest.get('layer', '?')}, {int(manifest.get('d_sae', 0)):,} features)")
    build = f"{name or manifest.get('key', '')}, built {manifest.get('created', '?')}"
    if manifest.get("n_rows"):
        build += f" on {int(manifest['n_rows']):,} tokens"
    if manifest.get("store_path"):
        build += f" of store {str(manifest['store_path']).rstrip('/').split('/')[-1]}"
    return {"model": manifest.get("model", ""), "SAE": sae, "dashboard": build}


def _context_text(ctx: Mapping) -> str:
    return "".join(str(t) for t in ctx["tokens"])


def _examples(frame: pd.DataFrame, contexts: Sequence[Mapping] | None) -> pd.DataFrame:
    out = frame.drop(columns=[c for c in ("row",) if c in frame]).reset_index(drop=True)
    if contexts is not None and len(contexts) == len(frame):
        out["token"] = [show_token(str(c["tokens"][c["focus"]]), 40) for c in contexts]
        out["context"] = [_context_text(c) for c in contexts]
    return out


def feature_tables(data: Mapping[str, pd.DataFrame], contexts: Sequence[Mapping] | None = None,
                   interval_contexts: Sequence[Mapping] | None = None) -> dict[str, pd.DataFrame]:
    """The feature's tables as plain frames (for CSV / parquet): ``stats``, ``top_activations`` (with the
    token and its context text when ``contexts`` are given), ``interval_samples``, ``histogram``, ``logits``,
    ``neighbours``, ``cooccurring``."""
    stats = pd.DataFrame([dict(data["stats"])])
    return {"stats": stats,
            "top_activations": _examples(data["top"], contexts),
            "interval_samples": _examples(data["intervals"], interval_contexts),
            "histogram": data["histogram"].reset_index(drop=True),
            "logits": data["logits"].reset_index(drop=True),
            "neighbours": data["neighbours"].reset_index(drop=True),
            "cooccurring": data["cooccurring"].reset_index(drop=True)}


def table_csv(frame: pd.DataFrame) -> str:
    return frame.to_csv(index=False)


def table_parquet(frame: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    return buffer.getvalue()


def _stat_cells(stats: Mapping) -> str:
    cells = [("Density", f"{100 * float(stats['density']):.3g} %", density_text(float(stats["density"]))),
             ("Max activation", f"{float(stats['max_act']):.4g}", ""),
             ("Mean when firing", f"{float(stats['mean_act']):.4g}", ""),
             ("Firing tokens", f"{int(stats['count']):,}", "")]
    body = "".join(f'<div class="stat"><div class="k">{esc(k)}</div><div class="v">{esc(v)}</div>'
                   f'<div class="k">{esc(sub)}</div></div>' for k, v, sub in cells)
    return f'<div class="stats">{body}</div>'


def _contexts_block(contexts: Sequence[Mapping], acts: Sequence[float], scale: float) -> str:
    return "".join(highlight_tokens_html(c["tokens"], c["acts"], scale, c.get("focus"), prefix=f"{float(a):.3g}")
                   for c, a in zip(contexts, acts))


def _interval_block(samples: pd.DataFrame, contexts: Sequence[Mapping], scale: float) -> str:
    blocks = []
    for _, group in samples.reset_index(drop=True).groupby("interval", sort=False):
        first = group.iloc[0]
        blocks.append(f"<p><b>Interval {float(first['lo']):.3g} – {float(first['hi']):.3g}</b></p>")
        blocks += [highlight_tokens_html(contexts[i]["tokens"], contexts[i]["acts"], scale, contexts[i].get("focus"),
                                         prefix=f"{float(group.loc[i, 'act']):.3g}") for i in group.index]
    return "".join(blocks)


def _explanation_notes(explanation: Mapping | None) -> list[str]:
    if not explanation or not str(explanation.get("explanation") or "").strip():
        return []
    note = f"Explanation: {' '.join(str(explanation['explanation']).split())}"
    if explanation.get("explainer"):
        note += f" (by {explanation['explainer']})"
    scores = [f"{name} {float(explanation[name]):.2f}" for name in ("detection", "fuzzing")
              if explanation.get(name) is not None and not pd.isna(explanation.get(name))]
    return [note] + ([f"Scores: {', '.join(scores)} (balanced accuracy; 0.5 is chance)"] if scores else [])


def feature_html(feature: int, data: Mapping, contexts: Sequence[Mapping] = (), *, label: str = "",
                 explanation: Mapping | None = None, manifest: Mapping | None = None, dashboard: str = "",
                 interval_contexts: Sequence[Mapping] | None = None, created: str | None = None) -> str:
    """An SAE feature page: title (with its label), explanation and scores, density and activation stats,
    the activation histogram, top activating contexts (highlighted tokens), interval samples, the logit table
    (promoted / suppressed tokens), nearest and co-occurring features, and the source (model, SAE, build).

    ``data`` is :meth:`engine.features.read.Dashboard.feature`; ``contexts`` its top rows' contexts
    (:meth:`~engine.features.read.Dashboard.contexts`), ``interval_contexts`` those of the interval samples."""
    feature = int(feature)
    stats, top = data["stats"], data["top"]
    scale = float(stats["max_act"]) or 1.0
    hist = data["histogram"]
    figure = histogram_figure(hist, mark=top["act"].tolist()[:1]) if len(hist) else None
    blocks = []
    if contexts:
        blocks.append((f"Top activations ({len(contexts)})", _contexts_block(contexts, top["act"].tolist(), scale)))
    samples = data["intervals"]
    if interval_contexts and len(interval_contexts) == len(samples):
        blocks.append(("Samples from activation intervals", _interval_block(samples, interval_contexts, scale)))
    tables = feature_tables(data, contexts or None, interval_contexts)
    shown = {"Logit effects (decoder direction · final-norm gain · unembedding)": logit_table(data["logits"]),
             "Top activations (table)": tables["top_activations"],
             "Nearest features (decoder cosine)": tables["neighbours"],
             "Fires together with (Jaccard index)": tables["cooccurring"],
             "Activation histogram (bins)": tables["histogram"]}
    notes = _explanation_notes(explanation)
    if bool(stats.get("dead")):
        notes.append("This feature never fired on the store's tokens.")
    title = f"Feature #{feature}" + (f" — {' '.join(str(label).split())}" if str(label or "").strip() else "")
    return figure_html(figure, title, notes, shown, source=dashboard_source(manifest or {}, dashboard),
                       intro=_stat_cells(stats), blocks=blocks, created=created, png_name=f"feature-{feature}")


# --- lens and concept views ---------------------------------------------------------------------------
def lens_tables(result) -> dict[str, pd.DataFrame]:
    """A lens run as tables: the top-1 token (and probability) per layer and position, and every cell."""
    columns = [f"{p}:{show_token(result.tokens[p], 16)}" for p in result.positions]
    grid = pd.DataFrame([[f"{show_token(result.top_tokens[r][j][0], 16)} ({float(result.top_probs[r, j, 0]):.2f})"
                          for j in range(len(result.positions))] for r in range(len(result.row_names))],
                        columns=columns)
    grid.insert(0, "layer", list(result.row_names))
    return {"Top-1 token (probability) per layer × position": grid.iloc[::-1].reset_index(drop=True),
            "Every cell": pd.DataFrame(result.to_records())}


def lens_html(result, figures: go.Figure | Sequence[go.Figure], *, title: str | None = None,
              notes: Sequence[str] = (), source: Mapping[str, object] | None = None,
              created: str | None = None) -> str:
    """A lens view: the figures built by :mod:`components.lens_plots` (heatmap, tracked lines, latent
    language) for ``result`` (:class:`engine.lens.logit.LensResult`), its input tokens and its tables."""
    prompt = "".join(result.tokens)
    lines = [f"Input ({len(result.tokens)} tokens): {prompt}",
             f"Tokens: {' | '.join(show_token(t, 40) for t in result.tokens)}"]
    if result.tracked_notes:
        lines.append("Tracked: " + "; ".join(result.tracked_notes))
    if result.self_check_max_abs_diff == result.self_check_max_abs_diff:  # not NaN
        lines.append(f"Self-check: last layer through the lens vs the model's logits, max |Δ| = "
                     f"{result.self_check_max_abs_diff:.2g}")
    name = title or f"{result.lens.capitalize()} lens"
    return figure_html(figures, name, [*lines, *notes], lens_tables(result), source=source, created=created,
                       png_name=f"{result.lens}-lens")


def concept_html(fig: go.Figure, points: pd.DataFrame, *, title: str = "Concept projection",
                 notes: Sequence[str] = (), source: Mapping[str, object] | None = None,
                 created: str | None = None) -> str:
    """A concept projection: the scatter (:func:`components.concept_plots.scatter_figure`) and its points."""
    return figure_html(fig, title, notes, {f"Points ({len(points):,})": points}, source=source, created=created,
                       png_name="concept-projection")
