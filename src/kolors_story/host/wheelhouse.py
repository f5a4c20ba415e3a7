"""Moved to kolors_story.tools.wheelhouse, the command `kolors-story-wheelhouse`.
Running or importing this module says so (kolors_story.host.moved)."""

from kolors_story.host.moved import moved

moved(__name__, "wheelhouse")
