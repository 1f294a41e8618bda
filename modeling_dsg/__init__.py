"""Dynamic SAE Guardrails (DSG) for Hugging Face causal language models.

`DSGConfig` and `DSGForCausalLM` are registered with the Auto classes when first used, so a saved
folder carries its code (`auto_map`) and loads anywhere with
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`.
The classes are imported lazily: `import modeling_dsg` (and `dsg --help`) stays quick.
"""

__version__ = "0.1.0"
__all__ = ["DSGConfig", "DSGForCausalLM", "decoder_layers"]


def _load():
    from transformers import AutoConfig, AutoModelForCausalLM

    from .configuration_dsg import DSGConfig
    from .modeling_dsg import DSGForCausalLM, decoder_layers

    AutoConfig.register("dsg", DSGConfig, exist_ok=True)
    AutoModelForCausalLM.register(DSGConfig, DSGForCausalLM, exist_ok=True)
    return {"DSGConfig": DSGConfig, "DSGForCausalLM": DSGForCausalLM, "decoder_layers": decoder_layers}


def __getattr__(name):
    if name in __all__:
        exported = _load()
        globals().update(exported)
        return exported[name]
    raise AttributeError(f"module 'modeling_dsg' has no attribute {name!r}")
