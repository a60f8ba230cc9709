"""Does an edit wreck the model? Its next-token loss on a text or token file, before and after.

The file is either text (tokenized with the model's tokenizer and cut into sequences,
`circuitctl.sae.tokens.text_tokens`), or JSON lines: each line a list of token ids or a string
(one sequence each; for models without a tokenizer, such as the planted ones, use token ids).

On text there is no paired corrupt prompt and no prompt template, so the edit ablates with
zero, or with the mean over the task's prompts taken over all positions; a config asking for
resample ablation is measured with zero ablation here (intervention.json says so). SAE features
are ablated by rewriting each SAE site as decode(features) + error with the ablated parts
replaced; heads, MLPs and neurons through weights that compute the ablation
(`circuitctl.interventions.weights`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from circuitctl.errors import UsageError
from circuitctl.sae.tokens import TokenSet

MAX_SEQUENCES = 256
MAX_LENGTH = 128


@dataclass
class TextEffect:
    file: str
    n_sequences: int
    n_predicted_tokens: int
    ablation: str  # what the text measurement ablated with
    loss_before: float
    loss_after: float

    def to_dict(self) -> dict:
        return {**self.__dict__, "loss_change": self.loss_after - self.loss_before}


def text_ablation(ablation) -> str:
    """The ablation a text measurement uses for the config's `ablation`."""
    if ablation.type == "mean":
        return "mean (over the task's prompts, all positions)"
    if ablation.type == "resample":
        return "zero (resample needs paired prompts, which text has not)"
    return "zero"


def check_text_source(path: Path, adapter) -> None:
    """A plain text file needs the model's tokenizer (planted models have none: use token ids)."""
    if path.suffix != ".jsonl" and adapter.tokenizer is None:
        raise UsageError(f"--text: '{path}' is text but the model has no tokenizer; give JSON lines (a .jsonl file) of token-id lists")


def read_tokens(path: Path, adapter) -> TokenSet:
    """Sequences of token ids from a text file or a JSON-lines file (lists of ids, or strings)."""
    from circuitctl.sae.tokens import text_tokens, texts_tokens

    if not path.is_file():
        raise UsageError(f"--text: '{path}' does not exist")
    check_text_source(path, adapter)
    length = min(adapter.cfg.n_ctx, MAX_LENGTH)
    bos = adapter.bos_token_id()
    if path.suffix != ".jsonl":
        return text_tokens(path, adapter.tokenizer, MAX_SEQUENCES, length, bos)
    rows: list = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{path} line {number}: not valid JSON ({exc.msg})") from exc
        if isinstance(item, str) and item:
            rows.append(item)
        elif isinstance(item, list) and len(item) >= 2 and all(isinstance(t, int) and not isinstance(t, bool) for t in item):
            bad = [t for t in item if not 0 <= t < adapter.d_vocab]
            if bad:
                raise UsageError(f"{path} line {number}: token id {bad[0]} is outside the vocabulary (0..{adapter.d_vocab - 1})")
            rows.append(item[:length])
        else:
            raise UsageError(f"{path} line {number}: expected a list of at least two token ids or a non-empty string")
    if not rows:
        raise UsageError(f"{path}: no sequences")
    if len({type(r) for r in rows}) > 1:
        raise UsageError(f"{path}: mixes token-id lists and strings; use one kind")
    rows = rows[:MAX_SEQUENCES]
    if isinstance(rows[0], str):
        return texts_tokens(rows, adapter.tokenizer, bos, length, str(path))
    width = max(len(r) for r in rows)
    tokens = torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.long, device="cpu")
    return TokenSet(tokens, torch.tensor([len(r) for r in rows], device="cpu"), str(path))


def next_token_loss(tokens: TokenSet, batch_size: int, logits_of) -> tuple[float, int]:
    """Mean next-token cross-entropy over the real tokens (this rank's share of the sequences,
    all-reduced); `logits_of(tokens [B, P]) -> [B, P, vocab]`."""
    from circuitctl import distributed

    start, stop = distributed.shard_range(tokens.n)
    total = torch.zeros(2, dtype=torch.float64, device="cpu")
    with torch.no_grad():
        for lo in range(start, stop, batch_size):
            hi = min(lo + batch_size, stop)
            ids, lengths = tokens.tokens[lo:hi], tokens.lengths[lo:hi]
            logits = logits_of(ids).float().cpu()
            targets = ids[:, 1:].cpu()
            real = torch.arange(1, ids.shape[1], device="cpu")[None] < lengths[:, None].cpu()
            losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets, reduction="none")
            total += torch.tensor([float((losses * real).sum()), float(real.sum())], dtype=torch.float64, device="cpu")
    total = distributed.all_reduce_sum(total)
    return float(total[0] / total[1].clamp(min=1)), int(total[1])


def feature_edits(space, keep: torch.Tensor, ablation, session, batch_size: int) -> dict:
    """{site: edit} that ablate the features and error nodes outside `keep` at every position."""
    from circuitctl.circuits.features import mean_states
    from circuitctl.models.sae_sites import SiteRunner

    if space.layout is not None:
        raise UsageError("--text: a per-position feature circuit names features at the task's positions, which text does not have")
    means = None
    if ablation.type == "mean":
        runner = SiteRunner(session.adapter.model, space.saes)
        means = mean_states(runner, space.saes, session.data, batch_size, per_position=False)
    edits = {}
    for site, sae in space.saes.items():
        block = space.site_view(keep, site)[0].to(session.adapter.device)  # [d_sae + 1]
        keep_f, keep_e = block[:-1], block[-1]
        if means is not None:
            f_abl, e_abl = means[site][0][0, 0], means[site][1][0, 0]
        else:
            f_abl = torch.zeros(sae.d_sae, dtype=session.adapter.dtype, device=session.adapter.device)
            e_abl = torch.zeros(session.adapter.cfg.d_model, dtype=session.adapter.dtype, device=session.adapter.device)
        edits[site] = _ablate(sae, keep_f, keep_e, f_abl, e_abl)
    return edits


def _ablate(sae, keep_f, keep_e, f_abl, e_abl):
    from circuitctl.circuits.features import decompose

    def edit(x: torch.Tensor) -> torch.Tensor:
        f, e = decompose(sae, x)
        return sae.decode(torch.where(keep_f, f, f_abl)) + torch.where(keep_e, e, e_abl)

    return edit


def measure_text(path: Path, space, keep: torch.Tensor, session, batch_size: int, weight_changes=None) -> TextEffect:
    """The model's next-token loss on the file, before and after the edit (SAE edits for feature
    spaces, `weight_changes` for heads, MLPs and neurons)."""
    from circuitctl.interventions.weights import weights_edited
    from circuitctl.models.sae_sites import SiteRunner

    model, device = session.adapter.model, session.adapter.device
    tokens = read_tokens(path, session.adapter)
    plain = lambda ids: model(ids.to(device), return_type="logits")  # noqa: E731
    before, n_tokens = next_token_loss(tokens, batch_size, plain)
    ablation = session.config.ablation
    if space.kind == "feature":
        runner = SiteRunner(model, space.saes)
        edits = feature_edits(space, keep, ablation, session, batch_size)
        after, _ = next_token_loss(tokens, batch_size, lambda ids: runner.forward(ids.to(device), None, edits))
    else:
        with weights_edited(model, weight_changes or {}):
            after, _ = next_token_loss(tokens, batch_size, plain)
    return TextEffect(str(path), tokens.n, n_tokens, text_ablation(ablation), before, after)
