"""One guardrail: its SAE features, its per-sequence classifier and its edit of the residual stream.

A `DSGGuard` is attached with a forward hook to the output of decoder block `layer`. For a hidden
state h [B, T, d] it computes, in fp32 and only for the N selected features:

    f        = SAE activations of the selected features            [B, T, N]
    active_t = any_i f_t,i > 0, at counted tokens only               [B, T]
    flag_t   = active_t, or with integer `token_weights` w and `token_threshold` m:
               sum_i w_i 1[f_t,i > 0] >= m (exact integer points)   [B, T]
    value_t  = flag_t, or with token_value "points": max(sum_i w_i 1[f_t,i > 0], 0) / P, where P is
               the sum of the positive weights (the most a token can score)   [B, T]
    rho      = (values so far) / (counted tokens so far)             [B]   per row, score "fraction"
             or the largest such share over `window` consecutive counted tokens so far
               (the fraction while fewer than `window` were seen)           score "window"
             or the largest, over the windows of `window` counted tokens so far (fewer at the start),
               of max(sum_i w_i 1[feature i active somewhere in the window], 0) / P   score "features"
    fired    = fired_before or rho > tau                             [B]   (dynamic mode)
    edit_t   = fired and active_t                                    [B, T]
    f'       = -clamp for all selected features where edit_t, f elsewhere
    h'       = h + ((f' - f) W_dec[selected]) * out_scale

so the SAE's reconstruction error is kept and an unedited token (or row) is returned exactly. That is the
"clamp" action; with "refuse" or "monitor" the guard decides the same way and edits nothing (a refusing
row's logits are set by `DSGForCausalLM.forward`).
Static mode (Farrell et al.) edits every counted token, setting each *active* selected feature to -clamp.

Counted tokens are the real ones: not padding, not BOS. The running state of each row (a `GuardState`:
flags, counted tokens, fired, best window so far, the last window-1 flags) lives in a `GuardCall` that
belongs to one forward call (a `contextvars.ContextVar`, so threads never share it); across the decoding
steps of `generate` it travels on the KV cache object. Nothing per-call is stored on a module.
What the guardrails report is typed too: `GuardRecord` (one per guardrail and forward, from
`record_guardrails`) and `GuardDecision` (the outputs' `guardrail_decisions`); both read like dicts.
"""

from __future__ import annotations

import contextvars
import math
from dataclasses import dataclass, field, fields
from typing import NamedTuple

import torch
from torch import nn

from .configuration_dsg import WINDOWED
from .sae_dsg import make_sae


class GuardState(NamedTuple):
    """One guardrail's running state, per row of the batch (B rows), after the tokens seen so far.

    Each field is a tensor whose first dimension is the batch, so the state follows the KV cache's rows
    (`GuardedCache` rebuilds it with `type(state)._make`).
    """

    flagged: torch.Tensor  # [B] long: counted tokens flagged so far (token_value "points": their points; 0 for
    # score "features", whose rho needs no count)
    seen: torch.Tensor  # [B] long: counted tokens so far
    fired: torch.Tensor  # [B] bool: the guardrail has fired on the row (sticky)
    best: torch.Tensor  # [B] float64: best flagged fraction over a full window so far, -1 before one (score
    # "features": the best window's share so far, 0 before any)
    tail: torch.Tensor  # [B, window - 1]: the last window - 1 counted flags (bool) or points (long), right-aligned;
    # score "features": [B, N] long, the counted token (1, 2, ...) at which each feature was last active


class RefusalState(NamedTuple):
    """How much of the refusal each row has written (the "refuse" action), kept with the guardrails' state."""

    written: torch.Tensor  # [B] long: refusal tokens written after this call; -1 before the row refused


