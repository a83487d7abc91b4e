"""Linked views between the lens and the feature dashboards.

- :func:`row_sites` / :func:`dashboards_at`: which residual site a lens row reads, and the dashboards whose SAE
  reads it (row ``"embed"`` is ``resid_pre`` 0; row ``"L"``, layer L's output, is ``resid_post`` L and also
  ``resid_pre`` L+1, the same tensor; row ``"L.attn"`` is ``resid_mid`` L).
- :func:`features_here`: the SAE features active at each of a few lens positions, ranked (one forward pass and
  one batched encode, the same activations as :func:`engine.features.text.text_activations`).
- :func:`feature_activations`: one feature's activation at those positions (the lens page's overlay strip).
- :func:`direction_reading` / :func:`feature_reading`: add a direction (a feature's decoder row at its maximum
  activation) to the residual at one position and read, for every layer from there to the last, the tokens whose
  logit-lens log-probability rises most; the clean and the edited run are the two rows of ONE hooked forward.
- :func:`parse_feature_ref` / :func:`resolve_feature_ref`: the lens page's ``lens_feature=<dashboard>:<id>``.

Lens positions count every token of the prompt, the tokenizer's leading special tokens (BOS) included; the SAE
is not read on those (dashboards skip them too), so they have no features.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from engine.core.capture import capture
from engine.core.devices import to_host
from engine.core.sites import EDIT_SITES, check_site, site_width
from engine.features.folder import DashboardError
from engine.features.text import text_hidden
from engine.interventions.edits import CompiledEdit
from engine.interventions.hooks import applied
from engine.lens.logit import PromptError, check_prompt, decode_table

if TYPE_CHECKING:
    from engine.core.models import LoadedModel
    from engine.sae.base import SAE

MAX_TOKENS = 4096  # the lens view's own limit
Direction = torch.Tensor | Callable[[torch.Tensor], torch.Tensor]  # a vector, or clean activation -> vector


# --- lens rows <-> sites ------------------------------------------------------------------------------
def row_sites(row: str) -> tuple[tuple[str, int], ...]:
    """The (site, layer) pairs whose activation a lens row shows (empty for a name that is not a lens row)."""
    if row == "embed":
        return (("resid_pre", 0),)
    if row.endswith(".attn") and row[:-5].isdigit():
        return (("resid_mid", int(row[:-5])),)
    if row.isdigit():
        return (("resid_post", int(row)), ("resid_pre", int(row) + 1))
    return ()


def dashboards_at(entries: Sequence[dict], row: str) -> list[dict]:
    """The dashboard entries (:func:`engine.features.read.list_dashboards`) whose SAE reads lens row ``row``."""
    wanted = set(row_sites(row))
    return [e for e in entries if (e["manifest"].get("site"), int(e["manifest"].get("layer", -1))) in wanted]


def parse_feature_ref(text: str) -> tuple[str, int]:
    """``"<dashboard name>:<feature id>"`` -> ``(name, id)``; anything else is one sentence."""
    name, sep, number = str(text).strip().rpartition(":")
    if not sep or not name or not number.strip().isdigit():
        raise DashboardError(f"The link's feature '{str(text)[:60]}' is not of the form <dashboard>:<feature id>, "
                             "e.g. my-dashboard:12; open it again from the feature page.")
    return name, int(number)


def resolve_feature_ref(text: str, weights_hash: str, model_name: str, entries: Sequence[dict]
                        ) -> tuple[dict, int]:
    """The dashboard entry and feature id a ``lens_feature`` link names, checked against the current model
    (``entries``: every complete dashboard, :func:`engine.features.read.list_dashboards` without a filter)."""
    name, feature = parse_feature_ref(text)
    entry = next((e for e in entries if e["name"] == name), None)
    if entry is None:
        raise DashboardError(f"There is no feature dashboard named '{name}' here; build it on the Jobs & data page "
                             "or open the link on the server that made it.")
    manifest = entry["manifest"]
    if manifest.get("weights_hash") != weights_hash:
        raise DashboardError(f"The dashboard '{name}' belongs to the model '{manifest.get('model', '?')}', not to "
                             f"the current model '{model_name}'; pick that model in the sidebar.")
    d_sae = int(manifest.get("d_sae", 0))
    if not 0 <= feature < d_sae:
        raise DashboardError(f"Feature {feature} does not exist: the dashboard '{name}' has features "
                             f"0..{d_sae - 1}.")
    return entry, feature


# --- SAE activations at lens positions ---------------------------------------------------------------
@dataclass
class ActiveFeatures:
    """The strongest features at each lens position: ``ids``/``acts`` ``[P, k]`` (activation order, ``-1``/0
    where fewer than k fire), ``read [P]`` False on the leading special tokens, where the SAE is not read."""

    positions: list[int]
    ids: np.ndarray
    acts: np.ndarray
    read: np.ndarray

    def at(self, position: int) -> list[tuple[int, float]]:
        """``[(feature, activation), ...]`` firing at lens ``position``, strongest first."""
        p = self.positions.index(int(position))
        return [(int(f), float(a)) for f, a in zip(self.ids[p], self.acts[p]) if f >= 0]


@torch.no_grad()
def _codes(lm: LoadedModel, sae: SAE, site: str, layer: int, prompt: str, positions: Sequence[int],
           max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes [P', d_sae] on the SAE's device, read [P] bool)``: the SAE's encoding of the prompt's activation
    at the readable lens ``positions`` (the ones past the leading special tokens), in their order."""
    ids = check_prompt(prompt, lm.tokenizer, lm.context_length, max_tokens)
    positions = [int(p) for p in positions]
    bad = [p for p in positions if not 0 <= p < len(ids)]
    if bad:
        raise PromptError(f"Position {bad[0]} is not in the prompt: it has positions 0..{len(ids) - 1}.")
    kept, hidden = text_hidden(lm, sae, site, layer, prompt, max_tokens)  # one forward pass
    skip = len(ids) - len(kept)  # the leading special tokens text_hidden leaves out
    read = torch.tensor([p >= skip for p in positions], dtype=torch.bool)
    rows = torch.tensor([p - skip for p in positions if p >= skip], dtype=torch.long, device=hidden.device)
    return sae.encode(hidden.index_select(0, rows)), read


