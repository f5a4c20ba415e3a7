"""Kolors style LoRA story workflow: the library behind the Snakemake rules."""

__version__ = "0.1.0"
