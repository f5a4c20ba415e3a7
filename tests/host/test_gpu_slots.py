"""GPU slots on fake GPUs: NVML's list of GPUs is replaced (gpu_slots.nvml_gpus), everything else is
real: lock files, processes that contend for them, CUDA_VISIBLE_DEVICES as each job sets it, the
launcher's ranks, the rule runner and the default profile; and two users' jobs on one host."""

from __future__ import annotations

import json
import logging
import os
import select
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from kolors_story.host import gpu_slots
from kolors_story.host.gpu_slots import claim_slot, claim_slots

REPO = Path(__file__).resolve().parents[2]
UUIDS = [f"GPU-{c}0000000-0000-0000-0000-000000000000" for c in "abcdefgh"]  # NVML's 8 GPUs, PCI order

# One GPU job of a host: claims a GPU as rule_runner does, says which, holds it until stdin closes.
JOB = """
import json, os, sys
from kolors_story.host import gpu_slots
gpu_slots.nvml_gpus = lambda: json.loads(os.environ["FAKE_NVML_GPUS"])
gpu = gpu_slots.use_free_gpu()
print(os.environ.get("CUDA_VISIBLE_DEVICES"), gpu and gpu.uuid, flush=True)
sys.stdin.read()
"""


class Job:
    """A GPU job in its own process, on fake GPUs, with the host's locks in `lock_dir`."""

    def __init__(self, gpus: list[str], lock_dir: Path, visible: str | None = None,
                 python: str = sys.executable, code: str = JOB, args: tuple[str, ...] = (),
                 env: dict[str, str] | None = None, **popen) -> None:
        env = {**{k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}, **(env or {})}
        env.update(FAKE_NVML_GPUS=json.dumps(gpus), KOLORS_STORY_GPU_LOCKS=str(lock_dir))
        if visible is not None:
            env["CUDA_VISIBLE_DEVICES"] = visible
        self.proc = subprocess.Popen([python, "-c", code, *args], env=env, text=True, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)

    def gpu(self, timeout: float = 15.0) -> tuple[str, str] | None:
        """(CUDA_VISIBLE_DEVICES, UUID) once the job holds a GPU; None if it still waits after `timeout`."""
        if not select.select([self.proc.stdout], [], [], timeout)[0]:
            return None
        line = self.proc.stdout.readline().split()
        assert len(line) == 2, f"the job failed: {self.proc.stderr.read()}"
        return line[0], line[1]

    def end(self) -> None:
        """The job ends: its lock goes with its process."""
        self.proc.stdin.close()
        self.proc.wait(timeout=15)
        self.proc.stdout.close()
        self.proc.stderr.close()


@pytest.fixture
def jobs():
    started: list[Job] = []
    yield started
    for job in started:
        if job.proc.poll() is None:
            job.proc.kill()
            job.proc.wait()


def test_on_one_gpu_a_second_job_waits_for_the_card(tmp_path, jobs):
    """`snakemake --cores 8` without --resources on a one-GPU host: the jobs take the card in turn."""
    one = [UUIDS[0]]
    jobs.append(first := Job(one, tmp_path))
    assert first.gpu() == (UUIDS[0], UUIDS[0])
    jobs.append(second := Job(one, tmp_path))
    assert second.gpu(timeout=1.5) is None, "a second job ran on the card another job holds"
    first.end()
    assert second.gpu() == (UUIDS[0], UUIDS[0])


def test_several_gpus_one_job_each_in_slurms_numbering_and_a_fourth_waits(tmp_path, jobs):
    """A job given GPUs 4,5,6 of 8 (SLURM's CUDA_VISIBLE_DEVICES): three jobs get one each, named as
    the job was given them; a fourth waits, then takes the one freed."""
    for _ in range(3):
        jobs.append(Job(UUIDS, tmp_path, visible="4,5,6"))
    got = [job.gpu() for job in jobs]
    assert sorted(got) == [("4", UUIDS[4]), ("5", UUIDS[5]), ("6", UUIDS[6])]
    jobs.append(fourth := Job(UUIDS, tmp_path, visible="4,5,6"))
    assert fourth.gpu(timeout=1.5) is None, "four jobs on three GPUs"
    jobs[1].end()
    assert fourth.gpu() == got[1]


