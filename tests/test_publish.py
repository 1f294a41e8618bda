"""Model cards (modeling_dsg/publishing/templates/ + cards.py) and `dsg publish`: staging, verification, upload,
failures."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx2
import pytest
from huggingface_hub import CommitOperationAdd, HfApi, ModelCard
from huggingface_hub.errors import HfHubHTTPError
from tiny import make_tiny_dsg

from modeling_dsg import cli
from modeling_dsg.errors import DSGError
from modeling_dsg.publishing import publish as pub
from modeling_dsg.publishing.cards import render_card

REPO = "someone/tiny-dsg-topic"
BASE_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
FEATURES = [3, 7, 11, 20, 33]  # tiny.guardrail()'s defaults
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
TOKENS = {3: " virus", 7: " cell|wall", 11: "`x`", 20: "\nprotein", 33: " gene"}


def summary(mean: float, n: int) -> dict:
    return {
        "mean": mean,
        "std": 0.1,
        "min": 0.0,
        "p5": 0.0,
        "p25": mean / 2,
        "p50": mean,
        "p75": mean * 1.5,
        "p95": mean * 2,
        "max": 0.9,
        "n": n,
    }


def add_build_records(folder: Path) -> Path:
    """features.json and dsg_build.json as `dsg build` writes them, for the tiny guardrail 'topic'."""
    feats = [
        {
            "index": i,
            "forget_mean": 0.5 + k,
            "retain_mean": 0.01 * (k + 1),
            "forget_freq": 0.25,
            "retain_freq": 0.002,
            "importance": (0.5 + k) ** 2,
            "ratio": 1000.0 * (k + 1),
            "top_tokens": [
                {"token": TOKENS[i], "activation": 4.25 - k, "context": f"about the{TOKENS[i]} here"},
                {"token": " other", "activation": 1.0, "context": "other"},
            ],
        }
        for k, i in enumerate(FEATURES)
    ]
    (folder / "features.json").write_text(
        json.dumps({"guardrails": [{"name": "topic", "layer": 1, "features": feats}]})
    )
    build = {
        "base_model": BASE_ID,
        "guardrails": [
            {
                "name": "topic",
                "mode": "dynamic",
                "sae": "/somewhere/saes/tiny-sae",
                "layer": 1,
                "forget_sources": ["/data/wmdp/bio.jsonl"],
                "retain_sources": ["Salesforce/wikitext:wikitext-2-raw-v1@test"],
                "n_features": 5,
                "clamp": 8.0,
                "ratio_percentile": 95,
                "threshold_percentile": 95,
                "tau": 0.3,
                "rho": {"forget": summary(0.45, 120), "retain": summary(0.05, 120)},
                "heldout": {
                    "forget_trigger_rate": 0.9375,
                    "retain_trigger_rate": 0.03125,
                    "n_forget": 32,
                    "n_retain": 64,
                },
            }
        ],
    }
    (folder / "dsg_build.json").write_text(json.dumps(build))
    return folder


REPORT = {  # in the schema of modeling_dsg/report_schema.py (tests/test_report_card.py renders a real one)
    "schema_version": 2,
    "results": [
        {
            "dataset": "WMDP-bio (held out)",
            "metric": "accuracy",
            "base": 0.3125,
            "dsg": 0.25,
            "baselines": {"static": 0.26},
            "n": 64,
            "dataset_id": "cais/wmdp",
            "dataset_config": "wmdp-bio",
            "dataset_split": "test",
            "higher_is_better": False,
        },
        {
            "dataset": "MMLU (non-biology)",
            "metric": "accuracy",
            "base": 0.28,
            "dsg": 0.275,
            "baselines": {"static": None},
            "n": 80,
            "dataset_id": "cais/mmlu",
            "higher_is_better": True,
        },
        {
            "dataset": "WikiText",
            "metric": "nll",
            "base": 3.5,
            "dsg": None,
        },  # no DSG value: table only, not model-index
    ],
    "baselines": ["static"],
    "trigger_rates": {
        "WMDP-bio (held out)": {"topic": {"rate": 0.90625, "fired": 29, "n": 32}},
        "MMLU (non-biology)": {"topic": {"rate": 0.025, "fired": 2, "n": 80}},
    },
    "dilution": {
        "dataset": "WMDP-bio (held out)",
        "filler": "WikiText (text)",
        "n": 32,
        "factors": [1, 5],
        "seed": 0,
        "by_guardrail": {
            "topic": {
                "score": "fraction",
                "undiluted_trigger_rate": 0.5,
                "1x": {"fired_before": 16, "evaded": 8, "attack_success": 0.5, "trigger_rate": 0.25},
                "5x": {"fired_before": 16, "evaded": 14, "attack_success": 0.875, "trigger_rate": 0.0625},
            }
        },
    },
}


def write_eval(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.json").write_text(json.dumps(REPORT))
    (folder / "rho_hist.png").write_bytes(b"\x89PNG\r\n\x1a\n fake plot")
    return folder


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    """A saved tiny DSG folder (loads through trust_remote_code) with build records and an eval folder."""
    folder = make_tiny_dsg(tmp_path_factory.mktemp("publish") / "tiny-dsg")
    add_build_records(folder)
    write_eval(folder / "eval")
    return folder


@pytest.fixture
def folder_copy(tiny_folder, tmp_path) -> Path:
    """A private copy a test may change."""
    return Path(shutil.copytree(tiny_folder, tmp_path / "copy"))


def load_card(card, tmp_path) -> ModelCard:
    path = tmp_path / "README.md"
    card.save(path)
    return ModelCard.load(path)


def stub_verify(monkeypatch):
    calls = []

    def fake(staged, timeout=pub.VERIFY_TIMEOUT_S):
        calls.append(sorted(p.relative_to(staged).as_posix() for p in Path(staged).rglob("*") if p.is_file()))
        return {
            "class": "DSGForCausalLM",
            "module": "transformers_modules.stub",
            "logits_shape": [1, 3, 259],
            "seconds": 0.0,
        }

    monkeypatch.setattr(pub, "verify", fake)
    return calls


# ------------------------------------------------------------------------------------------- cards
def test_card_without_eval_report(tiny_folder, tmp_path):
    card = render_card(tiny_folder, REPO, eval_dir=tmp_path / "no-eval")
    loaded = load_card(card, tmp_path)
    data = loaded.data.to_dict()
    assert data["base_model"] == BASE_ID
    assert data["license"] == "apache-2.0"
    assert data["library_name"] == "transformers"
    assert {"unlearning", "sparse-autoencoder", "dsg"} <= set(data["tags"])
    assert data["datasets"] == ["Salesforce/wikitext"]  # the Hub-id source, not the local path
    assert "model-index" not in data and loaded.data.eval_results is None
    text = loaded.text
    assert f'repo = "{REPO}"' in text and text.count("trust_remote_code=True") >= 3
    assert (
        'pipeline("text-generation", model="someone/tiny-dsg-topic", trust_remote_code=True, device_map="auto")'
        in text
    )
    assert 'device_map="auto")' in text.split("```python")[1]
    assert "| layer | residual stream after decoder block 1 |" in text
    assert (
        "from `saes/tiny-sae`" in text
        and "`wmdp/bio.jsonl`" in text
        and "`Salesforce/wikitext:wikitext-2-raw-v1@test`" in text
    )
    # the feature table: one row per selected feature, in the config's order, with its top token
    rows = [
        line
        for line in text.splitlines()
        if line.startswith("| ") and line.split("|")[1].strip().isdigit() and "`" in line
    ]
    assert [int(r.split("|")[1]) for r in rows] == FEATURES
    assert "`␣virus` (4.2)" in rows[0] and "`␣cell\\|wall` (3.2)" in rows[1] and "`` `x` `` (2.2)" in rows[2]
    assert "`↵protein`" in rows[3] and "| 0.500 | 0.010 | 25.0% | 0.2% | 1000.0 |" in rows[0]
    assert "ρ > τ = **0.3000**, the 95th percentile of ρ over the retain rows" in text
    assert "| retain | 120 | 0.050 | 0.050 | 0.100 | 0.900 |" in text
    assert "**93.8%** of 32 forget rows and **3.1%** of 64 retain rows fired" in text
    evaluation = text.split("## Evaluation")[1].split("## Limitations")[0]
    assert "Not measured: no `dsg eval` report" in evaluation
    limitations = text.split("## Limitations")[1]
    assert "base model's weights are in this repository" in limitations
    assert "can be evaded" in limitations and "Dilution attacks were not measured" in limitations
    assert "Not certified erasure" in limitations and "up to 3.1%" in limitations
    assert "License: `apache-2.0`" in text


def test_card_with_eval_report(tiny_folder, tmp_path):
    loaded = load_card(render_card(tiny_folder, REPO), tmp_path)  # eval/ inside the folder
    results = loaded.data.eval_results
    assert loaded.data.model_name == "tiny-dsg-topic"
    assert [(r.dataset_type, r.dataset_name, r.metric_type, r.metric_value) for r in results] == [
        ("cais/wmdp", "WMDP-bio (held out)", "accuracy", 0.25),
        ("cais/mmlu", "MMLU (non-biology)", "accuracy", 0.275),
    ]
    assert results[0].dataset_config == "wmdp-bio" and results[0].dataset_split == "test"
    assert all(r.task_type == "text-generation" for r in results)
    text = loaded.text
    evaluation = text.split("## Evaluation")[1].split("## Limitations")[0]
    assert "| dataset | metric | n | base | DSG | DSG − base | static |" in evaluation
    assert "| WMDP-bio (held out) | accuracy ↓ | 64 | 0.312 | 0.250 | -0.062 | 0.260 |" in evaluation
    assert "| MMLU (non-biology) | accuracy ↑ | 80 | 0.280 | 0.275 | -0.005 | not measured |" in evaluation
    assert "| WikiText | nll |  | 3.500 | not measured | not measured | not measured |" in evaluation
    assert (
        "| MMLU (non-biology) | 2.5% of 80 |" in evaluation and "| WMDP-bio (held out) | 90.6% of 32 |" in evaluation
    )
    assert "| `topic` | `fraction` | 50.0% (16 of 32) | 50.0% | 87.5% |" in evaluation
    assert "![eval/rho_hist.png](eval/rho_hist.png)" in evaluation
    limitations = text.split("## Limitations")[1]
    assert "guardrail `topic` (score `fraction`): 1x: 50.0%, 5x: 87.5%." in limitations
    assert "Dilution attacks were not measured" not in limitations


def test_card_license_and_base_from_local_files(tmp_path):
    import gguf

    gguf_path = tmp_path / "my-base.Q4_0.gguf"
    writer = gguf.GGUFWriter(str(gguf_path), "llama")
    writer.add_license("mit")
    writer.add_token_list(["a", "b"])
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_ti_data_to_file(), writer.close()
    folder = tmp_path / "m"
    folder.mkdir()
    guard = {
        "name": "chemistry",
        "layer": 0,
        "mode": "static",
        "features": [1],
        "clamp": 5.0,
        "threshold": 0.0,
        "score": "fraction",
        "sae": {"architecture": "standard", "d_in": 8, "d_sae": 16},
    }
    (folder / "config.json").write_text(
        json.dumps({"model_type": "dsg", "guardrails": [guard], "text_config": {"_name_or_path": str(gguf_path)}})
    )
    data = render_card(folder).data.to_dict()
    assert data["license"] == "mit" and "base_model" not in data  # a local base has no Hub id
    text = render_card(folder).text
    assert "`my-base.Q4_0.gguf` (a local model, not a Hub id)" in text and "`static` (always on" in text
    assert (
        "τ is not used" in text and "SAE features 1. Their activation statistics and top tokens: not measured" in text
    )
    over = render_card(folder, "a/b", base_model="org/base", license="other").data.to_dict()
    assert over["base_model"] == "org/base" and over["license"] == "other"
    # nothing known about the base: no license field, and the card says so
    (folder / "config.json").write_text(json.dumps({"model_type": "dsg", "guardrails": [guard]}))
    card = render_card(folder)
    assert "license" not in card.data.to_dict() and "base_model" not in card.data.to_dict()
    assert "License: not known" in card.text and "a base model that was not recorded" in card.text
    # the embedded default's GGUF: Hub id from its name
    (folder / "dsg_build.json").write_text(
        json.dumps({"base_model": str(tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf")})
    )
    (tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"not really a gguf")
    data = render_card(folder).data.to_dict()
    assert data["base_model"] == BASE_ID and data["license"] == "apache-2.0"


def test_card_bad_inputs(tmp_path, tiny_folder):
    with pytest.raises(DSGError, match="does not exist"):
        render_card(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(DSGError, match="is not a folder"):
        render_card(tmp_path / "file")
    (tmp_path / "plain").mkdir()
    with pytest.raises(DSGError, match="has no config.json"):
        render_card(tmp_path / "plain")
    (tmp_path / "plain" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(DSGError, match="model_type 'llama', expected 'dsg'"):
        render_card(tmp_path / "plain")
    broken = Path(shutil.copytree(tiny_folder, tmp_path / "broken"))
    (broken / "features.json").write_text("{not json")
    with pytest.raises(DSGError, match="cannot read feature file"):
        render_card(broken)


# ----------------------------------------------------------------------------------------- staging
def expected_files(folder: Path) -> set[str]:
    """What save_pretrained + tokenizer.save_pretrained + dsg build wrote, the card, and the eval folder."""
    written = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    return written | {"README.md"}


def test_dry_run_stages_exact_files_and_verifies(tiny_folder, tmp_path, capsys):
    source = Path(shutil.copytree(tiny_folder, tmp_path / "src"))
    (source / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    expected = expected_files(source)
    # things that must not travel: an old README, notes, caches, hidden files, a stray script
    (source / "README.md").write_text("old readme")
    (source / "notes.txt").write_text("private notes")
    (source / "__pycache__").mkdir()
    (source / "__pycache__" / "modeling_dsg.cpython-311.pyc").write_bytes(b"x")
    (source / ".DS_Store").write_bytes(b"x")
    (source / "scratch.py").write_text("print('not imported by the model code')")
    staging = tmp_path / "staging"
    code = cli.main(["publish", str(source), "--repo-id", REPO, "--dry-run", str(staging)])
    assert code == 0
    staged = {p.relative_to(staging).as_posix(): p.stat().st_size for p in staging.rglob("*") if p.is_file()}
    assert set(staged) == expected
    assert {
        "config.json",
        "model.safetensors",
        "configuration_dsg.py",
        "modeling_dsg.py",
        "sae_dsg.py",
        "tokenizer.json",
        "features.json",
        "dsg_build.json",
        "eval/report.json",
        "eval/rho_hist.png",
    } <= set(staged)
    for rel in expected - {"README.md"}:
        assert (staging / rel).read_bytes() == (source / rel).read_bytes(), rel
    card = ModelCard.load(staging / "README.md")
    assert card.data.base_model == BASE_ID and len(card.data.eval_results) == 2
    out = capsys.readouterr().out
    assert "verified: DSGForCausalLM loads with trust_remote_code" in out and "nothing uploaded" in out
    listing = out.splitlines()
    for rel, size in staged.items():
        assert any(line.endswith(f"  {rel}") and pub.human_size(size) in line for line in listing), rel
    assert f"{pub.human_size(sum(staged.values()))}  total, {len(staged)} files" in out
    assert not list(tmp_path.glob(".staging.tmp-*"))
    # the card's usage snippets run as written against the staged folder, in a process without this package
    text = (staging / "README.md").read_text()
    snippets = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(snippets) == 2 and "apply_chat_template" in snippets[0]
    code = "\n".join(snippets).replace(REPO, str(staging)).replace("max_new_tokens=40", "max_new_tokens=3")
    code += "\nimport sys\nassert 'modeling_dsg' not in sys.modules, 'the project package was imported'\n"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Rainbows form when" in proc.stdout


def test_verify_reports_the_subprocess_error(folder_copy, tmp_path):
    with open(folder_copy / "sae_dsg.py", "a") as f:
        f.write("\nraise ImportError('sae code broken on purpose')\n")
    staging = tmp_path / "staging"
    t0 = time.perf_counter()
    with pytest.raises(
        DSGError, match="does not load with trust_remote_code: ImportError: sae code broken on purpose"
    ):
        pub.publish(folder_copy, REPO, dry_run=staging, allow_custom_code=True)  # changed code is refused otherwise
    assert not staging.exists()  # never a half-written staging folder
    assert time.perf_counter() - t0 < 120


def test_verify_timeout(tiny_folder, tmp_path):
    with pytest.raises(DSGError, match="did not finish within 0.01 s"):
        pub.publish(tiny_folder, REPO, dry_run=tmp_path / "s", verify_timeout=0.01)
    assert not (tmp_path / "s").exists()


def test_dry_run_staging_rules(tiny_folder, tmp_path, monkeypatch):
    calls = stub_verify(monkeypatch)
    staging = tmp_path / "staging"
    staging.mkdir()  # an existing empty folder is fine
    result = pub.publish(tiny_folder, REPO, dry_run=staging)
    assert result["dry_run"] and result["files"]["README.md"] == (staging / "README.md").stat().st_size
    assert calls and calls[0] == sorted(result["files"])  # verification saw exactly the staged files
    with pytest.raises(DSGError, match="already exists and is not empty"):
        pub.publish(tiny_folder, REPO, dry_run=staging)
    (staging / "leftover.txt").write_text("old")
    pub.publish(tiny_folder, REPO, dry_run=staging, overwrite=True)
    assert not (staging / "leftover.txt").exists()
    with pytest.raises(DSGError, match="must be outside the model folder"):
        pub.publish(tiny_folder, REPO, dry_run=tiny_folder / "stage")


def test_sharded_weights_are_staged_with_their_index(tmp_path, monkeypatch):
    stub_verify(monkeypatch)
    folder = make_tiny_dsg(tmp_path / "sharded", max_shard_size="100KB")
    shards = sorted(p.name for p in folder.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 2
    result = pub.publish(folder, REPO, dry_run=tmp_path / "staging")
    assert {"model.safetensors.index.json", *shards} <= set(result["files"])
    (folder / shards[-1]).unlink()
    with pytest.raises(DSGError, match=f"missing the weight shard {shards[-1]}"):
        pub.publish(folder, REPO, dry_run=tmp_path / "staging2")


@pytest.mark.parametrize(
    "break_it, message",
    [
        (lambda d: (d / "model.safetensors").unlink(), "has no weights"),
        (lambda d: [(d / f).unlink() for f in ("tokenizer.json", "tokenizer_config.json")], "has no tokenizer files"),
        (
            lambda d: (d / "guard_dsg.py").unlink() if (d / "guard_dsg.py").exists() else (d / "sae_dsg.py").unlink(),
            r"is missing \w+\.py, imported by the model code",
        ),
        (lambda d: (d / "modeling_dsg.py").unlink(), "missing modeling_dsg.py, which config.json's auto_map names"),
    ],
)
def test_incomplete_folders(folder_copy, tmp_path, break_it, message):
    break_it(folder_copy)
    with pytest.raises(DSGError, match=message):
        pub.publish(folder_copy, REPO, dry_run=tmp_path / "staging")
    assert not (tmp_path / "staging").exists()


@pytest.mark.parametrize(
    "repo_id",
    ["no-owner", "a/b/c", "a/b--c", "a/b..c", "/name", "owner/", "own er/x", "a/b.git", "a/" + "x" * 100, None],
)
def test_bad_repo_ids(tiny_folder, tmp_path, repo_id):
    with pytest.raises(DSGError, match="bad repo id"):
        pub.publish(tiny_folder, repo_id, dry_run=tmp_path / "s")


def test_bad_folders_and_options(tmp_path, tiny_folder):
    with pytest.raises(DSGError, match="does not exist"):
        pub.publish(tmp_path / "missing", REPO, dry_run=tmp_path / "s")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(DSGError, match="not a DSG model folder"):
        pub.publish(tmp_path / "plain", REPO, dry_run=tmp_path / "s")
    with pytest.raises(DSGError, match="bad revision"):
        pub.publish(tiny_folder, REPO, revision="my branch", dry_run=tmp_path / "s")
    with pytest.raises(DSGError, match="evaluation folder .* does not exist"):
        pub.publish(tiny_folder, REPO, eval_dir=tmp_path / "nope", dry_run=tmp_path / "s")
    assert not (tmp_path / "s").exists()


# ------------------------------------------------------------------------------------------- upload
@pytest.fixture
def listening_port():
    """A local TCP port that accepts connections (stands in for a reachable Hub endpoint)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    yield server.getsockname()[1]
    server.close()


