"""The tokenizer in a saved DSG folder is an ordinary one (issue 10, item 6).

`build.write_folder` (used by `dsg build`, `dsg demo` and the sweep) saves the tokenizer through
`build.save_tokenizer`: tokenizer_config.json names a concrete `tokenizer_class`, carries none of the
loading artefacts transformers records (`is_local`, `local_files_only`, ...), and its
`model_max_length` is the base model's `max_position_embeddings`, not the "no limit" 1e30.

Loading is checked in fresh interpreters that never import modeling_dsg, with stdin closed (an
interactive "[y/N]" prompt would read EOF) and transformers' warnings on: nothing may be printed.

transformers 5.24's `AutoTokenizer.from_pretrained(DIR)` loads DIR/config.json through `AutoConfig`
*before* it reads tokenizer_config.json, so on a DSG folder (whose config.json names its code in
`auto_map`) it asks about remote code whatever the tokenizer files say: that case is an expected
failure, detected from transformers' own source, and turns into a failure (strict) once it passes.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tiny
from transformers import AutoTokenizer

from modeling_dsg import DSGConfig
from modeling_dsg.pipelines.build import TOKENIZER_LOAD_KEYS, context_length, save_tokenizer, write_folder

LOAD = r"""
import json, sys
from transformers import AutoTokenizer
kwargs = json.loads(sys.argv[2])
tok = AutoTokenizer.from_pretrained(sys.argv[1], **kwargs)
print(json.dumps({"class": type(tok).__name__, "model_max_length": tok.model_max_length,
                  "ids": tok("the zoo keeper, 42!")["input_ids"], "imported": "modeling_dsg" in sys.modules}))
"""
PROMPT_MARKS = ("[y/N]", "custom code", "trust_remote_code")


def _reads_config_first() -> bool:
    """Whether this transformers' AutoTokenizer loads config.json (AutoConfig) before tokenizer_config.json."""
    src = inspect.getsource(AutoTokenizer.from_pretrained)
    config_at, tokenizer_config_at = src.find("AutoConfig.from_pretrained("), src.find("get_tokenizer_config(")
    return -1 < config_at < tokenizer_config_at


def load_in_fresh_python(folder: Path, cwd: Path, **kwargs) -> tuple[dict | None, str, str]:
    """AutoTokenizer.from_pretrained(folder, **kwargs) in a new interpreter: (result or None, stdout, stderr)."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": "",
        "TRANSFORMERS_VERBOSITY": "warning",
        "HF_MODULES_CACHE": str(cwd / "modules"),
        "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    }
    proc = subprocess.run(
        [sys.executable, "-W", "default", "-c", LOAD, str(folder), json.dumps(kwargs)],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = proc.stdout.strip().splitlines()
    result = json.loads(lines[-1]) if proc.returncode == 0 and lines and lines[-1].startswith("{") else None
    return result, proc.stdout, proc.stderr


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(DSG folder, folder with only its tokenizer files, the tokenizer it was saved from).

    The tokenizer is loaded from disk with local_files_only=True, as the GGUF cache and offline runs
    load it, so that transformers records is_local/local_files_only in it (checked below)."""
    root = tmp_path_factory.mktemp("tok")
    tiny.tiny_tokenizer().save_pretrained(root / "plain")
    tokenizer = AutoTokenizer.from_pretrained(root / "plain", local_files_only=True)
    model, _ = tiny.tiny_dsg()
    folder = root / "dsg"
    folder.mkdir()
    write_folder(model, tokenizer, folder, [], "tiny")
    # the files the tokenizer writes, copied alone: the tokenizer without the model's config.json
    names = [Path(p).name for p in tokenizer.save_pretrained(root / "names")]
    alone = root / "alone"
    alone.mkdir()
    for name in names:
        if (folder / name).is_file():
            shutil.copy(folder / name, alone / name)
    return folder, alone, tokenizer


