"""A fix for how Snakemake 9 plans the jobs downstream of an ancient() input (the Snakefile applies it).

The workflow's one encode job per Kolors model feeds every training, anchor and scene job through
an ancient() input, so that re-encoding one edited prompt does not rerun the others. Snakemake's
`DAG.update_needrun` first walks the jobs in order and, once a job must run, "masks" every job
downstream of it: those are left to the second walk, which reaches them through the edges that
trigger a rerun. But that second walk never crosses an edge whose files are all ancient(), so a
masked job behind such an edge is never looked at: a new scene or a changed `lora_scale` in the
same edit as a changed text is not planned, and the import of `train.use_lora` is not planned at
all (the dry run lists the encode job alone; the next call plans the rest).

The fix makes the mask follow the same rule as the second walk: it does not cross an edge whose
files are all ancient(). A job that is not masked is simply looked at on its own (its output, params,
inputs, code), which is what Snakemake does for every job not downstream of a running one, so this
only ever adds the checks the mask skipped. It applies when the installed `update_needrun` still
masks as described (checked in its source); otherwise it warns and leaves Snakemake as it is.
tests/test_workflow.py shows the plans it gives.
"""

from __future__ import annotations

import inspect
import logging
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

MASK_LINE = "masked.update(self.bfs(self.depending, job))"  # in snakemake.dag.DAG.update_needrun
APPLIED = "_kolors_story_ancient_fix"

log = logging.getLogger(__name__)


def _all_ancient(files: Any) -> bool:
    return bool(files) and all(getattr(f, "is_ancient", False) for f in files)


def _bfs_not_through_ancient(dag: Any, jobs: tuple, stop: Callable[[Any], bool]) -> Iterator[Any]:
    """DAG.bfs over dag.depending that does not cross an edge whose files are all ancient()."""
    queue, visited = deque(jobs), set(jobs)
    while queue:
        job = queue.popleft()
        if stop(job):
            continue
        yield job
        for job_, files in dag.depending[job].items():
            if job_ not in visited and not _all_ancient(files):
                visited.add(job_)
                queue.append(job_)


def apply() -> bool:
    """Patch snakemake.dag.DAG once; True when the fix is in place."""
    import snakemake.api  # noqa: F401  (snakemake.dag alone is a circular import outside a run)
    from snakemake.dag import DAG

    if getattr(DAG, APPLIED, False):
        return True
    if MASK_LINE not in inspect.getsource(DAG.update_needrun):
        log.warning("kolors_story: this Snakemake's DAG.update_needrun no longer masks as 9.27 did; the ancient() "
                    "planning fix is not applied (src/kolors_story/host/snakemake_ancient.py). Check that a dry run "
                    "after a prompt edit plans that scene's job.")
        return False
    original_update, original_bfs = DAG.update_needrun, DAG.bfs

    async def update_needrun(self, *args, **kwargs):
        self._kolors_story_masking = True  # the only DAG.bfs over self.depending in there is the mask
        try:
            return await original_update(self, *args, **kwargs)
        finally:
            self._kolors_story_masking = False

    def bfs(self, direction, *jobs, stop=lambda job: False):
        if getattr(self, "_kolors_story_masking", False) and direction is self.depending:
            return _bfs_not_through_ancient(self, jobs, stop)
        return original_bfs(self, direction, *jobs, stop=stop)

    DAG.update_needrun, DAG.bfs = update_needrun, bfs
    setattr(DAG, APPLIED, True)
    return True
