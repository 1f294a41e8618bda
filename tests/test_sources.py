"""Model, SAE and text sources (local paths, a tiny GGUF, offline Hub) and the embedded default's data sets."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tiny
import torch

from modeling_dsg.data.sources import load_base_model, load_sae, load_texts, mcq_prompt, resolve_model_dir, sae_layer
from modeling_dsg.embedded import data as embedded
from modeling_dsg.errors import DSGError

REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------- models
def test_local_folder_loads_and_missing_paths_fail(tmp_path):
    base = tmp_path / "base"
    ref = tiny.tiny_base("llama")
    ref.save_pretrained(base)
    tiny.tiny_tokenizer().save_pretrained(base)
    model, tok = load_base_model(str(base))
    ids = torch.tensor([[1, 5, 9, 200]])
    assert torch.equal(model(ids).logits, ref(ids).logits)
    assert tok.eos_token_id == tiny.EOS and not model.training
    assert resolve_model_dir(str(base)) == str(base.resolve())
    with pytest.raises(DSGError, match="does not exist"):
        load_base_model(str(tmp_path / "nope.gguf"))
    with pytest.raises(DSGError, match="not a model folder"):
        load_base_model(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DSGError, match="no config.json"):
        load_base_model(str(tmp_path / "empty"))


def _offline_run(code: str) -> tuple[float, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    start = time.time()
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    return time.time() - start, proc.stdout + proc.stderr


def test_hub_ids_fail_fast_offline(monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    for call, match in [
        (lambda: load_base_model("HuggingFaceTB/SmolLM2-135M-Instruct"), "pass a local folder or .gguf file"),
        (
            lambda: load_sae("gemma-scope-2b-pt-res-canonical:layer_3/width_16k/canonical"),
            "pass a local sae-lens folder",
        ),
        (lambda: load_texts("cais/wmdp:wmdp-bio@test"), "pass a local .txt, .jsonl or .parquet file"),
    ]:
        start = time.time()
        with pytest.raises(DSGError, match="cannot reach the Hugging Face Hub") as err:
            call()
        assert match in str(err.value)
        assert time.time() - start < 2.0


def test_offline_hub_model_fails_fast_from_a_fresh_process():
    seconds, out = _offline_run(
        "from modeling_dsg.data.sources import load_base_model\n"
        "from modeling_dsg.errors import DSGError\n"
        "import time; t = time.time()\n"
        "try:\n    load_base_model('HuggingFaceTB/SmolLM2-135M-Instruct')\n"
        "except DSGError as e:\n    print('DSGError', round(time.time() - t, 2), e)\n"
    )
    assert "DSGError" in out and "cannot reach the Hugging Face Hub" in out, out
    inner = float(out.split("DSGError", 1)[1].split()[0])
    assert inner < 2.0, out  # no network wait: the check runs before torch/transformers are imported


def _write_tiny_gguf(path: Path) -> dict:
    """A tiny Llama GGUF (f32 tensors, byte-level BPE vocab) written with the `gguf` package."""
    import gguf

    rng = np.random.default_rng(0)
    d, ff, n_layers, heads, kv, vocab_bytes = 32, 64, 2, 4, 2, 256
    from tokenizers.pre_tokenizers import ByteLevel

    tokens = ["<unk>", "<s>", "</s>"] + sorted(ByteLevel.alphabet())
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(128)
    w.add_embedding_length(d)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_dimension_count(d // heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * vocab_bytes)
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_merges([])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    weights = {"token_embd.weight": (len(tokens), d), "output_norm.weight": (d,), "output.weight": (len(tokens), d)}
    for i in range(n_layers):
        weights.update(
            {
                f"blk.{i}.attn_norm.weight": (d,),
                f"blk.{i}.ffn_norm.weight": (d,),
                f"blk.{i}.attn_q.weight": (d, d),
                f"blk.{i}.attn_k.weight": (kv * d // heads, d),
                f"blk.{i}.attn_v.weight": (kv * d // heads, d),
                f"blk.{i}.attn_output.weight": (d, d),
                f"blk.{i}.ffn_gate.weight": (ff, d),
                f"blk.{i}.ffn_up.weight": (ff, d),
                f"blk.{i}.ffn_down.weight": (d, ff),
            }
        )
    for name, shape in weights.items():
        w.add_tensor(name, (rng.standard_normal(shape) * 0.1).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"layers": n_layers, "hidden": d}


def test_gguf_is_converted_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DSG_CACHE_DIR", str(tmp_path / "cache"))
    gguf_file = tmp_path / "tiny.gguf"
    shape = _write_tiny_gguf(gguf_file)
    model, tok = load_base_model(str(gguf_file))
    assert model.config.num_hidden_layers == shape["layers"] and model.config.hidden_size == shape["hidden"]
    assert "quantization_config" not in model.config.to_dict()
    folder = Path(resolve_model_dir(str(gguf_file)))
    assert folder.parent == tmp_path / "cache" / "gguf" and folder.name.startswith("tiny-")
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= {
        p.name for p in folder.iterdir()
    }
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temp folders left
    ids = tok("hello", return_tensors="pt").input_ids
    ref = model(ids).logits

    import transformers

    def no_gguf(*a, **k):
        raise AssertionError("the GGUF was converted again")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config", no_gguf)  # a conversion would call it
    again, _ = load_base_model(str(gguf_file))
    assert torch.equal(again(ids).logits, ref)


# --------------------------------------------------------------------------------------------- SAEs
def test_load_sae_from_folder_and_bad_specs(tmp_path):
    from sae_lens import SAE, TopKSAEConfig

    sae = SAE.from_dict(TopKSAEConfig(d_in=8, d_sae=16, k=4).to_dict())
    sae.cfg.metadata.hook_name = "model.layers.5"
    sae.save_model(str(tmp_path / "sae"))
    loaded = load_sae(str(tmp_path / "sae"))
    assert loaded.cfg.d_sae == 16 and sae_layer(loaded) == 5
    (tmp_path / "nocfg").mkdir()
    with pytest.raises(DSGError, match="no cfg.json"):
        load_sae(str(tmp_path / "nocfg"))
    with pytest.raises(DSGError, match="not a sae-lens folder"):
        load_sae(str(tmp_path / "missing"))


@pytest.mark.parametrize(
    "name,layer",
    [
        ("model.layers.6", 6),
        ("blocks.12.hook_resid_post", 12),
        ("transformer.h.3", 3),
        ("model.language_model.layers.30", 30),
        ("embed", None),
    ],
)
def test_sae_layer_parses_hook_names(name, layer):
    class Meta:
        hook_name = name

    class Cfg:
        metadata = Meta()

    class Sae:
        cfg = Cfg()

    assert sae_layer(Sae()) == layer


# -------------------------------------------------------------------------------------------- texts
def test_mcq_prompt_is_the_lm_eval_harness_format():
    assert mcq_prompt("  What is 2+2? ", ["1", "2", "3", "4"]) == "What is 2+2?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:"


def test_text_files(tmp_path):
    plain = tmp_path / "a.txt"
    plain.write_text("first doc\nline two\n\n\nsecond doc\n  \nthird\n")
    assert load_texts(str(plain)) == ["first doc\nline two", "second doc", "third"]
    assert load_texts(str(plain), limit=2) == ["first doc\nline two", "second doc"]
    wiki = tmp_path / "w.txt"
    wiki.write_text(
        " \n = Alpha = \n \n Alpha is a letter . \n \n = = History = = \n \n Old . \n \n = Beta = \n \n Beta too . \n"
    )
    docs = load_texts(str(wiki))
    assert len(docs) == 2 and docs[0].startswith("= Alpha =") and "= = History = =" in docs[0] and "Old ." in docs[0]
    assert docs[1].startswith("= Beta =")
    (tmp_path / "e.txt").write_text("\n\n")
    with pytest.raises(DSGError, match="is empty"):
        load_texts(str(tmp_path / "e.txt"))
    with pytest.raises(DSGError, match="does not exist"):
        load_texts(str(tmp_path / "missing.txt"))


def test_jsonl_and_parquet(tmp_path):
    rows = [{"text": "one", "x": 1}, {"text": "two", "x": 2}]
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert load_texts(str(tmp_path / "t.jsonl")) == ["one", "two"]
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    assert load_texts(str(tmp_path / "b.jsonl"), text_field="body") == ["x"]
    with pytest.raises(DSGError, match=r"fields: \['body'\]"):
        load_texts(str(tmp_path / "b.jsonl"))
    q = {"question": "Q?", "choices": ["a", "b", "c", "d"], "answer": 1}
    (tmp_path / "q.jsonl").write_text(json.dumps(q) + "\n")
    assert load_texts(str(tmp_path / "q.jsonl")) == [mcq_prompt("Q?", ["a", "b", "c", "d"])]
    (tmp_path / "bad.jsonl").write_text("{not json}\n")
    with pytest.raises(DSGError, match="bad.jsonl:1"):
        load_texts(str(tmp_path / "bad.jsonl"))
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(DSGError, match="is empty"):
        load_texts(str(tmp_path / "e.jsonl"))

    import datasets

    datasets.Dataset.from_list([q, q]).to_parquet(str(tmp_path / "q.parquet"))
    assert load_texts(str(tmp_path / "q.parquet")) == [mcq_prompt("Q?", ["a", "b", "c", "d"])] * 2
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "t.parquet"))
    assert load_texts(str(tmp_path / "t.parquet")) == ["one", "two"]


# ------------------------------------------------------------------------------ the embedded default
def test_embedded_splits_are_deterministic_disjoint_and_never_train_the_sae():
    held = embedded.heldout_prompts()
    assert set(held) == {"bio", "mmlu_bio", "mmlu_nonbio", "wikitext"}
    forget, retain = embedded.forget_texts("build"), embedded.retain_texts("build")
    assert forget == embedded.forget_texts("build")  # deterministic (no Python hash())
    # about half of WMDP-bio is held out
    n_wmdp = len(embedded._wmdp())
    assert 0.4 < len(held["bio"]) / n_wmdp < 0.6
    heldout_all = set(held["bio"]) | set(held["mmlu_bio"]) | set(held["mmlu_nonbio"]) | set(held["wikitext"])
    assert not heldout_all & set(forget) and not heldout_all & set(retain)
    training = embedded.sae_training_texts()
    joined = "\n".join(training)
    assert not heldout_all & set(training)
    assert not any(p in joined for p in held["wikitext"][:50])  # held-out paragraphs are not inside build articles
    # forget/retain subjects never include the ambiguous medicine subjects
    nonbio = {r["subject"] for r in embedded.mmlu_records("build", "nonbio")}
    assert not nonbio & (embedded.BIO_SUBJECTS | embedded.AMBIGUOUS_SUBJECTS)
    assert {r["subject"] for r in embedded.mmlu_records("build", "bio")} == set(embedded.BIO_SUBJECTS)
    assert (
        embedded.format_gloss({"words": ["dog", "domestic_dog"], "gloss": "a canine"}) == "dog, domestic dog: a canine"
    )
    assert embedded.split_of("x") == embedded.split_of("x") and embedded.stable_unit("abc") == pytest.approx(
        int("ba7816bf", 16) / 2**32
    )
    assert embedded.gguf_path().name == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_embedded_build_corpora_in_the_formats_users_send():
    """With a chat tokenizer, `dsg demo`'s corpora hold every build question bare, with the lm-eval preamble and as a
    chat turn, on both sides, and every paragraph bare and as a chat turn; no held-out text and no glosses."""
    from modeling_dsg.data.mcq import chat_wrap, letter_prompt

    tok = tiny.tiny_tokenizer()
    tok.chat_template = "{% for m in messages %}<|user|>{{ m['content'] }}\n{% endfor %}<|assistant|>"
    forget, retain = embedded.forget_texts("build", tok), embedded.retain_texts("build", tok)
    questions = embedded.wmdp_records("build") + embedded.mmlu_records("build", "bio")
    assert len(forget) == 3 * len(questions) and forget == embedded.forget_texts("build", tok)
    first = questions[0]
    assert {letter_prompt(first), chat_wrap(tok, letter_prompt(first))} <= set(forget)
    assert letter_prompt(first, preamble=True, topic="biology") in forget
    paragraphs, nonbio = embedded.wiki_paragraphs("build"), embedded.mmlu_records("build", "nonbio")
    assert len(retain) == 2 * len(paragraphs) + 3 * len(nonbio)
    assert chat_wrap(tok, paragraphs[0]) in retain and letter_prompt(nonbio[0], preamble=True) in retain
    held = embedded.heldout_prompts()
    assert not (set(held["bio"]) | set(held["mmlu_nonbio"])) & (set(forget) | set(retain))
    assert not set(embedded.gloss_docs("bio")) & set(forget)
