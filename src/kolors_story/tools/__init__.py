"""The command-line tools a user runs outside the workflow, each a `kolors-story-*` command
(pyproject.toml's [project.scripts]) and `python -m kolors_story.tools.<module>`: gpu_check (the
real GPU path at full size on one GPU, with its LoRA round trip: lora_round_trip) and wheelhouse
(its packages for an offline GPU host), reproduce (a published panel again from its bundle),
write_prompts (scene prompts from the outline, by a language model) and captions_cache (a run's
captions put back into the cache, for reproducing it elsewhere).

The top of the layering: may import every package; nothing of the library imports it.
"""