class FieldMapping:
    """A dataclass that also reads as a read-only dict of its fields: `r["name"]`, `"name" in r`, `r.get`,
    `keys`, `values`, `items` (dict views), `dict(r)`, iteration over the names in field order, `len`, and
    `==` against a dict or another one as between dicts. Subclasses are `@dataclass(eq=False)`."""

    def as_dict(self) -> dict:
        """The fields as a plain dict (not a copy of the values)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def keys(self):
        return self.as_dict().keys()

    def values(self):
        return self.as_dict().values()

    def items(self):
        return self.as_dict().items()

    def __getitem__(self, key):
        return self.as_dict()[key]

    def get(self, key, default=None):
        return self.as_dict().get(key, default)

    def __contains__(self, key) -> bool:
        return key in self.as_dict()

    def __iter__(self):
        return iter(self.as_dict())

    def __len__(self) -> int:
        return len(fields(self))

    def __eq__(self, other):
        if isinstance(other, (FieldMapping, dict)):
            return self.as_dict() == dict(other.items())
        return NotImplemented

    __hash__ = None


@dataclass(eq=False)
class GuardRecord(FieldMapping):
    """What one guardrail saw and decided in one forward call (B rows, T tokens of the call, N selected
    features), as collected by `DSGForCausalLM.record_guardrails`."""

    guardrail: str  # the guardrail's name
    index: int  # its position in `model.guards`
    rho: torch.Tensor  # [B] float64: the running score after this call
    fired: torch.Tensor  # [B] bool: fired at any point so far (sticky)
    flags: torch.Tensor  # [B, T] bool: counted tokens the classifier flags (see the module docstring)
    acts: torch.Tensor  # [B, T, N]: the selected features' SAE activations, in the guard's dtype
    counted: torch.Tensor  # [B, T] bool: the tokens that count (not padding, not BOS)


@dataclass(eq=False)
class GuardDecision(FieldMapping):
    """One guardrail's decision per row after a forward call: the values of an output's
    `guardrail_decisions` (a dict from guardrail name to `GuardDecision`)."""

    fired: torch.Tensor  # [B] bool: fired at any point so far (sticky)
    rho: torch.Tensor  # [B] float64: the running score
    action: str  # "clamp", "refuse" or "monitor"


@dataclass
class GuardCall:
    """What the hooks of one forward call share: the counted-token mask and the running state."""

    counted: torch.Tensor | None  # [B, T] bool, or None: every token counts
    state: dict = field(default_factory=dict)  # guard index -> GuardState; "refusal" -> RefusalState
    rho: dict = field(default_factory=dict)  # guard index -> rho [B] after this call


def _counted_only(values, counted):
    """`values` [B, T] (bool flags or long points) where `counted`, 0 (False) elsewhere."""
    return values & counted if values.dtype == torch.bool else values * counted


def window_scores(flags, counted, window: int, seen, best, tail, scale: int = 1):
    """Running maximum, per row, of the flagged fraction over `window` consecutive counted tokens.

    flags, counted [B, T] bool (only counted tokens matter); seen [B] counted tokens before this chunk;
    best [B] float64 (-1: no full window yet); tail [B, window-1] the last flags before this chunk,
    right-aligned. Returns the new (best, tail). Vectorised: no Python loop over rows or tokens.
    `flags` may also be long points (token_value "points", `tail` long too): a window's score is then its
    points over `window * scale` (`scale`: the most points a token can have).
    """
    batch, length = flags.shape
    if length == 1:  # one decoding step: the same result in a third of the operations
        full = (seen + counted.view(-1)) >= window
        return window_step(_counted_only(flags, counted), counted, window, full, best, tail, scale)
    order = torch.argsort((~counted).to(torch.int8), dim=1, stable=True)  # counted tokens first, in order
    compact = _counted_only(flags, counted).gather(1, order)
    n_new = counted.sum(-1)
    exact = torch.int32 if flags.dtype == torch.bool else torch.int64  # window sums of points can pass 2**31
    seq = torch.cat([tail.to(exact), compact.to(exact)], dim=1)  # [B, window - 1 + T]
    csum = torch.nn.functional.pad(seq.cumsum(1), (1, 0))
    sums = csum[:, window : window + length] - csum[:, :length]  # the window ending at compact position i
    pos = torch.arange(length, device=flags.device)
    full = (pos < n_new.unsqueeze(1)) & (seen.unsqueeze(1) + pos + 1 >= window)
    fractions = torch.where(full, sums.double() / (window * scale), torch.full_like(sums, -1, dtype=torch.float64))
    best = torch.maximum(best, fractions.amax(-1)) if length else best
    index = n_new.unsqueeze(1) + torch.arange(window - 1, device=flags.device)
    return best, seq.gather(1, index).to(tail.dtype)


def window_step(new, counted, window: int, full, best, tail, scale: int = 1):
    """`window_scores` for one token per row, in few tensor operations (a decoding step runs it once per
    guardrail). new [B, 1]: the token's flag or points, already 0 where it is not counted; counted [B, 1];
    full [B]: the rows that have now seen `window` counted tokens, counting this one.

    The window ending at this token is the last window - 1 values (`tail`) plus this one. A row whose token is
    not counted keeps its tail, and since values are never negative its last full window, already in `best`,
    is at least the sum scored here; so `full` needs no `counted` term and `best` comes out the same."""
    if window > 1:
        seq = torch.cat([tail, new], dim=1)  # the window ending at this token
        total = seq.sum(-1)
        tail = torch.where(counted, seq[:, 1:], tail)
    else:
        total = new.view(-1)
    # -1 (below any fraction) where the window is not full, so the maximum keeps the best so far
    return torch.maximum(best, torch.where(full, total.double().div_(window * scale), -1.0)), tail


def feature_window_scores(active, counted, window: int, seen, best, last, weights, scale: int):
    """Running maximum, per row, of a window's feature points (score "features").

    active [B, T, N] bool: the selected features active at each token, only at counted tokens; counted [B, T];
    seen [B] counted tokens before this chunk; best [B] float64; last [B, N] long: the counted token (1-based) at
    which each feature was last active, -window if never. A counted token's window is it and the window - 1
    counted tokens before it; its score is the `weights` (a long vector [N]) of the features active anywhere in
    the window, summed, over `scale`; `best` starts at 0, so the maximum floors a negative sum at 0. Returns the new
    (best, last). Integer arithmetic up to one division in float64, so the same in one pass, in chunks or token by
    token. An uncounted token's window is the last counted token's, already scored, so no mask is needed."""
    zero = weights.new_zeros(())
    if active.shape[1] == 1:
        pos = (seen + counted.view(-1)).unsqueeze(-1)
        return feature_window_step(active.squeeze(1), pos, window, best, last, weights, zero, scale)
    pos = seen.unsqueeze(1) + counted.long().cumsum(1)  # [B, T]: each token's (last) counted index
    stamps = torch.where(active, pos.unsqueeze(-1), last.unsqueeze(1)).cummax(1).values  # [B, T, N]
    total = torch.where(stamps > (pos - window).unsqueeze(-1), weights, zero).sum(-1).amax(-1)
    return torch.maximum(best, total.double().div_(scale)), stamps[:, -1]


def feature_window_step(active, pos, window: int, best, last, weights, zero, scale: int):
    """`feature_window_scores` for one token per row, in few tensor operations (a decoding step runs it once per
    guardrail). active [B, N]: the features active at this token, only where it is counted; pos [B, 1]: the rows'
    counted tokens so far, counting this one; zero: a long 0 on the weights' device."""
    last = torch.where(active, pos, last)
    total = torch.where(last > pos - window, weights, zero).sum(-1)
    return torch.maximum(best, total.double().div_(scale)), last


