"""`dsg build` end to end on a tiny Llama and a controlled sae-lens SAE whose outcome is known by hand.

The world (built once per session, `get_world`):

- a tiny random Llama (`tiny.tiny_base`) with the byte-level `tiny.tiny_tokenizer` (one token per
  character for ASCII text, BOS first), saved to a folder;
- forget texts in which every word carries the marker character "z" (a .txt file, and a .jsonl of
  question/choices records); retain texts (a .jsonl with a `text` field and a .parquet file) with no
  marker except a single "z" in every other document, so that the retain rho distribution, and tau,
  are not trivially zero;
- a second topic whose marker is "q" (a .txt file), for `--add-to`;
- sae-lens `StandardSAE`s (d_in 32, d_sae 64) whose features DETECT_Z (at layer 1) / DETECT_Q (at
  layer 2) are detectors of the marker token: encoder column = s * 10 * (direction of the marker's
  hidden state minus the mean), bias halfway between the marker and non-marker projections, with
  s = 1, 2, 3, 4, so they fire exactly on marker tokens and their importance grows with s. The other
  features are random and fire on about 40% of all tokens.

So, by hand: a row's rho is (marker tokens) / (tokens other than BOS), the dynamic selection is the
detectors in decreasing s, static selection the detectors in index order, and tau is the 95th
percentile of that count ratio over the retain rows the build calibrates on.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tiny
import torch
from safetensors.torch import load_file

from modeling_dsg.errors import DSGError

SEQ_LEN = 32
CLAMP = 2.0
# the paper's gate: rho = the share of counted tokens where any selected feature is active, tau = its 95th
# percentile over the retain rows. The tests that compute rho by hand (marker tokens / counted tokens) build with it;
# test_the_default_gate covers `dsg build`'s own default.
PAPER_GATE = ("--score", "fraction", "--token-gate", "any", "--threshold-percentile", 95)
PAPER_ROWS = ("--packing",)  # EOS-joined rows of --seq-len tokens (the default is one document per row)
DETECT_Z = (5, 17, 42, 60)  # scales 1, 2, 3, 4
DETECT_Q = (3, 30, 50)  # scales 1, 2, 3
ALPHABET = "abcdefghijklmnoprstuvwy"  # no q, x, z
Z_TEXT = "the zoo keeper zips a zany zebra into a zinc zone of ozone haze"
Q_TEXT = "a quiet queen quotes quaint quips to quell queasy quails quickly"
PLAIN_TEXT = "the old keeper walks a tall horse into a green field of wet grass"
ONE_Z_TEXT = "the old keeper walks a tall horse into a green field of wet grass and a lazy dog sleeps there"


# ------------------------------------------------------------------------------------------ the world
def words(rng: random.Random, n: int, marker: str | None = None) -> str:
    out = ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(2, 6))) for _ in range(n)]
    if marker:
        out = [w[:1] + marker + w[1:] for w in out]
    return " ".join(out)


def mcq_text(record: dict) -> str:
    """The documented prompt of a question/choices record: question, 'A. ..'..'D. ..' lines, 'Answer:'."""
    return (
        "\n".join([record["question"]] + [f"{'ABCD'[i]}. {c}" for i, c in enumerate(record["choices"])]) + "\nAnswer:"
    )


@torch.no_grad()
def layer_hidden(base, tok, texts) -> tuple[dict, torch.Tensor]:
    """Hidden states at the output of every block for the counted tokens (not padding, not BOS) of
    `texts`: ({layer: [n, d]}, token ids [n])."""
    enc = tok(texts, return_tensors="pt", padding=True)
    states = base(**enc, output_hidden_states=True).hidden_states
    keep = enc["attention_mask"].bool() & (enc["input_ids"] != tiny.BOS)
    return {layer: states[layer + 1][keep] for layer in range(len(states) - 1)}, enc["input_ids"][keep]


@torch.no_grad()
def marker_sae(
    folder: Path,
    hidden: torch.Tensor,
    ids: torch.Tensor,
    marker_id: int,
    layer: int,
    detectors,
    d_in: int = tiny.HIDDEN,
    d_sae: int = 64,
    seed: int = 0,
) -> dict:
    """Save a sae-lens StandardSAE whose `detectors` fire exactly on the token `marker_id` at the output
    of block `layer` (`hidden` [n, d], `ids` [n]: sample hidden states there and their token ids)."""
    from sae_lens import StandardSAE, StandardSAEConfig

    on = ids == marker_id
    mean = hidden.mean(0)
    direction = hidden[on].mean(0) - mean
    direction = direction / direction.norm()
    proj = (hidden - mean) @ direction
    lowest_on, highest_off = float(proj[on].min()), float(proj[~on].max())
    assert lowest_on > highest_off + 0.02, (lowest_on, highest_off)  # a clear margin: exact detectors
    cut = (lowest_on + highest_off) / 2

    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(tiny.HIDDEN, d_sae, generator=gen)
    W = W / W.norm(dim=0)
    b = -torch.quantile(hidden @ W, 0.6, dim=0)  # random features: active on ~40% of tokens
    for s, i in enumerate(detectors, 1):
        W[:, i] = s * 10 * direction
        b[i] = -s * 10 * (mean @ direction + cut)
    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae, apply_b_dec_to_input=False))
    sae.W_enc.copy_(W[:d_in])
    sae.b_enc.copy_(b)
    sae.W_dec.copy_(1e-3 * torch.randn(d_sae, d_in, generator=gen))  # small edits: guards do not interact
    sae.b_dec.zero_()
    sae.cfg.metadata.hook_name = f"model.layers.{layer}"
    sae.save_model(folder)
    return {"lowest_on": lowest_on, "highest_off": highest_off}


def cli(*argv) -> int:
    from modeling_dsg.cli import main

    return main([str(a) for a in argv])


class World:
    def __init__(self, root: Path):
        import datasets

        self.root = root
        rng = random.Random(0)
        self.base_model = tiny.tiny_base("llama")
        self.tok = tiny.tiny_tokenizer()
        self.base = root / "base"
        self.base_model.save_pretrained(self.base)
        self.tok.save_pretrained(self.base)
        self.z_id = self.tok.convert_tokens_to_ids("z")
        self.q_id = self.tok.convert_tokens_to_ids("q")

        forget_docs = [words(rng, 25, "z") for _ in range(10)]
        mcq = [
            {"question": words(rng, 10, "z"), "choices": [words(rng, 3, "z") for _ in range(4)], "answer": 0}
            for _ in range(8)
        ]
        retain_docs = []
        for i in range(28):
            text = words(rng, 25)
            if i % 2 == 0:  # a single marker in half the retain documents, at a random word
                split = text.split(" ")
                k = rng.randrange(len(split))
                split[k] = "z" + split[k]
                text = " ".join(split)
            retain_docs.append(text)
        q_docs = [words(rng, 25, "q") for _ in range(10)]

        self.forget_txt = root / "forget.txt"
        self.forget_txt.write_text("\n\n".join(forget_docs) + "\n")
        self.forget_mcq = root / "forget_mcq.jsonl"
        self.forget_mcq.write_text("".join(json.dumps(r) + "\n" for r in mcq))
        self.retain_jsonl = root / "retain.jsonl"
        self.retain_jsonl.write_text(
            "".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(retain_docs[:14]))
        )
        self.retain_parquet = root / "retain.parquet"
        datasets.Dataset.from_dict({"text": retain_docs[14:]}).to_parquet(str(self.retain_parquet))
        self.forget_q = root / "forget_q.txt"
        self.forget_q.write_text("\n\n".join(q_docs) + "\n")

        # the texts in the order the build reads them (source after source)
        self.forget_texts = forget_docs + [mcq_text(r) for r in mcq]
        self.retain_texts = retain_docs
        self.q_texts = q_docs
        self.forget_sources = [str(self.forget_txt), str(self.forget_mcq)]
        self.retain_sources = [str(self.retain_jsonl), str(self.retain_parquet)]

        fit = (
            self.forget_texts[::3]
            + self.retain_texts[::3]
            + self.q_texts[::3]
            + [Z_TEXT, Q_TEXT, PLAIN_TEXT, ONE_Z_TEXT]
        )
        hidden, ids = layer_hidden(self.base_model, self.tok, fit)
        self.sae_z, self.sae_q, self.sae_narrow = root / "sae_z", root / "sae_q", root / "sae_narrow"
        self.margin_z = marker_sae(self.sae_z, hidden[1], ids, self.z_id, 1, DETECT_Z)
        self.margin_q = marker_sae(self.sae_q, hidden[2], ids, self.q_id, 2, DETECT_Q, seed=1)
        marker_sae(self.sae_narrow, hidden[1], ids, self.z_id, 1, DETECT_Z, d_in=16)

        # the main build (CLI), then a second guardrail stacked on it (CLI, --add-to)
        self.main = root / "main"
        self.main_stdout = self.cli_ok(
            "build",
            "--base",
            self.base,
            "--sae",
            self.sae_z,
            "--forget",
            *self.forget_sources,
            "--retain",
            *self.retain_sources,
            "--out",
            self.main,
            "--name",
            "zeta",
            "--seq-len",
            SEQ_LEN,
            "--clamp",
            CLAMP,
            "--batch-size",
            64,
            "--measure-speedup",
            *PAPER_GATE,
            *PAPER_ROWS,
        )
        self.added = root / "added"
        self.added_stdout = self.cli_ok(
            "build",
            "--add-to",
            self.main,
            "--sae",
            self.sae_q,
            "--forget",
            self.forget_q,
            "--retain",
            *self.retain_sources,
            "--out",
            self.added,
            "--name",
            "qoppa",
            "--seq-len",
            SEQ_LEN,
            "--ratio-percentile",
            96,
            "--clamp",
            CLAMP,
            "--batch-size",
            64,
            *PAPER_GATE,
            *PAPER_ROWS,
        )

    def cli_ok(self, *argv) -> str:
        import contextlib
        import io

        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            code = cli(*argv)
        assert code == 0, buffer.getvalue()
        return buffer.getvalue()

    def load(self, folder):
        from modeling_dsg import DSGForCausalLM

        return DSGForCausalLM.from_pretrained(folder).eval()

    def record(self, json_file: str, folder) -> dict:
        return json.loads((Path(folder) / json_file).read_text())

    def rows(self, forget_texts, retain_texts, seq_len=SEQ_LEN, packing=True, heldout=0.2, seed=0):
        """The rows a build calibrates and measures on, rebuilt with the documented steps."""
        from modeling_dsg.data import rows

        kw = dict(seq_len=seq_len, min_chars=50, max_docs=1024, packing=packing, seed=seed)
        forget, retain = rows.balance(
            rows.build_rows(forget_texts, self.tok, **kw), rows.build_rows(retain_texts, self.tok, **kw), seed=seed
        )
        forget, forget_held = rows.split(forget, heldout, seed=seed)
        retain, retain_held = rows.split(retain, heldout, seed=seed + 1)
        return {"forget": forget, "retain": retain, "heldout_forget": forget_held, "heldout_retain": retain_held}

    def marker_rho(self, rows, marker_id) -> np.ndarray:
        """rho by hand: marker tokens / counted tokens (attention mask on, not BOS) per row."""
        counted = rows.attention_mask.bool() & (rows.input_ids != tiny.BOS)
        hits = (rows.input_ids == marker_id) & counted
        return (hits.sum(1).double() / counted.sum(1).double()).numpy()


_WORLD: dict = {}


def get_world(tmp_path_factory) -> World:
    """The world, built once per session (test_explain and test_cli reuse it)."""
    if "world" not in _WORLD:
        _WORLD["world"] = World(tmp_path_factory.mktemp("dsg_world"))
    return _WORLD["world"]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    return get_world(tmp_path_factory)


@torch.no_grad()
def decisions(model, tok, texts) -> list[dict]:
    """Per text: each guardrail's (rho, fired) from a forward with `record_guardrails`, and the logits."""
    out = []
    for text in texts:
        enc = tok(text, return_tensors="pt")
        with model.record_guardrails() as records:
            logits = model(**enc).logits
        out.append(
            {
                "rho": [float(r["rho"][0]) for r in records],
                "fired": [bool(r["fired"][0]) for r in records],
                "logits": logits,
            }
        )
    return out


