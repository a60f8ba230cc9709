"""Per-method settings and the method table: one row per discovery method.

Each method's settings are a pydantic model checked on their own (unknown keys rejected),
and its implementation is named as ``module:function`` so that validating a config never
imports torch. Plugins add methods through the ``circuitctl.methods`` entry-point group
(each entry point loads a `MethodInfo`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from circuitctl.registry import Registry


class MethodSettings(BaseModel):
    """Settings every method accepts."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    batch_size: int = Field(16, ge=1, description="examples per forward pass")


class ExactSettings(MethodSettings):
    name: Literal["exact"] = "exact"
    candidates_per_pass: int = Field(32, ge=1, description="edges patched together in one batched forward pass")
    checkpoint_every_seconds: float = Field(
        30.0, ge=0, description="save the effect sums of finished (batch, chunk of edges) units to RUN_DIR/checkpoint this often"
    )


class EapSettings(MethodSettings):
    name: Literal["eap"] = "eap"


class EapIgSettings(MethodSettings):
    name: Literal["eap_ig"] = "eap_ig"
    steps: int = Field(5, ge=1, description="integration steps m (gradients averaged over m points)")
    variant: Literal["inputs", "activations"] = Field(
        "inputs", description="interpolate the input embeddings, or each layer's node outputs in turn"
    )
    granularity: Literal["edge", "node", "neuron"] = Field(
        "edge", description="score edges, nodes (heads, MLPs) or MLP neurons"
    )
    positions: Literal["all", "per_token"] = Field(
        "all", description="one graph over all positions, or nodes per labelled (or absolute) token position"
    )
    points: Literal["auto", "right", "left", "midpoint"] = Field(
        "auto",
        description="where on the ablation->clean path the m gradients are taken: alpha = k/m for k = 1..m (right: ends "
        "at the clean point; m = 1 is EAP), k = 0..m-1 (left: starts at the ablated point) or k + 1/2 (midpoint); "
        "auto: what the EAP-IG reference does, left for the inputs variant's edge and neuron scores, right for the "
        "activations variant and node scores",
    )

    @property
    def alpha_points(self) -> str:
        """The integration points `points` stands for (auto resolved as the EAP-IG reference does)."""
        if self.points != "auto":
            return self.points
        return "left" if self.variant == "inputs" and self.granularity != "node" else "right"
    steps_per_pass: Optional[int] = Field(
        None, ge=1, description="interpolation steps stacked into one forward/backward (default: 1 on CPU, up to 64 rows on GPU)"
    )
    checkpoint_every_seconds: float = Field(
        30.0, ge=0, description="save the score sums of finished batches to RUN_DIR/checkpoint this often"
    )


class PathPatchingSettings(MethodSettings):
    name: Literal["path_patching"] = "path_patching"
    threshold: float = Field(
        0.05, ge=0, description="keep a path when |its effect| exceeds this (absolute) or this fraction of its receiver's effect (relative)"
    )
    threshold_mode: Literal["absolute", "relative"] = Field(
        "relative", description="absolute: metric units; relative: fraction of the effect remaining at the receiver (the gap at the logits)"
    )
    max_depth: Optional[int] = Field(None, ge=1, description="expand receivers at most this many edges from the logits (none: no limit)")
    node_types: tuple[Literal["input", "heads", "mlps"], ...] = Field(
        ("input", "heads", "mlps"), min_length=1, description="which nodes may be senders"
    )
    top_k: Optional[int] = Field(None, ge=1, description="also keep each receiver's top_k senders by |effect|, below the threshold")
    senders_per_pass: int = Field(32, ge=1, description="paths patched together in one batched forward pass")
    checkpoint_every_seconds: float = Field(30.0, ge=0, description="save resumable progress to RUN_DIR/checkpoint this often")



class CdtSettings(MethodSettings):
    name: Literal["cdt"] = "cdt"
    threshold: float = Field(
        0.02, ge=0, description="native circuit: keep nodes and edges whose |contribution| is at least this fraction of the total effect"
    )
    decompose_qk: bool = Field(
        False, description="also decompose through attention queries and keys (needed for Q/K-composition, e.g. induction heads)"
    )
    qk_rule: Literal["irrelevant_first", "reference"] = Field(
        "irrelevant_first",
        description="with decompose_qk: irrelevant part = pattern of the irrelevant q/k times irrelevant values (irrelevant_first), "
        "or relevant part = softmax(q_rel . k_rel) times relevant values (the reference code's rule)",
    )
    per_position: bool = Field(True, description="source nodes per token position (finer target credit; costs one source per position)")
    bias: Literal["irrelevant", "proportional"] = Field(
        "irrelevant",
        description="where biases go: all to the irrelevant part (exact on models without normalization), "
        "or split in proportion to |relevant| and |irrelevant| (the paper's rule)",
    )
    sources_per_pass: int = Field(32, ge=1, description="source sets decomposed together in one forward-like pass")
    checkpoint_every_seconds: float = Field(
        30.0, ge=0, description="save the sums of finished batches to RUN_DIR/checkpoint this often"
    )