@pytest.fixture
def online(monkeypatch):
    """Undo the suite's HF_HUB_OFFLINE=1 (conftest), also in huggingface_hub's constants read at import."""
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


class Recorder:
    """Stands in for the HfApi methods publish may call; records every call in order."""

    def __init__(self, api: HfApi, *, exists=False, fail_commit=False, who=None):
        self.calls, self.exists, self.fail_commit = [], exists, fail_commit
        self.who = who or {"name": "someone", "orgs": [{"name": "team"}], "auth": {"accessToken": {"role": "write"}}}
        self.committed = {}
        for name in (
            "whoami",
            "repo_exists",
            "create_repo",
            "create_branch",
            "create_commit",
            "delete_repo",
            "upload_folder",
            "upload_file",
            "upload_large_folder",
        ):
            setattr(api, name, self._method(name))

    def _method(self, name):
        def method(*args, **kwargs):
            self.calls.append((name, args, kwargs))
            if name == "whoami":
                return self.who
            if name == "repo_exists":
                return self.exists
            if name == "create_commit":
                for op in args[1]:
                    assert isinstance(op, CommitOperationAdd)
                    self.committed[op.path_in_repo] = Path(op.path_or_fileobj).read_bytes()
                if self.fail_commit:
                    raise RuntimeError("connection reset during upload")
                return type("CommitInfo", (), {"commit_url": "https://hub.test/someone/tiny-dsg-topic/commit/abc"})()
            return None

        return method

    def names(self):
        return [c[0] for c in self.calls]


