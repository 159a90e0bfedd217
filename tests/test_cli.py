"""`python -m flashfuse explain pkg.module:factory`: output, --json, --draw, and exit codes."""
from __future__ import annotations

import json
import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from flashfuse import cli

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS_DIR)

FACTORIES = textwrap.dedent('''
    import torch
    import flashfuse_toy_pass  # registers the "relu_mul" test pass

    def toy(x):
        y = torch.relu(x) * 2
        return torch.relu(y) * 3

    def make():
        return toy, (torch.randn(4, 8),)

    def make_single_tensor():
        return toy, torch.randn(2)

    def make_with_kwargs():
        return (lambda x, *, s: torch.relu(x) * 2 + s), (torch.randn(3),), {"s": 1.0}

    def make_raises():
        raise RuntimeError("no weights here")

    def make_wrong():
        return 42

    def make_model_raises():
        def broken(x):
            raise ValueError("shape mismatch in broken model")
        return broken, (torch.randn(2),)

    not_callable = 3
''')


@pytest.fixture
def factory_file(tmp_path):
    path = tmp_path / "toy_factories.py"
    path.write_text(FACTORIES)
    return str(path)


OPTS = ["-o", "passes=relu_mul", "-o", "remainder=eager"]


def run_main(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_explain_prints_the_report(capsys, factory_file):
    code, out, err = run_main(capsys, "explain", f"{factory_file}:make", *OPTS)
    assert code == 0, err
    assert out.splitlines()[0] == ("flashfuse report: 1 graph(s), 1 fusion(s), 1 near-miss(es), "
                                   "0 graph break(s)")
    assert "fused     relu_mul at toy_factories.py:6: relu(x) * 2 as one op, 4x8" in out
    assert "near-miss relu_mul at toy_factories.py:7: not fused: the multiplier is 3, not 2" in out


def test_explain_code_flag(capsys, factory_file):
    code, out, _ = run_main(capsys, "explain", f"{factory_file}:make", "--code", *OPTS)
    assert code == 0
    assert "code after the passes:" in out and "flashfuse_toy.relu_times_two.default" in out


def test_explain_json(capsys, factory_file):
    code, out, _ = run_main(capsys, "explain", f"{factory_file}:make", "--json", *OPTS)
    assert code == 0
    data = json.loads(out)
    assert data["counts"] == {"relu_mul": 1}
    assert data["near_misses"][0]["reason"] == "the multiplier is 3, not 2"


def test_explain_fake(capsys, factory_file):
    code, out, err = run_main(capsys, "explain", f"{factory_file}:make", "--fake", *OPTS)
    assert code == 0, err
    assert "fused     relu_mul at toy_factories.py:6: relu(x) * 2 as one op, 4x8" in out


@pytest.mark.parametrize("factory,count", [("make_single_tensor", 1), ("make_with_kwargs", 1)])
def test_explain_accepts_other_input_shapes(capsys, factory_file, factory, count):
    code, out, err = run_main(capsys, "explain", f"{factory_file}:{factory}", "--json", *OPTS)
    assert code == 0, err
    assert json.loads(out)["counts"] == {"relu_mul": count}


def test_explain_draw(capsys, factory_file, tmp_path):
    pytest.importorskip("pydot")
    target = tmp_path / "out.dot"
    code, _, err = run_main(capsys, "explain", f"{factory_file}:make", "--draw", str(target), *OPTS)
    assert code == 0, err
    assert "relu_times_two" in target.read_text()
    assert f"wrote {target}" in err


def test_explain_draw_failure_exit_code(capsys, factory_file, tmp_path):
    code, _, err = run_main(capsys, "explain", f"{factory_file}:make", "--draw", str(tmp_path / "x.gif"), *OPTS)
    assert code == cli.EXIT_DRAW == 6
    assert "could not draw" in err


def test_module_spec(capsys, factory_file, monkeypatch):
    monkeypatch.syspath_prepend(os.path.dirname(factory_file))
    code, out, err = run_main(capsys, "explain", "toy_factories:make", *OPTS)
    assert code == 0, err
    assert "1 fusion(s)" in out


@pytest.mark.parametrize("spec,code,message", [
    ("no_colon_here", 2, "bad spec 'no_colon_here'"),
    ("mod:1bad", 2, "bad spec"),
    ("surely_not_a_module_xyz:make", 3, "cannot import 'surely_not_a_module_xyz': ModuleNotFoundError"),
    ("/nonexistent/dir/file.py:make", 3, "no such file"),
    ("{file}:missing", 3, "has no attribute 'missing'"),
    ("{file}:not_callable", 4, "is not callable"),
    ("{file}:make_raises", 4, "failed: RuntimeError: no weights here"),
    ("{file}:make_wrong", 4, "must return (model, example_inputs)"),
    ("{file}:make_model_raises", 5, "running the model failed: ValueError: shape mismatch in broken model"),
])
def test_exit_codes(capsys, factory_file, spec, code, message):
    got, out, err = run_main(capsys, "explain", spec.format(file=factory_file), *OPTS)
    assert got == code
    assert err.startswith("flashfuse: error: ")
    assert message in err
    assert out == ""


def test_import_error_inside_the_module(capsys, tmp_path):
    (tmp_path / "broken_mod.py").write_text("import not_installed_package_xyz\n")
    code, _, err = run_main(capsys, "explain", f"{tmp_path / 'broken_mod.py'}:make")
    assert code == 3
    assert "No module named 'not_installed_package_xyz'" in err


def test_bad_option(capsys, factory_file):
    code, _, err = run_main(capsys, "explain", f"{factory_file}:make", "-o", "remaindr=eager")
    assert code == 2
    assert "unknown option 'remaindr'; did you mean 'remainder'?" in err
    code, _, err = run_main(capsys, "explain", f"{factory_file}:make", "-o", "novalue")
    assert code == 2 and "is not KEY=VALUE" in err


def test_usage_errors(capsys):
    assert cli.main([]) == 2
    assert cli.main(["frobnicate"]) == 2
    assert "usage:" in capsys.readouterr().err


def test_python_dash_m(factory_file, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([TESTS_DIR, os.environ.get("PYTHONPATH", "")]))
    ok = subprocess.run([sys.executable, "-m", "flashfuse", "explain", f"{factory_file}:make", "--json", *OPTS],
                        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["counts"] == {"relu_mul": 1}
    bad = subprocess.run([sys.executable, "-m", "flashfuse", "explain", "nope"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert bad.returncode == 2
    assert "flashfuse: error: bad spec 'nope'" in bad.stderr


def test_example_script_runs_through_the_cli(capsys):
    code, out, err = run_main(capsys, "explain", os.path.join(REPO, "examples", "explain_toy.py") + ":make_block",
                              "-o", "passes=attention")
    assert code == 0, err
    assert "fused     attention at explain_toy.py:" in out


def test_example_script_runs(tmp_path):
    args = [sys.executable, os.path.join(REPO, "examples", "explain_toy.py")]
    if shutil.which("dot") and importlib.util.find_spec("pydot"):  # drawing needs both
        args += ["--draw", str(tmp_path / "block.svg")]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "fusions per pass:" in done.stdout
    assert "attention" in done.stdout
