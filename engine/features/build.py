"""Build every feature's dashboard of an SAE: one streaming pass over an activation store, then the tables.

:func:`build_dashboards` encodes the store batch by batch into a :class:`~engine.features.accumulate.FeatureAccumulator`,
computes logit effects and decoder neighbours (:mod:`engine.features.decoder`) and writes the folder described in
:mod:`engine.features.folder`. Co-occurrence is accumulated for SAEs up to :data:`MAX_COOCCUR_FEATURES` features
(``n_cooccur=0`` turns it off).
"""
from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from engine import __version__
from engine.core.devices import oom_guard, pick_device, to_host
from engine.core.fileio import atomic_write_json
from engine.core.progress import Progress
from engine.features.accumulate import FeatureAccumulator
from engine.features.decoder import decoder_neighbours, logit_effects
from engine.features.folder import (
    DASHBOARD_FORMAT,
    MANIFEST,
    TABLES,
    DashboardError,
    dashboards_root,
    decode_tokens,
    sae_digest,
    write_parquet,
)
from engine.sae.metrics import is_dead, is_dense

if TYPE_CHECKING:
    from engine.core.models import LoadedModel
    from engine.data.store import ActivationStore

MAX_COOCCUR_FEATURES = 16384  # a [d_sae, d_sae] float32 count table: 1 GiB at this width


@dataclass
class DashboardConfig:
    """Settings of one dashboard build (part of the cache key)."""

    top_k: int = 20
    n_bins: int = 32  # histogram bins (and fine reservoir bins) on [0, 2**ceil(log2(max))]
    n_intervals: int = 10
    samples_per_interval: int = 5
    n_logits: int = 10
    n_neighbours: int = 10
    n_cooccur: int = 10  # most co-occurring features kept per feature; 0: not computed
    batch_size: int = 4096
    skip_first_position: bool = True  # BOS rows (position 0) are not counted, as in SAE training
    seed: int = 0
    device: str = "auto"

    def check(self) -> None:
        for name in ("top_k", "n_bins", "n_intervals", "samples_per_interval", "n_logits", "n_neighbours",
                     "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise DashboardError(f"The dashboard setting '{name}' must be a positive integer (found {value!r}).")
        if not isinstance(self.n_cooccur, int) or self.n_cooccur < 0:
            raise DashboardError(f"n_cooccur must be 0 (off) or a positive integer (found {self.n_cooccur!r}).")

    def key_fields(self) -> dict:
        fields = asdict(self)
        fields.pop("device")
        fields.pop("batch_size")
        return fields


def check_sae_store(sae, store: ActivationStore) -> tuple[str, int]:
    """Raise :class:`DashboardError` unless the SAE reads a site/layer of the store's model; returns it."""
    site, layer = sae.cfg.site()
    if site not in store.sites or layer not in store.layers:
        raise DashboardError(f"The SAE reads {site} at layer {layer}, but the store holds {', '.join(store.sites)} "
                             f"at layers {', '.join(map(str, store.layers))}; choose a store captured at that site.")
    if store.width(site) != sae.d_in:
        raise DashboardError(f"The SAE expects d_in={sae.d_in}, but the store's {site} has width "
                             f"{store.width(site)}: they come from different models.")
    trained_on = (sae.cfg.extra.get("latent_explorer") or {}).get("weights_hash")
    if trained_on and trained_on != store.weights_hash:
        raise DashboardError(f"The SAE was trained on activations of another model than the store's "
                             f"'{store.model_name}'; choose a store of the SAE's model.")
    if not trained_on and sae.cfg.model_name and store.model_name and \
            sae.cfg.model_name.split("/")[-1].lower() != store.model_name.split("/")[-1].lower():
        raise DashboardError(f"The SAE was trained on '{sae.cfg.model_name}' but the store holds activations of "
                             f"'{store.model_name}'; choose a store of the SAE's model.")
    return site, layer


def dashboard_key(sae_dir: str | Path, store: ActivationStore, config: DashboardConfig) -> str:
    """``<sae folder name>-<hash of (SAE weights, store content, settings, code format)>``."""
    payload = json.dumps({"sae": sae_digest(sae_dir), "store": store.weights_hash,
                          "corpus": store.manifest.get("corpus_hash"), "n_tokens": store.n_tokens,
                          "config": config.key_fields(), "format": DASHBOARD_FORMAT}, sort_keys=True)
    slug = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in Path(sae_dir).resolve().name)[-60:]
    return f"{slug}-{hashlib.sha256(payload.encode()).hexdigest()[:12]}"


