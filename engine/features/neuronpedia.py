"""Neuronpedia: export a dashboard build in Neuronpedia's upload layout; import such an export to browse it offline.

**Export** (:func:`export_neuronpedia`) writes ``<out>/<modelId>/<sourceId>/`` as Neuronpedia's own export tools
do: ``features/batch-<n>.jsonl.gz`` and ``activations/batch-<n>.jsonl.gz`` (gzipped JSON lines: one record per
feature, one per example; ``features_per_batch`` features per file pair, written batch by batch, each file
atomically) and the one-line metadata files ``model.jsonl``, ``source.jsonl``, ``sourceset.jsonl`` and
``release.jsonl``. The source id is ``<layer>-<set name>``, e.g. ``9-res-le-16k``.

Feature records fill ``modelId``, ``layer`` (the source id), ``index`` (a string), ``maxActApprox`` (the exact max
over the store), ``frac_nonzero`` (the density), ``freq_hist_data_bar_heights``/``_values`` (every histogram bin:
counts and bin centres), ``pos_str``/``pos_values`` and ``neg_str``/``neg_values`` (top and bottom logit tokens),
``topkCosSimIndices``/``topkCosSimValues`` (decoder neighbours, self excluded), ``creatorId`` and ``createdAt``.
Left empty (dashboards do not hold them): ``logits_hist_data_bar_heights``/``_values`` (only the top and bottom
logits are kept, not the whole vocabulary's), ``vector``/``hasVector``/``hookName``/``vectorLabel``,
``neuron_alignment_*``, ``correlated_neurons_*``, ``correlated_features_*`` (our co-occurrence is a Jaccard index,
not a Pearson correlation) and ``decoder_weights_dist``.

Activation records (top examples, then interval samples) fill ``id``, ``modelId``, ``layer``, ``index``,
``tokens``, ``values`` (the feature's activation on each token of a window around the example, BOS zeroed),
``maxValue``, ``maxValueTokenIndex``, ``minValue``, ``qualifyingTokenIndex`` (the example's own token),
``binMin``/``binMax`` (the interval's bounds; -1 for top examples, with ``binContains`` -1) and ``dataIndex``
(the store's document id). Left empty: ``dfaValues``/``dfaTargetIndex``/``dfaMaxValue``, ``lossValues``,
``logitContributions``, ``dataSource`` and the intervals' ``binContains``.

**Import** (:func:`import_neuronpedia`) turns an export (ours or Neuronpedia's) into a dashboard folder that
:class:`~engine.features.read.Dashboard` opens. The manifest says ``"source": "neuronpedia"`` and lists under
``approximate`` what is estimated: ``n_rows`` (from ``num_prompts`` x ``num_tokens_in_prompt`` unless our notes
give it), ``density`` (Neuronpedia's own sample), ``count`` (density x n_rows), ``mean_act`` (from the
histogram), ``max_act`` (``maxActApprox``) and the histograms' bin edges. ``token_id`` is -1 (exports hold token
strings only) and ``cooccurrence`` is empty. A feature's activations are expected in one batch file. Token windows
go to ``contexts.parquet``: :func:`open_dashboard` returns an :class:`ImportedDashboard` whose ``contexts`` reads
them; it has no SAE or store, so the feature map and "what fires on my text" answer with a sentence. The reading
side lives in :mod:`engine.features.neuronpedia_import` and is re-exported here.
"""
from __future__ import annotations

import copy
import gzip
import hashlib
import json
import math
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.core.devices import module_device, pick_device, to_host
from engine.core.fileio import atomic_write
from engine.core.progress import Progress, report
from engine.core.sites import get_site
from engine.features.folder import decode_tokens
from engine.features.neuronpedia_import import (
    APPROXIMATE,
    CONTEXTS,
    SET_PREFIX,
    SOURCE,
    ImportedDashboard,
    NeuronpediaError,
    import_neuronpedia,
    open_dashboard,
)
from engine.features.read import Dashboard

__all__ = ["APPROXIMATE", "CONTEXTS", "SET_PREFIX", "SOURCE", "ImportedDashboard", "NeuronpediaError",
           "export_neuronpedia", "import_neuronpedia", "open_dashboard", "source_ids"]
_BAD_ID = re.compile(r"[^A-Za-z0-9._-]")


@dataclass
class _Ident:
    model: str
    source: str
    set_name: str
    creator: str
    created: str


