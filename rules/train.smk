# LoRA training on the Kolors UNet (GPU). Checkpoints and caches live outside the declared
# outputs, so an interrupted job, rerun, continues from its last checkpoint.


rule train_lora:
    input:
        unpack(train_inputs),
    output:
        lora=f"{OUT}/lora/pytorch_lora_weights.safetensors",
        loss_csv=f"{OUT}/lora/loss.csv",
        loss_png=report(f"{OUT}/lora/loss.png", caption="../report/loss.rst", category="Training"),
        validation_csv=f"{OUT}/lora/validation.csv",
        validation_png=report(f"{OUT}/lora/validation.png", caption="../report/validation.rst", category="Training"),
        summary=f"{OUT}/lora/training_summary.json",
    params:
        train=config["train"],
        cache_dir="resources/cache",
        work_dir=f"{OUT}/lora/work",
    threads: workflow.cores
    resources:
        gpu=1,
    log:
        f"{LOGS}/train_lora.log",
    conda:
        ENV
    script:
        "../scripts/train_lora.py"
