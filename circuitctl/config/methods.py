"""Per-method settings and the method table: one row per discovery method.

Each method's settings are a pydantic model checked on their own (unknown keys rejected),
and its implementation is named as ``module:function`` so that validating a config never
imports torch. Plugins add methods through the ``circuitctl.methods`` entry-point group
(each entry point loads a `MethodInfo`). Methods that run other methods (an ensemble's members,
edge pruning's ``init_from``) validate each of them with that method's own settings class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from circuitctl.registry import Registry, unknown_name_message


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


# -- the learned-circuit and combination methods of the MIB leaderboard --------------------------
# Methods whose scores are not one [upstream x downstream] edge tensor, so they cannot be members.
NOT_EDGE_METHODS = ("sfc", "subnetwork_probing", "ensemble")


def member_settings(spec: Any) -> MethodSettings:
    """A member given as ``name`` or ``{name: ..., setting: value}`` -> its validated settings.

    Raises ValueError (pydantic reports it at the field's path) for unknown names, methods that
    do not score edges, sweeps, and invalid settings."""
    if isinstance(spec, MethodSettings):
        return spec
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, dict) or "name" not in spec:
        raise ValueError("a member is a method name or a mapping with a 'name' and that method's settings")
    name = spec["name"]
    if name not in METHODS:  # filled below, before any config is validated
        raise ValueError(unknown_name_message("method", str(name), METHODS.names()))
    if name in NOT_EDGE_METHODS:
        raise ValueError(f"'{name}' cannot be a member: members must score edges (e.g. exact, eap, eap_ig, acdc, cdt, ifr)")
    try:
        settings = METHODS.get(name).settings.model_validate(spec)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        message = "unknown key" if first["type"] == "extra_forbidden" else first["msg"].removeprefix("Value error, ")
        raise ValueError(f"{name} setting '{where}': {message}") from None
    if getattr(settings, "granularity", "edge") != "edge" or getattr(settings, "positions", "all") != "all":
        raise ValueError(f"{name}: only edge scores over all positions can be used (granularity: edge, positions: all)")
    for sweep_field in ("tau", "sparsity", "edges"):
        if isinstance(getattr(settings, sweep_field, None), list):
            raise ValueError(f"{name}: {sweep_field} is a list (a sweep); a member must give one set of scores")
    return settings


class EdgePruningSettings(MethodSettings):
    """Edge pruning (Bhaskar et al. 2024): a hard-concrete mask per edge learned with a Lagrangian
    sparsity constraint. Defaults are the reference's IOI settings (see README)."""

    name: Literal["edge_pruning"] = "edge_pruning"
    batch_size: int = Field(32, ge=1, description="examples per optimisation step (the reference's 32)")
    sparsity: Union[float, list[float], None] = Field(
        None,
        description="target edge sparsity (fraction of edges removed; the reference sweeps 0.94-1.1, values above 1 push "
        "harder); a list is a sweep, one circuit each. Default 0.95 unless `edges` is given",
    )
    edges: Union[int, list[int], None] = Field(
        None, description="target number of edges instead of a sparsity (sparsity = 1 - edges / n_edges); a list is a sweep"
    )
    steps: int = Field(3000, ge=1, description="optimisation steps per target")
    sparsity_warmup_steps: int = Field(2500, ge=0, description="the target sparsity rises linearly from 0 over these steps")
    lr: float = Field(0.8, gt=0, description="AdamW learning rate of the log-alphas")
    lambda_lr: float = Field(0.8, gt=0, description="AdamW learning rate of the two Lagrange multipliers (gradient ascent)")
    lr_warmup_steps: int = Field(200, ge=0, description="linear learning-rate warm-up, then linear decay to 0 at `steps`")
    weight_decay: float = Field(
        0.01, ge=0, description="AdamW decoupled weight decay on log-alphas and multipliers (torch's default, which the reference uses)"
    )
    sparsity_measure: Literal["expected", "sampled"] = Field(
        "expected",
        description="s in the Lagrangian: 1 - mean P(mask > 0) over the edges (expected L0, smooth) or 1 - mean of the "
        "sampled masks (the reference's)",
    )
    objective: Literal["kl", "metric"] = Field(
        "kl",
        description="kl: KL divergence from the full model at the answer position (the paper's); metric: the run's metric, "
        "importance-signed (minimising it pushes the circuit's metric towards and beyond the full model's)",
    )
    init_log_alpha: float = Field(10.0, description="initial log-alpha of every edge (normal, std 0.01): masks start open")
    init_from: Optional[Any] = Field(
        None,
        description="start from another edge method's scores (a name or {name, settings}): log-alphas from the rank of "
        "|score|, calibrated to keep a fraction 1 - init_sparsity of the edges, and the sparsity warm-up starts there",
    )
    init_sparsity: float = Field(0.5, ge=0, lt=1, description="with init_from: the expected sparsity of the initial masks")
    cache_mib: float = Field(
        1024, ge=0, description="keep the ablation run's node outputs of every example when they fit in this many MiB (else recomputed each step)"
    )
    checkpoint_every_seconds: float = Field(30.0, ge=0, description="save resumable progress to RUN_DIR/checkpoint this often")

    @field_validator("sparsity")
    @classmethod
    def _sparsities(cls, value):
        values = value if isinstance(value, list) else [value]
        if value is not None and (not values or any(not 0 < v <= 2 for v in values)):
            raise ValueError("a target sparsity must be in (0, 2] (1 = every edge removed; the reference goes up to 1.1)")
        if isinstance(value, list) and len(set(values)) != len(values):
            raise ValueError("the sparsities of a sweep must be distinct")
        return value

    @field_validator("edges")
    @classmethod
    def _edge_counts(cls, value):
        values = value if isinstance(value, list) else [value]
        if value is not None and (not values or any(v < 0 for v in values)):
            raise ValueError("a target number of edges must be >= 0")
        if isinstance(value, list) and len(set(values)) != len(values):
            raise ValueError("the edge counts of a sweep must be distinct")
        return value

    @field_validator("init_from")
    @classmethod
    def _init_member(cls, value):
        return None if value is None else member_settings(value)

    @model_validator(mode="after")
    def _one_target(self):
        if self.sparsity is not None and self.edges is not None:
            raise ValueError("give at most one of sparsity and edges")
        if self.sparsity_warmup_steps > self.steps:
            raise ValueError(f"sparsity_warmup_steps ({self.sparsity_warmup_steps}) exceeds steps ({self.steps})")
        return self

    def targets(self) -> list[tuple[str, float | int]]:
        """The sweep: [("sparsity", 0.95)] or [("edges", 5), ...]."""
        if self.edges is not None:
            return [("edges", e) for e in (self.edges if isinstance(self.edges, list) else [self.edges])]
        values = self.sparsity if self.sparsity is not None else 0.95
        return [("sparsity", s) for s in (values if isinstance(values, list) else [values])]


class SubnetworkProbingSettings(MethodSettings):
    """Subnetwork probing (the ACDC paper's SP baseline): a hard-concrete mask per node output,
    trained on the task loss plus lambda times the expected fraction of nodes kept."""

    name: Literal["subnetwork_probing"] = "subnetwork_probing"
    batch_size: int = Field(32, ge=1, description="examples per optimisation step")
    lambda_reg: float = Field(
        1.0, ge=0, description="weight of the expected-L0 regulariser, mean over nodes of P(mask > 0) (the ACDC code: 100, swept 0.01-250)"
    )
    steps: int = Field(3000, ge=1, description="optimisation steps (the ACDC code's 3000 epochs, one batch each)")
    lr: float = Field(0.01, gt=0, description="Adam learning rate of the log-alphas (the ACDC code: 0.001)")
    objective: Literal["kl", "metric"] = Field("kl", description="as edge_pruning's")
    init_log_alpha: float = Field(
        1.609, description="initial log-alpha (the SP code's: a mask of 0.9 before stretching, logit(1/1.2) ~ 1.61)"
    )
    cache_mib: float = Field(1024, ge=0, description="as edge_pruning's")
    checkpoint_every_seconds: float = Field(30.0, ge=0, description="save resumable progress to RUN_DIR/checkpoint this often")


class IfrSettings(MethodSettings):
    """Information flow routes (Ferrando and Voita 2024), as in the EAP-IG library: one clean forward."""

    name: Literal["ifr"] = "ifr"


class EnsembleSettings(MethodSettings):
    """Several edge methods run on the same data, scores combined."""

    name: Literal["ensemble"] = "ensemble"
    members: list[Any] = Field(..., min_length=2, description="edge methods: names or {name, settings} mappings")
    combine: Literal["mean_rank", "mean_normalized"] = Field(
        "mean_rank",
        description="mean_rank: mean over members of sign(score) x rank of |score| / n_edges; mean_normalized: mean of "
        "score / max |score| of each member",
    )

    @field_validator("members")
    @classmethod
    def _members(cls, value):
        settings = []
        for index, spec in enumerate(value):
            try:
                settings.append(member_settings(spec))
            except ValueError as exc:
                raise ValueError(f"member {index}: {exc}") from None
        return settings



@dataclass(frozen=True)
class MethodInfo:
    name: str
    settings: type[MethodSettings]
    implementation: str  # "module:function", imported only when the method runs
    description: str
    stochastic: bool = False  # results depend on the seed (e.g. learned masks): stability runs several seeds


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
    MethodInfo(
        "edge_pruning",
        EdgePruningSettings,
        "circuitctl.methods.edge_pruning:discover",
        "edge pruning (Bhaskar et al. 2024): hard-concrete edge masks learned under a sparsity target; resumable",
        stochastic=True,  # the masks' initialisation, noise and data order follow the seed
    ),
    MethodInfo(
        "subnetwork_probing",
        SubnetworkProbingSettings,
        "circuitctl.methods.subnetwork_probing:discover",
        "subnetwork probing (ACDC paper's SP baseline): hard-concrete node masks with an L0 penalty",
        stochastic=True,  # the masks' initialisation, noise and data order follow the seed
    ),
    MethodInfo(
        "ifr",
        IfrSettings,
        "circuitctl.methods.ifr:discover",
        "information flow routes (Ferrando and Voita 2024): proximity of each writer to each reader's input, one clean pass",
    ),
    MethodInfo(
        "ensemble",
        EnsembleSettings,
        "circuitctl.methods.ensemble:discover",
        "several edge methods on the same data, scores combined by mean rank or mean normalised score",
    ),
):
    METHODS.add(_info.name, _info)
