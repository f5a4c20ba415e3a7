"""Run training outside Snakemake (debugging, a second process in tests, each process of a
multi-GPU run):

    python -m kolors_story.training --model resources/tiny/kolors --dataset results/demo/dataset \
        --out /tmp/lora --settings '{"steps": 20, "resolution": 64, "precision": "fp32"}'
    accelerate launch --multi_gpu --num_processes 2 -m kolors_story.training --model ... (same flags)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from kolors_story.errors import UserError
from kolors_story.training import TrainJob, TrainSettings, train_lora
from kolors_story.training.processes import exit_with_parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kolors_story.training", description=__doc__)
    TrainJob.add_cli_args(parser)  # --model, --dataset, --out, --cache-dir, ... (TrainJob's fields)
    parser.add_argument("--settings", default="{}", help="JSON of train settings (config key train)")
    parser.add_argument("--result", type=Path, help="write the run's result (history, picked step) as JSON")
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if launched:
        exit_with_parent()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(levelname)s rank {rank} %(name)s: %(message)s" if launched
                        else "%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = TrainSettings.from_dict(json.loads(args.settings))
        result = train_lora(TrainJob.from_cli(args), settings)
    except UserError as err:
        logging.error("%s", err)
        return 1
    if rank == 0:
        if args.result:
            args.result.write_text(result.to_json(), encoding="utf-8")
        print(result.lora_file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
