"""Huge task files: peak memory and time of validating, subsampling and tokenizing 100,000 pairs.

    python bench/bench_task_files.py [--pairs 100000] [--subsample 100]

Two files of `--pairs` pairs: text prompts (toy IOI sentences, tokenized with the shipped
toy-gpt tokenizer, 14 tokens a prompt) and token ids (6 a prompt). Each step runs in a fresh
process; "peak MB" is the peak RSS above the process's RSS once everything is imported and
the tokenizer loaded. "before" rows run the reading and tokenization of commit 301623c (the
whole file read into memory, every pair kept as an object, Python lists of token ids),
reproduced here as the baseline; "now" rows run circuitctl's streaming code. Times on a
shared machine are noisy: compare memory, and times only within one run.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import peak_rss_mb, run_inner, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER_DIR = ROOT / "models" / "toy-gpt"
STEPS = ("validate", "subsample", "tokenize all")


def make_files(directory: Path, n: int) -> dict[str, Path]:
    """A text task (toy IOI pairs repeated) and a token-id task of n pairs each."""
    text_pairs = [json.loads(line) for line in (ROOT / "tasks" / "toy-ioi" / "pairs.jsonl").read_text().splitlines()]
    rng = random.Random(0)
    files = {"text": directory / "text.jsonl", "ids": directory / "ids.jsonl"}
    with open(files["text"], "w") as text, open(files["ids"], "w") as ids:
        for i in range(n):
            text.write(json.dumps(text_pairs[i % len(text_pairs)]) + "\n")
            clean = [rng.randrange(12) for _ in range(6)]
            corrupt = [(clean[0] + 1) % 12] + clean[1:]
            ids.write(json.dumps({"clean": clean, "corrupt": corrupt, "answers": [clean[0]], "wrong_answers": [corrupt[0]]}) + "\n")
    return files


# -- the baseline: reading and tokenizing as at commit 301623c ---------------------------------
def read_before(path: Path):
    from circuitctl.tasks.records import pair_from_record

    pairs = []
    for number, text in enumerate(path.read_text().splitlines(), start=1):
        if text.strip():
            pairs.append(pair_from_record(json.loads(text), f"{path} line {number}", number))
    return tuple(pairs)


def tokenize_before(pairs, tokenizer, d_vocab: int, bos):
    import torch

    from circuitctl.tasks.data import _encode_answer, _encode_prompt

    cleans, corrupts, answers, wrongs, positions = [], [], [], [], []
    for pair in pairs:
        clean, offset = _encode_prompt(pair.clean, tokenizer, bos, d_vocab, "x", "clean")
        corrupt, _ = _encode_prompt(pair.corrupt, tokenizer, bos, d_vocab, "x", "corrupt")
        cleans.append(clean)
        corrupts.append(corrupt)
        answers.append([_encode_answer(a, tokenizer, d_vocab, "x", "answer") for a in pair.answers])
        wrongs.append([_encode_answer(a, tokenizer, d_vocab, "x", "wrong answer") for a in pair.wrong_answers])
        positions.append({k: v + offset for k, v in pair.positions.items()})
    length = max(map(len, cleans))

    def pad(rows, width, value):
        return torch.tensor([row + [value] * (width - len(row)) for row in rows], dtype=torch.long)

    labels = sorted(positions[0])
    return (pad(cleans, length, 0), pad(corrupts, length, 0), pad(answers, max(map(len, answers)), -1),
            pad(wrongs, max(map(len, wrongs)), -1), {k: torch.tensor([p[k] for p in positions]) for k in labels})


# -- one step in this process ---------------------------------------------------------------
def inner(step: str, version: str, kind: str, path: str, subsample: int) -> dict:
    import torch  # noqa: F401  (imported before the baseline RSS is taken)

    from circuitctl.tasks import pair_file  # noqa: F401
    from circuitctl.tasks.data import task_pairs, tokenize_pairs
    from circuitctl.tasks.records import read_task

    tokenizer, d_vocab, bos = None, 12, None
    if kind == "text":
        from transformers import PreTrainedTokenizerFast

        tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(TOKENIZER_DIR / "tokenizer.json"))
        d_vocab = json.loads((TOKENIZER_DIR / "config.json").read_text())["d_vocab"]
    baseline = peak_rss_mb()
    started = time.perf_counter()
    path = Path(path)
    if version == "before":
        pairs = read_before(path)
        if step == "subsample":
            pairs = random.Random(0).sample(pairs, subsample)
        if step != "validate":
            tokenize_before(pairs, tokenizer, d_vocab, bos)
        n = len(pairs)
    else:
        source = read_task(None, path, Path('/nonexistent-shipped-tasks'))  # a file: no shipped task is looked up
        pairs = source.pairs
        if step == "subsample":
            pairs = task_pairs(source, tokenizer, subsample, 0, {})
        if step != "validate":
            n = tokenize_pairs(pairs, tokenizer, d_vocab, bos, str(path)).n
        else:
            n = len(pairs)
    seconds = time.perf_counter() - started
    return {"step": step, "version": version, "kind": kind, "pairs": n, "seconds": seconds,
            "peak_mb": peak_rss_mb() - baseline, "baseline_mb": baseline}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inner", nargs=5, help=argparse.SUPPRESS)
    parser.add_argument("--pairs", type=int, default=100_000)
    parser.add_argument("--subsample", type=int, default=100)
    args = parser.parse_args()
    if args.inner:
        step, version, kind, path, subsample = args.inner
        print(json.dumps(inner(step, version, kind, path, int(subsample))))
        return
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        files = make_files(Path(directory), args.pairs)
        for kind, path in files.items():
            size_mb = path.stat().st_size / 2**20
            for step in STEPS:
                for version in ("before", "now"):
                    row = run_inner(__file__, [step, version, kind, str(path), str(args.subsample)])
                    row["file_mb"] = size_mb
                    rows.append(row)
                    print(f"{kind:5} {step:13} {version:6} {row['pairs']:>7} pairs  {row['seconds']:7.2f} s  peak +{row['peak_mb']:7.1f} MB", flush=True)
    print()
    print(f"{args.pairs:,} pairs; peak RSS above the process's RSS after imports (MB), time (s); before = commit 301623c")
    print()
    print("| file | step | before: peak MB | now: peak MB | before: s | now: s |")
    print("|---|---|---|---|---|---|")
    for kind in files:
        size = next(r["file_mb"] for r in rows if r["kind"] == kind)
        for step in STEPS:
            before, now = (next(r for r in rows if (r["kind"], r["step"], r["version"]) == (kind, step, v)) for v in ("before", "now"))
            label = f"{step} ({args.subsample} pairs)" if step == "subsample" else step
            print(f"| {kind} ({size:.1f} MB) | {label} | {before['peak_mb']:.1f} | {now['peak_mb']:.1f} | {before['seconds']:.2f} | {now['seconds']:.2f} |")
    path = write_results("task_files", {"pairs": args.pairs, "subsample": args.subsample, "rows": rows})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
