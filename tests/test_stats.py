import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from modeling_dsg.analysis.forward import decoder_blocks as decoder_layers
from modeling_dsg.analysis.stats import collect, full_forward_speedup
from modeling_dsg.data.rows import Rows
from modeling_dsg.errors import DSGError

BOS, EOS, PAD = 1, 2, 0
D_SAE = 12


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=2,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="module")
def rows():
    """5 rows of 10: BOS first, an EOS inside row 1, right padding in rows 2 and 4, row 3 all special."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 64, (5, 10), generator=g)
    mask = torch.ones_like(ids)
    ids[:, 0] = BOS
    ids[1, 5] = EOS
    ids[2, 6:], mask[2, 6:] = PAD, 0
    ids[3, 1:3], mask[3, 3:] = EOS, 0
    ids[4, 3:], mask[4, 3:] = PAD, 0
    return Rows(ids, mask)


class ReluEncoder:
    """A stand-in SAE encoder f = relu(h W + b) that remembers what it was given."""

    def __init__(self, d_in=16, d_sae=D_SAE):
        g = torch.Generator().manual_seed(2)
        self.W = torch.randn(d_in, d_sae, generator=g)
        self.b = torch.randn(d_sae, generator=g) - 0.5
        self.seen = []

    def __call__(self, h):
        self.seen.append(h)
        return torch.relu(h @ self.W + self.b)


def reference(model, rows, layer, encoder):
    """Activations from a full forward with output_hidden_states, and the counted-token mask."""
    with torch.no_grad():
        hidden = model(**vars(rows), output_hidden_states=True).hidden_states[layer + 1]
    counted = rows.attention_mask.bool() & ~torch.isin(rows.input_ids, torch.tensor([BOS, EOS, PAD]))
    return hidden, encoder.__class__()(hidden), counted


@pytest.mark.parametrize("layer", [0, 2])
def test_early_stop_equals_hidden_states(llama, rows, layer):
    encoder = ReluEncoder()
    store = collect(llama, layer, encoder, rows, batch_size=len(rows), ignore_token_ids=[BOS, EOS, PAD])
    hidden, acts, counted = reference(llama, rows, layer, encoder)
    # rows run sorted by length, each batch cut after its longest row: every row's real positions are
    # bit-identical to the full, unsorted forward
    lengths = rows.attention_mask.cumsum(1).argmax(1) + 1
    order = torch.argsort(lengths, stable=True)
    seen = encoder.seen[0]
    assert seen.shape[1] == int(lengths.max())
    for i, row in enumerate(order.tolist()):
        n = int(lengths[row])
        assert torch.equal(seen[i, :n], hidden[row, :n])

    assert store.n_tokens == int(counted.sum()) == 9 + 8 + 5 + 0 + 2  # rows minus BOS, EOS and padding
    assert store.row_token_counts.tolist() == counted.sum(1).tolist()
    assert store.row_token_counts[3] == 0
    # the same counted tokens, each once; put them back in row-major order for the checks below
    key = store.token_row.long() * rows.seq_len + store.token_pos.long()
    perm = torch.argsort(key)
    assert torch.equal(store.token_row.long()[perm], counted.nonzero()[:, 0])
    assert torch.equal(store.token_pos.long()[perm], counted.nonzero()[:, 1])
    assert torch.equal(store.token_id.long()[perm], rows.input_ids[counted])

    a = acts[counted][torch.argsort(perm)]  # reference activations in the store's token order
    assert torch.equal(store.feature_counts, (a > 0).sum(0))
    torch.testing.assert_close(store.mean(), a.double().sum(0) / a.shape[0])
    torch.testing.assert_close(store.freq(), (a > 0).double().mean(0))
    # The sparse part holds exactly the positive activations, token by token.
    dense = torch.zeros_like(a)
    for t in range(store.n_tokens):
        lo, hi = store.indptr[t], store.indptr[t + 1]
        dense[t, store.feature_index[lo:hi].long()] = store.values[lo:hi]
    assert torch.equal(dense, a)


def test_row_scores_and_flags_match_direct_computation(llama, rows):
    encoder = ReluEncoder()
    store = collect(llama, 1, encoder, rows, batch_size=len(rows), ignore_token_ids=[BOS, EOS, PAD])
    _, acts, counted = reference(llama, rows, 1, encoder)
    features = [0, 3, 7]
    flags = (acts[..., features] > 0).any(-1) & counted  # [R, T]
    assert torch.equal(store.token_flags(features), flags[counted])
    expected = [flags[r].sum() / counted[r].sum() if counted[r].any() else 0.0 for r in range(len(rows))]
    assert store.row_scores(features).tolist() == [float(x) for x in expected]
    assert store.row_scores([]).tolist() == [0.0] * len(rows)

    top = store.top_activations(3, k=4)
    values = acts[..., 3].masked_fill(~counted, 0)
    best = values.flatten().topk(4).indices
    assert [(r, p) for r, p, _ in top] == [(int(i) // 10, int(i) % 10) for i in best]
    assert [v for _, _, v in top] == values.flatten()[best].tolist()
    with pytest.raises(DSGError, match="feature indices"):
        store.row_scores([D_SAE])


def test_padding_and_batch_size_do_not_change_counts(llama, rows):
    whole = collect(llama, 2, ReluEncoder(), rows, batch_size=len(rows), ignore_token_ids=[BOS, EOS, PAD])
    batched = collect(llama, 2, ReluEncoder(), rows, batch_size=2, ignore_token_ids=[BOS, EOS, PAD])
    assert batched.n_tokens == whole.n_tokens
    assert torch.equal(batched.token_row, whole.token_row)
    assert torch.equal(batched.feature_counts, whole.feature_counts)
    torch.testing.assert_close(batched.feature_sums, whole.feature_sums)
    assert torch.equal(batched.row_scores([1, 5]), whole.row_scores([1, 5]))
    # Without ignore ids every real token counts, padding still does not.
    all_real = collect(llama, 2, ReluEncoder(), rows, batch_size=3)
    assert all_real.n_tokens == int(rows.attention_mask.sum())


def test_hook_removed_and_mode_restored_even_on_error(llama, rows):
    block = decoder_layers(llama)[1]
    hooks_before = dict(block._forward_hooks)  # transformers keeps its own output-capturing hooks there
    llama.train()

    def broken(h):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        collect(llama, 1, broken, rows)
    assert dict(block._forward_hooks) == hooks_before
    assert llama.training
    llama.eval()


def test_bad_inputs(llama, rows):
    with pytest.raises(DSGError, match="layer 4 is out of range"):
        collect(llama, 4, ReluEncoder(), rows)
    with pytest.raises(DSGError, match="encode returned shape"):
        collect(llama, 0, lambda h: h[:, :, 0], rows)
    only_special = Rows(rows.input_ids[3:4], rows.attention_mask[3:4])
    with pytest.raises(DSGError, match="no counted token"):
        collect(llama, 0, ReluEncoder(), only_special, ignore_token_ids=[BOS, EOS])


def test_decoder_layers_on_several_architectures(llama):
    assert decoder_layers(llama) is llama.model.layers
    gpt2 = AutoModelForCausalLM.from_config(
        GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, bos_token_id=BOS, eos_token_id=EOS)
    )
    assert decoder_layers(gpt2) is gpt2.transformer.h

    class Wrapper(nn.Module):  # a model that holds a causal LM, like the DSG wrapper
        def __init__(self):
            super().__init__()
            self.model = llama

    assert decoder_layers(Wrapper()) is llama.model.layers
    with pytest.raises(DSGError, match="cannot find the decoder layers"):
        decoder_layers(nn.Linear(2, 2))


def test_full_forward_speedup_reports(llama, rows):
    report = full_forward_speedup(llama, 0, rows, batch_size=4)
    assert report["tokens"] == int(rows.attention_mask[:4].sum())
    assert report["n_layers"] == 4 and report["batch_size"] == 4 and report["seq_len"] == 10
    assert report["speedup"] == pytest.approx(report["full_forward_s"] / report["early_stop_s"])
    assert report["early_stop_tokens_per_s"] > 0 and report["full_forward_tokens_per_s"] > 0
