"""The Hub runtime: the code that travels with every DSG model folder.

`configuration_dsg.py`, `modeling_dsg.py`, `guard_dsg.py` and `sae_dsg.py` are copied, flat, next to the
weights; `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` runs them. They import only
torch, transformers, a few standard modules and each other (flat relative imports), which
tests/test_hub_code.py checks for every file in this folder. This `__init__.py` does not travel.
"""
