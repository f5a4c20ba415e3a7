# LoRA training on the Kolors UNet (GPU).


rule train_lora:
    input:
        dataset=f"{OUT}/dataset",
        model=model_path("kolors"),
        model_check=f"{OUT}/models/kolors.json",
    output:
        lora=f"{OUT}/lora/pytorch_lora_weights.safetensors",
        loss_csv=f"{OUT}/lora/loss.csv",
        loss_png=report(f"{OUT}/lora/loss.png", caption="../report/loss.rst", category="Training"),
    params:
        train=config["train"],
    resources:
        gpu=1,
    log:
        f"{LOGS}/train_lora.log",
    conda:
        ENV
    script:
        "../scripts/train_lora.py"
