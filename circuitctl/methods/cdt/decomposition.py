"""Contextual decomposition for transformers (CD-T; Hsu et al. 2024) over a HookedTransformer.

Every activation is carried as a pair (relevant, irrelevant) with ``rel + irrel`` equal to the
model's own activation, for S *streams* at once (a leading source dimension): stream s asks
"what do the source nodes of s contribute?". Rules, following the reference implementation
(``adelaidehsu/CD_Circuit``):

* sources: at a source node the stream's split is replaced by ``rel = out - out_ref`` and
  ``irrel = out_ref``, where ``out_ref`` is the reference activation of the ablation
  (resample: the corrupt run; zero: 0; mean: the dataset mean); the reference's
  ``set_irrel_to_mean`` variant, generalised to every ablation type;
* linear maps act on both parts; a bias goes to the irrelevant part (``bias="irrelevant"``,
  the default: the relevant part is then a pure clean-minus-reference difference) or is split
  in proportion to ``|W rel|`` and ``|W irrel|`` (the paper's rule, ``bias="proportional"``;
  the irrelevant part takes the remainder, so the split stays exact where both parts are 0,
  where the reference loses the bias);
* LayerNorm / RMSNorm is linearised with the statistics of the full input: each part is
  centred on its own and divided by the full input's scale;
* attention: the pattern is the full input's; values (and everything after them) are split.
  With ``qk="irrelevant_first"`` the query/key path is decomposed as well, by the same rule the
  reference uses for activation functions: ``irrel`` is what the irrelevant parts alone give
  (pattern from the irrelevant queries and keys, times the irrelevant values) and ``rel`` is the
  rest. ``qk="reference"`` is the reference repository's rule: relevant pattern =
  softmax(q_rel . k_rel), relevant output = that pattern times the relevant values;
* MLP nonlinearity: ``irrel = act(irrel_pre)``, ``rel = act(pre) - act(irrel_pre)`` (the
  reference's ``prop_act``; gated MLPs likewise on the product);
* residual additions add part by part.

The reference's ``normalize_rel_irrel`` (moving mass between the parts where their signs
differ) is not applied: it is not linear and would break the exact agreement with patching on
models that are linear in the decomposed path.

This is the only module that knows TransformerLens's internals for CD-T; the method
(`circuitctl/methods/cdt.py`) only sees node-indexed tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from circuitctl.errors import UsageError
from circuitctl.models.adapter import ModelAdapter

BiasRule = Literal["proportional", "irrelevant"]
QkRule = Literal["irrelevant_first", "reference"]

_TOL = 1e-8  # the reference's tolerance in the proportional bias split

# Fused torch kernels for TransformerLens activations they equal up to rounding (TL's gelu_new
# is eight separate elementwise passes; the activation of every stream is a hot spot).
_FUSED_ACTIVATIONS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
}


# ----------------------------------------------------------------------------------------
# The full-input run every rule linearises around
# ----------------------------------------------------------------------------------------
@dataclass
class FullRun:
    """Activations of one plain forward pass (per layer lists are indexed by layer)."""

    tokens: torch.Tensor  # [B, P]
    positions: torch.Tensor  # [B] answer positions
    resid_pre: list[torch.Tensor] = field(default_factory=list)  # [B, P, d]
    ln1_scale: list[torch.Tensor | None] = field(default_factory=list)  # [B, P, 1]
    q: list[torch.Tensor] = field(default_factory=list)  # [B, P, H, dh] (with b_Q, before rotary)
    k: list[torch.Tensor] = field(default_factory=list)
    v: list[torch.Tensor] = field(default_factory=list)
    pattern: list[torch.Tensor] = field(default_factory=list)  # [B, H, Q, K]
    z: list[torch.Tensor] = field(default_factory=list)  # [B, P, H, dh]
    attn_out: list[torch.Tensor] = field(default_factory=list)  # [B, P, d] (with b_O)
    ln2_scale: list[torch.Tensor | None] = field(default_factory=list)
    mlp_pre: list[torch.Tensor | None] = field(default_factory=list)  # [B, P, m] (gate pre for gated MLPs)
    mlp_pre_linear: list[torch.Tensor | None] = field(default_factory=list)  # gated MLPs only
    mlp_out: list[torch.Tensor | None] = field(default_factory=list)  # [B, P, d]
    final: torch.Tensor | None = None  # [B, P, d] residual after the last block
    final_scale: torch.Tensor | None = None  # [B, 1, 1] ln_final scale at the answer positions
    logits: torch.Tensor | None = None  # [B, vocab] at the answer positions
    # A window of positions [offset, offset + P) (see `window`): queries, values and keys
    # before the window (where every relevant part is still zero) stay in `keys`/`values`.
    offset: int = 0
    keys: list[torch.Tensor] = field(default_factory=list)  # [B, offset + P, H, dh]
    values: list[torch.Tensor] = field(default_factory=list)
    valid: torch.Tensor | None = None  # [B] bool: the answer position lies in the window

    def window(self, lo: int, hi: int) -> "FullRun":
        """The run restricted to positions [lo, hi): positions before lo carry no relevant part
        (every source lies at lo or later, attention is causal) and positions from hi on reach no
        answer. Answer positions become relative; examples answering before lo are `valid` False."""
        def cut(x, dim=1):
            return None if x is None else x.narrow(dim, lo, hi - lo)

        return FullRun(
            tokens=self.tokens[:, lo:hi],
            positions=(self.positions - lo).clamp(min=0),
            resid_pre=[cut(x) for x in self.resid_pre],
            ln1_scale=[cut(x) for x in self.ln1_scale],
            q=[cut(x) for x in self.q], k=[cut(x) for x in self.k], v=[cut(x) for x in self.v],
            pattern=[x[:, :, lo:hi, lo:hi] for x in self.pattern],
            z=[cut(x) for x in self.z],
            attn_out=[cut(x) for x in self.attn_out],
            ln2_scale=[cut(x) for x in self.ln2_scale],
            mlp_pre=[cut(x) for x in self.mlp_pre],
            mlp_pre_linear=[cut(x) for x in self.mlp_pre_linear],
            mlp_out=[cut(x) for x in self.mlp_out],
            final=cut(self.final),
            final_scale=self.final_scale,
            logits=self.logits,
            offset=lo,
            keys=[x[:, :hi] for x in self.k],
            values=[x[:, :hi] for x in self.v],
            valid=self.positions >= lo,
        )


@dataclass
class Decomposed:
    """(relevant, irrelevant) logits at the answer positions, [S, B, vocab] each, and optional
    per-site records (site name -> (rel, irrel)) for checking reconstruction."""

    rel: torch.Tensor
    irrel: torch.Tensor
    records: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


class Decomposer:
    """CD-T forward passes over the model behind a `ModelAdapter`."""

    def __init__(self, adapter: ModelAdapter, bias: BiasRule = "irrelevant", qk: QkRule | None = None) -> None:
        from transformer_lens.components import LayerNorm, LayerNormPre, RMSNorm, RMSNormPre
        from transformer_lens.components.mlps.gated_mlp import GatedMLP
        from transformer_lens.components.mlps.mlp import MLP

        self.adapter = adapter
        self.model = adapter.model
        self.cfg = adapter.cfg
        self.graph = adapter.graph
        self.bias = bias
        self.qk = qk
        # norm class -> (centres, has gain w, has bias b)
        self._norm_types = {
            LayerNorm: (True, True, True),
            LayerNormPre: (True, False, False),
            RMSNorm: (False, True, False),
            RMSNormPre: (False, False, False),
        }
        cfg = self.cfg
        if self.graph.spec.n_heads != self.graph.spec.kv_heads:
            raise UsageError("method 'cdt' does not support grouped-query attention yet")
        if not cfg.attn_only:
            if cfg.is_layer_norm_activation():
                raise UsageError(f"method 'cdt': MLP activation '{cfg.act_fn}' normalises inside the MLP; not supported")
            for block in self.model.blocks:
                if type(block.mlp) not in (MLP, GatedMLP):
                    raise UsageError(f"method 'cdt': MLP type {type(block.mlp).__name__} (mixture of experts?) is not supported")
        self.gated = not cfg.attn_only and bool(cfg.gated_mlp)
        self._fused_act = None if cfg.attn_only else _FUSED_ACTIVATIONS.get(cfg.act_fn)
        if qk is not None:
            unsupported = []
            if cfg.positional_embedding_type not in ("standard", "rotary"):
                unsupported.append(f"positional embeddings '{cfg.positional_embedding_type}'")
            if getattr(cfg, "use_logn_attn", False):
                unsupported.append("log-n attention scaling")
            if getattr(cfg, "clip_qkv", None) is not None:
                unsupported.append("clipped q/k/v")
            if getattr(cfg, "use_attention_sinks", False):
                unsupported.append("attention sinks")
            if cfg.attention_dir != "causal":
                unsupported.append("bidirectional attention")
            if getattr(self.model.blocks[0].attn, "q_norm", None) is not None:
                unsupported.append("q/k normalisation")
            if unsupported:
                raise UsageError("method 'cdt': decompose_qk does not support " + ", ".join(unsupported) + "; set decompose_qk: false")
        self.parallel = bool(cfg.parallel_attn_mlp)

    # -- the full run ----------------------------------------------------------------------
    @torch.no_grad()
    def full_run(self, tokens: torch.Tensor, positions: torch.Tensor) -> FullRun:
        """One plain forward that records what the decomposition rules need."""
        L = self.cfg.n_layers
        run = FullRun(tokens=tokens, positions=positions)
        store: dict[str, torch.Tensor] = {}

        def keep(x, hook):
            store[hook.name] = x  # ln1 fires once per q/k/v input: same values, last one kept

        names = []
        for i in range(L):
            names += [f"blocks.{i}.hook_resid_pre", f"blocks.{i}.attn.hook_pattern", f"blocks.{i}.attn.hook_z", f"blocks.{i}.hook_attn_out"]
            names += [f"blocks.{i}.attn.hook_{c}" for c in "qkv"]
            if hasattr(self.model.blocks[i].ln1, "hook_scale"):
                names.append(f"blocks.{i}.ln1.hook_scale")
            if not self.cfg.attn_only:
                names += [f"blocks.{i}.mlp.hook_pre", f"blocks.{i}.hook_mlp_out"]
                if self.gated:
                    names.append(f"blocks.{i}.mlp.hook_pre_linear")
                if hasattr(self.model.blocks[i].ln2, "hook_scale"):
                    names.append(f"blocks.{i}.ln2.hook_scale")
        with self.model.hooks(fwd_hooks=[(n, keep) for n in names]):
            resid = self.adapter.embed(tokens)
            for block in self.model.blocks:
                resid = block(resid)
        run.final = resid
        for i in range(L):
            run.resid_pre.append(store[f"blocks.{i}.hook_resid_pre"])
            run.ln1_scale.append(store.get(f"blocks.{i}.ln1.hook_scale"))
            for c in "qkv":
                getattr(run, c).append(store[f"blocks.{i}.attn.hook_{c}"])
            run.pattern.append(store[f"blocks.{i}.attn.hook_pattern"])
            run.z.append(store[f"blocks.{i}.attn.hook_z"])
            run.attn_out.append(store[f"blocks.{i}.hook_attn_out"])
            run.ln2_scale.append(store.get(f"blocks.{i}.ln2.hook_scale"))
            run.mlp_pre.append(store.get(f"blocks.{i}.mlp.hook_pre"))
            run.mlp_pre_linear.append(store.get(f"blocks.{i}.mlp.hook_pre_linear"))
            run.mlp_out.append(store.get(f"blocks.{i}.hook_mlp_out"))
        picked = self._at_answers(resid[None], positions)[0]  # [B, d]
        ln_final = getattr(self.model, "ln_final", None)
        if ln_final is not None and hasattr(ln_final, "hook_scale"):
            scales = []
            with self.model.hooks(fwd_hooks=[("ln_final.hook_scale", lambda x, hook: scales.append(x))]):
                normed = ln_final(picked[:, None, :])
            run.final_scale = scales[-1]
        else:
            normed = picked[:, None, :]
        run.logits = self.model.unembed(normed)[:, 0, :]
        return run

    # -- elementary rules --------------------------------------------------------------------
    # Each rule takes the relevant part and, optionally, the irrelevant part. Without it (the fast
    # path) the irrelevant part is derived where a rule needs it as the full run's activation
    # minus the relevant part, which is the same quantity (rel + irrel == full everywhere) at
    # half the matrix products. Carrying it (`carry=True`) is the check that the rules are exact.
    def _split_bias(self, rel_t, irrel_t, bias, full_t=None):
        """Add `bias` to the two parts of a linear map's output. `irrel_t` may be None (not
        carried); the proportional rule then needs `full_t`, the full output without bias."""
        if bias is None:
            return rel_t, irrel_t
        if self.bias == "irrelevant":
            return rel_t, None if irrel_t is None else irrel_t + bias
        other = irrel_t if irrel_t is not None else full_t - rel_t
        a, c = rel_t.abs(), other.abs()
        rel_bias = bias * (a / (a + c + _TOL))
        return rel_t + rel_bias, None if irrel_t is None else irrel_t + (bias - rel_bias)

    def _norm(self, module, scale, rel, irrel, full_in):
        """LayerNorm / RMSNorm linearised with the full input's scale ([B, P, 1]); `full_in` is
        the full input (for the proportional bias split when the irrelevant part is derived)."""
        kind = self._norm_types.get(type(module))
        if kind is None:  # nn.Identity: no normalisation
            return rel, irrel
        centred, has_w, has_b = kind

        def linear(x):
            x = x - x.mean(-1, keepdim=True) if centred else x
            x = x / scale
            return x * module.w if has_w else x

        rel_n = linear(rel)
        irrel_n = None if irrel is None else linear(irrel)
        if not has_b:
            return rel_n, irrel_n
        full_n = linear(full_in) if irrel is None and self.bias == "proportional" else None
        return self._split_bias(rel_n, irrel_n, module.b, full_n)

    def _act(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        fused = self._fused_act
        return fused(x) if fused is not None else self.model.blocks[layer].mlp.act_fn(x)

    def _pattern(self, layer: int, q: torch.Tensor, k: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """Attention pattern from (pre-rotary) queries [..., B, Q, H, dh] at positions offset..
        and keys [..., B, offset + Q, H, dh] -> [..., B, H, Q, offset + Q]."""
        attn = self.model.blocks[layer].attn
        lead = torch.broadcast_shapes(q.shape[:-3], k.shape[:-3])
        q = q.expand(*lead, *q.shape[-3:]).reshape(-1, *q.shape[-3:])
        k = k.expand(*lead, *k.shape[-3:]).reshape(-1, *k.shape[-3:])
        if self.cfg.positional_embedding_type == "rotary":
            q, k = attn.apply_rotary(q, offset, None), attn.apply_rotary(k, 0, None)
        scores = attn.apply_causal_mask(attn.calculate_attention_scores(q, k), offset)
        pattern = torch.softmax(scores, dim=-1)
        pattern = torch.where(torch.isnan(pattern), torch.zeros_like(pattern), pattern)
        return pattern.reshape(*lead, *pattern.shape[-3:])

    def _linear(self, rel, irrel, W, b, full_out):
        """A linear map (per-head [H, d, e] or dense [d, e]) with bias; `full_out` is the full
        run's output (bias included), used when the irrelevant part is derived."""
        def apply(x):
            return torch.einsum("...pd,hde->...phe", x, W) if W.dim() == 3 else x @ W

        rel_t = apply(rel)
        irrel_t = None if irrel is None else apply(irrel)
        full_t = None if irrel is not None or self.bias == "irrelevant" or b is None else full_out - b
        return self._split_bias(rel_t, irrel_t, b, full_t)

    # -- one block ---------------------------------------------------------------------------
    def _attention(self, layer: int, run: FullRun, rel, irrel):
        """Per-head (rel, irrel) z [S, B, P, H, dh] of one attention layer (irrel None if not carried)."""
        block = self.model.blocks[layer]
        attn = block.attn
        rel_n, irrel_n = self._norm(block.ln1, run.ln1_scale[layer], rel, irrel, run.resid_pre[layer])
        v_rel, v_irrel = self._linear(rel_n, irrel_n, attn.W_V, attn.b_V, run.v[layer])
        pattern = run.pattern[layer]
        if self.qk is None:
            z_rel = torch.einsum("bhqk,sbkhe->sbqhe", pattern, v_rel)
            return z_rel, None if v_irrel is None else torch.einsum("bhqk,sbkhe->sbqhe", pattern, v_irrel)
        if irrel is not None and run.offset:
            raise ValueError("carrying the irrelevant part needs the whole run, not a window")
        q_rel, q_irrel = self._linear(rel_n, irrel_n, attn.W_Q, attn.b_Q, run.q[layer])
        k_rel, k_irrel = self._linear(rel_n, irrel_n, attn.W_K, attn.b_K, run.k[layer])
        if irrel is None:
            z_full = run.z[layer][None]
            q_irrel, k_irrel, v_irrel = run.q[layer] - q_rel, run.k[layer] - k_rel, run.v[layer] - v_rel
        else:
            z_full = torch.einsum("bhqk,sbkhe->sbqhe", pattern, v_rel + v_irrel)
        lo = run.offset

        def with_before(x, before):
            """Keys/values of the whole prefix: the window's, after the full run's before it."""
            if not lo:
                return x
            return torch.cat([before[:, :lo][None].expand(x.shape[0], -1, -1, -1, -1), x], dim=2)

        if self.qk == "irrelevant_first":
            keys, values = with_before(k_irrel, run.keys[layer] if lo else None), with_before(v_irrel, run.values[layer] if lo else None)
            z_irrel = torch.einsum("sbhqk,sbkhe->sbqhe", self._pattern(layer, q_irrel, keys, lo), values)
            return z_full - z_irrel, None if irrel is None else z_irrel
        # the reference's rule: before the window the relevant queries/keys/values are zero
        zeros = torch.zeros_like(run.keys[layer]) if lo else None
        pattern_rel = self._pattern(layer, q_rel, with_before(k_rel, zeros), lo)[..., lo:]
        z_rel = torch.einsum("sbhqk,sbkhe->sbqhe", pattern_rel, v_rel)
        return z_rel, None if irrel is None else z_full - z_rel

    def _mlp(self, layer: int, rel, irrel, full: dict[str, torch.Tensor]):
        """(rel, irrel) MLP output [S, B, P, d]; `full` holds the full run's MLP input ("in"),
        ln2 scale, pre-activations and output at the same positions."""
        block = self.model.blocks[layer]
        mlp = block.mlp
        rel_n, irrel_n = self._norm(block.ln2, full["ln2_scale"], rel, irrel, full["in"])
        if self.gated:
            # TransformerLens 3.x: post = act(x W_gate) * (x W_in) + b_in
            g_rel, g_irrel = self._linear(rel_n, irrel_n, mlp.W_gate, None, None)
            l_rel, l_irrel = self._linear(rel_n, irrel_n, mlp.W_in, None, None)
            if irrel is None:
                g_irrel, l_irrel = full["pre"] - g_rel, full["pre_linear"] - l_rel
            post_full = self._act(layer, g_rel + g_irrel) * (l_rel + l_irrel)
            post_irrel = self._act(layer, g_irrel) * l_irrel
            post_rel, post_irrel = self._split_bias(post_full - post_irrel, post_irrel, mlp.b_in)
        else:
            pre_rel, pre_irrel = self._linear(rel_n, irrel_n, mlp.W_in, mlp.b_in, full["pre"])
            pre_full = full["pre"] if irrel is None else pre_rel + pre_irrel
            pre_irrel = full["pre"] - pre_rel if irrel is None else pre_irrel
            post_irrel = self._act(layer, pre_irrel)
            post_rel = self._act(layer, pre_full) - post_irrel
        if irrel is None:
            post_irrel = None
        return self._linear(post_rel, post_irrel, mlp.W_out, mlp.b_out, full["out"])

    def _at_answers(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """[S, B, P, ...] -> [S, B, ...] at each example's answer position."""
        rows = torch.arange(x.shape[1], device=x.device)
        return x[:, rows, positions]

    def _unembed(self, run: FullRun, rel, irrel, columns: torch.Tensor | None = None):
        """[S, B, d] final residual parts at the answer positions -> (rel, irrel) logits, for the
        vocabulary `columns` only when given."""
        ln_final = getattr(self.model, "ln_final", None)
        if ln_final is not None:
            scale = run.final_scale[:, 0, :] if run.final_scale is not None else None
            full_in = self._at_answers(run.final[None], run.positions)[0]
            rel, irrel = self._norm(ln_final, scale, rel, irrel, full_in)
        W_U, b_U = self.model.unembed.W_U, self.model.unembed.b_U
        full = run.logits
        if columns is not None:
            W_U, b_U, full = W_U[:, columns], b_U[columns], full[:, columns]
        return self._linear(rel, irrel, W_U, b_U, full)

    # -- decomposed forward ------------------------------------------------------------------
    @torch.no_grad()
    def propagate(
        self,
        run: FullRun,
        deltas: torch.Tensor,
        sources: torch.Tensor,
        positions: torch.Tensor | None = None,
        columns: torch.Tensor | None = None,
        carry: bool = False,
        record: bool = False,
    ) -> Decomposed:
        """Decompose the logits for S source sets at once.

        deltas:    [U, B, P, d] relevant part each node contributes when it is a source
                   (node output minus its reference output).
        sources:   bool [S, U]: the nodes of each stream's source set.
        positions: bool [S, P] or None: the source positions of each stream (None: all).
        columns:   vocabulary ids to decompose (None: all).
        carry:     propagate the irrelevant part by its own rules instead of deriving it from
                   the full run (twice the work; for checking the rules).
        record:    also return (rel, irrel) at every residual / attention / MLP site.
        """
        g, L = self.graph, self.cfg.n_layers
        S = sources.shape[0]
        sources = sources.to(deltas.device)
        # compute only the positions from the first source position to the last answer
        lo = 0 if positions is None or carry or record else int(positions.any(0).nonzero().min())
        hi = deltas.shape[2] if carry or record else int(run.positions.max()) + 1
        lo = min(lo, hi - 1)
        if (lo, hi) != (0, deltas.shape[2]):
            run, deltas = run.window(lo, hi), deltas[:, :, lo:hi]
            positions = None if positions is None else positions[:, lo:hi]
        pos_mask = None if positions is None else positions.to(deltas.dtype).to(deltas.device)[:, None, :, None]  # [S,1,P,1]
        used = sources.any(0).nonzero().flatten().tolist()
        start = max(0, min((g.upstream_layer[u] for u in used), default=L))
        records: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        # with one source node per stream, nothing upstream of a source is relevant
        single = bool((sources.sum(1) <= 1).all())

        def inject(rel, irrel, u, deltas_here, mask_here, computed=None):
            """Streams with u among their sources: u's part becomes (delta_u, out_u - delta_u).
            `computed(streams)` is the relevant part upstream sources propagated into u, which
            the delta replaces (zero for single-node sources)."""
            streams = sources[:, u].nonzero().flatten()
            if len(streams) == 0:
                return rel, irrel
            change = deltas_here[u][None].expand(len(streams), -1, -1, -1)
            if computed is not None and not single:
                change = change - computed(streams)
            if mask_here is not None:
                change = change * mask_here[streams]
            rel[streams] += change  # rel and irrel are fresh tensors of this pass: in place is safe
            if irrel is not None:
                irrel[streams] -= change
            return rel, irrel

        def note(name, rel, irrel, full):
            if record:
                records[name] = (rel, irrel if irrel is not None else full[None] - rel)

        rows = torch.arange(len(run.positions), device=deltas.device)

        def answers(x, lead: int):
            """Keep only each example's answer position: [.., B, P, ...] -> [.., B, 1, ...]."""
            if x is None:
                return None
            index = (slice(None),) * lead + (rows, run.positions)
            return x[index].unsqueeze(lead + 1)

        rel = torch.zeros((S,) + tuple(run.resid_pre[start].shape), dtype=deltas.dtype, device=deltas.device)
        irrel = run.resid_pre[start][None].repeat(S, 1, 1, 1) if carry else None
        if start == 0:
            rel, irrel = inject(rel, irrel, 0, deltas, pos_mask)
        for i in range(start, L):
            block = self.model.blocks[i]
            note(f"blocks.{i}.hook_resid_pre", rel, irrel, run.resid_pre[i])
            if i == start and not (start == 0 and bool(sources[:, 0].any())) and irrel is None:
                # nothing is relevant before the first source: the heads of this layer get no
                # relevant input (an exact shortcut; the carried path computes it)
                shape = (S,) + tuple(run.z[i].shape)
                z_rel, z_irrel = torch.zeros(shape, dtype=rel.dtype, device=rel.device), None
            else:
                z_rel, z_irrel = self._attention(i, run, rel, irrel)
            full = {"resid_pre": run.resid_pre[i], "attn_out": run.attn_out[i]}
            if not self.cfg.attn_only:
                mlp_in = run.resid_pre[i] if self.parallel else run.resid_pre[i] + run.attn_out[i]
                full.update({"in": mlp_in, "ln2_scale": run.ln2_scale[i], "pre": run.mlp_pre[i], "pre_linear": run.mlp_pre_linear[i], "out": run.mlp_out[i]})
            deltas_here, mask_here = deltas, pos_mask
            if i == L - 1 and not record:
                # the last block only matters at the answer positions (keys and values above
                # were still needed at every position)
                z_rel, z_irrel, rel, irrel = answers(z_rel, 1), answers(z_irrel, 1), answers(rel, 1), answers(irrel, 1)
                full = {k: answers(v, 0) for k, v in full.items()}
                deltas_here = answers(deltas, 1)
                if pos_mask is not None:
                    mask_here = pos_mask[:, 0, :, 0][:, run.positions][:, :, None, None]  # [S, B, 1, 1]
            W_O = block.attn.W_O
            a_rel, a_irrel = self._linear(
                z_rel.flatten(-2), None if z_irrel is None else z_irrel.flatten(-2), W_O.flatten(0, 1), block.attn.b_O, full["attn_out"]
            )
            for h in range(self.cfg.n_heads):
                a_rel, a_irrel = inject(
                    a_rel, a_irrel, g.head_out_start[i] + h, deltas_here, mask_here, lambda streams, h=h: z_rel[streams, :, :, h] @ W_O[h]
                )
            note(f"blocks.{i}.hook_attn_out", a_rel, a_irrel, run.attn_out[i])
            if self.cfg.attn_only:
                rel, irrel = rel + a_rel, None if irrel is None else irrel + a_irrel
                continue
            if self.parallel:
                m_rel, m_irrel = self._mlp(i, rel, irrel, full)
            else:
                m_rel, m_irrel = self._mlp(i, rel + a_rel, None if irrel is None else irrel + a_irrel, full)
            m_rel, m_irrel = inject(m_rel, m_irrel, g.mlp_out_index[i], deltas_here, mask_here, lambda streams, m=m_rel: m[streams])
            note(f"blocks.{i}.hook_mlp_out", m_rel, m_irrel, run.mlp_out[i])
            rel = rel + a_rel + m_rel
            irrel = None if irrel is None else irrel + a_irrel + m_irrel
        note("final", rel, irrel, run.final)
        if not record and start < L:  # the last block ran at the answer rows only
            final_rel, final_irrel = rel[:, :, 0], None if irrel is None else irrel[:, :, 0]
        else:
            final_rel, final_irrel = self._at_answers(rel, run.positions), None if irrel is None else self._at_answers(irrel, run.positions)
        logit_rel, logit_irrel = self._unembed(run, final_rel, final_irrel, columns)
        full_logits = run.logits if columns is None else run.logits[:, columns]
        if run.valid is not None:  # examples answering before the window: nothing is relevant
            logit_rel = logit_rel * run.valid[None, :, None].to(logit_rel.dtype)
        return Decomposed(logit_rel, full_logits[None] - logit_rel if logit_irrel is None else logit_irrel, records)

    # -- direct (edge) contributions ---------------------------------------------------------
    @torch.no_grad()
    def direct_logits(self, run: FullRun, direct: torch.Tensor, columns: torch.Tensor | None = None) -> torch.Tensor:
        """Relevant logits [S, B, vocab or columns] when `direct` [S, B, P, d] is the relevant
        part of the logits' input (the final residual) and the rest is irrelevant."""
        return self._unembed(run, self._at_answers(direct, run.positions), None, columns)[0]

    @torch.no_grad()
    def target_directions(self, deltas: torch.Tensor, weights: torch.Tensor) -> dict[int, dict[str, torch.Tensor]]:
        """Per layer, the weighted change of every head / MLP in its own basis.

        weights: [U, B, P]: how much one unit of node t's own change at (b, p) is worth (CD-T
        contribution per squared norm). Returns {layer: {"z": [B, P, H, dh], "post": [B, P, m]}}
        such that <x, direction> = sum_{b,p} weights * <x_out, delta_t> for a change x in the
        head's z (or the MLP's hidden activation).
        """
        g = self.graph
        out: dict[int, dict[str, torch.Tensor]] = {}
        for i, block in enumerate(self.model.blocks):
            lo = g.head_out_start[i]
            H = self.cfg.n_heads
            weighted = deltas[lo : lo + H] * weights[lo : lo + H, :, :, None]  # [H, B, P, d]
            entry = {"z": torch.einsum("hbpd,hed->bphe", weighted, block.attn.W_O)}
            if not self.cfg.attn_only:
                u = g.mlp_out_index[i]
                entry["post"] = (deltas[u] * weights[u, :, :, None]) @ block.mlp.W_out.T
            out[i] = entry
        return out

    @torch.no_grad()
    def edge_relevance(
        self, run: FullRun, direct: torch.Tensor, directions: dict[int, dict[str, torch.Tensor]], first_layer: int = 0
    ) -> torch.Tensor:
        """For S direct inputs (a source node's relevant output, [S, B, P, d]), the relevant
        change each one causes in every head (through its q, k and v inputs separately) and MLP
        it feeds directly, dotted with that node's weighted direction. Returns [S, n_downstream]
        (logits column left 0; see `direct_logits`). Sources feed inputs of layers >= first_layer.
        """
        g = self.graph
        S = direct.shape[0]
        result = torch.zeros(S, g.n_downstream, dtype=direct.dtype, device=direct.device)
        for i in range(first_layer, self.cfg.n_layers):
            block, attn, d = self.model.blocks[i], self.model.blocks[i].attn, directions[i]
            rel_n = self._norm(block.ln1, run.ln1_scale[i], direct, None, run.resid_pre[i])[0]
            v_inputs = g.channel_inputs(i, "v")
            # value channel: the pattern is the full input's, the values are split
            v_rel = self._linear(rel_n, None, attn.W_V, attn.b_V, run.v[i])[0]
            z_v = torch.einsum("bhqk,sbkhe->sbqhe", run.pattern[i], v_rel)
            result[:, v_inputs.start : v_inputs.stop] = torch.einsum("sbphe,bphe->sh", z_v, d["z"])
            if self.qk == "irrelevant_first":
                # q (k) channel alone: full pattern minus the pattern from the irrelevant queries
                # (keys) and the full keys (queries), times the full values
                for c in ("q", "k"):
                    full = getattr(run, c)[i]
                    irr = full[None] - self._linear(rel_n, None, getattr(attn, f"W_{c.upper()}"), getattr(attn, f"b_{c.upper()}"), full)[0]
                    other = getattr(run, "k" if c == "q" else "q")[i][None]
                    pattern_irr = self._pattern(i, irr, other) if c == "q" else self._pattern(i, other, irr)
                    z_c = torch.einsum("sbhqk,bkhe->sbqhe", run.pattern[i][None] - pattern_irr, run.v[i])
                    inputs = g.channel_inputs(i, c)
                    result[:, inputs.start : inputs.stop] = torch.einsum("sbphe,bphe->sh", z_c, d["z"])
            # With the "reference" q/k rule (softmax(q_rel . k_rel) times the relevant values) a
            # q or k input alone has no relevant values, so q and k edges score 0, as without qk.
            if not self.cfg.attn_only:
                mlp = block.mlp
                mlp_in = run.resid_pre[i] if self.parallel else run.resid_pre[i] + run.attn_out[i]
                rel2 = self._norm(block.ln2, run.ln2_scale[i], direct, None, mlp_in)[0]
                if self.gated:
                    g_full, l_full = run.mlp_pre[i], run.mlp_pre_linear[i]
                    post_full = self._act(i, g_full) * l_full
                    post_irr = self._act(i, g_full[None] - rel2 @ mlp.W_gate) * (l_full[None] - rel2 @ mlp.W_in)
                    post_rel, _ = self._split_bias(post_full[None] - post_irr, post_irr, mlp.b_in)
                else:
                    pre_full = run.mlp_pre[i]
                    pre_rel = self._linear(rel2, None, mlp.W_in, mlp.b_in, pre_full)[0]
                    post_rel = self._act(i, pre_full)[None] - self._act(i, pre_full[None] - pre_rel)
                result[:, g.mlp_in_index[i]] = torch.einsum("sbpm,bpm->s", post_rel, d["post"])
        return result
