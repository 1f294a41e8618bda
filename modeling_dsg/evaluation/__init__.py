"""Scoring (`scoring`, `metrics`), the `dsg eval` report (`report`, `markdown`, `plots`), fluency of fired
answers (`fluency`), every action and clamp of a guardrail side by side (`actions`), the dilution attack
(`dilution`) and the `dsg eval` command (`evaluate`). Imports runtime, data and analysis."""