def test_upload_one_commit_with_every_staged_file(tiny_folder, tmp_path, listening_port, online):
    api = HfApi(endpoint=f"http://127.0.0.1:{listening_port}")
    rec = Recorder(api)
    result = pub.publish(tiny_folder, REPO, private=True, token="hf_test", api=api)
    assert rec.names() == ["whoami", "repo_exists", "create_repo", "create_commit"]
    _, args, kwargs = rec.calls[2]
    assert args == (REPO,) and kwargs["private"] is True and kwargs["exist_ok"] is True
    assert kwargs["repo_type"] == "model" and kwargs["token"] == "hf_test"
    _, args, kwargs = rec.calls[3]
    assert args[0] == REPO and kwargs["revision"] is None and kwargs["token"] == "hf_test"
    assert set(rec.committed) == set(result["files"]) == expected_files(tiny_folder)
    for rel, content in rec.committed.items():
        assert len(content) == result["files"][rel]
        if rel != "README.md":
            assert content == (tiny_folder / rel).read_bytes()
    assert ModelCard(rec.committed["README.md"].decode()).data.base_model == BASE_ID
    assert result["created_repo"] and result["commit_url"].endswith("/commit/abc")
    assert result["verified"]["module"].startswith("transformers_modules")
    assert not list(tiny_folder.parent.glob(".tiny-dsg.publish-*"))  # the temporary staging is gone


