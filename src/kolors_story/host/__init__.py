"""How jobs run on a host: the rule runner every script goes through (logging, errors, GPU slot,
peak memory: memory_peak), GPU slots shared by the jobs of one host, the multi-process training
launcher (training_launch), SLURM requests checked against sinfo (slurm_fit, jobs PENDING for
ever) and the Snakemake planning fix (snakemake_ancient).

The command-line tools users run live in kolors_story.tools; the modules here named after the
tools that were here once (gpu_check, reproduce, ...) only say where each went (moved).

May import every package but tools.
"""
