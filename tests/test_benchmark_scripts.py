"""The benchmark scripts' imports resolve: every name a script under benchmarks/ imports from a
sibling script, from tests/ or from mmldm_jax is defined there. Read from the source (ast), so
nothing is imported or run; the scripts themselves are run by hand (benchmarks/README.md), and a
renamed helper once broke two of them unnoticed."""
import ast
import os

import pytest

from conftest import REPO_ROOT

BENCHMARKS = os.path.join(REPO_ROOT, "benchmarks")
SCRIPTS = sorted(name for name in os.listdir(BENCHMARKS) if name.endswith(".py"))


def top_level_names(path: str) -> set[str]:
  """Names a module defines at its top level: functions, classes, assignments and imports."""
  with open(path) as f:
    tree = ast.parse(f.read())
  names = set()
  for node in tree.body:
    if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
      names.add(node.name)
    elif isinstance(node, (ast.Assign, ast.AnnAssign)):
      targets = node.targets if isinstance(node, ast.Assign) else [node.target]
      for target in targets:
        names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
    elif isinstance(node, (ast.Import, ast.ImportFrom)):
      names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
  return names


def source_of(module: str) -> tuple[str, bool] | None:
  """(file, is_package) of one of our modules: a benchmark script, a test module or mmldm_jax's."""
  for base in (BENCHMARKS, os.path.join(REPO_ROOT, "tests"), REPO_ROOT):
    path = os.path.join(base, *module.split("."))
    if os.path.isfile(path + ".py"):
      return path + ".py", False
    if os.path.isfile(os.path.join(path, "__init__.py")):
      return os.path.join(path, "__init__.py"), True
  return None


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_imported_name_of_ours_exists(script):
  with open(os.path.join(BENCHMARKS, script)) as f:
    tree = ast.parse(f.read())
  missing = []
  for node in ast.walk(tree):
    if not isinstance(node, ast.ImportFrom) or node.level or not node.module:
      continue
    found = source_of(node.module)
    if found is None:
      if node.module.split(".")[0] == "mmldm_jax":
        missing.append(node.module)
      continue   # a third-party module
    path, is_package = found
    defined = top_level_names(path)
    for alias in node.names:
      submodule = is_package and source_of(f"{node.module}.{alias.name}") is not None
      if alias.name not in defined and not submodule:
        missing.append(f"{node.module}.{alias.name}")
  assert not missing, f"benchmarks/{script} imports names that do not exist: {missing}"
