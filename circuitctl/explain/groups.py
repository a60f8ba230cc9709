"""Heads that do the same job: same role, same top attention target, same sign of DLA.

A head's role here is its most specific listed role (`roles.SPECIFICITY`); a head without a
listed role or whose top target is `other` (attention spread beyond the named positions), an
MLP or a feature stays in a group of its own. Groups are named from their key
and members, e.g. ``negative_mover->S2 (+): a1.h1, a1.h3, a1.h0`` (members by |DLA|, largest
first); ids ``g1, g2, ...`` follow the summed |DLA|, largest first.
"""

from __future__ import annotations

from dataclasses import dataclass

SIGN_TOLERANCE = 0.02  # |DLA| below this fraction of the circuit's largest |DLA| counts as 0


@dataclass(frozen=True)
class Member:
    name: str
    role: str | None  # the head's most specific listed role (None: no role, or not a head)
    target: str | None  # its top attention target
    dla: float  # clean mean DLA


@dataclass
class Group:
    id: str
    name: str
    members: list[str]
    role: str | None = None
    target: str | None = None
    sign: str | None = None
    dla: float = 0.0  # summed clean DLA of the members

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "name": self.name,
            "members": self.members,
            "role": self.role,
            "target": self.target,
            "dla_sign": self.sign,
            "dla_clean": self.dla,
        }


def sign_of(value: float, tolerance: float) -> str:
    if value > tolerance:
        return "+"
    if value < -tolerance:
        return "-"
    return "0"


def group_nodes(members: list[Member]) -> list[Group]:
    """Group the nodes; every node ends up in exactly one group."""
    scale = max((abs(m.dla) for m in members), default=0.0)
    tolerance = max(SIGN_TOLERANCE * scale, 1e-9)
    keyed: dict[tuple, list[Member]] = {}
    for member in members:
        sign = sign_of(member.dla, tolerance)
        # a head without a role, or whose attention is spread ("other"), shares no job with another
        shared = member.role is not None and member.target not in (None, "other")
        key = (member.role, member.target, sign) if shared else ("single", member.name)
        keyed.setdefault(key, []).append(member)
    weighted = []
    for key, found in keyed.items():
        found.sort(key=lambda m: -abs(m.dla))
        names = [m.name for m in found]
        total = sum(m.dla for m in found)
        if key[0] == "single":
            group = Group("", names[0], names, dla=total)
        else:
            role, target, sign = key
            group = Group("", f"{role}->{target} ({sign}): {', '.join(names)}", names, role, target, sign, total)
        weighted.append((-sum(abs(m.dla) for m in found), group.name, group))
    groups = [group for _, _, group in sorted(weighted, key=lambda item: item[:2])]
    for i, group in enumerate(groups, start=1):
        group.id = f"g{i}"
    return groups
