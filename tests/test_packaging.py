"""What `pip install .` gives: every third-party module the package imports is a declared
dependency, the pinned requirements.txt satisfies the declared ranges, and the console scripts
are installed and run."""

import ast
import importlib.metadata as md
import os
import re
import subprocess
import sys
import tomllib

import pytest
from packaging.requirements import Requirement

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROJECT = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["project"]
SCRIPTS = {"mend-train": "mend_jax.cli:train", "mend-evaluate": "mend_jax.cli:evaluate",
           "mend-edit": "mend_jax.cli:edit", "mend-bench": "mend_jax.cli:bench_main"}


def _norm(name: str) -> str:
  return re.sub(r"[-_.]+", "-", name).lower()


def _imported_top_modules() -> set[str]:
  out = set()
  for root, _, files in os.walk(os.path.join(ROOT, "mend_jax")):
    for f in files:
      if f.endswith(".py"):
        tree = ast.parse(open(os.path.join(root, f), encoding="utf-8").read())
        for node in ast.walk(tree):
          if isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
          elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module.split(".")[0])
  return out - set(sys.stdlib_module_names) - {"mend_jax", "__future__"}


def test_every_imported_package_is_a_declared_dependency():
  declared = {_norm(Requirement(r).name) for r in PROJECT["dependencies"]}
  dists = md.packages_distributions()
  missing = {}
  for mod in sorted(_imported_top_modules()):
    names = {_norm(d) for d in dists.get(mod, [mod])}
    if not names & declared:
      missing[mod] = sorted(names)
  assert not missing, f"imported but not declared in pyproject.toml [project] dependencies: {missing}"


def test_pinned_requirements_satisfy_the_declared_ranges():
  pins = {}
  for line in open(os.path.join(ROOT, "requirements.txt")):
    line = line.split("#")[0].strip()
    if line:
      req = Requirement(line)
      pins[_norm(req.name)] = next(iter(req.specifier)).version
  for dep in PROJECT["dependencies"]:
    req = Requirement(dep)
    assert _norm(req.name) in pins, f"{req.name} is declared but not pinned in requirements.txt"
    assert req.specifier.contains(pins[_norm(req.name)], prereleases=True), (dep, pins[_norm(req.name)])


def test_console_scripts_are_installed_and_run():
  assert PROJECT["scripts"] == SCRIPTS
  installed = {e.name: e.value for e in md.entry_points(group="console_scripts") if e.name.startswith("mend-")}
  assert installed == SCRIPTS, "reinstall the package (pip install -e .) to register its console scripts"
  bindir = os.path.dirname(sys.executable)
  for name in SCRIPTS:
    exe = os.path.join(bindir, name)
    if not os.path.exists(exe):
      pytest.fail(f"{exe} is missing: the package was installed without its console scripts")
  r = subprocess.run([os.path.join(bindir, "mend-bench"), "--help"], capture_output=True, text=True)
  assert r.returncode == 0 and "--algs" in r.stdout
  r = subprocess.run([os.path.join(bindir, "mend-train"), "--help"], capture_output=True, text=True)
  assert "--workdir" in r.stdout + r.stderr and "Traceback" not in r.stderr


GROUPED = '''
import os, time
import pytest
pytestmark = pytest.mark.xdist_group("one")

@pytest.mark.parametrize("i", range(4))
def test_grouped(i):
  time.sleep(0.3)
  with open(os.path.join(os.path.dirname(__file__), f"worker_{i}.txt"), "w") as f:
    f.write(os.environ["PYTEST_XDIST_WORKER"])
'''


def test_the_installed_pytest_keeps_an_xdist_group_on_one_worker(tmp_path):
  """`make test` runs `pytest -n 2 --dist loadgroup`: the modules whose module fixture is a long
  subprocess (tests/test_sharding.py, test_crash.py) or a model conversion (test_real_model.py)
  are one group each, and must run on one worker, or each worker pays for the fixture again."""
  (tmp_path / "test_grouped.py").write_text(GROUPED)
  r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "2", "--dist", "loadgroup", "-p", "no:cacheprovider",
                      "test_grouped.py"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
  workers = {(tmp_path / f"worker_{i}.txt").read_text() for i in range(4)}
  assert len(workers) == 1, f"the group ran on workers {sorted(workers)}"
