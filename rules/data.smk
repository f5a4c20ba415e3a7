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
        content=f"{SHARED}/download/{{key}}/{DATASET_CONTENT}",
    params:
        dataset=download_settings,
        content=dataset_content,  # a local folder's files: an edited, added or removed one reruns the chain
        content_cache=CONTENT_CACHE,
        needed=STILL_NEEDED,  # every hub download of the run: offline, one failure names them all
    log:
        f"{SHARED}/logs/download_dataset/{{key}}.log",
    benchmark:
        f"{SHARED}/benchmarks/download_dataset/{{key}}.tsv"
    # No Snakemake retries: offline, the job must fail once; the hub client retries its own requests
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
    benchmark:
        f"{SHARED}/benchmarks/filter_dataset/{{key}}.tsv"
    conda:
        ENV
    script:
        "../scripts/filter_dataset.py"


rule caption_images:
    """One caption per kept image (caption.backend data_juicer or openai; none: no such job, and
    build_metadata reads the filter's rows). Keyed by the filter job and the caption settings
    (kolors_story.plan.job_plan.caption_settings); each image's caption is cached under
    CACHE/captions by its bytes and what makes a caption, not the template: a template edit or a
    rerun captions nothing again, an added image captions that image only."""
    input:
        unpack(caption_inputs),
    output:
        rows=f"{SHARED}/captions/{{key}}/captioned.jsonl",
        record=f"{SHARED}/captions/{{key}}/{CAPTION_FILES['record']}",
        page=f"{SHARED}/captions/{{key}}/{CAPTION_FILES['page']}",
    params:
        caption=caption_params,  # the API key's variable name, never the key
        model_content=lambda wc: model_content(caption_job(wc)["caption"].get("model")) if caption_job(wc)["caption"]["backend"] == "data_juicer" else "",
        trigger=lambda wc: caption_job(wc)["trigger"],
        default_caption=lambda wc: caption_job(wc)["default_caption"],
        cache_dir=f"{CACHE}/captions",
    resources:
        gpu=lambda wc: 1 if caption_job(wc)["caption"]["backend"] == "data_juicer" else 0,  # its own job: freed before training
    log:
        f"{SHARED}/logs/caption_images/{{key}}.log",
    benchmark:
        f"{SHARED}/benchmarks/caption_images/{{key}}.tsv"
    conda:
        ENV
    script:
        "../scripts/caption_images.py"


rule build_metadata:
    input:
        rows=metadata_rows,
    output:
        directory(f"{SHARED}/data/{{key}}/dataset"),
    params:
        truncate=lambda wc: PLAN.downloads[PLAN.filters[metadata_filter(wc.key)]["download"]]["dataset"].get("truncate_long_captions", False),
    log:
        f"{SHARED}/logs/build_metadata/{{key}}.log",
    benchmark:
        f"{SHARED}/benchmarks/build_metadata/{{key}}.tsv"
    conda:
        ENV
    script:
        "../scripts/build_metadata.py"


rule copy_data_stats:
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
        f"{RUN_DIR}/logs/copy_data_stats.log",
    conda:
        ENV
    script:
        "../scripts/copy_data_stats.py"


rule copy_captions:
    """The variant's captions: each kept image beside its training text and where it came from."""
    input:
        record=lambda wc: f"{SHARED}/captions/{variant_jobs(wc).captions}/{CAPTION_FILES['record']}",
        page=lambda wc: f"{SHARED}/captions/{variant_jobs(wc).captions}/{CAPTION_FILES['page']}",
    output:
        record=f"{RUN_DIR}/data/{CAPTION_FILES['record']}",
        page=report(f"{RUN_DIR}/data/{CAPTION_FILES['page']}", caption="../report/captions.rst",
                    category="{run}", subcategory="Data"),
    log:
        f"{RUN_DIR}/logs/copy_captions.log",
    conda:
        ENV
    script:
        "../scripts/copy_outputs.py"
