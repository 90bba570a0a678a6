"""The Python examples of README.md and docs/*.md run as written (doctest-style): documented
examples cannot rot.

Every ```python block of README.md and of every docs/*.md page runs, statement by statement, in
a fresh namespace, with the repository root as working directory (for the ``zoo/`` paths). A
block may use these names without defining them (SETUP; a block that defines one uses its own):

* ``model``: the shipped Fashion-MNIST ResNet-18 (``zoo/fmnist_resnet18.safetensors``), eval mode;
* ``x``: a batch of 2 random images of its input size, ``(2, 1, 128, 128)`` (seeded).

Budgets run as written, on that tiny batch. A bare expression whose comment starts with a Python
literal documents its value and must equal it (``sites.space_size  # 64 = ...``). Fenced blocks
without the ``python`` tag (shell commands, program output) are not Python and are not run;
every ``python`` block is. Where a block imports a third-party package (timm, torchvision, ...),
its imports also run in their order in a fresh interpreter, as a user's script would: where
torchvision's C extension cannot load, importing timm or torchvision before undiscard fails
(README *Install*), and in-process the guard has already run (tests/conftest.py).
"""

from __future__ import annotations

import ast
import copy
import io
import re
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PYTHON_TAGS = ("python", "py", "python3")


def python_blocks(text: str, name: str = "README.md") -> list[tuple[int, str]]:
    """``(line of the block's first code line, code)`` of every fenced block tagged Python."""
    lines, blocks, i = text.splitlines(), [], 0
    while i < len(lines):
        m = re.match(r"^\s*```\s*([\w+-]*)", lines[i])
        if not m:
            i += 1
            continue
        j = i + 1
        while j < len(lines) and not re.match(r"^\s*```\s*$", lines[j]):
            j += 1
        assert j < len(lines), f"{name}:{i + 1}: a fenced block that never closes"
        if m.group(1).lower() in PYTHON_TAGS:
            blocks.append((i + 2, "\n".join(lines[i + 1 : j])))
        i = j + 1
    return blocks


README_BLOCKS = python_blocks(README.read_text())
#: ``(file name, line, code)`` of every Python block of README.md and docs/*.md
BLOCKS = [("README.md", s, c) for s, c in README_BLOCKS] + [
    (f"docs/{p.name}", s, c) for p in DOCS for s, c in python_blocks(p.read_text(), f"docs/{p.name}")]


def test_the_readme_has_its_python_examples():
    # the sections with an API example: the two quick starts (classification, segmentation), library API
    assert len(README_BLOCKS) >= 4, README_BLOCKS


def _comments(code: str) -> dict[int, str]:
    """Line (1-based, within the block) -> the text of the comment on it."""
    out = {}
    for tok in tokenize.generate_tokens(io.StringIO(code).readline):
        if tok.type == tokenize.COMMENT:
            out[tok.start[0]] = tok.string.lstrip("#").strip()
    return out


_NO_VALUE = object()


def documented_value(comment: str):
    """The Python literal a comment starts with (before ``: ``, `` = `` or the end), else _NO_VALUE."""
    cuts = sorted({len(comment), *(m.start() for m in re.finditer(r": | = ", comment))}, reverse=True)
    for cut in cuts:  # the longest literal first
        try:
            return ast.literal_eval(comment[:cut].strip())
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
    return _NO_VALUE


def test_documented_values_are_read_off_the_comment():
    assert documented_value("(1, 2, 3): main-path sites but first and last") == (1, 2, 3)
    assert documented_value("64 = product of Rh*Rw over searchable sites") == 64
    assert documented_value("'a + b', (2, 2), (4, 4)") == ("a + b", (2, 2), (4, 4))
    for prose in ("(N, 2) Delta in input pixels: sum_l s_l * P_l", "search other sites: \"inner\"", "identity, horizontal flip"):
        assert documented_value(prose) is _NO_VALUE


@pytest.fixture(scope="module")
def setup_namespace():
    """SETUP (see the module docstring), built once; every block gets its own copy of the model."""
    from undiscard.models.classifiers import load_model

    loaded = load_model(str(ROOT / "zoo" / "fmnist_resnet18.safetensors"))
    x = torch.randn(2, *loaded.input_size, generator=torch.Generator().manual_seed(0))
    assert x.shape == (2, 1, 128, 128)
    return {"model": loaded.model.eval(), "x": x}