# --- export --------------------------------------------------------------------------------------
def source_ids(manifest: dict, model_id: str | None = None, source_set: str | None = None) -> tuple[str, str, str]:
    """``(modelId, source id, set name)`` of a build: ``gemma-3-270m``, ``9-res-le-16k``, ``res-le-16k``."""
    site, d_sae = str(manifest["site"]), int(manifest["d_sae"])
    model_id = model_id or re.sub(r"[^a-z0-9._-]+", "-", str(manifest.get("model") or "model").split("/")[-1]
                                  .lower()).strip("-.") or "model"
    width = f"{d_sae // 1024}k" if d_sae % 1024 == 0 else str(d_sae)
    source_set = source_set or f"{SET_PREFIX.get(site, site)}-le-{width}"
    for what, value in (("model id", model_id), ("source set", source_set)):
        if _BAD_ID.search(value):
            raise NeuronpediaError(f"The Neuronpedia {what} '{value}' may only hold letters, digits, '-', '_', '.'.")
    return model_id, f"{int(manifest['layer'])}-{source_set}", source_set


def _windows(store, rows: torch.Tensor, before: int, after: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lo, hi)`` store rows of each example's window: up to ``before`` tokens before it, ``after`` after,
    inside its context window (as :meth:`Dashboard.contexts`)."""
    positions = store.positions()
    starts = torch.nonzero(positions == 0).squeeze(1)
    bound = torch.cat([starts, torch.tensor([store.n_tokens])])[torch.searchsorted(starts, rows, right=True)]
    lo = rows - torch.minimum(positions[rows], torch.full_like(rows, before))
    return lo, torch.minimum(rows + after + 1, bound)


@torch.no_grad()
def _window_acts(dash: Dashboard, sae, feats: torch.Tensor, rows: torch.Tensor, before: int, after: int
                 ) -> list[tuple[list[int], list[float], int]]:
    """``(token ids, activations of its feature, focus)`` per example; each store row is encoded once per call."""
    store = dash.store()
    lo, hi = _windows(store, rows, before, after)
    lengths = hi - lo
    flat = torch.cat([torch.arange(a, b) for a, b in zip(lo.tolist(), hi.tolist())])
    owner = torch.repeat_interleave(feats, lengths)  # the feature each flat token is read for
    unique, inverse = torch.unique(flat, return_inverse=True)
    acts = torch.zeros(flat.numel())
    device = module_device(sae)
    chunk = max(1, 2**24 // sae.d_sae)
    for start in range(0, unique.numel(), chunk):
        block = sae.encode(store.read(dash.site, dash.layer, unique[start:start + chunk]).to(device))  # [c, d_sae]
        hit = (inverse >= start) & (inverse < start + chunk)
        acts[hit] = to_host(block[(inverse[hit] - start).to(device), owner[hit].to(device)], torch.float32)
    acts[store.positions()[flat] == 0] = 0.0
    ids, out, offset = store.token_ids()[flat], [], 0
    for row, first, n in zip(rows.tolist(), lo.tolist(), lengths.tolist()):
        out.append((ids[offset:offset + n].tolist(), acts[offset:offset + n].tolist(), row - first))
        offset += n
    return out


def _feature_record(ident: _Ident, f: int, stats: dict, hist, logits, neigh, n_bins: int) -> dict:
    heights, values = [], []
    if hist is not None:
        width = float(hist["hi"].iloc[0] - hist["lo"].iloc[0])
        heights = [0] * max(n_bins, int(hist["bin"].max()) + 1)
        for b, c in zip(hist["bin"].tolist(), hist["count"].tolist()):
            heights[int(b)] = int(c)
        values = [(b + 0.5) * width for b in range(len(heights))]
    sides = {sign: (logits[logits["sign"] == sign] if logits is not None else None) for sign in "+-"}
    return {"modelId": ident.model, "layer": ident.source, "index": str(f), "creatorId": ident.creator,
            "createdAt": ident.created, "maxActApprox": float(stats["max_act"]), "hasVector": False, "vector": [],
            "vectorLabel": None, "vectorDefaultSteerStrength": 10, "hookName": None,
            "topkCosSimIndices": [] if neigh is None else [int(i) for i in neigh["neighbour"]],
            "topkCosSimValues": [] if neigh is None else [float(v) for v in neigh["cosine"]],
            **{key: [] for key in ("neuron_alignment_indices", "neuron_alignment_values", "neuron_alignment_l1",
                                   "correlated_neurons_indices", "correlated_neurons_pearson",
                                   "correlated_neurons_l1", "correlated_features_indices",
                                   "correlated_features_pearson", "correlated_features_l1")},
            **{f"{name}_str": [] if side is None else [str(t) for t in side["token"]]
               for name, side in (("neg", sides["-"]), ("pos", sides["+"]))},
            **{f"{name}_values": [] if side is None else [float(v) for v in side["value"]]
               for name, side in (("neg", sides["-"]), ("pos", sides["+"]))},
            "frac_nonzero": float(stats["density"]), "freq_hist_data_bar_heights": heights,
            "freq_hist_data_bar_values": values, "logits_hist_data_bar_heights": [],
            "logits_hist_data_bar_values": [], "decoder_weights_dist": []}


def _activation_record(ident: _Ident, f: int, example, tokens: list[str], values: list[float], focus: int) -> dict:
    top = example.kind == 0
    peak = max(range(len(values)), key=values.__getitem__)
    key = f"{ident.model}/{ident.source}/{f}/{example.kind}/{example.k1}/{example.k2}/{example.row}"
    return {"id": "c" + hashlib.sha1(key.encode()).hexdigest()[:24], "tokens": tokens, "index": str(f),
            "layer": ident.source, "modelId": ident.model, "maxValue": values[peak], "maxValueTokenIndex": peak,
            "minValue": min(values), "values": values, "creatorId": ident.creator, "dataSource": None,
            "dataIndex": str(int(example.doc)), "dfaValues": [], "dfaTargetIndex": None, "dfaMaxValue": None,
            "createdAt": ident.created, "lossValues": [], "logitContributions": None,
            "binMin": -1.0 if top else float(example.lo), "binMax": -1.0 if top else float(example.hi),
            "binContains": -1.0 if top else None, "qualifyingTokenIndex": focus}


def _batch_records(dash: Dashboard, sae, tokenizer, ident: _Ident, start: int, stop: int, before: int,
                   after: int) -> tuple[list[dict], list[dict]]:
    rng = [start, stop - 1]
    where = "WHERE feature BETWEEN ? AND ? ORDER BY feature"
    stats = dash.query(f"SELECT feature, density, max_act FROM features {where}", rng)
    group = {name: {int(f): part for f, part in dash.query(sql, rng).groupby("feature")} for name, sql in (
        ("hist", f"SELECT feature, bin, lo, hi, count FROM histograms {where}, bin"),
        ("logits", f"SELECT feature, sign, token, value FROM logits {where}, sign, rank"),
        ("neigh", f"SELECT feature, neighbour, cosine FROM neighbours {where}, rank"))}
    n_bins = int((dash.manifest.get("config") or {}).get("n_bins", 0))
    features = [_feature_record(ident, int(row.feature), row._asdict(), group["hist"].get(int(row.feature)),
                                group["logits"].get(int(row.feature)), group["neigh"].get(int(row.feature)), n_bins)
                for row in stats.itertuples(index=False)]
    examples = dash.query(
        "SELECT feature, 0 AS kind, rank AS k1, 0 AS k2, CAST(-1 AS DOUBLE) AS lo, CAST(-1 AS DOUBLE) AS hi, row, "
        "doc FROM top_examples WHERE feature BETWEEN ? AND ? UNION ALL SELECT feature, 1, -interval, rank, lo, hi, "
        "row, doc FROM intervals WHERE feature BETWEEN ? AND ? ORDER BY feature, kind, k1, k2", rng + rng)
    if not len(examples):
        return features, []
    windows = _window_acts(dash, sae, torch.tensor(examples["feature"].tolist()),
                           torch.tensor(examples["row"].tolist()), before, after)
    words = decode_tokens(tokenizer, [i for ids, _, _ in windows for i in ids])
    activations = [_activation_record(ident, int(example.feature), example, [words[i] for i in ids], values, focus)
                   for example, (ids, values, focus) in zip(examples.itertuples(index=False), windows)]
    return features, activations


def _write_jsonl_gz(path: Path, records: Iterable[dict]) -> None:
    def write(tmp: Path) -> None:
        with gzip.open(tmp, "wt", encoding="utf-8", compresslevel=5) as handle:
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")

    atomic_write(path, write)


def _write_metadata(root: Path, dash: Dashboard, ident: _Ident, creator_name: str) -> None:
    manifest, store = dash.manifest, dash.store()
    prompts = int((store.positions() == 0).sum())
    notes = (f"Exported by Latent Explorer from the dashboard '{dash.path.name}' ({manifest['n_rows']} tokens, "
             f"site {dash.site}, layer {dash.layer}).")
    common = {"creatorId": ident.creator, "createdAt": ident.created}
    records = {
        "model": {"id": ident.model, "instruct": False, "displayNameShort": ident.model,
                  "displayName": str(manifest.get("model") or ident.model), "tlensId": None,
                  "dimension": None if get_site(dash.site).wide else manifest.get("d_in"), "visibility": "PUBLIC",
                  "defaultSourceSetName": ident.set_name, "defaultSourceId": ident.source, "inferenceEnabled": False,
                  "layers": 0, "neuronsPerLayer": 0, "owner": "", "updatedAt": ident.created, "website": None},
        "source": {"id": ident.source, "modelId": ident.model, "setName": ident.set_name, "hasDashboards": True,
                   "inferenceEnabled": False, "inferenceHosts": [], "saelensConfig": None, "saelensRelease": None,
                   "saelensSaeId": None, "hfRepoId": None, "hfFolderId": None, "visibility": "PUBLIC",
                   "defaultOfModelId": None, "hasUmap": False, "hasUmapLogSparsity": False,
                   "hasUmapClusters": False, "num_prompts": prompts,
                   "num_tokens_in_prompt": int(store.manifest.get("context_length") or 0),
                   "dataset": store.manifest.get("corpus"), "notes": notes},
        "sourceset": {"modelId": ident.model, "name": ident.set_name, "hasDashboards": True, "visibility": "PUBLIC",
                      "description": f"{dash.site} - {manifest['d_sae']} features", "type": "",
                      "creatorName": creator_name, "urls": [], "creatorEmail": None, "releaseName": ident.set_name,
                      "defaultOfModelId": None, "defaultRange": 1, "defaultShowBreaks": True, "showDfa": False,
                      "showCorrelated": False, "showHeadAttribution": False, "showUmap": False},
        "release": {"name": ident.set_name, "description": notes, "creatorName": creator_name,
                    "visibility": "PUBLIC", "isNewUi": False, "featured": False, "descriptionShort": notes,
                    "urls": [], "creatorEmail": None, "creatorNameShort": creator_name,
                    "defaultSourceSetName": ident.set_name, "defaultSourceId": ident.source,
                    "defaultUmapSourceIds": []}}
    for name, record in records.items():
        text = json.dumps({**record, **common}, ensure_ascii=False, default=str) + "\n"
        atomic_write(root / f"{name}.jsonl", lambda tmp, text=text: tmp.write_text(text, encoding="utf-8"))


def export_neuronpedia(dashboard: str | Path | Dashboard, out: str | Path, tokenizer, *, model_id: str | None = None,
                       source_set: str | None = None, creator_id: str = "latent-explorer",
                       creator_name: str = "Latent Explorer", features_per_batch: int = 128, before: int = 32,
                       after: int = 16, device: str = "cpu", progress: Progress | None = None) -> Path:
    """Write a built dashboard as a Neuronpedia export; returns ``<out>/<modelId>/<sourceId>``.

    Token windows (``before``/``after`` tokens around each example) are rebuilt from the dashboard's store and SAE,
    ``tokenizer`` (the store model's) turns them into strings. Only one batch of records is held in memory.
    """
    dash = dashboard if isinstance(dashboard, Dashboard) else Dashboard.open(dashboard)
    if dash.manifest.get("source") == SOURCE:
        raise NeuronpediaError(f"The dashboard '{dash.path.name}' was imported from Neuronpedia; export its original.")
    for name, value, least in (("features per batch", features_per_batch, 1), ("before", before, 0),
                               ("after", after, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise NeuronpediaError(f"The export setting '{name}' must be an integer of at least {least}.")
    ident = _Ident(*source_ids(dash.manifest, model_id, source_set), creator_id,
                   time.strftime("%Y-%m-%dT%H:%M:%S"))
    root = Path(out) / ident.model / ident.source
    for stale in [*root.glob("features/batch-*.jsonl.gz"), *root.glob("activations/batch-*.jsonl.gz")]:
        stale.unlink()  # a smaller batch size or SAE must not leave old batches behind
    sae, chosen = dash.sae(), pick_device(device)
    if chosen.type != "cpu":
        sae = copy.deepcopy(sae).to(chosen)  # the dashboard's SAE is shared: never moved
    n_batches = math.ceil(dash.d_sae / features_per_batch)
    for index, start in enumerate(range(0, dash.d_sae, features_per_batch)):
        stop = min(start + features_per_batch, dash.d_sae)
        features, activations = _batch_records(dash, sae, tokenizer, ident, start, stop, before, after)
        _write_jsonl_gz(root / "features" / f"batch-{index}.jsonl.gz", features)
        _write_jsonl_gz(root / "activations" / f"batch-{index}.jsonl.gz", activations)
        report(progress, (index + 1) / n_batches, f"features {stop:,}/{dash.d_sae:,}")
    _write_metadata(root, dash, ident, creator_name)
    return root
