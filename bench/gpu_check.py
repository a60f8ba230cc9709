"""One command for a short GPU window: install, the device test tier, every method timed on the GPU,
and the memory table checked against measured peaks; a JSON file and a markdown table.

    python bench/gpu_check.py             # one CUDA GPU, nothing but this repository: about 8 minutes
    bash bench/gpu_check.sh               # the same
    python bench/gpu_check.py --smoke --skip-install --skip-tests   # tiny sizes on the CPU (CI, tests/)

Steps, each with its own time limit inside one budget (`--budget`, 480 s), so that one slow step
cannot eat the window:

1. The README's install command (`pip install -c constraints.txt -e ".[dev]"`). When it fails
   (no network on the GPU box, say) the check goes on with what is installed and says so.
2. The device test tier: `CIRCUITCTL_TEST_DEVICE=cuda python -m pytest -m device -q`; a checkout
   without that tier is reported as such.
3. GPT-2 small's shape with random weights (no download), 200 IOI-length pairs (15 random tokens,
   one answer and one wrong token): EAP, EAP-IG inputs (5 steps), EAP-IG activations (5 steps),
   CD-T, the evaluation (`evaluate faithfulness`: f(C), completeness and both MIB curves), SFC
   with small random SAEs (TopK, 4 x d_model features, every residual stream), path patching,
   exact patching, ACDC (KL, tau = ACDC_TAU) and edge pruning when the method exists. Columns:
   wall time (fastest of up to three runs for steps under 5 s), the ratio to a plain forward +
   backward over the same pairs, forward-pass equivalents, and the GPU's peak allocated memory
   above what was allocated before the step (`torch.cuda.max_memory_allocated`, reset per row),
   with the issue's targets for one H100.
4. Llama-3-8B's shape (random weights, bfloat16, all 32 layers unless `--llama-layers`; 8
   pairs of 128 tokens): EAP, EAP-IG, the engine's cache of every pair and the evaluation's
   patched pass, each peak against `bench/memory_table.py`'s prediction for that shape.

The rows run in one worker process (one start-up for all); the parent stops the worker when a
row passes its limit and starts a fresh one for the rest. The JSON file and the markdown table
are rewritten after every step, so a cut-off window still leaves its measurements:
`bench/results/gpu-<device>.json` and `.md` (`--out` for another directory).

ACDC_TAU: on this shape and data (GPT-2-small shape, seed 0, the first 8 of the random 15-token
pairs, whole model, CPU), tau = 3e-4 keeps 246 of the 32,491 edges (0.76 %; 1e-3 keeps 126, 0.39 %);
1e-4, which should land in the 1-2 % band, did not finish within 66 minutes on the shared CPU. The
row reports how many edges ACDC kept on the 200 pairs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import EVALUATION, PATCHED_CIRCUITS, CACHE, RESULTS  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
INSTALL = [sys.executable, "-m", "pip", "install", "-c", "constraints.txt", "-e", ".[dev]"]  # the README's command
DEVICE_TESTS = [sys.executable, "-m", "pytest", "-m", "device", "-q", "-p", "no:cacheprovider"]
WORKER = [sys.executable, str(Path(__file__).resolve()), "--worker"]  # + a plan file
ACDC_TAU = 3e-4
# the targets on one H100 for GPT-2 small, 200 pairs (published: EAP 21 s, edge pruning 2,756 s, ACDC 18,783 s)
TARGETS = {"eap": 1.0, "eap_ig_inputs": 3.0, "acdc": 180.0, "cdt": 30.0, "edge_pruning": 300.0}


@dataclass
class Row:
    """One measured step."""

    id: str
    step: str  # a method name, 'evaluation', or a memory step of bench/common.py
    model: str  # a shape of bench/common.py
    examples: int
    length: int
    batch: int
    limit_s: float
    settings: dict = field(default_factory=dict)
    metric: str = "logit_diff"
    dtype: str = "float32"
    layers: int | None = None
    repeat: bool = True  # steps under 5 s: fastest of three
    ratio: bool = True  # time a plain forward + backward over the same pairs too
    predict: str | None = None  # memory rows: the bench/memory_table.py prediction to compare with
    build_on_device: bool = False  # create the weights on the GPU (8B parameters); else on the CPU, seeded as there
    note: str = ""


# ----------------------------------------------------------------------------------------
# The plan
# ----------------------------------------------------------------------------------------
def plan(smoke: bool, llama_layers: int | None, methods: list[str]) -> list[Row]:
    """Fast GPT-2 rows, then the Llama-shape memory rows, then the long GPT-2 rows."""
    if smoke:
        g = dict(model="tiny", examples=8, length=15)
        batch = dict(small=4, large=8)
        llama = dict(model="tiny-gqa", dtype="bfloat16", length=16, layers=None)
        sizes = dict(eap=2, eap_ig=2, cache=(4, 2), patched=1)
        limits = dict(fast=60, slow=60, llama=60)
    else:
        g = dict(model="gpt2-small-shape", examples=200, length=15)
        # batches: the memory table at 15 tokens, float32 (exact's K = 32 pass: 0.27 GiB per pair)
        batch = dict(small=50, large=200)
        llama = dict(model="llama-3-8b-shape", dtype="bfloat16", length=128, layers=llama_layers)
        # EAP at batch 8 is the README's table cell (36 GiB + 15 GiB of weights); EAP-IG stacks 5 steps: batch 4
        sizes = dict(eap=8, eap_ig=4, cache=(8, 4), patched=1)
        limits = dict(fast=90, slow=200, llama=90)
    ig = {"steps": 5, "variant": "inputs"}
    rows = [
        Row("eap", "eap", batch=batch["large"], limit_s=limits["fast"], **g),
        Row("eap_ig_inputs", "eap_ig", batch=batch["large"], limit_s=limits["fast"], settings=ig, **g),
        Row("eap_ig_activations", "eap_ig", batch=batch["large"], limit_s=limits["fast"], settings={**ig, "variant": "activations"}, **g),
        Row("cdt", "cdt", batch=batch["small"], limit_s=limits["fast"], **g),
        Row("evaluation", EVALUATION, batch=batch["small"], limit_s=limits["fast"], note="f(C), completeness, both MIB curves (22 circuits)", **g),
        Row("sfc", "sfc", batch=batch["small"], limit_s=limits["fast"], note="random TopK SAEs, 4 x d_model features, every residual stream", **g),
    ]
    shape = llama["model"]
    for step, b, n, predict in (
        ("eap", sizes["eap"], sizes["eap"], "eap"),
        ("eap_ig", sizes["eap_ig"], sizes["eap_ig"], "eap_ig"),
        (CACHE, sizes["cache"][1], sizes["cache"][0], "engine_state"),
        (PATCHED_CIRCUITS, sizes["patched"], sizes["patched"], "patched_circuits"),
    ):
        rows.append(Row(
            f"{shape}:{step}", step, shape, n, llama["length"], b, limits["llama"], settings={"steps": 5} if step == "eap_ig" else {},
            dtype=llama["dtype"], layers=llama["layers"], repeat=False, ratio=False, predict=predict, build_on_device=True,
        ))
    rows += [
        Row("path_patching", "path_patching", batch=batch["small"], limit_s=limits["slow"], settings={"max_depth": 2} if smoke else {}, **g),
        Row("exact", "exact", batch=batch["small"], limit_s=limits["slow"], **g),
        Row("acdc", "acdc", batch=batch["small"], limit_s=limits["slow"], metric="kl", settings={"tau": ACDC_TAU}, note=f"KL, tau {ACDC_TAU:g}", **g),
    ]
    if "edge_pruning" in methods:
        rows.append(Row("edge_pruning", "edge_pruning", batch=32 if not smoke else 4, limit_s=330 if not smoke else 60, **g))
    return rows


# ----------------------------------------------------------------------------------------
# The worker: runs rows, one JSON line per event on stdout
# ----------------------------------------------------------------------------------------
class Models:
    """The worker's current model and data (one model alive at a time: the Llama shape is 16 GB)."""

    def __init__(self, device: str):
        self.device = device
        self.key = None
        self.adapter = None
        self.data: dict = {}
        self.baselines: dict = {}

    def get(self, row: Row):
        import torch

        from common import build_model, random_pairs
        from circuitctl.models.adapter import ModelAdapter

        key = (row.model, row.layers, row.dtype)
        if key != self.key:
            self.adapter, self.data, self.baselines, self.key = None, {}, {}, None
            release(self.device)
            overrides = {"dtype": getattr(torch, row.dtype)} | ({"n_layers": row.layers} if row.layers else {})
            # GPT-2's shape is initialised on the CPU, as where ACDC_TAU was measured, then moved
            model = build_model(row.model, seed=0, device=self.device if row.build_on_device else None, **overrides)
            self.adapter, self.key = ModelAdapter(model.to(self.device)), key
        shape = (row.examples, row.length)
        if shape not in self.data:
            self.data[shape] = random_pairs(self.adapter.cfg.d_vocab, row.examples, row.length, seed=0)
        return self.adapter, self.data[shape]

    def baseline(self, row: Row, data) -> float:
        """A plain forward + backward over the row's pairs at its batch size (fastest of a few)."""
        from common import forward_backward, synchronize, timed

        key = (row.examples, row.length, row.batch)
        if key not in self.baselines:
            def once():
                forward_backward(self.adapter, data, row.batch)
                synchronize(self.device)

            first = timed(once)  # warm-up (kernels, allocator)
            self.baselines[key] = min(timed(once) for _ in range(max(2, min(10, int(2 / max(first, 1e-3))))))
        return self.baselines[key]

    def random_saes(self) -> str:
        """Small random TopK SAEs (4 x d_model features, k = 32 or d_model / 4) on every residual stream."""
        import torch

        from circuitctl.models.sae_sites import hook_name
        from circuitctl.sae.sae import SaeInfo, SparseAutoencoder
        from circuitctl.graph.naming import parse_site

        cfg = self.adapter.cfg
        directory = Path(tempfile.mkdtemp(prefix="gpu-check-saes-"))
        generator = torch.Generator().manual_seed(0)
        d, d_sae = cfg.d_model, 4 * cfg.d_model
        for layer in range(cfg.n_layers):
            site = f"resid{layer}"
            sae = SparseAutoencoder(d, d_sae, "topk", k=min(32, d // 4), info=SaeInfo(hook_name=hook_name(parse_site(site)), model_name="random"))
            directions = torch.randn(d_sae, d, generator=generator)
            directions /= directions.norm(dim=1, keepdim=True)
            with torch.no_grad():
                sae.W_dec.copy_(directions)
                sae.W_enc.copy_(directions.T)
            sae.save(directory / site)
        return str(directory)


def release(device: str) -> None:
    import gc

    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def predicted_bytes(row: Row, cfg) -> float:
    """What bench/memory_table.py predicts beyond the weights for the row's step."""
    import memory_table as mt

    sh = mt.Shape.from_cfg(row.model, cfg)
    s, P, B, N = mt.BYTES[row.dtype], row.length, row.batch, row.examples
    gpu = str(cfg.device).startswith("cuda")
    if row.predict == "eap":
        return mt.eap(sh, B, P, s)
    if row.predict == "eap_ig":
        return mt.eap_ig(sh, B, P, s, mt.eap_ig_steps_per_pass(row.settings.get("steps", 5), B, gpu))
    if row.predict == "engine_state":
        return mt.engine_state(sh, N, P, s)
    if row.predict == "patched_circuits":  # a batch's engine state stays alive beside its patched pass
        return mt.engine_state(sh, B, P, s) + mt.patched_pass(sh, B, P, s, mt.EVALUATION_K, True)
    raise ValueError(row.predict)


def measure(row: Row, models: Models) -> dict:
    import torch

    from common import run_step, synchronize, timed
    from circuitctl.config.schema import AblationConfig
    from circuitctl.methods.base import DiscoveryContext
    from circuitctl.metrics.metrics import METRICS

    device = models.device
    adapter, data = models.get(row)
    context = DiscoveryContext(adapter, data, METRICS.get(row.metric), AblationConfig())
    settings = dict(row.settings)
    if row.step == "sfc":
        settings["saes"] = models.random_saes()
    fwd_bwd = models.baseline(row, data) if row.ratio else None
    release(device)
    cuda = device.startswith("cuda")
    before = torch.cuda.memory_allocated() if cuda else 0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    passes, record = [], {}

    def run():
        passes.append(run_step(context, row.step, row.batch, settings, record))
        synchronize(device)

    try:
        seconds = timed(run)
        if row.repeat and seconds < 5:
            seconds = min([seconds] + [timed(run) for _ in range(2)])
    finally:
        if "saes" in settings:
            shutil.rmtree(settings["saes"], ignore_errors=True)
    result = {
        "seconds": seconds,
        "fwd_bwd_seconds": fwd_bwd,
        "ratio": seconds / fwd_bwd if fwd_bwd else None,
        "forward_passes": passes[0],
        "n_edges": adapter.graph.n_edges,
        **record,
        "allocated_before_mib": before / 2**20 if cuda else None,
        "peak_mib": (torch.cuda.max_memory_allocated() - before) / 2**20 if cuda else None,
    }
    if row.predict:
        result["predicted_mib"] = predicted_bytes(row, adapter.cfg) / 2**20
    return result


def worker(plan_file: str) -> None:
    """Run the rows of `plan_file`, printing JSON events; errors of one row do not stop the others."""
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    spec = json.loads(Path(plan_file).read_text())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    emit({"event": "hello", "device": torch.cuda.get_device_name() if device == "cuda" else f"CPU, {os.cpu_count()} cores",
          "device_kind": device, "torch": torch.__version__, "cuda": torch.version.cuda})
    models = Models(device)
    for raw in spec["rows"]:
        row = Row(**raw)
        emit({"event": "start", "row": row.id})
        try:
            emit({"event": "done", "row": row.id, "result": measure(row, models)})
        except Exception as exc:  # noqa: BLE001 - a failing row is reported, the next one runs
            message = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            emit({"event": "done", "row": row.id, "error": message})
            if device == "cuda" and isinstance(exc, torch.cuda.OutOfMemoryError):
                models.adapter, models.key = None, None
        finally:
            release(device)


def emit(event: dict) -> None:
    print(json.dumps(event), flush=True)


# ----------------------------------------------------------------------------------------
# The parent: steps, deadlines, results
# ----------------------------------------------------------------------------------------
class Report:
    """Everything measured so far; written (JSON + markdown) after every step."""

    def __init__(self, args, out_dir: Path):
        self.args, self.out_dir = args, out_dir
        self.started = time.perf_counter()
        self.meta = {
            "command": "python bench/gpu_check.py " + " ".join(sys.argv[1:]),
            "python": platform.python_version(), "smoke": args.smoke, "budget_s": args.budget,
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "device": None,
        }
        self.steps: dict = {}
        self.rows: list[dict] = []

    @property
    def name(self) -> str:
        device = self.meta["device"] or "unknown"
        slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")
        return f"gpu-{slug}" + ("-smoke" if self.args.smoke else "")

    def save(self) -> Path:
        self.meta["total_seconds"] = round(time.perf_counter() - self.started, 1)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        payload = {"meta": self.meta, "steps": self.steps, "rows": self.rows, "targets_s": TARGETS}
        path = self.out_dir / f"{self.name}.json"
        _write(path, json.dumps(payload, indent=1) + "\n")
        _write(self.out_dir / f"{self.name}.md", markdown(payload) + "\n")
        return path


def _write(path: Path, text: str) -> None:
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(text)
    temporary.replace(path)


def run_command(argv: list[str], limit: float, env: dict | None = None) -> dict:
    """Run a command with a time limit; its exit code, seconds and last output lines."""
    started = time.perf_counter()
    try:
        out = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=max(1.0, limit), env={**os.environ, **(env or {})})
        code, text = out.returncode, (out.stdout + out.stderr)
    except subprocess.TimeoutExpired as exc:
        code, text = None, ((exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or ""))
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return {"exit_code": code, "seconds": round(time.perf_counter() - started, 1), "tail": lines[-5:]}


def install_step(limit: float) -> dict:
    result = run_command(INSTALL, limit)
    if result["exit_code"] == 0:
        result["status"] = "installed"
    else:
        why = "stopped at its time limit" if result["exit_code"] is None else f"exit code {result['exit_code']}"
        result["status"] = f"install failed ({why}); going on with the installed packages"
    return result


def device_tests_step(limit: float, device: str) -> dict:
    result = run_command(DEVICE_TESTS, limit, {"CIRCUITCTL_TEST_DEVICE": device, "HF_HUB_OFFLINE": "1"})
    summary = result["tail"][-1] if result["tail"] else ""
    code = result["exit_code"]
    if code == 0:
        result["status"] = f"passed ({summary})"
    elif code == 5:
        result["status"] = "absent: no test is marked 'device' in this checkout (the device test tier is not here yet)"
    elif code is None:
        result["status"] = f"stopped at its time limit ({limit:.0f} s)"
    else:
        result["status"] = f"failed, exit code {code} ({summary})"
    return result


def cuda_device() -> str:
    """'cuda' when torch sees a GPU (asked in a subprocess: the parent stays light), else 'cpu'."""
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"], capture_output=True, text=True)
    return "cuda" if out.stdout.strip() == "True" else "cpu"


class Worker:
    """The worker process and a thread reading its JSON events."""

    def __init__(self, rows: list[Row], log_path: Path):
        self.plan_file = Path(tempfile.mkstemp(prefix="gpu-check-plan-", suffix=".json")[1])
        self.plan_file.write_text(json.dumps({"rows": [asdict(r) for r in rows]}))
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}
        self.log = open(log_path, "a")
        self.process = subprocess.Popen(
            [*WORKER, str(self.plan_file)], cwd=ROOT, env=env, text=True,
            stdout=subprocess.PIPE, stderr=self.log, start_new_session=True,
        )
        self.events: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            try:
                self.events.put(json.loads(line))
            except json.JSONDecodeError:
                continue  # something else printed on stdout
        self.events.put(None)  # end of output: the worker exited

    def next_event(self, deadline: float):
        """The next event, None if the worker exited, or 'timeout' at the deadline."""
        try:
            return self.events.get(timeout=max(0.0, deadline - time.perf_counter()))
        except queue.Empty:
            return "timeout"

    def stop(self) -> None:
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait()
        self.log.close()
        self.plan_file.unlink(missing_ok=True)


