"""The architecture's rules, checked on the source (docs/architecture.md): Ray, Optuna and
MLflow stay under kdray/orchestration/; stage kinds are objects, never compared as strings."""
import ast
import re
from pathlib import Path

from kdray.cli import build_parser
from kdray.stages import STAGES

REPO = Path(__file__).resolve().parents[1]
EDGE = {"ray", "optuna", "mlflow"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_ray_optuna_mlflow_are_imported_only_under_orchestration():
    offenders = {str(p.relative_to(REPO)): sorted(_imports(p) & EDGE)
                 for p in [*(REPO / "kdray").rglob("*.py"), *(REPO / "pipelines").glob("*.py")]
                 if "orchestration" not in p.parts and _imports(p) & EDGE}
    assert offenders == {}, offenders


def test_no_stage_name_compared_as_a_string():
    pattern = re.compile(r"stage\w*(\.name)?\s*(==|!=)\s*['\"]|['\"]\s*(==|!=)\s*\w*stage")
    found = [f"{p.relative_to(REPO)}:{i}: {line.strip()}"
             for p in [*(REPO / "kdray").rglob("*.py"), *(REPO / "pipelines").glob("*.py")]
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
