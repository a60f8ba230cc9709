"""`explain_run`: what each node of a run's circuit does, which heads do the same job, and
what the weights say. Writes explanation.json / explanation.md, labels circuit.dot (.svg) and
draws circuit.grouped.dot (.svg). Costs a clean and a corrupt pass over the task, one pass over
the repeated-sequence probe, and (when the circuit has MLPs) one gradient pass per batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from circuitctl.errors import UsageError
from circuitctl.explain import attention as att
from circuitctl.explain import dla as dla_mod
from circuitctl.explain import probes, roles
from circuitctl.explain.load import LoadedRun, load_run

OUTPUTS = ("explanation.json", "explanation.md")
MAX_PAIRS = 256  # task pairs read (the first ones); a few forward passes, whatever the task's size
TOP_NEURONS = 5


@dataclass
class ExplainSummary:
    run_dir: Path
    kind: str  # the circuit's kind (see `load_run`)
    nodes: dict[str, str]  # node -> one-line description (roles, top target, DLA)
    groups: list[tuple[str, str]]  # (id, name) of the groups with more than one member
    files: list[str]
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


def explain_run(run_dir: Path, force: bool = False, session=None, config=None, viewer: bool = True) -> ExplainSummary:
    """Explain the circuit in `run_dir`. `session`, `config`: the run's open session and its
    config (`discover` passes its own, so neither is loaded twice); by default both come from
    the run's config.yaml. `viewer`: rewrite the run's circuit.html, if it has one, so that it
    shows the explanation (discover writes its pages after explaining)."""
    started = time.perf_counter()
    run = load_run(Path(run_dir), config)
    existing = [name for name in OUTPUTS if (run.run_dir / name).exists()]
    if existing and not force:
        raise UsageError(f"{run.run_dir / existing[0]} already exists; pass --force to replace the explanation")
    if not run.nodes:
        raise UsageError(f"{run.run_dir}: the circuit has no heads, MLPs or features to explain")
    if session is None:
        from circuitctl.session import open_session

        session = open_session(run.config, run.config_dir)
    explanation = explain_circuit(run, session)
    from circuitctl.explain.report import write_explanation

    files, notes = write_explanation(run, explanation)
    if viewer and (run.run_dir / "circuit.html").is_file():
        from circuitctl.viewer import refresh_viewer

        page, problem = refresh_viewer(run.run_dir)
        files += [page.name] if page is not None else []
        notes += [problem] if problem else []
    nodes = {name: one_line(entry) for name, entry in explanation["nodes"].items()}
    groups = [(g["id"], g["name"]) for g in explanation["groups"] if len(g["members"]) > 1]
    return ExplainSummary(run.run_dir, run.kind, nodes, groups, files, notes, time.perf_counter() - started)


def explain_discovered(run_dir: Path, session, config=None) -> tuple[list[str], list[str]]:
    """For `discover` (config `explain: true`): explain the run just written, with the run's open
    session, replacing any explanation a `--force` run left behind; a sweep's circuits are
    explained one by one. A circuit that cannot be explained (no heads, MLPs or features, or any
    error) gives a note instead of failing the run. Returns (files written, relative to run_dir;
    notes)."""
    run_dir = Path(run_dir)
    targets = [run_dir] if (run_dir / "circuit.json").is_file() else sorted(p.parent for p in run_dir.glob("*/circuit.json"))
    files, notes = [], []
    for target in targets:
        try:
            summary = explain_run(target, force=True, session=session, config=config, viewer=False)
        except UsageError as exc:
            notes.append(f"not explained: {exc}")
            continue
        except Exception as exc:  # noqa: BLE001 - a finished discovery never fails on its explanation
            notes.append(f"{target} not explained ({type(exc).__name__}: {exc}); rerun `circuitctl explain {target} --force`")
            continue
        prefix = "" if target == run_dir else f"{target.name}/"
        files += [prefix + name for name in summary.files if name.startswith("explanation") or name.startswith("circuit.grouped")]
        notes += [note for note in summary.notes if note not in notes]
    return files, notes


def one_line(entry: dict) -> str:
    parts = []
    if entry.get("roles"):
        parts.append(", ".join(f"{r['role']}" + (f"->{r['target']}" if r.get("target") else "") + f" {r['score']:.2f}" for r in entry["roles"]))
    attention = entry.get("attention")
    if attention:
        parts.append(f"attends {attention['top_target']} ({attention['top_attention']:.2f})")
    if entry.get("dla"):
        parts.append(f"DLA {entry['dla']['clean']:+.3g}")
    return "; ".join(parts) or "-"


# ------------------------------------------------------------------------------------------
@dataclass
class _Task:
    """The task as the explanation reads it."""

    labels: list[str]  # every labelled position (attention targets)
    query_labels: list[str]  # the labels read as queries (not the answer position itself)
    queries: torch.Tensor  # [N, Q] query positions: answer, then each query label
    targets: dict[str, dict[str, torch.Tensor]]  # query name -> target name -> [N] positions

    @property
    def query_names(self) -> list[str]:
        return ["answer", *self.query_labels]


def _task(session, data) -> _Task:
    order = list(getattr(session.task.spec, "positions", []) or [])
    labels = [label for label in order if label in data.positions] + [label for label in data.positions if label not in order]
    answer = data.answer_positions.long()
    label_positions = {label: data.positions[label].long() for label in labels}
    # a label at the answer position in every prompt (`end`) is a target, not a second query
    query_labels = [label for label in labels if not bool((label_positions[label] == answer).all())]
    queries = torch.stack([answer] + [label_positions[label] for label in query_labels], dim=1)
    targets = {name: att.target_positions(queries[:, i], label_positions) for i, name in enumerate(["answer", *query_labels])}
    return _Task(labels, query_labels, queries, targets)


def _round(value: float) -> float:
    return float(f"{value:.4g}")


def _answer_group(data) -> str:
    """The position group where the logits are read, for per-position circuit files that do
    not record it (schema 1): the task's one position layout says."""
    from circuitctl.graph.positions import END, PositionLayout

    try:
        layout = PositionLayout.from_data(data)
    except UsageError:
        return END
    return layout.names[layout.answer]


