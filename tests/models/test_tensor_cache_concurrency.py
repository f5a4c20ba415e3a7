"""Two processes filling one cache entry at once (two SLURM jobs on a shared cache) leave one
valid file and no temporary files, also when their host and PID are the same (PIDs repeat across
the nodes of a cluster)."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pytest
import torch

from kolors_story.models import tensor_cache
from kolors_story.models.tensor_cache import TensorCache

KEY = TensorCache.key("one entry", "both processes")
ROUNDS = 20
SIZE = 1 << 18  # 1 MiB a write


def _writer(root: str, value: float, barrier, same_writer_id: bool) -> None:
    torch.set_num_threads(1)
    if same_writer_id:  # what two jobs on two nodes with one PID would look like
        tensor_cache._writer_id = lambda: "node-4242"
    real_save = tensor_cache.save_file

    def slow_save(tensors, path):  # a shared filesystem's latency: the writers' steps interleave
        real_save(tensors, path)
        time.sleep(0.01)

    tensor_cache.save_file = slow_save
    cache = TensorCache(Path(root))
    barrier.wait()
    for _ in range(ROUNDS):
        cache.put(KEY, {"x": torch.full((SIZE,), value)})
        loaded = cache.get(KEY)  # whichever writer renamed last: complete either way
        assert loaded is not None and loaded["x"].shape == (SIZE,)
        assert torch.unique(loaded["x"]).tolist() in ([1.0], [2.0])


@pytest.mark.parametrize("same_writer_id", [False, True], ids=["own-pids", "colliding-pids"])
def test_two_processes_racing_on_one_key_leave_one_valid_file(tmp_path, same_writer_id):
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), value, barrier, same_writer_id)) for value in (1.0, 2.0)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]

    left = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert left == [f"{KEY[:2]}/{KEY}.safetensors"]  # no temporary file left behind
    entry = TensorCache(tmp_path).get(KEY)
    assert torch.unique(entry["x"]).tolist() in ([1.0], [2.0])


def test_temporary_names_differ_for_one_host_and_pid(tmp_path, monkeypatch):
    """The random part alone keeps two writers with one host and PID apart; a failed write
    removes its temporary file."""
    monkeypatch.setattr(tensor_cache, "_writer_id", lambda: "node-4242")
    seen = []
    real_save = tensor_cache.save_file

    def save_and_note(tensors, path):
        seen.append(Path(path).name)
        real_save(tensors, path)

    monkeypatch.setattr(tensor_cache, "save_file", save_and_note)
    cache = TensorCache(tmp_path)
    cache.put(KEY, {"x": torch.zeros(2)})
    cache.put(KEY, {"x": torch.ones(2)})
    assert len(set(seen)) == 2 and all("node-4242" in name for name in seen)

    def fail(tensors, path):
        Path(path).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(tensor_cache, "save_file", fail)
    with pytest.raises(OSError):
        cache.put(KEY, {"x": torch.zeros(2)})
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == [f"{KEY}.safetensors"]
    assert torch.equal(cache.get(KEY)["x"], torch.ones(2))
