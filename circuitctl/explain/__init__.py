"""Explaining a discovered circuit: what each node does, which heads do the same job, and what
the weights say (`circuitctl explain RUN_DIR`).

Modules: `load` (reading a run directory), `probes` (token sets the roles are measured on),
`capture` (the forward passes), `attention` (attention summaries), `roles` (role scores, pure),
`ov` (OV circuits through the unembedding), `dla` (direct logit attribution), `composition`
(Q/K/V composition scores), `groups` (heads doing the same job), `report` (explanation.json /
.md), `drawing` (labelled and grouped drawings), `pipeline` (`explain_run`).

Nothing here is imported by `circuitctl --help`; import `circuitctl.explain.pipeline` for
`explain_run` (it imports torch).
"""
