"""`dsg train-sae` on a tiny random Llama with a local byte-level tokenizer (no network, seconds)."""

import json
import random

import pytest
import tiny
import torch

from modeling_dsg import cli
from modeling_dsg.data.sources import sae_layer
from modeling_dsg.errors import DSGError
from modeling_dsg.pipelines.train_sae import hook_name, pack_rows, train_sae, truncate_model


def _texts(n=120, seed=0):
    rng = random.Random(seed)
    words = ["cell", "virus", "river", "stone", "music", "gene", "market", "cloud", "protein", "city"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(10, 40))) for _ in range(n)]


@torch.no_grad()
def test_truncated_model_keeps_layer_output_exactly():
    model = tiny.tiny_base("llama")
    ids = torch.randint(3, tiny.VOCAB, (3, 20), generator=torch.Generator().manual_seed(1))
    for layer in (0, 2, tiny.LAYERS - 1):
        small = truncate_model(model, layer)
        assert small.config.num_hidden_layers == layer + 1
        assert len(small.model.layers) == layer + 1
        full = model(ids, output_hidden_states=True).hidden_states
        got = {}
        h = small.model.layers[layer].register_forward_hook(lambda m, i, o, got=got: got.setdefault("h", o))
        small(ids)
        h.remove()
        ref = {}
        h = model.model.layers[layer].register_forward_hook(lambda m, i, o, ref=ref: ref.setdefault("h", o))
        model(ids)
        h.remove()
        assert torch.equal(got["h"], ref["h"])
        if layer < tiny.LAYERS - 1:  # hidden_states[L+1] is the output of layers[L] (no final norm)
            assert torch.equal(got["h"], full[layer + 1])
    assert len(model.model.layers) == tiny.LAYERS  # the original is untouched
    with pytest.raises(DSGError, match="out of range"):
        truncate_model(model, tiny.LAYERS)


def test_pack_rows_start_with_bos_and_have_full_length():
    tok = tiny.tiny_tokenizer()
    rows = pack_rows(_texts(20), tok, 16)
    assert rows and all(len(r) == 16 and r[0] == tiny.BOS for r in rows)
    content = sum(len(ids) for ids in tok(_texts(20), add_special_tokens=False)["input_ids"])
    assert len(rows) == (content + 19) // 15  # 19 EOS separators, 15 content tokens per row


def test_train_sae_writes_a_loadable_sae_lens_folder(tmp_path):
    from sae_lens import SAE

    model, tok = tiny.tiny_base("llama"), tiny.tiny_tokenizer()
    out = tmp_path / "sae"
    metrics = train_sae(
        model,
        tok,
        _texts(),
        2,
        64,
        out=out,
        tokens=3072,
        seq_len=16,
        batch_tokens=256,
        eval_texts=_texts(20, seed=1),
        eval_tokens=512,
    )
    names = {p.name for p in out.iterdir()}
    assert {"cfg.json", "sae_weights.safetensors", "sparsity.safetensors", "training_metrics.json"} <= names
    assert not any(n.startswith(".") or n == "_work" for n in names)
    sae = SAE.load_from_disk(str(out))
    assert (sae.cfg.d_in, sae.cfg.d_sae) == (tiny.HIDDEN, 64)
    assert sae.cfg.architecture() == "topk" and sae.cfg.k == 32
    assert sae.cfg.metadata.hook_name == "model.layers.2" == hook_name(model, 2)
    assert sae_layer(sae) == 2
    assert metrics["d_sae"] == 64 and metrics["training_tokens"] == 3072
    assert 0 < metrics["l0"] <= 32 and metrics["ce_loss"] > 0
    assert json.loads((out / "training_metrics.json").read_text())["layer"] == 2
    x = torch.randn(5, tiny.HIDDEN)
    assert sae.decode(sae.encode(x)).shape == x.shape