def benchmark_step(rows: list[Row], report: Report, deadline: float, log_path: Path, say) -> None:
    """Run the rows in a worker; a row past its limit (or the budget) is stopped and reported."""
    pending = list(rows)
    while pending:
        if deadline - time.perf_counter() < 5:
            for row in pending:
                report.rows.append({**asdict(row), "status": f"not run: the {report.args.budget:.0f} s budget was spent (--budget)"})
            report.save()
            return
        worker = Worker(pending, log_path)
        startup_deadline = min(deadline, time.perf_counter() + 180)
        hello = worker.next_event(startup_deadline)
        if not isinstance(hello, dict) or hello.get("event") != "hello":
            worker.stop()
            reason = "did not start in time" if hello == "timeout" else "exited at start-up"
            for row in pending:
                report.rows.append({**asdict(row), "status": f"failed: the worker {reason} (see {log_path.name})"})
            report.save()
            return
        if report.meta["device"] is None:
            report.meta.update(device=hello["device"], device_kind=hello["device_kind"], torch=hello["torch"], cuda=hello["cuda"])
        pending = run_rows(worker, pending, report, deadline, log_path, say)
        worker.stop()


def run_rows(worker: Worker, pending: list[Row], report: Report, deadline: float, log_path: Path, say) -> list[Row]:
    """Read the worker's rows in order; returns the rows still to run when it had to be stopped."""
    while pending:
        row = pending[0]
        row_deadline = min(deadline, time.perf_counter() + row.limit_s)
        event = worker.next_event(row_deadline)
        if isinstance(event, dict) and event.get("event") == "start":
            event = worker.next_event(row_deadline)
        if event == "timeout":
            over_budget = row_deadline >= deadline
            status = f"stopped: the {report.args.budget:.0f} s budget was spent" if over_budget else f"stopped at its {row.limit_s:.0f} s limit"
            report.rows.append({**asdict(row), "status": status})
            say(f"  {row.id}: {status}")
            report.save()
            return pending[1:]
        if event is None:
            report.rows.append({**asdict(row), "status": f"failed: the worker died (see {log_path.name}: {last_line(log_path)})"})
            say(f"  {row.id}: the worker died")
            report.save()
            return pending[1:]
        if "error" in event:
            report.rows.append({**asdict(row), "status": f"failed: {event['error']}"})
        else:
            report.rows.append({**asdict(row), "status": "ok", **event["result"]})
        say(f"  {row.id}: {summary(report.rows[-1])}")
        report.save()
        pending = pending[1:]
    return []


