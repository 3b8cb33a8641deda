"""The layout's rules, checked on the source: imports run one way through pipelines/ (store, data,
device, infer, eval, train, cli, from the bottom up), prior/ and vqvae/ are siblings that import
neither each other nor pipelines/, and no import cycle exists anywhere."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("prior", "vqvae", "pipelines", "modelkit")
# the tower of pipelines/, bottom first: a module may import its own level and the levels below
LEVELS = ("store", "data", "device", "infer", "eval", "train", "cli")
LEAVES = ("pipelines.errors", "pipelines.startup")  # importable from every level


def module_name(path):
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def project_modules():
    return {module_name(path): path for package in PACKAGES for path in (ROOT / package).rglob("*.py")}


def imports_of(path, modules):
    """The project modules `path` imports, anywhere in it (inside functions too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {name for name in names if name in modules}
    return found


def import_graph():
    modules = project_modules()
    return {name: imports_of(path, modules) - {name} for name, path in modules.items()}


def level(module):
    """The level of a pipelines module in LEVELS (None for the package and the leaves)."""
    parts = module.split(".")
    if parts[0] != "pipelines" or len(parts) < 2 or module in LEAVES:
        return None
    return LEVELS.index(parts[1])


def test_pipelines_imports_run_one_way():
    wrong = []
    for module, imported in import_graph().items():
        for other in imported:
            if level(module) is not None and level(other) is not None and level(other) > level(module):
                wrong.append(f"{module} imports {other}")
    assert wrong == []


def test_prior_and_vqvae_are_siblings_below_pipelines():
    wrong = [f"{module} imports {other}" for module, imported in import_graph().items() for other in imported
             if module.split(".")[0] in ("prior", "vqvae", "modelkit")
             and other.split(".")[0] in ({"prior", "vqvae", "pipelines"} - {module.split(".")[0]})]
    assert wrong == []


def test_no_import_cycle():
    graph = import_graph()
    state, cycles = {}, []

    def visit(module, path):
        state[module] = "open"
        for other in sorted(graph[module]):
            if other.startswith(module + "."):
                continue  # a package importing its own submodules is not a cycle
            if state.get(other) == "open" and not module.startswith(other + "."):
                cycles.append(" -> ".join(path[path.index(other):] + [other]) if other in path else f"{module} -> {other}")
            elif other not in state:
                visit(other, path + [other])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_the_rules_see_a_wrong_import():
    """The checks above read real imports: a store module importing a trainer is one."""
    tree = ast.parse("from pipelines.train.loop import fit\nimport pipelines.train.loop\n")
    names = {node.module if isinstance(node, ast.ImportFrom) else node.names[0].name for node in tree.body}
    assert {level(name) for name in names} == {LEVELS.index("train")} and level("pipelines.store.codes") == 0


MAX_FUNCTION_LINES = 60  # short functions: a longer one does several things


def long_functions(paths):
    """(path, function, lines) of every function longer than MAX_FUNCTION_LINES in `paths`."""
    found = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    found.append((path, node.name, lines))
    return found


def test_no_function_outside_the_tests_is_longer_than_sixty_lines(tmp_path):
    code = [path for folder in (*PACKAGES, "scripts", "bench") for path in (ROOT / folder).rglob("*.py")]
    assert [(str(path.relative_to(ROOT)), name, lines) for path, name, lines in long_functions(code)] == []
    body = "\n".join(f"    x{k} = {k}" for k in range(MAX_FUNCTION_LINES))  # with the def: one line too many
    example = tmp_path / "example.py"
    example.write_text(f"def long():\n{body}\n\n\ndef short():\n    pass\n")
    assert long_functions([example]) == [(example, "long", MAX_FUNCTION_LINES + 1)]
