"""docs/config.md is generated from the config dataclasses and must stay current."""
import dataclasses

from kdray.config import ExperimentConfig, config_hash, flatten, to_dict
from kdray.config_reference import DOC_PATH, all_rows, main, reference_markdown, sections


def test_docs_config_md_is_current():
    assert DOC_PATH.read_text() == reference_markdown(), \
        "docs/config.md is out of date: run python -m kdray.config_reference"
    assert main(["--check"]) == 0


def test_every_field_and_section_has_a_doc():
    rows = all_rows()
    assert {r.key for r in rows} == set(flatten(ExperimentConfig()))   # every leaf, once
    assert [r.key for r in rows if not r.doc.strip()] == []
    assert [s.key for s in sections() if s.key and not s.doc.strip()] == []


def test_concrete_rows():
    rows = {r.key: r for r in all_rows()}
    lr = rows["teacher.train.lr"]
    assert (lr.type, lr.default, lr.allowed) == ("float", "0.002", "[0.0, 1.0]")
    assert "Adam" in lr.doc
    # nested defaults are the ones a run gets, not the class defaults
    assert rows["student.model.backbone"].default == "mobilenetv3_small_100"
    assert rows["tsd.stage2.train.epochs"].default == "30"
    assert rows["tsd.stage2.train.lr"].default == "0.001"
    assert rows["data.input_size"].type == "[int, int]"
    assert rows["data.input_size"].default == "[96, 64]"
    assert rows["cdkd.etht"].type == "list of str" and rows["cdkd.etht"].default == "[tau]"
    assert rows["data.shards"].allowed == "one of `auto`, `on`, `off`"
    assert rows["cdkd.tau_init"].allowed == ">= 0.01"
    text = reference_markdown()
    assert "| `teacher.train.lr` | float | `0.002` | [0.0, 1.0] | Adam learning rate |" in text


def test_check_fails_on_a_stale_file(tmp_path, capsys):
    stale = tmp_path / "config.md"
    stale.write_text("# old\n")
    assert main(["--check", "--out", str(stale)]) == 1
    assert "out of date" in capsys.readouterr().err
    assert main(["--out", str(stale)]) == 0 and stale.read_text() == reference_markdown()


def test_docs_are_metadata_only_not_hashed():
    """Field docs live in dataclass metadata; config hashes see only the values."""
    cfg = ExperimentConfig()
    f = {x.name: x for x in dataclasses.fields(type(cfg.teacher.train))}["lr"]
    assert f.metadata["doc"]
    # a plain dict of the values (no metadata at all) hashes the same as the dataclass
    assert config_hash(cfg.teacher) == config_hash(to_dict(cfg.teacher))
    assert config_hash(cfg) == config_hash(to_dict(cfg))
