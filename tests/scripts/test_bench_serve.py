"""scripts/bench_serve.py --soak: the report's checks on made-up rounds (each can fail), and a few seconds of a
real soak against `hierloc serve` on the tiny model (integration)."""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys

import pytest

from tests.scripts.test_common import SCRIPTS, load_script_module


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(SCRIPTS))          # the script imports _common as python puts scripts/ on its path
    try:
        yield load_script_module("bench_serve")
    finally:
        sys.path.remove(str(SCRIPTS))


def _round(bench, answers: dict[str, dict[int, int]], rss_warm: float = 400.0, rss_end: float = 401.0) -> dict:
    kinds = bench.soak_requests([("a.jpg", b"\xff\xd8" + bytes(100))], 1024)
    by_kind = {kind: collections.Counter(answers.get(kind, {kinds[kind][1]: 3})) for kind in kinds}
    unexpected = collections.Counter()
    for kind, counter in by_kind.items():
        for status, n in counter.items():
            if status != kinds[kind][1]:
                unexpected[str(status)] += n
    return kinds, {"n": 1, "seconds": 1.0, "requests": sum(sum(c.values()) for c in by_kind.values()),
                   "good_200": by_kind["good"][200], "p50_ms": 1.0, "p99_ms": 2.0,
                   "by_status": sum(by_kind.values(), collections.Counter()), "by_kind": by_kind,
                   "unexpected": unexpected, "rss_warm": rss_warm, "rss_end": rss_end, "rss_max": rss_end}


@pytest.mark.parametrize("answers, rss_end, failing", [
    ({}, 401.0, []),
    ({"good": {200: 2, 500: 1}}, 401.0, ["unexpected 5xx answers: 1"]),
    ({"bomb png": {422: 2, 200: 1}}, 401.0, ["bad uploads answered with their 4xx: 17 of 18"]),
    ({"oversized": {413: 2, 502: 1}}, 401.0, ["unexpected 5xx answers: 1",
                                              "bad uploads answered with their 4xx: 17 of 18"]),
    ({}, 450.0, ["largest RSS growth after a round's warm-up: +50 MiB (bound 32 MiB)"]),
])
def test_the_soak_report_fails_each_check_it_makes(bench, capsys, answers, rss_end, failing):
    kinds, row = _round(bench, answers, rss_end=rss_end)
    ok = bench.soak_report([row], kinds, rss_bound=32.0)
    out = capsys.readouterr().out
    assert ok is (not failing)
    assert out.count("FAIL") == len(failing) and out.count("ok   ") == 3 - len(failing)
    for message in failing:
        assert f"FAIL {message}" in out


@pytest.mark.integration
def test_a_short_soak_answers_every_kind_as_expected(tiny_model_dir):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, str(SCRIPTS / "bench_serve.py"), "--model", str(tiny_model_dir),
                          "--soak", "2", "--clients", "1,3", "--soak-warmup", "0.5", "--images", "4", "--px", "96"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    rows = re.findall(r"^\| (\d+) \| \d+ \| (\d+) \|", run.stdout, flags=re.M)
    assert [n for n, _ in rows] == ["1", "3"] and all(int(requests) >= 10 for _, requests in rows)
    for kind, expected in [("good", 200), ("truncated jpeg", 422), ("text file", 422), ("empty file", 422),
                           ("bomb png", 422), ("oversized", 413), ("not multipart", 415)]:
        line = re.search(rf"^  {kind}: expected {expected}; answered (.*)$", run.stdout, flags=re.M)
        assert line and re.fullmatch(rf"{expected}: \d+", line.group(1)), (kind, line and line.group(0))
    assert "ok   unexpected 5xx answers: 0" in run.stdout and "FAIL" not in run.stdout
    assert "server exit status after SIGTERM 0" in run.stdout and "0 errors or tracebacks" in run.stdout
