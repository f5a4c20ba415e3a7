# The text encoder, once per Kolors model and precision: every caption, validation prompt, scene and
# anchor prompt and negative prompt of every variant, into one embeddings file. Training, anchor and
# scene jobs read it and never load ChatGLM. They take it as ancient(): a rerun of this job (one
# prompt edited) does not rerun them by itself; each reruns when its own prompt (its params) changed.


rule encode_texts:
    input:
        unpack(encode_inputs),
    output:
        f"{SHARED}/embeddings/{{key}}/{EMBEDDINGS_FILE}",
    params:
        texts=lambda wc: PLAN.encodings[wc.key]["texts"],  # + the captions of the datasets (inputs)
        precision=lambda wc: PLAN.encodings[wc.key]["precision"],
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
