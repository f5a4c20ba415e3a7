"""What a run hands over: the story page and contact sheet (story_page), report figures, the
sweep's leaderboard, the ModelScope bundle and upload (publishing) and the run's manifest.

Imports render (panel records), models and data; never plan, training or host.
"""
