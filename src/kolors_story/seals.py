"""Seals: the digest and size of an artifact, written beside it by the job that made it, checked by
every job that uses it. Snakemake compares times, never contents, so a file that was cut, flipped
or replaced after its job would otherwise travel on into the bundle and the upload.

A seal is `<artifact>.seal.json` in a hidden `.seals/` tree beside the top folder, mirroring the
artifact's path: `results/demo/scenes/s1.png` is sealed in `results/.seals/demo/scenes/s1.png.seal.json`
(a folder's seal lists each file). Output folders stay exactly as their jobs wrote them: the
challenge's evaluate() opens every file of the scenes folder, and a bundle folder is uploaded whole.
An artifact outside the working folder is sealed in `.seals/` beside it. A
consumer that finds a seal checks size and sha256 and fails with one line naming the file, what is
wrong and the command that remakes it; a `.safetensors` file is also checked for a readable header
and a data section as long as the header says, seal or not (a LoRA the user brings has none).

A large file is hashed once, not by every job that reads it (eight scene jobs, one 2.6 GB
anchor): a check that found its sha256 right records the file's identity (device, inode, size,
mtime and ctime in ns) beside its seal (`<artifact>.checked.json`), and a later check that finds
the same identity trusts that hash. Any write, truncation or replacement changes the identity:
the kernel sets ctime to the time of the change, and nothing can set it back. A file changed
within seconds before its check is not recorded (a coarse clock could give two changes one ctime).

    kolors-story-check-seals results/     # check every seal under a folder (python -m kolors_story.seals)
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from kolors_story.errors import UserError
from kolors_story.files import NotSafetensors, read_safetensors_header, sha256_file, write_json

SUFFIX = ".seal.json"
CHECKED_SUFFIX = ".checked.json"  # beside a seal: the identity of the file last found matching it
CHECKED_MIN_BYTES = 64 << 20  # smaller files are hashed every time (cheaper than the record)
SETTLED_S = 2.0  # a file changed more recently than this is hashed every time
STORE = ".seals"
FORMAT = 1


class DamagedArtifact(UserError):
    """An artifact that is not what its job wrote: the message names it, the damage and the fix."""


def seal_path(path: Path) -> Path:
    """Where the seal of `path` lives: `TOP/.seals/REST.seal.json` for `TOP/REST` under the
    working folder, `PARENT/.seals/NAME.seal.json` otherwise. Relative stays relative."""
    path = Path(path)
    try:
        rel = Path(os.path.abspath(path)).relative_to(Path.cwd())
    except ValueError:
        rel = None
    if rel is None or len(rel.parts) < 2:
        return path.parent / STORE / f"{path.name}{SUFFIX}"
    top = Path.cwd() / rel.parts[0] if path.is_absolute() else Path(rel.parts[0])
    return top / STORE / Path(*rel.parts[1:-1]) / f"{rel.name}{SUFFIX}"


def sealed_artifact(seal: Path) -> Path:
    """The artifact a seal file stands for (the inverse of seal_path)."""
    parts = Path(seal).parts
    at = len(parts) - 1 - parts[::-1].index(STORE)
    return Path(*parts[:at], *parts[at + 1:-1], parts[-1][:-len(SUFFIX)])


def _entry(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


IGNORED = {".snakemake_timestamp"}  # Snakemake's own mark in a directory() output, added after the job


def _folder_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and STORE not in p.relative_to(folder).parts and p.name not in IGNORED)


def seal(path: Path, rule: str) -> Path:
    """Write the seal of a file or folder the rule `rule` just made; returns the seal's path."""
    path = Path(path)
    record: dict[str, Any] = {"format": FORMAT, "rule": rule}
    if path.is_dir():
        record["files"] = {p.relative_to(path).as_posix(): _entry(p) for p in _folder_files(path)}
    else:
        record.update(_entry(path))
    return write_json(record, seal_path(path), sort_keys=True)


def remake_hint(path: Path, rule: str | None) -> str:
    made_by = f" (made by rule {rule})" if rule else ""
    return (f"remake it{made_by}: snakemake -R {path} <your usual options>, or delete it and rerun "
            "(see docs/troubleshooting.md, 'damaged artifact')")


def _damage(path: Path, recorded: dict[str, Any]) -> str | None:
    """What is wrong with one file against its seal entry, or None when it matches."""
    if not path.is_file():
        return "missing"
    size, want = path.stat().st_size, recorded["bytes"]
    if size < want:
        return f"truncated: {size} of {want} bytes"
    if size > want:
        return f"changed since its job: {size} bytes, {want} recorded"
    if not _sha256_matches(path, recorded["sha256"]):
        return "changed since its job: its sha256 is not the one recorded (a flipped or replaced byte)"
    return None