@torch.no_grad()
def row_decisions(model, rows) -> tuple[np.ndarray, np.ndarray]:
    """rho and fired [n_rows] of the first guardrail for token rows, from one forward."""
    with model.record_guardrails() as records:
        model(input_ids=rows.input_ids, attention_mask=rows.attention_mask)
    return records[0]["rho"].numpy(), records[0]["fired"].numpy()


# ------------------------------------------------------------------------------------------- sources
def test_every_source_kind_reaches_the_build(world):
    """.txt + question/choices .jsonl as forget, text .jsonl + .parquet as retain: exact row counts."""
    info = world.record("dsg_build.json", world.main)["guardrails"][0]
    assert info["forget_sources"] == world.forget_sources
    assert info["retain_sources"] == world.retain_sources

    # packing: one EOS between documents, rows of SEQ_LEN - 1 content tokens after BOS, partial row dropped;
    # the byte-level tokenizer gives one token per (ASCII) character.
    def n_rows(texts):
        assert all(len(t) > 50 for t in texts)
        return (sum(len(t) for t in texts) + len(texts) - 1) // (SEQ_LEN - 1)

    n_forget, n_retain = n_rows(world.forget_texts), n_rows(world.retain_texts)
    assert n_forget < n_retain  # the forget side sets the balanced count, so each forget source is counted
    held = round(0.2 * n_forget)
    assert info["rows"] == {"forget": n_forget - held, "retain": n_forget - held, "seq_len": SEQ_LEN, "packing": True}
    assert (info["heldout"]["n_forget"], info["heldout"]["n_retain"]) == (held, held)
    assert info["tokens"]["forget"] == (n_forget - held) * (SEQ_LEN - 1)  # all but BOS are counted

    added = world.record("dsg_build.json", world.added)["guardrails"][1]
    n_q = n_rows(world.q_texts)
    assert n_q < n_retain
    assert added["rows"]["forget"] + added["heldout"]["n_forget"] == n_q
    assert added["forget_sources"] == [str(world.forget_q)] and added["retain_sources"] == world.retain_sources


