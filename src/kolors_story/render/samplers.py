"""The samplers a scene can use (`generate.sampler`), each once: the scheduler the scene jobs build
(make_scheduler) and the same scheduler as code for the model card's usage snippet
(scheduler_code) come from one table, so the card renders with what the panels were rendered with.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Sampler:
    """A scheduler class built from Kolors' own scheduler config (its 1100 scaled_linear betas):
    `module`.`cls`.`constructor`(config, **options); `note`: comment lines the snippet shows above
    its import."""

    module: str
    cls: str
    constructor: str = "from_config"
    options: tuple[tuple[str, Any], ...] = ()
    note: tuple[str, ...] = ()


SAMPLERS: dict[str, Sampler] = {
    "euler": Sampler("diffusers", "EulerDiscreteScheduler"),
    # The challenge baseline's sampler, step for step: DiffSynth-Studio's DDIM (diffusers'
    # DDIMScheduler with Kolors' "leading" spacing and steps_offset 1 samples other timesteps).
    "ddim": Sampler("kolors_story.render.diffsynth_ddim", "DiffSynthDDIMScheduler", "from_scheduler_config",
                    note=("sampler ddim: DiffSynth-Studio's DDIM, from the kolors_story package (pip install the",
                          "kolors_story project); diffusers' DDIMScheduler samples other timesteps")),
    "dpmpp_2m": Sampler("diffusers", "DPMSolverMultistepScheduler",
                        options=(("algorithm_type", "dpmsolver++"), ("solver_order", 2))),
}


def _sampler(name: str) -> Sampler:
    if name not in SAMPLERS:
        names = list(SAMPLERS)
        raise ValueError(f"unknown sampler {name!r}; use {', '.join(names[:-1])} or {names[-1]}")
    return SAMPLERS[name]


def make_scheduler(name: str, base_config: dict):
    """Kolors' own betas (1100 steps, scaled_linear) with the chosen sampling algorithm."""
    sampler = _sampler(name)
    cls = getattr(importlib.import_module(sampler.module), sampler.cls)
    return getattr(cls, sampler.constructor)(base_config, **dict(sampler.options))


def scheduler_code(name: str) -> tuple[str, str]:
    """The snippet's import line(s) and the line that sets `pipe.scheduler`, as make_scheduler builds it."""
    sampler = _sampler(name)
    imports = "\n".join([*(f"# {line}" for line in sampler.note), f"from {sampler.module} import {sampler.cls}"])
    call = f"pipe.scheduler = {sampler.cls}.{sampler.constructor}("
    if not sampler.options:
        return imports, f"{call}pipe.scheduler.config)"
    options = ", ".join(f"{key}={json.dumps(value)}" for key, value in sampler.options)
    return imports, f"{call}\n    pipe.scheduler.config, {options})"
