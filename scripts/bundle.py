import json
import logging
from pathlib import Path

from kolors_story.render.candidates_file import read_record
from kolors_story.outputs.publishing import ModelCard, build_bundle
from kolors_story.host.rule_runner import run_rule


def main(snakemake):
    records = [read_record(Path(folder)) for folder in snakemake.input.candidates]  # what each panel was rendered with
    scores = json.loads(Path(snakemake.input.scores).read_text(encoding="utf-8"))
    params = snakemake.params
    card = ModelCard.from_params(params.bundle, params.base_model, params.run, params.repo_id)
    others = {fmt: Path(snakemake.input[fmt]) for fmt in ("diffsynth", "comfyui") if fmt in snakemake.input.keys()}
    out = build_bundle(Path(snakemake.output[0]), Path(snakemake.input.lora), [Path(p) for p in snakemake.input.panels],
                       records, scores, Path(snakemake.input.story), card, other_loras=others)
    logging.info("bundle ready at %s", out)


run_rule(main, snakemake)
