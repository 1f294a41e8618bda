"""Scoring (`scoring`, `metrics`), the `dsg eval` report (`report`, `markdown`, `plots`), fluency of fired
answers (`fluency`), the dilution attack (`dilution`) and the `dsg eval` command (`evaluate`).
Imports runtime, data and analysis."""
