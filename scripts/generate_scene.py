from pathlib import Path

from kolors_story.render.scenes import Consistency, RenderInputs, SamplerSettings, Scene, render_scene
from kolors_story.host.rule_runner import run_rule


def main(snakemake):
    s, inp, params = snakemake.params.scene, snakemake.input, snakemake.params
    scene = Scene(s["id"], s["prompt"], s["negative_prompt"], s["seed"], s["width"], s["height"],
                  tuple(s.get("alternatives", ())))
    inputs = RenderInputs(Path(inp.model), Path(inp.lora), cache_dir=Path(params.cache_dir),
                          embeddings=Path(inp.embeddings),
                          aesthetic_dir=Path(inp.aesthetic) if "aesthetic" in inp.keys() else None)
    render_scene(inputs, scene, SamplerSettings(**params.sampler), Path(snakemake.output.panel),
                 candidates_dir=Path(snakemake.output.candidates), anchors=[Path(p) for p in inp.anchors],
                 consistency=Consistency(**params.consistency) if params.consistency else None)


run_rule(main, snakemake)
