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
