"""`stgr list sources|annotators|stages|rules`: what a build can be made of, and how to pick each.

Sources and annotators are the config groups under conf/ (`source=vidstg`, `annotator=vllm`), each
described by its file's header comment, plus the registered adapters and backends that no config file
names (`source.adapter=...`, `annotator.backend=...`). Stages are the registry a DAG's `stage:` keys
name, with the node of the default DAG that uses each; rules are the filter's, with their own default
settings (`Rule.Config`). Listed from the registries themselves, so a plugin's stage or rule shows up
as soon as it is installed.
"""
from __future__ import annotations

import argparse
import textwrap
from pathlib import Path
from typing import Any, Callable

from omegaconf import OmegaConf

from pipeline.config import CONF_DIR

Row = tuple[str, str, str]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("list", help="list the sources, annotators, stages or filter rules a build can use",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=sorted(LISTS), help="what to list")
    p.set_defaults(func=handler)


def header_comment(path: Path) -> str:
    """The comment block at the top of a config file, as one line of text."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return " ".join(lines)


def first_sentence(text: str | None) -> str:
    text = " ".join((text or "").split())
    end = text.find(". ")
    return text if end < 0 else text[:end + 1]


def _group(group: str, key: str, registered: dict[str, Any], describe: Callable[[Any], str]) -> list[Row]:
    """The options of a config group, then the registered names that no option file selects."""
    rows, named = [], set()
    for path in sorted((CONF_DIR / group).glob("*.yaml")):
        config = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        named.add(config.get(key) if isinstance(config, dict) else None)
        rows.append((path.stem, f"{group}={path.stem}", first_sentence(header_comment(path))))
    for name in sorted(set(registered) - named):
        rows.append((name, f"{group}.{key}={name}", describe(registered[name])))
    return rows


def sources() -> list[Row]:
    from stages.sources import ADAPTERS

    return _group("source", "adapter", ADAPTERS.primary(), lambda cls: first_sentence(cls.__doc__))


def annotators() -> list[Row]:
    from stages.backends import BACKENDS

    return _group("annotator", "backend", BACKENDS.primary(), lambda cls: first_sentence(cls.__doc__))


def stages() -> list[Row]:
    from pipeline.registry import STAGES, load_plugins

    load_plugins()
    dag = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "build.yaml"), resolve=False).get("dag") or {}
    nodes: dict[str, list[str]] = {}
    for node, spec in dag.items():
        nodes.setdefault(spec.get("stage"), []).append(node)
    rows = []
    for name, cls in sorted(STAGES.items()):
        kind = "source" if cls.source else "actor pool" if cls.actor else "all input" if cls.needs_all_input else "task"
        where = f"node {', '.join(nodes[name])}" if name in nodes else "not in the default DAG"
        rows.append((name, f"{kind}; {where}", first_sentence(cls.__doc__)))
    return rows


def rules() -> list[Row]:
    from stages.lib.rules import RULES

    rows = []
    for name, cls in RULES.items():
        defaults = cls.Config()
        enabled, threshold = defaults.enabled, defaults.threshold
        if isinstance(threshold, dict):
            threshold = ", ".join(f"{task} {value}" for task, value in threshold.items())
        rows.append((name, f"{'on' if enabled else 'off'}, threshold {threshold}", cls.description))
    return rows


LISTS: dict[str, Callable[[], list[Row]]] = {"sources": sources, "annotators": annotators, "stages": stages,
                                             "rules": rules}
HEADERS: dict[str, Row] = {
    "sources": ("source", "select with", "what it reads"),
    "annotators": ("annotator", "select with", "what writes the traces"),
    "stages": ("stage", "runs as; used by", "what it does"),
    "rules": ("rule", "default", "a record passes when"),
}


def format_rows(header: Row, rows: list[Row], width: int = 110, longest: int = 30) -> str:
    """Two aligned columns and the description wrapped in the third; a second column longer than
    `longest` (a per-task threshold) keeps its line, and its description starts on the next one."""
    widths = [max(len(r[0]) for r in [header, *rows]),
              max(len(r[1]) for r in [header, *rows] if len(r[1]) <= longest)]
    indent = widths[0] + widths[1] + 4
    lines = []
    for name, how, text in [header, *rows]:
        wrapped = textwrap.wrap(text, max(30, width - indent)) or [""]
        if len(how) > widths[1]:
            lines.append(f"{name.ljust(widths[0])}  {how}")
        else:
            lines.append(f"{name.ljust(widths[0])}  {how.ljust(widths[1])}  {wrapped.pop(0)}")
        lines += [" " * indent + more for more in wrapped]
    return "\n".join(lines)


def handler(args: argparse.Namespace) -> int:
    print(format_rows(HEADERS[args.what], LISTS[args.what]()))
    return 0
