"""Dynamic SAE Guardrails (DSG) for Hugging Face causal language models.

`DSGConfig` and `DSGForCausalLM` are registered with the Auto classes, so a saved folder carries its
code (`auto_map`) and loads anywhere with `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from .configuration_dsg import DSGConfig
from .modeling_dsg import DSGForCausalLM, decoder_layers

DSGConfig.register_for_auto_class()
DSGForCausalLM.register_for_auto_class("AutoModelForCausalLM")
AutoConfig.register("dsg", DSGConfig, exist_ok=True)
AutoModelForCausalLM.register(DSGConfig, DSGForCausalLM, exist_ok=True)

__all__ = ["DSGConfig", "DSGForCausalLM", "decoder_layers"]
__version__ = "0.1.0"
