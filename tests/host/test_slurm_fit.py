"""kolors_story.host.slurm_fit on the lines SLURM 22.05 printed on the test cluster (sinfo, squeue):
a request no node can meet is refused with the flags that fit, and the PENDING reasons that cannot
clear are told from those that can. The live cluster runs the same code in tests/slurm."""

from __future__ import annotations

import pytest

from kolors_story.errors import UserError
from kolors_story.host import slurm_fit
from kolors_story.host.slurm_fit import Node, Pending, Request

# `sinfo --noheader --Node --format "%N|%P|%c|%m|%G|%t|%l"` on the test cluster, and on a cluster
# with a GPU partition (GRES with a type and sockets) and a short partition
SINFO = """vm|debug*|2|24151|gpu:2|idle|infinite
gpu01|gpu|32|256000|gpu:a100:4(S:0-1)|mix|2-00:00:00
gpu02|gpu|32|512000+|gpu:a100:8,shard:8|drain|2-00:00:00
cpu01|short|64|128000|(null)|idle|30:00
"""
# `squeue --me --noheader --states=PENDING --format "%i|%P|%r|%k|%C|%m|%l|%b|%Z"`
TIME_LIMIT = "1|debug|PartitionTimeLimit|rule_train_lora_wildcards_key=abc|2|64000M|1:00:00|gres/gpu:1|/work/run"
DRAINED = ("2|debug|Nodes required for job are DOWN, DRAINED or reserved for jobs in higher priority partitions"
           "|rule_filter_dataset|1|8000M|1:00:00|N/A|/work/run")


def test_sinfo_lines_become_nodes():
    vm, gpu01, gpu02, cpu01 = slurm_fit.parse_sinfo(SINFO)
    assert vm == Node("vm", "debug", 2, 24151, 2, "idle", None, default=True)
    assert (gpu01.gpus, gpu01.max_minutes, gpu01.up) == (4, 2880, True)
    assert (gpu02.mem_mb, gpu02.gpus, gpu02.up) == (512000, 8, False)
    assert (cpu01.gpus, cpu01.max_minutes, cpu01.default) == (0, 30, False)


@pytest.mark.parametrize("limit,minutes", [("infinite", None), ("30", 30), ("30:00", 30), ("1:00:00", 60),
                                           ("2-00:00:00", 2880), ("0:30:30", 31)])
def test_slurm_time_limits_in_minutes(limit, minutes):
    assert slurm_fit._minutes(limit) == minutes


def test_a_rule_no_node_can_run_is_refused_with_the_flags_that_fit():
    nodes = slurm_fit.parse_sinfo(SINFO)
    requests = [Request("train_lora", 8, 64000, 1, None), Request("generate_scene", 4, 48000, 1, None),
                Request("generate_scene", 4, 16000, 1, None), Request("score_images", 1, 4000, 0, None),
                Request("render_anchor", 4, 48000, 1, "gpu"), Request("encode_texts", 4, 32000, 1, "nope")]
    with pytest.raises(UserError) as err:
        slurm_fit.check_requests(requests, nodes)
    lines = str(err.value).splitlines()
    assert lines[0] == "SLURM cannot run these jobs, nothing was submitted:"
    assert lines[1] == ("  rule encode_texts asks for partition nope, which sinfo does not list (partitions: "
                        "debug, gpu, short); set one: --set-resources encode_texts:slurm_partition=NAME")
    assert "rule generate_scene asks 4 CPUs, 48000 MB, 1 GPU" in lines[2]  # the largest of the rule's jobs
    assert lines[3] == ("  rule train_lora asks 8 CPUs, 64000 MB, 1 GPU on the default partition; no node there "
                        "offers that, the largest (vm) has 2 CPUs, 24151 MB, 2 GPUs; make it fit: "
                        "--set-threads train_lora=2 --set-resources train_lora:mem_mb=24151")
    assert len(lines) == 5  # score_images and the gpu partition fit
    assert "replaces the profile's whole list" in lines[4] and "docs/cluster.md" in lines[4]
    # what the message says, done: every request fits
    fitted = [Request("train_lora", 2, 24151, 1, None), Request("generate_scene", 2, 24151, 1, None)]
    slurm_fit.check_requests(fitted, nodes)


def test_too_many_gpus_names_the_gpu_resource():
    node = slurm_fit.parse_sinfo(SINFO)[0]
    assert slurm_fit.fix_flags(Request("train_lora", 2, 1000, 4, None), node) == "--set-resources train_lora:gpu=2"


def test_pending_reasons_that_cannot_clear():
    nodes = slurm_fit.parse_sinfo(SINFO)
    debug, gpu_nodes = nodes[:1], nodes[1:3]
    time_limit, _ = Pending.parse(TIME_LIMIT)
    drained, workdir = Pending.parse(DRAINED)
    assert (time_limit.rule, drained.rule, workdir) == ("train_lora", "filter_dataset", "/work/run")
    assert slurm_fit.cannot_clear(time_limit.reason, debug)
    assert not slurm_fit.cannot_clear(drained.reason, debug)  # vm is up: a node reason can clear
    assert slurm_fit.cannot_clear(drained.reason, [nodes[2]])  # the only node drained
    assert not slurm_fit.cannot_clear(drained.reason, gpu_nodes)  # one of two is up
    for reason in ("Resources", "Priority", "Dependency", "QOSGrpCpuLimit", "BeginTime"):
        assert not slurm_fit.cannot_clear(reason, [nodes[2]]), reason


def test_the_pending_message_names_the_job_the_rule_and_the_fix():
    short = Node("vm", "debug", 2, 24151, 2, "idle", 1, default=True)
    time_limit, _ = Pending.parse(TIME_LIMIT)
    assert slurm_fit.pending_message(time_limit, [short]) == (
        "SLURM job 1 (rule train_lora) cancelled: PENDING for 'PartitionTimeLimit', which waiting cannot clear; "
        "it asks 2 CPUs, 64000M memory, gres/gpu:1, time limit 1:00:00 on partition debug; partition debug "
        "allows 1 min: --set-resources train_lora:runtime=1, or another partition "
        "(see docs/cluster.md, 'Jobs that no node can run')")
    drained, _ = Pending.parse(DRAINED)
    message = slurm_fit.pending_message(drained, [Node("vm", "debug", 2, 24151, 2, "drain", None)])
    assert "no node of partition debug is up (vm drain)" in message
    assert "--set-resources filter_dataset:slurm_partition=NAME" in message
