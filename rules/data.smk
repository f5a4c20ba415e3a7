# Style dataset: download or collect, clean with Data-Juicer, lay out for training.


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
        rows=f"{OUT}/data/rows.jsonl",
        images=directory(f"{OUT}/data/images"),
        stats=f"{OUT}/data/download_stats.json",
    params:
        dataset=config["dataset"],
    log:
        f"{LOGS}/download_dataset.log",
    retries: NETWORK_RETRIES if config["dataset"]["source"] == "modelscope" else 0
    conda:
        ENV
    script:
        "../scripts/download_dataset.py"


rule filter_dataset:
    input:
        rows=f"{OUT}/data/rows.jsonl",
        images=f"{OUT}/data/images",
        download_stats=f"{OUT}/data/download_stats.json",
    output:
        rows=f"{OUT}/data/filtered.jsonl",
        stats=report(f"{OUT}/data/filter_stats.json", caption="../report/filter.rst", category="Data"),
    params:
        ops=config["filter"]["ops"],
        num_proc=config["filter"]["num_proc"],
        work_dir=f"{OUT}/data/data_juicer",
    log:
        f"{LOGS}/filter_dataset.log",
    conda:
        ENV
    script:
        "../scripts/filter_dataset.py"


rule build_metadata:
    input:
        rows=f"{OUT}/data/filtered.jsonl",
    output:
        directory(f"{OUT}/dataset"),
    log:
        f"{LOGS}/build_metadata.log",
    conda:
        ENV
    script:
        "../scripts/build_metadata.py"