def _query_of(heads_positions: list[str | None], run: LoadedRun, labels: list[str]) -> str:
    """Which query a head's top target is read from: the answer, unless a per-position circuit
    holds the head only at other labelled positions."""
    answer_groups = set(run.answer_groups)
    present = [p for p in heads_positions if p is not None]
    if not present or any(p in answer_groups for p in present):
        return "answer"
    for label in labels:
        if label in present:
            return label
    return "answer"  # e.g. only at the unlabelled `other` positions


def _attention_entry(clean_rows, corrupt_rows, task: _Task, query: str) -> dict:
    """clean/corrupt rows: [N, Q, P] of one head."""
    frm = {}
    for qi, name in enumerate(task.query_names):
        c = att.summarize(clean_rows[:, qi], task.targets[name])
        k = att.summarize(corrupt_rows[:, qi], task.targets[name])
        frm[name] = {
            "clean": {t: _round(float(v)) for t, v in c.items() if t != "entropy"},
            "corrupt": {t: _round(float(v)) for t, v in k.items() if t != "entropy"},
            "entropy": {"clean": _round(float(c["entropy"])), "corrupt": _round(float(k["entropy"]))},
        }
    top, value = att.top_target(frm[query]["clean"], task.labels)
    return {"query": query, "top_target": top, "top_attention": value, "from": frm}


def _probe_scores(model, probe: probes.RepeatedProbe, heads: list[tuple[int, int]], batch_size: int) -> dict[tuple[int, int], dict]:
    from circuitctl.explain.capture import capture_patterns

    patterns = capture_patterns(model, probe.tokens, {layer for layer, _ in heads}, batch_size)
    first = probe.first_content
    masks = {
        "previous_token": roles.previous_token_targets(probe.tokens, first_query=first + 1),
        "duplicate_token": roles.duplicate_token_targets(probe.tokens, first_key=first),
        "induction": roles.induction_targets(probe.tokens, first_key=first),
    }
    return {
        (layer, head): {role: float(roles.attention_score(patterns[layer][:, head], mask)) for role, mask in masks.items()}
        for layer, head in heads
    }


