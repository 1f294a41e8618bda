"""Sparse autoencoders in plain torch, with sae-lens' tensor names and math.

Tensors (as in sae-lens): W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in];
JumpReLU adds `threshold` [d_sae]; gated replaces b_enc by b_gate, b_mag and r_mag [d_sae].

Encoding, with x' = norm_in(x) - b_dec * apply_b_dec_to_input:
    standard  f = relu(x' W_enc + b_enc)
    jumprelu  p = x' W_enc + b_enc;  f = relu(p) * (p > threshold)
    gated     f = 1[x' W_enc + b_gate > 0] * relu(x' (W_enc * exp(r_mag)) + b_mag)
    topk      p = x' W_enc + b_enc (times ||W_dec[i]|| if rescale_acts_by_decoder_norm);
              f = relu(p) on the k largest entries of p, 0 elsewhere
Decoding: norm_out(f W_dec + b_dec), with f / ||W_dec[i]|| first when TopK rescales.

A guardrail only ever needs its N selected features. For standard, JumpReLU and gated SAEs each
feature depends on its own encoder column only, so `encode_selected` costs O(N * d_in) per token and
a *slim* SAE stores just those N columns and rows. TopK is the exception: whether a feature is in the
top k depends on every pre-activation, so TopK always keeps (and computes) the whole encoder, O(d_sae *
d_in) per token; only its decoder is sliced when slim.
"""

from __future__ import annotations

import torch
from torch import nn


