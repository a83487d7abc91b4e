"""Activation-patching sweeps: patch every (layer, position) or every (source layer -> target layer) pair.

Sweeps are batched: the target prompt is repeated along the batch and each row carries its own patch,
selected with index tensors inside one hook per layer, so a sweep costs ``cells / batch_size`` forwards.
Rows are ordered by layer, and the layers below a batch's lowest patched layer replay the clean run's
recorded outputs (:func:`replayed_prefix`) instead of recomputing them. Only the metric of each patched row
is kept (``[R]`` floats), never its ``[V]`` logits: a 262k-token vocabulary times a few thousand patches would
be gigabytes. Patch values and index tensors follow each hooked activation's device (device maps).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from engine.core.anatomy import Anatomy
from engine.core.capture import capture
from engine.core.devices import oom_guard, to_host
from engine.core.progress import Progress, report
from engine.core.sites import EDIT_SITES, first, replace_first
from engine.interventions.edits import CompiledEdit, at_positions, replaced_by
from engine.interventions.hooks import forward_logits
from engine.interventions.specs import InterventionError, prompt_ids, resolve_positions
from engine.lens.logit import tracked_token_ids

if TYPE_CHECKING:
    from engine.core.models import LoadedModel

Metric = Callable[[torch.Tensor], torch.Tensor]  # logits [..., V] -> [...] float32
KINDS = ("layer_position", "layer_layer")


@dataclass
class SweepResult:
    """Effect of each patch on the target's last-position metric; rows and columns depend on ``kind``."""

    kind: str                 # "layer_position" (rows layers, cols positions) or "layer_layer" (rows target layer,
                              # cols source layer)
    metric: str               # "prob" or "logit_diff"
    values: np.ndarray        # [rows, cols]
    row_labels: list[str]
    col_labels: list[str]
    target_value: float       # the target run, unpatched ("corrupted" baseline)
    source_value: float       # the source run itself ("clean" baseline)
    token: str
    token_b: str | None = None
    site: str = "resid_post"

    def to_json(self) -> dict:
        return {"kind": self.kind, "metric": self.metric, "values": self.values.tolist(),
                "row_labels": self.row_labels, "col_labels": self.col_labels, "target_value": self.target_value,
                "source_value": self.source_value, "token": self.token, "token_b": self.token_b, "site": self.site}


def _metric_fn(lm: LoadedModel, metric: str, token: str, token_b: str | None, context: str | None = None) -> Metric:
    """The sweep's metric on logits ``[..., V]``; tokens are the ids the model produces after ``context``."""
    if not token:
        raise InterventionError("The token to measure is empty; type the answer token (e.g. ' Paris').")
    ids = tracked_token_ids(lm.tokenizer, [token] + ([token_b] if token_b else []), context=context)
    if metric == "prob":
        return lambda logits: torch.softmax(logits.float(), -1)[..., ids[0]]
    if metric == "logit_diff":
        if len(ids) < 2:
            raise InterventionError("A logit difference needs a second token to compare with.")
        return lambda logits: logits[..., ids[0]].float() - logits[..., ids[1]].float()
    raise InterventionError(f"Unknown metric '{metric}'; choose 'prob' or 'logit_diff'.")


# --- batched rows with a replayed clean prefix ---------------------------------------------------
@contextmanager
def replayed_prefix(anatomy: Anatomy, outputs: Sequence[Any], upto: int, batch: int) -> Iterator[None]:
    """Make decoder layers ``0..upto-1`` return their recorded clean outputs instead of computing.

    Every row of a patching batch is the same prompt and no row is edited before layer ``upto``, so
    those layers would recompute the clean run; replaying it skips them. Only ``forward`` is swapped
    on the instance (hooks, attributes and any wrapper already installed there stay as they are).
    """
    swapped = []
    try:
        for i in range(upto):
            layer = anatomy.layers[i]
            recorded = outputs[i]

            def replay(*args, recorded=recorded, **kwargs):
                hidden = first(recorded)  # [1, T, d]
                return replace_first(recorded, hidden.expand(batch, *hidden.shape[1:]).contiguous())
            swapped.append((layer, layer.__dict__.get("forward")))
            layer.forward = replay
        yield
    finally:
        for layer, previous in swapped:
            if previous is None:
                del layer.forward
            else:
                layer.forward = previous