@dataclass
class _Passes:
    """The task's clean and corrupt captures and the DLA read-out."""

    clean: object  # TaskCapture
    corrupt: object
    direction: torch.Tensor  # [N, d]
    scale: torch.Tensor  # [N] clean final normalisation scale

    def dla(self, pick) -> dict[str, float]:
        """DLA summary of `pick(capture) -> [N, d]` outputs."""
        clean, corrupt = (dla_mod.dla(pick(capture), self.direction, self.scale) for capture in (self.clean, self.corrupt))
        return {key: _round(v) for key, v in dla_mod.summary(clean, corrupt).items()}


@dataclass
class _RoleProbes:
    """What the role scores of every head are measured on."""

    attention_roles: dict  # (layer, head) -> {role: score} on the repeated random probe
    ov: object  # OvProbe
    k: int
    movable: list[str]
    info: dict

    @property
    def probe_of(self) -> dict[str, str]:
        ov = f"ov:{self.info['ov']['tokens']}"
        probes_of = {r: "repeated_random" for r in roles.ATTENTION_ROLES} | {r: ov for r in roles.OV_ROLES}
        return probes_of | {r: f"clean_attention*{ov}" for r in roles.MOVER_ROLES}


def _role_probes(run, session, data, task, heads: list[tuple[int, int]], batch_size: int) -> _RoleProbes:
    from circuitctl.explain.ov import OvProbe

    model = session.adapter.model
    excluded = probes.special_token_ids(session.adapter.tokenizer)
    prefix = probes.prefix_token(session.adapter.bos_token_id(), data.clean, data.lengths)
    info: dict = {}
    try:
        probe = probes.repeated_random(model.cfg.d_vocab, model.cfg.n_ctx, prefix, excluded, run.config.seed)
        attention_roles = _probe_scores(model, probe, heads, batch_size)
        info["repeated_random"] = probe.describe()
    except ValueError as exc:  # context or vocabulary too small: no attention roles
        attention_roles = {h: {} for h in heads}
        info["repeated_random"] = {"skipped": str(exc)}
    tokens, source = probes.ov_tokens(data.answers, data.wrong, model.cfg.d_vocab, excluded, run.config.seed)
    k = roles.copy_k(len(tokens))
    info["ov"] = {"tokens": source, "n": len(tokens), "k": k, "through_mlp0": not model.cfg.attn_only}
    info["movable_targets"] = att.movable_targets(data.clean, task.targets["answer"], data.answer_positions.long(), task.labels)
    return _RoleProbes(attention_roles, OvProbe(model, tokens), k, info["movable_targets"], info)


def _head_entry(layer: int, head: int, query: str, task: _Task, passes: _Passes, probed: _RoleProbes) -> dict:
    attention = _attention_entry(passes.clean.rows[layer][:, head], passes.corrupt.rows[layer][:, head], task, query)
    logits = probed.ov.logits(layer, head)
    copy, negative_copy = roles.copy_scores(logits, torch.arange(logits.shape[0]), probed.k)
    from_answer = attention["from"]["answer"]["clean"]
    target = max(probed.movable, key=lambda t: from_answer[t]) if probed.movable else None
    mover, negative_mover = roles.mover_scores(from_answer[target] if target else 0.0, copy, negative_copy)
    scores = {**probed.attention_roles[(layer, head)], "copy": copy, "negative_copy": negative_copy}
    scores |= {"mover": mover, "negative_mover": negative_mover}
    listed = []
    for role in roles.listed_roles(scores):
        item = {"role": role, "score": _round(scores[role]), "probe": probed.probe_of[role]}
        if role in roles.MOVER_ROLES:
            item["target"] = target
        listed.append(item)
    return {
        "kind": "head",
        "roles": listed,
        "scores": {role: _round(scores[role]) for role in roles.ROLES if role in scores},
        "attention": attention,
        "dla": passes.dla(lambda capture: capture.head_out[layer][:, head]),
    }


