"""`evaluate stability`: how much a discovered circuit depends on the examples it was found with.

Discovery is rerun on bootstrap resamples of the task's examples (n indices drawn with
replacement, reproducibly from the config's seed; times K seeds for stochastic methods), each
result goes through the config's selection (`circuitctl.circuits.selection.select`), and the
resampled circuits are compared with each other and with the circuit found on all the data:

* per unit: how often it is in a resampled circuit (inclusion frequency), and the mean and 95 %
  percentile interval of its score over the resamples;
* Jaccard similarity of the resampled circuits (between pairs, and against the full-data
  circuit), Spearman correlation of each resample's scores with the full-data scores;
* the core (units in >= 90 % of the resampled circuits), the contingent units (in some, not in
  >= 90 %) and f of the core circuit on all the data.

Cheap where the method allows: EAP and EAP-IG scores are means over examples, so one run keeps
every example's contribution (`DiscoveryContext.per_example`) and a resample's scores are the
mean of its examples' contributions: no reruns (not with mean ablation, whose ablation values
are themselves a mean over the examples, so a rerun on a resample would ablate with other
values). Every other method is rerun on each resample (`TaskData.take`), with a progress bar;
progress is saved to ``OUT/checkpoint`` every 30 s and on Ctrl-C, and ``--resume OUT`` continues.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from circuitctl.analysis.bootstrap import resample_indices, resampled_means
from circuitctl.config.schema import RunConfig
from circuitctl.errors import InterruptedRun, UsageError

CORE_FREQUENCY = 0.9  # a unit in at least this fraction of the resampled circuits is "core"
STABILITY_FILES = ("stability.json", "stability.png")
CHECKPOINT_EVERY_SECONDS = 30.0
CHECKPOINT_METHOD = "stability"


@dataclass
class StabilitySummary:
    out_dir: Path
    record: dict
    files: list[str]
    notes: list[str] = field(default_factory=list)


@dataclass
class _Runs:
    """Scores and circuits of the resamples done so far (rows 0..done-1 of the tensors)."""

    done: int
    scores: torch.Tensor  # float32 [R, *mask.shape]
    membership: torch.Tensor  # bool [R, *mask.shape]


def stability(
    config: RunConfig,
    config_dir: Path | None,
    out_dir: Path,
    n_resamples: int = 20,
    n_seeds: int = 1,
    force: bool = False,
    resume: bool = False,
    rerun: bool = False,
) -> StabilitySummary:
    """Run the stability analysis of `config`'s discovery and write stability.json and stability.png to `out_dir`.

    rerun: rerun the method on every resample even where per-example contributions would give
    the same circuits without reruns (EAP, EAP-IG): a check of that shortcut, at the cost of the reruns."""
    from circuitctl.batching import collect_notes
    from circuitctl.io.files import refuse_overwrite, remove_if_empty
    from circuitctl.runner import cap_batch_size
    from circuitctl.session import check_model_source, read_task_source

    if n_resamples < 2:
        raise UsageError("--bootstrap: give at least 2 resamples")
    if n_seeds < 1:
        raise UsageError("--seeds: give at least 1 seed")
    read_task_source(config, config_dir)
    check_model_source(config, config_dir)
    config = cap_batch_size(config)
    out_dir = Path(out_dir)
    targets = [out_dir / name for name in STABILITY_FILES]
    checkpoint = _checkpoint(out_dir, config, n_resamples, n_seeds)
    if resume:
        if not checkpoint.exists:
            raise UsageError(f"--resume: '{out_dir}' has no stability checkpoint to resume")
        checkpoint.check()
    else:
        refuse_overwrite(targets, force)
        if checkpoint.exists and not force:
            raise UsageError(f"'{out_dir}' holds an interrupted stability run; continue it with --resume (or pass --force to start over)")
        checkpoint.clear()  # --force: start over
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out: '{out_dir}' exists and is not a directory")
    existed = out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        with collect_notes() as notes:
            record, png = _analyse(config, config_dir, checkpoint, n_resamples, n_seeds, resume, rerun, notes)
    except BaseException:
        if not existed:
            remove_if_empty(out_dir)
        raise
    from circuitctl.io.files import write_atomic, write_json

    write_json(targets[0], record)
    write_atomic(targets[1], png)
    checkpoint.clear()
    return StabilitySummary(out_dir, record, [str(t) for t in targets], notes)


def _checkpoint(out_dir: Path, config: RunConfig, n_resamples: int, n_seeds: int):
    from circuitctl.checkpoint import Checkpoint
    from circuitctl.config.load import config_hash

    return Checkpoint(out_dir, f"{config_hash(config)}-stability-{n_resamples}x{n_seeds}")


def _analyse(
    config: RunConfig, config_dir, checkpoint, n_resamples: int, n_seeds: int, resume: bool, rerun: bool, notes: list[str]
) -> tuple[dict, bytes]:
    from circuitctl.checks import check_task_signal
    from circuitctl.config.methods import METHODS
    from circuitctl.session import open_session

    started = time.perf_counter()
    session = open_session(config, config_dir)
    check_task_signal(session, config)  # as discover: a task without signal is refused before any run
    if n_seeds > 1 and not METHODS.get(config.method.name).stochastic:
        notes.append(f"method {config.method.name} does not depend on the seed: --seeds {n_seeds} ignored, one run per resample")
        n_seeds = 1
    indices = resample_indices(session.data.n, n_resamples, config.seed)
    resuming_resamples = resume and checkpoint.recorded_method() == CHECKPOINT_METHOD
    if resuming_resamples:
        full, runs = _restore(checkpoint, n_resamples * n_seeds, session)
        fast = False
    else:
        full = _full_data_run(config, config_dir, session, checkpoint, resume and checkpoint.exists, per_example=not rerun)
        fast = full.result.per_example is not None
        runs = None
    how = "per-example contributions (no reruns)" if fast else f"reruns of {config.method.name}"
    if fast:
        runs = _from_contributions(full, indices, config)
    else:
        runs = _reruns(config, config_dir, session, full, indices, n_seeds, checkpoint, runs)
    record = _record(config, session, full, runs, n_resamples, n_seeds, how)
    record["timings"] = {"total": round(time.perf_counter() - started, 3)}
    return record, plot_stability(record, full, config)


# ----------------------------------------------------------------------------------------------
# the runs
# ----------------------------------------------------------------------------------------------
@dataclass
class _Full:
    """The run on all the examples: its result, space, circuit and the evaluator's inputs."""

    result: object  # DiscoveryResult (scores, per_example); None when restored from a checkpoint
    space: object
    scores: torch.Tensor
    membership: torch.Tensor
    chosen_by: str


