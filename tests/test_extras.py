"""Each install extra installs what its code imports.

The static tests read the imports of every module (ast) and check each third-party one
against the requirement closure of the extra that code belongs to, resolved from
pyproject.toml and the installed packages' metadata. The slow test installs the README's
`worker` install into a fresh venv and runs a streamed score from it."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import venv
from functools import cache
from importlib import metadata
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
#: source roots of the installed packages: folder -> import name
ROOTS = {"service": "layertrack.service", "workers": "layertrack.workers", "integrations": "layertrack.integrations",
         "migrations": "layertrack.migrations"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@cache
def _requires(dist: str, extras: frozenset[str]) -> frozenset[str]:
    """Distribution names ``dist[extras]`` needs, transitively (markers evaluated here)."""
    if _norm(dist) == "layertrack":
        reqs = [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]
        for extra in extras:
            reqs += [Requirement(r) for r in PYPROJECT["project"]["optional-dependencies"][extra]]
    else:
        try:
            declared = metadata.requires(dist) or []
        except metadata.PackageNotFoundError:
            return frozenset()
        reqs = []
        for r in map(Requirement, declared):
            if r.marker is None or any(r.marker.evaluate({"extra": e}) for e in (extras or {""})):
                reqs.append(r)
    out: set[str] = set()
    for r in reqs:
        if r.marker is not None and not any(r.marker.evaluate({"extra": e}) for e in (extras or {""})):
            continue
        name = _norm(r.name)
        if name == "layertrack":
            out |= _requires("layertrack", frozenset(r.extras))
            continue
        out.add(name)
        out |= _requires(name, frozenset(r.extras))
    return frozenset(out)


def closure(*extras: str) -> frozenset[str]:
    return _requires("layertrack", frozenset(extras))


@cache
def _module_dists() -> dict[str, set[str]]:
    return {m: {_norm(d) for d in ds} for m, ds in metadata.packages_distributions().items()}


def _import_time_nodes(tree: ast.AST):
    """The nodes run when the module is imported: not function bodies, not ``if TYPE_CHECKING``."""
    todo = list(ast.iter_child_nodes(tree))
    while todo:
        node = todo.pop()
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            continue
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)
            continue
        yield node
        todo.extend(ast.iter_child_nodes(node))


def _imports(path: Path, *, module_level_only: bool = False) -> set[str]:
    """Absolute imports of one file (top-level names for third parties, full names for ours:
    with ``module_level_only``, relative imports resolved too)."""
    tree = ast.parse(path.read_text(), str(path))
    out = set()
    for node in _import_time_nodes(tree) if module_level_only else ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module)
        elif isinstance(node, ast.ImportFrom) and node.level and module_level_only:
            base = _resolve_relative(path, node)
            out |= {base} | {f"{base}.{a.name}" for a in node.names}
    return out


def _resolve_relative(path: Path, node: ast.ImportFrom) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    package = [*ROOTS[rel.parts[0]].split("."), *rel.parts[1:-1]]
    base = package[: len(package) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _module_file(name: str) -> Path | None:
    for folder, pkg in ROOTS.items():
        if name == pkg or name.startswith(pkg + "."):
            rest = name[len(pkg):].lstrip(".").split(".") if name != pkg else []
            base = REPO / folder / Path(*rest) if rest else REPO / folder
            for candidate in (base.with_suffix(".py"), base / "__init__.py"):
                if candidate.is_file():
                    return candidate
    return None


def _third_party(names: set[str], local: set[str] = frozenset()) -> set[str]:
    tops = {n.split(".")[0] for n in names}
    return {t for t in tops if t not in sys.stdlib_module_names and t != "layertrack" and t not in local}


def _missing(imported: set[str], allowed: frozenset[str]) -> dict[str, set[str]]:
    dists = _module_dists()
    out = {}
    for module in sorted(imported):
        provided = dists.get(module)
        assert provided, f"{module} is imported but no installed distribution provides it"
        if not provided & allowed:
            out[module] = provided
    return out


def _all_files(*folders: str) -> list[Path]:
    return [p for f in folders for p in sorted((REPO / f).rglob("*.py")) if ".venv" not in p.parts]


def test_every_package_of_the_sources_is_in_the_distribution():
    """A sub-package missing from pyproject's package list installs nowhere but an editable
    checkout (CI once found layertrack.workers.formats absent from the worker install)."""
    found = set()
    for folder, name in ROOTS.items():
        for init in (REPO / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / folder)
            found.add(".".join([name, *rel.parts]))
    declared = set(PYPROJECT["tool"]["setuptools"]["packages"])
    assert found - declared == set(), f"add to [tool.setuptools] packages: {sorted(found - declared)}"
    assert declared - found == set(), f"listed but not in the sources: {sorted(declared - found)}"


def test_the_api_side_imports_at_import_time_only_what_the_base_install_has():
    """`pip install -e .` (no extra): every module the API and the CLI import when they start
    (module-level imports, followed through our own modules) comes with the base install."""
    seen, todo, third = set(), [p for p in _all_files("service") if "demo" not in p.parts], set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in _imports(path, module_level_only=True):
            if name.startswith("layertrack."):
                target = _module_file(name) or _module_file(name.rsplit(".", 1)[0])
                if target is not None:
                    todo.append(target)
            else:
                third |= _third_party({name})
    assert "torch" not in third
    assert _missing(third, closure()) == {}


def test_the_worker_extra_installs_what_the_compute_side_imports():
    """`pip install -e '.[worker]'` (the README's run command): the service, the workers and
    their lazy imports (streamed execution's accelerate among them)."""
    imported = set()
    for path in _all_files("workers", "service", "migrations"):
        imported |= _third_party(_imports(path))
    assert "accelerate" in imported  # streamed execution
    assert _missing(imported, closure("worker")) == {}


def test_the_base_install_does_not_bring_the_compute_side():
    """The check above can fail: accelerate and torch come only with the worker extra."""
    assert {"accelerate", "torch"} & closure() == set()
    assert {"accelerate", "torch", "transformers"} <= closure("worker")


@pytest.mark.parametrize(("extra", "modules"), [("s3", {"obstore", "boto3"}), ("gcs", {"obstore"}),
                                                ("azure", {"obstore"}), ("hub", {"huggingface_hub"})])
def test_each_store_extra_installs_its_store_library(extra, modules):
    stores = _third_party(_imports(REPO / "workers" / "stores.py"))
    assert modules <= stores
    assert _missing(modules, closure(extra)) == {}


def test_the_integrations_extra_installs_what_the_callbacks_import():
    imported = set()
    for path in _all_files("integrations"):
        imported |= _third_party(_imports(path))
    assert {"transformers", "lightning"} <= imported
    assert _missing(imported, closure("integrations")) == {}


def test_the_test_extra_installs_what_the_tests_and_benches_import():
    local = {p.stem for p in _all_files("tests", "bench")} | {
        p.name for p in (REPO / "tests").iterdir() if p.is_dir() and any(p.glob("*.py"))}  # tests/writers
    imported = set()
    for path in _all_files("tests", "bench"):
        imported |= _third_party(_imports(path), local)
    # what the framework fixtures install for their writers alone, at test time, off the
    # project's environment (tests/framework_fixtures.py says why)
    from framework_fixtures import LITGPT_PACKAGES, TORCHTITAN_PACKAGES, TORCHTITAN_V02_PACKAGES

    at_test_time = {re.split(r"[=<>!~]", p)[0].replace("-", "_")
                    for p in TORCHTITAN_PACKAGES + TORCHTITAN_V02_PACKAGES + LITGPT_PACKAGES}
    assert {"torchtitan", "litgpt"} <= imported & at_test_time
    assert _missing(imported - at_test_time, closure("test")) == {}


# ------------------------------------------------------------------ a real install


@pytest.mark.slow
def test_a_streamed_score_runs_from_the_worker_install_alone(tmp_path, tokenizer):
    """The README's `worker` install, in a fresh venv of its own (nothing from this one):
    every compute-side module imports, and a checkpoint scored under a memory budget smaller
    than its weights (streamed: block by block, through accelerate) equals resident scoring."""
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
    python = str(env_dir / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"

    def pip(*args: str) -> None:
        # --no-compile: byte-compiling every installed module (torch, transformers) took most of
        # the install's time; the modules this test runs compile when first imported
        r = subprocess.run([python, "-m", "pip", "install", "-q", "--no-compile", *args], env=env,
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    pip("torch==2.13.0")  # as the README says, before the project (the pinned build of this machine)
    # from a copy of the sources: a build writes build/ and *.egg-info beside them
    source = tmp_path / "src"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__",
                                                                ".pytest_cache", ".ruff_cache"))
    pip("--no-build-isolation", f"{source}[worker]")  # the venv's own setuptools builds it
    modules = sorted(f"layertrack.workers.{p.stem}" for p in (REPO / "workers").glob("*.py") if p.stem != "__init__")
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
    r = subprocess.run([python, "-c", code, *modules, "layertrack.service.queue", "layertrack.workers.streaming"],
                       env=env, capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    from layertrack.workers.scoring import ScoreConfig, prepare
    from tiny_models import build_checkpoint

    ckpt = build_checkpoint(tmp_path / "ckpt", "llama", tokenizer, seed=3, hidden=256, layers=6)
    options = {"max_tokens": 512, "seq_len": 64, "batch_size": 1}
    budget = prepare(str(ckpt), config=ScoreConfig(**options, execution="streamed")).plan.peak_bytes
    cli = str(env_dir / "bin" / "layertrack")
    common = ["score", str(ckpt), "--json", *(f"--{k.replace('_', '-')}={v}" for k, v in options.items())]
    outs = {}
    for name, extra in (("resident", []), ("streamed", ["--max-memory", str(budget)])):
        r = subprocess.run([cli, *common, *extra], env=env, capture_output=True, text=True, cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        outs[name] = json.loads(r.stdout)
    assert outs["resident"]["plan"]["mode"] == "resident"
    assert outs["streamed"]["plan"]["mode"] == "streamed"
    a, b = outs["resident"]["pairs"], outs["streamed"]["pairs"]
    assert len(a) == len(b) > 0
    for p, q in zip(a, b, strict=True):
        for metric in ("linearity", "linearity_nores", "cosine", "norm_ratio"):
            assert abs(p[metric] - q[metric]) <= 1e-9, (metric, p, q)
