"""The ``--ablate SPEC`` grammar (no torch): what an intervention removes or keeps.

    SPEC    := SOURCE (":" OPTION)*
    SOURCE  := a run directory or circuit file           runs/x, runs/x/circuit.json
             | unit names, comma-separated, one kind     a1.h0,a1.h3   m0.n3,m0.n7   resid0/f12,mlp1/err
                                                         input->a0.h0<v>,a0.h0->logits
    OPTION  := top=N         the run's N units with the largest |score| (instead of its circuit)
             | group=ID      a group of the run's explanation.json (``circuitctl explain``)
             | by=score      rank for top=N by |score| (the default)
             | by=spurious   rank for top=N by the effect on the task's spurious answers (SHIFT)

Names follow `circuitctl.graph.naming`: heads and MLPs (``a{L}.h{H}``, ``m{L}``, ``input``) are
nodes, ``m{L}.n{i}`` neurons, ``{site}/f{i}`` and ``{site}/err`` SAE features and error nodes,
``u->v`` edges.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from circuitctl.errors import UsageError
from circuitctl.graph import naming
from circuitctl.registry import closest

OPTIONS = ("top", "group", "by")
RANKINGS = ("score", "spurious")
KIND_WORDS = {"node": "heads/MLPs", "neuron": "neurons", "feature": "SAE features", "edge": "edges"}


@dataclass(frozen=True)
class AblationSpec:
    text: str  # as given
    run: Path | None  # a run directory or circuit file; None for a list of names
    names: tuple[str, ...] = ()  # unit names (a list source)
    kind: str | None = None  # the names' kind: node | neuron | feature | edge
    top: int | None = None
    group: str | None = None
    by: str = "score"

    @property
    def run_dir(self) -> Path | None:
        if self.run is None:
            return None
        return self.run if self.run.is_dir() else self.run.parent


def parse_spec(text: str) -> AblationSpec:
    """Parse ``--ablate``; a UsageError names the part that is wrong."""
    text = (text or "").strip()
    if not text:
        raise UsageError("--ablate: empty; give a run directory (runs/x), runs/x:top=N, runs/x:group=ID or unit names (a1.h0,a1.h3)")
    source, *parts = text.split(":")
    options = _options(parts, text)
    path = Path(source)
    if path.exists():
        if not (path.is_dir() or path.is_file()):
            raise UsageError(f"--ablate: '{source}' is neither a run directory nor a circuit file")
        return _run_spec(text, path, options)
    names = tuple(name.strip() for name in source.split(","))
    if any(not name for name in names):
        raise UsageError(f"--ablate: '{source}' has an empty name in its comma-separated list")
    kinds = {name: unit_kind(name) for name in names}
    unknown = [name for name, kind in kinds.items() if kind is None]
    for name in unknown:
        if name == naming.LOGITS:
            raise UsageError("--ablate: 'logits' is the model's output, not a unit that can be ablated")
        if "@" in name and _parses_positioned(name):
            raise UsageError(f"--ablate: '{name}' is a per-position unit; name it through its run directory (runs/x, runs/x:top=N)")
    if unknown:
        if len(names) == 1:
            raise UsageError(f"--ablate: '{source}' does not exist (a run directory or circuit file) and is not a unit name")
        raise UsageError(
            f"--ablate: '{unknown[0]}' is not a unit name (heads/MLPs a1.h0, m2, input; neurons m0.n3; "
            "SAE features resid0/f12, mlp1/err; edges a0.h0->a1.h2<v>) and no such run directory exists"
        )
    found = sorted({kinds[name] for name in names}, key=list(KIND_WORDS).index)
    if len(found) > 1:
        examples = " and ".join(f"{KIND_WORDS[k]} ({next(n for n in names if kinds[n] == k)})" for k in found)
        raise UsageError(f"--ablate: the list mixes {examples}; one intervention ablates units of one kind")
    if options:
        raise UsageError(f"--ablate: '{':'.join(parts)}': top=, group= and by= apply to a run directory, not to a list of names")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise UsageError(f"--ablate: '{duplicates[0]}' is listed twice")
    return AblationSpec(text, None, names, found[0])


def unit_kind(name: str) -> str | None:
    """node | neuron | feature | edge for a name of `circuitctl.graph.naming`; None otherwise.
    The logits, per-position names and KV groups are not units an intervention can name."""
    if "->" in name:
        try:
            naming.parse_edge(name)
        except ValueError:
            return None
        return None if "@" in name else "edge"
    try:
        naming.parse_neuron(name)
        return "neuron"
    except ValueError:
        pass
    try:
        naming.parse_feature_node(name)
        return "feature"
    except ValueError:
        pass
    try:
        node = naming.parse_node(name)
    except ValueError:
        return None
    if node.kind in ("input", "head", "mlp") and node.channel is None and node.position is None:
        return "node"
    return None


def _parses_positioned(name: str) -> bool:
    try:
        naming.parse_edge(name) if "->" in name else naming.parse_node(name)
    except ValueError:
        return False
    return True


def _options(parts: list[str], text: str) -> dict[str, str]:
    options: dict[str, str] = {}
    for part in parts:
        key, sep, value = part.partition("=")
        if not sep or not key or not value:
            raise UsageError(f"--ablate: '{part}' in '{text}' is not an option (top=N, group=ID, by=score|spurious)")
        if key not in OPTIONS:
            hint = closest(key, list(OPTIONS))
            raise UsageError(f"--ablate: unknown option '{key}' in '{text}'" + (f"; did you mean '{hint}'?" if hint else "") + " (top, group, by)")
        if key in options:
            raise UsageError(f"--ablate: option '{key}' is given twice in '{text}'")
        options[key] = value
    return options


def _run_spec(text: str, path: Path, options: dict[str, str]) -> AblationSpec:
    top = None
    if "top" in options:
        raw = options["top"]
        if not raw.isdigit() or int(raw) < 1:
            raise UsageError(f"--ablate: 'top={raw}': N must be a positive integer")
        top = int(raw)
    group = options.get("group")
    by = options.get("by", "score")
    if by not in RANKINGS:
        hint = closest(by, list(RANKINGS))
        raise UsageError(f"--ablate: 'by={by}' is not a ranking" + (f"; did you mean '{hint}'?" if hint else "") + " (score, spurious)")
    if group is not None and top is not None:
        raise UsageError("--ablate: give either top=N or group=ID, not both")
    if "by" in options and top is None:
        raise UsageError(f"--ablate: 'by={by}' ranks units for top=N; add :top=N (e.g. {text}:top=10)")
    return AblationSpec(text, path, top=top, group=group, by=by)
