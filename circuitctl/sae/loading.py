"""Which SAE sits at which site: resolve the `saes` setting of a run.

`saes` is either a directory (one SAE in sae-lens's format, or sub-directories of them) whose
SAEs are placed by the hook name in their cfg.json, or a mapping ``{site: source}`` where a
source is an SAE directory or ``{release, sae_id}`` of a pretrained sae-lens release.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from circuitctl.errors import UsageError
from circuitctl.models.sae_sites import check_site, site_of_hook
from circuitctl.resources import resolve_path
from circuitctl.sae.sae import CFG_FILE, SparseAutoencoder, load_pretrained, load_sae
from circuitctl.graph.naming import Site, is_site_name, parse_site, sort_sites


def _site_from_sae(sae: SparseAutoencoder, fallback: str | None, where: str) -> Site:
    if sae.info.hook_name:
        return site_of_hook(sae.info.hook_name)
    if fallback and is_site_name(fallback):
        return parse_site(fallback)
    raise UsageError(f"{where}: the SAE's cfg.json names no hook (metadata.hook_name), so its site is unknown; list it as {{site: path}}")


def _from_directory(path: Path, device) -> dict[Site, tuple[SparseAutoencoder, str]]:
    if (path / CFG_FILE).is_file():
        candidates = [path]
    else:
        candidates = sorted(p for p in path.iterdir() if p.is_dir() and (p / CFG_FILE).is_file()) if path.is_dir() else []
    if not candidates:
        raise UsageError(f"method.saes: '{path}' holds no SAE (a directory with {CFG_FILE}, or sub-directories of them)")
    found: dict[Site, tuple[SparseAutoencoder, str]] = {}
    for directory in candidates:
        sae = load_sae(directory, device)
        site = _site_from_sae(sae, directory.name, str(directory))
        if site in found:
            raise UsageError(f"method.saes: '{directory}' and '{found[site][1]}' are both SAEs for site {site}")
        found[site] = (sae, str(directory.resolve()))
    return found


def resolve_saes(spec: Any, config_dir: Path | None, model, device) -> dict[Site, tuple[SparseAutoencoder, Any]]:
    """{site: (SAE, source)} in forward order, checked against the model; a source is an absolute
    directory path or {release, sae_id} (what a circuit file records)."""
    if isinstance(spec, str):
        path = resolve_path(spec, config_dir)
        if not path.exists():
            raise UsageError(f"method.saes: '{spec}' does not exist")
        found = _from_directory(path, device)
    else:
        found = {}
        for key, source in spec.items():
            site = parse_site(key)
            if isinstance(source, str):
                path = resolve_path(source, config_dir)
                if not path.is_dir():
                    raise UsageError(f"method.saes.{key}: '{source}' is not a directory")
                sae, origin = load_sae(path, device), str(path.resolve())
            else:  # {release, sae_id}: a mapping or the settings' PretrainedSae
                get = source.get if isinstance(source, dict) else lambda key: getattr(source, key)
                release, sae_id = get("release"), get("sae_id")
                sae, origin = load_pretrained(release, sae_id, device), {"release": release, "sae_id": sae_id}
            if sae.info.hook_name and site_of_hook(sae.info.hook_name) != site:
                raise UsageError(
                    f"method.saes.{key}: the SAE reads '{sae.info.hook_name}', which is site {site_of_hook(sae.info.hook_name)}, not {site}"
                )
            found[site] = (sae, origin)
    d_model = model.cfg.d_model
    for site, (sae, origin) in found.items():
        check_site(model, site)
        if sae.d_in != d_model:
            raise UsageError(f"SAE {origin} (site {site}) has d_in = {sae.d_in}, but the model's d_model is {d_model}")
        sae.to(device=device, dtype=model.W_U.dtype)
    return {site: found[site] for site in sort_sites(found)}
