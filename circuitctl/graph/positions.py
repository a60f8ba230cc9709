"""The one position layout of a task: which token of every prompt belongs to which position group.

Every position-aware method (per-token EAP-IG, path patching, SFC with ``aggregation: none``)
and every per-position circuit file names positions through this layout, so one task has one
set of position names whatever the method:

* a task with position labels (``positions: {S1: 3, S2: 9, end: 13}`` in its pairs): one group
  per label, ordered by mean position; ``end`` for the answer position (the prompt's last token,
  where the logits are read) unless a label already sits there in every prompt; ``other`` for
  the remaining real tokens, last;
* a task without labels and prompts of one token length: one group per token, ``t0``, ``t1``,
  ..., with the last one (the answer position) named ``end``.

Every group but ``other`` holds exactly one token per prompt ("single-token" groups: these are
the slots of path patching). ``end`` and ``other`` are reserved: a label may use ``end`` only for
the answer position, and never ``other``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from circuitctl.errors import UsageError
from circuitctl.graph import naming

END = "end"  # the answer position, where the logits are read
OTHER = "other"  # the unlabelled tokens of a labelled task


@dataclass(frozen=True)
class PositionLayout:
    """Position groups of a task: their names, which hold one token per prompt, and the answer's."""

    names: tuple[str, ...]
    labelled: bool  # task labels (+ end, other) or one group per token (t0 .. end)
    answer: int  # the group of the answer position (where the logits are read)

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_data(cls, data, what: str = "this method") -> "PositionLayout":
        labels = dict(data.positions)
        if not labels:
            lengths = data.lengths.unique()
            if len(lengths) != 1:
                raise UsageError(
                    f"{what} needs position labels in the task ('positions' in the pairs, e.g. {{S1: 2, end: -1}}), "
                    f"or prompts of one token length (here they have {int(data.lengths.min())} to {int(data.lengths.max())} tokens)"
                )
            length = int(lengths[0])
            return cls(tuple(f"t{p}" for p in range(length - 1)) + (END,), labelled=False, answer=length - 1)
        for label in labels:  # task files are checked when read; this guards data built in code
            if not naming.is_position_label(label):
                raise UsageError(f"task position label {label!r} cannot be used in node names: {naming.POSITION_LABEL_RULE}")
        if OTHER in labels:
            raise UsageError(f"task position label '{OTHER}' is reserved for the unlabelled tokens; rename it")
        answers = data.answer_positions
        if END in labels and not torch.equal(labels[END], answers):
            raise UsageError(f"task position label '{END}' is reserved for the answer position (the prompt's last token); rename it")
        names = list(labels)
        stacked = torch.stack([labels[k] for k in names])  # [n_labels, N]
        for i, name in enumerate(names):
            for j in range(i + 1, len(names)):
                same = (stacked[i] == stacked[j]).nonzero().flatten()
                if len(same):
                    raise UsageError(
                        f"task positions '{name}' and '{names[j]}' are the same token in pair {int(same[0])}; "
                        "position groups need a distinct token per label"
                    )
        at_answer = next((k for k in names if torch.equal(labels[k], answers)), None)
        if at_answer is None:
            labels[END] = answers
            at_answer = END
        # groups in order of their mean position, so that drawings read left to right
        order = sorted(labels, key=lambda k: (float(labels[k].float().mean()), k))
        covered = torch.zeros_like(data.real_tokens)
        rows = torch.arange(data.n, device="cpu")
        for k in labels:
            covered[rows, labels[k]] = True
        has_other = bool((data.real_tokens & ~covered).any())
        return cls(tuple(order) + ((OTHER,) if has_other else ()), labelled=True, answer=order.index(at_answer))

    def to_dict(self) -> dict:
        return {"names": list(self.names), "kind": "labels" if self.labelled else "absolute", "answer": self.names[self.answer]}

    # -- groups --------------------------------------------------------------------------------
    @property
    def n_groups(self) -> int:
        return len(self.names)

    @property
    def n_single(self) -> int:
        """Groups of one token per prompt (all but ``other``, which comes last)."""
        return self.n_groups - (1 if self.names and self.names[-1] == OTHER else 0)

    def index(self, batch) -> torch.Tensor:
        """[S, B] token index of every single-token group in every prompt of `batch`."""
        if not self.labelled:
            return torch.arange(self.n_single, device=batch.lengths.device)[:, None].expand(-1, batch.n)
        rows = [batch.positions[name] if name in batch.positions else batch.answer_positions for name in self.names[: self.n_single]]
        return torch.stack([r.to(batch.lengths.device) for r in rows])

    def assign(self, batch) -> torch.Tensor:
        """[B, P] group index of every token of `batch` (-1 for padding)."""
        real = batch.real_tokens
        if not self.labelled:
            index = torch.arange(real.shape[1], device=real.device)[None].expand_as(real)
            index = index.masked_fill(index >= self.n_groups, -1)
            return torch.where(real, index, torch.full_like(index, -1))
        groups = torch.full(real.shape, -1, dtype=torch.long, device=real.device)
        if OTHER in self.names:
            groups[real] = self.names.index(OTHER)
        rows = torch.arange(real.shape[0], device=real.device)
        index = self.index(batch).to(real.device)
        for g in range(self.n_single):
            groups[rows, index[g]] = g
        return groups

    def check_matches(self, names, origin: str) -> None:
        """Refuse a circuit whose position names are not this task's."""
        if list(names) != list(self.names):
            raise UsageError(f"{origin}: the circuit's positions {list(names)} do not match this task's ({list(self.names)})")