def test_the_source_tokenizer_carries_loading_artefacts(saved, tmp_path):
    """The premise: saved as transformers saves it, the tokenizer config has the artefacts and 1e30."""
    _, _, tokenizer = saved
    tokenizer.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert cfg.get("is_local") is True and cfg.get("local_files_only") is True
    assert cfg["model_max_length"] > 1e29


def test_tokenizer_config_is_clean(saved):
    folder, _, tokenizer = saved
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == type(tokenizer).__name__ == "TokenizersBackend"
    assert not set(TOKENIZER_LOAD_KEYS) & set(cfg), sorted(set(TOKENIZER_LOAD_KEYS) & set(cfg))
    assert "auto_map" not in cfg
    max_pos = json.loads((folder / "config.json").read_text())["text_config"]["max_position_embeddings"]
    assert cfg["model_max_length"] == max_pos == 256
    # the tokenizer object itself is left as it was
    assert tokenizer.model_max_length > 1e29 and tokenizer.init_kwargs.get("is_local") is True


def test_context_length_of_configs():
    assert context_length(None) is None
    for family in ("llama", "gpt2", "gemma2"):  # gpt2 calls it n_positions
        config = DSGConfig(text_config=tiny.FAMILIES[family]().to_dict(), guardrails=[])
        assert context_length(config) == 256
        assert context_length(config.get_text_config()) == 256


def test_a_shorter_tokenizer_limit_is_kept(tmp_path):
    tokenizer = tiny.tiny_tokenizer()
    tokenizer.model_max_length = 128
    config = DSGConfig(text_config=tiny.FAMILIES["llama"]().to_dict(), guardrails=[])
    assert save_tokenizer(tokenizer, tmp_path, config)["model_max_length"] == 128
    tokenizer.model_max_length = 4096
    assert save_tokenizer(tokenizer, tmp_path, config)["model_max_length"] == 256
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["model_max_length"] == 256


def test_tokenizer_files_load_as_an_ordinary_tokenizer(saved, tmp_path):
    """The tokenizer files alone: AutoTokenizer without trust_remote_code, no prompt, nothing on stderr."""
    _, alone, tokenizer = saved
    result, stdout, stderr = load_in_fresh_python(alone, tmp_path)
    assert result is not None, stdout + stderr
    assert not any(m in stdout + stderr for m in PROMPT_MARKS), stdout + stderr
    assert stderr.strip() == "", stderr
    assert result == {
        "class": "TokenizersBackend",
        "model_max_length": 256,
        "ids": tokenizer("the zoo keeper, 42!")["input_ids"],
        "imported": False,
    }


def test_dsg_folder_tokenizer_with_trust_remote_code(saved, tmp_path):
    """How the README and the model card load it: the same ordinary tokenizer class, nothing printed."""
    folder, _, tokenizer = saved
    result, stdout, stderr = load_in_fresh_python(folder, tmp_path, trust_remote_code=True)
    assert result is not None, stdout + stderr
    assert "[y/N]" not in stdout + stderr and stderr.strip() == "", stdout + stderr
    assert result == {
        "class": "TokenizersBackend",
        "model_max_length": 256,
        "ids": tokenizer("the zoo keeper, 42!")["input_ids"],
        "imported": False,
    }


@pytest.mark.xfail(
    _reads_config_first(),
    strict=True,
    reason="transformers' AutoTokenizer loads config.json (AutoConfig, which asks about the DSG "
    "config's remote code) before tokenizer_config.json; no tokenizer file can avoid it",
)
def test_dsg_folder_tokenizer_without_trust_remote_code(saved, tmp_path):
    folder, _, tokenizer = saved
    result, stdout, stderr = load_in_fresh_python(folder, tmp_path)
    assert not any(m in stdout + stderr for m in PROMPT_MARKS), stdout + stderr
    assert stderr.strip() == "", stderr
    assert result is not None and result["class"] == "TokenizersBackend" and result["model_max_length"] == 256