def _affine(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x W + b for x [..., d_in], in one fused matrix product (the bias added by the product, no extra pass)."""
    flat = x.reshape(-1, x.shape[-1])
    return torch.addmm(b, flat, W).view(*x.shape[:-1], W.shape[1])


class SparseAutoencoder(nn.Module):
    """Base class. Holds only sae-lens tensors; the guard passes the selected feature indices
    `index` [N] (into the full d_sae space) to `encode_selected` and `decoder_rows`.

    If `slim`, per-feature tensors hold only the N selected features, in the order of `index`.
    """

    per_feature_encoder = True  # False for TopK: the encoder cannot be sliced

    def __init__(self, sae: dict, n_features: int):
        super().__init__()
        self.d_in, self.d_sae = sae["d_in"], sae["d_sae"]
        self.apply_b_dec_to_input = sae.get("apply_b_dec_to_input", False)
        self.normalize_activations = sae.get("normalize_activations", "none")
        self.slim = sae.get("slim", False)
        n = n_features
        self.n_enc = n if (self.slim and self.per_feature_encoder) else self.d_sae
        self.n_dec = n if self.slim else self.d_sae
        self.W_enc = nn.Parameter(torch.zeros(self.d_in, self.n_enc))
        self.W_dec = nn.Parameter(torch.zeros(self.n_dec, self.d_in))
        self.b_dec = nn.Parameter(torch.zeros(self.d_in))
        self._add_encoder_parameters(self.n_enc)

    def _add_encoder_parameters(self, n_enc: int):
        self.b_enc = nn.Parameter(torch.zeros(n_enc))

    # -- input and output normalisation ---------------------------------------------------------------
    def preprocess(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return x' (the encoder input) and the per-token factor that maps SAE-space deltas back."""
        scale = None
        if self.normalize_activations == "constant_norm_rescale":
            coeff = (self.d_in**0.5) / x.norm(dim=-1, keepdim=True)
            x, scale = x * coeff, 1.0 / coeff
        elif self.normalize_activations == "layer_norm":
            mu = x.mean(dim=-1, keepdim=True)
            x = x - mu
            std = x.std(dim=-1, keepdim=True)
            x, scale = x / (std + 1e-5), std
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        return x, scale

    # -- encoding ------------------------------------------------------------------------------------
    encoder_vectors = ("b_enc",)  # the per-feature encoder vectors, in the order `_prepare` takes them

    def _activate(self, x: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Activations for a preprocessed input x' from prepared encoder tensors (`_prepare`'s result)."""
        return torch.relu(_affine(x, W, b))

    def _prepare(self, W, *vectors):
        """The encoder tensors as `_activate` uses them (a subclass may precompute a per-feature term)."""
        return (W, *vectors)

    def _weights(self) -> list:
        """[W_enc, the encoder vectors..., W_dec], read straight from the parameters (a hot path: no `__getattr__`)."""
        return list(map(self._parameters.__getitem__, ("W_enc", *self.encoder_vectors, "W_dec")))

    def _encoder(self) -> tuple:
        """Every stored feature's prepared encoder tensors, made once while the weights stay the same."""
        W_enc, *vectors, _ = self._weights()
        return self._cached("encoder", (W_enc, *vectors), lambda: self._prepare(W_enc, *vectors))

    def _selected(self, index: torch.Tensor) -> tuple:
        """The selected features' prepared encoder tensors, then their decoder rows [N, d_in]: everything a guard
        call takes from the weights, made once while they stay the same (a slim SAE stores just these)."""
        W_enc, *vectors, W_dec = self._weights()
        if self.slim:
            return self._cached("selected", (W_enc, *vectors, W_dec), lambda: (*self._prepare(W_enc, *vectors), W_dec))

        def make():
            encoder = self._prepare(W_enc.index_select(1, index), *(v.index_select(0, index) for v in vectors))
            return (*encoder, W_dec.index_select(0, index))

        return self._cached("selected", (index, W_enc, *vectors, W_dec), make)

    def _cached(self, name: str, sources: tuple, make):
        """`make()`, tensors derived from `sources` (the selected features' slices), computed once and reused
        while none of the sources changes: the same storage and the same version counter (an in-place edit or a
        reload bumps it). Each decoding step then skips the gather through the whole SAE. The entry holds the
        sources, so their memory cannot be reused under it. Recomputed every call under autograd, torch.compile, or an
        accelerate hook (whose offloaded weights are loaded afresh for each call), and for inference tensors
        (made under `torch.inference_mode`, they keep no version counter). Runs once per decoding step, between
        blocks whose weights have pushed everything else out of the CPU's caches, so it reads as little as it can."""
        if torch.is_grad_enabled() and any(t.requires_grad for t in sources):
            return make()
        if self.__dict__.get("_hf_hook") is not None or torch.compiler.is_compiling():
            return make()
        try:  # (a cast or a move makes new storage: a new address, while the entry keeps the old one alive)
            key = [(t.data_ptr(), t._version, t.get_device()) for t in sources]
        except RuntimeError:  # an inference tensor: no version counter
            return make()
        cache = self.__dict__.setdefault("_slices", {})
        entry = cache.get(name)
        if entry is None or entry[0] != key:
            entry = cache[name] = (key, tuple(t.detach() for t in sources), make())
        return entry[2]

    def encode_selected(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Activations [..., N] of the selected features `index` for an already preprocessed input x'."""
        return self._activate(x, *self._selected(index)[:-1])

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """All d_sae activations for a raw input x (not available for a slim SAE)."""
        if self.slim:
            raise ValueError("a slim SAE stores only its selected features; full encoding is not available")
        return self._activate(self.preprocess(x.float())[0], *self._encoder())

    # -- decoding ------------------------------------------------------------------------------------
    def decoder_rows(self, index: torch.Tensor) -> torch.Tensor:
        """The selected features' decoder rows [N, d_in] (divided by their norm when TopK rescales)."""
        return self._selected(index)[-1]

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """sae-lens decode of full activations (not available for a slim SAE)."""
        if self.slim:
            raise ValueError("a slim SAE stores only its selected features; full decoding is not available")
        out = f @ self.W_dec + self.b_dec
        if self.normalize_activations != "none":
            raise ValueError("decode() of a normalising SAE needs the input's statistics; use the guard")
        return out

    def sliced_state(self, index: torch.Tensor) -> dict:
        """This SAE's tensors cut down to the features `index`: what a slim SAE stores."""
        if self.slim:
            return dict(self.state_dict())
        state = {}
        for name, tensor in self.state_dict().items():
            if name == "W_dec":
                state[name] = tensor.index_select(0, index)
            elif name == "b_dec" or not self.per_feature_encoder:
                state[name] = tensor
            elif name == "W_enc":
                state[name] = tensor.index_select(1, index)
            else:  # a per-feature encoder vector: b_enc, threshold, b_gate, b_mag, r_mag
                state[name] = tensor.index_select(0, index)
        return state

    def forward(self, x: torch.Tensor, index: torch.Tensor):
        """All the guard needs from the SAE's weights, in one module call (so that accelerate loads
        offloaded weights for it): the selected features' activations [..., N], their decoder rows
        [N, d_in] and the per-token output scale (None without input normalisation)."""
        x, out_scale = self.preprocess(x)
        *encoder, rows = self._selected(index)
        return self._activate(x, *encoder), rows, out_scale

    def check_finite(self, where: str):
        for name, tensor in self.named_parameters():
            if tensor.device.type != "meta" and not torch.isfinite(tensor).all():
                raise ValueError(f"{where}: SAE tensor {name} contains NaN or infinite values")


class StandardSAE(SparseAutoencoder):
    """ReLU SAE."""


class JumpReLUSAE(SparseAutoencoder):
    """JumpReLU SAE: a feature is active only above its learned threshold."""

    encoder_vectors = ("b_enc", "threshold")

    def _add_encoder_parameters(self, n_enc: int):
        super()._add_encoder_parameters(n_enc)
        self.threshold = nn.Parameter(torch.zeros(n_enc))

    def _prepare(self, W, b, threshold):
        return W, b, threshold.clamp(min=0)  # relu(pre) * (pre > threshold) is 0 wherever pre <= max(threshold, 0)

    def _activate(self, x, W, b, threshold):
        pre = _affine(x, W, b)
        return pre.masked_fill_(pre <= threshold, 0)  # relu(pre) * (pre > threshold): the same values


class GatedSAE(SparseAutoencoder):
    """Gated SAE: a gate decides which features are on, a rescaled path gives their magnitude."""

    encoder_vectors = ("b_gate", "b_mag", "r_mag")

    def _add_encoder_parameters(self, n_enc: int):
        self.b_gate = nn.Parameter(torch.zeros(n_enc))
        self.b_mag = nn.Parameter(torch.zeros(n_enc))
        self.r_mag = nn.Parameter(torch.zeros(n_enc))

    def _prepare(self, W, b_gate, b_mag, r_mag):
        return W, W * r_mag.exp(), b_gate, b_mag  # the magnitude path's weights, scaled once

    def _activate(self, x, W, W_mag, b_gate, b_mag):
        gate = (_affine(x, W, b_gate) > 0).to(x.dtype)
        return gate * torch.relu(_affine(x, W_mag, b_mag))


class TopKSAE(SparseAutoencoder):
    """TopK SAE: the k largest pre-activations survive. Needs every pre-activation, so the encoder is
    never sliced: O(d_sae * d_in) per token even when only N features are selected."""

    per_feature_encoder = False

    def __init__(self, sae: dict, n_features: int):
        self.k = sae["k"]
        self.rescale = sae.get("rescale_acts_by_decoder_norm", False)
        super().__init__(sae, n_features)
        if self.rescale and self.slim:
            # rescaling multiplies every pre-activation by its decoder row's norm: keep all the norms.
            self.register_buffer("dec_norm", torch.ones(self.d_sae))

    def sliced_state(self, index):
        state = super().sliced_state(index)
        if self.rescale and not self.slim:
            state["dec_norm"] = self.W_dec.norm(dim=-1)
        return state

    def _decoder_norms(self) -> torch.Tensor:
        return self.dec_norm if self.slim else self.W_dec.norm(dim=-1)

    def _pre(self, x, W, b):
        pre = _affine(x, W, b)
        return pre.mul_(self._decoder_norms()) if self.rescale else pre

    def _activate(self, x, W, b):
        pre = self._pre(x, W, b)
        top = pre.topk(self.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, top.indices, top.values.relu())

    def encode_selected(self, x, index):
        # The selected features only: a feature survives when its pre-activation reaches the k-th largest
        # of its token (the same set as topk's, barring exact ties at the k-th value), so no dense
        # [B, T, d_sae] activation tensor is built on the hot path.
        pre = self._pre(x, self.W_enc, self.b_enc)
        kth = pre.topk(self.k, dim=-1, sorted=False).values.amin(-1, keepdim=True)
        selected = pre.index_select(-1, index)
        return torch.where(
            selected >= kth, selected.relu(), torch.zeros((), dtype=selected.dtype, device=selected.device)
        )

    def decoder_rows(self, index):
        rows = self.W_dec
        if not self.slim:
            rows = self._cached("decoder", (index, rows), lambda: rows.index_select(0, index))
        if self.rescale:
            rows = rows / self._decoder_norms().index_select(0, index)[:, None]
        return rows

    def forward(self, x, index):
        x, out_scale = self.preprocess(x)
        return self.encode_selected(x, index), self.decoder_rows(index), out_scale

    def decode(self, f):
        if self.rescale and not self.slim:
            f = f / self._decoder_norms()
        return super().decode(f)


SAE_CLASSES = {"standard": StandardSAE, "jumprelu": JumpReLUSAE, "gated": GatedSAE, "topk": TopKSAE}


def make_sae(sae: dict, n_features: int) -> SparseAutoencoder:
    return SAE_CLASSES[sae["architecture"]](sae, n_features)
