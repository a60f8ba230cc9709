"""`explain_run`: what each node of a run's circuit does, which heads do the same job, and
what the weights say. Writes explanation.json / explanation.md, labels circuit.dot (.svg) and
draws circuit.grouped.dot (.svg). Costs a clean and a corrupt pass over the task, one pass over
the repeated-sequence probe, and (when the circuit has MLPs) one gradient pass per batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
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


def explain_run(run_dir: Path, force: bool = False, session=None) -> ExplainSummary:
    """Explain the circuit in `run_dir`. `session`: the run's open session (`discover` passes
    its own, so the model is not loaded twice); by default it is opened from config.yaml."""
    started = time.perf_counter()
    run = load_run(Path(run_dir))
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
    nodes = {name: one_line(entry) for name, entry in explanation["nodes"].items()}
    groups = [(g["id"], g["name"]) for g in explanation["groups"] if len(g["members"]) > 1]
    return ExplainSummary(run.run_dir, run.kind, nodes, groups, files, notes, time.perf_counter() - started)


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
    labels = [l for l in order if l in data.positions] + [l for l in data.positions if l not in order]
    answer = data.answer_positions.long()
    label_positions = {l: data.positions[l].long() for l in labels}
    # a label at the answer position in every prompt (`end`) is a target, not a second query
    query_labels = [l for l in labels if not bool((label_positions[l] == answer).all())]
    queries = torch.stack([answer] + [label_positions[l] for l in query_labels], dim=1)
    targets = {name: att.target_positions(queries[:, i], label_positions) for i, name in enumerate(["answer", *query_labels])}
    return _Task(labels, query_labels, queries, targets)


def _round(value: float) -> float:
    return float(f"{value:.4g}")


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

    patterns = capture_patterns(model, probe.tokens, {l for l, _ in heads}, batch_size)
    first = probe.first_content
    masks = {
        "previous_token": roles.previous_token_targets(probe.tokens, first_query=first + 1),
        "duplicate_token": roles.duplicate_token_targets(probe.tokens, first_key=first),
        "induction": roles.induction_targets(probe.tokens, first_key=first),
    }
    out = {}
    for layer, head in heads:
        pattern = patterns[layer][:, head]
        out[(layer, head)] = {role: float(roles.attention_score(pattern, mask)) for role, mask in masks.items()}
    return out


def _head_entries(run, session, data, task, clean, corrupt, direction, scale, batch_size) -> tuple[dict, dict]:
    model = session.adapter.model
    components: dict[str, list] = {}
    for node in run.nodes.values():
        if node.kind == "head":
            components.setdefault(node.component, []).append(node)
    if not components:
        return {}, {}
    heads = sorted({(n[0].layer, n[0].index) for n in components.values()})
    excluded = probes.special_token_ids(session.adapter.tokenizer)
    prefix = probes.prefix_token(session.adapter.bos_token_id(), data.clean, data.lengths)
    seed = run.config.seed
    probe_info: dict = {}
    try:
        probe = probes.repeated_random(model.cfg.d_vocab, model.cfg.n_ctx, prefix, excluded, seed)
        attention_roles = _probe_scores(model, probe, heads, batch_size)
        probe_info["repeated_random"] = probe.describe()
    except ValueError as exc:  # context or vocabulary too small: no attention roles
        attention_roles = {h: {} for h in heads}
        probe_info["repeated_random"] = {"skipped": str(exc)}
    ov_tokens, ov_source = probes.ov_tokens(data.answers, data.wrong, model.cfg.d_vocab, excluded, seed)
    k = roles.copy_k(len(ov_tokens))
    probe_info["ov"] = {"tokens": ov_source, "n": len(ov_tokens), "k": k, "through_mlp0": not model.cfg.attn_only}
    movable = att.movable_targets(data.clean, task.targets["answer"], data.answer_positions.long(), task.labels)
    probe_info["movable_targets"] = movable
    ov_probe = f"ov:{ov_source}"
    entries = {}
    from circuitctl.explain.ov import ov_logits

    for name, nodes in components.items():
        layer, head = nodes[0].layer, nodes[0].index
        query = _query_of([n.position for n in nodes], run, task.query_labels)
        attention = _attention_entry(clean.rows[layer][:, head], corrupt.rows[layer][:, head], task, query)
        copy, negative_copy = roles.copy_scores(ov_logits(model, layer, head, ov_tokens), torch.arange(len(ov_tokens)), k)
        from_answer = attention["from"]["answer"]["clean"]
        mover_target = max(movable, key=lambda t: from_answer[t]) if movable else None
        mover, negative_mover = roles.mover_scores(from_answer[mover_target] if mover_target else 0.0, copy, negative_copy)
        scores = {**attention_roles[(layer, head)], "copy": copy, "negative_copy": negative_copy, "mover": mover, "negative_mover": negative_mover}
        probe_of = {r: "repeated_random" for r in roles.ATTENTION_ROLES} | {r: ov_probe for r in roles.OV_ROLES}
        probe_of |= {r: f"clean_attention*{ov_probe}" for r in roles.MOVER_ROLES}
        listed = []
        for role in roles.listed_roles(scores):
            item = {"role": role, "score": _round(scores[role]), "probe": probe_of[role]}
            if role in roles.MOVER_ROLES:
                item["target"] = mover_target
            listed.append(item)
        head_dla = dla_mod.summary(
            dla_mod.dla(clean.head_out[layer][:, head], direction, scale),
            dla_mod.dla(corrupt.head_out[layer][:, head], direction, scale),
        )
        entry = {
            "kind": "head",
            "roles": listed,
            "scores": {role: _round(scores.get(role, 0.0)) for role in roles.ROLES if role in scores},
            "attention": attention,
            "dla": {key: _round(v) for key, v in head_dla.items()},
        }
        positions = sorted({n.position for n in nodes if n.position is not None})
        if positions:
            entry["positions"] = positions
        entries[name] = entry
    return entries, probe_info


def _mlp_entries(run, session, data, clean, corrupt, direction, scale, batch_size) -> dict:
    model = session.adapter.model
    layers = sorted({n.layer for n in run.nodes.values() if n.kind == "mlp"})
    if not layers:
        return {}
    attribution = dla_mod.neuron_attribution(session.adapter, data, layers, batch_size)
    entries = {}
    for layer in layers:
        neuron_clean = dla_mod.neuron_dla(model, layer, clean.post[layer], direction, scale)
        neuron_corrupt = dla_mod.neuron_dla(model, layer, corrupt.post[layer], direction, scale)
        top = attribution[layer].abs().argsort(descending=True)[:TOP_NEURONS].tolist()
        mlp_dla = dla_mod.summary(dla_mod.dla(clean.mlp_out[layer], direction, scale), dla_mod.dla(corrupt.mlp_out[layer], direction, scale))
        entry = {
            "kind": "mlp",
            "dla": {key: _round(v) for key, v in mlp_dla.items()},
            "top_neurons": [
                {
                    "neuron": f"m{layer}.n{i}",
                    "attribution": _round(float(attribution[layer][i])),
                    "dla": {key: _round(v) for key, v in dla_mod.summary(neuron_clean[:, i], neuron_corrupt[:, i]).items()},
                }
                for i in top
            ],
        }
        in_circuit = {name: score for name, score in run.neurons.items() if name.startswith(f"m{layer}.")}
        if in_circuit:
            entry["circuit_neurons"] = {name: _round(score) for name, score in in_circuit.items()}
        positions = sorted({n.position for n in run.nodes.values() if n.kind == "mlp" and n.layer == layer and n.position})
        if positions:
            entry["positions"] = positions
        entries[f"m{layer}"] = entry
    return entries


def _feature_hooks(run, session) -> dict:
    """site name -> (hook name, SAE) for the sites of the circuit's features."""
    if run.kind != "feature":
        return {}
    from circuitctl.models.sae_sites import hook_name
    from circuitctl.sae.loading import resolve_saes

    saes = resolve_saes(run.config.method.saes, run.config_dir, session.adapter.model, session.adapter.device)
    return {site.name: (hook_name(site), sae) for site, (sae, _) in saes.items()}