# Per forward call and per thread: the current `GuardCall`, whether the guardrails are switched off, and
# the list that `record_guardrails` collects `GuardRecord`s into (None: not recording).
CURRENT_CALL: contextvars.ContextVar = contextvars.ContextVar("dsg_call", default=None)
GUARDS_DISABLED: contextvars.ContextVar = contextvars.ContextVar("dsg_disabled", default=False)
RECORDS: contextvars.ContextVar = contextvars.ContextVar("dsg_record", default=None)


class DSGGuard(nn.Module):
    """A guardrail module. Saved tensors: the SAE's (under `sae.`, sae-lens names), `feature_index` [N]
    (the selected features, in config order), `feature_mask` [d_sae] and `tau` (the threshold)."""

    def __init__(self, guardrail: dict, index: int):
        super().__init__()
        self.index = index
        self.name = guardrail["name"]
        self.layer = guardrail["layer"]
        self.mode = guardrail["mode"]
        self.action = guardrail.get("action", "clamp")
        self.refusal = guardrail.get("refusal")
        self.refusal_ids = list(guardrail.get("refusal_ids") or [])
        self.clamp = guardrail["clamp"]
        self.threshold = guardrail["threshold"]
        self.score = guardrail.get("score", "fraction")
        self.window = guardrail.get("window", 1) if self.score in WINDOWED else 1
        self.features = list(guardrail["features"])
        self.token_weights = guardrail.get("token_weights")
        self.token_threshold = guardrail.get("token_threshold", 1)
        self.token_value = guardrail.get("token_value", "flag")
        self.points = self.token_value == "points"
        # the most points a token (or, score "features", a window) can have: what rho is a share of; else 1
        scaled = self.points or self.score == "features"
        self.point_scale = sum(w for w in self.token_weights if w > 0) if scaled else 1
        # score "features" with no negative weight: a call in which no selected feature is active changes nothing
        # but the count of tokens (`forward`'s short path)
        self.quiet_is_a_count = self.score == "features" and min(self.token_weights) >= 0
        self._weights_on = {}  # device -> (token_weights as a LongTensor, a long zero), made once per device
        self.sae_config = dict(guardrail["sae"])
        self.sae = make_sae(guardrail["sae"], len(self.features))
        self.register_buffer("feature_index", torch.zeros(len(self.features), dtype=torch.long))
        self.register_buffer("feature_mask", torch.zeros(guardrail["sae"]["d_sae"], dtype=torch.bool))
        self.register_buffer("tau", torch.tensor(self.threshold, dtype=torch.float64))
        self.reset_buffers()

    @torch.no_grad()
    def reset_buffers(self):
        """Fill the buffers that follow from the config: feature_index, feature_mask, tau."""
        self.feature_index.copy_(torch.tensor(self.features, dtype=torch.long))
        mask = torch.zeros_like(self.feature_mask, device="cpu")
        mask[self.features] = True
        self.feature_mask.copy_(mask)
        self.tau.fill_(self.threshold)

    def slimmed(self) -> DSGGuard:
        """A copy of this guardrail that stores only its selected features' slices of the SAE."""
        guardrail = self.guardrail_config()
        guardrail["sae"]["slim"] = True
        slim = DSGGuard(guardrail, self.index).to(self.feature_mask.device)
        slim.sae.load_state_dict(self.sae.sliced_state(self.feature_index))
        return slim

    def guardrail_config(self) -> dict:
        config = {
            "name": self.name,
            "layer": self.layer,
            "mode": self.mode,
            "features": list(self.features),
            "clamp": self.clamp,
            "threshold": self.threshold,
            "score": self.score,
            "sae": dict(self.sae_config),
        }
        if self.score in WINDOWED:
            config["window"] = self.window
        if self.token_weights is not None:
            config.update(token_weights=list(self.token_weights), token_threshold=self.token_threshold)
            if self.token_value != "flag":
                config["token_value"] = self.token_value
        config["action"] = self.action
        if self.action == "refuse":
            config.update(refusal=self.refusal, refusal_ids=list(self.refusal_ids))
        return config

    def initial_state(self, batch: int, device) -> GuardState:
        """The rows' running state before their first token: nothing flagged, seen or fired, no window."""
        zeros = torch.zeros(batch, dtype=torch.long, device=device)
        if self.score == "features":  # no feature seen yet: last active "window tokens before the first"
            tail = torch.full((batch, len(self.features)), -self.window, dtype=torch.long, device=device)
        else:
            tail = torch.zeros(batch, self.window - 1, dtype=torch.long if self.points else torch.bool, device=device)
        return GuardState(
            flagged=zeros,
            seen=zeros,
            fired=torch.zeros(batch, dtype=torch.bool, device=device),
            best=torch.full((batch,), 0.0 if self.score == "features" else -1.0, dtype=torch.float64, device=device),
            tail=tail,
        )

    def check_loaded(self):
        """Raise if loaded tensors disagree with the config or hold NaN/inf."""
        where = f"guardrail {self.index} ({self.name!r})"
        # loading with `dtype=` may cast every buffer of an fp32-kept module to float: restore the kinds
        if self.feature_index.dtype != torch.long:
            self.feature_index = self.feature_index.round().long()
        if self.feature_mask.dtype != torch.bool:
            self.feature_mask = self.feature_mask != 0
        self.sae.check_finite(where)
        if self.feature_index.device.type != "meta" and self.feature_index.tolist() != self.features:
            raise ValueError(f"{where}: the checkpoint's feature_index differs from the config's features")
        if self.feature_mask.device.type != "meta":
            stored = self.feature_mask.nonzero().flatten().tolist()
            if stored != sorted(self.features):
                raise ValueError(
                    f"{where}: the checkpoint's feature_mask selects {len(stored)} features "
                    f"that differ from the config's {len(self.features)} features"
                )
        if self.tau.device.type != "meta":
            tolerance = 4 * torch.finfo(self.tau.dtype).eps * max(1.0, abs(self.threshold))
            if not abs(float(self.tau) - self.threshold) <= tolerance:  # NaN fails this too
                raise ValueError(
                    f"{where}: the checkpoint's tau {float(self.tau)} differs from the config's "
                    f"threshold {self.threshold}"
                )

    def weights_on(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """`token_weights` as a LongTensor [N] on `device`, and a long zero there (made once per device)."""
        weights = self._weights_on.get(device)
        if weights is None:
            weights = self._weights_on[device] = (
                torch.tensor(self.token_weights, dtype=torch.long, device=device),
                torch.zeros((), dtype=torch.long, device=device),
            )
        return weights

    def token_points(self, positive):
        """[B, T] long: the `token_weights` of each token's active features, summed (integer sums: the same in
        any batch or chunk). `positive` [B, T, N] bool: the active features."""
        return torch.where(positive, *self.weights_on(positive.device)).sum(-1)

    def check_activations(self, acts) -> bool:
        """Raise on NaN or inf activations: NaN would read as "not fired". Returns whether any selected feature is
        active. One sum on the hot path answers both, since activations are never negative (every architecture
        ends in a ReLU or a threshold): a sum of non-negative floats is 0 only when each is; the elementwise
        check runs only when that sum is not finite (it may overflow on finite values)."""
        total = acts.sum().item()
        if not math.isfinite(total) and not bool(torch.isfinite(acts).all()):
            raise ValueError(
                f"DSG: guardrail {self.index} ({self.name!r}): non-finite activations at layer "
                f"{self.layer} (NaN or inf in the hidden state); no decision can be taken on them"
            )
        return total != 0

    def forward(self, hidden, counted, state: GuardState, want_flags: bool = True):
        """Decide and edit. `state` is a `GuardState` (or a tuple of its five fields, in order). Returns
        (delta in hidden's dtype or None when no token is edited, new `GuardState`, rho, acts, flags); with
        `want_flags=False` the token flags are left out (None) where no decision needs them, as the hook does
        when nothing records them. A decoding step runs this once per token, so it is written in few tensor
        operations."""
        flagged, seen, fired, best, tail = state
        dtype = self.sae.b_dec.dtype  # the guard computes in its own dtype (fp32 by default)
        acts, rows, out_scale = self.sae(hidden if hidden.dtype == dtype else hidden.to(dtype), self.feature_index)
        any_active = self.check_activations(acts)  # acts [B, T, N]
        if not any_active and self.quiet_is_a_count and not want_flags:
            # no selected feature active at any token: a window's weights can only fall as it slides (none is
            # negative), so the best window, the features' last positions and the edit (none) stay; only the
            # count of tokens moves. A third of the operations, for most decoding steps (94% of those in the
            # benchmark's generations).
            seen = seen + (counted.view(-1) if counted.shape[1] == 1 else counted.sum(-1))
            fired = fired | (best > self.threshold)  # (the threshold may have changed since the last call)
            return None, GuardState(flagged, seen, fired, best, tail), best, acts, None
        positive = acts > 0
        token_flags = None
        if self.score == "features":
            if want_flags:
                token_flags = (self.token_points(positive) >= self.token_threshold) & counted
            weights, zero = self.weights_on(positive.device)
            if counted.shape[1] == 1:  # one decoding step
                seen = seen + counted.view(-1)
                active = positive.squeeze(1) & counted  # [B, N]
                best, tail = feature_window_step(
                    active, seen.unsqueeze(-1), self.window, best, tail, weights, zero, self.point_scale
                )
                active = active.unsqueeze(1)
            else:
                active = positive & counted.unsqueeze(-1)
                best, tail = feature_window_scores(
                    active, counted, self.window, seen, best, tail, weights, self.point_scale
                )
                seen = seen + counted.sum(-1)
            rho = best
            fired = fired | (rho > self.threshold)
            state = GuardState(flagged=flagged, seen=seen, fired=fired, best=best, tail=tail)
            return self._edit(hidden, acts, rows, out_scale, active, counted, state, rho, token_flags)
        if self.token_weights is None:
            token_flags = values = positive.any(-1).logical_and_(counted)
        else:
            points = self.token_points(positive)
            if want_flags or not self.points or self.mode != "dynamic":
                token_flags = (points >= self.token_threshold) & counted
            # points: floored at 0 (a threshold is >= 1, so the flags above are the same before or after)
            values = points.clamp_(min=0).mul_(counted) if self.points else token_flags
        step = values.shape[1] == 1  # one decoding step: a view in place of a sum over T
        flagged = flagged + (values.reshape(-1) if step else values.sum(-1))
        seen_before, seen = seen, seen + (counted.reshape(-1) if step else counted.sum(-1))
        on_cpu = hidden.device.type == "cpu"  # on CPU a check of a tensor's value costs no device sync
        if self.score == "window":
            full = seen >= self.window
            if step:
                best, tail = window_step(values, counted, self.window, full, best, tail, self.point_scale)
            else:
                best, tail = window_scores(values, counted, self.window, seen_before, best, tail, self.point_scale)
        if self.score == "window" and on_cpu and bool(full.all()):
            rho = best  # every row has a full window: its share over the whole row is not needed
        else:
            if self.point_scale == 1:
                rho = flagged.double().div_(seen.clamp(min=1))
            else:  # the exact integer product, divided in float64: the statistics' arithmetic
                rho = flagged.double().div_(seen.clamp(min=1).mul_(self.point_scale))
            if self.score == "window":
                rho = torch.where(full, best, rho)
        fired = fired | ((rho > self.threshold) if self.mode == "dynamic" else token_flags.any(-1))
        state = GuardState(flagged=flagged, seen=seen, fired=fired, best=best, tail=tail)
        return self._edit(hidden, acts, rows, out_scale, positive, counted, state, rho, token_flags)

    def _edit(self, hidden, acts, rows, out_scale, positive, counted, state, rho, flags):
        """`forward`'s result once the rows' decisions are in `state`: the edit of the clamp action (None when no
        token is edited), then the state, rho, the activations and the token flags. `positive` [B, T, N]: the
        selected features active (> 0); `counted` [B, T]."""
        fired = state.fired
        if self.action != "clamp":  # refuse acts on the logits (DSGForCausalLM.forward), monitor never acts
            return None, state, rho, acts, flags
        on_cpu = hidden.device.type == "cpu"  # on CPU a check of a tensor's value costs no device sync
        if on_cpu and self.mode == "dynamic" and not bool(fired.any()):
            return None, state, rho, acts, flags  # no row has fired: nothing to edit
        active = positive & counted.unsqueeze(-1)
        # dynamic: every active feature of the fired rows' tokens that have one; static: every active feature
        edit = (active.any(-1) & fired.unsqueeze(-1)).unsqueeze(-1) if self.mode == "dynamic" else active
        if on_cpu and not bool(edit.any()):
            return None, state, rho, acts, flags  # nothing to edit: skip the decoder product
        coef = (-self.clamp - acts) * edit
        delta = coef @ rows
        if out_scale is not None:
            delta = delta * out_scale
        delta = delta.to(hidden.dtype)
        if not bool(torch.isfinite(delta).all()):
            raise ValueError(
                f"DSG: guardrail {self.index} ({self.name!r}): the edit overflows {hidden.dtype} "
                f"(clamp {self.clamp:g}); lower the clamp or run the base in a wider dtype"
            )
        return delta, state, rho, acts, flags

    def hook(self, module, args, output):
        """Forward hook on the decoder block: edits the block's output in place of the original. It runs between
        blocks whose weights have pushed everything else out of the CPU's caches, so it reads as little as it can."""
        if GUARDS_DISABLED.get():
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        call = CURRENT_CALL.get()
        counted = state = None
        if call is not None:
            counted, state = call.counted, call.state.get(self.index)
        if counted is None or counted.shape != hidden.shape[:2]:
            counted = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        device = self._buffers["feature_index"].device  # where this guard runs (accelerate may put it elsewhere)
        if device.type == "meta":
            device = hidden.device
        if state is None:
            state = self.initial_state(hidden.shape[0], device)
        elif state[0].device != device:  # the fields move together (the cache moves them as one)
            state = GuardState._make(t.to(device) for t in state)
        records = RECORDS.get()
        x = hidden if hidden.device == device else hidden.to(device)
        delta, state, rho, acts, flags = self(
            x, counted if counted.device == device else counted.to(device), state, records is not None
        )
        if call is not None:
            call.state[self.index] = state
            call.rho[self.index] = rho
        if records is not None:
            records.append(
                GuardRecord(
                    guardrail=self.name,
                    index=self.index,
                    rho=rho,
                    fired=state.fired,
                    flags=flags,
                    acts=acts,
                    counted=counted,
                )
            )
        if delta is None:
            return None  # the block's output stands as it is
        hidden = hidden + delta.to(hidden.device)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