class AcdcSettings(MethodSettings):
    """ACDC (Conmy et al. 2023): greedy edge removal from the logits back to the input."""

    name: Literal["acdc"] = "acdc"
    tau: Union[float, list[float]] = Field(
        0.01,
        description="remove an edge when the metric change it causes (KL increase, or drop of logit/prob diff) is below tau; "
        "a list runs one search per value (a sweep, one circuit each)",
    )
    tau_mode: Literal["absolute", "relative"] = Field(
        "absolute",
        description="absolute: tau in metric units (the paper's); relative: tau as a fraction of the clean-ablated gap "
        "|m(full) - m(all edges ablated)|, so one tau means the same on every task and metric",
    )
    absolute: bool = Field(False, description="compare |change| with tau (the reference's abs_value_threshold)")
    candidates_per_pass: int = Field(16, ge=1, description="edges into one node tested together, with speculative replay")
    trials_per_evaluation: int = Field(
        4, ge=1, description="of those, trials evaluated per batched call (the walk stops at the first wrong prediction)"
    )
    checkpoint_every_seconds: float = Field(30.0, ge=0, description="save resumable progress to RUN_DIR/checkpoint this often")
    evaluator: Literal["auto", "incremental", "layerwise"] = Field(
        "auto",
        description="incremental: recompute only the tested node and its descendants in the current circuit; "
        "layerwise: rerun whole layers (any model); auto: incremental where the model allows it",
    )

    @field_validator("tau")
    @classmethod
    def _positive_taus(cls, value):
        values = value if isinstance(value, list) else [value]
        if not values:
            raise ValueError("give at least one tau")
        if any(not t > 0 for t in values):
            raise ValueError("tau must be > 0")
        if len(set(values)) != len(values):
            raise ValueError("the taus of a sweep must be distinct")
        return value


class PretrainedSae(BaseModel):
    """A pretrained SAE from sae-lens's release table."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    release: str
    sae_id: str


class SfcSettings(MethodSettings):
    """Sparse feature circuits (Marks et al. 2024): SAE features and error terms as nodes."""

    name: Literal["sfc"] = "sfc"
    saes: Union[str, dict[str, Union[str, PretrainedSae]]] = Field(
        ..., description="a directory of SAEs in sae-lens format (placed by their hook names), or {site: directory | {release, sae_id}}"
    )
    node_threshold: float = Field(0.1, ge=0, description="circuit nodes: |mean indirect effect| above this (metric units)")
    edge_threshold: float = Field(0.01, ge=0, description="circuit edges: |mean edge effect| above this")
    steps: int = Field(10, ge=1, description="integrated-gradients steps for node effects (1 = attribution patching)")
    aggregation: Literal["sum", "none"] = Field("sum", description="sum: a node per feature (summed over positions); none: per position")

    @field_validator("saes")
    @classmethod
    def _site_names(cls, value):
        from circuitctl.graph.naming import is_site_name

        if isinstance(value, dict):
            if not value:
                raise ValueError("give at least one site")
            bad = [key for key in value if not is_site_name(key)]
            if bad:
                raise ValueError(f"'{bad[0]}' is not a site (embed, attn<L>, mlp<L> or resid<L>, e.g. resid0, mlp3)")
        return value


@dataclass(frozen=True)
class MethodInfo:
    name: str
    settings: type[MethodSettings]
    implementation: str  # "module:function", imported only when the method runs
    description: str


METHODS: Registry[MethodInfo] = Registry("method")

for _info in (
    MethodInfo("exact", ExactSettings, "circuitctl.methods.exact:discover", "exact activation patching of every edge (the reference)"),
    MethodInfo("eap", EapSettings, "circuitctl.methods.eap:discover", "edge attribution patching (Syed et al. 2023)"),
    MethodInfo(
        "eap_ig",
        EapIgSettings,
        "circuitctl.methods.eap_ig:discover",
        "EAP with integrated gradients (Hanna et al. 2024): edges, nodes or neurons; optional per-position graphs",
    ),
    MethodInfo(
        "acdc",
        AcdcSettings,
        "circuitctl.methods.acdc:discover",
        "ACDC (Conmy et al. 2023): greedy edge removal below a threshold tau, exact and resumable"
    ),
    MethodInfo(
        "path_patching",
        PathPatchingSettings,
        "circuitctl.methods.path_patching:discover",
        "automatic path patching (IOI line of work): grow a position-aware circuit backwards from the answer"
    ),
    MethodInfo(
        "cdt",
        CdtSettings,
        "circuitctl.methods.cdt:discover",
        "contextual decomposition for transformers (Hsu et al. 2024): contributions without patching, pruned backwards"
    ),
    MethodInfo(
        "sfc",
        SfcSettings,
        "circuitctl.methods.sfc:discover",
        "sparse feature circuits (Marks et al. 2024): SAE features and error nodes, node and edge attribution / IG"
    ),
):
    METHODS.add(_info.name, _info)

# The learned-circuit and combination methods (edge pruning, subnetwork probing, IFR, ensembles)
# live in their own module, which imports MethodSettings and MethodInfo from here and adds its rows.
import circuitctl.config.learned_methods  # noqa: E402,F401
