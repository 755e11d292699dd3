"""The command line itself: --version, and --debug before or after the subcommand."""

import subprocess
import sys

import pytest

import mftcore
from mftcore.cli import build_parser, main
from mftcore.errors import ConfigError


def test_version_prints_and_exits_0():
    proc = subprocess.run([sys.executable, "-m", "mftcore", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == f"mftcore {mftcore.__version__}"


@pytest.mark.parametrize("argv", [["--debug", "train", "{missing}"], ["train", "{missing}", "--debug"],
                                  ["prepare", "{missing}", "--debug"]])
def test_debug_before_or_after_the_subcommand_shows_the_traceback(tmp_path, argv):
    argv = [a.format(missing=tmp_path / "missing.yaml") for a in argv]
    with pytest.raises(ConfigError, match="config file not found"):
        main(argv)


def test_without_debug_one_line(tmp_path, capsys):
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert build_parser().parse_args(["train", "c.json"]).debug is False
    assert capsys.readouterr().err.strip() == f"mftcore: error: {tmp_path / 'missing.yaml'}: config file not found"
