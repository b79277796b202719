"""PRM families: which implementation scores for which PRM, a model id -> family table, overridable per recipe.

    python -c "from ttc_mlops.prm.families import family_for; print(family_for('RLHFlow/Llama3.1-8B-PRM-Mistral-Data'))"
"""

from __future__ import annotations

from ..config import EMBEDDED_MODEL, RecipeError

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


def _families() -> dict[str, str]:
    # family -> "module:Class", imported only when the PRM is built
    return {
        "rlhflow": "ttc_mlops.prm.rlhflow:RLHFlowPRM",
        "math_shepherd": "ttc_mlops.prm.math_shepherd:MathShepherdPRM",
        "skywork": "ttc_mlops.prm.skywork:SkyworkPRM",
        "qwen_math_prm": "ttc_mlops.prm.qwen_prm:QwenMathPRM",
    }


def family_for(prm_path: str, prm_family: str | None = None) -> str:
    families = _families()
    if prm_family is not None:
        if prm_family not in families:
            raise RecipeError(f"prm_family={prm_family!r} is not one of {sorted(families)}")
        return prm_family
    if prm_path in KNOWN_PRMS:
        return KNOWN_PRMS[prm_path]
    raise RecipeError(f"prm_path={prm_path!r} is not a known PRM ({sorted(KNOWN_PRMS)}); "
                      f"set prm_family to one of {sorted(families)} to say how it scores")


def prm_class(prm_path: str, prm_family: str | None = None):
    import importlib

    module, cls = _families()[family_for(prm_path, prm_family)].split(":")
    return getattr(importlib.import_module(module), cls)