# ----------------------------------------------------------------------------------------- selection
def test_marker_detectors_are_selected(world):
    config = world.record("config.json", world.main)
    (g,) = config["guardrails"]
    assert g["name"] == "zeta" and g["layer"] == 1 and g["mode"] == "dynamic" and g["clamp"] == CLAMP
    # only the 4 detectors pass the 95th-percentile ratio filter (N = 20 asks for more); by importance desc
    assert g["features"] == list(reversed(DETECT_Z))
    assert (
        g["sae"]["architecture"] == "standard" and g["sae"]["d_sae"] == 64 and g["sae"]["source"] == str(world.sae_z)
    )
    stdout = world.main_stdout
    assert "guardrail 'zeta': layer 1, 4 features" in stdout and f"wrote {world.main}" in stdout


def test_features_json_names_the_marker(world):
    features = world.record("features.json", world.main)
    (g,) = features["guardrails"]
    assert g["name"] == "zeta" and g["layer"] == 1 and g["mode"] == "dynamic"
    assert [f["index"] for f in g["features"]] == list(reversed(DETECT_Z))
    for f in g["features"]:
        assert len(f["top_tokens"]) == 8
        assert all(t["token"] == "z" and "[[z]]" in t["context"] and t["activation"] > 0 for t in f["top_tokens"])
        assert f["forget_mean"] > f["retain_mean"] > 0 and f["forget_freq"] > f["retain_freq"] > 0
        assert f["importance"] == pytest.approx(f["forget_mean"] ** 2, rel=1e-12)
        assert f["ratio"] == pytest.approx(f["importance"] / (f["retain_mean"] ** 2 + 1e-21), rel=1e-9)
    # the detectors fire on the same tokens, with activation proportional to their scale
    freqs = {f["forget_freq"] for f in g["features"]}
    assert len(freqs) == 1
    means = [f["forget_mean"] for f in g["features"]]
    assert means == pytest.approx([4 * means[-1], 3 * means[-1], 2 * means[-1], means[-1]], rel=1e-4)


