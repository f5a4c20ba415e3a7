"""Rendering on a Kolors pipeline: scene and anchor jobs (scenes), the samplers and their code for
the model card (samplers), character attention sharing (character_sharing), DiffSynth's DDIM
numerics (diffsynth_ddim), best-of-N choices (panel_choice) and the candidates.json record of each
panel (candidates_file).

Imports models and data (and the package root), never training, outputs, plan or host.
"""
