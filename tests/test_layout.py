"""The layout's rules, read from the source with `ast` (nothing is imported):

- `pipeline/` (the engine) imports neither `stages` nor `train`;
- `stages/` never imports `train`;
- a stage module (`stages/<stage>.py`, a module that registers a stage class) is imported by no
  module of the tree: stages meet only through committed files, and `stages.plugins` loads them by
  walking the package. So a stage module never imports another one, and neither do the backends,
  sources, commands, libraries or `train/`;
- the libraries (`stages/lib/`) import only each other and `pipeline`;
- `train/` takes from `stages` only the libraries and the backends.

And one home per fact: the frame label, the video decoder, the Ray start-up and the renderer are
each defined in one place.
"""
from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "stages", "train")


def module_of(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    """A module or package of the tree (so `from stages.lib import evidence` imports stages.lib.evidence)."""
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imported(source: str) -> Iterator[tuple[int, str]]:
    """(line, module) of every import in `source`, at any depth (a lazy import inside a function
    counts): `import a.b`, `from a.b import c` (a.b, or a.b.c where c is a module of the tree)."""
    found: set[tuple[int, str]] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                name = f"{node.module}.{alias.name}"
                found.add((node.lineno, name if is_module(name) else node.module))
    yield from sorted(found)


def registers_a_stage(source: str) -> bool:
    return any(isinstance(node, ast.ClassDef) and any(
        (d.id if isinstance(d, ast.Name) else getattr(d, "attr", None)) == "register_stage" for d in node.decorator_list)
        for node in ast.walk(ast.parse(source)))


def sources() -> dict[str, tuple[Path, str]]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            out[module_of(path)] = (path, path.read_text())
    return out


SOURCES = sources()
STAGE_MODULES = {name for name, (_, text) in SOURCES.items() if registers_a_stage(text)}


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def violations(rule, modules=SOURCES) -> list[str]:
    """`file:line imports module` for every import that `rule(importer, imported)` forbids."""
    found = []
    for importer, (path, text) in modules.items():
        for line, name in imported(text):
            if rule(importer, name):
                found.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    return found


def engine_rule(importer: str, name: str) -> bool:
    return within(importer, "pipeline") and (within(name, "stages") or within(name, "train"))


def domain_rule(importer: str, name: str) -> bool:
    return within(importer, "stages") and within(name, "train")


def stage_module_rule(importer: str, name: str) -> bool:
    return name in STAGE_MODULES and name != importer


def library_rule(importer: str, name: str) -> bool:
    return within(importer, "stages.lib") and within(name, "stages") and not within(name, "stages.lib")


def train_rule(importer: str, name: str) -> bool:
    return (within(importer, "train") and within(name, "stages")
            and not (within(name, "stages.lib") or within(name, "stages.backends")))


@pytest.mark.parametrize("rule", [engine_rule, domain_rule, stage_module_rule, library_rule, train_rule],
                         ids=lambda rule: rule.__name__)
def test_imports_point_down(rule):
    assert violations(rule) == []


def test_one_module_per_stage_class_directly_under_stages():
    """Each stage class has its own module `stages/<stage>.py` (the pipeline order reads off the folder)."""
    assert STAGE_MODULES == {"stages.source", "stages.sample", "stages.annotate", "stages.align", "stages.verify",
                             "stages.filter", "stages.shard", "stages.publish"}
    for name in STAGE_MODULES:
        text = SOURCES[name][1]
        assert sum(1 for node in ast.walk(ast.parse(text)) if isinstance(node, ast.ClassDef)
                   and registers_a_stage(ast.unparse(node))) == 1, name


def test_the_checker_sees_every_form_of_a_forbidden_import():
    """The rules above are not vacuous: each spelling of an import is seen, a lazy one included."""
    text = ("import stages.align\nfrom stages import annotate\nfrom stages.verify import VerifyStage\n"
            "def later():\n    from train.data import build_dataset\n")
    modules = {"stages.filter": (ROOT / "stages" / "filter.py", text), "pipeline.jobs": (ROOT / "pipeline" / "jobs.py", text),
               "stages.lib.render": (ROOT / "stages" / "lib" / "render.py", text)}
    assert len(violations(stage_module_rule, modules)) == 9
    assert violations(domain_rule, modules) == ["stages/filter.py:5 imports train.data",
                                                "stages/lib/render.py:5 imports train.data"]
    assert len(violations(engine_rule, modules)) == 4
    assert len(violations(library_rule, modules)) == 3


# --- one home per fact --------------------------------------------------------------------------------


def places(pattern: str, skip: tuple[str, ...] = ()) -> list[str]:
    """The module of every line of the package tree matching `pattern` (once per line)."""
    regex = re.compile(pattern)
    return [name for name, (_, text) in SOURCES.items() if not name.startswith(skip)
            for line in text.splitlines() if regex.search(line)]


def test_one_definition_of_each_fact():
    # The frame label: built by stages.lib.chat.frame_label only (the test model's tokenizer corpus
    # imitates prompt text and is not a label shown to any model).
    assert places(r"Frame \{", skip=("stages.testing",)) == ["stages.lib.chat"]
    assert places(r"^def frame_label\(") == ["stages.lib.chat"]
    # The video decoder: one place opens a video, one place decodes frames.
    assert places(r"VideoReader\(") == ["stages.lib.media"]
    assert places(r"\.get_batch\(") == ["stages.lib.media"]
    # The Ray start-up: pipeline.build.connect (build and `stgr train` alike), one worker environment.
    assert places(r"ray\.init\(") == ["pipeline.build", "pipeline.build"]  # join a cluster, or start one
    assert places(r"^def (connect|worker_env)\(") == ["pipeline.build", "pipeline.build"]
    # The renderer of a record into model messages.
    assert places(r"^def (render_example|render_target|select_frames|request_from_messages)\(") == \
        ["stages.lib.render"] * 4