def test_a_job_sees_only_its_gpu_so_cuda_0_is_it_for_every_library(tmp_path, jobs):
    """Without CUDA_VISIBLE_DEVICES the job is narrowed to its GPU by UUID (exact whatever CUDA's
    device order): Data-Juicer's captioner, which picks cuda:0 itself, lands on the job's GPU."""
    jobs.append(first := Job(UUIDS[:2], tmp_path))
    jobs.append(second := Job(UUIDS[:2], tmp_path))
    assert {first.gpu(), second.gpu()} == {(UUIDS[0], UUIDS[0]), (UUIDS[1], UUIDS[1])}


@pytest.mark.parametrize("visible, expected", [
    (None, [(u, u) for u in UUIDS[:3]]),
    ("2,0", [("2", UUIDS[2]), ("0", UUIDS[0])]),
    ("1,7,2", [("1", UUIDS[1])]),  # CUDA stops at the first entry that names no GPU
    ("GPU-c,GPU-a0", [("GPU-c", UUIDS[2]), ("GPU-a0", UUIDS[0])]),  # UUID prefixes, as CUDA takes them
    ("MIG-1234", [("MIG-1234", "MIG-1234")]),  # a MIG slice: a device of its own
    ("", []), ("-1", []), ("0,1,0", []),  # a GPU named twice: CUDA shows none
])
def test_the_job_gpus_are_read_as_cuda_reads_cuda_visible_devices(monkeypatch, visible, expected):
    monkeypatch.setattr(gpu_slots, "nvml_gpus", lambda: UUIDS[:3])
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert gpu_slots.host_gpus() == [gpu_slots.Gpu(v, u) for v, u in expected]


