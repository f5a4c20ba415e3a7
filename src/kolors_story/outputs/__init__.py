"""What a run hands over: the story page and contact sheet (story_page), report figures, the
sweep's leaderboard, the ModelScope bundle (publishing), its upload
(hub_upload) and the run's manifest.

Imports render (panel records), models and data; never plan, training or host.
"""