def last_line(path: Path) -> str:
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()] if path.exists() else []
    return lines[-1][:200] if lines else "no output"


def summary(r: dict) -> str:
    if r["status"] != "ok":
        return r["status"]
    text = f"{r['seconds']:.3g} s"
    if r.get("peak_mib") is not None:
        text += f", peak {r['peak_mib']:.0f} MiB"
    if r.get("predicted_mib") is not None:
        text += f" (predicted {r['predicted_mib']:.0f} MiB)"
    return text


# ----------------------------------------------------------------------------------------
# The markdown table
# ----------------------------------------------------------------------------------------
def verdict(r: dict, gpu: bool) -> tuple[str, str]:
    """(target, pass/fail) of a row; targets hold for the full run on a GPU only."""
    target = TARGETS.get(r["id"])
    if target is None:
        return "-", "-"
    if not gpu:
        return f"< {target:g} s", "n/a (not a GPU run)"
    if r["status"] == "ok":
        return f"< {target:g} s", "pass" if r["seconds"] < target else "FAIL"
    stopped = r["status"].startswith("stopped") and r["limit_s"] >= target
    return f"< {target:g} s", "FAIL (stopped)" if stopped else "-"


def _fmt(x, digits: int = 3) -> str:
    if x is None:
        return "-"
    return f"{x:.{digits}g}" if abs(x) < 10 else f"{x:,.0f}"


