"""Settings of the learned-circuit and combination methods of the MIB leaderboard: edge pruning,
subnetwork probing, information flow routes and ensembles.

Registered in `circuitctl.config.methods.METHODS` like every method. A *member* (an ensemble's
members, edge pruning's ``init_from``) is another edge method given by name or as a mapping of
its own settings; it is validated with that method's settings class, so a typo inside a member is
reported with its path (``method.members.1.steps``).
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import Field, field_validator, model_validator

from circuitctl.config.methods import METHODS, MethodInfo, MethodSettings

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
    if name not in METHODS:
        from circuitctl.registry import unknown_name_message

        raise ValueError(unknown_name_message("method", str(name), METHODS.names()))
    if name in NOT_EDGE_METHODS:
        raise ValueError(f"'{name}' cannot be a member: members must score edges (e.g. exact, eap, eap_ig, acdc, cdt, ifr)")
    from pydantic import ValidationError

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


LEARNED_METHODS = (
    MethodInfo(
        "edge_pruning",
        EdgePruningSettings,
        "circuitctl.methods.edge_pruning:discover",
        "edge pruning (Bhaskar et al. 2024): hard-concrete edge masks learned under a sparsity target; resumable",
        decides_membership=True,
    ),
    MethodInfo(
        "subnetwork_probing",
        SubnetworkProbingSettings,
        "circuitctl.methods.subnetwork_probing:discover",
        "subnetwork probing (ACDC paper's SP baseline): hard-concrete node masks with an L0 penalty",
        decides_membership=True,
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
)

for _info in LEARNED_METHODS:
    METHODS.add(_info.name, _info)
