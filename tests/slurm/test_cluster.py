"""The demo through profiles/slurm on a real single-node SLURM (started by tests/slurm/cluster.sh,
see `make test-slurm`), against the same config run locally; then a node lost mid-training.

Not collected by `make test` (tests/slurm/conftest.py): it needs root and the running cluster.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from result_files import compare

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "tests/slurm/cluster.sh"
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
PARTITION = os.environ.get("KOLORS_SLURM_PARTITION", "debug")  # as cluster.sh sets them up
ACCOUNT = os.environ.get("KOLORS_SLURM_ACCOUNT", "kolors")
RUN_TIMEOUT = 900
# The demo's variants that between them run every rule (the writer, the captioner, two trainings,
# anchors, scenes, scoring, the leaderboard): through SLURM and locally, compared byte for byte.
# demo-scale0.5 and demo-compile only render the same rules again (make test runs them), so they
# are left out to keep make test-slurm within CI's time.
SLURM_VARIANTS = ("demo", "demo-outline", "demo-captions")
SWEEP_FILE = "slurm_sweep.yaml"  # demo/sweep.yaml's entries of SLURM_VARIANTS, written by fresh_copy
DEMO_SWEEP = ("demo/config.yaml", SWEEP_FILE)
FAIL_STATES = ("FAILED", "NODE_FAIL", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


DEMO_MEM_MB = 4000  # the demo's tiny models: what a job of it asks on this node (nothing enforces it)


def slurm_command(fit: bool = True, configfiles: tuple[str, ...] = DEMO_SWEEP) -> list[str]:
    """docs/cluster.md's command, with partition and account given on the command line as a user would:
    that replaces the profile's default-resources, so its defaults are named again (read from the
    profile). --set-threads: the local run's thread counts (`--cores 2`: training takes both
    cores, every other job one), so that torch computes with the same threads and the outputs can
    be compared bit for bit; the profile's 8 CPUs for training would not fit this 2-CPU node.
    fit: the profile's memory (32-48 GB for the GPU rules) and the training rule's own (16 GB + 8 GB
    a process, rules/train.smk) are more than this node has (the cluster declares its true
    memory), so they are named again with the demo's DEMO_MEM_MB, as a user of a small node does;
    fit=False: the profile as shipped."""
    profile = yaml.safe_load((ROOT / "profiles/slurm/config.yaml").read_text(encoding="utf-8"))
    defaults = [f"{k}={v}" for k, v in profile["default-resources"].items()]
    command = [SNAKEMAKE, "--workflow-profile", "profiles/slurm", "--configfile", *configfiles,
               "--default-resources", f"slurm_partition={PARTITION}", f"slurm_account={ACCOUNT}", *defaults,
               "--set-threads", "train_lora=2"]
    if fit:
        command += ["--set-resources", *(f"{rule}:{key}={min(value, DEMO_MEM_MB) if key == 'mem_mb' else value}"
                                          for rule, settings in profile["set-resources"].items()
                                          for key, value in settings.items()),
                    f"train_lora:mem_mb={DEMO_MEM_MB}"]
    return command


LOCAL_COMMAND = [SNAKEMAKE, "--cores", "2", "--configfile", *DEMO_SWEEP]


def fresh_copy(dest: Path) -> Path:
    """The project as git sees it (tracked and new files, nothing ignored: no .venv, results/,
    resources/), copied into an empty folder."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    sweep = yaml.safe_load((dest / "demo/sweep.yaml").read_text(encoding="utf-8"))["sweep"]
    kept = [variant for variant in sweep if variant["name"] in SLURM_VARIANTS]
    assert [v["name"] for v in kept] == list(SLURM_VARIANTS), "demo/sweep.yaml lost a variant this test runs"
    (dest / SWEEP_FILE).write_text(yaml.safe_dump({"sweep": kept}, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return dest


def environment(workdir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MODELSCOPE_API_TOKEN" and not k.startswith("SLURM_")}
    env["HF_HUB_OFFLINE"] = "1"
    env["PYTHONPATH"] = str(workdir / "src")  # the copy's library, in every job (sbatch --export=ALL)
    return env


def start(workdir: Path, command: list[str], name: str, **env: str) -> tuple[subprocess.Popen, Path]:
    out = workdir / f"{name}.out"
    with open(out, "w") as stdout:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(command, cwd=workdir, env={**environment(workdir), **env}, stdout=stdout,
                                stderr=subprocess.STDOUT, start_new_session=True)
    return proc, out


def finish(proc: subprocess.Popen, timeout: float) -> int:
    """Wait; past the timeout send SIGINT (Snakemake then scancels its SLURM jobs; SIGTERM would
    leave them), then SIGKILL."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise


def run(workdir: Path, command: list[str], name: str) -> float:
    t0 = time.monotonic()
    proc, out = start(workdir, command, name)
    rc = finish(proc, RUN_TIMEOUT)
    assert rc == 0, f"{name} failed (rc {rc}):\n{out.read_text()[-6000:]}"
    return time.monotonic() - t0


def squeue() -> list[dict[str, str]]:
    rows = subprocess.run(["squeue", "-h", "--states=all", "-o", "%i|%T|%k"], capture_output=True,
                          text=True, check=True).stdout.splitlines()
    return [dict(zip(("id", "state", "comment"), row.split("|", 2))) for row in rows]


def cluster(action: str) -> None:
    subprocess.run([str(CLUSTER), action], check=True)


def no_job_processes() -> bool:
    """No slurmstepd left (a lost node's job steps survive slurmd; its restart ends them)."""
    ps = subprocess.run(["ps", "-eo", "stat=,comm="], capture_output=True, text=True, check=True).stdout.splitlines()
    return not [line for line in ps if line.split()[-1].startswith("slurmstepd") and not line.startswith("Z")]


def wait_until(condition, timeout: float, what: str, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def report(line: str) -> None:
    print(f"[test-slurm] {line}", flush=True)


# ---------------------------------------------------------------- the demo via SLURM vs locally
@pytest.fixture(scope="module")
def slurm_demo(tmp_path_factory) -> Path:
    """The demo through profiles/slurm in a fresh copy of the project."""
    work = fresh_copy(tmp_path_factory.mktemp("slurm"))
    report(f"demo via SLURM: {run(work, slurm_command(), 'slurm'):.0f} s")
    return work


def test_the_demo_through_slurm_gives_the_local_outputs_byte_for_byte(slurm_demo, tmp_path):
    # One after the other: side by side, the two runs would compete for the 2 cores.
    local = fresh_copy(tmp_path / "local")
    report(f"demo locally (--cores 2): {run(local, LOCAL_COMMAND, 'local'):.0f} s")

    ids = re.findall(r"has been submitted with SLURM jobid (\d+)", (slurm_demo / "slurm.out").read_text())
    assert ids, "no job went through SLURM"
    gres = accounted_gpus(ids)
    gpu_rules = {"encode_texts", "train_lora", "generate_scene", "render_anchor", "write_prompts",  # the demo's writer is local
                 "caption_images"}  # and its captioner a Data-Juicer model
    for job_id, (rule, gpus) in gres.items():
        assert gpus == (1 if rule in gpu_rules else 0), f"SLURM job {job_id} ({rule}) got {gpus} GPUs"
    rules = {rule for rule, _ in gres.values()}
    report(f"{len(ids)} SLURM jobs, rules {sorted(rules)}; one GPU each for {sorted(gpu_rules)}")
    assert rules >= gpu_rules | {"score_images", "filter_dataset"}
    assert not {"compose_story", "bundle", "manifest", "compare_runs", "copy_scene"} & rules, \
        "a localrule went to SLURM"

    result = compare(slurm_demo / "results", local / "results")
    assert result == {"only_in_first": [], "only_in_second": [], "differ": []}, result


def accounted_gpus(ids: list[str]) -> dict[str, tuple[str, int]]:
    """SLURM job id -> (rule, GPUs allocated), from accounting (the job comment holds the rule)."""
    rows = subprocess.run(["sacct", "-X", "-n", "-P", "-j", ",".join(ids), "-o", "JobIDRaw,Comment,AllocTRES"],
                          capture_output=True, text=True, check=True).stdout.splitlines()
    out = {}
    for row in rows:
        job_id, comment, tres = row.split("|")
        rule = re.match(r"rule_(.+?)(?:_wildcards_.*)?$", comment).group(1)
        gpus = re.search(r"gres/gpu=(\d+)", tres)
        out[job_id] = (rule, int(gpus.group(1)) if gpus else 0)
    return out


# ---------------------------------------------------------------- a lost node
def test_a_lost_node_stops_snakemake_with_the_job_and_a_rerun_completes(slurm_demo, tmp_path):
    """slurmd is killed as soon as training is RUNNING (its batch script is then still starting
    Snakemake, so the job step never launches and no orphan keeps training); Snakemake must stop
    within 90 s naming the job, its state and its SLURM log. Then slurmd comes back and the same
    command completes. To keep `make test-slurm` within its time budget the command stops after
    training (--until train_lora: the DAG after it went through SLURM in the first test; the demo
    alone, whose training is the sweep's, since an outline variant's writer comes first), and the
    fresh copy gets resources/ (tiny models, demo dataset, caches) from the first run, as it stays
    on a cluster's shared filesystem between runs; results/ starts empty."""
    from kolors_story.training.checkpoints import STATE_FILE

    work = fresh_copy(tmp_path / "fault")
    shutil.copytree(slurm_demo / "resources", work / "resources", symlinks=True)
    command = [*slurm_command(configfiles=("demo/config.yaml",)), "--until", "train_lora"]  # its training is the sweep's
    proc, out = start(work, command, "fault")
    try:
        def training_running():
            assert proc.poll() is None, f"snakemake ended before training ran:\n{out.read_text()[-4000:]}"
            return next((j for j in squeue() if j["comment"].startswith("rule_train_lora") and j["state"] == "RUNNING"), None)

        job = wait_until(training_running, 420, "train_lora RUNNING in squeue", poll=0.2)
        report(f"train_lora RUNNING as SLURM job {job['id']}; killing slurmd")
        cluster("stop-slurmd")
        killed = time.monotonic()
        reported = None  # when the error naming the job appeared in Snakemake's output
        while proc.poll() is None and time.monotonic() - killed < 90:
            if reported is None and f"SLURM-job '{job['id']}' failed" in out.read_text():
                reported = time.monotonic() - killed
            time.sleep(0.5)
        if proc.poll() is None:
            pytest.fail(f"snakemake still running 90 s after slurmd was killed:\n{out.read_text()[-4000:]}")
        rc, detected = proc.returncode, time.monotonic() - killed
        reported = detected if reported is None else reported
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=60)
        cluster("start-slurmd")  # also when the assertions below fail: the next test needs the node
    text = out.read_text()
    report(f"error printed {reported:.0f} s after slurmd was killed; snakemake exited rc {rc} after {detected:.0f} s")
    assert rc != 0
    found = re.search(rf"SLURM-job '{job['id']}' failed[^\n]*?SLURM status is: '([A-Z_]+)", text)
    assert found, f"no error naming SLURM job {job['id']}:\n{text[-4000:]}"
    assert found.group(1) in FAIL_STATES
    assert re.search(rf"slurm_logs/rule_train_lora/\S*{job['id']}\.log", text), "no SLURM log path"
    report(f"reported: SLURM job {job['id']} state {found.group(1)}")

    wait_until(no_job_processes, 60, "the lost node's job steps to end after slurmd's restart")
    checkpoints = sorted(p.parent.name for p in (work / "results").rglob(f"step-??????/{STATE_FILE}"))
    t0 = time.monotonic()
    proc, out = start(work, command, "rerun")
    rc = finish(proc, RUN_TIMEOUT)
    assert rc == 0, f"rerun failed:\n{out.read_text()[-6000:]}"
    report(f"rerun completed in {time.monotonic() - t0:.0f} s (checkpoints before it: {checkpoints or 'none'})")
    summaries = [json.loads(p.read_text(encoding="utf-8")) for p in (work / "results").rglob("training_summary.json")]
    assert summaries
    if checkpoints:  # training continued from the newest checkpoint the lost job left in results/
        newest = int(checkpoints[-1].removeprefix("step-"))
        assert [s["resumed_from_step"] for s in summaries] == [newest]


# ---------------------------------------------------------------- jobs no node can run
def node_memory_mb() -> int:
    return int(subprocess.run(["sinfo", "--noheader", "--Node", "--format", "%m"], capture_output=True,
                              text=True, check=True).stdout.split()[0])


def test_a_rule_no_node_can_run_is_refused_before_anything_is_submitted(tmp_path):
    """The profile as shipped asks 32 GB for the text encoder and 48 GB for scenes and anchors,
    training 24 GB for its one process; this node has its true memory. The demo alone, not the
    sweep: a sweep whose outline variant waits for its prompt writer plans (and so checks) the
    writer's job first and the rest once it is done (docs/cluster.md)."""
    work = fresh_copy(tmp_path / "refused")
    earlier = {job["id"] for job in squeue()}  # finished jobs of earlier tests stay listed for MinJobAge
    proc, out = start(work, slurm_command(fit=False, configfiles=("demo/config.yaml",)), "refused")
    rc = finish(proc, 300)
    text = out.read_text()
    mem = node_memory_mb()
    assert rc != 0 and "SLURM cannot run these jobs, nothing was submitted:" in text, text[-4000:]
    host = subprocess.run(['hostname', '-s'], capture_output=True, text=True).stdout.strip()
    line = next((ln for ln in text.splitlines() if "rule encode_texts asks " in ln), "")
    assert (f"32000 MB, 1 GPU on partition {PARTITION}; no node there offers that, the largest ({host}) has "
            f"2 CPUs, {mem} MB, 2 GPUs; make it fit: ") in line, text[-4000:]
    assert line.endswith(f"--set-resources encode_texts:mem_mb={mem}"), line
    train = 24000  # rules/train.smk: 16000 + 8000 for the demo's one process
    assert (f"rule train_lora asks 2 CPUs, {train} MB" in text) == (train > mem), text[-4000:]
    for rule in ("encode_texts", "generate_scene", "render_anchor"):  # 32 and 48 GB
        assert f"rule {rule} asks " in text
    assert "rule score_images" not in text  # 16 GB fits
    assert "submitted with SLURM jobid" not in text, text[-4000:]
    submitted = [job for job in squeue() if job["id"] not in earlier]
    assert not submitted, submitted
    report("the profile's 32-48 GB GPU jobs refused before any submission, with the flags that fit")


@pytest.mark.parametrize("case", ["partition time limit", "node drained"])
def test_a_job_pending_for_ever_is_cancelled_and_named(tmp_path, case):
    """The partition's MaxTime shrunk under the jobs' runtime, or its only node drained: the first
    job sits PENDING; past the grace period it is cancelled and named, and Snakemake stops."""
    host = subprocess.run(["hostname", "-s"], capture_output=True, text=True, check=True).stdout.strip()
    change, undo = {
        "partition time limit": ([f"partitionname={PARTITION}", "maxtime=1"], [f"partitionname={PARTITION}", "maxtime=infinite"]),
        "node drained": ([f"nodename={host}", "state=drain", "reason=kolors-test"], [f"nodename={host}", "state=resume"]),
    }[case]
    work = fresh_copy(tmp_path / "pending")
    subprocess.run(["scontrol", "update", *change], check=True)
    t0 = time.monotonic()
    try:
        proc, out = start(work, slurm_command(), "pending", KOLORS_SLURM_PENDING_GRACE_S="5")
        rc = finish(proc, 300)
    finally:
        subprocess.run(["scontrol", "update", *undo], check=True)
    text = out.read_text()
    found = re.search(r"SLURM job (\d+) \(rule (\w+)\) cancelled: PENDING for '([^']+)', which waiting cannot clear", text)
    assert rc != 0 and found, text[-4000:]
    job, rule, reason = found.groups()
    if case == "partition time limit":
        assert reason == "PartitionTimeLimit"
        assert f"partition {PARTITION} allows 1 min: --set-resources {rule}:runtime=1" in text
    else:
        assert reason.startswith("Nodes required for job are DOWN, DRAINED")
        assert f"no node of partition {PARTITION} is up ({host} drain" in text
    assert f"SLURM-job '{job}' failed" in text  # Snakemake saw the cancelled job and stopped
    report(f"{case}: job {job} ({rule}) pending for '{reason[:40]}', cancelled and named; "
           f"snakemake stopped after {time.monotonic() - t0:.0f} s")


@pytest.fixture(autouse=True)
def _no_jobs_left():
    yield
    subprocess.run(["scancel", "--full", "-p", PARTITION], check=False)
