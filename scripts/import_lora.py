import logging
from pathlib import Path

from kolors_story.models.lora_files import convert_lora
from kolors_story.host.rule_runner import run_rule


def main(snakemake):
    out = snakemake.output
    weights = convert_lora(Path(snakemake.input.lora), Path(snakemake.input.model),
                           diffusers_dir=Path(out.lora).parent, diffsynth_file=Path(out.diffsynth),
                           diffsynth_alpha=snakemake.params.diffsynth_alpha)
    logging.info("imported %s LoRA %s: rank %d, alpha %g (scale %g, folded into the files written)",
                 weights.source_format, snakemake.input.lora, weights.rank, weights.alpha, weights.scale)


run_rule(main, snakemake)