def _context(config: RunConfig, config_dir, session, data, seed: int, checkpoint=None, resume: bool = False, per_example: bool = False):
    from circuitctl.methods.base import DiscoveryContext

    return DiscoveryContext(
        session.adapter, data, session.metric, config.ablation, seed=seed, checkpoint=checkpoint, resume=resume,
        config_dir=config_dir, cache_gib=config.cache_gib, per_example=per_example,
    )


def _discover(config: RunConfig, context):
    """One run of the config's method on `context.data`, seeded; a sweep (several circuits) is refused."""
    from circuitctl.methods.base import run_method
    from circuitctl.session import seed_everything

    seed_everything(context.seed)
    result = run_method(context, config.method)
    if result.sweep:
        raise UsageError(
            f"method {config.method.name} ran a sweep ({len(result.sweep)} circuits); stability needs one circuit per run: "
            "give the swept setting a single value"
        )
    return result


def _space_of(result, session):
    from circuitctl.circuits.edges import EdgeSpace

    return result.space if result.space is not None else EdgeSpace(session.adapter.graph)


def _selected(config: RunConfig, space, scores: torch.Tensor, native: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(scores, circuit, the rule that chose it): the config's selection, as `discover` applies it."""
    from circuitctl.circuits.selection import select
    from circuitctl.runner import check_scores

    check_scores(scores, space, config.method.name)
    scores = scores.float().cpu()
    membership, chosen_by = select(scores, space, config.selection, native, config.method.name)
    return scores, membership, chosen_by


def _full_data_run(config: RunConfig, config_dir, session, checkpoint, resume: bool, per_example: bool) -> _Full:
    """The method on all the examples, keeping per-example contributions where it can (not with
    mean ablation: see the module's docstring). Its own checkpoint lives in OUT/checkpoint."""
    per_example = per_example and config.ablation.type != "mean"
    context = _context(config, config_dir, session, session.data, config.seed, checkpoint, resume, per_example)
    try:
        result = _discover(config, context)
    except InterruptedRun:  # the method saved its progress in OUT/checkpoint
        raise InterruptedRun(
            f"{config.method.name} on all the examples stopped; its progress is saved in {checkpoint.dir}. "
            f"Resume with: circuitctl evaluate stability CONFIG --resume {checkpoint.dir.parent}"
        ) from None
    space = _space_of(result, session)
    scores, membership, chosen_by = _selected(config, space, result.scores, result.membership)
    checkpoint.clear()  # the method's own progress is complete
    return _Full(result, space, scores, membership, chosen_by)


def _from_contributions(full: _Full, indices: torch.Tensor, config: RunConfig) -> _Runs:
    """Every resample's scores as the mean of its examples' contributions, then the selection."""
    per = full.result.per_example  # [N, *shape]
    shape = per.shape[1:]
    means = resampled_means(per.flatten(1).T, indices).float()  # [R, prod(shape)]
    scores = means.view(indices.shape[0], *shape)
    membership = torch.zeros(scores.shape, dtype=torch.bool, device="cpu")
    from circuitctl.progress import bar

    with bar("stability: selecting resampled circuits", scores.shape[0]) as advance:
        for r in range(scores.shape[0]):
            membership[r] = _selected(config, full.space, scores[r], None)[1]
            advance()
    return _Runs(scores.shape[0], scores, membership)


def _reruns(config: RunConfig, config_dir, session, full: _Full, indices: torch.Tensor, n_seeds: int, checkpoint, runs: _Runs | None) -> _Runs:
    """The method rerun on every resample (x every seed), resumable."""
    from circuitctl.checkpoint import Autosave
    from circuitctl.progress import bar

    total = indices.shape[0] * n_seeds
    shape = tuple(full.space.mask.shape)
    if runs is None:
        runs = _Runs(0, torch.zeros((total, *shape), device="cpu"), torch.zeros((total, *shape), dtype=torch.bool, device="cpu"))
    state = {"runs": runs}

    def snapshot() -> tuple[dict, dict]:
        r = state["runs"]
        tensors = {
            "scores": r.scores[: r.done].clone(),
            "membership": r.membership[: r.done].to(torch.uint8),
            "full_scores": full.scores,
            "full_membership": full.membership.to(torch.uint8),
        }
        return {"done": r.done, "total": total, "chosen_by": full.chosen_by, "space": full.space.info()}, tensors

    autosave = Autosave(checkpoint, CHECKPOINT_METHOD, CHECKPOINT_EVERY_SECONDS, snapshot)
    autosave.save()  # the full-data circuit is not computed again on resume
    try:
        with bar(f"stability: {config.method.name} on resamples", total) as advance:
            advance(runs.done)
            for r in range(runs.done, total):
                resample, seed = divmod(r, n_seeds)
                context = _context(config, config_dir, session, session.data.take(indices[resample]), config.seed + seed)
                result = _discover(config, context)
                if tuple(result.scores.shape) != shape:
                    raise UsageError(
                        f"method {config.method.name} scored {tuple(result.scores.shape)} units on resample {resample} "
                        f"but {shape} on all the examples; stability needs the same units on every resample"
                    )
                scores, membership, _ = _selected(config, full.space, result.scores, result.membership)
                runs.scores[r], runs.membership[r] = scores, membership
                state["runs"] = _Runs(r + 1, runs.scores, runs.membership)  # row r is complete
                runs = state["runs"]
                advance()
                autosave.maybe_save()
    except KeyboardInterrupt:
        autosave.save()
        raise InterruptedRun(
            f"the stability analysis stopped after {state['runs'].done} of {total} runs; its progress is saved in "
            f"{checkpoint.dir}. Resume with: circuitctl evaluate stability CONFIG --resume {checkpoint.dir.parent}"
        ) from None
    return runs


def _restore(checkpoint, total: int, session) -> tuple[_Full, _Runs]:
    """The full-data circuit and the finished reruns of an interrupted analysis."""
    from circuitctl.circuits import space_for

    state, tensors = checkpoint.load(CHECKPOINT_METHOD)
    space = space_for(state["space"], session.adapter, session.data)
    shape = tuple(space.mask.shape)
    done = int(state["done"])
    if state.get("total") != total or tuple(tensors["full_scores"].shape) != shape or tensors["scores"].shape[0] != done:
        raise UsageError(f"{checkpoint.dir}: the checkpoint does not fit this analysis; delete it to start over")
    runs = _Runs(done, torch.zeros((total, *shape), device="cpu"), torch.zeros((total, *shape), dtype=torch.bool, device="cpu"))
    runs.scores[:done] = tensors["scores"]
    runs.membership[:done] = tensors["membership"].bool()
    full = _Full(None, space, tensors["full_scores"], tensors["full_membership"].bool(), state["chosen_by"])
    return full, runs


# ----------------------------------------------------------------------------------------------
# the record
# ----------------------------------------------------------------------------------------------
def jaccard_matrix(members: torch.Tensor) -> torch.Tensor:
    """Pairwise Jaccard similarity of circuits given as bool rows [R, n_units] (two empty circuits: 1)."""
    m = members.double()
    inter = m @ m.T
    sizes = m.sum(1)
    union = sizes[:, None] + sizes[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter))