def _head_entries(run, session, data, task: _Task, passes: _Passes, batch_size: int) -> tuple[dict, dict]:
    components: dict[str, list] = {}
    for node in run.nodes.values():
        if node.kind == "head":
            components.setdefault(node.component, []).append(node)
    if not components:
        return {}, {}
    heads = sorted({(nodes[0].layer, nodes[0].index) for nodes in components.values()})
    probed = _role_probes(run, session, data, task, heads, batch_size)
    entries = {}
    for name, nodes in components.items():
        query = _query_of([n.position for n in nodes], run, task.query_labels)
        entries[name] = _head_entry(nodes[0].layer, nodes[0].index, query, task, passes, probed)
        positions = sorted({n.position for n in nodes if n.position is not None})
        if positions:
            entries[name]["positions"] = positions
    return entries, probed.info


def _mlp_entries(run, session, data, passes: _Passes, batch_size: int) -> dict:
    model = session.adapter.model
    layers = sorted({n.layer for n in run.nodes.values() if n.kind == "mlp"})
    attribution = dla_mod.neuron_attribution(session.adapter, data, layers, batch_size)
    entries = {}
    for layer in layers:
        per_neuron = [dla_mod.neuron_dla(model, layer, c.post[layer], passes.direction, passes.scale) for c in (passes.clean, passes.corrupt)]
        top = attribution[layer].abs().argsort(descending=True)[:TOP_NEURONS].tolist()
        entry = {
            "kind": "mlp",
            "dla": passes.dla(lambda capture: capture.mlp_out[layer]),
            "top_neurons": [
                {
                    "neuron": f"m{layer}.n{i}",
                    "attribution": _round(float(attribution[layer][i])),
                    "dla": {key: _round(v) for key, v in dla_mod.summary(per_neuron[0][:, i], per_neuron[1][:, i]).items()},
                }
                for i in top
            ],
        }
        in_circuit = {name: _round(score) for name, score in run.neurons.items() if name.startswith(f"m{layer}.")}
        if in_circuit:
            entry["circuit_neurons"] = in_circuit
        positions = sorted({n.position for n in run.nodes.values() if n.kind == "mlp" and n.layer == layer and n.position})
        if positions:
            entry["positions"] = positions
        entries[f"m{layer}"] = entry
    return entries


def _feature_sites(run, session) -> dict:
    """site name -> (hook name, SAE) for the sites of a feature circuit: the SAEs the circuit
    file records (its space's sae_sources), else the run config's."""
    if run.kind != "feature":
        return {}
    from circuitctl.models.sae_sites import hook_name
    from circuitctl.sae.loading import resolve_saes

    sources = run.space.get("sae_sources") or {}
    sites = run.space.get("sites") or list(sources)
    spec = {site: sources[site] for site in sites} if sites and all(sources.get(site) for site in sites) else run.config.method.saes
    saes = resolve_saes(spec, run.config_dir, session.adapter.model, session.adapter.device)
    return {site.name: (hook_name(site), sae) for site, (sae, _) in saes.items()}


def _feature_entries(run, sites: dict, passes: _Passes) -> dict:
    """Each feature's activation at the answer position and its DLA (activation x decoder row)."""
    entries = {}
    for node in run.nodes.values():
        if node.kind != "feature" or node.component in entries:
            continue
        hook, sae = sites[node.component.split("/")[0]]
        decoder = sae.decoder_matrix()
        with torch.no_grad():
            acts = {
                id(capture): sae.encode(capture.hooks[hook].to(decoder.device, decoder.dtype))[:, node.index].float().cpu()
                for capture in (passes.clean, passes.corrupt)
            }
        row = decoder[node.index].detach().float().cpu()
        entries[node.component] = {
            "kind": "feature",
            "top_tokens": node.label,
            "activation": {name: _round(float(acts[id(c)].mean())) for name, c in (("clean", passes.clean), ("corrupt", passes.corrupt))},
            "dla": passes.dla(lambda capture: acts[id(capture)][:, None] * row),
        }
    return entries