@pytest.mark.parametrize("name,start,code", BLOCKS, ids=[f"{n}:{s}" for n, s, _ in BLOCKS])
def test_readme_python_block_runs_as_written(name, start, code, setup_namespace, monkeypatch):
    monkeypatch.chdir(ROOT)
    ns = {"__name__": "__readme__", "model": copy.deepcopy(setup_namespace["model"]), "x": setup_namespace["x"].clone()}
    tree = ast.parse(code, filename=name)
    comments = _comments(code)
    checked = 0
    for stmt in tree.body:
        ast.increment_lineno(stmt, start - 1)  # tracebacks point at the file's own lines
        where = f"{name}:{stmt.lineno}"
        if isinstance(stmt, ast.Expr):
            value = eval(compile(ast.Expression(stmt.value), name, "eval"), ns)
            want = documented_value(comments.get(stmt.end_lineno - start + 1, ""))
            if want is not _NO_VALUE:
                got = value.tolist() if isinstance(value, torch.Tensor) else value
                assert got == want, f"{where}: {ast.unparse(stmt.value)} is {got!r}; {name} says {want!r}"
                checked += 1
        else:
            exec(compile(ast.Module([stmt], type_ignores=[]), name, "exec"), ns)
    if "space_size" in code:  # the library API block documents values: they were compared
        assert checked >= 3


def _third_party_imports(code: str) -> list[str]:
    """The block's top-level import statements, in order, if any imports a third-party package
    (importing torch, undiscard or the standard library cannot depend on what was imported first)."""
    stmts, third_party = [], False
    for stmt in ast.parse(code).body:
        if isinstance(stmt, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in stmt.names] if isinstance(stmt, ast.Import) else [stmt.module or ""]
            roots = {n.split(".")[0] for n in names}
            third_party |= bool(roots - {"torch", "undiscard", *sys.stdlib_module_names})
            stmts.append(ast.unparse(stmt))
    return stmts if third_party else []


IMPORTING = [(n, s, c) for n, s, c in BLOCKS if _third_party_imports(c)]


def _fresh_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=180)


@pytest.mark.parametrize("name,start,code", IMPORTING, ids=[f"{n}:{s}" for n, s, _ in IMPORTING])
def test_readme_block_imports_work_in_a_fresh_interpreter(name, start, code):
    imports = "\n".join(_third_party_imports(code))
    res = _fresh_python(imports)
    assert res.returncode == 0, f"{name}:{start}: {imports!r} fails in a fresh interpreter:\n{res.stderr[-3000:]}"


def test_import_undiscard_then_timm_works_and_undiscard_alone_loads_nothing_of_torchvision():
    res = _fresh_python(
        "import sys, warnings\n"
        "with warnings.catch_warnings():\n"
        "    warnings.simplefilter('error')  # importing undiscard warns about nothing\n"
        "    import undiscard\n"
        "assert 'torchvision' not in sys.modules and 'timm' not in sys.modules, 'undiscard imported torchvision'\n"
        "import timm, torchvision\n"
        "print(type(timm.create_model('resnet18', pretrained=False)).__name__, type(torchvision.models.resnet18()).__name__)\n"
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.split() == ["ResNet", "ResNet"]
    assert "operator torchvision::nms does not exist" not in res.stderr


def test_import_undiscard_works_without_torchvision():
    """Also: the guard's finder must not make importlib skip the finder after it (here the one
    that hides torchvision), and a direct call of the guard must not wait on itself."""
    res = _fresh_python(
        "import importlib.abc, sys\n"
        "class Hide(importlib.abc.MetaPathFinder):  # as if torchvision were not installed\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'torchvision':\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Hide())\n"
        "import torch, undiscard\n"
        "from undiscard import compat\n"
        "# called directly while the import-time finder is in place (its find_spec passes through it)\n"
        "assert compat.ensure_torchvision() is False and compat.DEFINED_TORCHVISION_SCHEMAS == ()\n"
        "try:\n"
        "    import torchvision\n"
        "except ModuleNotFoundError:\n"
        "    pass\n"
        "else:\n"
        "    raise SystemExit('torchvision imported although hidden')\n"
        "net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, 2, 1), torch.nn.Conv2d(2, 2, 3, 2, 1))\n"
        "print(len(undiscard.find_sites(net, torch.randn(1, 1, 16, 16))))\n"
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.split() == ["2"]