def test_upload_public_to_a_branch_and_cleanup_on_failure(tiny_folder, listening_port, online, monkeypatch, capsys):
    stub_verify(monkeypatch)
    api = HfApi(endpoint=f"http://127.0.0.1:{listening_port}")
    rec = Recorder(api, exists=True)
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    result = pub.publish(tiny_folder, "team/tiny-dsg", revision="v1", api=api)
    assert rec.names() == ["whoami", "repo_exists", "create_repo", "create_branch", "create_commit"]
    assert rec.calls[2][2]["private"] is False and rec.calls[2][2]["token"] == "hf_from_env"
    assert rec.calls[3][2]["branch"] == "v1" and rec.calls[4][2]["revision"] == "v1"
    assert not result["created_repo"]
    # a failed commit to a repo that did not exist before: the empty repo is deleted again
    rec = Recorder(api, exists=False, fail_commit=True)
    with pytest.raises(
        DSGError,
        match="upload to someone/x failed: connection reset during upload "
        r"\(the repo it had just created was deleted again\)",
    ):
        pub.publish(tiny_folder, "someone/x", api=api)
    assert rec.names() == ["whoami", "repo_exists", "create_repo", "create_commit", "delete_repo"]
    # ... but an existing repo is never deleted
    rec = Recorder(api, exists=True, fail_commit=True)
    with pytest.raises(DSGError, match="upload to someone/x failed"):
        pub.publish(tiny_folder, "someone/x", api=api)
    assert "delete_repo" not in rec.names()