def _record(config: RunConfig, session, full: _Full, runs: _Runs, n_resamples: int, n_seeds: int, how: str) -> dict:
    from circuitctl.metrics.faithfulness import spearman
    from circuitctl.report import report_provenance

    space = full.space
    mask = space.mask.cpu()
    names = space.unit_names()
    scores = runs.scores[: runs.done][:, mask]  # [R, n_units]
    members = runs.membership[: runs.done][:, mask]
    full_scores, full_members = full.scores[mask], full.membership[mask]
    frequency = members.double().mean(0)  # float64: 18 of 20 is 0.9, the core threshold itself
    ci = torch.quantile(scores.double(), torch.tensor([0.025, 0.975], dtype=torch.float64, device="cpu"), dim=0)  # [2, n_units]
    score_mean = scores.double().mean(0)

    pairs = jaccard_matrix(members)
    upper = pairs[torch.triu(torch.ones_like(pairs, dtype=torch.bool), diagonal=1)]
    vs_full = jaccard_matrix(torch.cat([full_members[None], members]))[0, 1:]
    correlations = [spearman(row, full_scores) for row in scores]
    correlations_abs = [spearman(row.abs(), full_scores.abs()) for row in scores]
    sizes = members.sum(1).double()

    order = sorted(range(len(names)), key=lambda i: (-float(frequency[i]), names[i]))
    core = [names[i] for i in order if float(frequency[i]) >= CORE_FREQUENCY]
    contingent = [names[i] for i in order if 0.0 < float(frequency[i]) < CORE_FREQUENCY]
    core_membership = torch.zeros_like(mask, device="cpu")
    core_membership[mask] = frequency >= CORE_FREQUENCY

    units = {
        names[i]: {
            "frequency": float(frequency[i]),
            "score_mean": float(score_mean[i]),
            "score_ci": [float(ci[0, i]), float(ci[1, i])],
            "score_full": float(full_scores[i]),
            "in_full_circuit": bool(full_members[i]),
        }
        for i in order
    }
    return {
        "n_resamples": n_resamples,
        "n_seeds": n_seeds,
        "n_runs": runs.done,
        "n_examples": session.data.n,
        "seed": config.seed,
        "method": config.method.name,
        "how": how,
        "kind": space.kind,
        "unit": space.unit,
        "n_units": len(names),
        "selection": full.chosen_by,
        "core_frequency": CORE_FREQUENCY,
        "jaccard": {
            "mean": float(upper.mean()),
            "min": float(upper.min()),
            "vs_full": {"mean": float(vs_full.mean()), "min": float(vs_full.min())},
        },
        "spearman_vs_full": _mean_min(correlations),  # signed scores
        "spearman_abs_vs_full": _mean_min(correlations_abs),  # |score|
        "circuit_size": {"full": int(full_members.sum()), "mean": float(sizes.mean()), "min": int(sizes.min()), "max": int(sizes.max())},
        "core": core,
        "contingent": contingent,
        "faithfulness": _core_faithfulness(config, session, full, core_membership),
        "runs": [
            {
                "resample": r // n_seeds,
                "seed": config.seed + r % n_seeds,
                "n_in_circuit": int(sizes[r]),
                "jaccard_vs_full": float(vs_full[r]),
                "spearman_vs_full": correlations[r],
                "spearman_abs_vs_full": correlations_abs[r],
            }
            for r in range(runs.done)
        ],
        space.unit: units,
        "provenance": report_provenance(config),
    }


