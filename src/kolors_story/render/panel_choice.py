"""How a scene job chooses its panel: the one rule that says when the aesthetic predictor is needed.

Standard library only: the Snakefile (at parse time), the job plan and the scene jobs all ask it,
and a scene job must not pay for the config validator (jsonschema) to know it.
"""

from __future__ import annotations

from collections.abc import Sequence


def needs_scorer(candidates: int, lora_scale: float | Sequence[float], prompts: int = 1) -> bool:
    """Whether a scene job renders several images (best-of-N, a sweep of LoRA scales, or a scene's
    alternative prompts) and so picks one with the aesthetic predictor. The one decision: the rules
    give the job the model when this is true, and render_scene refuses to start without it."""
    n_scales = len(lora_scale) if isinstance(lora_scale, (list, tuple)) else 1
    return candidates * n_scales * prompts > 1
