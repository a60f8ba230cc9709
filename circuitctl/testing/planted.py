"""Hand-built "planted circuit" models whose circuits are known exactly.

Every model here is a tiny ``HookedTransformer`` whose weights are set by hand (no training,
no randomness) so that one mechanism computes the answer and a few *distractor* components
are active (non-zero outputs, often even written into the logits) but never carry the
clean/corrupt difference. They are the ground truth for testing circuit-discovery methods.

Construction principle used throughout: the residual stream is split into disjoint blocks of
one-hot coordinates ("subspaces"), e.g.

    TOK  token identity (written by the embedding)     POS  position (positional embedding)
    M    a head's copy of some token                   OUT  what the unembedding reads
    J    junk written by distractors                   ...

Every weight matrix reads from one block and writes to another, so which component can see
which information is fixed by the block layout, and "this edge carries nothing" is exact
(the ablated and the clean contributions differ only in coordinates the reader ignores), not
approximate. Attention patterns are set through the POS block with large scores, so they do
not depend on the tokens at all (except for the induction head, which is the point of it).

The graph naming (``input``, ``a{L}.h{H}``, ``m{L}``, ``a{L}.h{H}<q|k|v>``, ``logits``) is
that of :mod:`circuitctl.graph.naming`. ``true_edges`` were checked with an independent
reference implementation of edge patching (``tests/reference_patching.py``): every true edge
changes the logit difference substantially when resample-ablated alone, every other edge by
< 1e-4 of the clean-corrupt gap, and the true edges alone recover the full logit difference.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

__all__ = [
    "PlantedCircuit",
    "PLANTED",
    "PLANTED_NEURONS",
    "REDUNDANT",
    "build",
    "build_model",
    "export",
]

# Neurons that carry the planted mechanism, per model and MLP layer (d_mlp index).
PLANTED_NEURONS: dict[str, dict[int, list[int]]] = {
    "mlp_neurons": {0: [3, 7]},
    "layernorm_mlp": {0: list(range(8))},
}

# Attention score (after TransformerLens's 1/sqrt(d_head) scaling) given to the attended key;
# every other key gets 0, so the off-target softmax weight is <= n_ctx * e^-30 ~ 1e-12.
_SHARP = 30.0


@dataclass(frozen=True)
class PlantedCircuit:
    name: str
    description: str
    config: dict  # kwargs for HookedTransformerConfig (JSON-serializable)
    state_dict: dict  # str -> Tensor, strict-loadable into HookedTransformer(HookedTransformerConfig(**config))
    pairs: list[dict]  # {"clean", "corrupt", "answers", "wrong_answers"} token-id records
    true_edges: frozenset[str]  # edges whose (single) ablation matters
    notes: str = ""
    # planted MLP neurons {layer: [neuron, ...]} (empty where the mechanism has no MLP neurons)
    neurons: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------
# Construction helpers
# --------------------------------------------------------------------------------------


class _Layout:
    """Allocates disjoint blocks of residual-stream coordinates."""

    def __init__(self) -> None:
        self.size = 0
        self.blocks: dict[str, int] = {}

    def add(self, name: str, width: int) -> int:
        self.blocks[name] = self.size
        self.size += width
        return self.blocks[name]

    def __getitem__(self, name: str) -> int:
        return self.blocks[name]


def _base_config(name: str, **kw) -> dict:
    config = dict(
        model_name=f"planted-{name}",
        positional_embedding_type="standard",
        normalization_type=None,
        attn_only=True,
        act_fn=None,
        default_prepend_bos=False,
        init_weights=False,  # we set every parameter ourselves; don't touch the global RNG
    )
    config.update(kw)
    return config


def _blank_model(config: dict) -> HookedTransformer:
    """A CPU model with every parameter zero (LayerNorm gains one)."""
    model = HookedTransformer(HookedTransformerConfig(**config, device="cpu"))
    with torch.no_grad():
        for pname, param in model.named_parameters():
            param.zero_()
            if pname.endswith(".w") and (".ln" in f".{pname}" or pname.startswith("ln_final")):
                param.fill_(1.0)
    return model


class _Writer:
    """Small vocabulary for setting attention weights in terms of layout blocks."""

    def __init__(self, model: HookedTransformer, layout: _Layout):
        self.model = model
        self.layout = layout
        self.d_head = model.cfg.d_head
        self.n_ctx = model.cfg.n_ctx

    def attn(self, layer: int):
        return self.model.blocks[layer].attn

    # --- where a head looks -----------------------------------------------------------
    def attend_position(self, layer: int, h: int, target: int, score: float = _SHARP, const_query: bool = False):
        """Every query attends to absolute position `target` (score `score`, others 0).

        The query is "I am at some position" (sum of the POS block), or with `const_query` a
        constant from b_Q (used under LayerNorm, where the centred POS block can sum to ~0).
        Under LayerNorm the effective score is `score` times the normalised one-hot size.
        """
        a, P = self.attn(layer), self.layout["POS"]
        if const_query:
            a.b_Q[h, 0] = 1.0
        else:
            for p in range(self.n_ctx):
                a.W_Q[h, P + p, 0] = 1.0
        a.W_K[h, P + target, 0] = score * math.sqrt(self.d_head)

    def attend_self(self, layer: int, h: int, score: float = _SHARP):
        """Every query attends to its own position."""
        a, P = self.attn(layer), self.layout["POS"]
        for p in range(self.n_ctx):
            a.W_Q[h, P + p, p] = 1.0
            a.W_K[h, P + p, p] = score * math.sqrt(self.d_head)

    def attend_previous(self, layer: int, h: int, score: float = _SHARP):
        """Query at position p attends to p-1 (position 0 attends to itself, its only key)."""
        a, P = self.attn(layer), self.layout["POS"]
        for p in range(self.n_ctx):
            a.W_Q[h, P + p, p] = 1.0
            if p + 1 < self.d_head:
                a.W_K[h, P + p, p + 1] = score * math.sqrt(self.d_head)

    # --- what a head moves --------------------------------------------------------------
    def copy(self, layer: int, h: int, src: str, dst: str, width: int, gain: float = 1.0):
        """V reads block `src` (one-hot of width `width`), O writes the same one-hot (x gain) into `dst`."""
        a = self.attn(layer)
        s, d = self.layout[src], self.layout[dst]
        for i in range(width):
            a.W_V[h, s + i, i] = 1.0
            a.W_O[h, i, d + i] = gain

    def embed_one_hot(self, d_vocab: int):
        """W_E[t] = e_{TOK+t}, W_pos[p] = e_{POS+p}."""
        m, T, P = self.model, self.layout["TOK"], self.layout["POS"]
        for t in range(d_vocab):
            m.embed.W_E[t, T + t] = 1.0
        for p in range(self.n_ctx):
            m.pos_embed.W_pos[p, P + p] = 1.0

    def unembed_one_hot(self, d_vocab: int, block: str = "OUT"):
        """logit[t] = residual[OUT + t]."""
        O = self.layout[block]
        for t in range(d_vocab):
            self.model.unembed.W_U[O + t, t] = 1.0


def _finish(
    name: str,
    description: str,
    config: dict,
    model: HookedTransformer,
    pairs: list[dict],
    true_edges: set[str],
    notes: str,
    neurons: dict | None = None,
) -> PlantedCircuit:
    sd = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
    return PlantedCircuit(
        name=name,
        description=description,
        config=config,
        state_dict=sd,
        pairs=pairs,
        true_edges=frozenset(true_edges),
        notes=notes,
        neurons=neurons or {},
    )


def _record(clean, corrupt, answer, wrong) -> dict:
    return {"clean": list(clean), "corrupt": list(corrupt), "answers": [answer], "wrong_answers": [wrong]}


def _first_token_pairs(seed: int, d_vocab: int, seq_len: int, n: int) -> list[dict]:
    """Clean/corrupt differ only at position 0 (a vs b); the other tokens are shared and are
    never a or b. Answer = a (clean first token), wrong = b (corrupt first token)."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        a, b = rng.sample(range(d_vocab), 2)
        rest = rng.sample([t for t in range(d_vocab) if t not in (a, b)], seq_len - 1)
        pairs.append(_record([a, *rest], [b, *rest], a, b))
    return pairs


