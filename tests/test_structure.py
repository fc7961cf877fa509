"""The package's shape, read from its source (ast): imports go downward only (no cycle between
mend_jax modules) and no function imports a mend_jax module."""

import ast
import os

import pytest

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "mend_jax")


def _modules() -> dict[str, str]:
  """{dotted module name: file} of every module of the package."""
  out = {}
  for root, _, files in os.walk(PKG):
    for f in files:
      if f.endswith(".py"):
        rel = os.path.relpath(os.path.join(root, f), os.path.dirname(PKG))[:-3].replace(os.sep, ".")
        out[rel.removesuffix(".__init__")] = os.path.join(root, f)
  return out


def _targets(node, modules) -> list[str]:
  """The mend_jax modules an import statement loads."""
  if isinstance(node, ast.Import):
    return [a.name for a in node.names if a.name.split(".")[0] == "mend_jax"]
  if node.module is None or node.level or node.module.split(".")[0] != "mend_jax":
    return []
  # `from mend_jax.x import y`: y is a submodule (mend_jax.x.y) or a name defined in mend_jax.x.
  return [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module for a in node.names]


def _graph():
  modules = _modules()
  graph, nested = {}, []
  for name, path in modules.items():
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    top = set()
    for node in ast.walk(tree):
      if isinstance(node, (ast.Import, ast.ImportFrom)) and _targets(node, modules):
        if node in tree.body:
          top.update(_targets(node, modules))
        else:
          nested.append(f"{name}:{node.lineno}")
    graph[name] = top
  return graph, nested


def test_no_function_level_import_of_the_package():
  _, nested = _graph()
  assert not nested, f"imports of mend_jax modules inside functions (move them to the top): {nested}"


def test_imports_have_no_cycle():
  graph, _ = _graph()
  assert len(graph) > 20 and graph["mend_jax.tree"] == set()  # the bottom imports nothing of the package
  state, stack = {}, []

  def visit(m):
    state[m] = "open"
    stack.append(m)
    for t in sorted(graph.get(m, ())):
      if state.get(t) == "open":
        pytest.fail("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
      if t not in state:
        visit(t)
    stack.pop()
    state[m] = "done"

  for m in sorted(graph):
    if m not in state:
      visit(m)


def test_the_checker_finds_a_cycle_and_a_nested_import(tmp_path, monkeypatch):
  """The two checks above can fail: a planted cycle and a function-level import are reported."""
  pkg = tmp_path / "mend_jax"
  pkg.mkdir()
  (pkg / "__init__.py").write_text("")
  (pkg / "a.py").write_text("from mend_jax import b\n")
  (pkg / "b.py").write_text("import mend_jax.a\ndef f():\n  from mend_jax import a\n")
  monkeypatch.setattr(__import__(__name__), "PKG", str(pkg))
  graph, nested = _graph()
  assert graph["mend_jax.a"] == {"mend_jax.b"} and graph["mend_jax.b"] == {"mend_jax.a"}
  assert nested == ["mend_jax.b:3"]