def _clean_layer_outputs(lm: LoadedModel, ids: list[int]) -> list[Any]:
    """Each decoder layer's output object on the clean prompt (batch of one)."""
    outputs: list = [None] * lm.anatomy.n_layers
    handles = [layer.register_forward_hook(lambda m, a, out, i=i: outputs.__setitem__(i, out))
               for i, layer in enumerate(lm.anatomy.layers)]
    try:
        forward_logits(lm, torch.tensor([ids]), last_only=True)
    finally:
        for handle in handles:
            handle.remove()
    return outputs


def _row_edits(site: str, layers: torch.Tensor, positions: torch.Tensor, values: torch.Tensor) -> list[CompiledEdit]:
    """One edit per distinct layer; it writes ``values[r]`` at ``positions[r]`` of each row r patched there
    (on the device and in the dtype of the activation it edits)."""
    edits = []
    for layer in torch.unique(layers).tolist():
        rows = (layers == layer).nonzero()[:, 0]

        def fn(h: torch.Tensor, rows: torch.Tensor = rows, at: torch.Tensor = positions[rows],
               new: torch.Tensor = values[rows]) -> torch.Tensor:
            h = h.clone()
            h[rows.to(h.device), at.to(h.device)] = new.to(device=h.device, dtype=h.dtype)
            return h
        edits.append(CompiledEdit(site, int(layer), fn))
    return edits


