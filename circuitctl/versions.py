"""The versions of Python and of the libraries a result depends on, recorded with every result
(circuit files, reports, SAE training runs, interventions) so that it can be reproduced."""

from __future__ import annotations

import platform
from importlib import metadata

RECORDED = ("circuitctl", "torch", "transformer-lens", "pydantic", "numpy")


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in RECORDED:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions
