"""One GPU per job on a GPU host, whoever runs the job: GPU jobs that Snakemake runs side by side
each take a GPU no other job holds (waiting while every one is held, on a one-GPU host too); a
multi-process training takes its N GPUs at once and gives its ranks exactly those.

A gpu=1 job (rule_runner) lists its GPUs through NVML, which starts no CUDA, takes a free one and
sets CUDA_VISIBLE_DEVICES to it before anything starts CUDA: torch and every library that picks
`cuda:0` itself (Data-Juicer's captioner) see exactly that GPU, as cuda:0.

A GPU is held by an exclusive flock on a file named after its UUID (one physical GPU whatever
CUDA_VISIBLE_DEVICES says). The lock goes with the process, so a killed job frees its GPU. Every
user of the host shares one folder, /tmp/kolors-story-gpu-locks (not $TMPDIR, which may be per
user or per job; KOLORS_STORY_GPU_LOCKS moves it for all users): sticky and world-writable like
/tmp, its files created 0666 whatever the umask and opened read-only (flock needs no more), so a
second user's jobs wait for the first user's GPUs instead of failing on a permission.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import logging
import os
import stat
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from kolors_story.errors import UserError

log = logging.getLogger(__name__)

LOCK_DIR_ENV = "KOLORS_STORY_GPU_LOCKS"
LOCK_DIR = Path("/tmp/kolors-story-gpu-locks")
SHARED_MODE = 0o1777  # like /tmp: everyone creates files, only a file's owner removes it
_HELD: dict[str, IO] = {}  # lock name -> open lock file this process holds (closing it frees the GPU)
_GIVEN: list[Gpu] | None = None  # the job's GPUs before use_free_gpu narrowed it to one

CUDA_SUCCESS = 0


@dataclass(frozen=True)
class Gpu:
    visible: str  # its CUDA_VISIBLE_DEVICES entry here: as the job was given it (SLURM's 5) or its UUID
    uuid: str  # NVML's GPU-...: its lock name, the same in every job and for every user

    @property
    def lock_name(self) -> str:
        return self.uuid


def nvml_gpus() -> list[str] | None:
    """UUIDs of the GPUs NVML shows, in NVML's (PCI bus) order, which is CUDA's for GPUs of one model
    or with CUDA_DEVICE_ORDER=PCI_BUS_ID (torch's NVML device count assumes the same). GPUs NVML may
    not open (a SLURM job's device cgroup) are left out, as CUDA leaves them out. None without the
    NVIDIA driver. Starts no CUDA, so CUDA_VISIBLE_DEVICES can still be set afterwards. Through
    nvidia-ml-py (NVIDIA's binding, in the GPU host's image and beside torch here)."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:  # no driver, or no libnvidia-ml
        return None
    try:
        uuids = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            try:
                uuid = pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(index))
            except pynvml.NVMLError_NoPermission:
                continue
            uuids.append(uuid.decode("ascii") if isinstance(uuid, bytes) else uuid)
        return uuids
    except pynvml.NVMLError as err:
        log.warning("NVML cannot list the GPUs (%s): GPU jobs are not kept apart", err)
        return None
    finally:
        pynvml.nvmlShutdown()


def host_gpus() -> list[Gpu]:
    """This process's GPUs in CUDA's order (CUDA_VISIBLE_DEVICES applied as CUDA and torch parse it:
    up to the first entry that names no GPU, none if one is named twice); [] without NVIDIA GPUs."""
    uuids = nvml_gpus()
    if not uuids:
        return []
    given = os.environ.get("CUDA_VISIBLE_DEVICES")
    if given is None:
        return [Gpu(uuid, uuid) for uuid in uuids]
    gpus: list[Gpu] = []
    for entry in (e.strip() for e in given.split(",")):
        uuid = _resolve(entry, uuids)
        if uuid is None:
            break
        if any(g.uuid == uuid for g in gpus):
            return []  # a GPU named twice: CUDA shows none
        gpus.append(Gpu(entry, uuid))
    return gpus


def _resolve(entry: str, uuids: list[str]) -> str | None:
    """The UUID a CUDA_VISIBLE_DEVICES entry names: an index, a (prefix of a) GPU- UUID, or a MIG-
    slice (a device of its own, locked by its own name)."""
    if entry.isdigit():
        return uuids[int(entry)] if int(entry) < len(uuids) else None
    if entry.startswith("MIG-"):
        return entry
    matches = [u for u in uuids if u.startswith(entry)] if entry.startswith("GPU-") else []
    return matches[0] if len(matches) == 1 else None


def host_has_gpu() -> bool:
    """Whether this host shows this process an NVIDIA GPU (profiles/default asks, to cap GPU jobs)."""
    return bool(host_gpus())


def lock_folder() -> Path:
    return Path(os.environ.get(LOCK_DIR_ENV) or LOCK_DIR)


def shared_folder(path: Path) -> Path:
    """`path`, made if missing, as a folder in which every user's jobs can create lock files."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except PermissionError as err:
        raise UserError(_no_access_message(path, path, err)) from err
    info = path.stat()
    if info.st_uid == os.geteuid() and stat.S_IMODE(info.st_mode) != SHARED_MODE:
        os.chmod(path, SHARED_MODE)  # mkdir's mode is cut by the umask
    return path


def _open_lock(folder: Path, name: str) -> IO:
    """GPU `name`'s lock file, opened read-only (enough for flock); created 0666 if missing."""
    path = folder / f"{name}.lock"
    flags = os.O_RDONLY | os.O_NOFOLLOW
    try:
        while True:
            try:  # no O_CREAT here: fs.protected_regular refuses it on another user's file in /tmp
                return open(os.open(path, flags), "rb", buffering=0)
            except FileNotFoundError:
                pass
            try:
                fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                continue  # another job created it just now: open theirs
            os.fchmod(fd, 0o666)  # the umask cut the create mode: other users open it too
            return open(fd, "rb", buffering=0)
    except PermissionError as err:
        raise UserError(_no_access_message(folder, path, err)) from err


def _no_access_message(folder: Path, path: Path, err: OSError) -> str:
    try:
        owner = f"uid {folder.stat().st_uid}"
    except OSError:
        owner = "its owner"
    return (f"cannot open the GPU lock {path} ({err.strerror}): the GPU jobs of every user of this host "
            f"share {folder}, which must be world-writable and sticky. Ask {owner} or root to run "
            f"`chmod 1777 {folder}; chmod 666 {folder}/*.lock`, or set {LOCK_DIR_ENV} to another folder, "
            "the same for every user of this host.")


def claim_slot(names: list[str], lock_dir: Path | None = None, poll_s: float = 0.5) -> tuple[int, IO]:
    """Index of the first of `names` no other holder has locked, and the open file that holds it.
    Waits while every one is taken (more parallel GPU jobs than GPUs)."""
    indices, handles = claim_slots(names, 1, lock_dir, poll_s)
    return indices[0], handles[0]


def claim_slots(
    names: list[str], n: int, lock_dir: Path | None = None, poll_s: float = 0.5
) -> tuple[list[int], list[IO]]:
    """Indices of n of `names` that no other holder has locked, and their open lock files; waits
    (holding none) until n are free at once, so two multi-GPU jobs never deadlock on half each."""
    if n > len(names):
        raise ValueError(f"{n} GPUs asked for, {len(names)} visible")
    if n <= 0:
        return [], []
    folder = shared_folder(Path(lock_dir or lock_folder()))  # looked up per call (tests move it)
    started = time.monotonic()
    waited = False
    while True:
        held: list[tuple[int, IO]] = []
        for index, name in enumerate(names):
            handle = _open_lock(folder, name)
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held.append((index, handle))
            except BlockingIOError:
                handle.close()
            if len(held) == n:
                if waited:
                    log.info("GPU free after waiting %.0f s", time.monotonic() - started)
                return [i for i, _ in held], [h for _, h in held]
        for _, handle in held:
            handle.close()
        if not waited:
            log.info("waiting for %d of %d GPU(s): other jobs (any user's) hold them; locks in %s",
                     n, len(names), folder)
            waited = True
        time.sleep(poll_s)


def job_gpus() -> list[Gpu]:
    """The GPUs this job was given: all of them, also after use_free_gpu narrowed it to one."""
    return list(_GIVEN) if _GIVEN is not None else host_gpus()


@contextlib.contextmanager
def hold_free_gpus(n: int) -> Iterator[str | None]:
    """Hold n GPUs no other job holds while the block runs (a multi-process training's ranks) and
    yield the CUDA_VISIBLE_DEVICES value that gives its children exactly those; None without GPUs.
    A GPU this process already holds (use_free_gpu's, when Snakemake capped the job's gpu=N at
    --resources gpu=1) counts as one of them: locking it again would wait on ourselves."""
    gpus = job_gpus()
    if not gpus:
        yield None
        return
    mine = [i for i, gpu in enumerate(gpus) if gpu.lock_name in _HELD][:n]
    others = [i for i in range(len(gpus)) if i not in mine]
    picked, handles = claim_slots([gpus[i].lock_name for i in others], n - len(mine))
    try:
        chosen = ",".join(gpus[i].visible for i in sorted(mine + [others[j] for j in picked]))
        log.info("training processes get GPUs %s (CUDA_VISIBLE_DEVICES), free of other jobs", chosen)
        yield chosen
    finally:
        for handle in handles:
            handle.close()


def use_free_gpu() -> Gpu | None:
    """Hold a GPU no other job holds (waiting while all are held, the only one included) and make it
    this process's only GPU: CUDA_VISIBLE_DEVICES names it, so `cuda` and `cuda:0` mean it in torch
    and in every library of the job. None on a host without GPUs (the job runs on the CPU)."""
    global _GIVEN
    gpus = host_gpus()
    if not gpus:
        return None
    index, handle = claim_slot([gpu.lock_name for gpu in gpus])
    gpu = gpus[index]
    _HELD[gpu.lock_name] = handle
    _GIVEN = gpus
    if _cuda_started():  # too late to narrow what CUDA shows: at least torch's default device
        import torch

        torch.cuda.set_device(index)
        log.warning("CUDA was started before the GPU claim: libraries that pick cuda:0 themselves may "
                    "land on another job's GPU")
    else:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu.visible
    log.info("this job's GPU: %s (%d of %d visible), free of other jobs; CUDA_VISIBLE_DEVICES=%s, so "
             "cuda:0 is that GPU", gpu.uuid, index + 1, len(gpus), gpu.visible)
    return gpu


def _cuda_started() -> bool:
    """Whether this process has started CUDA, after which CUDA_VISIBLE_DEVICES is no longer read:
    torch's own start, or any library's (torch.cuda.is_available() alone starts the driver). The
    driver answers cuDeviceGetCount with CUDA_ERROR_NOT_INITIALIZED until cuInit, and starts nothing."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        return True
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return driver.cuDeviceGetCount(ctypes.byref(ctypes.c_int())) == CUDA_SUCCESS