def run_row_patches(lm: LoadedModel, ids: list[int], site: str, layers: torch.Tensor, positions: torch.Tensor,
                    values: torch.Tensor, batch_size: int = 64, progress: Progress | None = None,
                    measure: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """``measure(last-position logits)`` of R copies of ``ids``: ``[R, ...]`` (``[R, V]`` logits when ``measure``
    is None); row r has ``values[r]`` (``values``: ``[R, d]``) written at (``layers[r]``, ``positions[r]``) of
    ``site``. One hook per layer edits its rows through index tensors.

    Rows are run in batches ordered by layer; in each batch the layers below its lowest patched layer
    replay the clean run's outputs instead of being computed (about half the work of a full sweep). Only
    ``measure``'s output is kept per batch, so memory grows with R times the metric's size, not R x V.
    """
    measure = measure or (lambda logits: logits)
    total = len(layers)
    order = torch.argsort(layers, stable=True)
    out = torch.empty(0)
    base = torch.tensor([ids], device=lm.device)
    with lm.lock, oom_guard("the sweep's batch size (batch_size)", "running the patching sweep"):
        clean = _clean_layer_outputs(lm, ids)
        for start in range(0, total, batch_size):
            stop = min(total, start + batch_size)
            picked = order[start:stop]
            chunk_layers = layers[picked].to(lm.device)
            edits = _row_edits(site, chunk_layers, positions[picked].to(lm.device),
                               values[picked.to(values.device)].to(lm.device))
            with replayed_prefix(lm.anatomy, clean, int(chunk_layers.min()), stop - start):
                logits = forward_logits(lm, base.expand(stop - start, -1).contiguous(), edits, last_only=True)
            kept = measure(logits[:, -1])  # [B, ...]
            del logits
            if not len(out):
                out = torch.empty((total, *kept.shape[1:]), dtype=kept.dtype, device=kept.device)
            out[picked.to(out.device)] = kept
            report(progress, stop / total, f"patched {stop} of {total}")
    return out


# --- the sweeps ----------------------------------------------------------------------------------
@dataclass
class _Grid:
    """Row r of a sweep patches source (``s_layers[r]``, ``s_pos[r]``) into target (``t_layers[r]``, ``t_pos[r]``)."""

    t_layers: torch.Tensor  # [R] long, like the three below
    t_pos: torch.Tensor
    s_layers: torch.Tensor
    s_pos: torch.Tensor
    rows: list[str]
    cols: list[str]
    shape: tuple[int, int]  # rows x cols = R


def _layer_position_grid(lm: LoadedModel, src_ids: list[int], tgt_ids: list[int]) -> _Grid:
    if len(src_ids) != len(tgt_ids):
        raise InterventionError(f"The source has {len(src_ids)} tokens and the target {len(tgt_ids)}; a "
                                "(layer, position) sweep needs prompts of the same token length.")
    n_layers, n_pos = lm.anatomy.n_layers, len(tgt_ids)
    grid_l, grid_p = torch.meshgrid(torch.arange(n_layers), torch.arange(n_pos), indexing="ij")
    layers, pos = grid_l.reshape(-1), grid_p.reshape(-1)
    decoded = [lm.tokenizer.decode([t]) for t in tgt_ids]
    return _Grid(layers, pos, layers, pos, [str(i) for i in range(n_layers)],
                 [f"{p}:{decoded[p]}" for p in range(n_pos)], (n_layers, n_pos))


def _layer_layer_grid(lm: LoadedModel, src_ids: list[int], tgt_ids: list[int], source_position: int,
                      target_position: int) -> _Grid:
    sp = resolve_positions([source_position], len(src_ids))[0]
    tp = resolve_positions([target_position], len(tgt_ids))[0]
    n_layers = lm.anatomy.n_layers
    grid_t, grid_s = torch.meshgrid(torch.arange(n_layers), torch.arange(n_layers), indexing="ij")
    t_layers, s_layers = grid_t.reshape(-1), grid_s.reshape(-1)
    labels = [str(i) for i in range(n_layers)]
    return _Grid(t_layers, torch.full_like(t_layers, tp), s_layers, torch.full_like(s_layers, sp), labels, labels,
                 (n_layers, n_layers))


def _looped_cells(lm: LoadedModel, tgt_ids: list[int], site: str, grid: _Grid, src_acts: torch.Tensor,
                  measure: Metric, progress: Progress | None) -> torch.Tensor:
    """``[R]`` metric values with one forward per patch (the baseline the batched path is timed against)."""
    results = []
    total = len(grid.t_layers)
    for r in range(total):
        value = src_acts[int(grid.s_layers[r]), int(grid.s_pos[r])][None]  # [1, d]
        edit = CompiledEdit(site, int(grid.t_layers[r]), at_positions([int(grid.t_pos[r])], replaced_by(value)))
        results.append(measure(forward_logits(lm, torch.tensor([tgt_ids]), [edit], last_only=True)[0, -1]))
        report(progress, (r + 1) / total, f"patched {r + 1} of {total}")
    return torch.stack(results)


def patch_sweep(lm: LoadedModel, source: str | Sequence[int], target: str | Sequence[int], token: str, *,
                kind: str = "layer_position", metric: str = "prob", token_b: str | None = None,
                site: str = "resid_post", source_position: int = -1, target_position: int = -1,
                batched: bool = True, batch_size: int = 64, progress: Progress | None = None) -> SweepResult:
    """Patch the source's activation into the target at every (layer, position) or (target layer, source layer).

    ``layer_position`` needs prompts of equal token length (position p goes to position p);
    ``layer_layer`` patches ``source_position`` -> ``target_position`` from each source layer into each
    target layer (back-patching when the source layer is later). ``batched=False`` runs one forward per patch
    with the same cached source activations (the baseline the benchmark times the batched path against).
    """
    if kind not in KINDS:
        raise InterventionError(f"Unknown sweep '{kind}'; choose 'layer_position' or 'layer_layer'.")
    if site not in EDIT_SITES:
        raise InterventionError(f"The site '{site}' cannot be patched; choose from {', '.join(EDIT_SITES)}.")
    src_ids, tgt_ids = prompt_ids(lm, source), prompt_ids(lm, target)
    measure = _metric_fn(lm, metric, token, token_b, context=target)
    with lm.lock:
        got, src_out = capture(lm.anatomy, torch.tensor([src_ids]), sites={site: "all"}, stop_early=False)
    src_acts = got[site][:, 0]  # [L, T_src, d]
    source_value = float(measure(src_out.logits[0, -1]))
    target_value = float(measure(forward_logits(lm, torch.tensor([tgt_ids]))[0, -1]))
    if kind == "layer_position":
        grid = _layer_position_grid(lm, src_ids, tgt_ids)
    else:
        grid = _layer_layer_grid(lm, src_ids, tgt_ids, source_position, target_position)
    if batched:
        values = src_acts[grid.s_layers.to(src_acts.device), grid.s_pos.to(src_acts.device)]  # [R, d]
        cells = run_row_patches(lm, tgt_ids, site, grid.t_layers, grid.t_pos, values, batch_size, progress, measure)
    else:
        cells = _looped_cells(lm, tgt_ids, site, grid, src_acts, measure, progress)
    return SweepResult(kind, metric, to_host(cells.reshape(grid.shape)).numpy(), grid.rows, grid.cols, target_value,
                       source_value, token, token_b, site)
