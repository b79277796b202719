"""PRM families: which implementation scores for which PRM, a model id -> family table, overridable per recipe.

    python -c "from ttc_mlops.prm.families import family_for; print(family_for('RLHFlow/Llama3.1-8B-PRM-Mistral-Data'))"

Families are built in or come from installed packages: a package names its own under the
entry-point group `ttc_mlops.prm_families` (name: the family, value: "module:Class", a class that
takes a `PRMSettings`, usually a `StepwisePRM` subclass):

    [project.entry-points."ttc_mlops.prm_families"]
    my_probe = "my_package.prm:MyProbePRM"

A built-in name wins over a plugin's (with a warning). Finding families reads package metadata
only; a family's module is imported when its PRM is built.
"""

from __future__ import annotations

import functools
import logging
import sys
from dataclasses import dataclass

from ..config import EMBEDDED_MODEL, RecipeError

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "ttc_mlops.prm_families"

KNOWN_PRMS = {
    "RLHFlow/Llama3.1-8B-PRM-Deepseek-Data": "rlhflow",
    "RLHFlow/Llama3.1-8B-PRM-Mistral-Data": "rlhflow",
    EMBEDDED_MODEL: "rlhflow",  # the embedded model asked in RLHFlow's +/- format
    "peiyi9979/math-shepherd-mistral-7b-prm": "math_shepherd",
    "Skywork/Skywork-o1-Open-PRM-Qwen-2.5-1.5B": "skywork",
    "Skywork/Skywork-o1-Open-PRM-Qwen-2.5-7B": "skywork",
    "Qwen/Qwen2.5-Math-PRM-7B": "qwen_math_prm",
    "Qwen/Qwen2.5-Math-PRM-72B": "qwen_math_prm",
}

BUILTIN = {  # family -> "module:Class", imported only when the PRM is built
    "rlhflow": "ttc_mlops.prm.rlhflow:RLHFlowPRM",
    "math_shepherd": "ttc_mlops.prm.math_shepherd:MathShepherdPRM",
    "skywork": "ttc_mlops.prm.skywork:SkyworkPRM",
    "qwen_math_prm": "ttc_mlops.prm.qwen_prm:QwenMathPRM",
    "trl": "ttc_mlops.prm.trl:TRLPRM",
}

_warned: set[tuple[str, str]] = set()


@dataclass(frozen=True)
class Family:
    name: str
    target: str  # "module:Class"
    dist: str | None = None  # the installed package that provides it; None: built in


def families() -> dict[str, Family]:
    """Every family found: the built-in ones, then the plugins' (read from package metadata once per
    `sys.path`: a recipe check asks several times, and each read walks every installed package)."""
    found = {name: Family(name, target) for name, target in BUILTIN.items()}
    for ep_name, value, dist in _plugin_entry_points(tuple(sys.path)):
        if ep_name in found:
            if (ep_name, dist) not in _warned:
                _warned.add((ep_name, dist))
                kept = found[ep_name]
                log.warning("PRM family %r from %s is ignored: the name is taken by %s", ep_name, dist,
                            "a built-in family" if kept.dist is None else kept.dist)
            continue
        found[ep_name] = Family(ep_name, value, dist)
    return found


@functools.lru_cache(maxsize=8)
def _plugin_entry_points(path: tuple[str, ...]) -> tuple[tuple[str, str, str], ...]:
    """(name, "module:Class", package) of every entry point in the group, on this `sys.path`."""
    from importlib.metadata import entry_points

    return tuple((ep.name, ep.value, ep.dist.name if ep.dist is not None else "unknown package")
                 for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: (e.name, e.value)))


def family_for(prm_path: str, prm_family: str | None = None) -> str:
    found = families()
    if prm_family is not None:
        if prm_family not in found:
            raise RecipeError(f"prm_family={prm_family!r} is not one of {sorted(found)}")
        return prm_family
    if prm_path in KNOWN_PRMS:
        return KNOWN_PRMS[prm_path]
    raise RecipeError(f"prm_path={prm_path!r} is not a known PRM ({sorted(KNOWN_PRMS)}); "
                      f"set prm_family to one of {sorted(found)} to say how it scores")


def prm_class(prm_path: str, prm_family: str | None = None):
    from importlib.metadata import EntryPoint

    family = families()[family_for(prm_path, prm_family)]
    if family.dist is None:
        return EntryPoint(family.name, family.target, ENTRY_POINT_GROUP).load()
    try:
        cls = EntryPoint(family.name, family.target, ENTRY_POINT_GROUP).load()
    except (ImportError, AttributeError) as err:
        raise RecipeError(f"prm_family={family.name!r}: {family.target} (from {family.dist}) cannot be "
                          f"imported: {err}") from err
    if not (isinstance(cls, type) and callable(getattr(cls, "score", None))
            and callable(getattr(cls, "clear_cache", None))):
        raise RecipeError(f"prm_family={family.name!r}: {family.target} (from {family.dist}) is not a PRM class "
                          f"(one with score() and clear_cache(), e.g. a ttc_mlops.prm.stepwise.StepwisePRM subclass)")
    return cls
