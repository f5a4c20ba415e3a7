from pathlib import Path

from kolors_story.models.kolors_configs import unet_skeleton
from kolors_story.models.lora.any_format import convert_lora, read_lora
from kolors_story.host.rule_runner import run_rule
from kolors_story.training import TrainJob, TrainSettings, write_loss_log, write_validation_log
from kolors_story.host.training_launch import train
from kolors_story.training.report import write_summary


def main(snakemake):
    out, inp, params = snakemake.output, snakemake.input, snakemake.params
    job = TrainJob(Path(inp.model), Path(inp.dataset), Path(out.lora).parent, cache_dir=Path(params.cache_dir),
                   work_dir=Path(params.work_dir), embeddings=Path(inp.embeddings),
                   aesthetic_dir=Path(inp.aesthetic) if "aesthetic" in inp.keys() else None)
    settings = TrainSettings.from_dict(params.train)
    if settings.init_lora:  # a file whose keys fit no UNet layer: refused before any model loads
        read_lora(Path(settings.init_lora), unet_skeleton(Path(inp.model)), diffsynth_alpha=settings.diffsynth_alpha)
    result = train(job, settings, processes=params.processes, threads=snakemake.threads)
    write_loss_log(result.losses, Path(out.loss_csv), Path(out.loss_png))
    write_validation_log(result.validations, result.picked_step, Path(out.validation_csv), Path(out.validation_png))
    write_summary(result, Path(out.summary))
    convert_lora(result.lora_file, Path(inp.model), diffsynth_file=Path(out.diffsynth), comfyui_file=Path(out.comfyui))


run_rule(main, snakemake)
