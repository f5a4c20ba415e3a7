"""Moved to kolors_story.tools.captions_cache, the command `kolors-story-captions-cache`.
Running or importing this module says so (kolors_story.host.moved)."""

from kolors_story.host.moved import moved

moved(__name__, "captions_cache")
