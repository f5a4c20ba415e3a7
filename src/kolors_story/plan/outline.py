"""A story given as `story.outline`: its scenes are written by the prompt writer's job
(rules/prompts.smk, a Snakemake checkpoint) and read back here when the workflow plans.

The writer's job is keyed by exactly what it sends and what its file holds (the outline, the
story's title, style and characters, story.prompt_rules and the model settings), so an unchanged
outline is never written again, by any variant. Its file (`scenes.yaml`, the format of
`results/<run>/prompts.yaml`) holds scene entries in story.scenes' own form: a variant whose file
exists is planned as if those scenes had been written in its config, and its resolved config
(results/<run>/config.yaml) holds them instead of the outline, so reproducing it never calls a
language model. Scenes whose written prompt did not change keep their job keys: they never render
again.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from kolors_story.errors import UserError
from kolors_story.plan.sweep import job_key
from kolors_story.seals import verify
from kolors_story.writing.llm_client import ChatSettings


def writes_from_outline(config: dict) -> bool:
    """The story is an outline whose scene prompts the writer has yet to give."""
    return "outline" in config["story"] and "scenes" not in config["story"]


def writer_settings(config: dict) -> dict[str, Any]:
    """What the writer's job depends on: what it sends the model and what its file copies. Keys
    sorted at every level: Snakemake compares a job's params as written, so the same outline with
    its keys in another order in the YAML must not rerun the writer."""
    story = config["story"]
    return sorted_keys({
        "story": {k: story[k] for k in ("title", "style", "characters", "outline") if k in story},
        "rules": story["prompt_rules"],
        "writer": ChatSettings(**config["prompt_writer"]).identity(),
    })


def sorted_keys(value: Any) -> Any:
    """`value` with every mapping's keys in sorted order (lists keep theirs)."""
    if isinstance(value, dict):
        return {k: sorted_keys(value[k]) for k in sorted(value)}
    return [sorted_keys(v) for v in value] if isinstance(value, list) else value


def writer_key(config: dict) -> str:
    return job_key(writer_settings(config))


def read_written_scenes(path: Path, outline: list[dict]) -> list[dict]:
    """The scene entries of a writer's file, checked against the outline it was written from."""
    verify(path)  # a file changed or cut since its job: one line with the command that remakes it
    try:
        entries = yaml.safe_load(path.read_text(encoding="utf-8"))["scenes"]
        ids = [entry["id"] for entry in entries]
    except (OSError, yaml.YAMLError, KeyError, TypeError) as err:
        raise UserError(f"{path}: not a prompt writer's scenes file ({type(err).__name__}); delete it and rerun "
                        "to write the scenes again") from None
    if ids != [item["id"] for item in outline]:
        raise UserError(f"{path}: its scenes {ids} are not the outline's; delete it and rerun")
    return entries


def with_written_scenes(config: dict, entries: list[dict]) -> dict:
    """The config as if its scenes had been written by hand: story.scenes, no story.outline."""
    resolved = copy.deepcopy(config)
    resolved["story"].pop("outline")
    resolved["story"]["scenes"] = copy.deepcopy(entries)
    return resolved
