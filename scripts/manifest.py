import json
from pathlib import Path

from kolors_story.manifest import build_manifest, write_manifest, write_resolved_config
from kolors_story.rule_runner import run_rule


def main(snakemake):
    models = {}
    for path in snakemake.input.models:
        info = json.loads(Path(path).read_text(encoding="utf-8"))
        models[info["name"]] = info["path"]
    inputs = {
        "dataset_rows": Path(snakemake.input.dataset),
        "lora": Path(snakemake.input.lora),
        "story": Path(snakemake.input.story),
        "scores": Path(snakemake.input.scores),
        "panels": Path(snakemake.input.panels[0]).parent,
        "training_data": Path(snakemake.input.training_data),
    }
    seeds = dict(snakemake.params.seeds)
    for folder in snakemake.input.candidates:  # best-of-N: the seed of the kept candidate
        record = json.loads((Path(folder) / "candidates.json").read_text(encoding="utf-8"))
        seeds[f"{record['scene']}_panel"] = record["seed"]
    manifest = build_manifest(dict(snakemake.params.config), models, seeds, inputs)
    write_manifest(manifest, Path(snakemake.output.manifest))
    write_resolved_config(dict(snakemake.params.config), Path(snakemake.output.config))


run_rule(main, snakemake)
