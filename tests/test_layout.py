"""Imports run one way, with the data: `convert/` and `pipelines/` never import each other, both
may import `storage/`, which imports none of the project's other packages, and the method
(`ssat/`) imports no loader and no converter; none of them imports `comparison/`, which
belongs to `compare.py` at the top. Checked in the source, and in a fresh interpreter
for what importing a package really pulls in (the engines' libraries included)."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# package -> the project's packages it must never import
FORBIDDEN = {
    "ssat": {"pipelines", "convert", "comparison"},
    "pipelines": {"convert", "comparison"},
    "convert": {"pipelines", "comparison"},
    "storage": {"ssat", "pipelines", "convert", "comparison"},
}


def imported_packages(path: Path, package: str) -> list[tuple[int, str]]:
    """(line, top-level package) of every import in the file, in functions too; a relative
    import stays inside `package`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            top = package if node.level else node.module.split(".")[0]
            found.append((node.lineno, top))
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_packages_import_only_downstream(package):
    files = sorted((REPO / package).rglob("*.py"))
    assert files, f"no Python files in {package}/"
    broken = [
        f"{path.relative_to(REPO)}:{line} imports {top}"
        for path in files
        for line, top in imported_packages(path, package)
        if top in FORBIDDEN[package]
    ]
    assert not broken, "\n".join(broken)


def _modules_after(statement: str) -> set[str]:
    """Every module loaded by `statement` in a fresh interpreter started in the repository."""
    code = f"import sys\n{statement}\nprint('\\n'.join(sys.modules))"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return set(done.stdout.split())


def _within(modules: set[str], packages: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if any(m == p or m.startswith(p + ".") for p in packages))


def test_the_loaders_load_no_converter_and_no_engine_library():
    """ffcv and DALI are imported by their engines only, when a loader of that kind is made
    (`pipelines.dataset`: the image folders the DALI engine reads)."""
    loaded = _modules_after("import pipelines, pipelines.dataset")
    assert "pipelines" in loaded
    assert not _within(loaded, ("ffcv", "nvidia.dali", "convert"))


def test_the_method_loads_no_loader_and_no_converter():
    loaded = _modules_after("import ssat, ssat.models, ssat.checkpoint, ssat.config")
    assert "ssat.checkpoint" in loaded
    assert not _within(loaded, ("pipelines", "convert"))


def test_no_file_names_a_path_outside_the_repository():
    """What a user clones is all there is: no file points into the machine it was written on
    (the workspace around the checkout, a sibling folder)."""
    outside = ("/wo" + "rk/", "../sha" + "red")  # split, so that this file does not match
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    found = []
    for name in tracked:
        path = REPO / name
        if path.suffix in (".png", ".jpg", ".beton", ".npz") or not path.is_file():
            continue
        text = path.read_text(errors="ignore")
        found += [f"{name}: {o}" for o in outside if o in text]
    assert tracked and not found, found
