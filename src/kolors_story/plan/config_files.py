"""Config files read strictly: a YAML syntax error names the file, line and column, and a key given
twice in one mapping is refused naming both lines (PyYAML, and so Snakemake, keeps the last one
without a word: `steps: 10` then `steps: 30` trains 30 steps).

The Snakefile reads config.yaml and every --configfile with this before it uses them. Snakemake
parses --configfile files itself before the Snakefile runs and drops the YAML error's position
("Config file is not valid JSON or YAML"); this command finds it:

    kolors-story-check-config demo/config.yaml demo/sweep.yaml     # or: make check-config CONFIGS="..."
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

from kolors_story.errors import UserError


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key repeated within one mapping."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if key in seen:
            raise UserError(f"{loader.name}, line {line}, column {key_node.start_mark.column + 1}: key "
                            f"{key!r} is given twice in one mapping (first on line {seen[key]}); YAML keeps "
                            "only the last one, so delete the one you do not mean.")
        seen[key] = line
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_strict(path: Path) -> Any:
    """A YAML (or JSON) config file's data; UserError naming the file, line and column."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UserError(f"config file {path}: cannot be read ({exc.strerror}).") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"config file {path}: not UTF-8 text (byte {exc.start}); save it as UTF-8.") from None
    loader = _StrictLoader(text)
    loader.name = str(path)
    try:
        return loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "somewhere"
        problem = " ".join(p for p in (exc.context, exc.problem) if p)
        raise UserError(f"{path}, {where}: not valid YAML: {problem}. Fix the file there "
                        "(indentation, a missing ':' or an unclosed quote or bracket).") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML: {exc}") from None
    finally:
        loader.dispose()


def check_files(paths: list[Path]) -> None:
    """Every file parsed strictly; the first problem raises UserError. A file that is not there is
    left to Snakemake, whose own message names it."""
    for path in map(Path, paths):
        if path.is_file():
            data = load_strict(path)
            if data is not None and not isinstance(data, dict):
                raise UserError(f"config file {path}: holds a {type(data).__name__}, not a mapping of "
                                "config keys (e.g. `train:` on its own line, then its keys indented).")


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="*", default=["config.yaml"], help="config files (default: config.yaml)")
    paths = parser.parse_args(argv).paths
    try:
        check_files([Path(p) for p in paths])
    except UserError as err:
        print(err, file=sys.stderr)
        return 1
    print(f"{len(paths)} config file(s) read strictly: no syntax error, no key given twice")
    return 0


if __name__ == "__main__":
    sys.exit(main())
