"""``python -m demo.samples``: --help and bad flags write nothing; the Makefile's command lines work."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from demo import samples

ROOT = Path(__file__).resolve().parents[1]


def run_samples(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "demo.samples", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args", [["--help"], ["-h"], ["demo", "--help"], ["circles", "--help"],
                                  ["circles", "-h", "out"]])
def test_help_prints_usage_and_writes_nothing(args, tmp_path):
    done = run_samples(tmp_path, *args)
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args", [["--count", "3"], ["-x"], ["--", "-x"], ["demo", "--", "--help"],
                                  ["circles", "--", "-out", "--count", "2"], ["demo", "a", "b"]])
def test_bad_arguments_and_dash_folders_are_refused_writing_nothing(args, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        samples.main(args)
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("python -m demo.samples")
    assert list(tmp_path.iterdir()) == []


def test_the_makefile_command_lines_still_work(tmp_path, monkeypatch):
    """``python -m demo.samples DIR`` (the demo collection) and ``circles DIR --count N --size S``."""
    monkeypatch.chdir(tmp_path)
    assert samples.main(["photos"]) == 0
    assert (tmp_path / "photos" / "photos" / "astronaut.jpg").is_file()
    assert samples.main(["demo", "again"]) == 0
    assert (tmp_path / "again" / "scenes" / "metadata.jsonl").is_file()
    assert samples.main(["circles", "circles", "--count", "3", "--size", "32"]) == 0
    assert sorted(p.name for p in (tmp_path / "circles").glob("*.png")) == [f"circle_0000{i}.png" for i in range(3)]
