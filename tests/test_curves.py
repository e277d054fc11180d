"""benchmarks.curves: reading recipe metrics and learnability tables, stages joined."""

import json

import pytest

from benchmarks.curves import main, read_curve


def test_stages_of_metrics_add_up_and_tables_are_read(tmp_path):
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first.write_text("\n".join(json.dumps(r) for r in [{"step": 50, "loss": 2.0}, {"step": 100, "eval_loss": 1.0,
                                                        "eval_answer_accuracy": 0.25}]) + "\n")
    second.write_text(json.dumps({"step": 30, "eval_loss": 0.5, "eval_answer_accuracy": 0.75}) + "\n")
    assert read_curve(f"{first}+{second}") == [(100, 0.25), (130, 0.75)]
    assert read_curve(str(first), "eval_loss") == [(100, 1.0)]
    with pytest.raises(ValueError, match="eval_answer_accuracy_vt"):
        read_curve(str(first), "eval_answer_accuracy_vt")
    third = tmp_path / "c.jsonl"  # a later stage that trains (and evaluates) another task as well
    third.write_text(json.dumps({"step": 40, "eval_answer_accuracy_vt": 0.5}) + "\n")
    assert read_curve(f"{first}+{second}+{third}", "eval_answer_accuracy_vt") == [(170, 0.5)]
    table = tmp_path / "t.md"
    table.write_text("`cmd`\n\n| step | train loss | held-out loss | answer tokens right | keys right | seconds |\n"
                     "| ---: | ---: | ---: | ---: | ---: | ---: |\n| 100 | 1.0 | 1.1 | 0.5 | 0.125 | 3 |\n"
                     "| 200 | 0.5 | 0.6 | 0.9 | 0.875 | 6 |\n")
    assert read_curve(str(table)) == [(100, 0.125), (200, 0.875)]
    main([f"run={first}+{second}", f"table={table}", "--out", str(tmp_path / "c.png")])
    assert (tmp_path / "c.png").stat().st_size > 1000


def test_bad_arguments_say_what_to_write(tmp_path):
    with pytest.raises(SystemExit, match="NAME=FILE"):
        main(["nofile", "--out", str(tmp_path / "c.png")])
    (tmp_path / "x.txt").write_text("")
    with pytest.raises(SystemExit, match="expected a metrics.jsonl"):
        main([f"x={tmp_path / 'x.txt'}", "--out", str(tmp_path / "c.png")])