# --------------------------------------------------------------------------------------- calibration
def test_tau_is_the_retain_rho_percentile(world):
    info = world.record("dsg_build.json", world.main)["guardrails"][0]
    tau = world.record("config.json", world.main)["guardrails"][0]["threshold"]
    assert info["tau"] == tau
    rows = world.rows(world.forget_texts, world.retain_texts)
    by_hand = world.marker_rho(rows["retain"], world.z_id)
    assert tau == pytest.approx(np.percentile(by_hand, 95), abs=1e-12)
    assert 0 < tau < 0.1  # the rare retain markers make tau non-trivial

    model = world.load(world.main)
    for split in ("forget", "retain", "heldout_forget", "heldout_retain"):
        rho, fired = row_decisions(model, rows[split])
        np.testing.assert_allclose(rho, world.marker_rho(rows[split], world.z_id), rtol=0, atol=1e-12)
        summary = info["rho"][split]
        assert summary["n"] == len(rho)
        assert summary["mean"] == pytest.approx(rho.mean(), abs=1e-12)
        assert summary["max"] == pytest.approx(rho.max(), abs=1e-12)
        assert summary["p95"] == pytest.approx(np.percentile(rho, 95), abs=1e-12)
        if split.startswith("heldout"):  # the recorded held-out rates are the deployed model's decisions
            assert info["heldout"][f"{split.split('_')[1]}_trigger_rate"] == pytest.approx(fired.mean(), abs=1e-12)
    held = info["heldout"]
    assert held["forget_trigger_rate"] > 0.9 and held["retain_trigger_rate"] < 0.2
    assert held["forget_trigger_rate"] > held["retain_trigger_rate"] and held["auroc"] > 0.9


def test_build_record(world):
    record = world.record("dsg_build.json", world.main)
    assert record["base_model"] == str(world.base)
    (info,) = record["guardrails"]
    assert info["name"] == "zeta" and info["sae"] == str(world.sae_z) and info["layer"] == 1
    assert info["n_features"] == 4 and info["threshold_percentile"] == 95.0 and info["ratio_percentile"] == 95.0
    for key in ("rows_s", "statistics_s", "selection_s", "calibration_s"):
        assert info["timings"][key] >= 0
    assert info["timings"]["statistics_tokens"] == sum(info["tokens"].values())
    assert info["options"]["seq_len"] == SEQ_LEN and info["options"]["clamp"] == CLAMP
    speed = info["timings"]["truncated_forward"]  # --measure-speedup: blocks 0..1 of 4 against a full forward
    assert speed["layer"] == 1 and speed["n_layers"] == 4 and speed["speedup"] > 0
    assert speed["early_stop_s"] > 0 and speed["full_forward_s"] > 0
    assert set(info["rho"]) == {"forget", "retain", "heldout_forget", "heldout_retain"}
    assert "held-out trigger rate: forget" in world.main_stdout


