"""Moved to kolors_story.tools.write_prompts, the command `kolors-story-write-prompts`.
Running or importing this module says so (kolors_story.host.moved)."""

from kolors_story.host.moved import moved

moved(__name__, "write_prompts")
