"""Recomputing single graph nodes (one head, one MLP, the logits) from given inputs.

`ModelAdapter.patched_logits` reruns whole layers. A search that changes one node's input
at a time (ACDC) only needs that node and the few nodes that read it in the current
circuit recomputed, often only at the answer positions. `NodeComputer` provides those
pieces with TransformerLens's own modules and weights (LayerNorm, W_Q/K/V/O, the MLP, the
unembedding), batched over any leading dimensions.

Shapes: inputs ``[..., P', d_model]`` where P' is either every position (P) or one answer
position per row (P' = 1, with ``query_positions`` giving each row's position).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from circuitctl.models.adapter import ModelAdapter

_CHANNELS = "qkv"


def unsupported_reason(cfg) -> str | None:
    """Why the node-level path cannot reproduce this model's attention exactly (None if it can)."""
    checks = {
        "positional_embedding_type in (alibi, relative_positional_bias)": cfg.positional_embedding_type
        in ("alibi", "relative_positional_bias"),
        "use_qk_norm": bool(getattr(cfg, "use_qk_norm", False)),
        "clip_qkv": getattr(cfg, "clip_qkv", None) is not None,
        "use_attention_sinks": bool(getattr(cfg, "use_attention_sinks", False)),
        "use_logn_attn": bool(getattr(cfg, "use_logn_attn", False)),
        "load_in_4bit": bool(getattr(cfg, "load_in_4bit", False)),
        "bidirectional attention": getattr(cfg, "attention_dir", "causal") != "causal",
        "OLMo-style architecture": cfg.original_architecture
        in ("OlmoeForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM"),
    }
    found = [name for name, bad in checks.items() if bad]
    return ", ".join(found) if found else None


class NodeComputer:
    """Single-node forward computations on one TransformerLens model."""

    def __init__(self, adapter: ModelAdapter) -> None:
        self.adapter = adapter
        self.model = adapter.model
        self.cfg = adapter.cfg
        # rotary queries are rotated by their own position; computing them at every position
        # keeps that in TransformerLens's hands (apply_rotary), so heads then need all positions
        self.heads_need_all_positions = self.cfg.positional_embedding_type == "rotary"

    @staticmethod
    def _normalize(module, x: torch.Tensor) -> torch.Tensor:
        """TransformerLens's LayerNorm / RMSNorm as one fused kernel (same formula: biased
        variance, eps inside the root, normalised in float32 then cast); other norms as they are."""
        from transformer_lens.components import LayerNorm, RMSNorm

        if type(module) is LayerNorm:
            return F.layer_norm(x.float(), (x.shape[-1],), eps=module.eps).to(module.w.dtype) * module.w + module.b
        if type(module) is RMSNorm:
            return F.rms_norm(x.float(), (x.shape[-1],), eps=module.eps).to(module.w.dtype) * module.w
        return module(x)

    # -- attention heads ----------------------------------------------------------------
    def project(self, layer: int, head: int, channel: str, x: torch.Tensor) -> torch.Tensor:
        """The q, k or v vector of one head from its residual-stream input: [..., P', d] -> [..., P', d_head]."""
        block = self.model.blocks[layer]
        attn = block.attn
        c = channel.upper()
        out = self._normalize(block.ln1, x) @ getattr(attn, f"W_{c}")[head] + getattr(attn, f"b_{c}")[head]
        if self.cfg.positional_embedding_type == "rotary" and channel != "v":
            lead = out.shape[:-2]
            flat = out.reshape(-1, out.shape[-2], 1, out.shape[-1])  # [batch, pos, head, d_head]
            out = attn.apply_rotary(flat).reshape(*lead, out.shape[-2], out.shape[-1])
        return out

    def attend(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        query_positions: torch.Tensor | None,
    ) -> torch.Tensor:
        """Attention of one head: q [..., Pq, dh], k/v [..., P, dh] (broadcast over leading dims) -> z [..., Pq, dh].

        query_positions: [B] the position of each row's single query (Pq == 1), or None when
        the queries are every position.
        """
        attn = self.model.blocks[layer].attn
        scores = q @ k.transpose(-1, -2) / attn.attn_scale
        cap = self.cfg.attn_scores_soft_cap
        if cap is not None and cap > 0:
            scores = cap * torch.tanh(scores / cap)
        n_keys = k.shape[-2]
        keys = torch.arange(n_keys, device=q.device)
        if query_positions is None:
            queries = torch.arange(q.shape[-2], device=q.device)[:, None]  # [Pq, 1]
        else:
            queries = query_positions[:, None, None]  # [B, 1, 1] -> broadcast [B, Pq=1, P]
        allowed = keys <= queries
        if getattr(attn, "attn_type", "global") == "local":
            allowed = allowed & (keys > queries - self.cfg.window_size)
        scores = torch.where(allowed, scores, attn.IGNORE.to(scores.dtype))
        pattern = torch.softmax(scores, dim=-1)
        pattern = torch.where(torch.isnan(pattern), torch.zeros_like(pattern), pattern).to(v.dtype)
        return pattern @ v

    def head_output(self, layer: int, head: int, z: torch.Tensor) -> torch.Tensor:
        """A head's contribution to the residual stream (without b_O): [..., P', dh] -> [..., P', d]."""
        return z @ self.model.blocks[layer].attn.W_O[head]

    # -- MLPs and logits ----------------------------------------------------------------
    def mlp(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """MLP output from its (un-normalised) input: [..., P', d] -> [..., P', d]."""
        block = self.model.blocks[layer]
        lead = x.shape[:-2]
        act = self._fused_activation(block.mlp)
        if act is None:
            flat = x.reshape(-1, x.shape[-2], x.shape[-1])
            return block.mlp(self._normalize(block.ln2, flat)).reshape(*lead, x.shape[-2], -1)
        mlp = block.mlp  # TransformerLens's MLP.forward, with its activation as one kernel
        h = self._normalize(block.ln2, x.reshape(-1, x.shape[-1]))
        out = torch.addmm(mlp.b_out, act(torch.addmm(mlp.b_in, h, mlp.W_in)), mlp.W_out)
        return out.reshape(*lead, x.shape[-2], -1)

    @staticmethod
    def _fused_activation(mlp):
        """The activation of a plain (ungated) TransformerLens MLP as one kernel, or None for
        other MLPs. GPT-2's gelu_new is written as five elementwise passes in TransformerLens;
        it is the tanh approximation of GELU, which PyTorch computes in one (same values up to
        float rounding)."""
        from transformer_lens.components import MLP
        from transformer_lens.utilities import activation_functions as acts

        if type(mlp) is not MLP or mlp.cfg.is_layer_norm_activation():
            return None
        if mlp.act_fn in (acts.gelu_new, acts.gelu_fast):
            return lambda pre: F.gelu(pre, approximate="tanh")
        return mlp.act_fn

    @property
    def unembedding(self):
        """ln_final and the unembedding with W_U's transpose copied once (the adapter's)."""
        return self.adapter.unembedding

    def logits(self, final: torch.Tensor) -> torch.Tensor:
        """Logits from the final residual stream at the answer positions: [..., d] -> [..., vocab].

        The same operations as `ModelAdapter.unembed_at` (ln_final, then TransformerLens's
        ``F.linear(x, W_U.T.contiguous(), b_U)``)."""
        unembedding = self.unembedding
        return unembedding.logits(unembedding.normalize(final)).reshape(*final.shape[:-1], -1)
