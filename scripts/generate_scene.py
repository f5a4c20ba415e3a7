from pathlib import Path

from kolors_story.generation import SamplerSettings, Scene, render_scene
from kolors_story.rule_runner import run_rule


def main(snakemake):
    s = snakemake.params.scene
    scene = Scene(s["id"], s["prompt"], s["negative_prompt"], s["seed"], s["width"], s["height"])
    render_scene(
        Path(snakemake.input.model), Path(snakemake.input.lora), scene,
        SamplerSettings(**snakemake.params.sampler), Path(snakemake.output[0]),
    )


run_rule(main, snakemake)
