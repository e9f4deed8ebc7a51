"""Imports run downward only: cli -> api -> serve -> tasks -> pretrained -> export -> training / inference / report
-> store -> model, text, images -> config, errors.

Read from the source with `ast`, so a new import that breaks the layering fails here
whatever it does at run time (imports inside functions count too).
"""

import ast
from pathlib import Path

import transformer

ROOT = Path(transformer.__file__).parent
# What each part may import besides itself (config and errors: the bottom, imported by all;
# files, the atomic file operations, and device, where and in what precision to compute, may be imported
# by every part but config and errors).
ALLOWED = {
    "config": {"errors"},
    "errors": set(),
    "files": {"errors"},
    "device": {"errors"},
    "model": {"config", "errors"},
    "text": {"config", "errors"},
    "images": {"config", "errors"},
    "store": {"config", "errors", "model", "text", "images"},
    "training": {"config", "errors", "model", "text", "store"},
    "inference": {"config", "errors", "model", "text", "images", "store"},
    "report": {"config", "errors", "model", "text", "images", "inference", "store"},
    "export": {"config", "errors", "model", "text", "inference", "store"},
    "pretrained": {"config", "errors", "model", "text", "store", "export"},  # export: Marian's position layout
    "tasks": {"config", "errors", "model", "text", "images", "training", "inference", "report", "export", "store"},
    "serve": {"config", "errors", "model", "text", "inference", "report", "tasks", "export", "store"},
    "api": {"config", "errors", "model", "text", "images", "training", "inference", "report", "tasks", "export",
            "serve", "store", "corpora", "pretrained"},
    "cli": {"config", "errors", "model", "text", "images", "training", "inference", "report", "tasks", "export",
            "serve", "corpora", "store", "api", "pretrained"},
    "corpora": set(),
}


def _part(module: str) -> str | None:
    """The top-level part of a module of the package ("transformer.model.cache" -> "model")."""
    parts = module.split(".")
    return parts[1] if parts[0] == "transformer" and len(parts) > 1 else None


def _imports(path: Path) -> set[str]:
    package = ".".join(("transformer", *path.relative_to(ROOT).with_suffix("").parts[:-1]))
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the file's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    return {m for m in found if _part(m) is not None}


def test_imports_run_downward():
    wrong = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if len(rel.parts) == 1 and rel.stem in ("__init__", "__main__"):
            continue  # the package's front door re-exports the model and runs the command line
        part = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        for module in _imports(path):
            target = _part(module)
            allowed = ALLOWED[part] | ({"files", "device"} if part not in ("config", "errors", "files", "device") else set())
            if target != part and target not in allowed and target in ALLOWED:
                wrong.append(f"{rel} imports {module}")
    assert not wrong, "\n".join(wrong)


def test_the_model_imports_no_optimiser_or_command_line():
    """The model knows no optimiser, loss function module or command line (they live above it)."""
    for path in sorted((ROOT / "model").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names = {alias.name for n in ast.walk(tree) if isinstance(n, ast.Import) for alias in n.names}
        names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not {m for m in names if m.startswith(("torch.optim", "argparse", "tqdm", "sacrebleu"))}, path
