"""Dynamic SAE Guardrails (DSG) for Hugging Face causal language models.

`DSGConfig` and `DSGForCausalLM` are registered with the Auto classes when first used, so a saved
folder carries its code (`auto_map`) and loads anywhere with
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`.
The classes are imported lazily: `import modeling_dsg` (and `dsg --help`) stays quick.

The package, one folder per concern (README "Project layout" gives what each may import):
`runtime/` the code that travels to the Hub; `data/` models, SAEs, texts, MCQ sets and token rows;
`analysis/` the statistics pass, feature selection, decisions and `dsg explain`; `pipelines/` build,
sweep, RMU and SAE training; `evaluation/` scoring, metrics, reports and plots; `publishing/` model
cards and `dsg publish`; `embedded/` this project's own default (SmolLM2-135M, biology): its data
splits, `dsg demo` and `dsg results`. `cli.py` (also `python -m modeling_dsg`), `serve.py`, `paths.py`,
`outputs.py`, `errors.py` and `distributed.py` (several processes for `dsg build` and `dsg eval`) sit at the
top.

Modules that moved into these folders keep their old import paths (`modeling_dsg.build`,
`modeling_dsg.cards`, ...), with a `DeprecationWarning` that names the new one.
"""

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

__version__ = "0.1.0"
__all__ = ["DSGConfig", "DSGForCausalLM", "decoder_layers"]

# old module name -> where it lives now (for `import modeling_dsg.<old>` and `from modeling_dsg.<old> import x`)
MOVED_MODULES = {
    "configuration_dsg": "runtime.configuration_dsg",
    "modeling_dsg": "runtime.modeling_dsg",
    "guard_dsg": "runtime.guard_dsg",
    "sae_dsg": "runtime.sae_dsg",
    "sources": "data.sources",
    "rows": "data.rows",
    "stats": "analysis.stats",
    "selection": "analysis.selection",
    "decisions": "analysis.decisions",
    "explain": "analysis.explain",
    "build": "pipelines.build",
    "sweep": "pipelines.sweep",
    "rmu": "pipelines.rmu",
    "train_sae": "pipelines.train_sae",
    "report_schema": "evaluation.report",
    "metrics": "evaluation.metrics",
    "plots": "evaluation.plots",
    "fluency": "evaluation.fluency",
    "eval_dilution": "evaluation.dilution",
    "cards": "publishing.cards",
    "publish": "publishing.publish",
    "demo": "embedded.demo",
    "results": "embedded.results",
}


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves an old module path to the module object at its new path (one object, two names)."""

    def find_spec(self, fullname, path=None, target=None):
        package, _, name = fullname.rpartition(".")
        if package == __name__ and name in MOVED_MODULES:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        new = f"{__name__}.{MOVED_MODULES[spec.name.rpartition('.')[2]]}"
        warnings.warn(f"{spec.name} moved to {new}; import it from there", DeprecationWarning, stacklevel=2)
        module = importlib.import_module(new)
        spec.loader_state = module.__spec__  # the import system sets __spec__ to the old name's: put it back after
        return module

    def exec_module(self, module):
        module.__spec__ = module.__spec__.loader_state  # already executed at its new path; keep its own spec


if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
    sys.meta_path.append(_MovedModuleFinder())


def _load():
    from transformers import AutoConfig, AutoModelForCausalLM

    from .runtime.configuration_dsg import DSGConfig
    from .runtime.modeling_dsg import DSGForCausalLM, decoder_layers

    AutoConfig.register("dsg", DSGConfig, exist_ok=True)
    AutoModelForCausalLM.register(DSGConfig, DSGForCausalLM, exist_ok=True)
    return {"DSGConfig": DSGConfig, "DSGForCausalLM": DSGForCausalLM, "decoder_layers": decoder_layers}


def __getattr__(name):
    if name in __all__:
        exported = _load()
        globals().update(exported)
        return exported[name]
    raise AttributeError(f"module 'modeling_dsg' has no attribute {name!r}")
