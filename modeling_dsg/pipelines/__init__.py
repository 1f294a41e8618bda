"""The long jobs: `dsg build`, `dsg sweep`, `dsg rmu` and `dsg train-sae`, and the dilution attack from stored
activations (`attack`). Imports runtime, data, analysis and evaluation."""
