"""The command line: `tensornet analyze-minilm` on MiniLM-L6 weights, errors, `python -m`."""

import subprocess
import sys
from importlib.metadata import version

import pytest

from tensornet.cli import load_minilm_weights, main

LAYER = "0.attention.self.query"


def test_demo_one_layer(capsys, tmp_path):
    code = main(["analyze-minilm", "--layers", LAYER, "--rank", "8", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0
    assert LAYER in out
    assert "rel. error" in out
    assert "mean relative error" in out
    # the table row: 384x384 at N=5 has modes 2x4x4x4x3 and ranks capped at 8
    row = next(line for line in out.splitlines() if line.startswith(LAYER))
    assert "384x384" in row and "2x4x4x4x3" in row and "1-4-8-8-8-1" in row
    rel_error = float(row.split()[-1])
    assert 0.0 < rel_error < 1.0
    assert (tmp_path / "error_vs_rank.png").is_file()


def test_minilm_weights_are_the_encoder_linears():
    weights = load_minilm_weights()
    assert len(weights) == 36  # 6 layers x (q, k, v, attention output, intermediate, output)
    shapes = {w.kind: w.weight.shape for w in weights}
    assert shapes["query"] == (384, 384)
    assert shapes["intermediate"] == (1536, 384)  # (out_features, in_features)
    assert shapes["output"] == (384, 1536)


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["analyze-minilm", "--rank", "0"], "--rank"),
        (["analyze-minilm", "--rank", "abc"], "--rank"),
        (["analyze-minilm", "--layers", "no.such.layer"], "no.such.layer"),
        (["analyze-minilm", "--num-cores", "9", "--layers", LAYER], "num_factors"),
        (["analyze-minilm", "--tol", "1.5"], "--tol"),
        (["nosuchcommand"], "nosuchcommand"),
        ([], "command is required"),
    ],
)
def test_bad_input_returns_2_with_one_line(argv, needle, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert needle in err
    assert len(err.splitlines()) == 1
    assert "Traceback" not in err
    assert captured.out == ""


def test_python_dash_m_help_and_version():
    proc = subprocess.run(
        [sys.executable, "-m", "tensornet", "--help"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert "demo" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "tensornet", "--version"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"tensornet {version('tensornet')}"


def test_cli_package_has_no_import_cycle():
    # the CLI is one package; the library below it never imports it
    import ast
    from pathlib import Path

    import tensornet

    root = Path(tensornet.__file__).parent
    for path in root.rglob("*.py"):
        if "cli" in path.relative_to(root).parts or path.name == "__main__.py":
            continue  # the CLI itself, and `python -m tensornet`, which runs it
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert "cli" not in node.module.split("."), f"{path} imports {node.module}"


def _subcommands():
    from tensornet.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.choices and isinstance(a.choices, dict))
    return sorted(sub.choices.items())


def _shown(value):
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


@pytest.mark.parametrize("name,parser", _subcommands())
def test_help_shows_the_defaults_the_subcommand_uses(name, parser):
    # issue 22 point 9: `tensornet demo --help` said float32 and torch's threads while the
    # demo ran bfloat16 on one thread (set_defaults after the shared arguments)
    import re

    checked = 0
    for action in parser._actions:
        if action.default is None or isinstance(action.default, bool):
            continue  # described in words ("torch's choice", "refuse them")
        for said in re.findall(r"\(default: ((?:[^()]|\([^()]*\))*)\)", action.help or ""):
            text, shown = " ".join(said.split()), _shown(action.default)
            assert text == shown or re.match(re.escape(shown) + r"($|[ ;]|, )", text), (
                f"tensornet {name} {'/'.join(action.option_strings)}: help says {text!r}, "
                f"the default is {action.default!r}"
            )
            checked += 1
    assert checked >= 1
