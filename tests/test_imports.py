"""No import cycles among mmldm_jax's modules, imports inside functions included (issue 14, part 2).

Read from the source (ast), so nothing is imported. KNOWN lists cycles tolerated for now: none (weight
loading lives in convert/ for all four pretrained models; models/ never imports convert/).
"""
import ast
import os

from conftest import REPO_ROOT

KNOWN = []


def module_graph():
  """{module: modules of ours it imports}, from every .py file under mmldm_jax/."""
  files = {}
  for folder, _, names in os.walk(os.path.join(REPO_ROOT, "mmldm_jax")):
    for name in names:
      if name.endswith(".py"):
        path = os.path.join(folder, name)
        module = os.path.relpath(path, REPO_ROOT)[:-3].replace(os.sep, ".")
        files[module.removesuffix(".__init__")] = path
  graph = {}
  for module, path in files.items():
    imported = set()
    with open(path) as f:
      tree = ast.parse(f.read())
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mmldm_jax"):
        for alias in node.names:
          name = f"{node.module}.{alias.name}"
          imported.add(name if name in files else node.module)
      elif isinstance(node, ast.Import):
        imported.update(a.name for a in node.names if a.name.startswith("mmldm_jax"))
    graph[module] = {name for name in imported if name in files and name != module}
  return graph


def cycles(graph):
  """The strongly connected components of more than one module (Tarjan)."""
  index, low, stack, on_stack, found = {}, {}, [], set(), []

  def visit(node):
    index[node] = low[node] = len(index)
    stack.append(node)
    on_stack.add(node)
    for successor in sorted(graph[node]):
      if successor not in index:
        visit(successor)
        low[node] = min(low[node], low[successor])
      elif successor in on_stack:
        low[node] = min(low[node], index[successor])
    if low[node] == index[node]:
      component = set()
      while True:
        member = stack.pop()
        on_stack.discard(member)
        component.add(member)
        if member == node:
          break
      if len(component) > 1:
        found.append(component)

  for node in sorted(graph):
    if node not in index:
      visit(node)
  return found


def test_no_import_cycles_but_the_known_ones():
  graph = module_graph()
  assert "mmldm_jax.stages.vae" in graph and "mmldm_jax.workdir" in graph
  unexpected = [sorted(c) for c in cycles(graph) if c not in KNOWN]
  assert not unexpected, f"import cycles: {unexpected}"


def test_the_cycle_finder_finds_a_function_level_cycle():
  assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]


def test_models_never_import_convert():
  """Weight loading is on one side: convert/ reads checkpoints into the models of models/."""
  graph = module_graph()
  wrong = sorted((module, name) for module, names in graph.items()
                 if module.startswith("mmldm_jax.models") for name in names
                 if name.startswith("mmldm_jax.convert"))
  assert not wrong, f"models/ imports convert/: {wrong}"


def test_stages_never_import_each_other():
  """A stage's shared pieces live outside stages/ (the sampling chain in sampling.py, the workdir
  layout in workdir.py); a stage whose input another stage makes raises workdir.MissingInput and
  main.py runs that stage first."""
  graph = module_graph()
  stages = {module for module in graph if module.startswith("mmldm_jax.stages.")}
  assert {"mmldm_jax.stages.sample", "mmldm_jax.stages.evaluate"} <= stages
  wrong = sorted((module, name) for module in stages for name in graph[module]
                 if name in stages or name == "mmldm_jax.stages")
  assert not wrong, f"stage modules importing stage modules: {wrong}"
