"""The docs keep up with the code: every module is named in docs/ARCHITECTURE.md and in the README's
layout, and nothing in the repository points to a file outside it."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "star_elastic"


def modules() -> list[Path]:
    return sorted(p.relative_to(PACKAGE) for p in PACKAGE.rglob("*.py") if p.name != "__init__.py")


def test_every_module_is_in_the_architecture_doc_and_the_readme_layout():
    architecture = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("## Layout"):]
    assert len(modules()) > 30  # the package, not an empty glob
    missing = [str(m) for m in modules() if not re.search(rf"\b{re.escape(m.name)}\b", architecture)]
    assert not missing, f"docs/ARCHITECTURE.md does not describe {missing}"
    missing = [str(m) for m in modules() if not re.search(rf"\b{re.escape(m.name)}\b", layout)]
    assert not missing, f"the README's layout does not list {missing}"


def test_nothing_points_outside_the_repository():
    """The project's docs are its own (docs/METHOD.md, docs/ARCHITECTURE.md): no code, test or doc
    refers to the workspace's shared folder."""
    outside = re.compile(r"\.\./shared\b")
    hits = [str(p.relative_to(ROOT)) for folder in ("star_elastic", "tests", "benchmarks", "docs", "examples")
            for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".md", ".sh", ".txt", ".toml")
            and p != Path(__file__).resolve() and outside.search(p.read_text(errors="replace"))]
    hits += [name for name in ("README.md", "Makefile", "pyproject.toml")
             if (ROOT / name).exists() and outside.search((ROOT / name).read_text())]
    assert not hits, f"these point outside the repository: {hits}"
