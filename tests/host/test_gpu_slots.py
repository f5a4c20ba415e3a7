"""GPU slots for parallel GPU jobs: the lock logic (the CUDA side needs a multi-GPU host)."""

import threading
import time

from kolors_story.host.gpu_slots import claim_slot, use_free_gpu


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


def test_fewer_than_two_gpus_leave_the_device_alone():
    assert use_free_gpu() is None  # this machine has no GPU
