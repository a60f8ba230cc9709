#!/usr/bin/env python
"""Train the toy GPT shipped in ``models/toy-gpt`` on the synthetic language.

The language (IOI-style sentences, repeated random-token sequences, filler) lives in
``circuitctl/testing/toy_language.py``. The script trains a small TransformerLens
``HookedTransformer`` with AdamW on CPU, evaluates it on held-out IOI and induction prompt
pairs, and writes:

* ``<out>/config.json``        the HookedTransformerConfig arguments
* ``<out>/model.safetensors``  ``model.state_dict()``
* ``<out>/tokenizer.json``     the word-level tokenizer
* ``<out>/README.md``          what it is, how it was trained, how well it does
* ``<tasks-dir>/toy-ioi/`` and ``<tasks-dir>/toy-induction/``  task.yaml + pairs.jsonl

Example::

    python scripts/train_toy_model.py --out models/toy-gpt --seed 0 --steps 4000
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import yaml  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformer_lens import HookedTransformer, HookedTransformerConfig  # noqa: E402

from circuitctl.testing import toy_language as lang  # noqa: E402

# Fixed seeds for the shipped task pairs and for the held-out evaluation pairs.
TASK_SEEDS = {"toy-ioi": 1001, "toy-induction": 1002}
EVAL_SEEDS = {"toy-ioi": 2001, "toy-induction": 2002}
N_TASK_PAIRS = 64
N_EVAL_PAIRS = 512


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("models/toy-gpt"), help="checkpoint folder")
    p.add_argument("--tasks-dir", type=Path, default=Path("tasks"),
                   help="where to write toy-ioi/ and toy-induction/ (use --no-tasks to skip)")
    p.add_argument("--no-tasks", action="store_true", help="do not write task folders")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--n-layers", type=int, default=2)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--n-ctx", type=int, default=32)
    p.add_argument("--threads", type=int, default=2,
                   help="torch CPU threads; 1 makes runs bit-for-bit reproducible (with 2, "
                        "parallel reductions in the backward pass differ in the last bits)")
    p.add_argument("--eval-every", type=int, default=500)
    return p.parse_args(argv)


def model_config(args: argparse.Namespace) -> dict:
    """The keyword arguments of HookedTransformerConfig (shipped as config.json)."""
    return {
        "model_name": "toy-gpt",
        "n_layers": args.n_layers,
        "d_model": args.d_model,
        "n_heads": args.n_heads,
        "d_head": args.d_model // args.n_heads,
        "d_mlp": 4 * args.d_model,
        "d_vocab": len(lang.vocabulary()),
        "n_ctx": args.n_ctx,
        "act_fn": "gelu",
        "normalization_type": "LN",
        "positional_embedding_type": "standard",
        "default_prepend_bos": True,
        "tokenizer_prepends_bos": True,
        "seed": args.seed,
        "device": "cpu",
    }


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------
WORD_TO_ID = {word: i for i, word in enumerate(lang.vocabulary())}
BOS_ID, PAD_ID = WORD_TO_ID[lang.BOS], WORD_TO_ID[lang.PAD]


def encode_batch(texts: list[str], n_ctx: int) -> torch.Tensor:
    """BOS + word ids, right-padded with <pad> to the longest text (at most n_ctx)."""
    rows = [[BOS_ID] + [WORD_TO_ID[w] for w in text.split()] for text in texts]
    width = max(len(r) for r in rows)
    if width > n_ctx:
        raise ValueError(f"a training text has {width} tokens, more than n_ctx={n_ctx}")
    return torch.tensor([r + [PAD_ID] * (width - len(r)) for r in rows])


def training_batch(step: int, args: argparse.Namespace) -> torch.Tensor:
    return encode_batch(lang.sample_corpus(args.batch_size, seed=args.seed * 1_000_003 + step),
                        args.n_ctx)


def lm_loss(model: HookedTransformer, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens)
    targets = tokens[:, 1:].clone()
    targets[targets == PAD_ID] = -100
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=-100)


# --------------------------------------------------------------------------------------------
# Evaluation on prompt pairs
# --------------------------------------------------------------------------------------------
def last_token_logits(model: HookedTransformer, prompts: list[str]) -> torch.Tensor:
    """Logits after the last word of each prompt.

    Prompts are right-padded and read at their own last position: with left padding,
    HookedTransformer's forward would only mask the pads (and shift the learned positions) if
    the tokenizer's padding_side were "left".
    """
    tokens = model.to_tokens(prompts, padding_side="right")
    last = torch.tensor([len(p.split()) for p in prompts])  # BOS is index 0
    return model(tokens)[torch.arange(len(prompts)), last]


@torch.no_grad()
def evaluate_pairs(model: HookedTransformer, records: list[dict]) -> dict[str, float]:
    """Top-1 accuracy and mean logit diff (answer - wrong answer) on clean and corrupt prompts."""
    answer = torch.tensor([WORD_TO_ID[r["answers"][0]] for r in records])
    wrong = torch.tensor([WORD_TO_ID[r["wrong_answers"][0]] for r in records])
    metrics = {}
    for kind in ("clean", "corrupt"):
        last = last_token_logits(model, [r[kind] for r in records])
        logit_diff = last.gather(1, answer[:, None]) - last.gather(1, wrong[:, None])
        metrics[f"{kind}_accuracy"] = (last.argmax(-1) == answer).float().mean().item()
        metrics[f"{kind}_logit_diff"] = logit_diff.mean().item()
    return metrics


def eval_sets() -> dict[str, list[dict]]:
    return {
        "toy-ioi": lang.ioi_pairs(N_EVAL_PAIRS, seed=EVAL_SEEDS["toy-ioi"]),
        "toy-induction": lang.induction_pairs(N_EVAL_PAIRS, seed=EVAL_SEEDS["toy-induction"]),
    }


def format_metrics(results: dict[str, dict[str, float]]) -> str:
    return "  ".join(
        f"{task}: acc {m['clean_accuracy']:.3f} ld {m['clean_logit_diff']:+.2f} "
        f"(corrupt acc {m['corrupt_accuracy']:.3f} ld {m['corrupt_logit_diff']:+.2f})"
        for task, m in results.items()
    )


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------
def train(model: HookedTransformer, args: argparse.Namespace, evals: dict) -> float:
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98),
                                  weight_decay=args.weight_decay)

    def lr_factor(step: int) -> float:  # linear warmup, then cosine decay to 10 %
        if step < args.warmup:
            return (step + 1) / args.warmup
        progress = (step - args.warmup) / max(1, args.steps - args.warmup)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    start = time.perf_counter()
    running = None
    for step in range(args.steps):
        model.train()
        loss = lm_loss(model, training_batch(step, args))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            model.eval()
            elapsed = time.perf_counter() - start
            print(f"step {step + 1:5d}  loss {running:.3f}  {elapsed:6.0f}s  "
                  f"{format_metrics({k: evaluate_pairs(model, v) for k, v in evals.items()})}",
                  flush=True)
    model.eval()
    return time.perf_counter() - start


# --------------------------------------------------------------------------------------------
# Writing the checkpoint and the tasks
# --------------------------------------------------------------------------------------------
def save_checkpoint(model: HookedTransformer, cfg_kwargs: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg_kwargs, indent=2) + "\n")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    lang.build_tokenizer().save(str(out / "tokenizer.json"))


TASK_DESCRIPTIONS = {
    "toy-ioi": "Indirect object identification on the toy language: the prompt ends right "
               "before the indirect object; corrupt prompts replace IO, S1 and S2 with three "
               "other names (ABC). Metric: logit(IO) - logit(S).",
    "toy-induction": "Induction on repeated random tokens: prompt = seq + seq[:-1], answer "
                     "seq[-1]; corrupt prompts replace the first copy of seq with other random "
                     "tokens. Metric: logit(answer) - logit(corrupt first copy's last token).",
}
TASK_POSITIONS = {"toy-ioi": ["IO", "S1", "S2", "end"],
                  "toy-induction": ["first_occurrence", "end"]}


def write_tasks(tasks_dir: Path) -> None:
    generators = {"toy-ioi": lang.ioi_pairs, "toy-induction": lang.induction_pairs}
    for name, generate in generators.items():
        folder = tasks_dir / name
        folder.mkdir(parents=True, exist_ok=True)
        spec = {"name": name, "version": 1, "description": TASK_DESCRIPTIONS[name],
                "pairs": "pairs.jsonl", "metric": "logit_diff",
                "positions": TASK_POSITIONS[name]}
        (folder / "task.yaml").write_text(yaml.safe_dump(spec, sort_keys=False, width=100))
        records = generate(N_TASK_PAIRS, seed=TASK_SEEDS[name])
        (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


README_TEMPLATE = """\
# toy-gpt