# --------------------------------------------------------------------------------------
# 1. copy_first
# --------------------------------------------------------------------------------------


def copy_first() -> PlantedCircuit:
    V, N_CTX, SEQ, GAIN = 12, 8, 6, 5.0
    lay = _Layout()
    lay.add("TOK", V)
    lay.add("POS", N_CTX)
    lay.add("OUT", V)
    config = _base_config("copy_first", d_model=lay.size, d_head=V, n_layers=1, n_ctx=N_CTX, n_heads=3, d_vocab=V)
    model = _blank_model(config)
    w = _Writer(model, lay)
    with torch.no_grad():
        w.embed_one_hot(V)
        w.unembed_one_hot(V)
        # a0.h0 (the circuit): K reads only POS, so its pattern is "look at position 0" for
        # every prompt; V/O copy the token found there into OUT, i.e. onto its own logit.
        w.attend_position(0, 0, target=0)
        w.copy(0, 0, "TOK", "OUT", V, gain=GAIN)
        # a0.h1 (distractor): looks at position 1 and copies that token onto its logit.
        w.attend_position(0, 1, target=1)
        w.copy(0, 1, "TOK", "OUT", V, gain=2.0)
        # a0.h2 (distractor): looks at its own position and copies the current token.
        w.attend_self(0, 2)
        w.copy(0, 2, "TOK", "OUT", V, gain=2.0)
    pairs = _first_token_pairs(seed=1, d_vocab=V, seq_len=SEQ, n=24)
    true_edges = {"input->a0.h0<v>", "a0.h0->logits"}
    notes = (
        "Attention patterns depend only on positions, so the metric is exactly linear in every "
        "patched path: attribution patching (EAP, gradient x difference) equals exact edge "
        "patching here. q/k edges of a0.h0 carry only position information (identical in clean "
        "and corrupt) and so have zero effect. Distractors a0.h1/a0.h2 write into the logits of "
        "tokens that are neither answer nor wrong answer. Clean logit diff +5, corrupt -5."
    )
    return _finish(
        "copy_first",
        "1-layer attention-only: head a0.h0 copies the first token to the output; answer = first token.",
        config,
        model,
        pairs,
        true_edges,
        notes,
    )


# --------------------------------------------------------------------------------------
# 2. v_composition
# --------------------------------------------------------------------------------------


