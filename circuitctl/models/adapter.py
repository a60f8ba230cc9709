"""The TransformerLens adapter: the only module that knows TransformerLens's internals.

Everything a discovery method needs from a model goes through `ModelAdapter`:

* per-node outputs of a forward pass (``input``, every head, every MLP) stacked as one
  ``[n_upstream, batch, pos, d_model]`` tensor;
* forward passes in which chosen edges are ablated (edge patching), batched over several
  circuits at once and started at the first layer that any ablation touches;
* the gradient of an objective with respect to every downstream node *input*
  (per head and channel q/k/v, per MLP, the logits), for attribution methods.

Why it is written this way: TransformerLens 3.9's ``use_attn_result`` and
``use_split_qkv_input`` flags copy the residual stream once per head and make a GPT-2-small
forward + backward 6-13x slower. We need neither: a head's output is ``hook_z @ W_O[h]``,
a patched q/k/v input is re-projected inside ``hook_q/k/v`` only for the layers that an
ablation touches, and per-head input gradients are the LayerNorm backward of
``grad(hook_q) @ W_Q[h]^T`` (`circuitctl.models.norm_backward`, for every head at once). Keeping every TL-specific line
here means a ``TransformerBridge`` backend (TL 4.x) can later be added beside this one.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from circuitctl.errors import UsageError
from circuitctl.graph import naming
from circuitctl.graph.graph import Graph, GraphSpec
from circuitctl.models.norm_backward import normalisation_input_gradients
from circuitctl.models.unembedding import Unembedding

Objective = Callable[[torch.Tensor], torch.Tensor]  # logits at answer positions [B, vocab] -> scalar

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ----------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------
def resolve_device(device: str) -> str:
    from circuitctl.distributed import device_for

    device = device_for(device)  # under torchrun with nccl: this rank's own GPU
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"model.device is '{device}' but CUDA is not available on this machine (use 'auto' or 'cpu')")
    return device


def load_model(name: str | None, path: Path | None, device: str = "auto", dtype: str = "float32", n_devices: int = 1):
    """Load a HookedTransformer from a pretrained name or a local checkpoint directory.

    A local checkpoint directory holds ``config.json`` (HookedTransformerConfig fields),
    ``model.safetensors`` (the state dict) and optionally ``tokenizer.json``; it loads with
    no network access. `n_devices` is TransformerLens's layer split over GPUs (config
    ``model.n_devices``); only 1 is supported (`check_n_devices`).
    """
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import warnings

    warnings.filterwarnings("ignore", message=".*HookedTransformer is deprecated.*")
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    check_n_devices(n_devices)  # before anything is loaded
    device = resolve_device(device)
    torch_dtype = _DTYPES[dtype]
    if path is not None:
        return _load_local(Path(path), device, torch_dtype, HookedTransformer, HookedTransformerConfig, n_devices)
    assert name is not None
    try:
        model = HookedTransformer.from_pretrained(name, device=device, dtype=torch_dtype, n_devices=n_devices)
    except Exception as exc:  # TL and the hub raise many types; all mean "cannot load this"
        text = str(exc)
        if "not found" in text.lower() and "official" in text.lower():
            from transformer_lens.loading_from_pretrained import OFFICIAL_MODEL_NAMES

            from circuitctl.registry import closest

            suggestion = closest(name, list(OFFICIAL_MODEL_NAMES))
            hint = f"; did you mean '{suggestion}'?" if suggestion else ""
            raise UsageError(f"model.name: '{name}' is not a pretrained model TransformerLens knows{hint}") from exc
        raise UsageError(
            f"model.name: pretrained model '{name}' could not be loaded: it is not in the local "
            f"Hugging Face cache and the hub cannot be reached (or the download failed). "
            f"Use a local checkpoint with model.path. Cause: {type(exc).__name__}: {text.splitlines()[0][:200] if text else ''}"
        ) from exc
    return model


def check_n_devices(n_devices: int) -> None:
    """Refuse a model split over several devices: `ModelAdapter` runs the blocks itself (no
    transfer of the residual stream between devices) and stacks every node's output into one
    tensor, so TransformerLens's n_devices > 1 would fail in the first cross-device block."""
    if n_devices > 1:
        raise UsageError(
            f"model.n_devices is {n_devices}: splitting one model's layers over several GPUs (TransformerLens "
            "n_devices) is not supported yet; use model.dtype: bfloat16 and max_batch_size on one GPU, or "
            "torchrun to split the examples over GPUs"
        )


