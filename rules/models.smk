# Model preparation: download ModelScope ids, build the demo's tiny models, check layouts.


rule download_model:
    output:
        directory("resources/modelscope/{owner}/{name}"),
    params:
        model_id=lambda wc: f"{wc.owner}/{wc.name}",
        config_key=key_for_model_id,
        needed=STILL_NEEDED,  # every hub download of the run: offline, one failure names them all
    wildcard_constraints:
        owner="[^/]+",
        name="[^/]+",
    log:
        "resources/logs/download_model/{owner}/{name}.log",
    conda:
        ENV
    script:
        "../scripts/download_model.py"


rule build_tiny_models:
    output:
        kolors=directory("resources/tiny/kolors"),
        aesthetic=directory("resources/tiny/aesthetic"),
    params:
        seed=0,
    log:
        "resources/logs/build_tiny_models.log",
    conda:
        ENV
    script:
        "../scripts/build_tiny_models.py"


rule build_tiny_writer:
    """The demo's prompt-writer model: a tiny random Qwen2 with the real Qwen tokenizer."""
    output:
        directory("resources/tiny/qwen"),
    params:
        seed=0,
    log:
        "resources/logs/build_tiny_writer.log",
    conda:
        ENV
    script:
        "../scripts/build_tiny_writer.py"


rule build_tiny_captioner:
    """The demo's captioning model: a tiny random BLIP in Salesforce/blip-image-captioning-base's layout."""
    output:
        directory("resources/tiny/blip"),
    params:
        seed=0,
    log:
        "resources/logs/build_tiny_captioner.log",
    conda:
        ENV
    script:
        "../scripts/build_tiny_captioner.py"


rule prepare_model:
    input:
        lambda wc: model_folder(MODEL_REFS[(wc.model_name, wc.key)], f"models.{wc.model_name}"),
    output:
        model_check_file("{model_name}", "{key}"),
    params:
        ref=lambda wc: MODEL_REFS[(wc.model_name, wc.key)],
        config_key=lambda wc: f"models.{wc.model_name}",
        content=lambda wc: model_content(MODEL_REFS[(wc.model_name, wc.key)]),  # weights replaced: its users rerun
    log:
        f"{SHARED}/logs/prepare_model/{{model_name}}/{{key}}.log",
    benchmark:
        f"{SHARED}/benchmarks/prepare_model/{{model_name}}/{{key}}.tsv"
    conda:
        ENV
    script:
        "../scripts/prepare_model.py"
