# The text encoder, once per Kolors model and models.text_encoder_precision (one precision for
# training and generation, so both share the job): every caption (from the training folders'
# metadata.csv, its inputs), validation prompt, scene and anchor prompt and negative prompt of every
# variant, sorted and deduplicated (kolors_story.plan.job_plan), into one embeddings file in the
# encoder's own dtype; consumers cast at use. Encoding goes through the content-keyed cache under
# CACHE: after one prompt is edited this job reruns and encodes that one text (ChatGLM loaded once,
# and only when a text is missing). Training, anchor and scene jobs read the file and never load
# ChatGLM. They take it as ancient(): a rerun of this job does not rerun them by itself (Snakemake
# PR #668); each reruns when its own params (its prompt, its captions' dataset) changed. Snakemake 9
# left such jobs unplanned whenever this job reran in the same call; src/kolors_story/host/snakemake_ancient.py
# (applied by the Snakefile) fixes that.


rule encode_texts:
    input:
        unpack(encode_inputs),
    output:
        embeddings_file("{key}"),
    params:
        texts=lambda wc: encode_job(wc)["texts"],  # + the captions of the datasets (inputs)
        precision=lambda wc: encode_job(wc)["precision"],
        steps=encode_steps,  # batch_size x gradient_accumulation x processes per dataset
        cache_dir=CACHE,
    resources:
        gpu=1,
    log:
        f"{SHARED}/logs/encode_texts/{{key}}.log",
    benchmark:
        f"{SHARED}/benchmarks/encode_texts/{{key}}.tsv"
    conda:
        ENV
    script:
        "../scripts/encode_texts.py"

