"""Logit lens (and, through ``transform``, the tuned lens) at every layer and position.

One forward pass captures the residual stream; every row (embeddings, optionally the
mid-layer residual after each attention block, and each layer output) is read out through
the model's own final norm and unembedding, in position chunks sized to a memory budget.
Only small results (top-k ids and probabilities, entropy, KL, tracked-token probability and
rank) leave the device.

The last row is the last layer's output *before* the final norm, read out through the norm
exactly once, so it reproduces the model's logits; :func:`run_lens` measures the difference.
"""
from __future__ import annotations

import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from engine.core.anatomy import Anatomy
from engine.core.capture import capture
from engine.core.devices import oom_guard, to_host
from engine.core.errors import UserError
from engine.lens.tokens import Continuation, continuation

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from engine.core.models import LoadedModel

# (hidden-state index, resid) -> resid; hidden-state index 0 is the embedding output, i+1 layer i's output
Transform = Callable[[int, torch.Tensor], torch.Tensor]


class PromptError(UserError):
    pass


def check_prompt(text: str, tokenizer: PreTrainedTokenizerBase, context_length: int | None,
                 max_tokens: int | None = None) -> list[int]:
    """Validate a user prompt and return its token ids (with the tokenizer's special tokens)."""
    if not isinstance(text, str) or not text.strip():
        raise PromptError("The prompt is empty: type some text to look at.")
    controls = sum(1 for ch in text if unicodedata.category(ch) in ("Cc", "Cs", "Co", "Cn") and ch not in "\n\t\r")
    if "\x00" in text or controls > max(2, 0.05 * len(text)):
        raise PromptError(
            f"The prompt does not look like text ({controls} control or unassigned characters); "
            "paste plain text instead."
        )
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    limits = [limit for limit in (context_length, max_tokens) if limit]
    if limits and len(ids) > min(limits):
        limit = min(limits)
        which = "the model's context limit" if limit == context_length else "the limit for this view"
        raise PromptError(f"The prompt is {len(ids)} tokens long; {which} is {limit} tokens. Shorten it.")
    return ids


def tracked_tokens(tokenizer: PreTrainedTokenizerBase, words: Sequence[str], context: str | None = None
                   ) -> list[Continuation]:
    """The token followed for each tracked string: the first id it adds after ``context`` (' Paris' keeps its
    space; see :mod:`engine.lens.tokens`). Without a context, each word is encoded as the start of a text,
    where SentencePiece tokenizers put a dummy space before it: pass the prompt."""
    out = []
    for word in words:
        if not word:
            continue
        try:
            out.append(continuation(tokenizer, context or "", word))
        except ValueError:
            raise PromptError(f"The tracked token {word!r} encodes to nothing with this tokenizer.") from None
    return out


def tracked_token_ids(tokenizer: PreTrainedTokenizerBase, words: Sequence[str], context: str | None = None
                      ) -> list[int]:
    """First token id of each tracked string after ``context`` (see :func:`tracked_tokens`)."""
    return [found.id for found in tracked_tokens(tokenizer, words, context)]


