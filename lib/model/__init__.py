"""The model and its inputs: loading (eval mode, frozen, float64 end to end), precision, the text and its
samples, fingerprints and load checks. No Hessian knowledge."""