def v_composition() -> PlantedCircuit:
    V, N_CTX, SEQ, GAIN = 10, 8, 6, 5.0
    lay = _Layout()
    lay.add("TOK", V)
    lay.add("POS", N_CTX)
    lay.add("M", V)  # a0.h0's copy of the first token
    lay.add("J", V)  # a0.h1's copy of the current token (junk)
    lay.add("OUT", V)
    config = _base_config("v_composition", d_model=lay.size, d_head=V, n_layers=2, n_ctx=N_CTX, n_heads=3, d_vocab=V)
    model = _blank_model(config)
    w = _Writer(model, lay)
    with torch.no_grad():
        w.embed_one_hot(V)
        w.unembed_one_hot(V)
        # Layer 0.
        # a0.h0 (circuit): every position attends to position 0 and writes its token into M,
        # so after layer 0 position 1 holds "the first token" in M.
        w.attend_position(0, 0, target=0)
        w.copy(0, 0, "TOK", "M", V)
        # a0.h1 (distractor): copies the current token into J (read by a1.h1).
        w.attend_self(0, 1)
        w.copy(0, 1, "TOK", "J", V)
        # a0.h2 (distractor): copies the token at position 2 straight onto its logit.
        w.attend_position(0, 2, target=2)
        w.copy(0, 2, "TOK", "OUT", V)
        # Layer 1.
        # a1.h0 (circuit): attends to position 1 and reads M there through V (V-composition with
        # a0.h0), writing the first token onto its logit.
        w.attend_position(1, 0, target=1)
        w.copy(1, 0, "M", "OUT", V, gain=GAIN)
        # a1.h1 (distractor): reads J at its own position (a copy of the last token).
        w.attend_self(1, 1)
        w.copy(1, 1, "J", "OUT", V, gain=1.5)
        # a1.h2 (distractor): reads the token at position 3.
        w.attend_position(1, 2, target=3)
        w.copy(1, 2, "TOK", "OUT", V, gain=1.5)
    pairs = _first_token_pairs(seed=2, d_vocab=V, seq_len=SEQ, n=24)
    true_edges = {"input->a0.h0<v>", "a0.h0->a1.h0<v>", "a1.h0->logits"}
    notes = (
        "Pure V-composition across positions (0 -> 1 -> last). a0.h0's output lives in M, which "
        "the unembedding does not read, so a0.h0->logits is not an edge of the circuit even "
        "though a0.h0 carries the difference. All patterns are positional, so attribution "
        "patching is exact. Clean logit diff +5, corrupt -5."
    )
    return _finish(
        "v_composition",
        "2-layer attention-only: a0.h0 moves the first token to position 1, a1.h0 reads it there via V.",
        config,
        model,
        pairs,
        true_edges,
        notes,
    )


# --------------------------------------------------------------------------------------
# 3. induction / induction_soft
# --------------------------------------------------------------------------------------


def _induction_pairs(seed: int, d_vocab: int, seq_len: int, n: int) -> list[dict]:
    """[BOS, x1..x_{n-2}, A] with A = x_j; answer x_{j+1}; corrupt replaces x_j by a fresh token.

    Wrong answer: another context token x_k (k not j, j+1), which in the corrupt run receives
    the same (uniform) attention as the answer, so the corrupt logit diff is 0.
    """
    rng = random.Random(seed)
    content = list(range(1, d_vocab))  # 0 is BOS
    n_x = seq_len - 2
    pairs = []
    for _ in range(n):
        xs = rng.sample(content, n_x + 1)
        fresh, xs = xs[-1], xs[:-1]
        j = rng.randrange(0, n_x - 1)  # index into xs; answer is xs[j+1]
        k = rng.choice([i for i in range(n_x) if i not in (j, j + 1)])
        clean = [0, *xs, xs[j]]
        corrupt = list(clean)
        corrupt[1 + j] = fresh
        pairs.append(_record(clean, corrupt, xs[j + 1], xs[k]))
    return pairs


def _induction(name: str, induction_score: float, notes: str) -> PlantedCircuit:
    V, N_CTX, SEQ, GAIN = 12, 8, 7, 5.0
    lay = _Layout()
    lay.add("TOK", V)
    lay.add("POS", N_CTX)
    lay.add("P", V)  # previous token (written by a0.h0)
    lay.add("J", V)  # current token copy (distractor a0.h1)
    lay.add("OUT", V)
    config = _base_config(name, d_model=lay.size, d_head=V, n_layers=2, n_ctx=N_CTX, n_heads=3, d_vocab=V)
    model = _blank_model(config)
    w = _Writer(model, lay)
    T, P = lay["TOK"], lay["P"]
    with torch.no_grad():
        w.embed_one_hot(V)
        w.unembed_one_hot(V)
        # a0.h0 (circuit): previous-token head. Positional QK: query p matches key p-1.
        # Writes the previous token into P at every position.
        w.attend_previous(0, 0)
        w.copy(0, 0, "TOK", "P", V)
        # a0.h1 (distractor): copies the current token into J.
        w.attend_self(0, 1)
        w.copy(0, 1, "TOK", "J", V)
        # a0.h2 (distractor): reads BOS (position 0) onto the BOS logit.
        w.attend_position(0, 2, target=0)
        w.copy(0, 2, "TOK", "OUT", V)
        # a1.h0 (circuit): induction head. Q = current token (TOK), K = previous token (P,
        # K-composition with a0.h0): score `induction_score` exactly where the key's previous
        # token equals the current token, 0 elsewhere. V/O copy the attended token to OUT.
        a = w.attn(1)
        for t in range(V):
            a.W_Q[0, T + t, t] = 1.0
            a.W_K[0, P + t, t] = induction_score * math.sqrt(V)
        w.copy(1, 0, "TOK", "OUT", V, gain=GAIN)
        # a1.h1 (distractor): reads J at its own position (the current token) onto its logit.
        w.attend_self(1, 1)
        w.copy(1, 1, "J", "OUT", V, gain=1.5)
        # a1.h2 (distractor): reads P at position 0 (= BOS).
        w.attend_position(1, 2, target=0)
        w.copy(1, 2, "P", "OUT", V, gain=1.5)
    pairs = _induction_pairs(seed=3, d_vocab=V, seq_len=SEQ, n=24)
    true_edges = {"input->a0.h0<v>", "a0.h0->a1.h0<k>", "a1.h0->logits"}
    return _finish(
        name,
        "2-layer attention-only induction: [BOS .. A B .. A] -> B via a previous-token head "
        "a0.h0 and an induction head a1.h0 (K-composition).",
        config,
        model,
        pairs,
        true_edges,
        notes,
    )


