"""The benchmark results log (OUT/results.jsonl): no finished row is ever lost, whatever kill or damage the
file went through, and every sample counts once."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from benchmarks.common import BenchmarkError
from benchmarks.report import summarise
from benchmarks.runner import ResultsLog
from ramba.data.tasks import Key

ROOT = Path(__file__).resolve().parents[1]


def row(i: int, size: int = 20) -> dict:
    """The result of sample i, with an output of `size` characters."""
    return {"model": "m", "task": "passkey", "length": 512, "depth": 0.5, "index": i, "score": i % 2,
            "output": "x" * size}


def line(i: int, size: int = 20) -> str:
    return json.dumps(row(i, size)) + "\n"


def key(i: int) -> Key:
    return Key("passkey", 512, 0.5, i)


def indices(rows: list[dict]) -> list[int]:
    return sorted(r["index"] for r in rows)


def test_an_unfinished_last_line_is_dropped_and_the_rest_kept(tmp_path):
    log_file = tmp_path / "results.jsonl"
    log_file.write_text(line(0) + line(1) + line(2)[:25])
    log = ResultsLog(tmp_path, {})
    assert indices(log.rows) == [0, 1] and not log.done("m", key(2))
    log.add(row(2))
    assert log_file.read_text() == line(0) + line(1) + line(2)
    assert indices(ResultsLog(tmp_path, {}).rows) == [0, 1, 2]


def test_a_finished_row_that_lost_its_newline_is_kept_and_the_next_goes_on_its_own_line(tmp_path):
    (tmp_path / "results.jsonl").write_text(line(0) + line(1).rstrip("\n"))
    log = ResultsLog(tmp_path, {})
    assert indices(log.rows) == [0, 1]
    log.add(row(2))
    assert (tmp_path / "results.jsonl").read_text() == line(0) + line(1) + line(2)
    assert indices(ResultsLog(tmp_path, {}).rows) == [0, 1, 2]


def test_rows_joined_on_one_line_are_all_read(tmp_path):
    """A file from before the newline was mended: a row shares a line with the next one."""
    (tmp_path / "results.jsonl").write_text(line(0).rstrip("\n") + line(1) + line(2))
    assert indices(ResultsLog(tmp_path, {}).rows) == [0, 1, 2]


def test_two_runs_into_one_folder_count_each_sample_once(tmp_path):
    first, second = ResultsLog(tmp_path, {"seed": 0}), ResultsLog(tmp_path, {"seed": 0})  # both open, then run
    for log in (first, second):
        for i in range(3):
            log.add(row(i))
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 6
    rows = ResultsLog(tmp_path, {"seed": 0}).rows
    assert indices(rows) == [0, 1, 2]
    summarise(rows, tmp_path, "t")
    cells = json.loads((tmp_path / "summary.json").read_text())["by_length"]
    assert [(c["samples"], c["accuracy"]) for c in cells] == [(3, 100.0 / 3)]


def test_a_line_missing_fields_is_named(tmp_path):
    bad = {k: v for k, v in row(1).items() if k not in ("score", "depth")}
    (tmp_path / "results.jsonl").write_text(line(0) + json.dumps(bad) + "\n" + line(2))
    with pytest.raises(BenchmarkError, match=r"results.jsonl, line 2.*depth, score"):
        ResultsLog(tmp_path, {})
    (tmp_path / "results.jsonl").write_text(line(0) + "[1, 2]\n")
    with pytest.raises(BenchmarkError, match="line 2, is not a result row"):
        ResultsLog(tmp_path, {})
    (tmp_path / "results.jsonl").write_text(line(0) + "{oops\n" + line(2))
    with pytest.raises(BenchmarkError, match="line 2, is not JSON"):
        ResultsLog(tmp_path, {})


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(0, 300), min_size=1, max_size=6), data=st.data(),
       back=st.one_of(st.sampled_from([0, 1, 2]), st.integers(0, 400)))
def test_a_kill_at_any_byte_loses_no_finished_row(tmp_path_factory, sizes, data, back):
    """A kill while appending leaves some prefix of the file: here `back` bytes short of the end of row
    `cut_row` (1: its newline lost). Opening it keeps every row written whole; the interrupted sweep, run
    again, then completes the log, every sample exactly once."""
    folder = tmp_path_factory.mktemp("log")
    whole = "".join(line(i, size) for i, size in enumerate(sizes)).encode()
    ends = [sum(len(line(j, sizes[j])) for j in range(i + 1)) for i in range(len(sizes))]  # after each newline
    at = max(0, ends[data.draw(st.integers(0, len(sizes) - 1), label="cut_row")] - back)
    (folder / "results.jsonl").write_bytes(whole[:at])
    finished = [i for i, end in enumerate(ends) if end - 1 <= at]  # its closing brace written
    log = ResultsLog(folder, {})
    assert indices(log.rows) == finished
    for i, size in enumerate(sizes):
        if not log.done("m", key(i)):
            log.add(row(i, size))
    again = ResultsLog(folder, {}).rows
    assert indices(again) == list(range(len(sizes)))
    assert all(r == row(r["index"], sizes[r["index"]]) for r in again)


WRITER = """
import random, sys
from pathlib import Path
from types import SimpleNamespace
sys.path.insert(0, sys.argv[2])
from benchmarks.results_log import ResultsLog
log = ResultsLog(Path(sys.argv[1]), {"seed": 0})
rng = random.Random()
for i in range(10**6):
    if not log.done("m", SimpleNamespace(task="passkey", length=512, depth=0.5, index=i)):
        log.add({"model": "m", "task": "passkey", "length": 512, "depth": 0.5, "index": i, "score": i % 2,
                 "output": "x" * (i * 7919 % 200_000)})
        print(i, flush=True)
"""


def test_writers_killed_at_random_moments_lose_no_finished_row(tmp_path):
    """Fault injection: a writer is SIGKILLed at random moments (while opening and mending the log, or in the
    middle of appending a row of up to 200 kB), now and then after a torn row is planted at the end of the
    file; every row the writer reported finished is in the log afterwards, once and intact."""
    rng = random.Random(0)
    finished: set[int] = set()
    start = time.monotonic()
    for round_ in range(12):
        if round_ % 3 == 2:
            with open(tmp_path / "results.jsonl", "a") as f:
                f.write(line(10**7, 50_000)[:rng.randrange(1, 50_000)])  # a torn row for the next open to mend
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), str(ROOT)], stdout=subprocess.PIPE,
                                  text=True)
        time.sleep(rng.uniform(0.0, 0.4))
        os.kill(writer.pid, signal.SIGKILL)
        out, _ = writer.communicate()
        finished |= {int(n) for n in out.split()}
        rows = ResultsLog(tmp_path, {"seed": 0}).rows if (tmp_path / "results.jsonl").exists() else []
        assert set(indices(rows)) >= finished and len(rows) == len({r["index"] for r in rows})
        assert all(r["output"] == "x" * (r["index"] * 7919 % 200_000) for r in rows)
        if time.monotonic() - start > 12:
            break
    assert finished, "no writer finished a row: the kills came too early to test anything"
