"""Our plain-torch SAEs against sae-lens with the same random weights (tolerance 1e-5)."""

import pytest
import torch

from modeling_dsg.runtime.configuration_dsg import validate_sae
from modeling_dsg.runtime.guard_dsg import DSGGuard

sae_lens = pytest.importorskip("sae_lens")  # a declared test dependency: installed by .ci/run

D_IN, D_SAE = 24, 96
FEATURES = [5, 17, 40, 41, 90]
CASES = [
    ("standard", {}),
    ("standard", {"apply_b_dec_to_input": True}),
    ("jumprelu", {}),
    ("jumprelu", {"normalize_activations": "constant_norm_rescale"}),
    ("gated", {"apply_b_dec_to_input": True}),
    ("topk", {"k": 12}),
    ("topk", {"k": 12, "rescale_acts_by_decoder_norm": True}),
    ("topk", {"k": 12, "normalize_activations": "layer_norm"}),
]


def sae_lens_sae(arch, options):
    classes = {
        "standard": (sae_lens.StandardSAE, sae_lens.StandardSAEConfig),
        "jumprelu": (sae_lens.JumpReLUSAE, sae_lens.JumpReLUSAEConfig),
        "gated": (sae_lens.GatedSAE, sae_lens.GatedSAEConfig),
        "topk": (sae_lens.TopKSAE, sae_lens.TopKSAEConfig),
    }
    cls, cfg_cls = classes[arch]
    opts = {"apply_b_dec_to_input": False, **options}
    sae = cls(cfg_cls(d_in=D_IN, d_sae=D_SAE, **opts))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if name != "threshold" else 0.05))
    return sae


def our_guard(arch, options, sae, features=FEATURES):
    cfg = validate_sae(
        {"architecture": arch, "d_in": D_IN, "d_sae": D_SAE, "apply_b_dec_to_input": False, **options}, "test"
    )
    guard = DSGGuard(
        {
            "name": "t",
            "layer": 0,
            "mode": "dynamic",
            "features": features,
            "clamp": 3.0,
            "threshold": 0.0,
            "score": "fraction",
            "sae": cfg,
        },
        0,
    )
    guard.sae.load_state_dict(sae.state_dict())  # same tensor names as sae-lens
    return guard


@pytest.mark.parametrize("arch,options", CASES)
def test_encode_matches_sae_lens(arch, options):
    sae = sae_lens_sae(arch, options)
    guard = our_guard(arch, options, sae)
    x = torch.randn(3, 7, D_IN, generator=torch.Generator().manual_seed(1)) * 2
    with torch.no_grad():
        want = sae.encode(x)
        got = guard.sae.encode(x)
        selected = guard.sae.encode_selected(guard.sae.preprocess(x)[0], guard.feature_index)
    assert (want > 0).any()
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(selected, want[..., FEATURES], atol=1e-5)
    assert torch.equal(got > 0, want > 0)


@pytest.mark.parametrize("arch,options", CASES)
def test_edit_matches_sae_lens_reconstruction_with_error_term(arch, options):
    """h' = decode(f') + (h - decode(f)): the guard's delta equals sae-lens decode(f') - decode(f)."""
    sae = sae_lens_sae(arch, options)
    guard = our_guard(arch, options, sae)
    x = torch.randn(2, 5, D_IN, generator=torch.Generator().manual_seed(2)) * 2
    counted = torch.ones(2, 5, dtype=torch.bool)
    with torch.no_grad():
        delta, *_, flags = guard(x, counted, guard.initial_state(2, "cpu"))
        f = sae.encode(x)
        edited = f.clone()
        sel = torch.tensor(FEATURES)
        rows = flags[..., None] & torch.ones(len(FEATURES), dtype=torch.bool)
        edited[..., sel] = torch.where(rows, torch.full_like(f[..., sel], -3.0), f[..., sel])
        sae.encode(x)  # sae-lens' normalising SAEs keep the input's statistics from encode for decode
        decoded_edit = sae.decode(edited)
        sae.encode(x)
        want = decoded_edit - sae.decode(f)
    assert flags.any()
    assert torch.allclose(delta, want, atol=1e-4)


def test_topk_needs_the_full_pre_activation():
    """Documented: TopK membership depends on every feature, so the slim TopK keeps the whole encoder."""
    sae = sae_lens_sae("topk", {"k": 12})
    guard = our_guard("topk", {"k": 12}, sae)
    assert guard.sae.per_feature_encoder is False
    state = guard.sae.sliced_state(guard.feature_index)
    assert state["W_enc"].shape == (D_IN, D_SAE) and state["W_dec"].shape == (len(FEATURES), D_IN)
    # dropping the other features' columns changes which features are in the top k
    x = torch.randn(64, D_IN, generator=torch.Generator().manual_seed(3)) * 2
    pre = x @ sae.W_enc[:, FEATURES] + sae.b_enc[FEATURES]
    naive = torch.relu(pre)  # what a sliced encoder would give
    with torch.no_grad():
        exact = sae.encode(x)[:, FEATURES]
    assert not torch.allclose(naive, exact)
    for arch in ("standard", "jumprelu", "gated"):
        sliced = our_guard(arch, {}, sae_lens_sae(arch, {})).sae.sliced_state(torch.tensor(FEATURES))
        assert sliced["W_enc"].shape == (D_IN, len(FEATURES))


