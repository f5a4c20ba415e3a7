"""Will SLURM ever run these jobs? A job that asks more than any node has is refused by sbatch
with a terse line, or, where partition limits are not enforced at submission, sits PENDING for
ever while Snakemake waits in silence. So, with the slurm executor (the Snakefile's onstart):

- before the first submission, each rule's request (CPUs, memory, GPUs, partition, exactly as the
  plugin will pass them to sbatch) is compared with the nodes `sinfo` lists; a rule that no node
  can run is refused, naming what it asks, the largest node, and the flags that make it fit;
- while the run goes on, a job of this run PENDING for a reason that cannot clear (a partition
  limit, an invalid account, every node of its partition down or drained) for longer than a grace
  period is cancelled and reported the same way; Snakemake then stops as for any failed job.
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from kolors_story.errors import UserError

SINFO_FORMAT = "%N|%P|%c|%m|%G|%t|%l"  # node, partition (* = default), CPUs, MB, GRES, state, MaxTime
SQUEUE_FORMAT = "%i|%P|%r|%k|%C|%m|%l|%b|%Z"
DOWN_STATES = ("down", "drain", "drng", "fail", "maint", "boot", "futr", "npc", "unk", "inval", "resv")
# squeue reasons no waiting can clear: the job asks what its partition, QOS or account never gives
UNCLEARABLE = ("PartitionConfig", "PartitionTimeLimit", "PartitionNodeLimit", "PartitionDown",
               "BadConstraints", "InvalidAccount", "InvalidQOS", "DependencyNeverSatisfied",
               "QOSMax", "AssocMax", "MaxCpuPerAccount", "MaxMemPerLimit")
# ...and those that clear only when a node comes back: unclearable while none of its nodes is up
# (SLURM 22.05 spells the drained case "Nodes required for job are DOWN, DRAINED or reserved ...")
NODES_GONE = ("ReqNodeNotAvail", "NodeDown", "Nodes required for job are DOWN", "Nodes_required_for_job_are_DOWN")
GRACE_ENV = "KOLORS_SLURM_PENDING_GRACE_S"
DEFAULT_GRACE_S = 120.0
FIX_DOCS = "see docs/cluster.md, 'Jobs that no node can run'"
PROFILE_NOTE = ("a --set-resources or --set-threads on the command line replaces the profile's whole "
                "list: put the value in profiles/slurm/config.yaml instead, or name the others again")


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


@dataclass(frozen=True)
class Node:
    name: str
    partition: str
    cpus: int
    mem_mb: int
    gpus: int
    state: str
    max_minutes: int | None  # the partition's MaxTime; None for no limit
    default: bool = False  # the cluster's default partition

    @property
    def up(self) -> bool:
        return not self.state.rstrip("*~#!%$@^-").startswith(DOWN_STATES)

    def offers(self) -> str:
        return f"{_count(self.cpus, 'CPU')}, {self.mem_mb} MB, {_count(self.gpus, 'GPU')}"


@dataclass(frozen=True)
class Request:
    rule: str
    cpus: int
    mem_mb: int
    gpus: int
    partition: str | None  # None: the cluster's default partition

    def asks(self) -> str:
        return f"{_count(self.cpus, 'CPU')}, {self.mem_mb} MB, {_count(self.gpus, 'GPU')}"


def _gpus(gres: str) -> int:
    """GPUs in sinfo's GRES column: 'gpu:2', 'gpu:a100:4(S:0-1)', 'gpu:1,shard:4', '(null)'."""
    return sum(int(m.group(1)) for m in re.finditer(r"(?:^|,)gpu(?::[^:,(]+)?:(\d+)", gres))


def _minutes(limit: str) -> int | None:
    """SLURM's time limit ('infinite', '30', '1:00:00', '2-00:00:00') in minutes."""
    if limit in ("infinite", "UNLIMITED", "n/a", ""):
        return None
    days, _, clock = limit.rpartition("-")
    parts = [int(p) for p in clock.split(":")]
    h, m, s = ([0] * (3 - len(parts)) + parts) if len(parts) > 1 else (0, parts[0], 0)
    return (int(days or 0) * 24 + h) * 60 + m + (1 if s else 0)


def parse_sinfo(text: str) -> list[Node]:
    """Nodes from `sinfo --noheader --Node --format SINFO_FORMAT` (one line per node and partition)."""
    nodes = []
    for line in filter(None, (ln.strip() for ln in text.splitlines())):
        name, partition, cpus, mem, gres, state, limit = line.split("|")
        nodes.append(Node(name, partition.rstrip("*"), int(cpus), int(float(mem.rstrip("+"))), _gpus(gres),
                          state, _minutes(limit), partition.endswith("*")))
    return nodes


