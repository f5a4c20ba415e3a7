"""What a run is: the config (schema-validated, refused at parse time), the story's prompts, the
sweep's variants and the job plan that keys every job by exactly the settings it depends on.

The Snakefile's side of the library: it may import every package below (data, models, render,
training, outputs, writing) to check what a setting names before any job runs.
"""