_INDUCTION_COMMON_NOTES = (
    "Corrupt prompts replace the earlier A by a fresh token, so the induction head finds no "
    "match and attends uniformly (corrupt logit diff exactly 0: answer and wrong answer are both "
    "context tokens with equal weight). Because the final A is unchanged and the answer B is "
    "unchanged, input->a1.h0<q> and input->a1.h0<v> carry no clean/corrupt difference that "
    "affects the metric (the only changed value, at A's position, moves logits of A and the "
    "fresh token, neither of which is scored): they are NOT true edges under this corruption, "
    "although they are part of the mechanism. "
)


def induction() -> PlantedCircuit:
    notes = _INDUCTION_COMMON_NOTES + (
        "The induction head's QK is saturated (match score 30 after scaling), so its softmax "
        "gradient is ~e^-30: gradient-based attribution (EAP, gradient x difference) gives ~0 "
        "for input->a0.h0<v> and a0.h0->a1.h0<k> although exact patching gives the whole "
        "clean-corrupt gap for each. Only a1.h0->logits (linear) is attributed correctly. "
        "Clean logit diff ~+5, corrupt 0."
    )
    return _induction("induction", induction_score=_SHARP, notes=notes)


def induction_soft() -> PlantedCircuit:
    notes = _INDUCTION_COMMON_NOTES + (
        "Moderate QK scale (match score 3 after scaling, ~77% attention on the answer): "
        "attribution patching gives scores of the right sign on all true edges: ~85% of the exact "
        "effect on input->a0.h0<v> and a0.h0->a1.h0<k> (the softmax is not linear), exact on "
        "a1.h0->logits. Clean logit diff ~+3.66, corrupt 0."
    )
    return _induction("induction_soft", induction_score=3.0, notes=notes)


# --------------------------------------------------------------------------------------
# 4. mlp_neurons
# --------------------------------------------------------------------------------------


def mlp_neurons() -> PlantedCircuit:
    V, N_CTX, SEQ, D_MLP = 16, 8, 6, 24
    POS_GROUP, NEG_GROUP = range(0, 4), range(4, 8)
    FILLERS = list(range(8, 14))
    YES, NO = 14, 15
    N_POS, N_NEG = PLANTED_NEURONS["mlp_neurons"][0]  # 3, 7
    lay = _Layout()
    lay.add("TOK", V)
    lay.add("POS", N_CTX)
    lay.add("M", V)  # a0.h0's copy of the first token
    lay.add("OUT", V)
    config = _base_config(
        "mlp_neurons",
        d_model=lay.size,
        d_head=V,
        n_layers=1,
        n_ctx=N_CTX,
        n_heads=2,
        d_vocab=V,
        attn_only=False,
        d_mlp=D_MLP,
        act_fn="relu",
    )
    model = _blank_model(config)
    w = _Writer(model, lay)
    T, P, M, O = lay["TOK"], lay["POS"], lay["M"], lay["OUT"]
    with torch.no_grad():
        w.embed_one_hot(V)
        w.unembed_one_hot(V)
        # a0.h0 (circuit): copies the first token into M (not read by the unembedding).
        w.attend_position(0, 0, target=0)
        w.copy(0, 0, "TOK", "M", V)
        # a0.h1 (distractor): copies the current token onto its logit.
        w.attend_self(0, 1)
        w.copy(0, 1, "TOK", "OUT", V)
        mlp = model.blocks[0].mlp
        # Planted neurons: N_POS = relu(2 * [first token in POS_GROUP] - 1) -> YES logit,
        #                  N_NEG = relu(2 * [first token in NEG_GROUP] - 1) -> NO logit.
        # Each is on (=1) for its group and off (pre-activation -1, ReLU'd to 0) otherwise.
        for t in POS_GROUP:
            mlp.W_in[M + t, N_POS] = 2.0
        for t in NEG_GROUP:
            mlp.W_in[M + t, N_NEG] = 2.0
        mlp.b_in[N_POS] = mlp.b_in[N_NEG] = -1.0
        mlp.W_out[N_POS, O + YES] = 4.0
        mlp.W_out[N_NEG, O + NO] = 4.0
        # Distractor neurons: always on (positive bias), reading the current token and position
        # (identical in clean and corrupt at the scored position) and writing onto filler logits.
        for n in range(D_MLP):
            if n in (N_POS, N_NEG):
                continue
            mlp.W_in[T + (n % V), n] = 1.0
            mlp.W_in[P + (n % N_CTX), n] = 0.5
            mlp.b_in[n] = 0.25
            mlp.W_out[n, O + FILLERS[n % len(FILLERS)]] = 0.5
        # Neuron 11 additionally reads the *sum* of M: active and fed by a0.h0, but the sum is
        # the same whichever token was copied, so it is uninformative.
        for t in range(V):
            mlp.W_in[M + t, 11] = 1.0
    rng = random.Random(4)
    pairs = []
    for i in range(24):
        a, b = rng.choice(POS_GROUP), rng.choice(NEG_GROUP)
        rest = rng.sample(FILLERS, SEQ - 1)
        if i % 2 == 0:
            pairs.append(_record([a, *rest], [b, *rest], YES, NO))
        else:
            pairs.append(_record([b, *rest], [a, *rest], NO, YES))
    true_edges = {"input->a0.h0<v>", "a0.h0->m0", "m0->logits"}
    notes = (
        f"Planted neurons (layer 0): {PLANTED_NEURONS['mlp_neurons'][0]}. Neuron 3 fires (=1) when "
        "the first token is in 0-3 and writes +4 to the YES (14) logit; neuron 7 fires when it is "
        "in 4-7 and writes +4 to NO (15); the other one has pre-activation -1 (ReLU'd to 0). Half "
        "the pairs are YES-clean, half NO-clean. All other neurons are active (positive "
        "pre-activation) but read only the current token/position (shared by clean and corrupt), "
        "except neuron 11 which also reads the token-independent sum of M. Attribution caveat: at "
        "the clean point the neuron that switches on under corruption has ReLU gradient 0 and gets "
        "attribution 0 (exact: 4), while the active one is linearised through the kink (-8 "
        "instead of -4); at edge level the two errors cancel exactly, so EAP edge scores equal the "
        "exact effects (-8) but neuron-level attribution is wrong. Clean logit diff +4, corrupt -4."
    )
    return _finish(
        "mlp_neurons",
        "1 layer with MLP: a0.h0 copies the first token; MLP neurons 3 and 7 classify it into YES/NO.",
        config,
        model,
        pairs,
        true_edges,
        notes,
        neurons={0: list(PLANTED_NEURONS["mlp_neurons"][0])},
    )