def file_identity(path: Path) -> list[int]:
    """Device, inode, size, mtime and ctime (ns): any write, truncation or replacement changes it."""
    st = path.stat()
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _sha256_matches(path: Path, want: str) -> bool:
    """Whether the file's sha256 is `want`, hashing it only if it is not the very file a check
    found right before (see the module's docstring)."""
    checked = seal_path(path).with_name(path.name + CHECKED_SUFFIX)
    identity, started = file_identity(path), time.time()
    record = {"sha256": want, "identity": identity}
    try:
        if json.loads(checked.read_text(encoding="utf-8")) == record:
            return True
    except (OSError, ValueError):
        pass
    if sha256_file(path) != want:
        return False
    settled = started - identity[4] / 1e9 >= SETTLED_S
    if identity[2] >= CHECKED_MIN_BYTES and settled and file_identity(path) == identity:
        try:
            tmp = checked.with_name(f".{checked.name}.{socket.gethostname()}-{os.getpid()}.tmp")
            write_json(record, tmp)
            os.replace(tmp, checked)  # jobs checking at once each write a whole record
        except OSError:
            pass  # a read-only results folder: the next check hashes again
    return True


def _folder_damage(folder: Path, files: dict[str, dict[str, Any]]) -> str | None:
    for name, recorded in sorted(files.items()):
        if problem := _damage(folder / name, recorded):
            return f"{name}: {problem}"
    extra = sorted(set(p.relative_to(folder).as_posix() for p in _folder_files(folder)) - set(files))
    return f"{extra[0]}: not written by its job (added or renamed since)" if extra else None


def safetensors_damage(path: Path) -> str | None:
    """Why a file is not a complete safetensors file, or None: an 8-byte header length, a JSON
    header, and data exactly as long as the header's largest offset."""
    size = path.stat().st_size
    try:
        end = read_safetensors_header(path).data_end()
    except NotSafetensors as exc:
        return f"not a safetensors file: {exc}"
    except (KeyError, TypeError, IndexError) as exc:  # a tensor entry without data_offsets
        return f"not a safetensors file: unreadable header ({type(exc).__name__})"
    if end != size:
        return f"truncated: {size} bytes, its header says {end}"
    return None


def verify(path: Path) -> None:
    """Check an artifact against its seal (if it has one) and a .safetensors file's structure;
    raise DamagedArtifact naming the file, the damage and how to remake it."""
    path = Path(path)
    record = read_seal(path)
    problem = None
    if record is not None:
        problem = _folder_damage(path, record["files"]) if "files" in record else _damage(path, record)
    if problem is None and path.is_file() and path.suffix == ".safetensors":
        problem = safetensors_damage(path)
    if problem:
        rule = record.get("rule") if record else None
        raise DamagedArtifact(f"{path}: {problem}; {remake_hint(path, rule)}")


def read_seal(path: Path) -> dict[str, Any] | None:
    sealed = seal_path(path)
    if not sealed.is_file():
        return None
    try:
        record = json.loads(sealed.read_text(encoding="utf-8"))
        if record.get("format") != FORMAT:
            raise ValueError(f"format {record.get('format')!r}")
        return record
    except ValueError as exc:
        raise DamagedArtifact(f"{sealed}: unreadable seal ({exc}); {remake_hint(path, None)}") from None


def sealed_under(root: Path) -> list[Path]:
    """Every artifact under `root` that has a seal: from the .seals trees inside it and from the
    one that mirrors it (results/demo's seals are in results/.seals/demo)."""
    root = Path(root)
    bases = [root, seal_path(root).with_name(root.name)] if root.name else [root]
    found = {sealed_artifact(s) for base in bases if base.is_dir()
             for s in base.rglob(f"*{SUFFIX}") if STORE in s.parts}
    return sorted(a for a in found if Path(os.path.abspath(a)).is_relative_to(os.path.abspath(root)))


def verify_all(root: Path) -> list[str]:
    """Every sealed artifact under `root` checked; the problems, one line each."""
    problems = []
    for artifact in sealed_under(root):
        try:
            verify(artifact)
        except DamagedArtifact as err:
            problems.append(str(err))
    return problems


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="*", default=["results"], help="where to check every seal (default: results)")
    roots = parser.parse_args(argv).folders
    problems = [p for root in roots for p in verify_all(Path(root))]
    for line in problems:
        print(line, file=sys.stderr)
    count = sum(len(sealed_under(Path(root))) for root in roots)
    print(f"{count} sealed artifact(s) checked, {len(problems)} damaged")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