def _row_batches(store: ActivationStore, site: str, layer: int, batch_size: int, skip_first: bool,
                 first: int = 0, end: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    """``(x [B, d_in], rows [B], stop)`` over store rows ``first`` to ``end`` in order: activations and global
    row ids (position 0 dropped), and the store row where the batch ends."""
    positions = store.positions()
    end = store.n_tokens if end is None else end
    for start in range(first, end, batch_size):
        stop = min(start + batch_size, end)
        x = store.read(site, layer, slice(start, stop))
        rows = torch.arange(start, stop)
        if skip_first:
            keep = positions[start:stop] != 0
            x, rows = x[keep], rows[keep]
        yield x, rows, stop


def _up_to_date(out: Path, key: str) -> bool:
    """Whether ``out`` already holds the complete dashboard with this key."""
    try:
        old = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return old.get("key") == key and bool(old.get("complete")) and all((out / f"{t}.parquet").is_file()
                                                                        for t in TABLES)


def build_dashboards(sae_dir: str | Path, store_dir: str | Path, lm: LoadedModel, out: str | Path | None = None, *,
                     config: DashboardConfig | None = None, force: bool = False,
                     progress: Progress | None = None, accumulator: FeatureAccumulator | None = None) -> Path:
    """Build every feature's dashboard; returns the folder (an up-to-date one is returned as is).

    ``lm`` is the store's model (for the unembedding, final norm and token strings). ``accumulator``: the
    pass over the store done elsewhere (e.g. parts from :func:`accumulate_rows` merged on Ray); it must
    cover every row of the store with this ``config``.
    """
    from engine.data.store import ActivationStore
    from engine.sae.io import load_sae

    config = config or DashboardConfig()
    config.check()
    say = progress or (lambda fraction, message: None)
    store = ActivationStore.open(store_dir)
    sae = load_sae(sae_dir)
    site, layer = check_sae_store(sae, store)
    store.check_model(lm)
    positions = store.positions()
    n_rows = int((positions != 0).sum()) if config.skip_first_position else store.n_tokens
    if n_rows == 0:
        raise DashboardError(f"The store '{store_dir}' holds no tokens to encode; capture more text first.")
    key = dashboard_key(sae_dir, store, config)
    out = Path(out) if out is not None else dashboards_root() / key
    manifest_path = out / MANIFEST
    if not force and manifest_path.is_file() and _up_to_date(out, key):
        say(1.0, "dashboards already built")
        return out
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".*.tmp"):
        stale.unlink(missing_ok=True)
    manifest_path.unlink(missing_ok=True)  # a folder without a manifest is incomplete

    device = pick_device(config.device)
    sae = sae.to(device=device, dtype=torch.float32)  # a fresh SAE of this build, not a cached one
    cooccur = 0 < config.n_cooccur and sae.d_sae <= MAX_COOCCUR_FEATURES
    started = time.time()
    if accumulator is None:
        acc = _accumulate(store, sae, site, layer, config, device, 0, store.n_tokens,
                          lambda f, m: say(0.85 * f, m))
    else:
        acc, cooccur = accumulator, accumulator.co is not None
        if acc.d_sae != sae.d_sae or acc.n_rows != n_rows:
            raise DashboardError(f"The given accumulator holds {acc.n_rows:,} rows of {acc.d_sae:,} features; "
                                 f"this SAE and store need {n_rows:,} rows of {sae.d_sae:,}.")
    pass_seconds = time.time() - started

    say(0.86, "logit effects")
    out_site, out_layer = sae.cfg.output_site()  # a transcoder's decoder writes its output site
    logits = logit_effects(lm.anatomy, sae.W_dec, out_site, out_layer, n=config.n_logits)
    say(0.92, "decoder neighbours")
    neighbour_ids, neighbour_cos = decoder_neighbours(sae.W_dec, n=config.n_neighbours)
    say(0.95, "writing tables")
    _write_tables(out, acc, store, lm.tokenizer, config, logits, neighbour_ids, neighbour_cos)
    manifest = {"format": DASHBOARD_FORMAT, "key": key, "complete": True, "code_version": __version__,
                "sae_path": str(Path(sae_dir).resolve()), "sae_name": Path(sae_dir).resolve().name,
                "sae_sha256": sae_digest(sae_dir), "d_sae": sae.d_sae, "d_in": sae.d_in,
                "architecture": sae.architecture, "site": site, "layer": layer,
                "store_path": str(Path(store_dir).resolve()), "model": store.model_name,
                "weights_hash": store.weights_hash, "corpus_hash": store.manifest.get("corpus_hash"),
                "n_rows": acc.n_rows, "config": asdict(config), "pass_seconds": round(pass_seconds, 3),
                "cooccurrence": cooccur,
                "tables": [f"{t}.parquet" for t in TABLES], "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    atomic_write_json(manifest_path, manifest)
    say(1.0, f"{acc.n_rows:,} tokens × {sae.d_sae:,} features in {pass_seconds:.1f} s")
    return out


def new_accumulator(sae, config: DashboardConfig, device: torch.device | str) -> FeatureAccumulator:
    cooccur = 0 < config.n_cooccur and sae.d_sae <= MAX_COOCCUR_FEATURES
    return FeatureAccumulator(sae.d_sae, top_k=config.top_k, n_bins=config.n_bins,
                              reservoir=config.samples_per_interval, device=device, seed=config.seed,
                              cooccur=cooccur)


def _accumulate(store: ActivationStore, sae, site: str, layer: int, config: DashboardConfig,
                device: torch.device | str, first: int, end: int, say: Progress) -> FeatureAccumulator:
    """The streaming pass over store rows ``first`` to ``end`` (progress 0..1 of that range)."""
    acc = new_accumulator(sae, config, device)
    with torch.no_grad(), oom_guard("the dashboard batch size (batch_size)", "encoding the store for dashboards"):
        for x, rows, stop in _row_batches(store, site, layer, config.batch_size, config.skip_first_position,
                                          first, end):
            if x.shape[0]:
                acc.update(sae.encode(x.to(device)), rows)  # [B, d_sae]
            say((stop - first) / max(end - first, 1), f"{stop:,}/{store.n_tokens:,} rows")
    return acc


def accumulate_rows(sae_dir: str | Path, store_dir: str | Path, config: DashboardConfig, first: int, end: int,
                    progress: Progress | None = None) -> FeatureAccumulator:
    """One part of a dashboard pass (store rows ``first`` to ``end``), to merge with the other parts'
    (:meth:`FeatureAccumulator.merge`) and hand to :func:`build_dashboards` as ``accumulator``."""
    from engine.data.store import ActivationStore
    from engine.sae.io import load_sae

    config.check()
    store = ActivationStore.open(store_dir)
    sae = load_sae(sae_dir)
    site, layer = check_sae_store(sae, store)
    device = pick_device(config.device)
    sae = sae.to(device=device, dtype=torch.float32)
    return _accumulate(store, sae, site, layer, config, device, first, end, progress or (lambda f, m: None))


# --- the writer ---------------------------------------------------------------------------------
def _write_tables(out: Path, acc: FeatureAccumulator, store: ActivationStore, tokenizer, config: DashboardConfig,
                  logits: dict[str, torch.Tensor], neighbour_ids: torch.Tensor, neighbour_cos: torch.Tensor) -> None:
    """All tables but the manifest. ``logits`` and ``neighbour_*`` are ``[d_sae, n]`` host tensors."""
    d_sae = acc.d_sae
    count = to_host(acc.count)  # [d_sae]
    density = count.double() / max(acc.n_rows, 1)
    total = to_host(acc.total)
    mean = torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))
    maxes = to_host(acc.max)
    token_ids, doc_ids, positions = store.token_ids(), store.doc_ids(), store.positions()

    # top examples (only positive activations)
    top_val, top_row = to_host(acc.top_val), to_host(acc.top_row)  # [d_sae, top_k]
    live = (top_val > 0) & (top_row >= 0)
    feat = torch.arange(d_sae)[:, None].expand_as(top_val)[live]
    rank = torch.arange(config.top_k)[None, :].expand_as(top_val)[live]
    rows = top_row[live]
    write_parquet({"feature": feat, "rank": rank, "row": rows, "act": top_val[live], "token_id": token_ids[rows],
                   "doc": doc_ids[rows], "pos": positions[rows]}, out / "top_examples.parquet")

    # histograms (non-empty bins)
    hist = to_host(acc.hist)  # [d_sae, n_bins]
    upper = to_host(acc.hist_range())
    nz = hist > 0
    f_h = torch.arange(d_sae)[:, None].expand_as(hist)[nz]
    b_h = torch.arange(config.n_bins)[None, :].expand_as(hist)[nz]
    width = upper[f_h] / config.n_bins
    write_parquet({"feature": f_h, "bin": b_h, "lo": b_h * width, "hi": (b_h + 1) * width, "count": hist[nz]},
                  out / "histograms.parquet")

    # interval samples
    samples = {k: to_host(v) for k, v in acc.interval_samples(config.n_intervals, config.samples_per_interval).items()}
    step = maxes[samples["feature"]] / config.n_intervals
    srows = samples["row"]
    write_parquet({"feature": samples["feature"], "interval": samples["interval"], "rank": samples["rank"],
                   "lo": samples["interval"] * step, "hi": (samples["interval"] + 1) * step, "row": srows,
                   "act": samples["act"], "token_id": token_ids[srows], "doc": doc_ids[srows],
                   "pos": positions[srows]}, out / "intervals.parquet")

    # logit effects
    n = logits["top_ids"].shape[1]
    words = decode_tokens(tokenizer, torch.cat([logits["top_ids"].reshape(-1), logits["bottom_ids"].reshape(-1),
                                                token_ids[rows]]).tolist())
    f_l = torch.arange(d_sae).repeat_interleave(n)
    r_l = torch.arange(n).repeat(d_sae)
    ids = torch.cat([logits["top_ids"].reshape(-1), logits["bottom_ids"].reshape(-1)])
    write_parquet({"feature": torch.cat([f_l, f_l]), "sign": ["+"] * (d_sae * n) + ["-"] * (d_sae * n),
                   "rank": torch.cat([r_l, r_l]), "token_id": ids, "token": [words[int(i)] for i in ids],
                   "value": torch.cat([logits["top_values"].reshape(-1), logits["bottom_values"].reshape(-1)])},
                  out / "logits.parquet")

    # neighbours
    k = neighbour_ids.shape[1]
    write_parquet({"feature": torch.arange(d_sae).repeat_interleave(k), "rank": torch.arange(k).repeat(d_sae),
                   "neighbour": neighbour_ids.reshape(-1), "cosine": neighbour_cos.reshape(-1)},
                  out / "neighbours.parquet")

    # co-occurrence (an empty table when it was not accumulated)
    co = acc.cooccurring(config.n_cooccur) if acc.co is not None else {
        "feature": torch.zeros(0, dtype=torch.long), "rank": torch.zeros(0, dtype=torch.long),
        "other": torch.zeros(0, dtype=torch.long), "jaccard": torch.zeros(0), "together": torch.zeros(0, dtype=torch.long)}
    write_parquet(co, out / "cooccurrence.parquet")

    # the feature list: statistics plus searchable labels
    act_tokens: list[list[str]] = [[] for _ in range(d_sae)]
    for f, row in zip(feat.tolist(), rows.tolist()):  # ≤ top_k entries per feature, once per build (not per batch)
        word = words[int(token_ids[row])].strip()
        if word and word not in act_tokens[f] and len(act_tokens[f]) < 8:
            act_tokens[f].append(word)
    top_words = [[words[int(i)].strip() for i in row] for row in logits["top_ids"][:, :5].tolist()]
    bottom_words = [[words[int(i)].strip() for i in row] for row in logits["bottom_ids"][:, :5].tolist()]
    write_parquet({"feature": torch.arange(d_sae), "count": count, "density": density, "max_act": maxes,
                   "mean_act": mean.float(), "dead": is_dead(density).numpy(),
                   "dense": is_dense(density).numpy(),
                   "act_tokens": [" | ".join(t) for t in act_tokens],
                   "top_logits": [" | ".join(t) for t in top_words],
                   "bottom_logits": [" | ".join(t) for t in bottom_words]}, out / "features.parquet")