def test_other_architecture_and_bad_inputs(tmp_path):
    from sae_lens import SAE

    model, tok = tiny.tiny_base("llama"), tiny.tiny_tokenizer()
    out = tmp_path / "jr"
    train_sae(model, tok, _texts(), 1, 48, out=out, architecture="jumprelu", tokens=1024, seq_len=16, batch_tokens=256)
    assert SAE.load_from_disk(str(out)).cfg.architecture() == "jumprelu"
    with pytest.raises(DSGError, match="already exists"):
        train_sae(model, tok, _texts(), 1, 48, out=out, tokens=1024, seq_len=16, batch_tokens=256)
    with pytest.raises(DSGError, match="out of range"):
        train_sae(model, tok, _texts(), tiny.LAYERS, 48, out=tmp_path / "x", tokens=1024, seq_len=16, batch_tokens=256)
    with pytest.raises(DSGError, match="fewer than"):
        train_sae(model, tok, ["a b"], 1, 48, out=tmp_path / "y", tokens=1024, seq_len=64, batch_tokens=256)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_cli_trains_and_reports_bad_input(tmp_path, capsys):
    from sae_lens import SAE

    base = tmp_path / "base"
    tiny.tiny_base("llama").save_pretrained(base)
    tiny.tiny_tokenizer().save_pretrained(base)
    text = tmp_path / "t.txt"
    text.write_text("\n\n".join(_texts()))
    out = tmp_path / "out"
    argv = [
        "train-sae",
        "--base",
        str(base),
        "--layer",
        "1",
        "--width",
        "40",
        "--text",
        str(text),
        "--out",
        str(out),
        "--tokens",
        "1024",
        "--seq-len",
        "16",
        "--batch-tokens",
        "256",
    ]
    assert cli.main(argv) == 0
    assert SAE.load_from_disk(str(out)).cfg.d_sae == 40
    assert cli.main(argv) == 2  # exists, no --overwrite
    assert "already exists" in capsys.readouterr().err
    assert cli.main(argv + ["--overwrite", "--layer", "9"]) == 2
    assert "out of range" in capsys.readouterr().err
    missing = argv[:8] + [str(tmp_path / "nope.txt")] + argv[9:]
    assert cli.main([a if a != str(out) else str(tmp_path / "o2") for a in missing]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert SAE.load_from_disk(str(out)).cfg.d_sae == 40  # the old output survived the failed runs
    assert cli.main(argv + ["--overwrite", "--checkpoints", "2"]) == 2
    assert "--checkpoint-dir" in capsys.readouterr().err


def test_checkpoints_and_bf16_autocast(tmp_path):
    from safetensors.torch import load_file

    model, tok = tiny.tiny_base("llama"), tiny.tiny_tokenizer()
    out = tmp_path / "sae"
    metrics = train_sae(
        model,
        tok,
        _texts(),
        1,
        32,
        out=out,
        tokens=2048,
        seq_len=16,
        batch_tokens=256,
        autocast=True,
        checkpoint_dir=tmp_path / "ck",
        n_checkpoints=2,
    )
    assert metrics["bf16_autocast"] is True
    assert all(t.dtype == torch.float32 for t in load_file(str(out / "sae_weights.safetensors")).values())
    saved = sorted(int(p.parent.parent.name) for p in (tmp_path / "ck").rglob("layer1/sae_weights.safetensors"))
    # sae-lens checkpoints after the first step past each of 2048 * (1/3, 2/3), named by tokens seen
    assert saved == [768, 1536]


def test_batchtopk_trains_and_loads_as_jumprelu_into_a_guard(tmp_path):
    """BatchTopK is saved for inference as JumpReLU (learned thresholds), which the guard reads exactly:
    the guard's selected-feature activations equal sae-lens' encode on the same hidden states."""
    from sae_lens import SAE

    from modeling_dsg.data.sources import load_sae
    from modeling_dsg.pipelines.build import guardrail_sae, sae_encoder

    model, tok = tiny.tiny_base("llama"), tiny.tiny_tokenizer()
    out = tmp_path / "btk"
    train_sae(
        model, tok, _texts(), 1, 48, out=out, architecture="batchtopk", k=4, tokens=2048, seq_len=16, batch_tokens=256
    )
    reference = SAE.load_from_disk(str(out))
    assert reference.cfg.architecture() == "jumprelu"
    spec, state = guardrail_sae(load_sae(str(out)), str(out))
    encode = sae_encoder(spec, state, "cpu")
    hidden = tiny.sample_hidden(model, 1, n_rows=4, length=16)
    with torch.no_grad():
        expected, ours = reference.encode(hidden), encode(hidden)
    assert float((expected > 0).float().sum(-1).mean()) > 0  # features do fire
    assert torch.allclose(ours, expected, atol=1e-5)
