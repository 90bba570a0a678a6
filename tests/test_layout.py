"""The package's import graph: no cycles, no private names across modules, every import pointing down.

The layers, bottom up (docs/method.md describes the method they implement; the README's
"Layout" section lists them)::

    errors, compat, statefile  ->  sites  ->  run  ->  method  ->  tta  ->  data  ->  models
    ->  evaluation  ->  cli  ->  the package's __init__ / __main__

A module may import from its own subpackage and from any layer below its own, never from one
above; imports inside functions count as much as those at the top of a file.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "undiscard"
LAYERS = ["errors", "compat", "statefile", "sites", "run", "method", "tta", "data", "models", "evaluation", "cli"]
BASE = {"errors", "compat", "statefile"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def imports(path: Path) -> list[tuple[str, str, int]]:
    """``(module, imported name or '', line)`` for every import of the package in ``path``."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level:
            out.append(("<relative>", "", node.lineno))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "undiscard":
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                # `from undiscard.pkg import mod` imports the module itself
                out.append((sub, "", node.lineno) if sub in MODULES else (node.module, alias.name, node.lineno))
        elif isinstance(node, ast.Import):
            out.extend((a.name, "", node.lineno) for a in node.names if a.name.split(".")[0] == "undiscard")
    return out


GRAPH = {m: imports(p) for m, p in MODULES.items()}


def layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:
        return len(LAYERS)  # undiscard/__init__: the public face, above everything
    return LAYERS.index(parts[1]) if parts[1] in LAYERS else len(LAYERS)


def package(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 else module


def test_every_module_is_in_a_layer():
    loose = [m for m in MODULES if m.count(".") >= 1 and m.split(".")[1] not in LAYERS and m != "undiscard.__main__"]
    assert not loose, f"modules outside the layers {LAYERS}: {loose}"


def test_no_relative_imports_and_every_import_resolves():
    bad = [(m, t, line) for m, deps in GRAPH.items() for t, _, line in deps if t not in MODULES]
    assert not bad, f"imports of modules that do not exist (or relative imports): {bad}"


def test_no_private_name_crosses_a_module_boundary():
    bad = [(m, f"{t}.{n}", line) for m, deps in GRAPH.items() for t, n, line in deps
           if t != m and (n.startswith("_") or any(p.startswith("_") for p in t.split(".")))]
    assert not bad, f"private names imported from another module: {bad}"


def test_imports_point_down():
    bad = []
    for m, deps in GRAPH.items():
        for t, _, line in deps:
            if t in MODULES and package(t) != package(m) and layer(t) >= layer(m):
                bad.append(f"{MODULES[m].relative_to(SRC)}:{line} imports {t}")
    assert not bad, "imports that point up or sideways:\n" + "\n".join(bad)


def test_no_import_cycles():
    edges = {m: {t for t, _, _ in deps if t in MODULES and t != m} for m, deps in GRAPH.items()}
    # a subpackage's __init__ re-exports its modules: importing `undiscard.pkg.mod` runs it first,
    # so a module of pkg importing `undiscard.pkg` itself is a cycle and is caught below
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                cycle = stack[stack.index(t):] + [t]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)


def test_the_layers_below_method_do_not_need_models_data_or_the_cli():
    import subprocess
    import sys

    code = ("import sys, undiscard.run, undiscard.sites; "
            "bad = [m for m in sys.modules if m.startswith(('undiscard.models', 'undiscard.data', 'undiscard.cli', "
            "'undiscard.evaluation', 'timm', 'torchvision', 'matplotlib'))]; print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=SRC)
    assert r.returncode == 0, r.stdout + r.stderr


HISTORY = ("so far", "as of now", "not yet", "for now", "this environment")
OUTSIDE = ("SPEC §", "SPEC.md", "../shared", "STYLE.md", "paper-summary")


def test_the_source_cites_only_files_of_the_repository_and_tells_no_history():
    import re

    bad = []
    for m, path in MODULES.items():
        for i, line in enumerate(path.read_text().splitlines(), 1):
            low = line.lower()
            if any(w in low for w in HISTORY) or any(w in line for w in OUTSIDE) or re.search(r"\bissue #?\d", low):
                bad.append(f"{path.relative_to(SRC)}:{i}: {line.strip()}")
    assert not bad, "\n".join(bad)


def test_docs_the_source_cites_exist():
    import re

    root = SRC.parent
    cited = {c for p in MODULES.values() for c in re.findall(r"\bdocs/[\w./-]+\.md", p.read_text())}
    assert cited, "the source cites docs/ pages"
    missing = sorted(c for c in cited if not (root / c).is_file())
    assert not missing, f"docs cited in src/ that do not exist: {missing}"


#: The public face of the package: a change here is a change of the API (add to it deliberately).
PUBLIC = {
    "undiscard": ["find_sites", "run_states", "use_states", "wrap", "Undiscard", "ImageTTA", "wrap_segmentation",
                  "SegmentationUndiscard", "AttentionAggregator", "load_aggregator", "Site", "SiteMap", "SiteOp",
                  "UndiscardError", "ConfigError", "FileTrustError", "InputError", "MissedSubsamplingWarning", "ModelModeError", "OptionError",
                  "SplitError", "NoSubsamplingSiteError", "SiteMismatchError", "StateError", "UnknownModelError"],
    "undiscard.sites": ["find_sites", "Site", "SiteMap", "SiteOp"],
    "undiscard.run": ["run_states", "use_states", "SharedPrefixEvaluator", "run_trie"],
    "undiscard.method": ["Undiscard", "wrap", "SegmentationUndiscard", "wrap_segmentation"],
    "undiscard.tta": ["ImageTTA", "compose"],
    "undiscard.models": ["LoadedModel", "load_model", "save_checkpoint", "LoadedSegmenter", "load_segmenter"],
    "undiscard.cli": ["build_parser", "main"],
}


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_the_public_names_are_frozen_and_importable(name):
    import importlib

    mod = importlib.import_module(name)
    assert sorted(mod.__all__) == sorted(PUBLIC[name])
    missing = [n for n in mod.__all__ if not hasattr(mod, n)]
    assert not missing, f"{name}.__all__ names what it does not define: {missing}"


def test_every_module_declares_what_it_exports():
    import importlib

    bad = []
    for m in MODULES:
        if m.endswith("__main__") or m in ("undiscard.data", "undiscard.evaluation"):
            continue
        mod = importlib.import_module(m)
        names = getattr(mod, "__all__", None)
        if names is None or any(not hasattr(mod, n) for n in names):
            bad.append(m)
    assert not bad, f"modules without a valid __all__: {bad}"


def test_the_cli_docstring_and_help_list_every_subcommand(capsys):
    import undiscard.cli.app as cli

    parser = cli.build_parser()
    names = [a for a in parser._subparsers._group_actions[0].choices]
    assert len(names) == len(cli.SUBCOMMANDS) >= 10
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    shown = capsys.readouterr().out
    missing = [n for n in names if f"undiscard {n} " not in cli.__doc__ or n not in shown]
    assert not missing, f"subcommands missing from the cli docstring or --help: {missing}"


def test_the_tests_mirror_the_packages():
    tests = Path(__file__).resolve().parent
    folders = sorted(p.name for p in tests.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))
    packages = sorted(m.split(".")[1] for m in MODULES if m.count(".") == 1 and (PKG / m.split(".")[1]).is_dir())
    assert folders == packages, f"test folders {folders} != subpackages {packages}"
    for f in folders:
        assert list((tests / f).glob("test_*.py")), f"tests/{f}/ holds no tests"
