"""Checkpoints of path patching, EAP-IG, exact patching, CD-T and SAE training, in-process.

Each run is stopped part-way, either by Ctrl-C (KeyboardInterrupt: the run saves and raises
InterruptedRun) or by a stand-in for SIGKILL (an exception no handler catches: only the periodic
checkpoints, written after every unit of work here, are left), then resumed. The resumed run
must end with exactly (bit for bit) the result of an uninterrupted one, and must skip the work
that was finished: it counts the units of work it does. The same through the real CLI, with
real SIGINT and SIGKILL: tests/cli/test_interrupt.py.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from testkit import random_model, random_tokens

from circuitctl.checkpoint import Checkpoint
from circuitctl.config.methods import CdtSettings, EapIgSettings, ExactSettings, PathPatchingSettings
from circuitctl.config.schema import AblationConfig
from circuitctl.errors import InterruptedRun, UsageError
from circuitctl.methods import cdt, eap_ig, exact
from circuitctl.methods import path_patching as pp
from circuitctl.methods.base import DiscoveryContext
from circuitctl.metrics.metrics import METRICS
from circuitctl.models.adapter import ModelAdapter
from circuitctl.tasks.data import TaskData


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (tests/conftest.py)


class Killed(Exception):
    """Stands in for SIGKILL: nothing catches it, so only the periodic checkpoints remain."""


STOP = {"ctrl_c": KeyboardInterrupt, "kill": Killed}
EXPECTED = {"ctrl_c": InterruptedRun, "kill": Killed}


class Work:
    """Counts units of work (a hook calls it once per unit) and stops the run at unit `stop`."""

    def __init__(self) -> None:
        self.calls, self.stop, self.error = 0, None, KeyboardInterrupt

    def __call__(self) -> None:
        self.calls += 1
        if self.calls == self.stop:
            raise self.error

    def reset(self, stop: int | None = None, how: str = "ctrl_c") -> None:
        self.calls, self.stop, self.error = 0, stop, STOP[how]


def random_data(n: int, length: int, vocab: int, seed: int) -> TaskData:
    answers = random_tokens(n, 1, vocab, seed)
    return TaskData(
        random_tokens(n, length, vocab, seed + 1),
        random_tokens(n, length, vocab, seed + 2),
        torch.full((n,), length),
        answers,
        (answers + 1) % vocab,
        {},
    )


def stop_and_resume(run, context: DiscoveryContext, checkpoint: Checkpoint, work: Work, stops: list[int], how: str):
    """Run, stopped at each of `stops` (units counted from the start of each attempt), then resumed to the end."""
    for i, stop in enumerate(stops):
        work.reset(stop, how)
        with pytest.raises(EXPECTED[how], match="--resume" if how == "ctrl_c" else None):
            run(replace(context, checkpoint=checkpoint, resume=i > 0))
        assert checkpoint.exists
    work.reset()
    return run(replace(context, checkpoint=checkpoint, resume=True))


# ------------------------------------------------------------------------------------------
# Path patching: one evaluation per expanded receiver
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pp_context() -> DiscoveryContext:
    """A random 2-layer model: with threshold 0.1 path patching expands 22 receivers."""
    model = random_model(3)
    return DiscoveryContext(ModelAdapter(model), random_data(8, 5, model.cfg.d_vocab, 4), METRICS.get("logit_diff"), AblationConfig())


@pytest.fixture
def pp_work(monkeypatch) -> Work:
    work, original = Work(), pp.batched_evaluator

    def batched_evaluator(*args, **kwargs):
        evaluate, clean_value, changed = original(*args, **kwargs)

        def counted(*call):
            work()
            return evaluate(*call)

        return counted, clean_value, changed

    monkeypatch.setattr(pp, "batched_evaluator", batched_evaluator)
    return work


@pytest.mark.parametrize("how", ["ctrl_c", "kill"])
def test_path_patching_resumes_to_the_same_circuit(pp_context, pp_work, how, tmp_path):
    settings = PathPatchingSettings(threshold=0.1, senders_per_pass=8, checkpoint_every_seconds=0 if how == "kill" else 3600)
    reference = pp.discover(pp_context, settings)
    total = pp_work.calls
    assert total == reference.extra["path_patching"]["receivers_expanded"] >= 20

    checkpoint = Checkpoint(tmp_path, "fingerprint")
    stops = [total // 4, total // 3]  # stopped twice: the second time in the resumed run
    resumed = stop_and_resume(lambda c: pp.discover(c, settings), pp_context, checkpoint, pp_work, stops, how)
    done = sum(stops) - len(stops)  # receivers finished before the stops
    assert pp_work.calls == total - done  # the finished receivers were not evaluated again
    assert torch.equal(resumed.scores, reference.scores) and torch.equal(resumed.membership, reference.membership)
    assert resumed.extra == reference.extra and resumed.forward_passes == reference.forward_passes
    assert resumed.files == reference.files  # the positional circuit (every path's score) and its drawing


# ------------------------------------------------------------------------------------------
# EAP-IG: gradient passes over 4 batches
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def eap_context() -> DiscoveryContext:
    model = random_model(0)
    return DiscoveryContext(ModelAdapter(model), random_data(8, 6, model.cfg.d_vocab, 7), METRICS.get("logit_diff"), AblationConfig())


@pytest.fixture
def eap_work(monkeypatch) -> Work:
    work, original = Work(), eap_ig.gradient_pass

    def gradient_pass(*args, **kwargs):
        work()
        return original(*args, **kwargs)

    monkeypatch.setattr(eap_ig, "gradient_pass", gradient_pass)
    return work


EAP_IG_CASES = {
    "inputs": dict(steps=3),  # the attribution path: clean outputs from the gradient passes
    "activations": dict(steps=2, variant="activations"),
    "neurons": dict(steps=2, granularity="neuron"),
}


@pytest.mark.parametrize("how", ["ctrl_c", "kill"])
@pytest.mark.parametrize("case", sorted(EAP_IG_CASES))
def test_eap_ig_resumes_to_the_same_scores(eap_context, eap_work, case, how, tmp_path):
    settings = EapIgSettings(batch_size=2, checkpoint_every_seconds=0 if how == "kill" else 3600, **EAP_IG_CASES[case])
    reference = eap_ig.discover(eap_context, settings).scores
    total = eap_work.calls
    per_batch = total // 4
    assert total == 4 * per_batch and per_batch >= 2

    checkpoint = Checkpoint(tmp_path, "fingerprint")
    stop = 2 * per_batch + per_batch // 2 + 1  # in the middle of the third batch
    resumed = stop_and_resume(lambda c: eap_ig.discover(c, settings).scores, eap_context, checkpoint, eap_work, [stop], how)
    assert eap_work.calls == total - 2 * per_batch  # the two finished batches were skipped
    # bit for bit: the resumed run adds the remaining batches' blocks to the saved sums in the
    # order of an uninterrupted run
    assert torch.equal(resumed, reference)


# ------------------------------------------------------------------------------------------
# Exact patching: one patched pass per chunk of edges and batch (11 chunks x 3 batches)
# ------------------------------------------------------------------------------------------
EXACT = dict(batch_size=3, candidates_per_pass=8)  # 8 examples: batches of 3, 3 and 2


@pytest.fixture
def exact_work(monkeypatch) -> Work:
    from circuitctl.patching.engine import PatchingEngine

    work, original = Work(), PatchingEngine.patched_metric

    def patched_metric(*args, **kwargs):  # one patched pass per (batch, chunk of edges)
        work()
        return original(*args, **kwargs)

    monkeypatch.setattr(PatchingEngine, "patched_metric", patched_metric)
    return work


@pytest.mark.parametrize("how", ["ctrl_c", "kill"])
def test_exact_patching_resumes_to_the_same_scores(eap_context, exact_work, how, tmp_path):
    settings = ExactSettings(**EXACT, checkpoint_every_seconds=0 if how == "kill" else 3600)
    reference = exact.discover(eap_context, settings).scores
    total = exact_work.calls
    assert total == 3 * 11

    checkpoint = Checkpoint(tmp_path, "fingerprint")
    # stopped at the 4th chunk of the second batch, then (resumed there) at the 4th chunk of the third
    stops = [11 + 4, 8 + 4]
    resumed = stop_and_resume(lambda c: exact.discover(c, settings).scores, eap_context, checkpoint, exact_work, stops, how)
    assert exact_work.calls == total - (sum(stops) - len(stops))  # only the unfinished chunks were patched
    # bit for bit: the resumed run adds the remaining chunks' effects to the saved sums in the
    # order of an uninterrupted run
    assert torch.equal(resumed, reference)


def test_exact_patching_checkpoint_holds_the_sums_of_finished_chunks(eap_context, exact_work, tmp_path):
    checkpoint = Checkpoint(tmp_path, "fingerprint")
    exact_work.reset(11 + 4)
    with pytest.raises(InterruptedRun, match=r"exact patching stopped; .* --resume"):
        exact.discover(replace(eap_context, checkpoint=checkpoint), ExactSettings(**EXACT, checkpoint_every_seconds=3600))
    state, tensors = checkpoint.load("exact")
    assert state == {"examples_done": 3, "batch": 3, "chunks_done": 3, "n_examples": 8, "n_chunks": 11}
    graph = eap_context.graph
    assert tensors["sums"].shape == (graph.n_upstream, graph.n_downstream) and tensors["sums"].dtype == torch.float64
    assert int((tensors["sums"] != 0).sum()) > 0

    exact_work.reset()
    for context, settings in [
        (eap_context, ExactSettings(**{**EXACT, "candidates_per_pass": 4})),  # other chunks of edges
        (replace(eap_context, data=eap_context.data.slice(0, 6)), ExactSettings(**EXACT)),  # other examples
    ]:
        with pytest.raises(UsageError, match="the checkpoint does not fit"):
            exact.discover(replace(context, checkpoint=checkpoint, resume=True), settings)
    assert exact_work.calls == 0


# ------------------------------------------------------------------------------------------
# CD-T: 4 batches (stopped after a batch's node contributions, before its edge scores)
# ------------------------------------------------------------------------------------------
@pytest.fixture
def cdt_work(monkeypatch) -> Work:
    work, original = Work(), cdt.edge_scores

    def edge_scores(*args, **kwargs):
        work()
        return original(*args, **kwargs)

    monkeypatch.setattr(cdt, "edge_scores", edge_scores)
    return work


@pytest.mark.parametrize("how", ["ctrl_c", "kill"])
def test_cdt_resumes_to_the_same_circuit(eap_context, cdt_work, how, tmp_path):
    settings = CdtSettings(batch_size=2, checkpoint_every_seconds=0 if how == "kill" else 3600)
    reference = cdt.discover(eap_context, settings)
    assert cdt_work.calls == 4 and int(reference.membership.sum()) > 0

    checkpoint = Checkpoint(tmp_path, "fingerprint")
    stops = [2, 2]  # in the second batch, then (resumed there) in the third
    resumed = stop_and_resume(lambda c: cdt.discover(c, settings), eap_context, checkpoint, cdt_work, stops, how)
    assert cdt_work.calls == 2  # only the last two batches were decomposed
    assert torch.equal(resumed.scores, reference.scores) and torch.equal(resumed.membership, reference.membership)
    assert resumed.extra == reference.extra and resumed.forward_passes == reference.forward_passes


def test_cdt_checkpoint_holds_the_sums_of_finished_batches(eap_context, cdt_work, tmp_path):
    checkpoint = Checkpoint(tmp_path, "fingerprint")
    cdt_work.reset(3)
    with pytest.raises(InterruptedRun, match=r"CD-T stopped; .* --resume"):
        cdt.discover(replace(eap_context, checkpoint=checkpoint), CdtSettings(batch_size=2, checkpoint_every_seconds=3600))
    state, tensors = checkpoint.load("cdt")
    assert set(state) == {"examples_done", "n_examples", "total_sum", "passes"}
    assert state["examples_done"] == 4 and state["n_examples"] == 8 and state["passes"] > 0
    graph = eap_context.graph
    assert tensors["edge_sums"].shape == (graph.n_upstream, graph.n_downstream) and tensors["edge_sums"].dtype == torch.float64
    assert tensors["node_sums"].shape == (graph.n_upstream,) and tensors["node_sums"].dtype == torch.float64

    with pytest.raises(UsageError, match="the checkpoint does not fit"):  # other examples
        cdt.discover(replace(eap_context, data=eap_context.data.slice(0, 6), checkpoint=checkpoint, resume=True), CdtSettings(batch_size=2))


# ------------------------------------------------------------------------------------------
# SAE training: steps
# ------------------------------------------------------------------------------------------
def activations(seed: int, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(400, 8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("how", ["ctrl_c", "kill"])
@pytest.mark.parametrize("architecture", ["relu", "topk"])
def test_sae_training_resumes_to_the_same_weights(architecture, how, tmp_path, monkeypatch):
    from circuitctl.sae.sae import SaeInfo, SparseAutoencoder
    from circuitctl.sae.train import CHECKPOINT_METHOD, Checkpointing, TrainSettings, fit_saes

    xs, infos = [activations(1), activations(2, 3.0)], [SaeInfo(), SaeInfo()]
    settings = TrainSettings(d_sae=16, architecture=architecture, k=3 if architecture == "topk" else None, steps=40, batch_size=32, lr=1e-2)
    reference = fit_saes(xs, settings, infos)

    # stopped in the middle of the 15th step (its minibatch drawn, its forward running)
    work, encode = Work(), SparseAutoencoder.encode
    monkeypatch.setattr(SparseAutoencoder, "encode", lambda self, x: (work(), encode(self, x))[1])
    checkpoint = Checkpoint(tmp_path, "fingerprint")
    every = 0 if how == "kill" else 3600  # a kill leaves the checkpoint written after the 14th step
    work.reset(15, how)
    with pytest.raises(EXPECTED[how], match="train-sae CONFIG --resume" if how == "ctrl_c" else None):
        fit_saes(xs, settings, infos, None, Checkpointing(checkpoint, every))
    state, tensors = checkpoint.load(CHECKPOINT_METHOD)
    assert state == {"step": 14, "steps": 40}
    assert {"sae.W_enc", "adam.0.exp_avg", "adam.0.exp_avg_sq", "adam.0.step", "losses"} <= set(tensors)

    work.reset()
    advanced: list[int] = []
    resumed = fit_saes(xs, settings, infos, lambda n=1: advanced.append(n), Checkpointing(checkpoint, every, resume=True))
    assert advanced == [14] + [1] * 26  # continued with the 15th step
    for (ours, our_loss), (theirs, their_loss) in zip(resumed, reference):
        assert our_loss == their_loss
        for (name, param), other in zip(ours.named_parameters(), theirs.parameters()):
            assert torch.equal(param, other), name  # bit for bit on the CPU


def test_ctrl_c_during_an_optimizer_step_waits_for_its_end():
    import os
    import signal

    from circuitctl.checkpoint import hold_interrupts

    applied = []
    with pytest.raises(KeyboardInterrupt):
        with hold_interrupts():
            os.kill(os.getpid(), signal.SIGINT)  # Python runs the handler before the next line
            applied.append("whole update")
    assert applied == ["whole update"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_train_sae_refuses_what_it_cannot_resume(tmp_path, capsys):
    """train-sae: --resume needs a checkpoint of the same config; a new training never takes
    over a directory that holds an interrupted one."""
    import yaml

    from circuitctl.cli.app import main
    from circuitctl.sae.config import load_train_config
    from circuitctl.sae.training_run import output_checkpoint

    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({"model": {"path": "model"}, "sites": ["mlp0"], "steps": 10, "output": {"dir": str(tmp_path / "out")}}))

    def cli(*args: str) -> tuple[int, str]:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            main(["train-sae", str(config), *args])
        return exit_info.value.code, capsys.readouterr().err.replace("\n", " ")

    out = tmp_path / "out"
    code, err = cli("--resume", str(out))
    assert code == 2 and "is not a directory" in err
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    code, err = cli("--resume", str(out))
    assert code == 2 and "no checkpoint to resume (it holds finished SAEs)" in err
    output_checkpoint(out, load_train_config(config)).save("train_sae", {"step": 3, "steps": 10}, {"x": torch.zeros(1)})
    code, err = cli()
    assert code == 2 and f"holds an interrupted training; continue it with --resume {out}" in err
    code, err = cli("steps=20", "--resume", str(out))
    assert code == 2 and "different config" in err and "Traceback" not in err
    assert output_checkpoint(out, load_train_config(config)).load("train_sae")[0]["step"] == 3  # untouched
