"""Moved to kolors_story.tools.gpu_check, the command `kolors-story-gpu-check`.
Running or importing this module says so (kolors_story.host.moved)."""

from kolors_story.host.moved import moved

moved(__name__, "gpu_check")
