# The run's LoRA: trained on the Kolors UNet (GPU), or imported from a file (train.use_lora).
# Checkpoints and caches live outside the declared outputs, so an interrupted training job,
# rerun, continues from its last checkpoint.

if config["train"]["use_lora"]:

    rule import_lora:
        input:
            lora=config["train"]["use_lora"],
            model=model_path("kolors"),
            model_check=f"{OUT}/models/kolors.json",
        output:
            lora=f"{OUT}/lora/pytorch_lora_weights.safetensors",
            diffsynth=f"{OUT}/lora/diffsynth_lora.ckpt",
        params:
            diffsynth_alpha=config["train"]["diffsynth_alpha"],  # a DiffSynth .ckpt stores no alpha
        log:
            f"{LOGS}/import_lora.log",
        conda:
            ENV
        script:
            "../scripts/import_lora.py"

else:

    rule train_lora:
        input:
            unpack(train_inputs),
        output:
            lora=f"{OUT}/lora/pytorch_lora_weights.safetensors",
            diffsynth=f"{OUT}/lora/diffsynth_lora.ckpt",
            loss_csv=f"{OUT}/lora/loss.csv",
            loss_png=report(f"{OUT}/lora/loss.png", caption="../report/loss.rst", category="Training"),
            validation_csv=f"{OUT}/lora/validation.csv",
            validation_png=report(
                f"{OUT}/lora/validation.png", caption="../report/validation.rst", category="Training"
            ),
            summary=f"{OUT}/lora/training_summary.json",
        params:
            # diffsynth_alpha only matters with init_lora: leave other runs' params (reruns) alone
            train={k: v for k, v in config["train"].items() if k not in ("use_lora", "processes")
                   and (k != "diffsynth_alpha" or config["train"]["init_lora"])},
            processes=config["train"]["processes"],
            cache_dir=CACHE,
            work_dir=f"{OUT}/lora/work",
        threads: ALL_CORES
        resources:
            gpu=config["train"]["processes"],
        log:
            f"{LOGS}/train_lora.log",
        benchmark:
            f"{OUT}/benchmarks/train_lora.tsv"
        conda:
            ENV
        script:
            "../scripts/train_lora.py"
