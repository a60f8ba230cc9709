"""Trust in a circuit: per-example faithfulness and confidence intervals (`per_example`),
stability of discovery under resampled examples (`stability`), and side-by-side comparison of
runs (`compare`). Library code: returns records, never prints."""
