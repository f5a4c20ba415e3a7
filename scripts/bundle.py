import json
import logging
from pathlib import Path

from kolors_story.publishing import build_bundle
from kolors_story.rule_runner import run_rule


def main(snakemake):
    scenes = []
    for scene, panel, folder in zip(snakemake.params.scenes, snakemake.input.panels, snakemake.input.candidates):
        chosen = json.loads((Path(folder) / "candidates.json").read_text(encoding="utf-8"))
        scenes.append(dict(scene, image=panel, seed=chosen["seed"]))  # best-of-N: the kept seed
    scores = json.loads(Path(snakemake.input.scores).read_text(encoding="utf-8"))
    bundle = snakemake.params.bundle
    out = build_bundle(
        Path(snakemake.output[0]), Path(snakemake.input.lora), scenes, scores,
        Path(snakemake.input.story), snakemake.params.base_model, bundle["title"],
        bundle["trigger_words"], snakemake.params.run, repo_id=snakemake.params.repo_id,
    )
    logging.info("bundle ready at %s", out)


run_rule(main, snakemake)
