"""tests/slurm/ needs root and a running SLURM: only `make test-slurm` (which starts one and sets
KOLORS_SLURM_TEST=1) collects it; plain `python -m pytest` (`make test`) skips the folder."""

import os

collect_ignore_glob = [] if os.environ.get("KOLORS_SLURM_TEST") == "1" else ["test_*.py"]
