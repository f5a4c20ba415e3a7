import json
import logging
from pathlib import Path

from kolors_story.outputs.hub_upload import upload_bundle
from kolors_story.host.rule_runner import run_rule


def main(snakemake):
    result = upload_bundle(Path(snakemake.input[0]), snakemake.params.repo_id, snakemake.params.visibility)
    Path(snakemake.output[0]).write_text(json.dumps(result, indent=2), encoding="utf-8")
    logging.info("uploaded to %s", result.get("url", snakemake.params.repo_id))


run_rule(main, snakemake)
