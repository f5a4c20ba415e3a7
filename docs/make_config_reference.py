"""Write docs/config-reference.md from schemas/config.schema.yaml, the one place a key is described.

    python docs/make_config_reference.py           # rewrite the page
    python docs/make_config_reference.py --check   # exit 1 when the page is not current (tests do this)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "schemas" / "config.schema.yaml"
PAGE = ROOT / "docs" / "config-reference.md"
HEADER = """# Configuration keys

Generated from `schemas/config.schema.yaml` by `python docs/make_config_reference.py`; edit the
schema, not this page (a test checks that the two agree). How to use the keys:
[configuration.md](configuration.md).

"""


def kind(node: dict) -> str:
    if "enum" in node:
        return " \\| ".join(f"`{json.dumps(v, ensure_ascii=False)}`" for v in node["enum"])
    types = node.get("type", "")
    types = types if isinstance(types, list) else [types]
    if "anyOf" in node or "oneOf" in node:
        types = [kind(n) for n in node.get("anyOf", node.get("oneOf", []))]
    text = " or ".join(t for t in types if t)
    limits = [f"{word} {node[key]}" for key, word in (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="),
                                                       ("exclusiveMaximum", "<"), ("multipleOf", "a multiple of"),
                                                       ("minItems", "items >="), ("maxLength", "length <=")) if key in node]
    return ", ".join([text, *limits]) if limits else text


def cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def rows(node: dict, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, description) of every key under `node`, depth first in schema order."""
    out = []
    for name, child in node.get("properties", {}).items():
        key = f"{prefix}{name}"
        default = f"`{json.dumps(child['default'], ensure_ascii=False)}`" if "default" in child else ""
        out.append((f"`{key}`", kind(child), default, cell(child.get("description", ""))))
        out += rows(child, f"{key}.")
        items = child.get("items")
        if isinstance(items, dict) and "properties" in items:
            out += rows(items, f"{key}[].")
    return out


def page() -> str:
    schema = yaml.safe_load(SCHEMA.read_text(encoding="utf-8"))
    table = ["| key | type | default | what it does |", "|---|---|---|---|"]
    table += [f"| {k} | {cell(t)} | {cell(d)} | {desc} |" for k, t, d, desc in rows(schema)]
    return HEADER + "\n".join(table) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when the page is stale")
    args = parser.parse_args(argv)
    text = page()
    if args.check:
        current = PAGE.is_file() and PAGE.read_text(encoding="utf-8") == text
        if not current:
            print(f"{PAGE.relative_to(ROOT)} is not current: run python docs/make_config_reference.py", file=sys.stderr)
        return 0 if current else 1
    PAGE.write_text(text, encoding="utf-8")
    print(f"wrote {PAGE.relative_to(ROOT)} ({len(text.splitlines())} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
