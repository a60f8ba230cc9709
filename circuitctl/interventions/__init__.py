"""Editing with circuits: ablate what a circuit found and measure what changes, on the task and off it.

* `spec`: the ``--ablate`` grammar (a run's circuit, its top units, a group, or unit names);
* `units`: a parsed spec resolved to a circuit space and the units it names;
* `spurious`: SHIFT-style ranking of a run's units by their effect on an unwanted answer set;
* `measure`: metric, accuracy and f before and after, per task, through the one evaluator;
* `text`: the model's next-token loss on a text or token file, with the edit;
* `weights`: edits baked into a checkpoint (zero / position-independent mean ablation of heads,
  MLPs and neurons);
* `report`: intervention.json, intervention.md, intervention.png;
* `run`: the ``circuitctl intervene`` pipeline.
"""