# --------------------------------------------------------------------------------------
# 5. distributed
# --------------------------------------------------------------------------------------


def distributed() -> PlantedCircuit:
    V, N_CTX, SEQ = 10, 8, 6
    N_CONTRIB, N_HEADS = 6, 8
    lay = _Layout()
    lay.add("TOK", V)
    lay.add("POS", N_CTX)
    lay.add("OUT", V)
    config = _base_config(
        "distributed", d_model=lay.size, d_head=V, n_layers=1, n_ctx=N_CTX, n_heads=N_HEADS, d_vocab=V
    )
    model = _blank_model(config)
    w = _Writer(model, lay)
    with torch.no_grad():
        w.embed_one_hot(V)
        w.unembed_one_hot(V)
        # a0.h0 .. a0.h5: each copies the first token onto its logit with gain 0.5, so each
        # adds +0.5 to the answer (clean) or the wrong answer (corrupt): ablating any one of
        # them moves the logit diff by exactly 1, the sum of the six by 6.
        for h in range(N_CONTRIB):
            w.attend_position(0, h, target=0)
            w.copy(0, h, "TOK", "OUT", V, gain=0.5)
        # a0.h6 / a0.h7 (distractors, larger outputs!): copy the tokens at positions 1 and the
        # current position with gain 3.
        w.attend_position(0, 6, target=1)
        w.copy(0, 6, "TOK", "OUT", V, gain=3.0)
        w.attend_self(0, 7)
        w.copy(0, 7, "TOK", "OUT", V, gain=3.0)
    pairs = _first_token_pairs(seed=5, d_vocab=V, seq_len=SEQ, n=24)
    true_edges = {f"input->a0.h{h}<v>" for h in range(N_CONTRIB)} | {f"a0.h{h}->logits" for h in range(N_CONTRIB)}
    notes = (
        "Six heads each contribute exactly 1 to the logit difference (clean +3, corrupt -3, gap 6): "
        "each single edge's ablation changes it by 1 = gap/6, so a greedy search with a fixed "
        "per-component threshold of 2 keeps none of them although together they are the whole "
        "mechanism. The distractor heads a0.h6/a0.h7 have 6x larger outputs (gain 3) but carry "
        "no difference. Everything is linear: attribution patching is exact."
    )
    return _finish(
        "distributed",
        "1-layer attention-only: six heads each add +1 to the logit difference (copy the first token).",
        config,
        model,
        pairs,
        true_edges,
        notes,
    )


# --------------------------------------------------------------------------------------
# 6. layernorm_mlp
# --------------------------------------------------------------------------------------


