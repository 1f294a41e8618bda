"""What the guard sees: the forward to block L (`forward`), the statistics pass (`stats`), feature selection and
calibration (`selection`), decisions through the model (`decisions`) and `dsg explain`. Imports runtime and data."""