def _mean_min(values: list) -> dict | None:
    defined = [v for v in values if v is not None]
    return {"mean": sum(defined) / len(defined), "min": min(defined)} if defined else None


def _core_faithfulness(config: RunConfig, session, full: _Full, core: torch.Tensor) -> dict:
    """f of the core circuit and of the full-data circuit, on all the examples."""
    from circuitctl.circuits.evaluator import CircuitEvaluator
    from circuitctl.metrics.faithfulness import normalized_faithfulness, undefined_reason

    evaluator = CircuitEvaluator(
        full.space, session.adapter, session.data, session.metric, config.ablation, config.method.batch_size, config.cache_gib
    )
    m_full, m_empty = evaluator.full_and_empty()
    m_core, m_circuit = evaluator.circuit_values(torch.stack([core, full.membership])).tolist()
    return {
        "core": normalized_faithfulness(m_core, m_full, m_empty),
        "full_circuit": normalized_faithfulness(m_circuit, m_full, m_empty),
        "n_core": int(core.sum()),
        "metric_full": m_full,
        "metric_empty": m_empty,
        "metric_core": m_core,
        "undefined": undefined_reason(m_full, m_empty),
    }


def plot_stability(record: dict, full: _Full, config: RunConfig) -> bytes:
    """Inclusion frequency of every unit against its rank on all the data (the selection's key), core marked."""
    from circuitctl.report import render_png

    units = record[record["unit"]]
    absolute = config.selection.absolute
    ranked = sorted(units.items(), key=lambda item: -(abs(item[1]["score_full"]) if absolute else item[1]["score_full"]))
    xs = list(range(1, len(ranked) + 1))
    ys = [u["frequency"] for _, u in ranked]
    core = [u["frequency"] >= record["core_frequency"] for _, u in ranked]

    def draw(ax) -> None:
        other = [(x, y) for x, y, c in zip(xs, ys, core) if not c]
        marked = [(x, y) for x, y, c in zip(xs, ys, core) if c]
        if other:
            ax.scatter(*zip(*other), s=10, color="tab:blue", label="contingent / never chosen")
        if marked:
            ax.scatter(*zip(*marked), s=16, color="tab:red", label=f"core ({len(marked)})")
        ax.axhline(record["core_frequency"], color="grey", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel(f"rank on all the examples ({'|score|' if absolute else 'signed score'})")
        ax.set_ylabel("inclusion frequency")
        j = record["jaccard"]
        ax.set_title(
            f"{record['method']}: {record['n_runs']} resampled circuits, Jaccard mean {j['mean']:.2f} / min {j['min']:.2f}", fontsize=9
        )
        ax.legend(fontsize=8)

    return render_png(draw)
