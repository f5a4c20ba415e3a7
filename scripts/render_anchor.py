from pathlib import Path

from kolors_story.render.scenes import Consistency, RenderInputs, SamplerSettings, Scene, render_anchor
from kolors_story.host.rule_runner import run_rule


def main(snakemake):
    a, inp = snakemake.params.anchor, snakemake.input
    inputs = RenderInputs(Path(inp.model), Path(inp.lora), cache_dir=Path(snakemake.params.cache_dir),
                          embeddings=Path(inp.embeddings))
    render_anchor(inputs, Scene(a["id"], a["prompt"], a["negative_prompt"], a["seed"], a["width"], a["height"]),
                  SamplerSettings(**snakemake.params.sampler), Consistency(**snakemake.params.consistency),
                  Path(snakemake.output[0]))


run_rule(main, snakemake)