@pytest.mark.parametrize(
    "who, message",
    [
        ({"name": "someone", "orgs": [], "auth": {"accessToken": {"role": "read"}}}, "read-only"),
        (
            {"name": "other", "orgs": [{"name": "club"}], "auth": {"accessToken": {"role": "write"}}},
            "belongs to 'other', who cannot create repos under 'someone'",
        ),
    ],
)
def test_token_that_cannot_write_fails_before_anything_is_created(tiny_folder, listening_port, online, who, message):
    api = HfApi(endpoint=f"http://127.0.0.1:{listening_port}")
    rec = Recorder(api, who=who)
    with pytest.raises(DSGError, match=message):
        pub.publish(tiny_folder, REPO, token="hf_x", api=api)
    assert rec.names() == ["whoami"]


def test_rejected_token(tiny_folder, listening_port, online):
    api = HfApi(endpoint=f"http://127.0.0.1:{listening_port}")
    rec = Recorder(api)
    url = f"http://127.0.0.1:{listening_port}/api/whoami-v2"

    def unauthorized(*args, **kwargs):
        rec.calls.append(("whoami", args, kwargs))
        raise HfHubHTTPError("401 Unauthorized", response=httpx2.Response(401, request=httpx2.Request("GET", url)))

    api.whoami = unauthorized
    with pytest.raises(DSGError, match=r"rejected the token \(HTTP 401\)"):
        pub.publish(tiny_folder, REPO, token="hf_bad", api=api)
    assert rec.names() == ["whoami"]


