"""How jobs run on a host: the rule runner every script goes through (logging, errors, GPU slot,
peak memory: memory_peak),
GPU slots shared by the jobs of one host, the multi-process training launcher, the GPU check (and
its LoRA round trip) and the wheelhouse for an offline GPU host, the Snakemake planning fix, and
`reproduce` (a panel again from its record), slurm_fit (SLURM requests against sinfo, jobs PENDING
for ever) and write_prompts (scene prompts from the outline, by a language model) and
captions_cache (a run's captions put back into the cache, for reproducing it elsewhere).

May import every package.
"""
