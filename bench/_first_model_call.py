"""Run a Snakemake script wrapper (kept with --skip-script-cleanup) as the job ran it, noting when
its first model load starts. Prints one JSON line: the wall clock (time.time()) of the first model
call, of the end, and the heavy packages already imported at the first call.

    python bench/_first_model_call.py .snakemake/scripts/tmpXXXX.generate_scene.py
"""

from __future__ import annotations

import json
import runpy
import sys
import time

HEAVY = ("kolors_story.training", "aesthetics_predictor", "sklearn", "data_juicer", "snakemake", "jsonschema",
         "modelscope", "matplotlib", "diffusers", "transformers")
FIRST: dict = {}


def _watch(cls, name: str) -> None:
    original = getattr(cls, name)

    def first_call(*args, **kwargs):
        if not FIRST:
            FIRST["t"] = time.time()
            FIRST["call"] = f"{cls.__name__}.{name}"
            FIRST["heavy"] = sorted(m for m in HEAVY if m in sys.modules)
        return original(*args, **kwargs)

    setattr(cls, name, first_call)


def main() -> None:
    wrapper = sys.argv[1]
    # The import the scripts pay anyway (torch): patched before the script runs, counted as fixed.
    from kolors_story.models.kolors_folder import KolorsFolder

    for name in ("load_tokenizer", "load_text_encoder", "load_unet", "load_vae", "load_pipeline"):
        _watch(KolorsFolder, name)
    code = 0
    try:
        runpy.run_path(wrapper, run_name="__main__")
    except SystemExit as done:
        code = done.code or 0
    print("FIRST_MODEL_CALL " + json.dumps({**FIRST, "end": time.time(), "exit": code}), flush=True)


if __name__ == "__main__":
    main()
