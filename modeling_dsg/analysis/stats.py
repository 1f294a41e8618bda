"""The statistics pass: SAE feature activations at one layer, collected once, used everywhere.

`collect` runs the model on token rows only up to decoder block `layer`: a forward hook on that block
captures its output (the residual stream after block L, sae-lens `hook_name="model.layers.L"`,
TransformerLens `blocks.L.hook_resid_post`) and stops the forward by raising. The later blocks and the
LM head never run, which for an early layer is several times cheaper than a full forward
(`full_forward_speedup` measures it).

The captured hidden states (as float32) go through the caller's `encode` (e.g. `sae.encode`), and an
`ActivationStore` keeps, over the *counted* tokens (attention_mask == 1 and id not in
`ignore_token_ids`, typically BOS/EOS/PAD):

- per-feature sums of activations and firing counts (activation > 0), and the token count;
- every counted token's active features, sparsely: feature indices and values, plus the token's row,
  position and id.

From that, feature selection, calibration, threshold sweeps and explanations need no second forward.
Memory is about (counted tokens) x (mean active features per token) x 8 bytes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .. import distributed
from ..data.rows import Rows
from ..errors import DSGError
from ..runtime.guard_dsg import feature_window_scores, window_scores
from .forward import block_output, decoder_block, decoder_blocks


def model_device(model: nn.Module) -> torch.device:
    """The device of `model` (its `device` attribute, else its first parameter's)."""
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device


class LayerOutput:
    """Runs `model` up to and including decoder block `layer` and returns that block's output."""

    def __init__(self, model: nn.Module, layer: int):
        decoder_block(model, layer)  # checks the layer before any work
        self.model, self.layer = model, layer

    def __call__(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return block_output(
            self.model,
            self.layer,
            lambda: self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False),
        )


@dataclass
class ActivationStore:
    """Feature activations of the counted tokens of some rows (see the module docstring).

    Dense per-feature totals: `feature_sums` [d_sae] float64 (sum of activations), `feature_counts`
    [d_sae] int64 (number of tokens with activation > 0), `n_tokens` counted tokens in all.
    Per row: `row_token_counts` [n_rows] int64, counted tokens of each row.
    Per counted token t (in processing order: rows sorted by length, then row-major): `token_row`,
    `token_pos`, `token_id` [n_tokens] int32.
    Sparse activations (CSR): token t's active features are `feature_index[indptr[t]:indptr[t+1]]`
    (int32) with values `values[indptr[t]:indptr[t+1]]` (only activations > 0 are stored).
    """

    d_sae: int
    n_rows: int
    n_tokens: int
    feature_sums: Tensor
    feature_counts: Tensor
    row_token_counts: Tensor
    token_row: Tensor
    token_pos: Tensor
    token_id: Tensor
    indptr: Tensor
    feature_index: Tensor
    values: Tensor

    def mean(self) -> Tensor:
        """mu_i = sum of f_i over counted tokens / n_tokens, [d_sae] float64."""
        return self.feature_sums / max(self.n_tokens, 1)

    def freq(self) -> Tensor:
        """Firing frequency: fraction of counted tokens with f_i > 0, [d_sae] float64."""
        return self.feature_counts.double() / max(self.n_tokens, 1)

    def _feature_set(self, features: Iterable[int]) -> Tensor:
        index = torch.as_tensor(list(features), dtype=torch.long)
        if index.numel() and (index.min() < 0 or index.max() >= self.d_sae):
            raise DSGError(f"feature indices must be in 0..{self.d_sae - 1}, got {index.tolist()}")
        return index.to(torch.int32)

    def token_points(self, features: Iterable[int], weights: Iterable[int] | None = None) -> Tensor:
        """Per counted token t, the sum of `weights` (one integer per feature; default 1 each) over the
        `features` active (> 0) at t: LongTensor [n_tokens] (integer sums, exact)."""
        index = self._feature_set(features)
        weight_of = torch.zeros(self.d_sae, dtype=torch.long)
        weight_of[index.long()] = 1 if weights is None else torch.as_tensor(list(weights), dtype=torch.long)
        hit = torch.isin(self.feature_index, index).long() * weight_of[self.feature_index.long()]
        cumulative = torch.cat([hit.new_zeros(1), hit.cumsum(0)])
        return cumulative[self.indptr[1:]] - cumulative[self.indptr[:-1]]

    def token_flags(self, features: Iterable[int], weights: Iterable[int] | None = None, threshold: int = 1) -> Tensor:
        """a_t = 1 if any of `features` is active (> 0) at counted token t, or with integer `weights` (one per
        feature) if the weights of the active ones add up to `threshold` or more: BoolTensor [n_tokens]."""
        return self.token_points(features, weights) >= threshold

    def feature_activity(self, features: Iterable[int]) -> Tensor:
        """[n_tokens, N] bool: whether features[j] is active (> 0) at counted token t."""
        index = self._feature_set(features).long()
        column = torch.full((self.d_sae,), -1, dtype=torch.long)
        column[index] = torch.arange(len(index))
        entry_column = column[self.feature_index.long()]
        keep = entry_column >= 0
        token = torch.searchsorted(self.indptr, torch.arange(self.feature_index.numel()), right=True) - 1
        out = torch.zeros(self.n_tokens, len(index), dtype=torch.bool)
        out[token[keep], entry_column[keep]] = True
        return out

    def guardrail_scores(self, guardrail: dict) -> Tensor:
        """rho per row for a guardrail config (its features, score, window and token weights)."""
        return self.row_scores(
            guardrail["features"],
            guardrail.get("score", "fraction"),
            guardrail.get("window", 32),
            guardrail.get("token_weights"),
            guardrail.get("token_threshold", 1),
            guardrail.get("token_value", "flag"),
        )

    def row_scores(
        self,
        features: Iterable[int],
        score: str = "fraction",
        window: int = 32,
        token_weights: Iterable[int] | None = None,
        token_threshold: int = 1,
        token_value: str = "flag",
    ) -> Tensor:
        """rho per row, as the guard computes it at run time. Returns [n_rows] float64.

        "fraction": flagged counted tokens / counted tokens of the row (0 where a row has none).
        "window": the largest flagged fraction over `window` consecutive counted tokens (the fraction
        while the row has fewer than `window`), through the guard's own `window_scores`.
        "features": the largest share, over windows of `window` counted tokens, of the `token_weights` of the
        features active somewhere in the window (see configuration_dsg), through the guard's own arithmetic.
        A token is flagged as `token_flags(features, token_weights, token_threshold)` says.
        token_value "points" (with `token_weights`): a token adds its points floored at 0 instead of its flag,
        and rho is a share of the most points (the positive weights' sum per token), as the guard does.
        Only counted tokens enter, so a row's score does not depend on its padding or its batch.
        """
        if score == "features":
            if token_weights is None:
                raise DSGError("score 'features' needs token_weights")
            return self.feature_window_rho(features, token_weights, window)
        if token_value == "points":
            if token_weights is None:
                raise DSGError("token_value 'points' needs token_weights")
            values = self.token_points(features, token_weights).clamp(min=0)
            scale = sum(w for w in token_weights if w > 0)
            flagged = torch.zeros(self.n_rows, dtype=torch.long).index_add_(0, self.token_row.long(), values)
            flagged = flagged.double()
        elif token_value == "flag":
            values = self.token_flags(features, token_weights, token_threshold)
            scale = 1
            flagged = torch.bincount(self.token_row[values].long(), minlength=self.n_rows).double()
        else:
            raise DSGError(f"unknown token_value {token_value!r} (flag or points)")
        counts = self.row_token_counts.double()
        # the guard's own arithmetic: flagged / (seen * scale), the product exact (and x1 for flags)
        fraction = torch.where(counts > 0, flagged / (counts.clamp(min=1) * scale), 0.0)
        if score == "fraction":
            return fraction
        if score != "window":
            raise DSGError(f"unknown score {score!r} (fraction, window or features)")
        dense, counted = self.dense_rows(values)
        zeros = torch.zeros(self.n_rows, dtype=torch.long)
        best, _ = window_scores(
            dense,
            counted,
            window,
            zeros,
            torch.full((self.n_rows,), -1.0, dtype=torch.float64),
            torch.zeros(self.n_rows, window - 1, dtype=values.dtype),
            scale,
        )
        return torch.where(self.row_token_counts >= window, best, fraction)

    def row_activity(self, segment: int | None = None) -> Tensor:
        """[samples, d_sae] bool: whether each feature is active (> 0) at some counted token of each row (one
        sample per row), or with `segment` of each piece of a row that holds positions [k segment, (k + 1)
        segment) (one sample per piece with a counted token, in row order; a row of at most `segment` positions is
        one piece)."""
        nnz = (self.indptr[1:] - self.indptr[:-1]).long()
        sample, n_samples = self.token_row.long(), self.n_rows
        if segment is not None and self.n_tokens:
            pieces = int(self.token_pos.max()) // segment + 1
            _, sample = torch.unique(sample * pieces + self.token_pos.long() // segment, return_inverse=True)
            n_samples = int(sample.max()) + 1
        out = torch.zeros(n_samples, self.d_sae, dtype=torch.bool)
        out[torch.repeat_interleave(sample, nnz), self.feature_index.long()] = True
        return out

    def feature_window_rho(self, features: Iterable[int], token_weights: Iterable[int], window: int) -> Tensor:
        """rho per row for score "features" (see `row_scores`), through the guard's own `feature_window_scores`
        over the rows' counted tokens, 256 rows at a time. Returns [n_rows] float64."""
        weights = torch.as_tensor(list(token_weights), dtype=torch.long)
        scale = int(weights.clamp(min=0).sum())
        rho = torch.zeros(self.n_rows, dtype=torch.float64)
        if self.n_tokens == 0:
            return rho
        activity = self.feature_activity(features)  # [n_tokens, N]
        tokens, counted = self.dense_rows(torch.arange(self.n_tokens))
        for start in range(0, self.n_rows, 256):
            index, mask = tokens[start : start + 256], counted[start : start + 256]
            rows = len(index)
            rho[start : start + rows], _ = feature_window_scores(
                activity[index] & mask.unsqueeze(-1),
                mask,
                window,
                torch.zeros(rows, dtype=torch.long),
                torch.zeros(rows, dtype=torch.float64),
                torch.full((rows, len(weights)), -window, dtype=torch.long),
                weights,
                scale,
            )
        return rho

    def dense_rows(self, token_values: Tensor) -> tuple[Tensor, Tensor]:
        """Per-token values as [n_rows, longest row] in position order, and the mask of real entries."""
        order = torch.argsort(
            self.token_row.long() * (int(self.token_pos.max()) + 1 if self.n_tokens else 1) + self.token_pos.long()
        )
        rows = self.token_row.long()[order]
        starts = torch.cumsum(self.row_token_counts, 0) - self.row_token_counts
        rank = torch.arange(self.n_tokens) - starts[rows]
        width = int(self.row_token_counts.max()) if self.n_rows else 0
        dense = torch.zeros(self.n_rows, width, dtype=token_values.dtype)
        mask = torch.zeros(self.n_rows, width, dtype=torch.bool)
        dense[rows, rank] = token_values[order]
        mask[rows, rank] = True
        return dense, mask

    def top_activations(self, feature: int, k: int = 10) -> list[tuple[int, int, float]]:
        """The k largest activations of `feature` over counted tokens, as (row, position, value),
        largest first (ties: earlier token first)."""
        (feature,) = self._feature_set([feature]).tolist()
        where = (self.feature_index == feature).nonzero().squeeze(1)
        order = torch.sort(self.values[where].float(), descending=True, stable=True).indices[:k]
        tokens = torch.searchsorted(self.indptr, where[order], right=True) - 1
        return [
            (int(self.token_row[t]), int(self.token_pos[t]), float(self.values[where[o]]))
            for t, o in zip(tokens.tolist(), order.tolist())
        ]


@torch.no_grad()
def collect(
    model: nn.Module,
    layer: int,
    encode: Callable[[Tensor], Tensor],
    rows: Rows,
    *,
    batch_size: int = 8,
    ignore_token_ids: Iterable[int] = (),
    device: torch.device | str | None = None,
    desc: str = "statistics",
    value_dtype: torch.dtype = torch.float32,
) -> ActivationStore:
    """Run `rows` through `model` up to decoder block `layer` and encode that block's output.

    `encode(hidden [B,T,d] float32) -> activations [B,T,d_sae]`. Inputs go to `device` (default: the
    model's device). The model is put in eval mode for the pass and restored afterwards.
    `value_dtype` is the dtype of the stored sparse values (float32, or float16 to halve them).

    Over several processes (`modeling_dsg.distributed`, W = world size), process r runs batches r, r + W,
    r + 2W, ... of the length-sorted order; every process then gathers the per-batch results (sums, counts
    and the sparse pieces, never dense activations) and assembles them in batch order, so each one returns
    the store one process would have built: the same tokens in the same order, the totals summed in the same
    order. An error in any process ends the pass in all of them.
    """
    if batch_size < 1:
        raise DSGError(f"batch_size must be at least 1, got {batch_size}")
    if len(rows) == 0:
        raise DSGError("no rows to collect statistics on")
    run = LayerOutput(model, layer)
    device = torch.device(device) if device is not None else model_device(model)
    ignore = torch.tensor(sorted(set(int(i) for i in ignore_token_ids)), dtype=torch.long)

    # Rows go through in order of length and each batch is cut after its longest row, so padding costs
    # (almost) nothing; right padding never changes the real tokens' activations in a causal model.
    lengths = rows.attention_mask.long().cumsum(1).argmax(1) + 1  # last attended position + 1
    order = torch.argsort(lengths, stable=True)
    batches = [order[start : start + batch_size] for start in range(0, len(rows), batch_size)]
    distributed.init(device)
    pieces, error = [], None
    was_training = model.training
    model.eval()
    try:
        for index in tqdm(distributed.shard(batches), desc=desc, unit="batch", disable=not distributed.is_main()):
            width = int(lengths[index].max())
            pieces.append(_batch_statistics(run, encode, rows, index, width, ignore, device, value_dtype))
    except Exception as err:  # every process learns of it (a lone failure would leave the others waiting)
        error = err
    finally:
        model.train(was_training)
    distributed.raise_if_any_failed(error, desc)
    pieces = distributed.gather_shards(pieces, len(batches))  # every process's batches, in batch order

    d_sae = int(pieces[0]["sums"].numel())
    sums = torch.zeros(d_sae, dtype=torch.float64)
    counts = torch.zeros(d_sae, dtype=torch.long)
    row_token_counts = torch.zeros(len(rows), dtype=torch.long)
    for piece in pieces:  # in batch order, as one process adds them
        sums += piece["sums"]
        counts += piece["counts"]
        row_token_counts[piece["index"]] = piece["row_token_counts"]
    per_token = torch.cat([piece["per_token"] for piece in pieces])
    if per_token.numel() == 0:
        raise DSGError("the rows have no counted token (every position is padding or an ignored special token)")
    return ActivationStore(
        d_sae=d_sae,
        n_rows=len(rows),
        n_tokens=int(per_token.numel()),
        feature_sums=sums,
        feature_counts=counts,
        row_token_counts=row_token_counts,
        token_row=torch.cat([piece["token_row"] for piece in pieces]),
        token_pos=torch.cat([piece["token_pos"] for piece in pieces]),
        token_id=torch.cat([piece["token_id"] for piece in pieces]),
        indptr=torch.cat([torch.zeros(1, dtype=torch.long), per_token.cumsum(0)]),
        feature_index=torch.cat([piece["feature_index"] for piece in pieces]),
        values=torch.cat([piece["values"] for piece in pieces]),
    )


def _batch_statistics(run, encode, rows: Rows, index: Tensor, width: int, ignore: Tensor, device, value_dtype) -> dict:
    """One batch of the pass (rows `index`, cut at `width`), as CPU tensors: per-feature float64 sums and
    firing counts, each row's counted tokens, and the counted tokens' rows, positions, ids and sparse
    activations (row-major)."""
    ids = rows.input_ids[index, :width].cpu()
    mask = rows.attention_mask[index, :width].cpu()
    hidden = run(ids.to(device), mask.to(device))
    acts = encode(hidden.float())
    if acts.dim() != 3 or acts.shape[:2] != ids.shape:
        raise DSGError(f"encode returned shape {tuple(acts.shape)}, expected [{ids.shape[0]}, {ids.shape[1]}, d_sae]")
    counted = mask.bool() & ~torch.isin(ids, ignore)  # [B, T] on CPU
    r, p = counted.nonzero(as_tuple=True)
    a = acts[counted.to(acts.device)]  # [n, d_sae], row-major like (r, p)
    active = a > 0
    tok, feat = active.nonzero(as_tuple=True)
    return {
        "index": index,
        "sums": a.sum(0, dtype=torch.float64).cpu(),
        "counts": active.sum(0).cpu(),
        "row_token_counts": counted.sum(1),
        "token_row": index[r].to(torch.int32),
        "token_pos": p.to(torch.int32),
        "token_id": ids[r, p].to(torch.int32),
        "per_token": torch.bincount(tok, minlength=a.shape[0]).cpu(),
        "feature_index": feat.to(torch.int32).cpu(),
        "values": a[tok, feat].to(value_dtype).cpu(),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def full_forward_speedup(
    model: nn.Module,
    layer: int,
    rows: Rows,
    *,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    warmup: bool | None = None,
) -> dict:
    """Time one batch (the first `batch_size` rows) through blocks 0..layer (early stop) and through
    the whole model (all blocks, final norm and LM head at every position, as a statistics pass built
    on a plain forward with `output_hidden_states=True` would run).

    Returns {"layer", "n_layers", "batch_size", "seq_len", "tokens" (real tokens in the batch),
    "early_stop_s", "full_forward_s", "early_stop_tokens_per_s", "full_forward_tokens_per_s",
    "speedup" (= full_forward_s / early_stop_s)}. `warmup` (default: on for accelerators, off on CPU)
    runs each path once untimed first.
    """
    run = LayerOutput(model, layer)
    device = torch.device(device) if device is not None else model_device(model)
    ids = rows.input_ids[:batch_size].to(device)
    mask = rows.attention_mask[:batch_size].to(device)
    if ids.shape[0] == 0:
        raise DSGError("no rows to time")
    if warmup is None:
        warmup = device.type != "cpu"

    def full():
        model(input_ids=ids, attention_mask=mask, use_cache=False)

    def early():
        run(ids, mask)

    def timed(fn) -> float:
        if warmup:
            fn()
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        return time.perf_counter() - t0

    was_training = model.training
    model.eval()
    try:
        early_s, full_s = timed(early), timed(full)
    finally:
        model.train(was_training)
    tokens = int(mask.sum())
    return {
        "layer": layer,
        "n_layers": len(decoder_blocks(model)),
        "batch_size": int(ids.shape[0]),
        "seq_len": int(ids.shape[1]),
        "tokens": tokens,
        "early_stop_s": early_s,
        "full_forward_s": full_s,
        "early_stop_tokens_per_s": tokens / early_s,
        "full_forward_tokens_per_s": tokens / full_s,
        "speedup": full_s / early_s,
    }
