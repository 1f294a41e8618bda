"""The package's shape: what each folder may import, and no module reaching into another's private names.

The rules are those of the README's "Project layout": the runtime is a leaf (tests/test_hub_code.py
audits it further); data and analysis sit on it; evaluation and pipelines on those; publishing on all of
them; the embedded default and the command line on top. Code specific to this repository's default
(`embedded/`) is imported by nothing below it.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "modeling_dsg"
# the top-level helpers every layer may use
CORE = {"errors", "paths", "outputs", "options", "distributed", "__init__"}
MAY_IMPORT = {
    "runtime": set(),
    "data": {"runtime"},
    "analysis": {"runtime", "data"},
    "evaluation": {"runtime", "data", "analysis"},
    "pipelines": {"runtime", "data", "analysis", "evaluation"},
    "publishing": {"runtime", "data", "analysis", "evaluation"},
    "serve": {"runtime", "data"},
    "embedded": {"runtime", "data", "analysis", "evaluation", "pipelines", "publishing"},
    "cli": {"data"},  # commands are imported by module name, through importlib
}
# (module, imported group): the documented exceptions, each with its reason
EXCEPTIONS = {
    # `dsg train-sae --text embedded:sae` reads the embedded default's SAE training text
    ("pipelines/train_sae.py", "embedded"),
}


def modules():
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def imports(path: Path):
    """(line, imported module as a dotted path under modeling_dsg, imported names) for each package import."""
    rel = path.relative_to(PACKAGE)
    package = ["modeling_dsg", *rel.parts[:-1]]
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").split(".")[0] == "modeling_dsg":
                module = node.module
            else:
                continue
            yield node.lineno, module, [alias.name for alias in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "modeling_dsg":
                    yield node.lineno, alias.name, []


def group_of(dotted: str) -> str:
    parts = dotted.split(".")[1:]
    return parts[0] if parts else "__init__"


def violations(path: Path) -> list[str]:
    rel = path.relative_to(PACKAGE)
    group = rel.parts[0] if len(rel.parts) > 1 else rel.stem
    found = []
    for line, module, names in imports(path):
        if group_of(module) != "__init__":
            targets = [group_of(module)]
        else:  # `from modeling_dsg import x`: a folder or module of the package, or one of its lazy exports
            targets = [n if (PACKAGE / n).is_dir() or (PACKAGE / f"{n}.py").is_file() else "__init__" for n in names]
        for target in targets:
            allowed = target == group or target in CORE or target in MAY_IMPORT.get(group, set())
            if not allowed and (rel.as_posix(), target) not in EXCEPTIONS and group in MAY_IMPORT:
                found.append(f"{rel}:{line} ({group}) imports {module} ({target})")
        private = [n for n in names if n.startswith("_") and not n.startswith("__")]
        if private and module != "modeling_dsg." + ".".join(rel.with_suffix("").parts):
            found.append(f"{rel}:{line} imports private {', '.join(private)} from {module}")
    return found


def private_attributes(path: Path) -> list[str]:
    """`name._private` where `name` was imported from this package (a module, a class, ...)."""
    tree = ast.parse(path.read_text())
    aliases = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("modeling_dsg")):
            aliases |= {a.asname or a.name for a in node.names}
        elif isinstance(node, ast.Import):
            aliases |= {a.asname for a in node.names if a.asname and a.name.startswith("modeling_dsg")}
    rel = path.relative_to(PACKAGE)
    return [
        f"{rel}:{node.lineno} uses {node.value.id}.{node.attr}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id in aliases
        and node.attr.startswith("_")
        and not node.attr.startswith("__")
    ]


@pytest.mark.parametrize("path", modules(), ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_each_module_imports_only_what_its_layer_may(path):
    assert violations(path) == []


@pytest.mark.parametrize("path", modules(), ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_no_module_uses_another_modules_private_names(path):
    assert private_attributes(path) == []


def test_every_folder_has_a_rule():
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert folders <= set(MAY_IMPORT), folders - set(MAY_IMPORT)


def test_the_checks_catch_what_they_forbid(tmp_path, monkeypatch):
    fake = tmp_path / "modeling_dsg"
    (fake / "data").mkdir(parents=True)
    bad = fake / "data" / "bad.py"
    bad.write_text("from ..pipelines.build import _texts\nfrom ..evaluation import scoring as sc\nsc._pad_id(1)\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    found = violations(bad)
    assert any("imports modeling_dsg.pipelines.build (pipelines)" in v for v in found)
    assert any("imports private _texts" in v for v in found)
    assert private_attributes(bad) == ["data/bad.py:3 uses sc._pad_id"]


def test_old_module_paths_still_import_with_a_deprecation_warning():
    """Every module that moved keeps its old path: the same module object, and a DeprecationWarning naming the
    new one."""
    import importlib
    import subprocess
    import sys

    import modeling_dsg

    for new in modeling_dsg.MOVED_MODULES.values():
        assert (PACKAGE / (new.replace(".", "/") + ".py")).is_file(), new
    code = (
        "import warnings, importlib, modeling_dsg\n"
        "for old, new in modeling_dsg.MOVED_MODULES.items():\n"
        "    with warnings.catch_warnings(record=True) as caught:\n"
        "        warnings.simplefilter('always')\n"
        "        module = importlib.import_module('modeling_dsg.' + old)\n"
        "    assert module is importlib.import_module('modeling_dsg.' + new), old\n"
        "    assert module.__spec__.name == 'modeling_dsg.' + new, module.__spec__.name\n"
        "    assert [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)] == [\n"
        "        f'modeling_dsg.{old} moved to modeling_dsg.{new}; import it from there'], old\n"
        "from modeling_dsg.build import BuildOptions, build\n"
        "from modeling_dsg.cards import render_card\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
    assert importlib.import_module("modeling_dsg.pipelines.build").__spec__.name == "modeling_dsg.pipelines.build"


def test_the_command_line_starts_without_the_model_code():
    """`dsg --help` builds every command's parser; it must not import the model code or the SAE trainer
    (the heavy imports stay inside the functions that run a command)."""
    import subprocess
    import sys

    code = (
        "import sys, modeling_dsg.cli as c\n"
        "c.build_parser()\n"
        "heavy = ['modeling_dsg.runtime.modeling_dsg', 'sae_lens', 'datasets', 'matplotlib',\n"
        "         'transformers.modeling_utils']\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"
