"""The same config and seed give byte-identical outputs on CPU (apart from the creation time
and the timings), every output records its provenance, and `discover --from RUN_DIR` reruns
a recorded run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

VOLATILE = ("created", "timings")  # the only fields allowed to differ between identical runs
FILES = ("circuit.mib.json", "circuit.dot", "config.yaml")


@pytest.fixture(scope="module")
def planted_dirs(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    from circuitctl.testing import planted

    root = tmp_path_factory.mktemp("planted")
    return {name: planted.export(planted.build(name), root / name / "model", root / name / "task") for name in ("layernorm_mlp", "mlp_neurons")}


def write_config(path: Path, model: Path, task: Path, method: str, output: Path) -> Path:
    config = {
        "model": {"path": str(model), "device": "cpu"},
        # a seeded subsample of the pairs, so the seed matters
        "task": {"path": str(task), "n_pairs": 16},
        "method": {"name": method, "batch_size": 5},
        "selection": {"top_n": 8},
        "output": {"dir": str(output)},
        "seed": 7,
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def cli(args: list[str], capsys=None) -> tuple[int, str]:
    """Run the CLI entry point in-process; return (exit code, stderr if captured)."""
    from circuitctl.cli.app import main

    if capsys is not None:
        capsys.readouterr()
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err if capsys is not None else ""


def contains(full: dict, part: dict) -> bool:
    return all(contains(full[k], v) if isinstance(v, dict) else full.get(k) == v for k, v in part.items())


def circuit_text_without_volatile(run_dir: Path, drop_output: bool = False) -> str:
    """circuit.json as written, with the volatile fields blanked; checks that re-serializing
    reproduces the file exactly, so equal results mean byte-identical files."""
    raw = (run_dir / "circuit.json").read_text()
    record = json.loads(raw)
    assert json.dumps(record, indent=1) + "\n" == raw
    for key in VOLATILE:
        assert key in record
        record[key] = None
    if drop_output:
        record["config"]["output"] = None
    return json.dumps(record, indent=1)


def run_twice(model: Path, task: Path, method: str, root: Path, capsys) -> tuple[Path, Path, Path]:
    """Run one config twice into the same directory (--force the second time); return
    (config, copy of the first run, the second run)."""
    run = root / "run"
    config = write_config(root / "run.yaml", model, task, method, run)
    code, err = cli(["discover", str(config)], capsys)
    assert code == 0, err
    first = root / "first"
    shutil.copytree(run, first)
    code, err = cli(["discover", str(config), "--force"], capsys)
    assert code == 0, err
    return config, first, run


@pytest.fixture(scope="module")
def eap_runs(planted_dirs, tmp_path_factory):
    """Shared by several tests; none of them modifies these directories."""
    return run_twice(*planted_dirs["layernorm_mlp"], "eap", tmp_path_factory.mktemp("eap"), None)


def assert_identical(first: Path, second: Path) -> None:
    assert circuit_text_without_volatile(second) == circuit_text_without_volatile(first)
    for name in FILES:
        assert (second / name).read_bytes() == (first / name).read_bytes(), name
    record = json.loads((second / "circuit.json").read_text())
    assert 0 < record["results"]["n_edges_in_circuit"] < record["results"]["n_edges_total"]


def test_eap_twice_gives_identical_files(eap_runs):
    _, first, second = eap_runs
    assert_identical(first, second)


def test_exact_twice_gives_identical_files(planted_dirs, tmp_path, capsys):
    _, first, second = run_twice(*planted_dirs["mlp_neurons"], "exact", tmp_path, capsys)
    assert_identical(first, second)


def test_outputs_record_config_hash_versions_and_seed(eap_runs, tmp_path, capsys):
    from circuitctl.config.load import config_hash, load_config

    config, _, run = eap_runs
    code, err = cli(["evaluate", "faithfulness", str(run), "--out", str(tmp_path)], capsys)
    assert code == 0, err

    recorded = yaml.safe_load((run / "config.yaml").read_text())
    assert contains(recorded, yaml.safe_load(config.read_text()))  # the given config, defaults filled in
    expected_hash = config_hash(load_config(run / "config.yaml"))
    assert expected_hash == config_hash(load_config(config))
    circuit = json.loads((run / "circuit.json").read_text())
    faithfulness = json.loads((tmp_path / "faithfulness.json").read_text())["provenance"]
    for record in (circuit, faithfulness):
        assert record["config"] == recorded
        assert record["config_hash"] == expected_hash
        assert record["seed"] == 7
        versions = record["library_versions"]
        assert {"python", "circuitctl", "torch", "transformer-lens"} <= set(versions)
        assert "not installed" not in (versions["torch"], versions["transformer-lens"])


def test_rerun_from_a_run_directory(eap_runs, tmp_path, capsys):
    _, _, run1 = eap_runs
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in run1.iterdir()}

    # the recorded config names run1 as its output: a rerun must not replace it silently
    code, err = cli(["discover", "--from", str(run1)], capsys)
    assert code == 2 and "holds an earlier run" in err and "--force" in err
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in run1.iterdir()} == before

    run2 = tmp_path / "run2"
    code, err = cli(["discover", "--from", str(run1), f"output.dir={run2}"], capsys)
    assert code == 0, err
    assert circuit_text_without_volatile(run2, drop_output=True) == circuit_text_without_volatile(run1, drop_output=True)
    for name in ("circuit.mib.json", "circuit.dot"):
        assert (run2 / name).read_bytes() == (run1 / name).read_bytes(), name
    first, second = (json.loads((r / "circuit.json").read_text()) for r in (run1, run2))
    assert second["config_hash"] == first["config_hash"]  # same experiment, other directory
    assert second["config"]["output"]["dir"] == str(run2)

    # run2 records itself as output: --force reruns it in place, with the same result
    reference = circuit_text_without_volatile(run2)
    code, err = cli(["discover", "--from", str(run2), "--force"], capsys)
    assert code == 0, err
    assert circuit_text_without_volatile(run2) == reference