def _feature_entries(run, sites, clean, corrupt, direction, scale) -> dict:
    entries = {}
    for node in run.nodes.values():
        if node.kind != "feature" or node.component in entries:
            continue
        site = node.component.split("/")[0]
        hook, sae = sites[site]
        with torch.no_grad():
            device, dtype = sae.decoder_matrix().device, sae.decoder_matrix().dtype
            acts = {name: sae.encode(run_capture.hooks[hook].to(device, dtype))[:, node.index].float().cpu() for name, run_capture in (("clean", clean), ("corrupt", corrupt))}
            decoder = sae.decoder_matrix()[node.index].float().cpu()
        feature_dla = dla_mod.summary(
            dla_mod.dla(acts["clean"][:, None] * decoder, direction, scale),
            dla_mod.dla(acts["corrupt"][:, None] * decoder, direction, scale),
        )
        entries[node.component] = {
            "kind": "feature",
            "top_tokens": node.label,
            "activation": {"clean": _round(float(acts["clean"].mean())), "corrupt": _round(float(acts["corrupt"].mean()))},
            "dla": {key: _round(v) for key, v in feature_dla.items()},
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


def explain_circuit(run: LoadedRun, session) -> dict:
    """The explanation record (see `circuitctl.explain.report` for its shape)."""
    from circuitctl.explain.capture import capture_task
    from circuitctl.explain.composition import composition_table
    from circuitctl.explain.groups import Member, group_nodes

    model = session.adapter.model
    data = session.data
    data = data.slice(0, min(data.n, MAX_PAIRS))
    batch_size = run.config.batch_size
    task = _task(session, data)
    head_layers = {n.layer for n in run.nodes.values() if n.kind == "head"}
    mlp_layers = {n.layer for n in run.nodes.values() if n.kind == "mlp"}
    sites = _feature_hooks(run, session)
    hooks = sorted({hook for hook, _ in sites.values()})
    answer = data.answer_positions.long()
    clean = capture_task(model, data.clean, task.queries, answer, head_layers, mlp_layers, hooks, batch_size)
    corrupt = capture_task(model, data.corrupt, task.queries, answer, head_layers, mlp_layers, hooks, batch_size)
    direction = dla_mod.logit_directions(model, data.answers.cpu(), data.wrong.cpu())
    scale = dla_mod.final_scale(model, clean.resid_final)
    heads, probe_info = _head_entries(run, session, data, task, clean, corrupt, direction, scale, batch_size)
    nodes = {**heads, **_mlp_entries(run, session, data, clean, corrupt, direction, scale, batch_size)}
    nodes.update(_feature_entries(run, sites, clean, corrupt, direction, scale))
    members = []
    for name, entry in nodes.items():
        role = entry["roles"][0]["role"] if entry.get("roles") else None
        target = None
        if role in roles.MOVER_ROLES:
            target = entry["roles"][0]["target"]
        elif entry.get("attention"):
            target = entry["attention"]["top_target"]
        members.append(Member(name, role, target, entry["dla"]["clean"] if entry.get("dla") else 0.0))
    groups = group_nodes(members)
    for group in groups:
        for member in group.members:
            nodes[member]["group"] = group.id
    composition = composition_table(model, _head_edges(run), run.config.seed)
    for row in composition:
        row["score"], row["percentile"] = _round(row["score"]), _round(row["percentile"])
    return {
        "nodes": nodes,
        "groups": [g.to_dict() for g in groups],
        "composition": composition,
        "probes": {**probe_info, "task": {"pairs": data.n, "labels": task.labels}},
        "thresholds": dict(roles.THRESHOLDS),
    }
