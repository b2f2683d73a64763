"""Which folder may import which: the layers stay one-way. Read from the source (every
import, function-local ones included), so a lazy import cannot slip past."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# folder -> the tandem packages none of its files may import
FORBIDDEN = {
    "configs": {"align", "serve", "cli", "bench"},
    "model": {"align", "serve", "cli", "bench"},
    "serve": {"align", "cli", "bench"},
    "align": {"cli", "bench"},
}


def imported_modules(path: pathlib.Path) -> set[str]:
    """Every absolute module `path` imports, "tandem.serve" for `from tandem import serve`."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            if node.module == "tandem":
                names |= {f"tandem.{alias.name}" for alias in node.names}
    return names


def files(folder: str) -> list[pathlib.Path]:
    return sorted((ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize("folder", FORBIDDEN)
def test_folder_imports_only_the_layers_below_it(folder):
    bad = {}
    for path in files(folder):
        packages = {m.split(".")[1] for m in imported_modules(path) if m.startswith("tandem.")}
        if packages & FORBIDDEN[folder]:
            bad[str(path.relative_to(ROOT))] = sorted(packages & FORBIDDEN[folder])
    assert not bad


def test_serve_holds_no_argparse():
    """The command line is cli/'s; serve/ is the library it calls."""
    users = [p for p in files("serve") if "argparse" in imported_modules(p)]
    assert not [str(p.relative_to(ROOT)) for p in users]