def layernorm_mlp() -> PlantedCircuit:
    V, N_CTX, SEQ, D_MLP = 8, 8, 6, 16
    CONST = 6.0  # size of a constant residual direction (see below)
    lay = _Layout()
    lay.add("C", 1)  # constant direction, written by the positional embedding
    lay.add("TOK", V)
    lay.add("POS", N_CTX)
    lay.add("M", V)  # a0.h0: copy of the first token
    lay.add("M2", V)  # m0: re-encoded first token
    lay.add("J", V)  # a0.h1: copy of the current token (junk)
    lay.add("K", V)  # MLP distractor junk
    lay.add("OUT", V)
    config = _base_config(
        "layernorm_mlp",
        d_model=lay.size,
        d_head=V,
        n_layers=2,
        n_ctx=N_CTX,
        n_heads=2,
        d_vocab=V,
        attn_only=False,
        d_mlp=D_MLP,
        act_fn="gelu",
        normalization_type="LN",
    )
    model = _blank_model(config)
    w = _Writer(model, lay)
    T, P, M, M2, J, K = (lay[b] for b in ("TOK", "POS", "M", "M2", "J", "K"))
    with torch.no_grad():
        w.embed_one_hot(V)
        w.unembed_one_hot(V)
        # Why LayerNorm does not leak: every component writes a one-hot (or a permutation-
        # symmetric pattern) of *some token* into its own block, and the prompts never reuse the
        # first tokens elsewhere. Swapping clean <-> corrupt permutes coordinates inside blocks,
        # so each LayerNorm's mean and std are the same in both runs and a reader of one block
        # is not affected by what happens in another.
        # The constant direction C (CONST at every position) dominates the residual norm, so
        # LayerNorm is close to (not exactly) linear in the one-hot parts: this keeps
        # gradient-based attribution roughly right (60-85% of the exact effects) without
        # making it exact. LN(x) scales one-hots by 1/std ~ 1.2 (layer 0) to ~0.85 (final).
        model.pos_embed.W_pos[:, lay["C"]] = CONST
        # Layer 0.
        # a0.h0 (circuit): constant query, key reads POS[0]: attends to position 0 from every
        # position, copies the first token into M.
        w.attend_position(0, 0, target=0, score=40.0, const_query=True)
        w.copy(0, 0, "TOK", "M", V)
        # a0.h1 (distractor): copies the current token into J.
        w.attend_self(0, 1, score=40.0)
        w.copy(0, 1, "TOK", "J", V)
        # m0 (circuit part, neurons 0..7): neuron t = gelu(2 * LN(x)[M+t] - 0.75) -> M2+t, a
        # nonlinear re-encoding of the copied first token: pre-activation ~+1.5 (gelu ~1.39)
        # for the copied token, ~-1.5 (gelu ~-0.10) for the others.
        mlp0 = model.blocks[0].mlp
        for t in range(V):
            mlp0.W_in[M + t, t] = 2.0
            mlp0.b_in[t] = -0.75
            mlp0.W_out[t, M2 + t] = 1.0
        # m0 distractor neurons 8..15: read the current token / position / J, always on,
        # write junk into K.
        for n in range(V, D_MLP):
            mlp0.W_in[T + (n % V), n] = 1.0
            mlp0.W_in[J + ((n + 3) % V), n] = 0.5
            mlp0.W_in[P + (n % N_CTX), n] = 0.5
            mlp0.b_in[n] = 1.0
            mlp0.W_out[n, K + (n % V)] = 0.5
        # Layer 1.
        # a1.h0 (circuit): attends to position 1 and reads M2 there through V, writing the
        # first token onto its logit.
        w.attend_position(1, 0, target=1, score=40.0, const_query=True)
        w.copy(1, 0, "M2", "OUT", V, gain=3.0)
        # a1.h1 (distractor): attends to position 2, copies that token onto its logit.
        w.attend_position(1, 1, target=2, score=40.0, const_query=True)
        w.copy(1, 1, "TOK", "OUT", V, gain=0.5)
        # m1 (distractor): always-on neurons reading the current token / position / K, writing K.
        mlp1 = model.blocks[1].mlp
        for n in range(D_MLP):
            mlp1.W_in[T + (n % V), n] = 0.5
            mlp1.W_in[K + ((n + 1) % V), n] = 0.5
            mlp1.W_in[P + (n % N_CTX), n] = 0.5
            mlp1.b_in[n] = 1.0
            mlp1.W_out[n, K + ((n + 2) % V)] = 0.5
    pairs = _first_token_pairs(seed=6, d_vocab=V, seq_len=SEQ, n=24)
    true_edges = {"input->a0.h0<v>", "a0.h0->m0", "m0->a1.h0<v>", "a1.h0->logits"}
    notes = (
        "GPT-2 style (LayerNorm before attention/MLP and before the unembedding, GELU MLPs). "
        "Chain: a0.h0 copies the first token into M at every position; m0's neurons 0-7 re-encode "
        "it into M2 (nonlinearly, GELU around +-1.5); a1.h0 reads M2 at position 1 via V and "
        "writes the logits. Non-circuit edges are zero up to float rounding (~1e-7) because clean "
        "and corrupt runs are coordinate permutations of each other inside each block, so "
        "LayerNorm scales agree. Attribution through LayerNorm and GELU is approximate: EAP "
        "(gradient x difference) recovers ~60-85% of each true edge's exact effect with the right "
        "sign, and gives non-true edges scores up to ~1.5% of the gap (exact patching gives 0). "
        "Clean logit diff ~+4.4, corrupt ~-4.4."
    )
    return _finish(
        "layernorm_mlp",
        "2-layer GPT-2 style (LN, GELU MLPs): first token -> a0.h0 -> m0 -> a1.h0 (V) -> logits.",
        config,
        model,
        pairs,
        true_edges,
        notes,
        neurons={layer: list(ns) for layer, ns in PLANTED_NEURONS["layernorm_mlp"].items()},
    )


# --------------------------------------------------------------------------------------
# 7. Redundant mechanisms: or_gate and backup_head
# --------------------------------------------------------------------------------------
# Two mechanisms that defeat scores of single edges. Their true edges are a *circuit*
# (keeping them alone keeps the behaviour) but ablating one of them alone changes nothing, so
# they are kept out of ``PLANTED`` (whose test requires every true edge to matter on its own)
# and registered in ``REDUNDANT``.

_TRIGGER, _YES, _NO = 0, 10, 11  # vocabulary of the trigger tasks (12 tokens)


