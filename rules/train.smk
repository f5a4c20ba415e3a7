# The LoRA: trained on the Kolors UNet (GPU), or imported from a file (train.use_lora: diffusers,
# DiffSynth or kohya/ComfyUI), written in all three formats; keyed by
# the filter job, the model and the training settings, so variants that differ only in how they
# generate share one training. Its caption and validation-prompt embeddings come from rule
# encode_texts' file (ancient(): an edited scene prompt re-encodes, but retrains nothing).
# Checkpoints live in the job's work/ folder, outside the declared outputs, so an interrupted
# training job, rerun, continues from its last checkpoint.


rule import_lora:
    input:
        unpack(import_inputs),
    output:
        **{name: f"{lora_dir('{key}', imported=True)}/{file}" for name, file in LORA_FORMAT_FILES.items()},
    params:
        diffsynth_alpha=lambda wc: import_job(wc)["diffsynth_alpha"],  # a DiffSynth .ckpt stores no alpha
        content=lambda wc: content_param(import_job(wc)["use_lora"]),  # the file replaced: imported again
    log:
        f"{SHARED}/logs/import_lora/{{key}}.log",
    benchmark:
        f"{SHARED}/benchmarks/import_lora/{{key}}.tsv"
    conda:
        ENV
    script:
        "../scripts/import_lora.py"


# Host memory a training job asks a scheduler for (SLURM's --mem; local runs ignore it): each
# process holds torch and CUDA's host side, the cached latents and one batch (its UNet and VAE load
# straight onto its GPU, the embeddings file is memory-mapped and shared); rank 0 also loads the
# aesthetic scorer and writes the checkpoints. profiles/slurm may set a fixed mem_mb instead; a
# training on the CPU holds the UNet itself in host memory and needs more (docs/gpu-host.md).
TRAIN_MEM_MB = {"base": 16000, "per_process": 8000}


rule train_lora:
    input:
        unpack(train_inputs),
    output:
        **{name: f"{lora_dir('{key}', imported=False)}/{file}" for name, file in LORA_FILES.items()},
    params:
        train=lambda wc: training_job(wc)["train"],
        processes=lambda wc: training_job(wc)["processes"],
        init_lora=init_lora_content,  # the init_lora file replaced under its name: trained again
        cache_dir=CACHE,
        work_dir=f"{lora_dir('{key}', imported=False)}/work",
    threads: ALL_CORES
    resources:
        gpu=lambda wc: training_job(wc)["processes"],
        mem_mb=lambda wc: TRAIN_MEM_MB["base"] + TRAIN_MEM_MB["per_process"] * training_job(wc)["processes"],
    log:
        f"{SHARED}/logs/train_lora/{{key}}.log",
    benchmark:
        gpu_benchmark("train_lora", "{key}")
    conda:
        ENV
    script:
        "../scripts/train_lora.py"


rule copy_lora:
    """The variant's LoRA in every format (diffusers, DiffSynth, ComfyUI), copied from its training
    (or import) job."""
    input:
        **{name: variant_lora_source(name) for name in LORA_FORMAT_FILES},
    output:
        **{name: run_lora_file("{run}", name) for name in LORA_FORMAT_FILES},
    log:
        f"{RUN_DIR}/logs/copy_lora.log",
    conda:
        ENV
    script:
        "../scripts/copy_outputs.py"


rule copy_training_curves:
    """The training curves and summary of a trained variant's LoRA."""
    input:
        **{name: variant_lora_source(name) for name in TRAINING_CURVE_FILES},
    output:
        loss_csv=run_lora_file("{run}", "loss_csv"),
        loss_png=report(run_lora_file("{run}", "loss_png"), caption="../report/loss.rst",
                        category="{run}", subcategory="Training"),
        validation_csv=run_lora_file("{run}", "validation_csv"),
        validation_png=report(run_lora_file("{run}", "validation_png"), caption="../report/validation.rst",
                              category="{run}", subcategory="Training"),
        summary=run_lora_file("{run}", "summary"),
    log:
        f"{RUN_DIR}/logs/copy_training_curves.log",
    conda:
        ENV
    script:
        "../scripts/copy_outputs.py"
