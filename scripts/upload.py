import json
import logging
from pathlib import Path

from kolors_story.outputs.hub_upload import upload_bundle
from kolors_story.host.rule_runner import run_rule


def main(snakemake):
    out = Path(snakemake.output[0])
    # the client's resume record, beside upload.json: never inside the sealed bundle
    result = upload_bundle(Path(snakemake.input[0]), snakemake.params.repo_id, snakemake.params.visibility,
                           cache_file=out.with_name(".upload_cache.json"))
    out.write_text(json.dumps(result, indent=2), encoding="utf-8")
    logging.info("uploaded to %s", result.get("url", snakemake.params.repo_id))


run_rule(main, snakemake)
