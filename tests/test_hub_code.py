"""The files that travel to the Hub: torch and transformers only, flat sibling imports, nothing risky."""

import ast
from pathlib import Path

import pytest
import tiny

PACKAGE = Path(__file__).parent.parent / "modeling_dsg" / "runtime"  # the Hub runtime: every file in it travels
HUB_FILES = sorted(p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
ALLOWED_MODULES = {
    "torch",
    "transformers",
    "__future__",
    "contextlib",
    "contextvars",
    "copy",
    "math",
    "dataclasses",
    "typing",
    "inspect",
}  # inspect: reading the base forward signature
FORBIDDEN_MODULES = {
    "socket",
    "urllib",
    "http",
    "requests",
    "httpx",
    "aiohttp",
    "subprocess",
    "pickle",
    "dill",
    "cloudpickle",
    "marshal",
    "shelve",
    "huggingface_hub",
    "os",
    "sys",
    "importlib",
    "ctypes",
}
FORBIDDEN_CALLS = {"eval", "exec", "compile", "__import__", "open", "getattr_static"}
FORBIDDEN_ATTRIBUTES = {"load", "hf_hub_download", "system", "popen", "urlopen"}


def test_the_runtime_folder_holds_the_four_hub_files():
    assert HUB_FILES == ["configuration_dsg.py", "guard_dsg.py", "modeling_dsg.py", "sae_dsg.py"]


def parse(name):
    return ast.parse((PACKAGE / name).read_text(), filename=name)


@pytest.mark.parametrize("name", HUB_FILES)
def test_imports_only_torch_transformers_and_siblings(name):
    for node in ast.walk(parse(name)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                root = alias.name.split(".")[0]
                assert root in ALLOWED_MODULES and root not in FORBIDDEN_MODULES, f"{name}: import {alias.name}"
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                assert node.level == 1 and node.module and "." not in node.module, (
                    f"{name}: relative import must be flat"
                )
                assert f"{node.module}.py" in HUB_FILES, f"{name}: imports {node.module}, which does not travel"
            else:
                root = node.module.split(".")[0]
                assert root in ALLOWED_MODULES and root not in FORBIDDEN_MODULES, f"{name}: from {node.module}"


@pytest.mark.parametrize("name", HUB_FILES)
def test_no_eval_exec_pickle_or_io(name):
    for node in ast.walk(parse(name)):
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name):
                assert func.id not in FORBIDDEN_CALLS, f"{name}: calls {func.id}()"
            elif isinstance(func, ast.Attribute):
                assert func.attr not in FORBIDDEN_ATTRIBUTES, f"{name}: calls .{func.attr}()"


def test_checker_catches_what_it_forbids(tmp_path, monkeypatch):
    """The checks above would fail on a file that breaks the rules."""
    bad = tmp_path / "modeling_dsg.py"
    bad.write_text("import subprocess\nfrom ..pkg import x\nexec('1')\ntorch.load('f')\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", tmp_path)
    with pytest.raises(AssertionError):
        test_imports_only_torch_transformers_and_siblings("modeling_dsg.py")
    with pytest.raises(AssertionError):
        test_no_eval_exec_pickle_or_io("modeling_dsg.py")


def test_saved_folder_carries_exactly_the_hub_files(tmp_path):
    folder = tiny.save_tiny_dsg(tmp_path / "m")
    assert sorted(p.name for p in folder.glob("*.py")) == sorted(HUB_FILES)
    for name in HUB_FILES:
        assert (folder / name).read_text() == (PACKAGE / name).read_text()
