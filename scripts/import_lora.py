import logging
from pathlib import Path

from kolors_story.models.lora.any_format import convert_lora
from kolors_story.host.rule_runner import run_rule


def main(snakemake):
    out = snakemake.output
    weights = convert_lora(Path(snakemake.input.lora), Path(snakemake.input.model),
                           diffusers_dir=Path(out.lora).parent, diffsynth_file=Path(out.diffsynth),
                           diffsynth_alpha=snakemake.params.diffsynth_alpha, comfyui_file=Path(out.comfyui))
    logging.info("imported %s LoRA %s: rank %d, alpha %g (scale %g, folded into the files written)",
                 weights.source_format, snakemake.input.lora, weights.rank, weights.alpha, weights.scale)
    if weights.skipped:
        logging.warning("skipped %d text-encoder keys of %s (Kolors' ChatGLM takes no LoRA here)",
                        len(weights.skipped), snakemake.input.lora)


run_rule(main, snakemake)