# ------------------------------------------------------------------------------------- no Hub, fast
def forbid_repo_creation(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("create_repo must not be reached")

    monkeypatch.setattr(HfApi, "create_repo", refuse)


@pytest.mark.parametrize("endpoint", ["http://127.0.0.1:9", "https://hub.dsg-test.invalid"])
def test_no_network_fails_fast(tiny_folder, online, monkeypatch, endpoint):
    forbid_repo_creation(monkeypatch)
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    t0 = time.perf_counter()
    with pytest.raises(DSGError, match="cannot reach the Hugging Face Hub at " + endpoint.replace(".", r"\.")):
        pub.publish(tiny_folder, REPO, token="hf_fake")
    assert time.perf_counter() - t0 < 5


def test_no_network_cli_one_line(tiny_folder, online, monkeypatch, capsys):
    forbid_repo_creation(monkeypatch)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    t0 = time.perf_counter()
    assert cli.main(["publish", str(tiny_folder), "--repo-id", REPO, "--private", "--token", "hf_fake"]) == 2
    assert time.perf_counter() - t0 < 5
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dsg: error: cannot reach the Hugging Face Hub at http://127.0.0.1:9")


def test_silent_hub_times_out(tiny_folder, online, monkeypatch, listening_port):
    """The endpoint accepts the connection but never answers: a DSGError after WHOAMI_TIMEOUT_S, not a hang."""
    forbid_repo_creation(monkeypatch)
    monkeypatch.setattr(pub, "WHOAMI_TIMEOUT_S", 1.0)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{listening_port}")
    t0 = time.perf_counter()
    with pytest.raises(DSGError, match="did not answer within 1 s; nothing was uploaded"):
        pub.publish(tiny_folder, REPO, token="hf_fake")
    assert time.perf_counter() - t0 < 5


def test_no_token_fails_fast(tiny_folder, online, monkeypatch, tmp_path):
    import huggingface_hub.constants

    forbid_repo_creation(monkeypatch)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    t0 = time.perf_counter()
    with pytest.raises(DSGError, match="no Hugging Face token: pass --token, set HF_TOKEN, or log in"):
        pub.publish(tiny_folder, REPO)
    assert time.perf_counter() - t0 < 1


def test_offline_mode_is_named(tiny_folder, monkeypatch):
    forbid_repo_creation(monkeypatch)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DSGError, match="HF_HUB_OFFLINE is set"):
        pub.publish(tiny_folder, REPO, token="hf_fake")


def test_human_sizes():
    assert [pub.human_size(n) for n in (0, 1023, 1024, 1536, 5 * 1024**2, 3 * 1024**3)] == [
        "0 B",
        "1023 B",
        "1.0 KB",
        "1.5 KB",
        "5.0 MB",
        "3.0 GB",
    ]
