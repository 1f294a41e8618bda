"""This repository's own default, not a general-purpose API: SmolLM2-135M-Instruct with biology as the forget
topic. Its data splits (`data`), the shipped SAE (`sae/`), `dsg demo` and `dsg results` (this repository's
results page). Imports anything; nothing below it imports it."""