def features_here(lm: LoadedModel, sae: SAE, site: str, layer: int, prompt: str, positions: Sequence[int], *,
                  k: int = 20, max_tokens: int = MAX_TOKENS) -> ActiveFeatures:
    """The ``k`` most active features of ``sae`` (reading ``site``/``layer``) at each lens position, batched
    over the positions; equal to ``text_activations(...)[1][position - n_special]`` sorted."""
    positions = [int(p) for p in positions]
    codes, read = _codes(lm, sae, site, layer, prompt, positions, max_tokens)
    k = max(1, min(int(k), sae.d_sae))
    ids = np.full((len(positions), k), -1, dtype=np.int64)
    acts = np.zeros((len(positions), k), dtype=np.float32)
    if codes.shape[0]:
        top = codes.float().topk(k, dim=-1)
        values, found = to_host(top.values, torch.float32), to_host(top.indices)
        firing = values > 0
        ids[read.numpy()] = torch.where(firing, found, torch.full_like(found, -1)).numpy()
        acts[read.numpy()] = torch.where(firing, values, torch.zeros_like(values)).numpy()
    return ActiveFeatures(positions, ids, acts, read.numpy())


def feature_activations(lm: LoadedModel, sae: SAE, site: str, layer: int, prompt: str, feature: int,
                        positions: Sequence[int], max_tokens: int = MAX_TOKENS) -> np.ndarray:
    """``[P]`` float32 activation of one feature at each lens position (NaN on the leading special tokens)."""
    if not 0 <= int(feature) < sae.d_sae:
        raise DashboardError(f"Feature {feature} does not exist: this SAE has features 0..{sae.d_sae - 1}.")
    codes, read = _codes(lm, sae, site, layer, prompt, positions, max_tokens)
    out = np.full(len(read), np.nan, dtype=np.float32)
    out[read.numpy()] = to_host(codes[:, int(feature)], torch.float32).numpy()
    return out


