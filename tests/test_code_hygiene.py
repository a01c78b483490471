"""The package's structure, read from the source with `ast`: no import cycles among the project's modules, imports
at the top of a module unless a comment says why not, and a docstring on every public class and function of dpo/."""

from __future__ import annotations

import ast
import io
import sys
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("train.py", "generate.py")

# Project modules that may be imported inside a function (with a comment saying why): the demo's task is loaded
# only when the demo's data or judge is used, not whenever dpo.data or dpo.judges is imported.
DEFERRED_PROJECT_IMPORTS = {("dpo/data.py", "dpo.demo.task"), ("dpo/judges.py", "dpo.demo.task")}


def project_modules() -> dict[str, Path]:
    """Module name -> file: dpo and its subpackages, and the top-level scripts."""
    modules = {}
    for path in sorted((ROOT / "dpo").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for script in SCRIPTS:
        modules[Path(script).stem] = ROOT / script
    return modules


def imported_modules(tree: ast.AST, name: str, is_package: bool, known: set[str]) -> list[tuple[str, int]]:
    """The modules of `known` that module `name` imports, each with the line of its first import, at any depth
    (module level and inside functions): `import a.b`, `from a.b import c` (c too where it is a submodule),
    `from . import c`, `from .b import c`."""
    package = name if is_package else name.rpartition(".")[0]
    found: dict[str, int] = {}
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for target in targets:
            if target in known and target != name:
                found.setdefault(target, node.lineno)
    return sorted(found.items())


def import_graph() -> tuple[dict[str, dict[str, int]], dict[str, Path]]:
    """Each project module -> {module it imports: line}, and the modules' files."""
    modules = project_modules()
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        graph[name] = dict(imported_modules(tree, name, path.name == "__init__.py", set(modules)))
    return graph, modules


def find_cycle(graph: dict[str, dict[str, int] | list[str]]) -> list[str] | None:
    """A cycle of `graph` as [a, b, ..., a], or None when it has none (a depth-first search in sorted order)."""
    state: dict[str, str] = {}  # "open" while on the search path, "done" once all its successors are
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for succ in sorted(graph.get(node, ())):
            if state.get(succ) == "open":
                return path[path.index(succ):] + [succ]
            if succ not in state:
                cycle = visit(succ)
                if cycle:
                    return cycle
        path.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_cycle_finder_finds_a_cycle_and_only_a_cycle():
    assert find_cycle({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == ["a", "b", "c", "a"]
    assert find_cycle({"d": ["b"], "b": ["c"], "c": ["b"]}) == ["b", "c", "b"]
    assert find_cycle({"a": ["b", "c"], "b": ["c"], "c": [], "d": ["a", "c"]}) is None  # a diamond is no cycle
    assert find_cycle({}) is None


def test_the_import_reader_sees_function_level_relative_and_submodule_imports():
    source = ("import dpo.loss\n"
              "from dpo import lora, settings_of_nothing\n"
              "def f():\n"
              "    from . import task\n"
              "    from ..modeling import load_causal_lm\n"
              "    import torch\n")
    known = {"dpo", "dpo.loss", "dpo.lora", "dpo.modeling", "dpo.demo", "dpo.demo.task", "dpo.demo.build"}
    found = imported_modules(ast.parse(source), "dpo.demo.build", False, known)
    assert found == [("dpo", 2), ("dpo.demo", 4), ("dpo.demo.task", 4), ("dpo.lora", 2), ("dpo.loss", 1),
                     ("dpo.modeling", 5)]


def test_the_project_has_no_import_cycles():
    graph, modules = import_graph()
    assert {"dpo.loss", "dpo.demo.task", "train", "generate"} <= set(graph)
    assert "dpo.lora" in graph["train"] and "dpo.modeling" in graph["generate"]
    cycle = find_cycle(graph)
    if cycle:
        steps = [f"{a} -> {b} ({modules[a].relative_to(ROOT)}:{graph[a][b]})" for a, b in zip(cycle, cycle[1:])]
        raise AssertionError("import cycle: " + ", ".join(steps))


# ---------------------------------------------------------------------------------------------------
# Function-level imports


def comments(source: str) -> dict[int, str]:
    """Line -> the text of the comment on it, lint directives (noqa, type: ignore) removed."""
    found = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            text = token.string.lstrip("#").strip()
            for directive in ("noqa", "type: ignore", "pragma"):
                if text.startswith(directive):
                    text = text.partition(" - ")[2] if " - " in text else ""
            found[token.start[0]] = text.strip()
    return found


def function_level_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """The import statements inside a function or method body, at any depth."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found += [sub for stmt in node.body for sub in ast.walk(stmt)
                      if isinstance(sub, (ast.Import, ast.ImportFrom))]
    return list({id(node): node for node in found}.values())  # nested functions are walked twice


def why_comment(node: ast.stmt, imports: list[ast.stmt], notes: dict[int, str]) -> str:
    """The comment on an import's line, else on the line above the block of consecutive imports it belongs to
    (one comment may explain a block; another import's own comment does not)."""
    if notes.get(node.lineno):
        return notes[node.lineno]
    ends = {other.end_lineno: other for other in imports}
    first = node
    while first.lineno - 1 in ends:
        first = ends[first.lineno - 1]
    return notes.get(first.lineno - 1, "")


def imported_names(node: ast.Import | ast.ImportFrom) -> list[str]:
    """The dotted names an import statement imports: `a.b` for `import a.b`, `a.b.c` for `from a.b import c`
    (relative imports keep their leading dots)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    return ["." * node.level + f"{node.module}." * bool(node.module) + alias.name for alias in node.names]


def deferred(where: str, name: str) -> bool:
    """Whether `name`, imported in file `where`, is an allowed function-level import of a project module."""
    return any(file == where and (name == module or name.startswith(module + "."))
               for file, module in DEFERRED_PROJECT_IMPORTS)


def checked_files() -> list[Path]:
    """dpo/**/*.py and the scripts."""
    return sorted((ROOT / "dpo").rglob("*.py")) + [ROOT / name for name in SCRIPTS]


def test_the_import_check_reads_why_comments():
    source = ("def f():\n"
              "    # optional: the [x] extra\n"
              "    import x\n"
              "    from x import y\n"
              "    import z  # heavy: only f needs it\n"
              "    y.run()\n"
              "    import w  # noqa: F401\n")
    tree = ast.parse(source)
    imports = function_level_imports(tree)
    notes = comments(source)
    assert [why_comment(node, imports, notes) for node in imports] == ["optional: the [x] extra",
                                                                      "optional: the [x] extra",
                                                                      "heavy: only f needs it", ""]
    assert imported_names(imports[1]) == ["x.y"] and not deferred("dpo/data.py", "dpo.data")
    assert deferred("dpo/judges.py", "dpo.demo.task") and deferred("dpo/data.py", "dpo.demo.task.preference_records")


def test_function_level_imports_say_why():
    problems = []
    for path in checked_files():
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source, filename=str(path))
        imports, notes = function_level_imports(tree), comments(source)
        where = path.relative_to(ROOT)
        for node in imports:
            for name in imported_names(node):
                top = name.split(".")[0]
                if top in sys.stdlib_module_names:
                    problem = "the standard library: import it at the top"
                elif top in ("dpo", "", "train", "generate") and not deferred(str(where), name):
                    problem = "a project module: import it at the top, or fix the cycle that keeps it in the function"
                elif not why_comment(node, imports, notes):
                    problem = "no comment saying why it is not at the top"
                else:
                    continue
                problems.append(f"{where}:{node.lineno}: {name} ({problem})")
                break  # one problem per statement
    assert not problems, "function-level imports:\n" + "\n".join(problems)


# ---------------------------------------------------------------------------------------------------
# Docstrings


def undocumented(tree: ast.Module) -> list[str]:
    """Public classes and functions (module level, and the methods and properties of public classes, dunders
    excepted) without a docstring, as 'line name'."""
    found = []

    def visit(body: list[ast.stmt], prefix: str) -> None:
        for node in body:
            if isinstance(node, (ast.If, ast.Try)):
                visit(node.body + node.orelse + getattr(node, "finalbody", []), prefix)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                if node.name.startswith("_"):
                    continue
                if not ast.get_docstring(node):
                    found.append(f"{node.lineno} {prefix}{node.name}")
                if isinstance(node, ast.ClassDef):
                    visit(node.body, f"{prefix}{node.name}.")

    visit(tree.body, "")
    return found


def test_the_docstring_check_finds_what_lacks_one():
    source = ('def public(): pass\n'
              'def _private(): pass\n'
              'class Thing:\n'
              '    """A thing."""\n'
              '    def __init__(self): pass\n'
              '    @property\n'
              '    def size(self): return 1\n'
              '    def said(self):\n'
              '        """Said."""\n'
              'class _Hidden:\n'
              '    def method(self): pass\n')
    assert undocumented(ast.parse(source)) == ["1 public", "7 Thing.size"]


def test_every_public_class_and_function_of_dpo_has_a_docstring():
    missing = []
    for path in checked_files():
        if path.name == "generate.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        missing += [f"{path.relative_to(ROOT)}:{line}" for line in undocumented(tree)]
    assert not missing, "no docstring:\n" + "\n".join(missing)


def test_train_py_reads_top_to_bottom_main_and_train_step_stay_short():
    tree = ast.parse((ROOT / "train.py").read_text())
    lengths = {node.name: node.end_lineno - node.lineno + 1 for node in tree.body if isinstance(node, ast.FunctionDef)}
    assert lengths["main"] <= 100, f"main is {lengths['main']} lines"
    assert lengths["train_step"] <= 55, f"train_step is {lengths['train_step']} lines"
    calls = {n.func.id for n in ast.walk(next(n for n in tree.body if getattr(n, "name", "") == "train_step"))
             if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    assert {"apply_gradients", "ReferenceStartCheck"} <= calls  # the gradient application and the step-0 check
    type_checks = [ast.unparse(n) for n in ast.walk(tree) if isinstance(n, ast.Call)
                   and getattr(n.func, "id", "") == "isinstance" and "Pairs" in ast.unparse(n.args[1])]
    assert not type_checks, "train.py reads pair sources through the PairSource protocol, not their types"
