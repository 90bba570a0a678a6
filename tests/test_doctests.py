"""The examples in the package's docstrings run as written, and every tensor function says its shapes.

* Every module of the package (``undiscard`` and everything under it but ``__main__``) has
  its ``>>>`` examples run with ``doctest`` (``ELLIPSIS``, ``NORMALIZE_WHITESPACE``); none may
  fail, and together they must run a good number of examples, so that the test cannot pass
  by finding none.
* Every public function (named in its module's ``__all__``, defined there) whose annotations
  mention ``Tensor`` has a ``Shape:`` section in its docstring, kornia style; the command
  line (``undiscard.cli``) is exempt.
"""

from __future__ import annotations

import doctest
import importlib
import inspect
import pkgutil

import pytest
import torch

import undiscard

FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
#: the examples that must run, at least, over all modules (there are many more)
MIN_EXAMPLES = 10


def _module_names() -> list[str]:
    names = ["undiscard"]
    for info in pkgutil.walk_packages(undiscard.__path__, "undiscard."):
        if info.name != "undiscard.__main__":
            names.append(info.name)
    return sorted(names)


MODULES = _module_names()


@pytest.fixture
def one_thread():
    """The examples are tiny: one thread runs them fastest, and is the same on every machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _run(name: str) -> doctest.TestResults:
    module = importlib.import_module(name)  # the module itself (a package may re-export a same-named function)
    return doctest.testmod(module, optionflags=FLAGS, report=True)


def test_the_walk_finds_the_modules():
    assert len(MODULES) >= 40, MODULES
    assert "undiscard.sites.ops" in MODULES and "undiscard.__main__" not in MODULES


@pytest.mark.parametrize("name", MODULES)
def test_the_docstring_examples_of_a_module_pass(name, one_thread):
    result = _run(name)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples of {name} failed (see stdout)"


def test_the_docstring_examples_are_many(one_thread):
    per_module = {name: _run(name) for name in MODULES}
    total = sum(r.attempted for r in per_module.values())
    assert total >= MIN_EXAMPLES, f"only {total} docstring examples ran: {per_module}"
    # the central functions carry examples
    for name in ("undiscard.sites.ops", "undiscard.sites.discover", "undiscard.run.engine",
                 "undiscard.method.aggregate", "undiscard.method.align", "undiscard.evaluation.stats",
                 "undiscard.evaluation.report"):
        assert per_module[name].attempted > 0, f"{name} has no docstring example"


def _functions_missing_shapes() -> list[str]:
    missing = []
    for name in MODULES:
        if name == "undiscard.cli" or name.startswith("undiscard.cli."):
            continue
        module = importlib.import_module(name)
        for public in getattr(module, "__all__", []):
            f = getattr(module, public)
            if not inspect.isfunction(f) or f.__module__ != module.__name__:
                continue
            annotations = " ".join(str(v) for v in f.__annotations__.values())
            if "Tensor" in annotations and "Shape:" not in (f.__doc__ or ""):
                missing.append(f"{name}.{public}")
    return missing


def test_every_public_tensor_function_documents_its_shapes():
    missing = _functions_missing_shapes()
    assert not missing, "public functions taking or returning tensors without a 'Shape:' section:\n" + "\n".join(missing)


def test_the_shapes_rule_sees_the_functions_it_checks():
    from undiscard.sites.ops import conv_at_offset

    assert "Tensor" in " ".join(str(v) for v in conv_at_offset.__annotations__.values())
    assert "Shape:" in conv_at_offset.__doc__
