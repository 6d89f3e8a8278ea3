"""Every row of the papers' ablation tables is a valid config of the same code."""
from pathlib import Path

import pytest
import yaml

from kdray.config import load_config, with_overrides

TABLES = yaml.safe_load((Path(__file__).parents[1] / "configs" / "ablations.yaml").read_text())
ROWS = [(t, r) for t, spec in TABLES.items() for r in spec["rows"]]


def test_tables_have_the_papers_rows():
    assert list(TABLES["tsd-iv"]["rows"]) == ["baseline", "s1", "s2", "s3", "s4", "s5", "s6"]
    assert len(TABLES["cdkd-iii"]["rows"]) == 6
    assert [r["set"]["cdkd.projectors"] for r in TABLES["cdkd-vi"]["rows"].values()] == [1, 2, 3, 4, 5]
    assert len(TABLES["cdkd-vii"]["rows"]) == 6 and len(TABLES["cdkd-viii"]["rows"]) == 4


@pytest.mark.parametrize("table, row", ROWS)
def test_row_is_a_valid_config(table, row):
    base = load_config(Path(__file__).parents[1] / "configs" / "smoke.yaml")
    spec = TABLES[table]["rows"][row]
    cfg = with_overrides(base, spec["set"], source=f"ablations.yaml:{table}:{row}")
    for key, value in spec["set"].items():
        got = cfg
        for part in key.split("."):
            got = getattr(got, part)
        assert got == (tuple(value) if isinstance(value, list) else value)
    assert spec["paper"]


def test_tsd_rows_differ_only_in_switches():
    s = TABLES["tsd-iv"]["rows"]
    # s4 and s6 share one stage-1 student; baseline, s1 and s5 share the undistilled one
    stage1 = lambda r: {k: v for k, v in s[r]["set"].items() if k.startswith("tsd.stage1")}
    assert stage1("s4") == stage1("s6")
    assert stage1("baseline") == stage1("s1") == stage1("s5")


def test_every_table_names_a_baseline_row_and_what_the_paper_measures():
    from kdray.orchestration.ablation import load_table
    for name, spec in TABLES.items():
        assert load_table(name)["baseline"] in spec["rows"] and spec["paper_measure"]


def test_summary_pairs_rows_with_the_baseline_by_seed():
    from kdray.orchestration.ablation import markdown, summarise
    table = {"name": "t", "metric": "AP", "baseline": "base",
             "rows": {"base": {"paper": {"AP": 60.0}, "set": {}},
                      "kd": {"paper": {"AP": 61.0}, "set": {"tsd.stage1.feature": True}}}}
    # seed effects 10, 20, 30 shared by both rows; kd is +1.0, +1.2, +0.8 on the same seeds
    base, kd = [10.0, 20.0, 30.0], [11.0, 21.2, 30.8]
    trials = [(row, s, {"val_AP": v, "mlflow_run_id": f"{row}{s}" * 4})
              for row, vals in (("kd", kd), ("base", base)) for s, v in enumerate(vals)]
    recs = {r["row"]: r for r in summarise(table, trials, "val_AP")}
    assert recs["kd"]["values"] == kd and recs["kd"]["seed_ids"] == [0, 1, 2]
    assert recs["kd"]["mean"] == pytest.approx(21.0) and recs["kd"]["std"] == pytest.approx(98.04 ** 0.5)
    assert recs["kd"]["vs_baseline"] == pytest.approx(1.0)
    assert recs["kd"]["vs_ci_lo"] == pytest.approx(1 - 4.302652729911275 * 0.2 / 3 ** 0.5)
    assert recs["kd"]["resolved"] is True and recs["base"]["resolved"] is False
    md = markdown(table, list(recs.values()), "val_AP")
    kd_line = next(line for line in md.splitlines() if line.startswith("| kd "))
    # std sqrt((100 + 0.04 + 96.04) / 2) = 9.90; the paired CI 1 +- 0.497 excludes 0: marked *
    assert "+1.00 [+0.50, +1.50] *" in kd_line and "21.00 +- 9.90" in kd_line
    assert "(baseline)" in next(line for line in md.splitlines() if line.startswith("| base "))
    # a seed missing from the baseline is left out of the pairing, not paired with another seed
    recs = {r["row"]: r for r in summarise(table, trials[:-1], "val_AP")}
    assert recs["kd"]["vs_baseline"] == pytest.approx(1.1)     # seeds 0 and 1 only


def test_cdkd_baseline_rows_are_the_pipelines_baseline_stage():
    # the low-res student trained alone hashes no KD setting: the cdkd-iii baseline row (which
    # leaves etht, projectors, ... at their defaults) and pipelines/cdkd.py's baseline share it
    from kdray.orchestration.ablation import row_config
    from kdray.orchestration.pipeline import stage_key
    from kdray.stages import CDKD_STUDENT, low_res_baseline
    base = load_config(Path(__file__).parents[1] / "configs" / "smoke.yaml")
    row = row_config(base, TABLES["cdkd-iii"], "baseline", seed=0)
    assert row.cdkd.etht == ("tau",) and low_res_baseline(base).cdkd.etht == ()
    assert stage_key(CDKD_STUDENT, row, {}) == stage_key(CDKD_STUDENT, low_res_baseline(base), {})
    distilled = row_config(base, TABLES["cdkd-iii"], "cdkd", seed=0)
    assert stage_key(CDKD_STUDENT, distilled, {"teacher": "t"}) != stage_key(CDKD_STUDENT, row, {})
