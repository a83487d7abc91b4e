"""Where an SAE or transcoder attaches to a model: checks, and a warning for off-config placements.

- :func:`check_attachable` resolves and checks the one site an SAE reads and rewrites (it refuses
  transcoders, which cannot stand in for a single site's activation).
- :func:`resolve_splice` resolves both ends of a splice: for an SAE the same site twice, for a
  transcoder its input site (read) and its output site (replaced), checked for width and order.
- :func:`attach_warning` returns a sentence for the UI/CLI when an SAE is placed somewhere other than
  where its config says it was trained (or its config does not say), else None.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from engine.core.anatomy import Anatomy
from engine.core.sites import EDIT_SITES, site_width
from engine.sae.base import SAE
from engine.sae.hooks import SAECompatibilityError

READ_SITES = (*EDIT_SITES, "resid_mid")  # a transcoder may read resid_mid (derived, read-only)
# order of the sites inside one decoder layer, to check that a transcoder's input is computed first
_ORDER = {"resid_pre": 0, "attn_out": 1, "resid_mid": 2, "mlp_hidden": 3, "mlp_out": 4, "resid_post": 5}


@dataclass(frozen=True)
class Splice:
    """A splice: read ``in_site``/``in_layer``, replace ``out_site``/``out_layer`` (the same for an SAE)."""

    in_site: str
    in_layer: int
    out_site: str
    out_layer: int

    @property
    def same_site(self) -> bool:
        return (self.in_site, self.in_layer) == (self.out_site, self.out_layer)


def _check_site(anatomy: Anatomy, site: str, layer: int, width: int, allowed: tuple[str, ...], role: str) -> None:
    if site not in allowed:
        raise SAECompatibilityError(f"An SAE cannot {role} the site '{site}'; supported: {', '.join(allowed)}.")
    if not 0 <= layer < anatomy.n_layers:
        raise SAECompatibilityError(f"The SAE {role}s layer {layer}, but this model has layers "
                                    f"0..{anatomy.n_layers - 1}.")
    actual = site_width(anatomy, site, layer)
    if actual != width:
        name = "d_in" if role == "read" else "d_out"
        raise SAECompatibilityError(f"The SAE expects {name}={width}, but {site} at layer {layer} of this model has "
                                    f"width {actual}: it was trained on a different model or site.")


def pick_site(configured: Callable[[], tuple[str, int]], site: str | None,
              layer: int | None) -> tuple[str, int]:
    """``site``/``layer`` where given, the config's (``configured()``) for the rest."""
    if site is None or layer is None:
        cfg_site, cfg_layer = configured()
        site = cfg_site if site is None else site
        layer = cfg_layer if layer is None else layer
    return site, int(layer)


def check_attachable(sae: SAE, anatomy: Anatomy, site: str | None = None,
                     layer: int | None = None) -> tuple[str, int]:
    """Resolve the SAE's site and layer on this model, checking layer range and width; returns ``(site, layer)``."""
    if sae.is_transcoder:
        raise SAECompatibilityError(f"This is a {sae.architecture} (it reads one site and writes another), so it "
                                    "cannot stand in for a single site's activation; splice it with resolve_splice.")
    site, layer = pick_site(sae.cfg.site, site, layer)
    _check_site(anatomy, site, layer, sae.d_in, EDIT_SITES, "read")
    return site, layer


def resolve_splice(sae: SAE, anatomy: Anatomy, site: str | None = None, layer: int | None = None,
                   out_site: str | None = None, out_layer: int | None = None) -> Splice:
    """Both ends of the splice, each from the arguments where given, else from the config; checked."""
    if not sae.is_transcoder:
        site, layer = check_attachable(sae, anatomy, site, layer)
        return Splice(site, layer, site, layer)
    site, layer = pick_site(sae.cfg.site, site, layer)
    out_site, out_layer = pick_site(sae.cfg.output_site, out_site, out_layer)
    _check_site(anatomy, site, layer, sae.d_in, READ_SITES, "read")
    _check_site(anatomy, out_site, out_layer, sae.d_out, EDIT_SITES, "write")
    if (layer, _ORDER[site]) > (out_layer, _ORDER[out_site]):
        raise SAECompatibilityError(f"The transcoder reads {site} at layer {layer}, which the model computes after "
                                    f"{out_site} at layer {out_layer}, the site it writes.")
    return Splice(site, layer, out_site, out_layer)


def attach_warning(sae: SAE, site: str, layer: int, out_site: str | None = None,
                   out_layer: int | None = None) -> str | None:
    """A sentence when ``site``/``layer`` (and for a transcoder ``out_site``/``out_layer``) differ from the
    config's, or the config names no hook; None when the placement is the one the SAE was trained for."""
    try:
        trained = sae.cfg.site()
    except SAECompatibilityError:
        return (f"The SAE's config names no usable hook, so nothing confirms that {site} at layer {layer} is where "
                "it was trained.")
    if (site, int(layer)) != trained:
        return (f"This SAE was trained on {trained[0]} at layer {trained[1]} but is attached to {site} at layer "
                f"{layer}: its features may mean nothing there.")
    if sae.is_transcoder and out_site is not None and out_layer is not None:
        try:
            target = sae.cfg.output_site()
        except SAECompatibilityError:
            return "The transcoder's config names no usable output hook, so its target site is unconfirmed."
        if (out_site, int(out_layer)) != target:
            return (f"This transcoder was trained to predict {target[0]} at layer {target[1]} but replaces "
                    f"{out_site} at layer {out_layer}.")
    return None