def _load_local(path: Path, device, torch_dtype, HookedTransformer, HookedTransformerConfig, n_devices: int = 1):
    from circuitctl.models.sources import check_local_checkpoint

    config_file, weights_file = check_local_checkpoint(path)
    try:
        fields = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise UsageError(f"{config_file}: not valid JSON (line {exc.lineno}: {exc.msg})") from exc
    if not isinstance(fields, dict):
        raise UsageError(f"{config_file}: must be a JSON object of HookedTransformerConfig fields")
    fields = {**fields, "device": device, "dtype": torch_dtype, "n_devices": n_devices}
    try:
        cfg = HookedTransformerConfig(**fields)
    except (TypeError, ValueError, AssertionError) as exc:
        raise UsageError(f"{config_file}: not a valid HookedTransformerConfig: {exc}") from exc
    tokenizer = None
    if (path / "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast

        special = {}
        special_file = path / "special_tokens.json"
        if special_file.is_file():
            special = json.loads(special_file.read_text())
        # TL 3.9's set_tokenizer reads init_kwargs["name_or_path"], and without add_bos_token it
        # tries to reload the tokenizer from the hub; special_tokens.json names bos/eos/pad/unk.
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_file=str(path / "tokenizer.json"),
            name_or_path=str(path),
            add_bos_token=bool(fields.get("default_prepend_bos", True)),
            **special,
        )
    from safetensors.torch import load_file

    try:
        state_dict = load_file(str(weights_file))
    except Exception as exc:
        raise UsageError(f"{weights_file}: cannot be read as safetensors: {exc}") from exc
    # parameters are created in cfg.dtype on cfg.device; load_state_dict copies (and casts) into them
    try:
        model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=True)
    except (TypeError, ValueError, AssertionError, RuntimeError) as exc:  # e.g. a field of the wrong type
        raise UsageError(f"{config_file}: cannot build a model from it: {type(exc).__name__}: {exc}") from exc
    _check_state_dict(state_dict, dict(model.named_parameters()), weights_file)
    # TL registers derived buffers (causal masks, rotary tables); only parameters must match.
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    expected = {name for name, _ in model.named_parameters()}
    missing = [key for key in missing if key in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensors (e.g. {unexpected[0]})")
        raise UsageError(f"{weights_file}: state dict does not match config.json: " + "; ".join(parts))
    return model


def _check_state_dict(state_dict: dict, parameters: dict, weights_file: Path) -> None:
    """Shapes that match config.json and finite values, named tensor by tensor."""
    for key, tensor in state_dict.items():
        if key not in parameters:  # buffers (masks hold -inf on purpose) and unexpected keys
            continue
        if tuple(tensor.shape) != tuple(parameters[key].shape):
            raise UsageError(
                f"{weights_file}: tensor '{key}' has shape {list(tensor.shape)} but config.json implies "
                f"{list(parameters[key].shape)}; the state dict does not match config.json"
            )
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise UsageError(f"{weights_file}: tensor '{key}' contains {bad} NaN or infinite value(s)")


# ----------------------------------------------------------------------------------------
# The adapter
# ----------------------------------------------------------------------------------------
@dataclass
class Capture:
    """Activations of one plain forward pass.

    outputs:   [n_upstream, B, P, d] per-node outputs (input, heads without b_O, MLPs).
    resid:     [n_layers + 1, B, P, d] residual stream before each layer, and the final one.
    logits:    [B, vocab] logits at the answer positions.
    """

    outputs: torch.Tensor
    resid: torch.Tensor
    logits: torch.Tensor


class ModelAdapter:
    """Edge-level view of a TransformerLens HookedTransformer."""

    def __init__(self, model) -> None:
        from transformer_lens.components.transformer_block import POST_NORM_ARCHITECTURES

        cfg = model.cfg
        check_n_devices(getattr(cfg, "n_devices", 1))
        if cfg.positional_embedding_type == "shortformer":
            raise UsageError("shortformer positional embeddings are not supported")
        if cfg.original_architecture in POST_NORM_ARCHITECTURES or cfg.use_normalization_before_and_after:
            raise UsageError(
                f"architecture '{cfg.original_architecture}' normalises attention outputs after the heads are summed, "
                "so per-head outputs are not additive and edge patching is undefined"
            )
        # grouped-query attention: hook_k / hook_v hold one head per KV group (unless TL was asked
        # to ungroup them, which copies keys and values per head)
        grouped = bool(cfg.n_key_value_heads) and cfg.n_key_value_heads != cfg.n_heads
        n_kv_heads = cfg.n_key_value_heads if grouped and not cfg.ungroup_grouped_query_attention else None
        self.model = model
        model.eval()
        model.requires_grad_(False)  # attribution needs activation gradients only
        if not cfg.attn_only:
            model.set_use_hook_mlp_in(True)  # a cheap clone of resid_mid: lets us patch the MLP input alone
        self.cfg = cfg
        self.graph = Graph(
            GraphSpec(
                n_layers=cfg.n_layers,
                n_heads=cfg.n_heads,
                has_mlps=not cfg.attn_only,
                parallel_attn_mlp=bool(cfg.parallel_attn_mlp),
                n_kv_heads=n_kv_heads,
            )
        )
        self._unembedding: Unembedding | None = None  # made on first use (`unembedding`)

    # -- basic properties ----------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.model.W_U.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.W_U.dtype

    @property
    def d_vocab(self) -> int:
        return self.cfg.d_vocab

    @property
    def tokenizer(self):
        return self.model.tokenizer

    def describe(self) -> dict:
        cfg = self.cfg
        return {
            "n_layers": cfg.n_layers,
            "n_heads": cfg.n_heads,
            "d_model": cfg.d_model,
            "d_head": cfg.d_head,
            "d_mlp": None if cfg.attn_only else cfg.d_mlp,
            "d_vocab": cfg.d_vocab,
            "n_ctx": cfg.n_ctx,
            "normalization_type": cfg.normalization_type,
            "model_name": cfg.model_name,
            "dtype": str(self.dtype).replace("torch.", ""),
            **({"n_kv_heads": self.graph.spec.kv_heads} if self.graph.spec.grouped else {}),
        }

    def bos_token_id(self) -> int | None:
        tok = self.model.tokenizer
        if tok is None or not getattr(self.cfg, "default_prepend_bos", False):
            return None
        return tok.bos_token_id

    # -- building blocks of the forward passes (public: methods with their own differentiable
    #    pass, e.g. edge pruning's masked forward, use them too) ------------------------------
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """The `input` node's output: the residual stream entering layer 0."""
        return self.model(tokens, stop_at_layer=0)

    def unembed_at(self, resid: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits [B, vocab] at `positions` [B] from the final residual stream [B, P, d_model]."""
        # LayerNorm is per position, so reading the answer positions first is exact and
        # skips the (large) unembedding of every other position.
        rows = torch.arange(resid.shape[0], device=resid.device)
        picked = resid[rows, positions][:, None, :]
        if not Unembedding.applies_to(self.model):  # W_U is being trained: TransformerLens's own
            if hasattr(self.model, "ln_final"):  # models without normalization have none
                picked = self.model.ln_final(picked)
            return self.model.unembed(picked)[:, 0, :]
        unembedding = self.unembedding
        return unembedding.logits(unembedding.normalize(picked))

    @property
    def unembedding(self) -> Unembedding:
        """ln_final and the unembedding with W_U's transpose copied once (TransformerLens copies
        it on every call); renewed when W_U is replaced or edited in place."""
        if self._unembedding is None or not self._unembedding.fresh_for(self.model):
            self._unembedding = Unembedding(self.model)
        return self._unembedding

    def projection(self, layer: int, channel: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(W [n, d_model, d_head], b [n, d_head]) that make hook_{channel}: n = n_heads for q, and
        n_kv_heads for k / v of grouped-query attention (the shared, unrepeated weights)."""
        attn = self.model.blocks[layer].attn
        name = channel.upper()
        if channel != "q" and self.graph.spec.grouped:
            return getattr(attn, f"_W_{name}"), getattr(attn, f"_b_{name}")
        return getattr(attn, f"W_{name}"), getattr(attn, f"b_{name}")

    @contextmanager
    def qkv_from(self, compute: Callable[[int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> Iterator[None]:
        """For the duration, each layer's attention takes its q, k and v ([B, P, heads, d_head],
        before hook_q/k/v and any q/k normalisation, which still apply) from ``compute(layer)``
        instead of projecting ln1's output. A pass that projects every head's own mixed input
        would otherwise pay for TransformerLens's projections as well and throw them away
        (three d_model x d_model products per token and layer, a quarter of a forward pass)."""
        attentions = [block.attn for block in self.model.blocks]

        def projected(layer: int, attn):
            def calculate_qkv_matrices(query_input, key_input, value_input):
                q, k, v = compute(layer)
                q, k, v = attn.hook_q(q), attn.hook_k(k), attn.hook_v(v)
                if attn.cfg.use_qk_norm:
                    q, k = attn._apply_qk_norm(q, attn.q_norm), attn._apply_qk_norm(k, attn.k_norm)
                return q, k, v

            return calculate_qkv_matrices

        for layer, attn in enumerate(attentions):
            attn.calculate_qkv_matrices = projected(layer, attn)  # an instance attribute hides the method
        try:
            yield
        finally:
            for attn in attentions:
                del attn.calculate_qkv_matrices

    def head_outputs(self, layer: int, z: torch.Tensor) -> torch.Tensor:
        """[B, P, H, d_head] -> [H, B, P, d_model]: each head's contribution, without b_O."""
        return torch.einsum("bphe,hed->hbpd", z, self.model.blocks[layer].attn.W_O)

    # -- forward passes --------------------------------------------------------------------
    def run(self, tokens: torch.Tensor, positions: torch.Tensor) -> Capture:
        """A plain forward pass that records every node's output."""
        g, L = self.graph, self.cfg.n_layers
        outputs: list[torch.Tensor] = []
        resids: list[torch.Tensor] = []

        def keep_resid(x, hook):
            resids.append(x)

        def keep_z(z, hook):
            outputs.append(self.head_outputs(hook.layer(), z))

        def keep_mlp(x, hook):
            outputs.append(x[None])

        hooks = [(f"blocks.{i}.hook_resid_pre", keep_resid) for i in range(L)]
        hooks += [(f"blocks.{i}.attn.hook_z", keep_z) for i in range(L)]
        if g.spec.has_mlps:
            hooks += [(f"blocks.{i}.hook_mlp_out", keep_mlp) for i in range(L)]
        with torch.no_grad(), self.model.hooks(fwd_hooks=hooks):
            resid = self.embed(tokens)
            for block in self.model.blocks:
                resid = block(resid)
            logits = self.unembed_at(resid, positions)
        resids.append(resid)
        return Capture(
            outputs=torch.cat([resids[0][None]] + outputs, dim=0),
            resid=torch.stack(resids),
            logits=logits,
        )

    def patched_logits(
        self,
        clean: Capture,
        ablation_outputs: torch.Tensor,
        ablated: torch.Tensor,
        positions: torch.Tensor,
        from_layer: int | None = None,
    ) -> torch.Tensor:
        """Logits at the answer positions with the given edges ablated, for K circuits at once.

        clean:            the clean run's Capture (its activations before the first touched
                          layer are reused, so only the layers at and after it are run).
        ablation_outputs: [n_upstream, B, P, d] what an ablated edge carries instead.
        ablated:          bool [K, n_upstream, n_downstream]; True = the edge is ablated.
        from_layer:       run from this layer even if no ablation touches it (0: a whole
                          forward, as a plain implementation would; used by the ACDC benchmark).
        Returns [K, B, vocab].
        """
        g, L, H = self.graph, self.cfg.n_layers, self.cfg.n_heads
        K = ablated.shape[0]
        B = clean.resid.shape[1]
        ablated = ablated & g.edge_mask.to(ablated.device)
        touched_inputs = ablated.any(dim=(0, 1)).nonzero().flatten().tolist()
        start = min((g.downstream_layer[v] for v in touched_inputs), default=L)
        if from_layer is not None:
            start = min(start, from_layer)
        n_static = g.head_out_start[start] if start < L else g.n_upstream
        weights = ablated.to(self.dtype)
        static_diff = clean.outputs[:n_static] - ablation_outputs[:n_static]
        dynamic: list[torch.Tensor] = []  # [n, K, B, P, d] diffs of nodes recomputed in this run

        def delta(inputs: range) -> torch.Tensor | None:
            """Sum over ablated edges into `inputs` of (current - ablation) upstream output."""
            sl = slice(inputs.start, inputs.stop)
            if not bool(ablated[:, :, sl].any()):
                return None
            out = torch.einsum("ubpd,kuv->vkbpd", static_diff, weights[:, :n_static, sl])
            if dynamic:
                dyn = torch.cat(dynamic)
                out = out + torch.einsum("ukbpd,kuv->vkbpd", dyn, weights[:, n_static : n_static + dyn.shape[0], sl])
            return out.flatten(1, 2)  # [V, K*B, P, d]

        current_resid: dict[int, torch.Tensor] = {}

        def keep_resid(x, hook):
            current_resid[hook.layer()] = x

        def patch_channel(channel: int):
            name = naming.CHANNELS[channel]

            def hook_fn(x, hook):
                layer = hook.layer()
                d = delta(g.channel_inputs(layer, name))  # [H, ...] (q), [n_kv_heads, ...] (k, v)
                if d is None:
                    return x
                normed = self.model.blocks[layer].ln1(current_resid[layer][None] - d)
                W, b = self.projection(layer, name)
                return torch.einsum("hbpd,hde->bphe", normed, W) + b

            return hook_fn

        def keep_z(z, hook):
            layer = hook.layer()
            out = self.head_outputs(layer, z).unflatten(1, (K, B))
            lo = g.head_out_start[layer]
            dynamic.append(out - ablation_outputs[lo : lo + H][:, None])

        def patch_mlp_in(x, hook):
            v = g.mlp_in_index[hook.layer()]
            d = delta(range(v, v + 1))
            return x if d is None else x - d[0]

        def keep_mlp(x, hook):
            u = g.mlp_out_index[hook.layer()]
            dynamic.append((x.unflatten(0, (K, B)) - ablation_outputs[u][None])[None])

        hooks = []
        for i in range(start, L):
            hooks += [(f"blocks.{i}.hook_resid_pre", keep_resid), (f"blocks.{i}.attn.hook_z", keep_z)]
            hooks += [(f"blocks.{i}.attn.hook_{c}", patch_channel(j)) for j, c in enumerate(naming.CHANNELS)]
            if g.spec.has_mlps:
                hooks += [(f"blocks.{i}.hook_mlp_in", patch_mlp_in), (f"blocks.{i}.hook_mlp_out", keep_mlp)]
        with torch.no_grad(), self.model.hooks(fwd_hooks=hooks):
            resid = clean.resid[start].repeat(K, 1, 1)
            for block in self.model.blocks[start:]:
                resid = block(resid)
            d = delta(range(g.logits_index, g.logits_index + 1))
            if d is not None:
                resid = resid - d[0]
            logits = self.unembed_at(resid, positions.repeat(K))
        return logits.unflatten(0, (K, B))

    # -- gradients -------------------------------------------------------------------------
    def input_gradients(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        objective: Objective,
        embeddings: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, Iterator[tuple[range, torch.Tensor]]]:
        """Gradient of `objective` w.r.t. every downstream node input, layer by layer.

        Returns (logits at answer positions, the run's node outputs [U, B, P, d], an iterator
        over (downstream index range, gradient [n_inputs, B, P, d]) per layer and for the logits).
        `embeddings` replaces the input embedding (used by integrated gradients).
        """
        g, L = self.graph, self.cfg.n_layers
        acts: dict[str, torch.Tensor] = {}
        head_outputs: list[torch.Tensor] = []

        def keep(x, hook):
            acts[hook.name] = x
            return x

        def keep_z(z, hook):
            head_outputs.append(self.head_outputs(hook.layer(), z.detach()))

        hook_list = []
        for i in range(L):
            hook_list += [(f"blocks.{i}.hook_resid_pre", keep), (f"blocks.{i}.attn.hook_z", keep_z)]
            hook_list += [(f"blocks.{i}.attn.hook_{c}", keep) for c in naming.CHANNELS]
            if g.spec.has_mlps:
                hook_list += [(f"blocks.{i}.hook_mlp_in", keep), (f"blocks.{i}.hook_mlp_out", keep)]
        resid0 = (self.embed(tokens) if embeddings is None else embeddings).detach().requires_grad_(True)
        with torch.enable_grad(), self.model.hooks(fwd_hooks=hook_list):
            resid = resid0
            for block in self.model.blocks:
                resid = block(resid)
            final = resid
            logits = self.unembed_at(final, positions)
            value = objective(logits)
        wrt_names = [f"blocks.{i}.attn.hook_{c}" for i in range(L) for c in naming.CHANNELS]
        if g.spec.has_mlps:
            wrt_names += [f"blocks.{i}.hook_mlp_in" for i in range(L)]
        grads = torch.autograd.grad(value, [acts[n] for n in wrt_names] + [final], allow_unused=True)
        grad_of = {n: gr for n, gr in zip(wrt_names + ["final"], grads)}

        outputs = [resid0.detach()[None]]
        for i in range(L):
            outputs.append(head_outputs[i])
            if g.spec.has_mlps:
                outputs.append(acts[f"blocks.{i}.hook_mlp_out"].detach()[None])
        outputs_t = torch.cat(outputs)

        def zeros_like_resid():
            return torch.zeros_like(resid0)

        def per_layer() -> Iterator[tuple[range, torch.Tensor]]:
            for i in range(L):
                block = self.model.blocks[i]
                # gradient w.r.t. ln1's output, per head and channel: grad(hook_c) @ W_C[h]^T
                per_head = []
                for c in naming.CHANNELS:
                    gr = grad_of[f"blocks.{i}.attn.hook_{c}"]
                    W, _ = self.projection(i, c)  # k / v of grouped-query attention: per KV head
                    if gr is None:
                        per_head.append(torch.zeros((W.shape[0],) + tuple(resid0.shape), dtype=resid0.dtype, device=resid0.device))
                    else:
                        per_head.append(torch.einsum("bphe,hde->hbpd", gr, W))
                cot = torch.cat(per_head)  # [H + 2 * n_kv_heads, B, P, d]
                resid_pre = acts[f"blocks.{i}.hook_resid_pre"].detach()
                # LayerNorm backward is linear in the incoming gradient given the forward
                # statistics: one vectorised vjp covers every head and channel.
                grads_qkv = normalisation_input_gradients(block.ln1, resid_pre, cot)
                if g.spec.has_mlps:
                    gm = grad_of[f"blocks.{i}.hook_mlp_in"]
                    gm = zeros_like_resid() if gm is None else gm
                    yield g.layer_inputs(i), torch.cat([grads_qkv, gm[None]])
                else:
                    yield g.layer_inputs(i), grads_qkv
            gf = grad_of["final"]
            yield range(g.logits_index, g.logits_index + 1), (zeros_like_resid() if gf is None else gf)[None]

        return logits.detach(), outputs_t, per_layer()