def markdown(payload: dict) -> str:
    meta, steps, rows = payload["meta"], payload["steps"], payload["rows"]
    gpu = meta.get("device_kind") == "cuda" and not meta["smoke"]
    lines = [
        f"{meta['device'] or 'device unknown'}, torch {meta.get('torch', '?')} (CUDA {meta.get('cuda') or '-'}), "
        f"{'smoke sizes' if meta['smoke'] else 'full sizes'}, {meta.get('total_seconds', 0):.0f} s in all; `{meta['command']}`",
        "",
    ]
    for name, step in steps.items():
        lines.append(f"- {name}: {step['status']} ({step['seconds']} s)")
    bench = [r for r in rows if not r.get("predict")]
    memory = [r for r in rows if r.get("predict")]
    if bench:
        r0 = bench[0]
        lines += [
            "",
            f"GPT-2-small shape{' (tiny shape: smoke)' if meta['smoke'] else ''}, random weights, {r0['examples']} pairs of {r0['length']} tokens; "
            "ratio = wall time / a plain forward + backward over the same pairs; peak = GPU memory allocated above the step's start.",
            "",
            "| step | batch | wall s | ratio to fwd+bwd | fwd-pass eq. | peak GPU MiB | target | pass / fail | note |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in bench:
            target, result = verdict(r, gpu)
            if r["status"] == "ok":
                ratio = f"{r['ratio']:.1f}x" if r.get("ratio") else "-"
                cells = [_fmt(r["seconds"]), ratio, _fmt(r["forward_passes"]), _fmt(r.get("peak_mib"))]
                kept = f"kept {r['edges_kept']:,} of {r['n_edges']:,} edges ({100 * r['edges_kept'] / r['n_edges']:.2f} %)" if "edges_kept" in r else ""
                note = "; ".join(x for x in (r["note"], kept) if x)
            else:
                cells, note = ["-"] * 4, r["status"] + (f"; {r['note']}" if r["note"] else "")
            lines.append(f"| {r['id']} | {r['batch']} | " + " | ".join(cells) + f" | {target} | {result} | {note} |")
    if memory:
        r0 = memory[0]
        lines += [
            "",
            f"{r0['model']} ({r0['layers'] or 'all'} layers), random weights, {r0['dtype']}, {r0['length']}-token prompts: "
            "peak GPU memory above the step's start against bench/memory_table.py.",
            "",
            "| step | batch | pairs | measured MiB | predicted MiB | measured / predicted | wall s | note |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in memory:
            if r["status"] == "ok":
                measured, predicted = r.get("peak_mib"), r.get("predicted_mib")
                share = f"{measured / predicted:.2f}" if measured is not None and predicted else "-"
                note = "" if measured is not None else "no CUDA: peaks are measured on a GPU only"
                lines.append(f"| {r['step']} | {r['batch']} | {r['examples']} | {_fmt(measured)} | {_fmt(predicted)} | {share} | {_fmt(r['seconds'])} | {note} |")
            else:
                lines.append(f"| {r['step']} | {r['batch']} | {r['examples']} | - | - | - | - | {r['status']} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (runs on the CPU in about a minute)")
    parser.add_argument("--skip-install", action="store_true", help="do not run the README's install command")
    parser.add_argument("--skip-tests", action="store_true", help="do not run the device test tier")
    parser.add_argument("--budget", type=float, default=None, help="seconds for everything (default 480; --smoke: 120)")
    parser.add_argument("--install-limit", type=float, default=150, help="seconds the install may take")
    parser.add_argument("--tests-limit", type=float, default=150, help="seconds the device test tier may take")
    parser.add_argument("--llama-layers", type=int, default=None, help="layers of the Llama-3-8B shape (default: all 32)")
    parser.add_argument("--only", nargs="*", help="only these rows (ids as in the table)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for gpu-<device>.json and .md")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        return
    args.budget = args.budget or (120.0 if args.smoke else 480.0)
    deadline = time.perf_counter() + args.budget

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    report = Report(args, args.out)
    if not args.skip_install:
        say(f"install: {' '.join(INSTALL[2:])}")
        report.steps["install"] = install_step(min(args.install_limit, deadline - time.perf_counter()))
        say(f"  {report.steps['install']['status']}")
    if not args.skip_tests:
        device = cuda_device()
        say(f"device tests: CIRCUITCTL_TEST_DEVICE={device} python -m pytest -m device -q")
        report.steps["device tests"] = device_tests_step(min(args.tests_limit, deadline - time.perf_counter()), device)
        say(f"  {report.steps['device tests']['status']}")
    from circuitctl.config.methods import METHODS  # no torch: the method table only

    rows = plan(args.smoke, args.llama_layers, METHODS.names())
    if args.only:
        rows = [r for r in rows if r.id in args.only]
    if "edge_pruning" not in METHODS.names():
        report.steps["edge pruning"] = {"status": "skipped: no method 'edge_pruning' in this checkout (circuitctl methods)", "seconds": 0}
    args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.out / f"gpu-check-worker{'-smoke' if args.smoke else ''}.log"
    log_path.write_text("")
    say(f"benchmarks: {len(rows)} rows, {deadline - time.perf_counter():.0f} s left of the {args.budget:.0f} s budget")
    benchmark_step(rows, report, deadline, log_path, say)
    path = report.save()
    print(markdown(json.loads(path.read_text())))
    say(f"wrote {path} and {path.with_suffix('.md')}")


if __name__ == "__main__":
    main()
