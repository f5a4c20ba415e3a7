# Style dataset: download or collect, clean with Data-Juicer, lay out for training. Keyed by the
# dataset settings (download) and the filter settings (filter, metadata): variants that differ in
# neither share the chain.


rule build_demo_dataset:
    output:
        directory("resources/demo/dataset"),
    params:
        seed=0,
    log:
        "resources/logs/build_demo_dataset.log",
    conda:
        ENV
    script:
        "../scripts/build_demo_dataset.py"


rule download_dataset:
    input:
        dataset_input,
    output:
        rows=f"{SHARED}/download/{{key}}/rows.jsonl",
        images=directory(f"{SHARED}/download/{{key}}/images"),
        stats=f"{SHARED}/download/{{key}}/download_stats.json",
    params:
        dataset=download_settings,
    log:
        f"{SHARED}/logs/download_dataset/{{key}}.log",
    retries: NETWORK_RETRIES if any(c["dataset"]["source"] == "modelscope" for c in VARIANTS.values()) else 0
    conda:
        ENV
    script:
        "../scripts/download_dataset.py"


rule filter_dataset:
    input:
        rows=filter_input("rows.jsonl"),
        images=filter_input("images"),
        download_stats=filter_input("download_stats.json"),
    output:
        rows=f"{SHARED}/data/{{key}}/filtered.jsonl",
        stats=f"{SHARED}/data/{{key}}/filter_stats.json",
        dropped=f"{SHARED}/data/{{key}}/dropped.png",
    params:
        ops=lambda wc: PLAN.filters[wc.key]["ops"],
        num_proc=lambda wc: PLAN.filters[wc.key]["num_proc"],
        work_dir=f"{SHARED}/data/{{key}}/data_juicer",
    log:
        f"{SHARED}/logs/filter_dataset/{{key}}.log",
    conda:
        ENV
    script:
        "../scripts/filter_dataset.py"


rule build_metadata:
    input:
        rows=f"{SHARED}/data/{{key}}/filtered.jsonl",
    output:
        directory(f"{SHARED}/data/{{key}}/dataset"),
    params:
        truncate=lambda wc: PLAN.downloads[PLAN.filters[wc.key]["download"]]["dataset"].get("truncate_long_captions", False),
    log:
        f"{SHARED}/logs/build_metadata/{{key}}.log",
    conda:
        ENV
    script:
        "../scripts/build_metadata.py"


rule variant_data:
    """The variant's filter statistics and dropped images, for its report and manifest."""
    input:
        stats=lambda wc: f"{SHARED}/data/{variant_jobs(wc).filter}/filter_stats.json",
        dropped=lambda wc: f"{SHARED}/data/{variant_jobs(wc).filter}/dropped.png",
    output:
        stats=report(f"{RUN_DIR}/data/filter_stats.json", caption="../report/filter.rst",
                     category="{run}", subcategory="Data"),
        dropped=report(f"{RUN_DIR}/data/dropped.png", caption="../report/dropped.rst",
                       category="{run}", subcategory="Data"),
    log:
        f"{RUN_DIR}/logs/variant_data.log",
    conda:
        ENV
    script:
        "../scripts/variant_data.py"