A {n_layers}-layer GPT-style TransformerLens `HookedTransformer` ({n_params:,} parameters)
trained from scratch on the synthetic word-level language of
`circuitctl/testing/toy_language.py`: IOI-style sentences ("when mary and john went to the
store , john gave a drink to mary ."), repeated random-token sequences (for induction) and
filler sentences. It is small enough to run circuit discovery on a laptop CPU and it solves
both shipped tasks, `tasks/toy-ioi` and `tasks/toy-induction`.

| | |
|---|---|
| architecture | {n_layers} layers, d_model {d_model}, {n_heads} heads (d_head {d_head}), d_mlp {d_mlp}, LayerNorm, GELU, learned positions, n_ctx {n_ctx} |
| vocabulary | {d_vocab} words (word-level; `<pad>`=0, `<unk>`=1, `<bos>`=2, `<eos>`=3) |
| training | AdamW, lr {lr}, batch {batch_size}, {steps} steps, seed {seed}, {threads} CPU thread(s) |
| training time | {train_time:.0f} s on CPU |

## Files

* `config.json`: the keyword arguments of `HookedTransformerConfig`.
* `model.safetensors`: `model.state_dict()`.
* `tokenizer.json`: a `tokenizers` WordLevel tokenizer (whitespace split).

## Loading

```python
import json
from safetensors.torch import load_file
from transformers import PreTrainedTokenizerFast
from transformer_lens import HookedTransformer, HookedTransformerConfig

cfg = HookedTransformerConfig(**json.load(open("models/toy-gpt/config.json")))
tok = PreTrainedTokenizerFast(
    tokenizer_file="models/toy-gpt/tokenizer.json",
    name_or_path="models/toy-gpt",  # TransformerLens reads init_kwargs["name_or_path"]
    add_bos_token=True,             # so TransformerLens uses this tokenizer as is
    bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
)
model = HookedTransformer(cfg, tokenizer=tok)
model.load_state_dict(load_file("models/toy-gpt/model.safetensors"))
model.eval()
model.to_tokens("when mary and john")  # tensor([[2, ...]]): BOS prepended
```

(`circuitctl.testing.toy_language.load_hf_tokenizer(path)` builds the same tokenizer.)

What TransformerLens 3.9 needs from the tokenizer:

* `name_or_path` must be in the tokenizer's `init_kwargs`: `set_tokenizer` pops it and raises
  `KeyError: 'name_or_path'` for a `PreTrainedTokenizerFast(tokenizer_file=...)` built without it.
* `add_bos_token=True`: otherwise `set_tokenizer` tries
  `AutoTokenizer.from_pretrained(name_or_path, add_bos_token=True)` to get a BOS-adding copy.
  With it, the tokenizer prepends `<bos>` itself, TransformerLens detects
  `tokenizer_prepends_bos=True`, and `to_tokens(..., prepend_bos=False)` strips it again.
* `eos_token`: without one TransformerLens sets it to `<|endoftext|>`, which is not in the
  vocabulary; `<eos>` is in it (it is never used in training).
* Padding side is right (the TransformerLens default). When batching prompts of different
  lengths, read each prompt's logits at its own last token. Left padding works only if
  `tokenizer.padding_side == "left"` (HookedTransformer's forward builds the attention mask
  and shifts the learned positions only then), not by passing `padding_side="left"` to
  `to_tokens` alone.

## Evaluation

On {n_eval} held-out pairs per task (same generators as the shipped tasks, other seeds).
Accuracy is top-1 over the whole vocabulary at the last position; the logit difference is
answer minus wrong answer (IOI: IO - S; induction: answer - the corrupt first copy's last
token).

| task | clean accuracy | clean logit diff | corrupt accuracy | corrupt logit diff |
|---|---|---|---|---|
{eval_rows}

## Reproduce

```
{command}
```

With `--threads 1` the run is reproducible bit for bit; with more threads, parallel reductions
in the backward pass make the weights differ slightly from run to run.
"""


def write_readme(out: Path, args: argparse.Namespace, cfg_kwargs: dict, n_params: int,
                 train_time: float, results: dict) -> None:
    rows = "\n".join(
        f"| {task} | {m['clean_accuracy']:.3f} | {m['clean_logit_diff']:+.2f} | "
        f"{m['corrupt_accuracy']:.3f} | {m['corrupt_logit_diff']:+.2f} |"
        for task, m in results.items()
    )
    command = ("python scripts/train_toy_model.py " + " ".join(sys.argv[1:])).strip()
    (out / "README.md").write_text(README_TEMPLATE.format(
        **cfg_kwargs, n_params=n_params, lr=args.lr, batch_size=args.batch_size,
        steps=args.steps, threads=args.threads, train_time=train_time,
        n_eval=N_EVAL_PAIRS, eval_rows=rows, command=command,
    ))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    cfg_kwargs = model_config(args)
    model = HookedTransformer(HookedTransformerConfig(**cfg_kwargs))
    # The tokenizer is attached only for evaluation; training encodes words with WORD_TO_ID,
    # which assigns the same ids (checked here).
    args.out.mkdir(parents=True, exist_ok=True)
    lang.build_tokenizer().save(str(args.out / "tokenizer.json"))
    model.set_tokenizer(lang.load_hf_tokenizer(args.out / "tokenizer.json"))
    sample = lang.sample_corpus(8, seed=args.seed)
    assert torch.equal(model.to_tokens(sample, padding_side="right"),
                       encode_batch(sample, args.n_ctx)), "tokenizer ids differ from WORD_TO_ID"

    n_params = sum(p.numel() for p in model.parameters())
    print(f"toy-gpt: {n_params:,} parameters, {args.steps} steps", flush=True)
    evals = eval_sets()
    train_time = train(model, args, evals)
    results = {task: evaluate_pairs(model, records) for task, records in evals.items()}
    print(f"trained in {train_time:.0f}s\n{format_metrics(results)}", flush=True)

    save_checkpoint(model, cfg_kwargs, args.out)
    write_readme(args.out, args, cfg_kwargs, n_params, train_time, results)
    if not args.no_tasks:
        write_tasks(args.tasks_dir)
    print(f"wrote {args.out}" + ("" if args.no_tasks else f" and {args.tasks_dir}/toy-*"))


if __name__ == "__main__":
    main()
