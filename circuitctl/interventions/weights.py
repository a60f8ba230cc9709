"""Interventions baked into the weights, and the edited checkpoint ``--export DIR`` writes.

An ablation can be written into the weights when the ablated value does not depend on the
prompt or the position:

* zero ablation of a head: its rows of ``W_O`` are zeroed (a head's output is ``z @ W_O[h]``;
  ``b_O`` belongs to no head and stays); of an MLP: ``W_out`` and ``b_out`` zeroed; of the
  ``input`` node: ``W_E`` (and ``W_pos``) zeroed; of a neuron ``m{L}.n{i}``: row i of ``W_out[L]``;
* mean ablation over all positions (``ablation: {type: mean, per_position: false}``): the same,
  plus the mean output as a bias (a head's mean output added to ``b_O``, an MLP's mean output as
  ``b_out``, a neuron's mean activation times its ``W_out`` row added to ``b_out``).

Resample ablation (the paired corrupt prompt), per-position means, edges, per-position units
and SAE features cannot be baked: `bake_refusal` says why, before anything is computed.
The checkpoint is written like the shipped local ones (`circuitctl.models.adapter.load_model`):
``config.json`` (HookedTransformerConfig fields) + ``model.safetensors`` [+ tokenizer files],
and ``edit.json`` saying what was changed, so ``model: {path: DIR}`` loads it.
"""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch

from circuitctl.errors import UsageError
from circuitctl.io.files import write_atomic, write_json

BAKEABLE_KINDS = ("node", "neuron")
TOKENIZER_FILES = ("tokenizer.json", "special_tokens.json")
EDIT_FILE = "edit.json"
# HookedTransformerConfig fields that describe this process, not the model
_RUNTIME_FIELDS = ("device", "dtype", "n_devices", "tokenizer_name")


def bake_refusal(kind: str, ablation) -> str | None:
    """Why an intervention on units of `kind` with `ablation` cannot be baked into weights (None: it can)."""
    if kind not in BAKEABLE_KINDS:
        what = {"edge": "edges (one input of a node, not its output)", "feature": "SAE features (the SAE is not part of the model)"}
        return f"ablated {what.get(kind, f'{kind} units (per position)')} cannot be written into the weights"
    if ablation.type == "resample":
        return "resample ablation replaces activations by those of each prompt's corrupt pair, which no weight can hold (use ablation: zero, or {type: mean, per_position: false})"
    if ablation.type == "mean" and ablation.per_position:
        return "per-position mean ablation needs a different bias at every position (use ablation: {type: mean, per_position: false}, or zero)"
    return None


