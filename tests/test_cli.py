"""The command-line contract of DESIGN.md section 1 (the names outside checks call)."""
import json

from kdray.cli import main as kdray


def test_eval_json_prints_the_contract_keys(real_data, capsys, tmp_path):
    gt = json.loads((real_data / "coco" / "test_coco.json").read_text())
    preds = [{"image_id": a["image_id"], "category_id": 1, "keypoints": a["keypoints"],
              "score": 1.0} for a in gt["annotations"] if a.get("num_keypoints", 0) > 0]
    pred_file = tmp_path / "pred.json"
    pred_file.write_text(json.dumps(preds))
    assert kdray(["eval", "--gt", str(real_data / "coco" / "test_coco.json"), "--pred",
                  str(pred_file), "--metric", "coco", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"AP", "AP50", "AP75", "APM", "APL", "AR"} <= set(out)
    assert out["AP"] == 100.0


def test_data_synth_stats_and_preview(tmp_path, capsys):
    root = tmp_path / "sp"
    assert kdray(["data", "synth", "--out", str(root), "--train", "20", "--val", "8",
                  "--workers", "1", "--stats"]) == 0
    text = capsys.readouterr().out
    stats = json.loads(text[text.index("\n{") + 1:])
    assert stats["train"]["persons"] == 20 and stats["val"]["persons"] == 8
    png = tmp_path / "preview.png"
    assert kdray(["data", "preview", "--root", str(root), "--out", str(png), "-n", "6"]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_bad_input_exits_2_with_the_file_named(tmp_path, capsys):
    bad = tmp_path / "gt.json"
    bad.write_text("{not json")
    assert kdray(["eval", "--gt", str(bad), "--pred", str(bad), "--metric", "coco"]) == 2
    assert str(bad) in capsys.readouterr().err