def _head_edges(run) -> list:
    """(name, (l1, h1), (l2, h2), channel, score) for every head -> head edge of the circuit; for
    per-position node circuits (no edges recorded) every pair of circuit heads, all channels."""
    from circuitctl.graph import naming

    merged: dict[str, list] = {}
    for name, score in run.edges.items():
        up, down = name.split("->", 1)
        try:
            u, v = naming.parse_node(up), naming.parse_node(down)
        except ValueError:
            continue
        if u.kind != "head" or v.kind != "head" or v.channel is None:
            continue  # only head -> head q/k/v edges compose (KV groups of grouped-query attention are skipped)
        base = f"{u.base}->{v.base}<{v.channel}>"
        if base in merged:
            merged[base][4] += score
        else:
            merged[base] = [base, (u.layer, u.index), (v.layer, v.index), v.channel, score]
    if run.kind == "positional_node" and not merged:
        heads = sorted({(n.layer, n.index) for n in run.nodes.values() if n.kind == "head"})
        for l1, h1 in heads:
            for l2, h2 in heads:
                if l2 > l1:
                    for c in ("q", "k", "v"):
                        base = f"a{l1}.h{h1}->a{l2}.h{h2}<{c}>"
                        merged[base] = [base, (l1, h1), (l2, h2), c, None]
    return [tuple(row) for row in merged.values()]


def _group(nodes: dict) -> list:
    from circuitctl.explain.groups import Member, group_nodes

    members = []
    for name, entry in nodes.items():
        first = entry["roles"][0] if entry.get("roles") else None
        moved = first is not None and first["role"] in roles.MOVER_ROLES
        target = first.get("target") if moved else (entry.get("attention") or {}).get("top_target")
        members.append(Member(name, first["role"] if first else None, target, entry["dla"]["clean"]))
    groups = group_nodes(members)
    for group in groups:
        for member in group.members:
            nodes[member]["group"] = group.id
    return [g.to_dict() for g in groups]


def explain_circuit(run: LoadedRun, session) -> dict:
    """The explanation record (see `circuitctl.explain.report` for its shape)."""
    from circuitctl.explain.capture import capture_task
    from circuitctl.explain.composition import composition_table

    model = session.adapter.model
    data = session.data.slice(0, min(session.data.n, MAX_PAIRS))
    batch_size = run.config.batch_size
    if run.positions and not run.answer_groups:
        run = replace(run, answer_groups=[_answer_group(session.data)])
    task = _task(session, data)
    head_layers = {n.layer for n in run.nodes.values() if n.kind == "head"}
    mlp_layers = {n.layer for n in run.nodes.values() if n.kind == "mlp"}
    sites = _feature_sites(run, session)
    hooks = sorted({hook for hook, _ in sites.values()})
    answer = data.answer_positions.long()
    clean, corrupt = (
        capture_task(model, tokens, task.queries, answer, head_layers, mlp_layers, hooks, batch_size) for tokens in (data.clean, data.corrupt)
    )
    direction = dla_mod.logit_directions(model, data.answers.cpu(), data.wrong.cpu())
    passes = _Passes(clean, corrupt, direction, dla_mod.final_scale(model, clean.resid_final))
    nodes, probe_info = _head_entries(run, session, data, task, passes, batch_size)
    nodes.update(_mlp_entries(run, session, data, passes, batch_size))
    nodes.update(_feature_entries(run, sites, passes))
    groups = _group(nodes)
    composition = composition_table(model, _head_edges(run), run.config.seed)
    for row in composition:
        row["score"], row["percentile"] = _round(row["score"]), _round(row["percentile"])
    return {
        "nodes": nodes,
        "groups": groups,
        "composition": composition,
        "probes": {**probe_info, "task": {"pairs": data.n, "labels": task.labels}},
        "thresholds": dict(roles.THRESHOLDS),
    }
