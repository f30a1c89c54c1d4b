"""The layering stays true: no import cycle, no import against the dependency direction."""

from __future__ import annotations

from pathlib import Path

from tests.layering import LAYERS, cycles, forbidden, import_graph

ROOT = Path(__file__).resolve().parents[1]


def test_the_packages_have_no_import_cycle() -> None:
    graph = import_graph(ROOT, LAYERS)
    assert len(graph) > 40  # the walk found the project
    assert cycles(graph) == []


def test_imports_follow_the_dependency_direction() -> None:
    assert forbidden(import_graph(ROOT, LAYERS)) == []


def write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_a_deliberate_cycle_is_found(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "events/__init__.py": "",
            "events/a.py": "from events.b import thing\n",
            "events/b.py": "def f():\n    from . import c\n",  # lazy and relative still count
            "events/c.py": "import events.a\n",
            "events/d.py": "from events import a\n",  # imports into the cycle, not part of it
        },
    )
    assert cycles(import_graph(tmp_path, ["events"])) == [["events.a", "events.b", "events.c"]]


def test_a_forbidden_direction_is_found(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "events/__init__.py": "",
            "events/x.py": "from trainer.y import z\n",
            "trainer/__init__.py": "",
            "trainer/y.py": "from rollout import w\n",
            "rollout/__init__.py": "",
            "rollout/w.py": "from events import x\n",
        },
    )
    graph = import_graph(tmp_path, ["events", "trainer", "rollout"])
    assert forbidden(graph) == [
        "events.x -> trainer.y",
        "trainer.y -> rollout",
        "trainer.y -> rollout.w",
    ]