def cluster_nodes() -> list[Node]:
    try:
        out = subprocess.run(["sinfo", "--noheader", "--Node", "--format", SINFO_FORMAT],
                             capture_output=True, text=True, check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise UserError(f"the slurm executor needs `sinfo` on this host to check the jobs' requests: {exc}") from None
    return parse_sinfo(out)


def request_of(job: Any) -> Request:
    """What the slurm plugin will ask sbatch for this Snakemake job (plugin 2.8.0's mapping:
    --cpus-per-task = cpus_per_task or threads; --mem = mem_mb, or mem_mb_per_cpu x CPUs;
    --gpus = gpus, gpu or nvidia_gpu)."""
    res = job.resources
    cpus = max(1, int(res.get("cpus_per_task") or job.threads))
    mem = int(res.get("mem_mb_per_cpu") or 0) * cpus or int(res.get("mem_mb") or 0)
    gpus = next((int(res.get(k)) for k in ("gpus", "gpu", "nvidia_gpu") if res.get(k) is not None), 0)
    return Request(job.rule.name, cpus, mem, gpus, res.get("slurm_partition") or None)


def _partition_nodes(nodes: list[Node], partition: str | None) -> list[Node]:
    return [n for n in nodes if (n.partition == partition if partition else n.default)]


def largest(nodes: list[Node]) -> Node:
    return max(nodes, key=lambda n: (n.mem_mb, n.cpus, n.gpus, n.name))


def fits(req: Request, node: Node) -> bool:
    return req.cpus <= node.cpus and req.mem_mb <= node.mem_mb and req.gpus <= node.gpus


def fix_flags(req: Request, node: Node) -> str:
    """The command-line flags that bring `req` within `node`."""
    flags, resources = [], []
    if req.cpus > node.cpus:
        flags.append(f"--set-threads {req.rule}={node.cpus}")
    if req.mem_mb > node.mem_mb:
        resources.append(f"{req.rule}:mem_mb={node.mem_mb}")
    if req.gpus > node.gpus:
        resources.append(f"{req.rule}:gpu={node.gpus}")
    if resources:
        flags.append("--set-resources " + " ".join(resources))
    return " ".join(flags)


def unfit(req: Request, nodes: list[Node]) -> str | None:
    """Why no node of the request's partition can ever run it, with the fix; None if one can."""
    where = _partition_nodes(nodes, req.partition)
    named = f"partition {req.partition}" if req.partition else "the default partition"
    if not where:
        partitions = sorted({n.partition for n in nodes})
        return (f"rule {req.rule} asks for {named}, which sinfo does not list (partitions: "
                f"{', '.join(partitions) or 'none'}); set one: --set-resources {req.rule}:slurm_partition=NAME")
    if any(fits(req, n) for n in where):
        return None
    node = largest(where)
    return (f"rule {req.rule} asks {req.asks()} on {named}; no node there offers that, the largest "
            f"({node.name}) has {node.offers()}; make it fit: {fix_flags(req, node)}")


def check_requests(requests: Iterable[Request], nodes: list[Node]) -> None:
    """Refuse, before anything is submitted, every rule that no node can run (one line each)."""
    worst: dict[tuple[str, str | None], Request] = {}
    for req in requests:  # per rule and partition, the largest of its jobs' requests
        key = (req.rule, req.partition)
        old = worst.get(key, req)
        worst[key] = Request(req.rule, max(old.cpus, req.cpus), max(old.mem_mb, req.mem_mb),
                             max(old.gpus, req.gpus), req.partition)
    problems = [p for _, req in sorted(worst.items(), key=lambda kv: (kv[0][0], kv[0][1] or ""))
                if (p := unfit(req, nodes))]
    if problems:
        raise UserError("SLURM cannot run these jobs, nothing was submitted:\n  " + "\n  ".join(problems)
                        + f"\n({PROFILE_NOTE}; {FIX_DOCS})")


def check_workflow_jobs(jobs: Iterable[Any], nodes: list[Node] | None = None) -> int:
    """check_requests for the Snakemake jobs that go to SLURM (not the localrules); their number."""
    requests = [request_of(job) for job in jobs if not job.is_local]
    if requests:
        check_requests(requests, cluster_nodes() if nodes is None else nodes)
    return len(requests)


# ---------------------------------------------------------------- jobs PENDING for ever
@dataclass(frozen=True)
class Pending:
    job_id: str
    partition: str
    reason: str
    rule: str
    asks: str  # CPUs, memory and time limit as squeue shows them

    @classmethod
    def parse(cls, line: str) -> tuple[Pending, str]:
        """One line of `squeue --format SQUEUE_FORMAT`; with the job's working folder."""
        job_id, partition, reason, comment, cpus, mem, limit, tres, workdir = line.split("|", 8)
        found = re.match(r"rule_(.+?)(?:_wildcards_.*)?$", comment)
        gpus = f", {tres}" if "gpu" in tres else ""
        asks = f"{_count(int(cpus), 'CPU')}, {mem} memory{gpus}, time limit {limit}"
        return cls(job_id, partition, reason, found.group(1) if found else comment, asks), workdir


def cannot_clear(reason: str, nodes: list[Node]) -> bool:
    """A PENDING reason no waiting clears; for a node reason, only while no node is up."""
    if reason.startswith(UNCLEARABLE):
        return True
    return reason.startswith(NODES_GONE) and not any(n.up for n in nodes)


def pending_message(job: Pending, nodes: list[Node]) -> str:
    where = [n for n in nodes if n.partition == job.partition]
    if job.reason.startswith("PartitionTimeLimit") and where and where[0].max_minutes is not None:
        fix = (f"partition {job.partition} allows {where[0].max_minutes} min: "
               f"--set-resources {job.rule}:runtime={where[0].max_minutes}, or another partition")
    elif job.reason.startswith(NODES_GONE) or not any(n.up for n in where):
        states = ", ".join(sorted({f"{n.name} {n.state}" for n in where})) or "no nodes"
        fix = (f"no node of partition {job.partition} is up ({states}): bring one back (scontrol "
               f"update nodename=NODE state=resume) or use another: --set-resources {job.rule}:slurm_partition=NAME")
    else:
        fix = (f"`scontrol show job {job.job_id}` says which limit; change the request with "
               f"--set-resources {job.rule}:... or --set-threads {job.rule}=N")
    return (f"SLURM job {job.job_id} (rule {job.rule}) cancelled: PENDING for '{job.reason}', which "
            f"waiting cannot clear; it asks {job.asks} on partition {job.partition}; {fix} ({FIX_DOCS})")


def pending_jobs(workdir: str) -> list[Pending]:
    """This user's PENDING jobs that run in `workdir` (this workflow's: the plugin's -D)."""
    out = subprocess.run(["squeue", "--me", "--noheader", "--states=PENDING", "--format", SQUEUE_FORMAT],
                         capture_output=True, text=True, timeout=60).stdout
    here = os.path.realpath(workdir)
    parsed = [Pending.parse(line) for line in out.splitlines() if line.count("|") >= 8]
    return [job for job, where in parsed if os.path.realpath(where) == here]


class PendingWatch(threading.Thread):
    """Every `poll_s`, cancel (scancel) each job of this workflow that has been PENDING for a
    reason that cannot clear for `grace_s` or longer, and `report` why in one line."""

    def __init__(self, workdir: str, report: Callable[[str], None], grace_s: float | None = None,
                 poll_s: float = 10.0) -> None:
        super().__init__(name="slurm-pending-watch", daemon=True)
        self.workdir, self.report, self.poll_s = workdir, report, poll_s
        self.grace_s = float(os.environ.get(GRACE_ENV, DEFAULT_GRACE_S)) if grace_s is None else grace_s
        self.first_seen: dict[str, float] = {}
        self.cancelled: list[str] = []
        self._stop_event = threading.Event()

    def check_once(self, now: float | None = None) -> list[str]:
        """One look at the queue; the messages of the jobs it cancelled."""
        now = time.monotonic() if now is None else now
        stuck, nodes = [], None
        for job in pending_jobs(self.workdir):
            nodes = cluster_nodes() if nodes is None else nodes
            where = [n for n in nodes if n.partition == job.partition]
            if not cannot_clear(job.reason, where):
                self.first_seen.pop(job.job_id, None)
                continue
            if now - self.first_seen.setdefault(job.job_id, now) >= self.grace_s and job.job_id not in self.cancelled:
                subprocess.run(["scancel", job.job_id], capture_output=True, timeout=60)
                self.cancelled.append(job.job_id)
                stuck.append(pending_message(job, nodes))
        for message in stuck:
            self.report(message)
        return stuck

    def run(self) -> None:
        while not self._stop_event.wait(self.poll_s):
            try:
                self.check_once()
            except (OSError, subprocess.SubprocessError, UserError, ValueError) as exc:
                self.report(f"the SLURM PENDING check could not read the queue this time ({exc}); it tries again")

    def stop(self) -> None:
        self._stop_event.set()
