import json
from pathlib import Path

from kolors_story.outputs.manifest import (
    build_manifest,
    read_benchmarks,
    write_resolved_config,
)
from kolors_story.data.training_folder import cut_captions
from kolors_story.files import write_json
from kolors_story.render.candidates_file import read_record
from kolors_story.outputs.report_figures import draw_timings, timing_rows
from kolors_story.host.rule_runner import run_rule


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
    records = [read_record(Path(folder)) for folder in snakemake.input.candidates]
    seeds = dict(snakemake.params.seeds)
    seeds.update({f"{r.scene}_panel": r.seed for r in records})  # best-of-N: the seed of the kept candidate
    manifest = build_manifest(dict(snakemake.params.config), models, seeds, inputs, panels=records)
    manifest["jobs"] = dict(snakemake.params.jobs)  # the keys of the shared jobs under results/shared/
    # what ChatGLM's 256 tokens cut, where the config opted in (truncate_long_prompts, _captions)
    manifest["cut_texts"] = {"config": list(snakemake.params.cut_texts),
                             "captions": cut_captions(inputs["training_data"])}
    benchmarks = dict(zip(snakemake.params.benchmark_labels, map(Path, snakemake.input.benchmarks)))
    manifest["timings"] = read_benchmarks(benchmarks)
    write_json(manifest, Path(snakemake.output.manifest))
    write_resolved_config(dict(snakemake.params.config), Path(snakemake.output.config))
    draw_timings(timing_rows(manifest["timings"]), Path(snakemake.output.timings))


run_rule(main, snakemake)