def weight_changes(space, ablated: torch.Tensor, model, means: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """{state-dict key: edited tensor} that make the model compute the ablation of `ablated`
    (bool, shaped like space.mask); `means`: the units' mean values for mean ablation (node
    outputs [U, d_model] or neuron activations [L, d_mlp]), None for zero ablation."""
    params = dict(model.named_parameters())
    changes: dict[str, torch.Tensor] = {}

    def edited(key: str) -> torch.Tensor:
        if key not in changes:
            changes[key] = params[key].detach().clone()
        return changes[key]

    with torch.no_grad():
        if space.kind == "node":
            _node_changes(space.graph, ablated, model, means, edited)
        elif space.kind == "neuron":
            for layer, index in ablated.nonzero().tolist():
                w_out = edited(f"blocks.{layer}.mlp.W_out")
                if means is not None:
                    edited(f"blocks.{layer}.mlp.b_out").add_(means[layer, index] * w_out[index])
                w_out[index] = 0
        else:
            raise UsageError(bake_refusal(space.kind, None) or f"{space.kind} units cannot be baked")
    return changes


def _node_changes(graph, ablated: torch.Tensor, model, means, edited) -> None:
    from circuitctl.graph import naming

    for u in ablated.nonzero().flatten().tolist():
        node = naming.parse_node(graph.upstream[u])
        mean = None if means is None else means[u]
        if node.kind == "head":
            edited(f"blocks.{node.layer}.attn.W_O")[node.index] = 0
            if mean is not None:
                edited(f"blocks.{node.layer}.attn.b_O").add_(mean)
        elif node.kind == "mlp":
            edited(f"blocks.{node.layer}.mlp.W_out").zero_()
            bias = edited(f"blocks.{node.layer}.mlp.b_out")
            bias.copy_(mean) if mean is not None else bias.zero_()
        else:  # input: the embeddings; a mean embedding would need every embedding scheme's details
            if mean is not None:
                raise UsageError("mean ablation of the 'input' node cannot be written into the weights (zero ablation can)")
            edited("embed.W_E").zero_()
            if "pos_embed.W_pos" in dict(model.named_parameters()):
                edited("pos_embed.W_pos").zero_()


def ablation_means(space, engine) -> torch.Tensor | None:
    """The units' position-independent mean values under the engine's mean ablation (None for zero)."""
    if engine.ablation.type != "mean":
        return None
    if space.kind == "node":
        first = engine.data.slice(0, 1).to(engine.adapter.device)
        return engine.ablation_outputs(first)[:, 0, 0]  # [U, d_model]: the same at every position
    from circuitctl.circuits.neurons import NeuronAblation

    return NeuronAblation(engine, space.d_mlp).mean()[:, 0, 0]  # [L, d_mlp]


@contextmanager
def weights_edited(model, changes: dict[str, torch.Tensor]):
    """The model with `changes` in its parameters inside the block, restored exactly afterwards."""
    params = dict(model.named_parameters())
    saved = {key: params[key].detach().clone() for key in changes}
    try:
        with torch.no_grad():
            for key, value in changes.items():
                params[key].copy_(value)
        yield model
    finally:
        with torch.no_grad():
            for key, value in saved.items():
                params[key].copy_(value)


def check_export_dir(path: Path, force: bool) -> None:
    """Refuse to write into a non-empty directory without --force (before anything is computed)."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"--export: '{path}' exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not force:
        raise UsageError(f"--export: '{path}' is not empty; choose another directory or pass --force to replace its files")


def export_checkpoint(path: Path, model, changes: dict[str, torch.Tensor], source_dir: Path | None, edit: dict) -> list[Path]:
    """Write the edited checkpoint; returns the files written."""
    from safetensors.torch import save

    path.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach() for key, value in model.state_dict().items()}
    state.update(changes)
    tensors = {key: value.cpu().contiguous() for key, value in state.items()}
    files = [path / "config.json", path / "model.safetensors", path / EDIT_FILE]
    write_atomic(files[0], _config_json(model, source_dir))
    write_atomic(files[1], save(tensors, metadata={"format": "pt", "circuitctl_edit": json.dumps(edit.get("edits", []))[:4000]}))
    write_json(files[2], edit)
    files += _tokenizer_files(path, model, source_dir)
    return files


def _config_json(model, source_dir: Path | None) -> str:
    """The source checkpoint's config.json, or the loaded model's config (a pretrained model)."""
    if source_dir is not None and (source_dir / "config.json").is_file():
        return (source_dir / "config.json").read_text()
    fields = {}
    for key, value in model.cfg.to_dict().items():
        if key in _RUNTIME_FIELDS:
            continue
        if hasattr(value, "item"):  # numpy / torch scalars
            value = value.item()
        if value is None or isinstance(value, (bool, int, float, str)) or _plain_list(value):
            fields[key] = value
    return json.dumps(fields, indent=2, sort_keys=True) + "\n"


def _plain_list(value) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(v, (bool, int, float, str)) or v is None for v in value)


def _tokenizer_files(path: Path, model, source_dir: Path | None) -> list[Path]:
    written = []
    if source_dir is not None:
        for name in TOKENIZER_FILES:
            if (source_dir / name).is_file():
                shutil.copyfile(source_dir / name, path / name)
                written.append(path / name)
        return written
    tokenizer = getattr(model, "tokenizer", None)
    backend = getattr(tokenizer, "backend_tokenizer", None)  # a fast (tokenizers) tokenizer
    if backend is None:
        return written
    backend.save(str(path / "tokenizer.json"))
    special = {key: getattr(tokenizer, key) for key in ("bos_token", "eos_token", "unk_token", "pad_token") if getattr(tokenizer, key, None)}
    write_json(path / "special_tokens.json", {k: str(v) for k, v in special.items()})
    return [path / "tokenizer.json", path / "special_tokens.json"]
