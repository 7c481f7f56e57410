"""Settings whose key moved, so an old command line is refused with the new spelling instead of
failing in Hydra's words or, worse, being accepted. Light on purpose: ``run.py`` checks its
arguments against it before Hydra composes anything."""

from __future__ import annotations

from collections.abc import Iterable

# The interchange settings left ``loss`` for ``intervention``: the code that reads them is the
# intervention's, and they act only when a loss term needs the counterfactual pair.
MOVED = {
    f"loss.{name}": f"intervention.{name}"
    for name in (
        "interchange_prop",
        "interchange_mode",
        "interchange_max_token",
        "interchange_min_token",
        "pairing",
        "eval_pairs",
        "separate_passes",
    )
}


def message(key: str) -> str:
    return f"{key}: moved to {MOVED[key]} (the interchange settings are the intervention group's now); write {MOVED[key]}=..."


def in_overrides(overrides: Iterable[str]) -> str | None:
    """The message for the first command-line override (``key=value``, ``+key=value``, ``~key``)
    that uses an old spelling, or None."""
    for override in overrides:
        if override.startswith("-"):
            continue
        key = override.split("=", 1)[0].lstrip("+~")
        if key in MOVED:
            return message(key)
    return None
