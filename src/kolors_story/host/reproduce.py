"""Moved to kolors_story.tools.reproduce, the command `kolors-story-reproduce`.
Running or importing this module says so (kolors_story.host.moved)."""

from kolors_story.host.moved import moved

moved(__name__, "reproduce")
