"""The package's import structure: `import jaxpeft` stays light, subpackages form layers without cycles,
the model knows no method, and no jaxpeft module imports another inside a function."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "jaxpeft"
HEAVY = ("torch", "datasets", "gguf", "bitsandbytes", "matplotlib", "peft", "tensorboardX")
MODULES = ("jaxpeft", "jaxpeft.methods", "jaxpeft.convert.peft.lora", "jaxpeft.train.run", "jaxpeft.train.loop",
           "jaxpeft.data", "jaxpeft.models.generate", "jaxpeft.convert.load", "jaxpeft.multi", "jaxpeft.merge",
           "jaxpeft.plan")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _jaxpeft_imports(path: Path) -> list[tuple[str, bool, int]]:
    """(imported jaxpeft module, imported inside a function?, line) for every import in the file."""
    tree = ast.parse(path.read_text(), str(path))
    out = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                out.extend((a.name, in_function, child.lineno) for a in child.names if a.name.split(".")[0] == "jaxpeft")
            elif isinstance(child, ast.ImportFrom) and child.module and child.module.split(".")[0] == "jaxpeft":
                # `from jaxpeft.models import hooks` imports jaxpeft.models.hooks when that is a module.
                for a in child.names:
                    sub = f"{child.module}.{a.name}"
                    target = sub if (ROOT / Path(*sub.split("."))).with_suffix(".py").exists() or \
                        (ROOT / Path(*sub.split("."))).is_dir() else child.module
                    out.append((target, in_function, child.lineno))
            visit(child, inner)

    visit(tree, False)
    return out


def _files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _subpackage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and (PACKAGE / parts[1]).is_dir()) else None


def test_library_imports_stay_light():
    code = (f"import sys\nfor m in {MODULES!r}: __import__(m)\n"
            f"print(','.join(h for h in {HEAVY!r} if h in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "", f"imported at module load: {out.stdout.strip()}"


def test_no_jaxpeft_import_inside_a_function():
    local = [f"{p.relative_to(ROOT)}:{line} imports {m}" for p in _files() for m, inside, line in _jaxpeft_imports(p)
             if inside]
    assert not local, "jaxpeft modules imported inside functions (move them to the module top):\n" + "\n".join(local)


def test_models_import_no_method_and_no_trainer():
    bad = [f"{p.relative_to(ROOT)}:{line} imports {m}" for p in sorted((PACKAGE / "models").rglob("*.py"))
           for m, _, line in _jaxpeft_imports(p) if _subpackage(m) in ("methods", "train", "quant")]
    assert not bad, "jaxpeft/models must not import methods, train or quant:\n" + "\n".join(bad)


def test_subpackages_import_each_other_without_cycles():
    edges: dict[str, set[str]] = {}
    for p in _files():
        src = _subpackage(_module_name(p))
        if src is None:
            continue
        for m, _, _ in _jaxpeft_imports(p):
            dst = _subpackage(m)
            if dst is not None and dst != src:
                edges.setdefault(src, set()).add(dst)
    # Depth-first search for a cycle; report one with its path.
    state: dict[str, int] = {}
    stack: list[str] = []

    def cycle_from(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := cycle_from(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := cycle_from(node)):
            raise AssertionError("import cycle between jaxpeft subpackages: " + " -> ".join(found)
                                 + f"\n(edges: { {k: sorted(v) for k, v in sorted(edges.items())} })")
