"""Dynamic SAE Guardrails (DSG) for Hugging Face causal language models."""