def _trigger_pairs(seed: int, d_vocab: int, seq_len: int, n: int) -> list[dict]:
    """Clean prompts start with the trigger token, corrupt ones with another token; the other
    tokens (shared) are never the trigger, YES or NO. Answer YES, wrong answer NO."""
    rng = random.Random(seed)
    content = [t for t in range(d_vocab) if t not in (_TRIGGER, _YES, _NO)]
    pairs = []
    for _ in range(n):
        rest = rng.sample(content, seq_len - 1)
        first = rng.choice([t for t in content if t not in rest])
        pairs.append(_record([_TRIGGER, *rest], [first, *rest], _YES, _NO))
    return pairs


def _detect_trigger(w: "_Writer", layer: int, h: int, dst: str, gain: float, dst_index: int = 0):
    """Head (layer, h) reads position 0 and writes `gain` into block `dst` (+ `dst_index`)
    when the token there is the trigger (V reads only the trigger's TOK coordinate)."""
    a = w.attn(layer)
    w.attend_position(layer, h, target=0)
    a.W_V[h, w.layout["TOK"] + _TRIGGER, 0] = 1.0
    a.W_O[h, 0, w.layout[dst] + dst_index] = gain


def or_gate() -> PlantedCircuit:
    V, N_CTX, SEQ, GAIN, NEG = 12, 8, 6, 4.0, 0.1
    lay = _Layout()
    lay.add("TOK", V)
    lay.add("POS", N_CTX)
    lay.add("F", 1)  # how many OR-gate heads saw the trigger (0, 1 or 2)
    lay.add("OUT", V)
    config = _base_config(
        "or_gate", d_model=lay.size, d_head=V, n_layers=1, n_ctx=N_CTX, n_heads=5, d_vocab=V,
        attn_only=False, d_mlp=4, act_fn="relu",
    )
    model = _blank_model(config)
    w = _Writer(model, lay)
    F, O = lay["F"], lay["OUT"]
    with torch.no_grad():
        w.embed_one_hot(V)
        w.unembed_one_hot(V)
        # a0.h0, a0.h1 (the OR-gate): each writes 1 into F when the first token is the trigger.
        _detect_trigger(w, 0, 0, "F", 1.0)
        _detect_trigger(w, 0, 1, "F", 1.0)
        # a0.h2, a0.h3 (weak negative heads, like IOI's negative name movers): -0.1 on YES each.
        _detect_trigger(w, 0, 2, "OUT", -NEG, _YES)
        _detect_trigger(w, 0, 3, "OUT", -NEG, _YES)
        # a0.h4 (distractor): copies the current token onto its logit.
        w.attend_self(0, 4)
        w.copy(0, 4, "TOK", "OUT", V, gain=2.0)
        # m0: a saturating readout, YES += GAIN * clamp(F, 0, 1) = GAIN * (relu(F) - relu(F - 1)):
        # F = 2 (both heads) and F = 1 (either head alone) give the same logit.
        mlp = model.blocks[0].mlp
        mlp.W_in[F, 0] = mlp.W_in[F, 1] = 1.0
        mlp.b_in[1] = -1.0
        mlp.W_out[0, O + _YES] = GAIN
        mlp.W_out[1, O + _YES] = -GAIN
        model.unembed.b_U[_NO] = GAIN / 2  # NO sits halfway between "trigger seen" and "not seen"
    pairs = _trigger_pairs(seed=7, d_vocab=V, seq_len=SEQ, n=24)
    true_edges = {"input->a0.h0<v>", "input->a0.h1<v>", "a0.h0->m0", "a0.h1->m0", "m0->logits"}
    notes = (
        "OR-gate: a0.h0 and a0.h1 each detect the trigger token at position 0 and write 1 into F; m0 reads "
        "F through a clamp to [0, 1] (relu(F) - relu(F - 1)) and writes +4 on YES, so either head alone gives "
        "the full answer. Ablating one OR-gate edge changes the logit difference by exactly 0 and the gradient "
        "at the clean run (F = 2, on the flat part of the clamp) is exactly 0, so exact single-edge patching "
        "and EAP both score the four OR-gate edges 0; ablating both heads removes the answer. Two weak negative "
        "heads (a0.h2, a0.h3: -0.1 on YES each) have small real single-edge effects that rank above the "
        "OR-gate edges; keeping only the true edges gives f = 1.05 (the negative heads are ablated). "
        "Clean logit diff +1.8, corrupt -2."
    )
    return _finish(
        "or_gate",
        "1 layer with MLP: two heads each detect a trigger token; a saturating MLP readout needs either one (OR).",
        config,
        model,
        pairs,
        true_edges,
        notes,
    )