# ------------------------------------------------------------------------------- decisions and remote
def test_built_model_guards_marker_texts_only(world):
    model = world.load(world.main)
    tau = model.guards[0].threshold
    z, plain, one_z = decisions(model, world.tok, [Z_TEXT, PLAIN_TEXT, ONE_Z_TEXT])
    with torch.no_grad():
        base = [world.base_model(**world.tok(t, return_tensors="pt")).logits for t in (Z_TEXT, PLAIN_TEXT, ONE_Z_TEXT)]
    assert z["rho"] == [pytest.approx(Z_TEXT.count("z") / len(Z_TEXT))] and z["fired"] == [True]
    assert not torch.equal(z["logits"], base[0])
    assert plain["rho"] == [0.0] and plain["fired"] == [False] and torch.equal(plain["logits"], base[1])
    # one marker in a long text: rho = 1/len <= tau, so the dynamic guard stays off (the static one would not)
    assert one_z["rho"] == [pytest.approx(1 / len(ONE_Z_TEXT))] and one_z["rho"][0] <= tau
    assert one_z["fired"] == [False] and torch.equal(one_z["logits"], base[2])


REMOTE = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
base_dir, texts, folders = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3:]
base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
out = {}
for folder in folders:
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    res = {"class": type(model).__module__, "texts": []}
    for text in texts:
        enc = tok(text, return_tensors="pt")
        with torch.no_grad(), model.record_guardrails() as records:
            logits = model(**enc).logits
        res["texts"].append({"fired": [bool(r["fired"][0]) for r in records],
                             "equal_to_base": torch.equal(logits, base(**enc).logits)})
    out[folder] = res
