# Kolors style LoRA story workflow. See README.md; every setting is described in
# schemas/config.schema.yaml. Run: snakemake --cores 1 --resources gpu=1
from snakemake.utils import min_version

min_version("9.0")

# Snakemake 9 does not plan a job behind an ancient() input when that input's job reruns in the
# same call (the encode job: rules/encode.smk); this fixes its planning (the module says how).
from kolors_story.host import snakemake_ancient

snakemake_ancient.apply()


# config.yaml and every --configfile read strictly first: a YAML error names its file, line and
# column, and a key given twice is refused (Snakemake's loader keeps the last one silently).
from kolors_story.errors import UserError
from kolors_story.plan.config_files import check_files

try:
    check_files(["config.yaml", *workflow.overwrite_configfiles])
except UserError as err:
    raise WorkflowError(str(err)) from None


configfile: "config.yaml"


report: "report/workflow.rst"


include: "rules/paths.smk"
include: "rules/common.smk"
include: "rules/inputs.smk"
include: "rules/models.smk"
include: "rules/data.smk"
include: "rules/prompts.smk"
include: "rules/encode.smk"
include: "rules/train.smk"
include: "rules/generate.smk"
include: "rules/report.smk"


# Light jobs that run on the submitting host under a cluster executor (profiles/slurm): tiling,
# bundling, manifests, the leaderboard, the copies into results/<variant>/, and the upload.
localrules:
    compose_story,
    bundle,
    manifest,
    upload,
    compare_runs,
    copy_data_stats,
    copy_captions,
    copy_lora,
    copy_training_curves,
    copy_scene,
    copy_prompts,


# Under the slurm executor (profiles/slurm): before anything is submitted, every job's request is
# checked against the nodes sinfo lists (a rule no node can run is refused, with the flags that fit);
# while the run goes on, a job PENDING for a reason no waiting clears is cancelled and named.
onstart:
    if getattr(workflow.executor_plugin, "cli_prefix", None) == "slurm":
        from snakemake.logging import logger
        from kolors_story.host import slurm_fit

        try:
            slurm_fit.check_workflow_jobs(workflow.dag.needrun_jobs())
        except UserError as err:
            raise WorkflowError(str(err)) from None
        slurm_fit.PendingWatch(os.getcwd(), report=logger.error).start()


rule all:
    input:
        final_outputs,
    default_target: True
