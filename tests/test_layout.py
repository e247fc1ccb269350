"""The code stays readable in one sitting: no import cycles, short functions, and a README whose
layout table is the map of the tree."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("llm", "triton_kernels")
MAX_FUNCTION_LINES = 60


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    """The project modules `path` imports, at any depth (an import inside a function counts too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            targets.add(base)
            targets.update(f"{base}.{alias.name}" for alias in node.names)
    # a submodule import also runs its packages' __init__, which are docstring-only here
    return {t for t in targets if t in known and t != name and t not in PACKAGES}


def test_no_import_cycles():
    graph = {name: imports_of(path, name, set(modules())) for name, path in modules().items()}
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for name in graph:
        if name not in state:
            visit(name, [name])


def test_functions_are_short():
    long = []
    for name, path in modules().items():
        if name.startswith("triton_kernels"):
            continue  # kernels are read against the algorithm: tests/test_flash_attention.py keeps them honest
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "functions over 60 lines: " + ", ".join(long)


def test_readme_layout_table_is_the_tree():
    """Every path the README's layout table names exists, and every folder of llm/ is named."""
    readme = (ROOT / "README.md").read_text()
    table = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"^\| `([^`]+)`", table, flags=re.M))
    for cell in re.findall(r"^\| ([^|]+) \|", table, flags=re.M):
        named.update(re.findall(r"`([^`]+)`", cell))
    missing = sorted(p for p in named if "*" not in p and not (ROOT / p.rstrip("/")).exists())
    assert not missing, f"the README's layout table names paths that do not exist: {missing}"
    folders = {p.relative_to(ROOT).as_posix() + "/" for p in (ROOT / "llm").iterdir()
               if p.is_dir() and p.name != "__pycache__"}
    unnamed = sorted(f for f in folders if f not in named)
    assert not unnamed, f"folders of llm/ missing from the README's layout table: {unnamed}"
