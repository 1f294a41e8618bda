"""Hostile inputs (issue 15): every class of bad input, through every command that reads it.

Each case is an input x an entry point (a `dsg` command line, run in-process). Every case must end
*clean*: exit code 2, exactly one stderr line, starting with `dsg: error: ` (and naming the problem
where a phrase is given), no traceback, and every file byte-identical afterwards (the inputs, and an
existing `--out` folder given with `--overwrite`). A failing case says which way it failed:

    [traceback]  an exception escaped the command (a traceback in a shell);
    [silent]     exit 0: the bad input was accepted;
    [data loss]  a file changed although the command failed;
    [unclear]    another exit code, more than one line, or no `dsg: error:` line;
    [misleading] one clean line that does not name the problem.

The classes: corpora that are not what they claim (encodings, binary files, JSON lines that are not
records, text fields that are not strings, question/choices records without string choices, corrupt
parquet); SAE folders (cfg.json, weights, architecture, sizes, NaN); devices; the wrong kind of model
folder and broken --add-to folders; corrupt model.safetensors; misshapen features.json / dsg_build.json;
config sizes that disagree with the weights; base checkpoints that do not match their config or are not
finite; standard input that is not UTF-8; out-of-range numbers (--verify-timeout, --lr, --k, --clamp,
--window, --n-features); outputs that would be non-finite; code that differs from the package's in
`dsg publish`; and the messages that used to blame the wrong thing.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
import traceback
from pathlib import Path

import pytest
import tiny
import torch
from safetensors.torch import load_file, save_file

from modeling_dsg import cli

WORDS = (
    "alpha beta gamma delta epsilon zeta theta iota kappa lambda sigma omega river stone music gene "
    "market cloud protein city"
).split()


def corpus(n: int, seed: int) -> str:
    docs = [" ".join(WORDS[(seed * 7 + i * 3 + k) % len(WORDS)] for k in range(24)) for i in range(n)]
    return "\n\n".join(docs) + "\n"


def mcq(n: int, seed: int) -> list[dict]:
    return [
        {
            "question": " ".join(WORDS[(seed + i + k) % len(WORDS)] for k in range(8)) + "?",
            "choices": [WORDS[(seed + i + k) % len(WORDS)] for k in range(4)],
            "answer": i % 4,
        }
        for i in range(n)
    ]


def jsonl(records) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def snapshot(*roots) -> dict:
    found = {}
    for root in roots:
        root = Path(root)
        for path in [root, *sorted(root.rglob("*"))]:
            found[str(path)] = "<dir>" if path.is_dir() else path.read_bytes()
    return found


# ---------------------------------------------------------------------------------------------- world
class World:
    """Valid inputs: a tiny base model, a tiny DSG folder (with features.json and dsg_build.json), a sae-lens
    SAE at layer 1 (d_in 32, d_sae 64), text corpora and question files."""

    def __init__(self, root: Path):
        from sae_lens import StandardSAE, StandardSAEConfig

        self.root = root
        self.base = root / "base"
        tiny.tiny_base("llama").save_pretrained(self.base)
        tiny.tiny_tokenizer().save_pretrained(self.base)
        self.dsg = tiny.make_tiny_dsg(root / "dsg")
        feats = [
            {
                "index": i,
                "forget_mean": 0.5,
                "retain_mean": 0.1,
                "forget_freq": 0.3,
                "retain_freq": 0.01,
                "importance": 0.25,
                "ratio": 25.0,
                "top_tokens": [{"token": "a", "activation": 1.0, "context": "[[a]]"}],
            }
            for i in (3, 7, 11, 20, 33)
        ]
        self.features = {"guardrails": [{"name": "topic", "layer": 1, "mode": "dynamic", "features": feats}]}
        self.build_record = {
            "base_model": str(self.base),
            "guardrails": [
                {
                    "name": "topic",
                    "mode": "dynamic",
                    "layer": 1,
                    "sae": "sae",
                    "forget_sources": ["forget.txt"],
                    "retain_sources": ["retain.txt"],
                    "n_features": 5,
                    "tau": 0.3,
                    "heldout": {"forget_trigger_rate": 0.9, "retain_trigger_rate": 0.05, "n_forget": 4, "n_retain": 4},
                }
            ],
        }
        (self.dsg / "features.json").write_text(json.dumps(self.features))
        (self.dsg / "dsg_build.json").write_text(json.dumps(self.build_record))
        torch.manual_seed(0)
        sae = StandardSAE(StandardSAEConfig(d_in=tiny.HIDDEN, d_sae=64))
        with torch.no_grad():
            sae.W_enc.copy_(torch.randn(tiny.HIDDEN, 64) / tiny.HIDDEN**0.5)
            sae.W_dec.copy_(1e-3 * torch.randn(64, tiny.HIDDEN))
        sae.cfg.metadata.hook_name = "model.layers.1"
        self.sae = root / "sae"
        sae.save_model(str(self.sae))
        self.forget = root / "forget.txt"
        self.forget.write_text(corpus(12, 1))
        self.retain = root / "retain.txt"
        self.retain.write_text(corpus(12, 2))
        self.forget_mcq = root / "forget_mcq.jsonl"
        self.forget_mcq.write_text(jsonl(mcq(4, 0)))
        self.retain_mcq = root / "retain_mcq.jsonl"
        self.retain_mcq.write_text(jsonl(mcq(4, 5)))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    return World(tmp_path_factory.mktemp("hostile_world"))


# --------------------------------------------------------------------------------------- entry points
def build(w, out, forget=None, retain=None, base=None, sae=None, extra=()):
    return [
        "build",
        "--base",
        base or w.base,
        "--sae",
        sae or w.sae,
        "--forget",
        forget or w.forget,
        "--retain",
        retain or w.retain,
        "--seq-len",
        32,
        "--batch-size",
        8,
        "--out",
        out,
        "--overwrite",
        *extra,
    ]


def add_to(w, out, folder, extra=()):
    return [
        "build",
        "--add-to",
        folder,
        "--sae",
        w.sae,
        "--forget",
        w.forget,
        "--retain",
        w.retain,
        "--name",
        "other",
        "--seq-len",
        32,
        "--batch-size",
        8,
        "--out",
        out,
        "--overwrite",
        *extra,
    ]


def rmu(w, out, forget=None, base=None, extra=()):
    return [
        "rmu",
        "--base",
        base or w.base,
        "--forget",
        forget or w.forget,
        "--retain",
        w.retain,
        "--steps",
        2,
        "--seq-len",
        32,
        "--batch-size",
        2,
        "--out",
        out,
        "--overwrite",
        *extra,
    ]


def train_sae(w, out, text=None, base=None, extra=()):
    return [
        "train-sae",
        "--base",
        base or w.base,
        "--layer",
        1,
        "--width",
        16,
        "--k",
        4,
        "--text",
        text or w.forget,
        "--seq-len",
        16,
        "--batch-tokens",
        64,
        "--out",
        out,
        "--overwrite",
        *extra,
    ]


def evaluate(w, out, folder=None, forget_mcq=None, text=None, extra=()):
    return [
        "eval",
        folder or w.dsg,
        "--forget-mcq",
        forget_mcq or w.forget_mcq,
        "--retain-mcq",
        w.retain_mcq,
        *(["--text", text] if text else []),
        "--out",
        out,
        "--overwrite",
        "--no-progress",
        "--permutations",
        1,
        "--cloze",
        "none",
        *extra,
    ]


def sweep(w, out, forget=None, sae=None, base=None, forget_mcq=None, extra=()):
    return [
        "sweep",
        "--base",
        base or w.base,
        "--sae",
        sae or w.sae,
        "--forget",
        forget or w.forget,
        "--retain",
        w.retain,
        "--forget-mcq",
        forget_mcq or w.forget_mcq,
        "--retain-mcq",
        w.retain_mcq,
        "--seq-len",
        32,
        "--batch-size",
        8,
        "--n-features-grid",
        2,
        "--clamps",
        4,
        "--ratio-percentiles",
        90,
        "--modes",
        "dynamic",
        "--limit",
        4,
        "--out",
        out,
        "--overwrite",
        *extra,
    ]


def explain(w, out, folder=None, text="the river stone and the music of the market city"):
    return ["explain", folder or w.dsg, text]


def publish(w, out, folder=None, extra=()):
    return ["publish", folder or w.dsg, "--repo-id", "me/dsg", "--dry-run", out, "--overwrite", *extra]


TEXT_ENTRIES = {
    "build --forget": lambda w, out, src: build(w, out, forget=src),
    "rmu --forget": lambda w, out, src: rmu(w, out, forget=src),
    "train-sae --text": lambda w, out, src: train_sae(w, out, text=src),
    "eval --text": lambda w, out, src: evaluate(w, out, text=src),
    "sweep --forget": lambda w, out, src: sweep(w, out, forget=src),
}
MCQ_ENTRIES = {
    "eval --forget-mcq": lambda w, out, src: evaluate(w, out, forget_mcq=src),
    "sweep --forget-mcq": lambda w, out, src: sweep(w, out, forget_mcq=src),
}
SAE_ENTRIES = {
    "build --sae": lambda w, out, src: build(w, out, sae=src),
    "sweep --sae": lambda w, out, src: sweep(w, out, sae=src),
}
BASE_ENTRIES = {
    "build --base": lambda w, out, src: build(w, out, base=src),
    "rmu --base": lambda w, out, src: rmu(w, out, base=src),
    "train-sae --base": lambda w, out, src: train_sae(w, out, base=src),
    "sweep --base": lambda w, out, src: sweep(w, out, base=src),
}
DSG_ENTRIES = {
    "explain": lambda w, out, src: explain(w, out, folder=src),
    "eval": lambda w, out, src: evaluate(w, out, folder=src),
    "build --add-to": lambda w, out, src: add_to(w, out, src),
}


# -------------------------------------------------------------------------------------- hostile inputs
def _write(tmp: Path, name: str, data) -> Path:
    path = tmp / name
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


LATIN1_DOC = ("Le café de la rivière était plein de musique et de pierres anciennes, " * 3).encode("latin-1")
TEXT_DOC = corpus(6, 3)

TEXTS = {  # name -> (make(tmp, world) -> path, phrase in the error line)
    "binary .txt": (lambda t, w: _write(t, "binary.txt", bytes(range(256)) * 8), "not UTF-8"),
    "Latin-1 .txt": (lambda t, w: _write(t, "latin1.txt", LATIN1_DOC + b"\n\n" + LATIN1_DOC), "not UTF-8"),
    "UTF-16 .txt": (lambda t, w: _write(t, "utf16.txt", TEXT_DOC.encode("utf-16")), "UTF-16"),
    "NUL bytes .txt": (lambda t, w: _write(t, "nul.txt", TEXT_DOC.encode().replace(b" ", b"\x00")), "NUL"),
    "binary .jsonl": (lambda t, w: _write(t, "binary.jsonl", bytes(range(128, 256)) * 8), "not UTF-8"),
    "Latin-1 .jsonl": (lambda t, w: _write(t, "latin1.jsonl", b'{"text": "' + LATIN1_DOC + b'"}\n'), "not UTF-8"),
    "UTF-16 .jsonl": (
        lambda t, w: _write(t, "utf16.jsonl", json.dumps({"text": TEXT_DOC}).encode("utf-16")),
        "UTF-16",
    ),
    "scalar lines .jsonl": (lambda t, w: _write(t, "scalars.jsonl", "1\n2\n3\n"), "not an object"),
    "string lines .jsonl": (lambda t, w: _write(t, "strings.jsonl", jsonl([TEXT_DOC, TEXT_DOC])), "not an object"),
    "mixed lines .jsonl": (
        lambda t, w: _write(t, "mixed.jsonl", jsonl([{"text": TEXT_DOC}, TEXT_DOC, 5])),
        ":2: a JSON string",
    ),
    "text that is a list": (
        lambda t, w: _write(t, "listtext.jsonl", jsonl([{"text": TEXT_DOC.split()}] * 3)),
        "must be a string",
    ),
    "question without choices": (
        lambda t, w: _write(t, "nochoices.jsonl", jsonl(mcq(3, 0) + [{"question": "why?", "answer": 1}])),
        "record 4 has no 'choices'",
    ),
    "choices that are a number": (
        lambda t, w: _write(t, "intchoices.jsonl", jsonl([{"question": "why?", "choices": 4, "answer": 1}])),
        "'choices' must be a list",
    ),
    "choices that are numbers": (
        lambda t, w: _write(t, "intlist.jsonl", jsonl([{**r, "choices": [1, 2, 3, 4]} for r in mcq(4, 1)])),
        "every choice must be a string",
    ),
    "corrupt .parquet": (
        lambda t, w: _write(t, "corrupt.parquet", b"PAR1" + bytes(range(256)) * 4 + b"PAR1"),
        "not a valid parquet file",
    ),
    "folder named .txt": (lambda t, w: (t / "folder.txt").mkdir() or t / "folder.txt", "is a folder"),
}
MCQS = {
    "binary .jsonl": TEXTS["binary .jsonl"],
    "Latin-1 .jsonl": (
        lambda t, w: _write(
            t, "latin1.jsonl", b'{"question": "caf\xe9?", "choices": ["a", "b", "c", "d"], "answer": 0}\n'
        ),
        "not UTF-8",
    ),
    "UTF-16 .jsonl": (lambda t, w: _write(t, "utf16.jsonl", jsonl(mcq(2, 0)).encode("utf-16")), "UTF-16"),
    "corrupt .parquet": TEXTS["corrupt .parquet"],
    "folder named .jsonl": (lambda t, w: (t / "folder.jsonl").mkdir() or t / "folder.jsonl", "is a folder"),
}


def _sae_copy(tmp: Path, w: World, change) -> Path:
    out = tmp / "sae"
    shutil.copytree(w.sae, out)
    change(out)
    return out


def _cfg(change):
    def edit(folder):
        cfg = json.loads((folder / "cfg.json").read_text())
        change(cfg)
        (folder / "cfg.json").write_text(json.dumps(cfg))

    return edit


def _sae_weights(change):
    def edit(folder):
        state = {k: v.clone() for k, v in load_file(folder / "sae_weights.safetensors").items()}
        change(state)
        save_file(state, folder / "sae_weights.safetensors")

    return edit


def _cut(path: Path, keep: int):
    path.write_bytes(path.read_bytes()[:keep])


SAES = {
    "cfg.json not JSON": (lambda f: (f / "cfg.json").write_text("{oops"), "not valid JSON"),
    "cfg.json a list": (lambda f: (f / "cfg.json").write_text("[1, 2]"), "must hold a JSON object"),
    "cfg.json empty object": (lambda f: (f / "cfg.json").write_text("{}"), "d_in must be an integer"),
    "cfg.json Latin-1": (lambda f: (f / "cfg.json").write_bytes(b'{"d_in": 32, "note": "caf\xe9"}'), "not UTF-8"),
    "unknown architecture": (_cfg(lambda c: c.update(architecture="mystery")), "unknown SAE architecture 'mystery'"),
    "cfg d_sae disagrees with the weights": (_cfg(lambda c: c.update(d_sae=128)), "W_enc has shape (32, 64)"),
    "cfg d_in disagrees with the weights": (_cfg(lambda c: c.update(d_in=16)), "W_enc has shape (32, 64)"),
    "cfg d_sae 1e12": (_cfg(lambda c: c.update(d_sae=10**12)), "d_sae must be an integer in [1, 33554432]"),
    "cfg d_sae a string": (_cfg(lambda c: c.update(d_sae="wide")), "d_sae must be an integer"),
    "missing weights": (lambda f: (f / "sae_weights.safetensors").unlink(), "has no sae_weights.safetensors"),
    "empty weights": (lambda f: _cut(f / "sae_weights.safetensors", 0), "the file is empty"),
    "truncated weights": (lambda f: _cut(f / "sae_weights.safetensors", 3000), "truncated"),
    "garbage weights": (lambda f: (f / "sae_weights.safetensors").write_bytes(b"\x07" * 4096), "cannot be read"),
    "NaN weights": (_sae_weights(lambda s: s["W_enc"].__setitem__((0, 0), float("nan"))), "W_enc contains NaN"),
}


def _folder_copy(tmp: Path, source: Path, change, name="model") -> Path:
    out = tmp / name
    shutil.copytree(source, out)
    change(out)
    return out


def _config(change):
    def edit(folder):
        cfg = json.loads((folder / "config.json").read_text())
        change(cfg)
        (folder / "config.json").write_text(json.dumps(cfg))

    return edit


def _weights(change):
    def edit(folder):
        state = {k: v.clone() for k, v in load_file(folder / "model.safetensors").items()}
        change(state)
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})

    return edit


def _no_tokenizer(folder):
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (folder / name).exists():
            (folder / name).unlink()


def _nan_weight(state):
    name = next(k for k in state if k.endswith("layers.0.mlp.down_proj.weight"))
    state[name][0, 0] = float("nan")


CORRUPT_WEIGHTS = {
    "empty model.safetensors": (lambda f: _cut(f / "model.safetensors", 0), "the file is empty"),
    "truncated model.safetensors": (lambda f: _cut(f / "model.safetensors", 3000), "truncated"),
    "garbage model.safetensors": (lambda f: (f / "model.safetensors").write_bytes(b"\x07" * 4096), "cannot be read"),
}
BASE_FOLDERS = {  # a broken base model folder -> phrase
    **CORRUPT_WEIGHTS,
    "no tokenizer": (_no_tokenizer, "has no tokenizer"),
    "hidden_size disagrees with the weights": (
        _config(lambda c: c.update(hidden_size=48)),
        "does not match its weights",
    ),
    "a q_proj missing from the checkpoint": (
        _weights(lambda s: s.pop("model.layers.1.self_attn.q_proj.weight")),
        "has no model.layers.1.self_attn.q_proj.weight",
    ),
    "fewer layers in config.json than in the checkpoint": (
        _config(lambda c: c.update(num_hidden_layers=3)),
        "has no place for",
    ),
    "a NaN weight": (_weights(_nan_weight), "contains NaN"),
    "tokenizer.json garbage": (lambda f: (f / "tokenizer.json").write_text("garbage{"), "cannot load model"),
    "tokenizer_config.json a list": (lambda f: (f / "tokenizer_config.json").write_text("[1]"), "cannot load model"),
    "num_hidden_layers a string": (_config(lambda c: c.update(num_hidden_layers="four")), "num_hidden_layers"),
}
DSG_FOLDERS = {  # a broken DSG folder -> phrase
    **CORRUPT_WEIGHTS,
    "no tokenizer": (_no_tokenizer, "has no tokenizer"),
    "config.json Latin-1": (
        lambda f: (f / "config.json").write_bytes((f / "config.json").read_bytes().replace(b'"topic"', b'"caf\xe9"')),
        "not UTF-8",
    ),
    "hidden_size disagrees with the weights": (
        _config(lambda c: (c["text_config"].update(hidden_size=48), c["guardrails"][0]["sae"].update(d_in=48))),
        "wrong shape",
    ),
    "tokenizer_config.json a list": (lambda f: (f / "tokenizer_config.json").write_text("[1]"), "cannot load"),
    "num_hidden_layers a string": (
        _config(lambda c: c["text_config"].update(num_hidden_layers="four")),
        "num_hidden_layers",
    ),
}
ADD_TO_FOLDERS = {  # only for --add-to (the others refuse these cleanly already)
    "guardrails 5": (_config(lambda c: c.update(guardrails=5)), "must be a list of objects"),
    "guardrails ['biology']": (_config(lambda c: c.update(guardrails=["biology"])), "must be a list of objects"),
    "features.json a list": (lambda f: (f / "features.json").write_text("[]"), "must hold a JSON object"),
    "dsg_build.json guardrails 'biology'": (
        lambda f: (f / "dsg_build.json").write_text(json.dumps({"guardrails": "biology"})),
        "'guardrails' must be a list of objects",
    ),
}


def _features(change):
    def edit(folder):
        data = json.loads((folder / "features.json").read_text())
        change(data)
        (folder / "features.json").write_text(json.dumps(data))

    return edit


def _top_tokens(value):
    def change(data):
        for f in data["guardrails"][0]["features"]:
            f["top_tokens"] = value

    return change


EXPLAIN_RECORDS = {
    "features.json a list": (
        lambda f: (f / "features.json").write_text(json.dumps([1, 2])),
        "must hold a JSON object",
    ),
    "features.json guardrails 'biology'": (
        _features(lambda d: d.update(guardrails="biology")),
        "must be a list of objects",
    ),
    "features.json top_tokens 7": (_features(_top_tokens(7)), "'top_tokens' must be a list of objects"),
    "features.json top_tokens [5]": (_features(_top_tokens([5])), "'top_tokens' must be a list of objects"),
    "features.json features 5": (
        _features(lambda d: d["guardrails"][0].update(features=5)),
        "'features' must be a list",
    ),
    "features.json Latin-1": (
        lambda f: (f / "features.json").write_bytes(b'{"guardrails": [], "x": "caf\xe9"}'),
        "not UTF-8",
    ),
}
CARD_RECORDS = {
    "features.json top_tokens 7": EXPLAIN_RECORDS["features.json top_tokens 7"],
    "features.json guardrails 'biology'": EXPLAIN_RECORDS["features.json guardrails 'biology'"],
    "dsg_build.json guardrails 'biology'": ADD_TO_FOLDERS["dsg_build.json guardrails 'biology'"],
    "dsg_build.json forget_sources 5": (
        lambda f: (f / "dsg_build.json").write_text(
            json.dumps({"guardrails": [{"name": "topic", "forget_sources": 5}]})
        ),
        "'forget_sources' must be a list of strings",
    ),
}


def _custom_code(folder):
    with open(folder / "modeling_dsg.py", "a") as f:
        f.write("\nprint('this runs on every machine that loads the model')\n")


def _extra_module(folder):
    (folder / "evil.py").write_text("from .modeling_dsg import DSGForCausalLM\n")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"]["AutoModelForCausalLM"] = "evil.DSGForCausalLM"
    (folder / "config.json").write_text(json.dumps(cfg))


# ------------------------------------------------------------------------------------------ the cases
class Case:
    """A command line, the phrase its error line must hold, and how to run it. `progress`: the problem shows
    only after the work (a run that diverges), so progress bars and library warnings may come before the one
    error line, which must then be the last line."""

    def __init__(
        self,
        argv,
        phrase: str | None = None,
        *,
        stdin: bytes | None = None,
        no_cuda: bool = False,
        progress: bool = False,
    ):
        self.argv, self.phrase, self.stdin, self.no_cuda, self.progress = argv, phrase, stdin, no_cuda, progress


def _cases() -> dict:
    """{id: make(world, tmp, out) -> Case}."""
    cases = {}

    def add(name, make):
        assert name not in cases, name
        cases[name] = make

    for entry, argv in TEXT_ENTRIES.items():
        for name, (make, phrase) in TEXTS.items():
            add(f"{entry} <- {name}", lambda w, t, o, a=argv, m=make, p=phrase: Case(a(w, o, m(t, w)), p))
    for entry, argv in MCQ_ENTRIES.items():
        for name, (make, phrase) in MCQS.items():
            add(f"{entry} <- {name}", lambda w, t, o, a=argv, m=make, p=phrase: Case(a(w, o, m(t, w)), p))
    for entry, argv in SAE_ENTRIES.items():
        for name, (change, phrase) in SAES.items():
            add(
                f"{entry} <- SAE {name}",
                lambda w, t, o, a=argv, c=change, p=phrase: Case(a(w, o, _sae_copy(t, w, c)), p),
            )
    # devices, on every command with --device (CUDA is hidden, so the case holds on any machine)
    device_entries = {"build": build, "rmu": rmu, "train-sae": train_sae, "eval": evaluate, "sweep": sweep}
    for entry, argv in device_entries.items():
        for device, phrase in (
            ("cuda", "CUDA is not available"),
            ("bogus", "is not a device torch knows"),
            ("cuda:7", "CUDA is not available"),
        ):
            add(
                f"{entry} --device {device}",
                lambda w, t, o, a=argv, d=device, p=phrase: Case(a(w, o, extra=("--device", d)), p, no_cuda=True),
            )
    add("build --device meta", lambda w, t, o: Case(build(w, o, extra=("--device", "meta")), "--device meta"))
    for entry in ("results", "demo"):
        for device, phrase in (("cuda", "CUDA is not available"), ("bogus", "is not a device torch knows")):
            add(
                f"{entry} --device {device}",
                lambda w, t, o, e=entry, d=device, p=phrase: Case(
                    [e, "--out", o, "--overwrite", "--device", d], p, no_cuda=True
                ),
            )
    # the wrong kind of model folder, and broken base folders
    for entry, argv in BASE_ENTRIES.items():
        add(
            f"{entry} <- a DSG folder",
            lambda w, t, o, a=argv: Case(a(w, o, w.dsg), "is a DSG model folder, not a base model"),
        )
        add(
            f"{entry} <- a folder named .gguf",
            lambda w, t, o, a=argv: Case(a(w, o, (t / "m.gguf").mkdir() or t / "m.gguf"), "is a folder"),
        )
        for name, (change, phrase) in BASE_FOLDERS.items():
            if entry == "sweep --base" and name not in CORRUPT_WEIGHTS:
                continue  # the same loader as build; the corrupt files are enough to show it is used
            add(
                f"{entry} <- base with {name}",
                lambda w, t, o, a=argv, c=change, p=phrase: Case(a(w, o, _folder_copy(t, w.base, c)), p),
            )
    for name, (change, phrase) in BASE_FOLDERS.items():
        if name in CORRUPT_WEIGHTS:
            add(
                f"eval --baseline <- base with {name}",
                lambda w, t, o, c=change, p=phrase: Case(
                    evaluate(w, o, extra=("--baseline", f"other={_folder_copy(t, w.base, c)}")), p
                ),
            )
    for entry, argv in DSG_ENTRIES.items():
        for name, (change, phrase) in DSG_FOLDERS.items():
            if entry == "eval" and name == "config.json Latin-1":
                continue  # refused cleanly before
            add(
                f"{entry} <- DSG folder with {name}",
                lambda w, t, o, a=argv, c=change, p=phrase: Case(a(w, o, _folder_copy(t, w.dsg, c)), p),
            )
    for name, (change, phrase) in ADD_TO_FOLDERS.items():
        add(
            f"build --add-to <- DSG folder with {name}",
            lambda w, t, o, c=change, p=phrase: Case(add_to(w, o, _folder_copy(t, w.dsg, c)), p),
        )
    # features.json / dsg_build.json of the wrong shape
    for name, (change, phrase) in EXPLAIN_RECORDS.items():
        add(
            f"explain <- {name}", lambda w, t, o, c=change, p=phrase: Case(explain(w, o, _folder_copy(t, w.dsg, c)), p)
        )
    for name, (change, phrase) in CARD_RECORDS.items():
        add(
            f"publish (card) <- {name}",
            lambda w, t, o, c=change, p=phrase: Case(publish(w, o, _folder_copy(t, w.dsg, c)), p),
        )
    add(
        "publish --eval <- a file",
        lambda w, t, o: Case(publish(w, o, extra=("--eval", w.forget)), "is a file, not a folder"),
    )
    # other inputs
    for name, raw in (("bytes that are not UTF-8", b"\xff\xfe\xfa not text"), ("Latin-1", LATIN1_DOC)):
        add(
            f"explain - <- standard input {name}",
            lambda w, t, o, r=raw: Case(explain(w, o, text="-"), "not UTF-8", stdin=r),
        )
    add(
        "explain <- an argument that is not UTF-8",
        lambda w, t, o: Case(explain(w, o, text="caf\udce9 au lait"), "not UTF-8"),
    )
    for value in ("nan", "inf", "0", "-5"):
        add(
            f"publish --verify-timeout {value}",
            lambda w, t, o, v=value: Case(
                publish(w, o, extra=("--verify-timeout", v)), "--verify-timeout must be a finite number of seconds > 0"
            ),
        )
    add("train-sae --k 64 --width 16", lambda w, t, o: Case(train_sae(w, o, extra=("--k", 64)), "--k 64 is more than"))
    for value in ("nan", "inf", "0", "-1"):
        add(
            f"train-sae --lr {value}",
            lambda w, t, o, v=value: Case(train_sae(w, o, extra=("--lr", v)), "--lr must be a finite"),
        )
    # accepted silently before: out-of-range numbers and non-finite outputs
    add(
        "build --clamp 1e308",
        lambda w, t, o: Case(build(w, o, extra=("--clamp", "1e308")), "--clamp must be at most 1e+06"),
    )
    add(
        "build --clamp 1e308 (refused up front)",
        lambda w, t, o: Case(
            build(w, o, base=t / "no-such-model", extra=("--clamp", "1e308")), "--clamp must be at most 1e+06"
        ),
    )
    add(
        "build --window 10**12",
        lambda w, t, o: Case(
            build(w, o, extra=("--score", "window", "--window", 10**12)), "--window must be between 2 and 1048576"
        ),
    )
    add(
        "sweep --clamps 1e308",
        lambda w, t, o: Case(sweep(w, o, extra=("--clamps", "1e308")), "--clamps must be at most 1e+06"),
    )
    add(
        "build --n-features 100 (d_sae 64)",
        lambda w, t, o: Case(
            build(w, o, extra=("--n-features", 100)), "--n-features 100 is more than the SAE has features (d_sae = 64)"
        ),
    )
    add(
        "sweep --n-features-grid 100 (d_sae 64)",
        lambda w, t, o: Case(
            sweep(w, o, extra=("--n-features-grid", 100)), "--n-features-grid 100 is more than the SAE has features"
        ),
    )
    for flag in ("--lr", "--alpha", "--multiplier", "--steering-coeff"):
        add(
            f"rmu {flag} inf",
            lambda w, t, o, f=flag: Case(rmu(w, o, extra=(f, "inf")), f"{f} must be a finite number"),
        )
    add(
        "rmu --steering-coeff 1e30 (non-finite weights)",
        lambda w, t, o: Case(
            rmu(w, o, extra=("--steering-coeff", "1e30", "--lr", "1e30")), "RMU diverged", progress=True
        ),
    )
    add(
        "train-sae --lr 1e30 (non-finite SAE)",
        lambda w, t, o: Case(train_sae(w, o, extra=("--lr", "1e30")), "training diverged", progress=True),
    )
    # dsg publish runs the folder's code to verify it: only the package's own code, unless allowed
    add(
        "publish <- modeling_dsg.py changed",
        lambda w, t, o: Case(
            publish(w, o, _folder_copy(t, w.dsg, _custom_code)), "(modeling_dsg.py) is not byte-identical"
        ),
    )
    add(
        "publish <- auto_map names another module",
        lambda w, t, o: Case(publish(w, o, _folder_copy(t, w.dsg, _extra_module)), "(evil.py) is not byte-identical"),
    )
    return cases


CASES = _cases()


# ------------------------------------------------------------------------------------------ the check
def classify(argv, watched, capfd, phrase=None, progress=False) -> tuple[str, str]:
    """(outcome, detail) of one command line; see the module docstring."""
    before = snapshot(*watched)
    capfd.readouterr()
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as err:  # argparse
        code = err.code
    except BaseException:  # noqa: BLE001 - whatever escapes is what a user would see as a traceback
        return "traceback", traceback.format_exc()[-1500:]
    err = capfd.readouterr().err
    if code == 0:
        return "silent", err[-1500:]
    if snapshot(*watched) != before:
        return "data loss", err[-1500:]
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if "dsg: error:" in line]
    if progress:  # only the last line may be, and must be, the error
        lines = lines[-1:] if len(errors) == 1 else lines
    if code != 2 or len(lines) != 1 or not lines[0].startswith("dsg: error: ") or "Traceback" in err:
        return "unclear", f"exit {code}: {err[-1500:]}"
    if phrase and phrase not in lines[0]:
        return "misleading", f"expected {phrase!r} in: {lines[0]}"
    return "clean", lines[0]


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_input(world, tmp_path, capfd, monkeypatch, name):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("an earlier result")
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    case = CASES[name](world, inputs, out)
    if case.no_cuda:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    if case.stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(case.stdin), encoding="utf-8"))
    outcome, detail = classify(case.argv, [world.root, tmp_path], capfd, case.phrase, case.progress)
    assert outcome == "clean", f"[{outcome}] {detail}"
    assert sorted(os.listdir(tmp_path)) == ["inputs", "out"]  # no temporary folder left beside the output
    assert sorted(os.listdir(out)) == ["keep.txt"]
