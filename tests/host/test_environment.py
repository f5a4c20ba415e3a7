"""The environment itself: pip's view of it, the extras we ask for, and what the dataset download imports.

A broken environment should fail here, in CI, not on a user's first `dataset.source: modelscope`
run (MsDataset.load imports oss2 only when a legacy-format dataset is downloaded).
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]

# Module -> distribution, for every third-party module modelscope 1.40.2's MsDataset.load imports
# (modelscope/msdatasets/**, read along both branches of MsDataset.load):
#   current format (type 4, utils/hf_datasets_util.py, utils/_module_factories.py): datasets,
#     huggingface_hub, fsspec, requests; datasets.data_files lazily in download/dataset_builder.py;
#   legacy format (data_loader/data_loader.py -> data_files_manager -> download/dataset_builder.py
#     -> utils/oss_utils.py): pandas, pyarrow, filelock, and oss2 imported inside the functions
#     that download (so a missing oss2 shows only mid-download);
#   both: numpy (ms_dataset.py), addict (modelscope.utils.config), packaging, tqdm;
#   pillow decodes the images the rows are saved from.
DATASET_MODULES = {
    "datasets": "datasets",
    "datasets.data_files": "datasets",
    "huggingface_hub": "huggingface-hub",
    "fsspec": "fsspec",
    "requests": "requests",
    "pandas": "pandas",
    "pyarrow": "pyarrow",
    "filelock": "filelock",
    "oss2": "oss2",
    "oss2.credentials": "oss2",
    "numpy": "numpy",
    "addict": "addict",
    "packaging": "packaging",
    "tqdm": "tqdm",
    "PIL.Image": "pillow",
}

# The modelscope modules on the two branches; importing them runs their top-level imports.
MODELSCOPE_DATASET_CODE = [
    "modelscope.msdatasets.ms_dataset",
    "modelscope.msdatasets.utils.hf_datasets_util",
    "modelscope.msdatasets.data_loader.data_loader_manager",
    "modelscope.msdatasets.data_loader.data_loader",
    "modelscope.msdatasets.data_files.data_files_manager",
    "modelscope.msdatasets.download.dataset_builder",
    "modelscope.msdatasets.utils.oss_utils",
]


def _requirement_lines(path: Path) -> list[Requirement]:
    requirements = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            requirements.append(Requirement(line))
    return requirements


def _names(path: Path) -> set[str]:
    return {canonicalize_name(req.name) for req in _requirement_lines(path)}


def _installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def test_pip_check_is_clean():
    """pip's own consistency check of this interpreter's environment (every declared range holds)."""
    result = subprocess.run(
        [sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=300, check=False
    )
    output = "\n".join(
        line for line in (result.stdout + result.stderr).splitlines() if not line.startswith("WARNING: Location")
    )
    assert result.returncode == 0, (
        f"`{sys.executable} -m pip check` failed:\n{output}\n"
        "Fix requirements.txt/constraints.txt, then `pip install -r requirements.txt -c constraints.txt`."
    )


def test_requested_extras_hold():
    """pip check ignores extras; the ones requirements.txt asks for (modelscope[datasets]) must hold too."""
    problems = []
    for req in _requirement_lines(ROOT / "requirements.txt"):
        for extra in sorted(req.extras):
            for dep in map(Requirement, metadata.requires(req.name) or []):
                if dep.marker is None or not dep.marker.evaluate({"extra": extra}):
                    continue  # a base requirement (pip check's job) or another extra
                installed = _installed_version(dep.name)
                if installed is None:
                    problems.append(f"{req.name}[{extra}] requires {dep.name}{dep.specifier}, which is not installed")
                elif not dep.specifier.contains(installed, prereleases=True):
                    problems.append(f"{req.name}[{extra}] requires {dep.name}{dep.specifier}, but {installed} is installed")
    assert not problems, "\n".join(problems)


def test_requirements_hold_in_this_environment():
    """Each line of requirements.txt is installed in a version it allows (catches a stale venv)."""
    problems = []
    for req in _requirement_lines(ROOT / "requirements.txt"):
        installed = _installed_version(req.name)
        if installed is None:
            problems.append(f"{req} is not installed")
        elif not req.specifier.contains(installed, prereleases=True):
            problems.append(f"{req} is required, {installed} is installed")
    assert not problems, "\n".join(problems) + "\nRun `make env`."


def test_constraints_satisfy_requirements():
    """The pinned set (constraints.txt) lies inside every range requirements.txt states."""
    pins = {}
    for req in _requirement_lines(ROOT / "constraints.txt"):
        (spec,) = req.specifier
        assert spec.operator == "==", f"constraints.txt pins with ==, not {req}"
        pins[canonicalize_name(req.name)] = spec.version
    problems = []
    for req in _requirement_lines(ROOT / "requirements.txt"):
        pinned = pins.get(canonicalize_name(req.name))
        if pinned is None:
            problems.append(f"{req.name} is not pinned in constraints.txt")
        elif not req.specifier.contains(pinned, prereleases=True):
            problems.append(f"requirements.txt asks for {req}, constraints.txt pins {pinned}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("module", sorted(DATASET_MODULES))
def test_dataset_download_module_imports_and_is_declared(module):
    importlib.import_module(module)
    distribution = canonicalize_name(DATASET_MODULES[module])
    assert distribution in _names(ROOT / "requirements.txt"), f"{distribution} (for {module}) is not in requirements.txt"
    assert distribution in _names(ROOT / "constraints.txt"), f"{distribution} (for {module}) is not pinned in constraints.txt"


@pytest.mark.parametrize("module", MODELSCOPE_DATASET_CODE)
def test_modelscope_dataset_code_imports(module):
    importlib.import_module(module)


def test_oss2_has_what_the_legacy_download_calls():
    """modelscope/msdatasets/utils/oss_utils.py builds a credentials provider and a V4-signed bucket."""
    import oss2
    from modelscope.msdatasets.utils.oss_utils import _create_credential_provider

    for name in ("ProviderAuthV4", "Bucket", "ResumableDownloadStore", "ResumableStore", "resumable_download"):
        assert hasattr(oss2, name), f"oss2 {oss2.__version__} has no {name}"
    provider = _create_credential_provider(None, "lowres_anime", "AI-ModelScope", "master")  # no network call
    assert isinstance(provider, oss2.CredentialsProvider)
