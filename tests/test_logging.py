"""The `flashfuse` logger: FLASHFUSE_LOG=info|debug, fusions at info, graph dumps at debug."""
from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import torch

import flashfuse
import flashfuse_toy_pass as toy
from flashfuse import log

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def toy_fn(x):
    y = torch.relu(x) * 2
    return torch.relu(y) * 3


@pytest.fixture
def restore_logger():
    level, handlers = log.logger.level, list(log.logger.handlers)
    yield
    log.configure(None)
    log.logger.setLevel(level)
    for h in handlers:
        if h not in log.logger.handlers:
            log.logger.addHandler(h)


def compile_and_run(pass_name: str = "relu_mul"):
    backend = flashfuse.backend(passes=[pass_name], remainder="eager")
    torch.compile(toy_fn, backend=backend)(torch.randn(3))


def flashfuse_messages(caplog, level):
    return [r.getMessage() for r in caplog.records if r.name == "flashfuse" and r.levelno == level]


# A pass need not call gm.recompile(): the pipeline recompiles after every pass that rewrote something.
@pytest.mark.parametrize("pass_name", ["relu_mul_recompiling", "relu_mul"])
def test_debug_dumps_each_graph_after_normalize_and_after_each_rewriting_pass(caplog, pass_name):
    caplog.set_level(logging.DEBUG, logger="flashfuse")
    compile_and_run(pass_name)
    debug = flashfuse_messages(caplog, logging.DEBUG)
    normalized = [m for m in debug if m.startswith("graph 0 after normalize:")]
    after_pass = [m for m in debug if m.startswith(f"graph 0 after pass {pass_name} (1 rewrites):")]
    assert len(normalized) == 1 and len(after_pass) == 1
    assert "aten.mul.Tensor(relu, 2)" in normalized[0]  # the graph before the pass
    assert "flashfuse_toy.relu_times_two.default" in after_pass[0]  # and after it
    assert "flashfuse_toy" not in normalized[0]


def test_info_lists_fusions_and_near_misses_without_graph_dumps(caplog):
    caplog.set_level(logging.INFO, logger="flashfuse")
    compile_and_run()
    info = flashfuse_messages(caplog, logging.INFO)
    assert any(m.startswith("fused relu_mul at test_logging.py:") and "relu(x) * 2 as one op" in m for m in info)
    assert any("not fused: the multiplier is 3, not 2" in m for m in info)
    assert flashfuse_messages(caplog, logging.DEBUG) == []


def test_silent_by_default(caplog):
    caplog.set_level(logging.WARNING, logger="flashfuse")
    compile_and_run()
    assert [r for r in caplog.records if r.name == "flashfuse"] == []


def test_failing_pass_is_a_warning(caplog):
    caplog.set_level(logging.WARNING, logger="flashfuse")
    torch.compile(toy_fn, backend=flashfuse.backend(passes=["crashing"], remainder="eager"))(torch.randn(3))
    (warning,) = flashfuse_messages(caplog, logging.WARNING)
    assert "passes skipped for graph 0: RuntimeError: the crashing test pass always raises" in warning


def test_configure_sets_level_and_one_handler(restore_logger):
    log.configure("debug")
    assert log.logger.level == logging.DEBUG
    log.configure("info")
    assert log.logger.level == logging.INFO
    assert sum(isinstance(h, logging.StreamHandler) and h is log._handler for h in log.logger.handlers) == 1
    log.configure("off")
    assert log.logger.level == logging.NOTSET and log._handler is None
    log.configure("1")
    assert log.logger.level == logging.INFO
    log.configure("0")
    assert log.logger.level == logging.NOTSET


def test_configure_rejects_unknown_level(restore_logger):
    with pytest.raises(ValueError, match="unknown log level 'verbose'"):
        log.configure("verbose")


def test_bad_env_value_warns_instead_of_breaking_import(monkeypatch, restore_logger):
    monkeypatch.setenv("FLASHFUSE_LOG", "loud")
    with pytest.warns(UserWarning, match="FLASHFUSE_LOG='loud' ignored"):
        log.configure_from_env()
    monkeypatch.setenv("FLASHFUSE_LOG", "DEBUG")
    log.configure_from_env()
    assert log.logger.level == logging.DEBUG


def test_env_variable_switches_logging_on_in_a_fresh_process():
    script = ("import torch, flashfuse, flashfuse_toy_pass as toy\n"
              "f = lambda x: torch.relu(x) * 2\n"
              "torch.compile(f, backend=flashfuse.backend(**toy.OPTIONS))(torch.randn(3))\n")
    env = dict(os.environ, FLASHFUSE_LOG="debug",
               PYTHONPATH=os.pathsep.join([TESTS_DIR, os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "[flashfuse DEBUG] graph 0 after normalize:" in done.stderr
    assert "[flashfuse DEBUG] graph 0 after pass relu_mul (1 rewrites):" in done.stderr
    assert "[flashfuse INFO] fused relu_mul" in done.stderr
