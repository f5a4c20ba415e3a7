from pathlib import Path

from kolors_story.models import devices
from kolors_story.models.kolors_folder import KolorsFolder
from kolors_story.models.prompt_embeddings import encoder_dtype, write_embeddings
from kolors_story.host.rule_runner import run_rule
from kolors_story.training.data import check_step_fits, read_metadata


def main(snakemake):
    inp, params = snakemake.input, snakemake.params
    for folder, step in params.steps:  # a dataset too small for its training: refused before ChatGLM loads
        check_step_fits(Path(folder), step)
    captions = [example.caption for folder in inp.datasets for example in read_metadata(Path(folder))]
    device = devices.pick_device()
    write_embeddings(KolorsFolder(Path(inp.model)), [*params.texts, *captions], Path(snakemake.output[0]),
                     encoder_dtype(params.precision, device), device, Path(params.cache_dir))


run_rule(main, snakemake)