@dataclass
class LensResult:
    token_ids: list[int]
    tokens: list[str]                 # decoded input tokens
    row_names: list[str]              # "embed", "0.attn", "0", ...
    row_hidden_index: list[int | None]  # hidden-state index per row (None for mid-layer rows)
    positions: list[int]              # which input positions the lens was computed for
    top_ids: np.ndarray               # [rows, positions, k]
    top_probs: np.ndarray             # [rows, positions, k]
    top_tokens: list[list[list[str]]]  # decoded top_ids
    entropy: np.ndarray               # [rows, positions] nats
    kl_to_final: np.ndarray           # [rows, positions] KL(final || row), nats
    tracked_ids: list[int] = field(default_factory=list)
    tracked_labels: list[str] = field(default_factory=list)
    tracked_tokens: list[str] = field(default_factory=list)  # the token followed per label (its first token)
    tracked_notes: list[str] = field(default_factory=list)   # "' Paris' → '▁Paris'", also naming multi-token words
    tracked_probs: np.ndarray | None = None  # [rows, positions, n_tracked]
    tracked_ranks: np.ndarray | None = None  # [rows, positions, n_tracked], 0 = top-1
    self_check_max_abs_diff: float = float("nan")
    lens: str = "logit"

    def to_json(self) -> dict:
        rows = []
        for r, name in enumerate(self.row_names):
            cells = []
            for j, pos in enumerate(self.positions):
                cell = {
                    "position": pos,
                    "input_token": self.tokens[pos],
                    "top": [{"token": t, "id": int(i), "prob": float(p)} for t, i, p in
                            zip(self.top_tokens[r][j], self.top_ids[r, j], self.top_probs[r, j])],
                    "entropy": float(self.entropy[r, j]),
                    "kl_to_final": float(self.kl_to_final[r, j]),
                }
                if self.tracked_ids:
                    cell["tracked"] = {label: {"prob": float(self.tracked_probs[r, j, t]),
                                               "rank": int(self.tracked_ranks[r, j, t])}
                                       for t, label in enumerate(self.tracked_labels)}
                cells.append(cell)
            rows.append({"layer": name, "positions": cells})
        tracked = [{"label": label, "id": int(i), "token": token, "note": note} for label, i, token, note in
                   zip(self.tracked_labels, self.tracked_ids, self.tracked_tokens, self.tracked_notes)]
        return {"lens": self.lens, "tokens": self.tokens, "layers": rows,
                "self_check_max_abs_diff": self.self_check_max_abs_diff, **({"tracked": tracked} if tracked else {})}

    def to_records(self) -> list[dict]:
        """Flat rows (one per layer x position) for CSV export."""
        records = []
        for r, name in enumerate(self.row_names):
            for j, pos in enumerate(self.positions):
                rec = {"layer": name, "position": pos, "input_token": self.tokens[pos],
                       "top1": self.top_tokens[r][j][0], "top1_prob": float(self.top_probs[r, j, 0]),
                       "entropy": float(self.entropy[r, j]), "kl_to_final": float(self.kl_to_final[r, j])}
                for t, label in enumerate(self.tracked_labels):
                    rec[f"p[{label}]"] = float(self.tracked_probs[r, j, t])
                    rec[f"rank[{label}]"] = int(self.tracked_ranks[r, j, t])
                records.append(rec)
        return records


_EXP_FLOOR = -87.0  # exp(-87) = 1.6e-38, just above float32's smallest normal number


