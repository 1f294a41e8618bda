"""The long jobs: `dsg build`, `dsg sweep`, `dsg rmu` and `dsg train-sae`. Imports runtime, data, analysis
and evaluation."""