# --- a direction read through the lens ----------------------------------------------------------------
@dataclass
class DirectionReading:
    """Per lens row (``rows``, names as on the lens heatmap), the ``k`` tokens whose log-probability rises most
    when the direction is added: ``ids``/``tokens``/``rises`` ``[rows, k]`` (nats), and each row's top-1 token
    before and after (``before``/``after``)."""

    rows: list[str]
    position: int
    ids: np.ndarray
    tokens: list[list[str]]
    rises: np.ndarray
    before: list[str]
    after: list[str]
    norm: float  # the added vector's norm (for a per-token direction: at this token)
    site: str    # where it was added
    layer: int


def _read_plan(site: str, layer: int, n_layers: int) -> tuple[dict[str, list[int]], list[tuple[str, int]], list[str]]:
    """Sites to capture, the (site, index in its stack) of each row, and the rows' lens names."""
    sites = {"resid_post": list(range(layer, n_layers))}
    plan = [("resid_post", i) for i in range(n_layers - layer)]
    names = [str(i) for i in range(layer, n_layers)]
    if site == "resid_pre":  # the edited residual itself is the row before the layer
        sites["resid_pre"] = [layer]
        plan.insert(0, ("resid_pre", 0))
        names.insert(0, "embed" if layer == 0 else str(layer - 1))
    return sites, plan, names


def _check_direction(lm: LoadedModel, site: str, layer: int, position: int, prompt: str, max_tokens: int
                     ) -> list[int]:
    if site not in EDIT_SITES:
        raise DashboardError(f"A direction cannot be added at '{site}'; choose one of {', '.join(EDIT_SITES)}.")
    check_site(lm.anatomy, site)
    if not 0 <= int(layer) < lm.anatomy.n_layers:
        raise DashboardError(f"Layer {layer} does not exist: this model has layers 0..{lm.anatomy.n_layers - 1}.")
    ids = check_prompt(prompt, lm.tokenizer, lm.context_length, max_tokens)
    if not 0 <= int(position) < len(ids):
        raise PromptError(f"Position {position} is not in the prompt: it has positions 0..{len(ids) - 1}.")
    return ids