def _chunk_size(rows: int, vocab: int, positions: int, budget_bytes: int) -> int:
    per_position = rows * vocab * 4 * 3  # fp32 logits, one scratch buffer, the matmul's own output
    return max(1, min(positions, budget_bytes // max(per_position, 1)))


@torch.inference_mode()
def lens_stats(anatomy: Anatomy, resid: torch.Tensor, *, top_k: int = 10, tracked_ids: Sequence[int] = (),
               transform: Transform | None = None, row_hidden_index: Sequence[int | None] | None = None,
               budget_bytes: int = 768 * 2**20) -> dict[str, torch.Tensor]:
    """Lens statistics for residual rows ``resid [rows, positions, d]``; the LAST row is the reference.

    Returns CPU tensors: top_ids/top_probs [rows, pos, k], entropy and kl_to_final [rows, pos],
    tracked_probs / tracked_ranks [rows, pos, n_tracked], final_logits [pos, vocab] is not kept.
    """
    rows, positions, _ = resid.shape
    vocab = anatomy.vocab_size
    k = min(top_k, vocab)
    tracked = torch.tensor(list(tracked_ids), dtype=torch.long, device=resid.device)
    chunk = _chunk_size(rows, vocab, positions, budget_bytes)
    pieces: dict[str, list[torch.Tensor]] = {n: [] for n in
                                             ("top_ids", "top_probs", "entropy", "kl", "t_probs", "t_ranks")}
    for start in range(0, positions, chunk):
        h = resid[:, start:start + chunk]
        if transform is not None and row_hidden_index is not None:
            h = torch.stack([h[r] if idx is None else transform(idx, h[r])
                             for r, idx in enumerate(row_hidden_index)])
        logits = anatomy.logits(h).float()                       # [rows, c, V]
        # The unembedding matmul is the floor; the rest is a few passes over the [rows, c, V] block
        # with one scratch buffer. torch.logsumexp/softmax and bool-tensor sums each cost several
        # times more than these plain passes on a CPU (benchmarks/lens.py).
        # KL here is a fused, memory-lean form of engine.core.numerics.kl_from_logits(final, row) (same quantity,
        # computed from the shifted logits this loop needs anyway); elsewhere use numerics.
        top_logits, top_ids = logits.topk(k, dim=-1)
        peak = top_logits[..., :1]                               # [rows, c, 1], the max logit
        scratch = torch.empty_like(logits)
        if len(tracked):
            chosen = logits[..., tracked]                        # [rows, c, n]
            # rank = how many tokens have a strictly larger logit; a float 0/1 sum is exact here (V < 2**24)
            ranks = torch.stack([torch.gt(logits, chosen[..., t:t + 1], out=scratch).sum(-1)
                                 for t in range(len(tracked))], -1).long()
        shifted = logits.sub_(peak)                              # in place, every value <= 0
        # exp of the shifted logits below -87 would be float32 subnormals, which x86 CPUs compute ~10x slower
        # (600 ms instead of 45 ms per gemma block); those terms are < 2e-38 each, so clamp them to that
        # floor for the exponentials only (the KL cross term below still uses the exact shifted logits).
        exps = torch.clamp(shifted, min=_EXP_FLOOR, out=scratch).exp_()
        total = exps.sum(-1)                                     # [rows, c]
        log_total = total.log()
        lse = peak[..., 0] + log_total                           # log-sum-exp of the raw logits
        # H = log Z - <e, x> / Z with x the shifted logits, e = exp(x), Z = sum e
        entropy = log_total - torch.einsum("rcv,rcv->rc", exps, shifted) / total
        # KL(final || row) = -H_final - <p_final, log p_row> and log p_row = x_row - log Z_row
        final_p = exps[-1] / total[-1, :, None]                  # [c, V]
        kl = (-entropy[-1] - torch.einsum("rcv,cv->rc", shifted, final_p) + log_total).clamp_min(0)
        kl[-1] = 0.0
        if len(tracked):
            pieces["t_probs"].append(to_host((chosen - lse[..., None]).exp()))
            pieces["t_ranks"].append(to_host(ranks))
        pieces["top_ids"].append(to_host(top_ids))
        pieces["top_probs"].append(to_host((top_logits - lse[..., None]).exp()))
        pieces["entropy"].append(to_host(entropy))
        pieces["kl"].append(to_host(kl))
        del logits, shifted, exps, scratch, final_p
    out = {name: torch.cat(parts, dim=1) for name, parts in pieces.items() if parts}
    return out


def _row_plan(n_layers: int, sublayers: bool) -> tuple[list[str], list[int | None], list[tuple[str, int]]]:
    """Row names, hidden-state indices, and where each row's residual comes from."""
    names, hidden, source = ["embed"], [0], [("resid_pre", 0)]
    for i in range(n_layers):
        if sublayers:
            names.append(f"{i}.attn")
            hidden.append(None)
            source.append(("resid_mid", i))
        names.append(str(i))
        hidden.append(i + 1)
        source.append(("resid_post", i))
    return names, hidden, source


def decode_table(tokenizer: PreTrainedTokenizerBase, ids: np.ndarray) -> np.ndarray:
    """Decode an id array of any shape into strings, decoding each distinct id once (batched)."""
    unique, inverse = np.unique(ids, return_inverse=True)
    strings = np.array(tokenizer.batch_decode(unique.reshape(-1, 1).tolist()), dtype=object)
    return strings[inverse].reshape(ids.shape)


def run_lens(lm: LoadedModel, prompt: str | Sequence[int], *, top_k: int = 10, track: Sequence[str] = (),
             sublayers: bool = False, transform: Transform | None = None, lens_name: str = "logit",
             positions: Sequence[int] | None = None, max_tokens: int | None = None,
             budget_bytes: int = 768 * 2**20) -> LensResult:
    """Run the model once on ``prompt`` and read every layer out through the lens.

    ``lm`` is a :class:`engine.core.models.LoadedModel` (anything with ``anatomy``, ``tokenizer``,
    ``lock``, ``device`` and ``context_length``). ``positions`` restricts the read-out (not the
    forward pass) to some input positions, e.g. the last 64 of a long prompt.
    """
    anatomy, tokenizer = lm.anatomy, lm.tokenizer
    if isinstance(prompt, str):
        ids = check_prompt(prompt, tokenizer, lm.context_length, max_tokens)
    else:
        ids = [int(i) for i in prompt]
        if not ids:
            raise PromptError("The prompt is empty: type some text to look at.")
    n = len(ids)
    chosen_positions = list(range(n)) if positions is None else sorted({p for p in positions if 0 <= p < n})
    if not chosen_positions:
        raise PromptError(f"No valid position was chosen; the prompt has positions 0..{n - 1}.")
    # tracked words are read as the model would produce them after this prompt (SentencePiece: no lone '▁')
    context = prompt if isinstance(prompt, str) else tokenizer.decode(ids, skip_special_tokens=True)
    tracked = tracked_tokens(tokenizer, track, context)
    tracked_ids = [found.id for found in tracked]
    names, hidden_index, source = _row_plan(anatomy.n_layers, sublayers)
    sites = {"resid_pre": [0], "resid_post": "all"}
    if sublayers:
        sites["resid_mid"] = "all"
    input_ids = torch.tensor([ids])
    subset = None if len(chosen_positions) == n else chosen_positions
    with lm.lock:
        captured, output = capture(anatomy, input_ids, sites=sites, stop_early=False, logits_positions=subset)
        pos = torch.tensor(chosen_positions, device=captured["resid_post"].device)
        per_site = {site: tensor[:, 0].index_select(1, pos) for site, tensor in captured.items()}
        resid = torch.stack([per_site[site][i if site != "resid_pre" else 0] for site, i in source])
        with oom_guard("the lens memory budget (budget_bytes) or the number of positions", doing="reading the lens"):
            stats = lens_stats(anatomy, resid, top_k=top_k, tracked_ids=tracked_ids, transform=transform,
                               row_hidden_index=hidden_index, budget_bytes=budget_bytes)
        # self-check: last layer through the lens == the model's own logits, at every position read out
        with torch.inference_mode():
            last = anatomy.logits(per_site["resid_post"][-1]).float()
            model_logits = output.logits[0].float()
            if model_logits.shape[0] != last.shape[0]:  # the model ignored logits_to_keep
                model_logits = model_logits.index_select(0, pos)
            diff = float((last - model_logits).abs().max())
    top_ids = stats["top_ids"].numpy()
    top_tokens = decode_table(tokenizer, top_ids).tolist()
    return LensResult(
        token_ids=ids, tokens=decode_table(tokenizer, np.array(ids)).tolist(), row_names=names, row_hidden_index=hidden_index,
        positions=chosen_positions, top_ids=top_ids, top_probs=stats["top_probs"].numpy(), top_tokens=top_tokens,
        entropy=stats["entropy"].numpy(), kl_to_final=stats["kl"].numpy(),
        tracked_ids=tracked_ids, tracked_labels=[w for w in track if w],
        tracked_tokens=[found.pieces[0] for found in tracked], tracked_notes=[found.describe() for found in tracked],
        tracked_probs=stats["t_probs"].numpy() if tracked_ids else None,
        tracked_ranks=stats["t_ranks"].numpy() if tracked_ids else None,
        self_check_max_abs_diff=diff, lens=lens_name,
    )