out["imported"] = "modeling_dsg" in sys.modules
print(json.dumps(out))
"""


def test_folders_reload_through_remote_code(world, tmp_path):
    """A fresh interpreter (never imports modeling_dsg) loads both folders with trust_remote_code."""
    texts = [Z_TEXT, Q_TEXT, PLAIN_TEXT]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", REMOTE, str(world.base), json.dumps(texts), str(world.main), str(world.added)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out.pop("imported") is False
    expected = {world.main: [[True], [False], [False]], world.added: [[True, False], [False, True], [False, False]]}
    for folder, fired in expected.items():
        res = out[str(folder)]
        assert res["class"].startswith("transformers_modules."), res["class"]
        assert [t["fired"] for t in res["texts"]] == fired
        # a text no guardrail fires on is exactly the base model
        assert [t["equal_to_base"] for t in res["texts"]] == [not any(f) for f in fired]


# ------------------------------------------------------------------------------------------ --add-to
def test_add_to_keeps_the_first_guardrail(world):
    old_config, new_config = world.record("config.json", world.main), world.record("config.json", world.added)
    assert new_config["guardrails"][0] == old_config["guardrails"][0]
    second = new_config["guardrails"][1]
    assert second["name"] == "qoppa" and second["layer"] == 2 and second["features"] == list(reversed(DETECT_Q))
    assert second["threshold"] == 0.0  # no retain text carries a "q": rho = 0 on every retain row
    old, new = load_file(world.main / "model.safetensors"), load_file(world.added / "model.safetensors")
    first = [k for k in old if k.startswith("guards.0.")]
    assert first and all(torch.equal(old[k], new[k]) for k in first)
    assert all(torch.equal(old[k], new[k]) for k in old if k.startswith("model."))
    assert {k for k in new if k.startswith("guards.")} - set(first) == {
        k.replace("guards.0.", "guards.1.") for k in first
    }

    # decisions of the first guardrail are unchanged; the second fires on the new marker only
    texts = [Z_TEXT, Q_TEXT, PLAIN_TEXT, ONE_Z_TEXT, Z_TEXT + " " + Q_TEXT]
    before = decisions(world.load(world.main), world.tok, texts)
    after = decisions(world.load(world.added), world.tok, texts)
    for b, a in zip(before, after):
        assert a["rho"][0] == b["rho"][0] and a["fired"][0] == b["fired"][0]
    assert [a["fired"] for a in after] == [[True, False], [False, True], [False, False], [False, False], [True, True]]
    assert torch.equal(after[0]["logits"], before[0]["logits"])  # the "q" guard leaves a "z" text alone


def test_add_to_records_both_guardrails(world):
    features = world.record("features.json", world.added)
    assert [g["name"] for g in features["guardrails"]] == ["zeta", "qoppa"]
    assert features["guardrails"][0] == world.record("features.json", world.main)["guardrails"][0]
    assert all(t["token"] == "q" for f in features["guardrails"][1]["features"] for t in f["top_tokens"])
    record = world.record("dsg_build.json", world.added)
    assert record["base_model"] == str(world.base)  # from the first build's record
    assert record["guardrails"][0] == world.record("dsg_build.json", world.main)["guardrails"][0]
    second = record["guardrails"][1]
    assert second["name"] == "qoppa" and second["layer"] == 2 and second["sae"] == str(world.sae_q)
    assert second["heldout"]["forget_trigger_rate"] == 1.0 and second["heldout"]["retain_trigger_rate"] == 0.0
    assert "guardrail 'qoppa': layer 2, 3 features, tau = 0.0000" in world.added_stdout


def test_add_to_refuses_a_duplicate_name(world, tmp_path, capsys):
    out = tmp_path / "dup"
    code = cli(
        "build",
        "--add-to",
        world.main,
        "--sae",
        world.sae_z,
        "--forget",
        world.forget_txt,
        "--retain",
        world.retain_jsonl,
        "--out",
        out,
        "--name",
        "zeta",
        "--seq-len",
        SEQ_LEN,
    )
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines()[-1].startswith("dsg: error: --add-to ")
    assert "already has a guardrail named 'zeta'" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------- static, row options
@pytest.fixture(scope="module")
def static_build(world, tmp_path_factory):
    """Static mode through the Python API, one document per row (--no-packing), --seq-len 48, written
    over an existing folder with overwrite=True."""
    from modeling_dsg.pipelines.build import BuildOptions, build

    out = tmp_path_factory.mktemp("static") / "model"
    out.mkdir()
    (out / "stale.txt").write_text("replaced")
    options = BuildOptions(
        name="zeta-static",
        mode="static",
        seq_len=48,
        packing=False,
        clamp=CLAMP,
        static_retain_freq=0.05,
        batch_size=64,
    )
    info = build(
        str(world.base),
        str(world.sae_z),
        world.forget_sources,
        world.retain_sources,
        out,
        options=options,
        overwrite=True,
    )
    return out, info


def test_static_mode_end_to_end(world, static_build):
    out, info = static_build
    assert not (out / "stale.txt").exists() and (out / "config.json").is_file()
    assert not [p for p in out.parent.iterdir() if p.name != "model"]  # no temp folder left beside it
    (g,) = world.record("config.json", out)["guardrails"]
    assert g["mode"] == "static" and g["threshold"] == 0.0 and g["name"] == "zeta-static"
    assert g["features"] == list(DETECT_Z)  # all four fire equally often: ties keep index order
    assert info["options"]["static_retain_freq"] == 0.05 and info["tau"] == 0.0

    # --no-packing, --seq-len 48: one row per document (all 18 forget documents), 47 tokens after BOS
    n = len(world.forget_texts)
    held = round(0.2 * n)
    assert info["rows"] == {"forget": n - held, "retain": n - held, "seq_len": 48, "packing": False}
    assert info["tokens"]["forget"] == (n - held) * 47
    # static is always on: a held-out row "fires" iff it holds a marker, in any amount
    rows = world.rows(world.forget_texts, world.retain_texts, seq_len=48, packing=False)
    for split in ("forget", "retain"):
        has_marker = (rows[f"heldout_{split}"].input_ids == world.z_id).any(1).double().mean().item()
        assert info["heldout"][f"{split}_trigger_rate"] == pytest.approx(has_marker, abs=1e-12)
    assert 0 < info["heldout"]["retain_trigger_rate"] < 1 and info["heldout"]["forget_trigger_rate"] == 1.0


def test_static_and_dynamic_differ_on_a_rare_marker(world, static_build):
    """One "z" in a long text: the dynamic guard stays off (rho <= tau), the static one edits it."""
    out, _ = static_build
    static, dynamic = world.load(out), world.load(world.main)
    s_one, s_plain, s_z = decisions(static, world.tok, [ONE_Z_TEXT, PLAIN_TEXT, Z_TEXT])
    d_one, d_plain, d_z = decisions(dynamic, world.tok, [ONE_Z_TEXT, PLAIN_TEXT, Z_TEXT])
    assert d_one["fired"] == [False] and s_one["fired"] == [True]
    assert s_plain["fired"] == d_plain["fired"] == [False]
    assert torch.equal(s_plain["logits"], d_plain["logits"])
    z = ONE_Z_TEXT.index("z") + 1  # its position after BOS: the static edit starts there
    assert torch.equal(s_one["logits"][:, :z], d_one["logits"][:, :z])
    assert not torch.equal(s_one["logits"][:, z:], d_one["logits"][:, z:])
    assert s_z["fired"] == d_z["fired"] == [True]


def test_cli_row_options_and_heldout_fraction_zero(world, tmp_path):
    """--no-packing --seq-len 40 through the CLI; --heldout-fraction 0: every row calibrates, and the
    held-out rates are recorded as null."""
    out = tmp_path / "model"
    stdout = world.cli_ok(
        "build",
        "--base",
        world.base,
        "--sae",
        world.sae_z,
        "--forget",
        *world.forget_sources,
        "--retain",
        *world.retain_sources,
        "--out",
        out,
        "--no-packing",
        "--seq-len",
        40,
        "--heldout-fraction",
        0,
        "--batch-size",
        64,
        *PAPER_GATE,
    )
    info = world.record("dsg_build.json", out)["guardrails"][0]
    n = len(world.forget_texts)  # one row per document; the retain side has more documents
    assert info["rows"] == {"forget": n, "retain": n, "seq_len": 40, "packing": False}
    assert info["heldout"] == {
        "forget_trigger_rate": None,
        "retain_trigger_rate": None,
        "n_forget": 0,
        "n_retain": 0,
        "auroc": None,
    }
    assert set(info["rho"]) == {"forget", "retain"}
    rows = world.rows(world.forget_texts, world.retain_texts, seq_len=40, packing=False, heldout=0.0)
    assert info["tau"] == pytest.approx(np.percentile(world.marker_rho(rows["retain"], world.z_id), 95), abs=1e-12)
    assert "held-out trigger rate: none measured (--heldout-fraction 0)" in stdout


def test_python_api_refuses_bad_options_before_loading(world, tmp_path):
    from modeling_dsg.pipelines.build import BuildOptions, build

    with pytest.raises(DSGError, match="--threshold-percentile must be between 0 and 100, got 101"):
        build(
            str(tmp_path / "no-such-model"),
            str(world.sae_z),
            world.forget_sources,
            world.retain_sources,
            tmp_path / "out",
            options=BuildOptions(threshold_percentile=101),
        )
    assert list(tmp_path.iterdir()) == []


def test_target_fpr_calibration_and_the_recorded_bound(world, tmp_path):
    """--target-fpr: tau is the smallest threshold whose retain firing rate has a one-sided 95% Clopper-Pearson
    bound <= the target; dsg_build.json records the rate and its bound, whichever rule chose tau."""
    from modeling_dsg.analysis.selection import clopper_pearson_upper

    default = world.record("dsg_build.json", world.main)["guardrails"][0]["calibration"]
    assert default["rule"] == "percentile" and default["threshold_percentile"] == 95.0
    assert default["retain_fpr_upper95"] == pytest.approx(
        clopper_pearson_upper(default["retain_fired"], default["retain_rows"]), abs=1e-12
    )
    assert default["retain_fpr_upper95"] > default["retain_fpr"]

    out = tmp_path / "model"
    world.cli_ok(
        "build",
        "--base",
        world.base,
        "--sae",
        world.sae_z,
        "--forget",
        *world.forget_sources,
        "--retain",
        *world.retain_sources,
        "--out",
        out,
        "--no-packing",
        "--seq-len",
        40,
        "--batch-size",
        64,
        "--target-fpr",
        0.3,
        *PAPER_GATE[:4],  # the paper's score and token gate, tau from the bound
    )
    info = world.record("dsg_build.json", out)["guardrails"][0]
    calibration = info["calibration"]
    assert calibration["rule"] == "target_fpr" and calibration["target_fpr"] == 0.3
    rows = world.rows(world.forget_texts, world.retain_texts, seq_len=40, packing=False)
    retain = np.asarray(world.marker_rho(rows["retain"], world.z_id))
    fired = int((retain > info["tau"]).sum())
    assert calibration["retain_fired"] == fired and calibration["retain_rows"] == len(retain)
    assert calibration["retain_fpr_upper95"] <= 0.3  # the guarantee
    smaller = retain[retain < info["tau"]]
    if smaller.size:  # the next lower threshold would break it
        assert clopper_pearson_upper(int((retain > smaller.max()).sum()), len(retain)) > 0.3
    assert (
        cli(
            "build",
            "--base",
            world.base,
            "--sae",
            world.sae_z,
            "--forget",
            *world.forget_sources,
            "--retain",
            *world.retain_sources,
            "--out",
            tmp_path / "bad",
            "--target-fpr",
            1.5,
        )
        == 2
    )


def test_the_default_gate(world, tmp_path, capsys):
    """`dsg build` with no gate or row flags: the embedded default's. Score "features" over 32 tokens, one row per
    document, and tau from a 0.025 false-positive bound; this world's retain rows are too few for that bound, so tau
    falls back to the paper's 95th percentile of retain rho (said on stderr, recorded, and stated in the card). The
    model's own rho on the build's retain rows has exactly that percentile."""
    from modeling_dsg.analysis.selection import calibrate_threshold
    from modeling_dsg.publishing.cards import render_card

    out = tmp_path / "default"
    common = ["--base", world.base, "--sae", world.sae_z, "--forget", *world.forget_sources]
    common += ["--retain", *world.retain_sources, "--seq-len", SEQ_LEN, "--batch-size", 64]
    assert cli("build", *common, "--out", out) == 0
    err = capsys.readouterr().err
    (g,) = json.loads((out / "config.json").read_text())["guardrails"]
    assert g["score"] == "features" and g["window"] == 32
    assert len(g["token_weights"]) == len(g["features"]) and all(type(w) is int for w in g["token_weights"])
    assert max(g["token_weights"]) == 64 and g["features"] == sorted(g["features"])
    rows = world.rows(world.forget_texts, world.retain_texts, packing=False)
    info = world.record("dsg_build.json", out)["guardrails"][0]
    assert info["rows"] == {"forget": len(rows["forget"].input_ids), "retain": len(rows["retain"].input_ids)} | {
        "seq_len": SEQ_LEN,
        "packing": False,
    }

    n_retain = len(rows["retain"].input_ids)
    assert info["calibration"]["retain_rows"] == n_retain < 119  # 119 rows bound a 0 rate at 0.025
    assert info["token_gate"] == {"gate": "features", "fallback": None}
    calibration = info["calibration"]
    assert calibration["rule"] == "percentile" and calibration["threshold_percentile"] == 95.0
    assert info["threshold_percentile"] == 95.0
    assert calibration["fallback"]["target_fpr"] == 0.025
    assert f"{n_retain} retain rows cannot show a firing rate <= 0.025" in calibration["fallback"]["reason"]
    assert "tau is the 95th percentile of retain rho (the paper's rule), not the default false-positive bound" in err
    model = world.load(out)
    rho, fired = row_decisions(model, rows["retain"])
    assert g["threshold"] == info["tau"] == calibrate_threshold(torch.from_numpy(rho), 95.0)
    assert calibration["retain_fired"] == int(fired.sum())
    card = str(render_card(out))
    assert "the 95th percentile of ρ over the retain rows used for the build (the paper's rule" in card

    # an explicit bound is not relaxed: the same corpora cannot show 0.02, nothing is written
    refused = tmp_path / "refused"
    assert cli("build", *common, "--out", refused, "--target-fpr", 0.02) == 2
    err = capsys.readouterr().err
    assert f"{n_retain} retain rows cannot show a firing rate <= 0.02" in err and "Traceback" not in err
    assert not refused.exists()
    assert cli("build", *common, "--out", refused, "--target-fpr", 0.3, "--threshold-percentile", 90) == 2
    assert "give --target-fpr or --threshold-percentile, not both" in capsys.readouterr().err
    assert not refused.exists()

    # static mode has no classifier to weigh: its default score is "window", its token gate "any", tau is 0
    static = tmp_path / "static"
    assert cli("build", *common, "--out", static, "--mode", "static") == 0
    (g,) = json.loads((static / "config.json").read_text())["guardrails"]
    assert "token_weights" not in g and g["threshold"] == 0.0 and g["score"] == "window"
    assert world.record("dsg_build.json", static)["guardrails"][0]["calibration"]["rule"] == "static"
    assert cli("build", *common, "--out", tmp_path / "bad", "--mode", "static", "--score", "features") == 2
    assert "--score features is the dynamic classifier's score" in capsys.readouterr().err

    # a token gate is for the window and fraction scores: given alone, it picks the window score
    learned = tmp_path / "learned"
    assert cli("build", *common, "--out", learned, "--token-gate", "learned", "--target-fpr", 0.3) == 0
    (g,) = json.loads((learned / "config.json").read_text())["guardrails"]
    assert g["score"] == "window" and type(g["token_threshold"]) is int and g["token_threshold"] >= 1
    assert world.record("dsg_build.json", learned)["guardrails"][0]["token_gate"]["gate"] == "learned"


def test_build_files_round_trip_through_their_definitions(world, tmp_path):
    """features.json and dsg_build.json: what `dsg build` writes is exactly what data.records defines,
    reads back through it unchanged, and writes back to the same bytes."""
    import typing

    from modeling_dsg.data import records

    def keys(schema):
        return set(typing.get_type_hints(schema))

    for folder in (world.main, world.added):
        for name in (records.FEATURES_FILE, records.BUILD_FILE):
            raw = (folder / name).read_text()
            assert records.read_record(folder / name) == json.loads(raw)
            out = tmp_path / folder.name
            out.mkdir(exist_ok=True)
            records.write_record(out, name, records.read_record(folder / name))
            assert (out / name).read_text() == raw
        features = json.loads((folder / records.FEATURES_FILE).read_text())
        for g in features["guardrails"]:
            assert set(g) == keys(records.GuardrailFeatures)
            for f in g["features"]:
                assert set(f) == keys(records.FeatureEntry)
                assert all(set(t) == keys(records.TopToken) for t in f["top_tokens"]) and f["top_tokens"]
        build = json.loads((folder / records.BUILD_FILE).read_text())
        assert set(build) == keys(records.BuildRecord)
        for g in build["guardrails"]:  # refusal and refusal_ids appear for action "refuse" only
            assert set(g) == keys(records.GuardrailRecord) - {"refusal", "refusal_ids"}
    assert len(json.loads((world.added / records.BUILD_FILE).read_text())["guardrails"]) == 2