@torch.no_grad()
def direction_reading(lm: LoadedModel, prompt: str, position: int, site: str, layer: int, direction: Direction, *,
                      k: int = 8, max_tokens: int = MAX_TOKENS, budget_bytes: int = 512 * 2**20
                      ) -> DirectionReading:
    """Add ``direction`` to the activation at ``site``/``layer`` and lens ``position`` and read every later
    residual row at that position through the logit lens: per row, the ``k`` tokens whose log-probability rises
    most. ``direction`` is a ``[width]`` vector or a function of the clean ``[width]`` activation.

    The prompt is cut after ``position`` (later tokens cannot change it); the clean and the edited prompt are the
    two rows of one hooked forward pass, so they differ only by the edit."""
    anatomy = lm.anatomy
    ids = _check_direction(lm, site, layer, position, prompt, max_tokens)
    width = site_width(anatomy, site, layer)
    if isinstance(direction, torch.Tensor) and tuple(direction.shape) != (width,):
        raise DashboardError(f"The direction has shape {tuple(direction.shape)}, but {site} at layer {layer} has "
                             f"width {width}: it comes from another model.")
    position, added = int(position), {}

    def edit(h: torch.Tensor) -> torch.Tensor:  # [2, T, width]: row 0 clean, row 1 edited
        x = h[1, position]
        vector = direction(x) if callable(direction) else direction
        added["norm"] = float(vector.float().norm())
        out = h.clone()
        out[1, position] = (x.float() + vector.to(device=x.device, dtype=torch.float32)).to(h.dtype)
        return out

    sites, plan, names = _read_plan(site, int(layer), anatomy.n_layers)
    batch = torch.tensor([ids[:position + 1]] * 2)
    with lm.lock, applied(lm, [CompiledEdit(site, int(layer), edit, "direction")]):
        captured, _ = capture(anatomy, batch, sites=sites)
    resid = torch.stack([captured[s][i, :, -1] for s, i in plan])  # [rows, 2, d]
    k = max(1, min(int(k), anatomy.vocab_size))
    chunk = max(1, budget_bytes // (2 * anatomy.vocab_size * 4 * 3))  # rows per read-out: fp32 logits + scratch
    parts: dict[str, list[torch.Tensor]] = {"rises": [], "ids": [], "before": [], "after": []}
    for start in range(0, len(plan), chunk):
        logp = torch.log_softmax(anatomy.logits(resid[start:start + chunk]).float(), dim=-1)  # [c, 2, V]
        top = (logp[:, 1] - logp[:, 0]).topk(k, dim=-1)
        parts["rises"].append(to_host(top.values, torch.float32))
        parts["ids"].append(to_host(top.indices))
        parts["before"].append(to_host(logp[:, 0].argmax(-1)))
        parts["after"].append(to_host(logp[:, 1].argmax(-1)))
    out = {name: torch.cat(p).numpy() for name, p in parts.items()}
    tokens = decode_table(lm.tokenizer, out["ids"]).tolist()
    return DirectionReading(names, position, out["ids"], tokens, out["rises"],
                            decode_table(lm.tokenizer, out["before"]).tolist(),
                            decode_table(lm.tokenizer, out["after"]).tolist(), added.get("norm", 0.0), site,
                            int(layer))


def feature_direction(sae: SAE, feature: int, scale: float) -> Direction:
    """What ``feature`` at activation ``scale`` adds to the site the SAE writes, in the model's units: its decoder
    row times ``scale``, undoing the SAE's input normalisation (per token where the SAE normalises per token)."""
    if not 0 <= int(feature) < sae.d_sae:
        raise DashboardError(f"Feature {feature} does not exist: this SAE has features 0..{sae.d_sae - 1}.")
    row = sae.W_dec[int(feature)].detach().float() * float(scale)  # [width_out], on the SAE's device
    mode = sae.cfg.normalize_activations or "none"
    if mode == "none":
        return row
    if mode not in ("constant_norm_rescale", "layer_norm"):  # a fixed factor: the same at every token
        _, factor, _ = sae.normalize_in(torch.zeros(sae.d_in))
        return sae.normalize_out(row, factor, 0.0)
    if sae.is_transcoder:
        raise DashboardError(f"This transcoder normalises each token ({mode}) at the site it reads, so its decoder "
                             "direction has no fixed size where it writes; the lens reading is not available.")

    def per_token(x: torch.Tensor) -> torch.Tensor:
        _, factor, _ = sae.normalize_in(x.float())  # the normalisation of this token's activation
        return sae.normalize_out(row.to(x.device), factor, 0.0)
    return per_token


def feature_reading(lm: LoadedModel, sae: SAE, feature: int, scale: float, prompt: str, position: int, *,
                    k: int = 8, max_tokens: int = MAX_TOKENS) -> DirectionReading:
    """:func:`direction_reading` of a feature's decoder direction at activation ``scale``, added where the SAE
    writes (a transcoder: its output site)."""
    site, layer = sae.cfg.output_site()
    return direction_reading(lm, prompt, position, site, layer, feature_direction(sae, feature, scale), k=k,
                             max_tokens=max_tokens)
