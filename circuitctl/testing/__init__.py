"""Models and data with known answers: hand-planted circuits (ground truth for every method)
and the synthetic language the shipped toy GPT was trained on. Not needed to run circuitctl
on real models; the tests, the demos and `scripts/` use them."""
