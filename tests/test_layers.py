"""The architecture's rules, checked on the source (docs/architecture.md): Ray, Optuna and
MLflow stay under kdray/orchestration/; stage kinds are objects, never compared as strings."""
import ast
import re
import subprocess
import sys
from pathlib import Path

from kdray.cli import build_parser
from kdray.stages import STAGES

REPO = Path(__file__).resolve().parents[1]
EDGE = {"ray", "optuna", "mlflow"}
DYNAMIC = {"import_module", "__import__"}   # importlib.import_module("ray"), __import__("ray")


def _imports(source: str) -> set[str]:
    """Top-level package of every import anywhere in ``source``: module level, inside functions,
    try/except or ``if TYPE_CHECKING``, and dynamic imports of a constant name."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and getattr(node.func, "attr", getattr(node.func, "id", None)) in DYNAMIC):
            names.add(node.args[0].value.split(".")[0])
    return names


def _layered_files():
    return [*(REPO / "kdray").rglob("*.py"), *(REPO / "pipelines").rglob("*.py")]


def test_import_detector_sees_every_form():
    src = """
import os, ray.tune as tune
from mlflow.tracking import MlflowClient
def f():
    import optuna
try:
    import ray
except ImportError:
    pass
if TYPE_CHECKING:
    from mlflow import MlflowClient
g = importlib.import_module("ray.train")
h = __import__("optuna")
from . import tracking
"""
    assert _imports(src) == {"os", "ray", "mlflow", "optuna"}
    assert _imports("from .ray import x\nimport_module(name)\n") == set()


def test_ray_optuna_mlflow_are_imported_only_under_orchestration():
    files = _layered_files()
    inside = set().union(*(_imports(p.read_text()) for p in files if "orchestration" in p.parts))
    # the walk reaches the files that do import them (Optuna comes via ray.tune.search.optuna)
    assert {"ray", "mlflow"} <= inside
    offenders = {str(p.relative_to(REPO)): sorted(_imports(p.read_text()) & EDGE)
                 for p in files
                 if "orchestration" not in p.parts and _imports(p.read_text()) & EDGE}
    assert offenders == {}, offenders


def test_core_modules_load_without_ray_optuna_mlflow():
    """Not even through an import of kdray.orchestration: every kdray module outside it imports
    in a fresh interpreter with none of the three in sys.modules (cli.py imports
    kdray.orchestration.tracking inside the commands that need it)."""
    modules = sorted(".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
                     for p in (REPO / "kdray").rglob("*.py") if "orchestration" not in p.parts)
    code = (f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {sorted(EDGE)!r}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout
    assert len(modules) >= 30 and out.strip() == "[]", out


def test_no_stage_name_compared_as_a_string():
    pattern = re.compile(r"stage\w*(\.name)?\s*(==|!=)\s*['\"]|['\"]\s*(==|!=)\s*\w*stage")
    found = [f"{p.relative_to(REPO)}:{i}: {line.strip()}"
             for p in _layered_files()
             for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert found == [], found


def test_cli_stage_choices_are_the_stage_kinds():
    sub = next(a for a in build_parser()._actions if a.dest == "cmd").choices["train"]
    stage = next(a for a in sub._actions if a.dest == "stage")
    assert tuple(stage.choices) == tuple(STAGES)


def test_each_kind_names_its_train_config_model_and_size():
    from kdray.config import ExperimentConfig
    cfg = ExperimentConfig()
    sizes = {name: kind.input_size(cfg) for name, kind in STAGES.items()}
    assert sizes["teacher"] == sizes["student"] == sizes["gcn"] == cfg.data.input_size
    assert sizes["cdkd"] == sizes["cdkd_gcn"] == cfg.cdkd.low_res_size
    assert STAGES["gcn"].train(cfg) is cfg.tsd.stage2.train
    assert STAGES["cdkd_gcn"].model(cfg) is cfg.cdkd.student.model
    assert STAGES["cdkd"].inputs(cfg) == ("teacher",)
    assert len({k.model_name for k in STAGES.values()}) == len(STAGES)
