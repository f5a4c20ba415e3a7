import logging
from pathlib import Path

from kolors_story import dataset
from kolors_story.rule_runner import run_rule


def main(snakemake):
    ds, images = snakemake.params.dataset, Path(snakemake.output.images)
    images.mkdir(parents=True, exist_ok=True)
    if ds["source"] == "local":
        rows = dataset.collect_local_rows(Path(ds["path"]), ds["caption_template"], ds["default_caption"])
        rows = dataset.copy_into_run(rows[: ds["max_images"]], images)
    else:
        rows = dataset.download_modelscope_dataset(
            ds["id"], ds["subset"], ds["split"], images, ds["caption_column"],
            ds["caption_template"], ds["default_caption"], ds["max_images"],
            cache_dir=Path("resources/modelscope/datasets"),
        )
    dataset.write_rows(rows, Path(snakemake.output.rows))
    logging.info("dataset: %d row(s) from %s", len(rows), ds["path"] if ds["source"] == "local" else ds["id"])


run_rule(main, snakemake)
