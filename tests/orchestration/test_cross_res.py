"""pipelines/cross_res_refine.py on a real local Ray and MLflow: the CDKD student refined by
IGP-GCN beside the CDKD student and the low-resolution baseline trained alone."""
from __future__ import annotations

import json

from .conftest import FAST, REPO, SMOKE, load_script


def test_cross_res_refine_runs_baseline_cdkd_and_refined(tmp_path, smoke_data, ray_local,
                                                         capsys):
    script = load_script(REPO / "pipelines" / "cross_res_refine.py", "cross_res_refine")
    summary = script.main(["--config", str(SMOKE), "--storage", str(tmp_path), *FAST,
                           f"data.root={smoke_data}"])
    m = summary["metrics"]
    for k in ("AP_teacher", "AP_baseline", "AP_cdkd", "AP_refined"):
        assert isinstance(m[k], float), k
    stages = summary["outputs"]["stages"]
    assert set(stages) == {"teacher", "cdkd", "refined", "baseline"}
    assert "/cdkd_gcn-" in stages["refined"] and "/cdkd-" in stages["baseline"]
    assert stages["baseline"] != stages["cdkd"]        # no KD: its own stage key
    refined = json.loads((tmp_path / "runs" / "stages" / stages["refined"].split("/")[-3]
                          / "metrics.json").read_text())["final"]
    assert {"loss_gcn1", "loss_gcn2", "loss_gcn3", "val_AP"} <= set(refined)
    assert set(summary["outputs"]["models"]) == {"kdray-teacher", "kdray-cdkd-student",
                                                 "kdray-cdkd-refined"}
    # The refined low-res model loads from its checkpoint and keeps the low-res input size.
    from kdray.inference import model_from_checkpoint
    _, meta = model_from_checkpoint(stages["refined"])
    assert meta["kind"] == "refined" and meta["input_size"] == [32, 32]

    # pipelines/cdkd.py reports the same baseline beside its CDKD student: one cached stage
    cdkd = load_script(REPO / "pipelines" / "cdkd.py", "cdkd_pipeline").main(
        ["--config", str(SMOKE), "--storage", str(tmp_path), *FAST, f"data.root={smoke_data}"])
    assert cdkd["outputs"]["stages"]["baseline"] == stages["baseline"]
    assert cdkd["outputs"]["stages"]["cdkd"] == stages["cdkd"]
    assert (cdkd["metrics"]["AP_baseline"], cdkd["metrics"]["AP_cdkd"]) == (m["AP_baseline"],
                                                                            m["AP_cdkd"])
    capsys.readouterr()