@pytest.mark.parametrize("arch", ["standard", "jumprelu", "gated"])
def test_cached_slices_follow_every_change_of_the_weights(arch):
    """A full SAE keeps its selected features' slices between calls (so a decoding step skips the gather
    through the whole encoder); every way the weights or the selection change must be seen at once."""
    guard = our_guard(arch, {}, sae_lens_sae(arch, {}))
    x = torch.randn(2, 3, D_IN, generator=torch.Generator().manual_seed(4)) * 2

    def fresh_acts():  # the same weights, never cached
        other = our_guard(arch, {}, sae_lens_sae(arch, {}), features=guard.features).to(guard.sae.W_enc.dtype)
        other.sae.load_state_dict(guard.sae.state_dict())
        other.feature_index.copy_(guard.feature_index)
        return other.sae(x, other.feature_index)

    def fresh_encode():  # every feature, as the statistics pass encodes, from uncached weights
        other = our_guard(arch, {}, sae_lens_sae(arch, {}), features=guard.features)
        other.sae.load_state_dict(guard.sae.state_dict())
        return other.sae.encode(x)

    def check(every_feature=True):
        with torch.no_grad():
            got, want = guard.sae(x, guard.feature_index), fresh_acts()
            if every_feature:  # the full encoder's prepared tensors are cached too, in their own entry
                assert torch.equal(guard.sae.encode(x), fresh_encode())
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        return got[0]

    first = check()
    assert torch.equal(check(), first)  # a cache hit gives the same tensors
    assert {"selected", "encoder"} <= set(guard.sae.__dict__["_slices"])
    with torch.no_grad():
        guard.sae.W_enc.mul_(1.5)  # an in-place edit
    assert not torch.equal(check(), first)
    guard.sae.load_state_dict({k: v * 0.5 for k, v in guard.sae.state_dict().items()})  # a reload
    check()
    guard.sae.W_dec = torch.nn.Parameter(guard.sae.W_dec.detach() * 2)  # a replaced tensor
    check()
    guard.feature_index.copy_(torch.tensor([1, 2, 3, 4, 5]))  # another selection
    check()
    guard.sae.double()  # a moved or cast module
    x = x.double()
    check(every_feature=False)  # encode() takes float32 input
    with torch.enable_grad():  # under autograd the slices are recomputed, so gradients reach the weights
        guard.sae(x, guard.feature_index)[0].sum().backward()
    assert guard.sae.W_enc.grad is not None and guard.sae.W_enc.grad.abs().sum() > 0


def test_an_sae_made_under_inference_mode_is_not_cached():
    """Tensors made under torch.inference_mode keep no version counter, so their slices are recomputed each call
    (and the call works, in and out of inference mode)."""
    sae = sae_lens_sae("jumprelu", {})
    with torch.inference_mode():
        guard = our_guard("jumprelu", {}, sae)
    assert guard.sae.W_enc.is_inference()
    x = torch.randn(2, 3, D_IN, generator=torch.Generator().manual_seed(5)) * 2
    plain = our_guard("jumprelu", {}, sae)
    with torch.no_grad():
        want = plain.sae(x, plain.feature_index)[0]
    with torch.inference_mode():
        assert torch.equal(guard.sae(x, guard.feature_index)[0], want)
    with torch.no_grad():
        assert torch.equal(guard.sae(x, guard.feature_index)[0], want)
    assert "_slices" not in guard.sae.__dict__


@pytest.mark.parametrize("arch,options", CASES)
def test_activations_are_never_negative_so_one_sum_tells_whether_any_is_active(arch, options):
    """The guard reads one sum of the selected activations both for finiteness and for whether any feature is
    active (a call with none takes a short path): that holds because no architecture gives a negative activation."""
    guard = our_guard(arch, options, sae_lens_sae(arch, options))
    x = torch.randn(40, 9, D_IN, generator=torch.Generator().manual_seed(6)) * 3
    with torch.no_grad():
        acts = guard.sae(x, guard.feature_index)[0]
    assert acts.min() == 0 and (acts > 0).any()  # zeros and positives, nothing below
    quiet = ~(acts > 0).any(-1)  # tokens where no selected feature is active
    assert quiet.any() and not quiet.all()  # both kinds occur, so each answer below is checked
    for row, token in [(r, t) for r in range(40) for t in range(9)]:
        assert guard.check_activations(acts[row, token]) == (not quiet[row, token])
    assert guard.check_activations(acts) is True
    assert guard.check_activations(torch.zeros(2, 3, len(FEATURES))) is False
    overflowing = torch.full((2, 3, len(FEATURES)), 3e38)  # finite values whose sum overflows: still active
    assert guard.check_activations(overflowing) is True
    with pytest.raises(ValueError, match="non-finite activations"):
        guard.check_activations(torch.tensor([0.0, float("nan")]))
