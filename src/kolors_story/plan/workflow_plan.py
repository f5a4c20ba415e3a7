"""The workflow's plan: one immutable value that rules/*.smk read, built here.

`expand_variants` reads the config once (schema, sweep, upload token). `plan_workflow` takes those
variants and the scenes files the prompt writer has written so far (a Snakemake checkpoint's
outputs) and gives the `WorkflowPlan`: every variant's config with its written scenes in, the
writer jobs, and the keyed jobs of every variant whose scenes are known. A variant still waiting
for its writer has no jobs yet; once the writer's file exists, the same function gives the plan
with its scenes (rules/common.smk's plan(): the plan of the files there now, built once each).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from kolors_story.plan.config import check_upload_token, scene_settings, validate_config
from kolors_story.plan.job_plan import JobPlan, plan_jobs
from kolors_story.plan.outline import (
    read_written_scenes,
    sorted_keys,
    with_written_scenes,
    writer_key,
    writer_settings,
    writes_from_outline,
)
from kolors_story.plan.sweep import expand_sweep


def expand_variants(config: dict, schema: dict) -> dict[str, dict]:
    """Variant name -> its validated config (one, without a sweep); UserError on a bad value or a
    variant that uploads without a token."""
    variants = expand_sweep(validate_config(config, schema), lambda c: validate_config(c, schema))
    for variant in variants.values():
        check_upload_token(variant)
    return variants


def outline_writers(variants: Mapping[str, dict]) -> dict[str, str]:
    """Variant whose story is an outline -> the key of its prompt writer's job."""
    return {name: writer_key(c) for name, c in variants.items() if writes_from_outline(c)}


def local_writer_model(config: dict) -> str | None:
    """The prompt writer's model id or folder where its backend runs one in the job (else None)."""
    writer = config["prompt_writer"]
    return writer["model"] if writes_from_outline(config) and writer["backend"] == "local" else None


def writer_job(config: dict) -> dict[str, Any]:
    """What a writer job reads: its keyed settings, prompt_writer.* (keys sorted: Snakemake compares
    params as written) and its local model, if any."""
    return {**writer_settings(config), "prompt_writer": sorted_keys(config["prompt_writer"]),
            "local_model": local_writer_model(config)}


@dataclass(frozen=True)
class WorkflowPlan:
    """What the workflow runs, for the writer files that existed when it was built. Its fields
    cannot be rebound and its tables are read-only views; the settings inside stay plain dicts and
    lists, what Snakemake records and compares as a job's params."""

    variants: Mapping[str, dict]  # name -> validated config, written scenes in place of an outline
    writer_keys: Mapping[str, str]  # variant whose story is an outline -> its writer job's key
    writers: Mapping[str, dict]  # writer job key -> writer_job()
    waiting: tuple[str, ...]  # variants whose writer has not written yet: no jobs planned for them
    jobs: JobPlan  # the keyed jobs of the other variants
    scenes: Mapping[str, dict[str, dict]]  # variant (not waiting) -> scene id -> scene_settings()


def plan_workflow(variants: Mapping[str, dict], schema: dict, written: Mapping[str, Path]) -> WorkflowPlan:
    """The plan of `variants` (expand_variants), each outline variant with the scenes of its writer's
    file where `written` (writer job key -> its scenes file) has one; UserError on a file that is
    not its outline's."""
    writer_keys = outline_writers(variants)
    resolved = dict(variants)
    for name, key in writer_keys.items():
        if key in written:
            entries = read_written_scenes(written[key], variants[name]["story"]["outline"])
            resolved[name] = validate_config(with_written_scenes(variants[name], entries), schema)
    ready = {name: c for name, c in resolved.items() if not writes_from_outline(c)}
    return WorkflowPlan(
        variants=MappingProxyType(resolved),
        writer_keys=MappingProxyType(writer_keys),
        writers=MappingProxyType({key: writer_job(variants[name]) for name, key in writer_keys.items()}),
        waiting=tuple(name for name in resolved if name not in ready),
        jobs=plan_jobs(ready),
        scenes=MappingProxyType({name: scene_settings(c) for name, c in ready.items()}),
    )
