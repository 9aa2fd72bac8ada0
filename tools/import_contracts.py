"""An import-linter contract type this project adds: no heavy import at module level.

import-linter's own contracts see every import, including those inside functions, which is
how this library defers Keras and the backends until they are needed.  This contract checks
what *importing* a module costs: the modules it imports at module level (any statement that
runs when the module is imported - not inside a function), followed through this package's own
modules and the packages above them, must not reach a forbidden external package.

    [[tool.importlinter.contracts]]
    type = "module_level_imports"
    source_modules = ["convnext_keras.registry"]
    forbidden_modules = ["keras", "tensorflow"]

Each source module is checked with its descendants, except the root package, which stands for
its own ``__init__`` only.  ``lint-imports`` finds the type through ``contract_types``
(``make lint`` puts ``tools/`` on ``PYTHONPATH``).
"""

from __future__ import annotations

import ast
import importlib.util
from functools import cache
from pathlib import Path

from importlinter.domain import fields
from importlinter.domain.contract import Contract, ContractCheck


def _source_file(module: str) -> tuple[Path, bool] | None:
    """``(file, is a package)`` of a module of an installed top-level package, found from the
    top-level package's folder (``find_spec`` of a submodule would import its parents)."""
    top, _, rest = module.partition(".")
    spec = importlib.util.find_spec(top)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations)))
    path = folder.joinpath(*rest.split(".")) if rest else folder
    if (path / "__init__.py").is_file():
        return path / "__init__.py", True
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py"), False
    return None


def _module_level_imports(module: str) -> set[str]:
    """Absolute names a module imports when it is imported (not inside a function)."""
    found_file = _source_file(module)
    if found_file is None:
        return set()
    path, is_package = found_file
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module or ""
            found.add(name)
            found.update(f"{name}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


class ModuleLevelImportsContract(Contract):
    """Importing ``source_modules`` (and their descendants) must not import
    ``forbidden_modules`` at module level, directly or through other modules."""

    type_name = "module_level_imports"

    source_modules = fields.ListField(subfield=fields.StringField())
    forbidden_modules = fields.ListField(subfield=fields.StringField())

    def check(self, graph, verbose: bool) -> ContractCheck:
        root = self.session_options.get("root_package") or self.session_options["root_packages"][0]
        internal = {m for m in graph.modules if m == root or m.startswith(root + ".")}

        @cache
        def edges(module: str) -> frozenset[str]:
            names = _module_level_imports(module)
            out = set()
            for name in names:
                # "from pkg import mod" may name a module; keep the longest internal prefix.
                parts = name.split(".")
                for i in range(len(parts), 0, -1):
                    candidate = ".".join(parts[:i])
                    if candidate in internal or i == 1:
                        out.add(candidate)
                        break
            # Importing a module imports the packages above it.
            parts = module.split(".")
            out.update(".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]))
            return frozenset(out - {module})

        forbidden = set(self.forbidden_modules)
        violations = []
        sources = set()
        for source in self.source_modules:
            # A module and its descendants; the root package stands for itself alone.
            sources |= {source} | (set(graph.find_descendants(source)) if source != root else set())
        for source in sorted(sources):
            seen, stack, parent = {source}, [source], {source: None}
            while stack:
                current = stack.pop()
                for target in edges(current):
                    if target.split(".")[0] in forbidden:
                        chain, node = [target], current
                        while node is not None:
                            chain.append(node)
                            node = parent[node]
                        violations.append(" -> ".join(reversed(chain)))
                        continue
                    if target in internal and target not in seen:
                        seen.add(target)
                        parent[target] = current
                        stack.append(target)
        return ContractCheck(kept=not violations, metadata={"violations": violations})

    def render_broken_contract(self, check: ContractCheck) -> None:
        from importlinter.application import output

        for line in check.metadata["violations"]:
            output.print_error(f"module-level import: {line}")
            output.new_line()