def backup_head() -> PlantedCircuit:
    V, N_CTX, SEQ, GAIN, SCORE = 12, 8, 6, 4.0, 60.0
    lay = _Layout()
    lay.add("TOK", V)
    lay.add("POS", N_CTX)
    lay.add("S", 1)  # "the primary head saw the trigger"
    lay.add("OUT", V)
    config = _base_config(
        "backup_head", d_model=lay.size, d_head=V, n_layers=2, n_ctx=N_CTX, n_heads=2, d_vocab=V
    )
    model = _blank_model(config)
    w = _Writer(model, lay)
    P, S = lay["POS"], lay["S"]
    with torch.no_grad():
        w.embed_one_hot(V)
        w.unembed_one_hot(V)
        # a0.h0 (primary): detects the trigger at position 0, writes GAIN on YES and 1 into S.
        _detect_trigger(w, 0, 0, "OUT", GAIN, _YES)
        w.attn(0).W_O[0, 0, S] = 1.0
        # a0.h1 (distractor): copies the current token onto its logit.
        w.attend_self(0, 1)
        w.copy(0, 1, "TOK", "OUT", V, gain=2.0)
        # a1.h0 (backup): query (1 - S, 1) from b_Q and S, keys SCORE at position 0 and SCORE / 2 at
        # position 1: with S = 1 it attends to position 1 (never the trigger: writes nothing), with
        # S = 0 (the primary's output missing) to position 0, where it detects the trigger itself.
        a = w.attn(1)
        a.b_Q[0, 0] = a.b_Q[0, 1] = 1.0
        a.W_Q[0, S, 0] = -1.0
        a.W_K[0, P + 0, 0] = SCORE * math.sqrt(V)
        a.W_K[0, P + 1, 1] = SCORE / 2 * math.sqrt(V)
        a.W_V[0, lay["TOK"] + _TRIGGER, 0] = 1.0
        a.W_O[0, 0, lay["OUT"] + _YES] = GAIN
        # a1.h1 (distractor): copies the token at position 2 onto its logit.
        w.attend_position(1, 1, target=2)
        w.copy(1, 1, "TOK", "OUT", V, gain=1.5)
        model.unembed.b_U[_NO] = GAIN / 2
    pairs = _trigger_pairs(seed=8, d_vocab=V, seq_len=SEQ, n=24)
    true_edges = {"input->a0.h0<v>", "a0.h0->logits"}
    notes = (
        "Backup head (self-repair): the primary head a0.h0 detects the trigger token at position 0, writes +4 "
        "on YES and a flag S; the backup head a1.h0 reads S in its query and attends to the trigger position "
        "only when S is missing, then writes the same +4 itself. Ablating input->a0.h0<v> alone changes "
        "nothing (the backup takes over), so exact single-edge patching scores it 0; ablating a0.h0->logits "
        "alone removes the answer (the backup still sees S); ablating a0.h0->a1.h0<q> alone makes the backup "
        "fire too (logit diff +6 instead of +2). The true edges are the primary path, which alone keeps the "
        "behaviour (f = 1); {input->a1.h0<v>, a1.h0->logits} (the backup path) is another circuit with f = 1. "
        "EAP linearises at the clean run, where the backup's softmax is saturated, so it does not see the "
        "self-repair and scores input->a0.h0<v> like a0.h0->logits. Clean logit diff +2, corrupt -2."
    )
    return _finish(
        "backup_head",
        "2-layer attention-only: a primary head answers; a later backup head answers only when the primary's output is missing.",
        config,
        model,
        pairs,
        true_edges,
        notes,
    )


# --------------------------------------------------------------------------------------
# Registry, loading, export
# --------------------------------------------------------------------------------------

PLANTED: dict[str, Callable[[], PlantedCircuit]] = {
    "copy_first": copy_first,
    "v_composition": v_composition,
    "induction": induction,
    "induction_soft": induction_soft,
    "mlp_neurons": mlp_neurons,
    "distributed": distributed,
    "layernorm_mlp": layernorm_mlp,
}

# Mechanisms whose true edges matter together but not one by one (see section 7).
REDUNDANT: dict[str, Callable[[], PlantedCircuit]] = {
    "or_gate": or_gate,
    "backup_head": backup_head,
}


def build(name: str) -> PlantedCircuit:
    """Build the planted model `name` (see ``PLANTED`` and ``REDUNDANT``)."""
    try:
        factory = {**PLANTED, **REDUNDANT}[name]
    except KeyError:
        raise KeyError(f"unknown planted model '{name}'; known: {', '.join(sorted({**PLANTED, **REDUNDANT}))}") from None
    return factory()


def build_model(pc: PlantedCircuit) -> HookedTransformer:
    """A fresh HookedTransformer (eval mode) with `pc`'s weights, loaded strictly."""
    model = HookedTransformer(HookedTransformerConfig(**pc.config))
    model.load_state_dict(pc.state_dict, strict=True)
    model.eval()
    return model


def export(pc: PlantedCircuit, model_dir: str | Path, task_dir: str | Path) -> tuple[Path, Path]:
    """Write a local checkpoint and a task.

    model_dir/config.json        the HookedTransformerConfig kwargs
    model_dir/model.safetensors  the state dict
    task_dir/task.yaml           name, version, description, pairs: pairs.jsonl, metric: logit_diff
    task_dir/pairs.jsonl         one {"clean", "corrupt", "answers", "wrong_answers"} record a line
    Returns (model_dir, task_dir).
    """
    import yaml
    from safetensors.torch import save_file

    model_dir, task_dir = Path(model_dir), Path(task_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    task_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.json").write_text(json.dumps(pc.config, indent=2, sort_keys=True) + "\n")
    save_file(
        {k: v.detach().cpu().contiguous().clone() for k, v in pc.state_dict.items()},
        str(model_dir / "model.safetensors"),
        metadata={"format": "pt", "planted": pc.name},
    )
    task = {
        "name": pc.name,
        "version": 1,
        "description": pc.description,
        "pairs": "pairs.jsonl",
        "metric": "logit_diff",
    }
    (task_dir / "task.yaml").write_text(yaml.safe_dump(task, sort_keys=False))
    with open(task_dir / "pairs.jsonl", "w") as fh:
        for rec in pc.pairs:
            fh.write(json.dumps(rec) + "\n")
    return model_dir, task_dir
