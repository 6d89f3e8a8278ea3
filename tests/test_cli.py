"""The command-line contract of docs/architecture.md (the names outside checks call)."""
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


# ---- every option documents itself (issue 14) ------------------------------------------------

import argparse  # noqa: E402
import importlib.util  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from kdray.cli import build_parser  # noqa: E402

PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"


def _actions(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(command path, parser, action) for every option of ``parser`` and its sub-commands."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _actions(sub, path + (name,))
        elif not isinstance(action, argparse._HelpAction):
            yield path, parser, action


def _undocumented(parser: argparse.ArgumentParser) -> list[str]:
    """Options without a help text, or whose help does not show a non-None, non-False default."""
    bad = []
    for path, sub, action in _actions(parser):
        name = " ".join(path + (action.option_strings[0] if action.option_strings
                                else action.dest,))
        if not action.help or action.help == argparse.SUPPRESS:
            bad.append(f"{name}: no help text")
            continue
        if action.default is not None and action.default is not False:
            shown = sub._get_formatter()._expand_help(action)
            if str(action.default) not in shown:
                bad.append(f"{name}: default {action.default!r} not in help {shown!r}")
    return bad


def test_every_kdray_option_has_help_showing_its_default():
    parser = build_parser()
    assert sum(1 for _ in _actions(parser)) > 30          # the walk reaches the sub-commands
    assert _undocumented(parser) == []


def _pipeline_parser(script: str, monkeypatch) -> argparse.ArgumentParser:
    """The parser pipelines/<script>.py builds (shared parse_args + its own options)."""
    spec = importlib.util.spec_from_file_location(f"pipeline_{script}", PIPELINES / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    built = {}

    def capture(self, *args, **kwargs):
        built["parser"] = self
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_intermixed_args", capture)
    with pytest.raises(SystemExit):
        module.main([])
    return built["parser"]


@pytest.mark.parametrize("script", ["two_stage", "cdkd", "sweep", "ablation"])
def test_every_pipeline_option_has_help_showing_its_default(script, monkeypatch):
    parser = _pipeline_parser(script, monkeypatch)
    assert "--storage" in parser._option_string_actions
    assert _undocumented(parser) == []
