"""Start training in this process, or in N processes under `accelerate launch` (one per GPU)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from kolors_story.errors import UserError
from kolors_story.training.data import check_dataset_size, read_metadata
from kolors_story.training.loop import TrainResult, train_lora
from kolors_story.training.processes import exit_with_parent
from kolors_story.training.settings import TrainJob, TrainSettings

log = logging.getLogger(__name__)
PROGRESS_BAR = re.compile(r"\d+%\|.*\| \d+/")  # a tqdm bar: " 25%|##   | 1/4"


def free_port() -> int:
    """A free TCP port for the rendezvous, so two trainings on one host do not collide."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Our own accelerate config: without --config_file, accelerate fills options we leave unset (GPU
# ids, rendezvous address...) from the user's ~/.cache/huggingface/accelerate/default_config.yaml.
ACCELERATE_CONFIG = """compute_environment: LOCAL_MACHINE
distributed_type: MULTI_GPU
num_machines: 1
num_processes: {processes}
mixed_precision: 'no'
use_cpu: false
"""


def accelerate_command(processes: int, threads_per_process: int, cli_args: list[str], config_dir: Path) -> list[str]:
    """`accelerate launch` of `python -m kolors_story.training` with every choice made explicit.
    Writes the config file it names into `config_dir`. Mixed precision stays ours (autocast)."""
    config = Path(config_dir) / "accelerate.yaml"
    config.write_text(ACCELERATE_CONFIG.format(processes=processes), encoding="utf-8")
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--multi_gpu",
            "--num_machines", "1", "--num_processes", str(processes),
            "--num_cpu_threads_per_process", str(threads_per_process), "--mixed_precision", "no",
            "--dynamo_backend", "no", "--main_process_port", str(free_port()), "-m", "kolors_story.training", *cli_args]


def visible_gpus() -> int:
    """The GPUs this job was given: all of them, also after rule_runner narrowed a gpu=1 job (a
    training whose gpu=N Snakemake capped at --resources gpu=1) to the one it holds."""
    from kolors_story.host.gpu_slots import job_gpus

    if gpus := job_gpus():
        return len(gpus)
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_process_count(processes: int, gpus: int) -> None:
    """One process per GPU; without any GPU, processes share the CPU (gloo), as in the tests."""
    if gpus and processes > gpus:
        raise UserError(
            f"train.processes is {processes} but this host shows {gpus} GPU(s) (CUDA_VISIBLE_DEVICES); "
            f"set train.processes to at most {gpus}."
        )


def train(job: TrainJob, settings: TrainSettings, processes: int = 1, threads: int | None = None) -> TrainResult:
    """train_lora here (processes=1) or under `accelerate launch` with `processes` processes; each
    line the processes print goes to this process's log (the rule's log)."""
    csv_path = job.dataset_dir / "train" / "metadata.csv"
    if csv_path.is_file():  # refused here, before any process starts or model loads (train_lora checks too)
        check_dataset_size(read_metadata(job.dataset_dir), settings, max(1, processes), csv_path)
    if processes <= 1:
        return train_lora(job, settings)
    check_process_count(processes, visible_gpus())
    with tempfile.TemporaryDirectory(prefix="kolors-train-") as tmp:
        result_json = Path(tmp) / "result.json"
        args = [*job.cli_args(), "--settings", json.dumps(settings.to_dict()), "--result", str(result_json)]
        per_process = max(1, (threads or os.cpu_count() or 1) // processes)
        command = accelerate_command(processes, per_process, args, Path(tmp))
        log.info("launching %d training processes: %s", processes, " ".join(command))
        with ranks_env(processes) as env:  # the GPUs stay held until the ranks are gone
            returncode = run_logged(command, env)
        if returncode != 0 or not result_json.is_file():
            raise UserError(
                f"train_lora: the {processes} training processes failed (exit {returncode}); their "
                "output is above in this log. Set train.processes: 1 to train in one process."
            )
        return TrainResult.from_json(result_json.read_text(encoding="utf-8"))


@contextlib.contextmanager
def ranks_env(processes: int) -> Iterator[dict[str, str]]:
    """The ranks' environment: CUDA_VISIBLE_DEVICES names `processes` GPUs that no other job of
    this host holds, held while the block runs (rule_runner claims one GPU only, gpu=1 jobs)."""
    from kolors_story.host.gpu_slots import hold_free_gpus

    with hold_free_gpus(processes) as devices:
        yield {**os.environ, "CUDA_VISIBLE_DEVICES": devices} if devices is not None else dict(os.environ)


def run_logged(command: list[str], env: dict[str, str] | None = None) -> int:
    """Run a command, passing each line it prints to this process's log (and so the rule's log)."""
    child_log = logging.getLogger("kolors_story.training")
    # SIGTERM when this process dies: the launcher then stops its ranks, no orphaned training.
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          errors="replace", bufsize=1, preexec_fn=lambda: exit_with_parent(signal.SIGTERM)) as proc:
        for line in proc.stdout:
            line = line.rstrip()
            if line and not PROGRESS_BAR.search(line):  # children log their progress as lines
                child_log.info("%s", line)
    return proc.returncode
