"""The one sampler table: the schema's generate.sampler names each of its rows, and the model
card's code builds the scheduler make_scheduler builds."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kolors_story.render.samplers import SAMPLERS, make_scheduler, scheduler_code

SCHEMA = Path(__file__).parents[2] / "schemas" / "config.schema.yaml"
KOLORS_SCHEDULER = dict(num_train_timesteps=1100, beta_start=0.00085, beta_end=0.014, beta_schedule="scaled_linear",
                        timestep_spacing="leading", steps_offset=1, clip_sample=False, prediction_type="epsilon")


def test_the_schema_allows_exactly_the_table():
    schema = yaml.safe_load(SCHEMA.read_text(encoding="utf-8"))
    assert schema["properties"]["generate"]["properties"]["sampler"]["enum"] == list(SAMPLERS)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_the_snippet_code_builds_the_same_scheduler(name):
    imports, line = scheduler_code(name)

    class Pipe:
        scheduler = make_scheduler("euler", KOLORS_SCHEDULER)

    pipe = Pipe()
    exec(f"{imports}\n{line}", {"pipe": pipe})
    built = make_scheduler(name, KOLORS_SCHEDULER)
    assert type(pipe.scheduler) is type(built) and dict(pipe.scheduler.config) == dict(built.config)
