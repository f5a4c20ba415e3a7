import logging
from pathlib import Path

from kolors_story.data.images import parse_background
from kolors_story.data.local_folder import collect_local
from kolors_story.data.modelscope_dataset import download_modelscope_dataset
from kolors_story.data.rows import SourceReport, write_rows
from kolors_story.files import write_json
from kolors_story.plan.content_digest import digest, listing
from kolors_story.host.rule_runner import run_rule


def main(snakemake):
    ds, images = snakemake.params.dataset, Path(snakemake.output.images)
    images.mkdir(parents=True, exist_ok=True)
    background = parse_background(ds["background"])
    if ds["source"] == "local":
        rows, report = collect_local(
            Path(ds["path"]), images, ds["caption_template"], ds["default_caption"], ds["max_images"], background
        )
    else:
        report = SourceReport("modelscope")
        rows = download_modelscope_dataset(
            ds["id"], ds["subset"], ds["split"], images, ds["caption_column"],
            ds["caption_template"], ds["default_caption"], ds["max_images"],
            cache_dir=Path("resources/modelscope/datasets"), image_column=ds["image_column"],
            background=background, report=report, needed=snakemake.params.needed,
        )
    # The files read, by content: the next plan names what changed (rules/common.smk, dataset_content)
    files = listing(Path(ds["path"]), Path(snakemake.params.content_cache)) if ds["source"] == "local" else {}
    write_json({"digest": digest(files), "files": files}, Path(snakemake.output.content), sort_keys=True)
    write_rows(rows, Path(snakemake.output.rows))
    summary = report.as_dict(len(rows))
    stats = write_json(summary, Path(snakemake.output.stats))
    counts = ", ".join(f"{k} {v}" for k, v in summary["counts"].items())
    logging.info("dataset: %d row(s) from %s (%s; see %s)", len(rows), ds["path"] if ds["source"] == "local" else ds["id"], counts, stats)


run_rule(main, snakemake)