def test_without_gpus_a_job_leaves_the_device_alone(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    for listed in (None, []):  # no NVIDIA driver; a driver without GPUs
        monkeypatch.setattr(gpu_slots, "nvml_gpus", lambda: listed)
        assert gpu_slots.use_free_gpu() is None and os.environ["CUDA_VISIBLE_DEVICES"] == "0"


def test_a_job_that_started_cuda_before_its_claim_at_least_gets_its_gpu_as_torch_default(four_fake_gpus, monkeypatch):
    """CUDA no longer reads CUDA_VISIBLE_DEVICES once started: then the claimed GPU becomes torch's
    current device (its index among the job's GPUs), and the environment is left as CUDA read it."""
    import torch

    _, other_job = claim_slots(four_fake_gpus, 1)
    current: list[int] = []
    monkeypatch.setattr(gpu_slots, "_cuda_started", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    assert gpu_slots.use_free_gpu() == gpu_slots.Gpu("5", UUIDS[5])
    assert current == [1] and os.environ["CUDA_VISIBLE_DEVICES"] == "4,5,6,7"
    other_job[0].close()


def test_nvml_on_this_host_lists_no_gpu_and_starts_no_cuda():
    import torch

    assert not gpu_slots.nvml_gpus() and not gpu_slots._cuda_started()  # this machine has no GPU
    assert not torch.cuda.is_initialized()


def test_parallel_claims_get_different_gpus_and_a_freed_gpu_is_taken_again(tmp_path):
    names = ["gpu-a", "gpu-b"]
    first, first_lock = claim_slot(names, tmp_path)
    second, second_lock = claim_slot(names, tmp_path)
    assert {first, second} == {0, 1}
    threading.Timer(0.3, second_lock.close).start()  # a job ends: its lock goes with it
    started = time.monotonic()
    third, third_lock = claim_slot(names, tmp_path, poll_s=0.05)  # waits while both are held
    assert third == second and time.monotonic() - started >= 0.25
    first_lock.close()
    third_lock.close()


def test_a_multi_gpu_training_claims_gpus_no_other_job_holds(tmp_path):
    names = ["gpu-a", "gpu-b", "gpu-c", "gpu-d"]
    one_gpu, one_lock = claim_slots(names, 1, tmp_path)  # a scene job holds one
    two, two_locks = claim_slots(names, 2, tmp_path)  # a 2-process training takes two others
    assert len(set(two)) == 2 and not set(one_gpu) & set(two)
    rest, rest_locks = claim_slots(names, 1, tmp_path)
    assert not set(rest) & (set(one_gpu) | set(two))
    for handle in one_lock + two_locks + rest_locks:
        handle.close()


def test_a_claim_waits_until_enough_gpus_are_free_at_once(tmp_path):
    names = ["gpu-a", "gpu-b"]
    _, held = claim_slots(names, 1, tmp_path)
    threading.Timer(0.3, held[0].close).start()
    started = time.monotonic()
    both, locks = claim_slots(names, 2, tmp_path, poll_s=0.05)
    assert sorted(both) == [0, 1] and time.monotonic() - started >= 0.25
    for handle in locks:
        handle.close()


@pytest.fixture
def four_fake_gpus(monkeypatch, tmp_path):
    """Four GPUs of eight, shown to this job as SLURM's 4,5,6,7; locks in a temp folder."""
    monkeypatch.setattr(gpu_slots, "nvml_gpus", lambda: UUIDS)
    monkeypatch.setenv(gpu_slots.LOCK_DIR_ENV, str(tmp_path / "locks"))
    monkeypatch.setattr(gpu_slots, "_HELD", {})
    monkeypatch.setattr(gpu_slots, "_GIVEN", None)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")  # restored after the test, narrowed or not
    yield UUIDS[4:]
    for handle in gpu_slots._HELD.values():
        handle.close()


def _is_free(name: str) -> bool:
    import fcntl

    with gpu_slots._open_lock(gpu_slots.lock_folder(), name) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False


def test_train_launches_its_ranks_on_gpus_no_other_job_holds_and_frees_them(four_fake_gpus, tmp_path, monkeypatch):
    from kolors_story.errors import UserError
    from kolors_story.host import training_launch as launch
    from kolors_story.training.settings import TrainJob, TrainSettings

    _, scene_job = claim_slots(four_fake_gpus, 1)  # another job holds SLURM's 4
    seen: dict[str, str] = {}

    def fake_launch(command: list[str], env: dict[str, str] | None = None) -> int:
        seen.update(env or {})
        seen["free_during"] = ",".join(n for n in four_fake_gpus if _is_free(n))
        return 1

    monkeypatch.setattr(launch, "run_logged", fake_launch)
    with pytest.raises(UserError, match="2 training processes failed"):
        launch.train(TrainJob(tmp_path, tmp_path, tmp_path / "out"), TrainSettings(steps=1), processes=2)
    assert seen["CUDA_VISIBLE_DEVICES"] == "5,6"  # the ranks see exactly the two it took
    assert seen["free_during"] == four_fake_gpus[3]  # ... held while they ran
    assert all(_is_free(n) for n in four_fake_gpus[1:])  # and freed after the launch
    scene_job[0].close()


def test_a_training_in_a_one_gpu_job_counts_the_gpu_it_already_holds(four_fake_gpus):
    """With `--resources gpu=1` Snakemake caps a 2-process training's gpu=2 at 1, so rule_runner
    claims a GPU for the job (and narrows it to that one) before the launcher asks for two: that
    one must be one of them, and the launcher still sees the job's four."""
    from kolors_story.host.training_launch import check_process_count, ranks_env, visible_gpus

    own = gpu_slots.use_free_gpu()  # what rule_runner does for a gpu=1 job
    assert own == gpu_slots.Gpu("4", UUIDS[4]) and os.environ["CUDA_VISIBLE_DEVICES"] == "4"
    check_process_count(2, visible_gpus())
    got: list[str] = []

    def launch() -> None:
        with ranks_env(2) as env:
            got.append(env["CUDA_VISIBLE_DEVICES"])

    thread = threading.Thread(target=launch, daemon=True)
    thread.start()
    thread.join(timeout=10)
    assert got == ["4,5"], "the launcher waited for the GPU its own job holds"
    assert not _is_free(UUIDS[4]) and _is_free(UUIDS[5])  # the job's own claim stays; the rank's went


def test_the_rule_runner_narrows_a_gpu_job_to_a_free_gpu_before_cuda_starts(four_fake_gpus, tmp_path):
    """A gpu=1 job's main() already sees only its GPU, and nothing has started CUDA: Data-Juicer's
    captioner (cuda:0) and torch's `cuda` are both the job's GPU, not one another job holds."""
    import torch

    from kolors_story.host.rule_runner import run_rule

    _, other_job = claim_slots(four_fake_gpus, 1)  # SLURM's 4 is taken
    seen = {}

    def main(snakemake) -> None:
        seen.update(visible=os.environ["CUDA_VISIBLE_DEVICES"], cuda_started=torch.cuda.is_initialized())

    job = SimpleNamespace(log=[str(tmp_path / "job.log")], rule="caption_images", threads=1,
                          resources=SimpleNamespace(gpu=1), input=[], output=[])
    run_rule(main, job, seal_outputs=False)
    assert seen == {"visible": "5", "cuda_started": False}
    assert "this job's GPU: " + UUIDS[5] in (tmp_path / "job.log").read_text()
    other_job[0].close()
    for handler in logging.getLogger().handlers[:]:  # run_rule pointed the root logger at the job's log
        if isinstance(handler, logging.FileHandler):
            logging.getLogger().removeHandler(handler)
            handler.close()


def _profile_resources(monkeypatch, gpus: list[str] | None, *cli: str) -> dict[str, int]:
    from snakemake.cli import parse_args

    monkeypatch.setattr(gpu_slots, "nvml_gpus", lambda: gpus)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    _, args = parse_args(["--cores", "8", "--workflow-profile", str(REPO / "profiles" / "default"), *cli])
    return {name: res.value for name, res in dict(args.resources).items()}


def test_the_default_profile_runs_one_gpu_job_at_a_time_on_a_gpu_host(monkeypatch):
    assert _profile_resources(monkeypatch, UUIDS[:1]) == {"gpu": 1}
    assert _profile_resources(monkeypatch, UUIDS[:1], "--resources", "gpu=2") == {"gpu": 2}  # the CLI wins
    assert _profile_resources(monkeypatch, None) == {}  # a CPU host (the demo): --cores alone limits


# A job of another user: claims one of argv's GPUs through the lock folder it is given; holds it.
USER_JOB = """
import os, sys
from kolors_story.host import gpu_slots
names = sys.argv[1].split(",")
index, handle = gpu_slots.claim_slot(names, os.environ["KOLORS_STORY_GPU_LOCKS"], poll_s=0.1)
print(index, names[index], flush=True)
sys.stdin.read()
"""
USERS = ("daemon", "nobody")  # two users that are not root (root opens any file whatever its mode)
SOURCES = ["__init__.py", "errors.py", "host/__init__.py", "host/gpu_slots.py"]  # all gpu_slots imports


def _python_for(users: tuple[str, ...]) -> str | None:
    """A Python every one of `users` may run (the venv's may sit under root's 0700 home)."""
    def runs(python: str, user: str) -> bool:
        try:
            return subprocess.run([python, "-c", "import fcntl, ctypes"], user=user, capture_output=True).returncode == 0
        except OSError:  # not executable by that user
            return False

    candidates = dict.fromkeys([sys.executable, "/usr/bin/python3", shutil.which("python3") or ""])
    return next((python for python in candidates if python and all(runs(python, u) for u in users)), None)


@pytest.fixture
def two_users():
    """A folder in /tmp both users may enter, holding a copy of the code that gpu_slots needs
    (the checkout may not be readable by them), and a Python both may run."""
    if os.geteuid() != 0:
        pytest.skip("two users' jobs need root to start them as daemon and nobody")
    python = _python_for(USERS)
    if python is None:
        pytest.skip(f"no Python on this host that both {' and '.join(USERS)} may run")
    base = Path(tempfile.mkdtemp(prefix="kolors-gpu-users-", dir="/tmp"))
    base.chmod(0o1777)  # like /tmp: the first user's job makes the lock folder in it
    for name in SOURCES:
        target = base / "src" / "kolors_story" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(REPO / "src" / "kolors_story" / name, target)
    for path in [base / "src", *(base / "src").rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    yield python, base
    shutil.rmtree(base)


def test_a_second_users_jobs_wait_on_the_first_users_gpus_instead_of_failing(two_users, jobs):
    """daemon's job makes the lock folder and a lock file under umask 077; nobody's jobs (umask 077
    too) take the other GPU, then wait for daemon's and take it when daemon's job ends."""
    python, base = two_users
    lock_dir = base / "gpu-locks"

    def job(user: str) -> Job:
        jobs.append(started := Job([], lock_dir, python=python, code=USER_JOB, args=(",".join(UUIDS[:2]),),
                                   env={"PYTHONPATH": str(base / "src")}, user=user, umask=0o077, cwd=base))
        return started

    first = job(USERS[0])
    assert first.gpu() == ("0", UUIDS[0])
    second = job(USERS[1])
    assert second.gpu() == ("1", UUIDS[1]), "the second user's job could not use the first user's lock folder"
    third = job(USERS[1])
    assert third.gpu(timeout=1.5) is None, "a GPU another user's job holds was taken"
    first.end()
    assert third.gpu() == ("0", UUIDS[0])  # the first user's lock file, opened by the second user
    assert stat.S_IMODE(lock_dir.stat().st_mode) == 0o1777
    assert {stat.S_IMODE(f.stat().st_mode) for f in lock_dir.iterdir()} == {0o666}
