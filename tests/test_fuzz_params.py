"""Fuzzing params.yaml (issue 19's fuzz campaign): every key of params.yaml given values of the
wrong type or out of range. Each must end in either a valid configuration or a ConfigError that
names the key; never another exception. Through the CLI (`unclip stage corpus`), a rejected value
exits 2 with the key in its message and writes nothing (the workspace holds params.yaml alone).
The counts print at the end of the module."""
from __future__ import annotations

import copy
from collections import Counter
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline import config
from pipeline.cli import main as cli

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
RAW = yaml.safe_load(PARAMS.read_text())
RAN: Counter = Counter()


def leaves(node, path=()):
    """Every key path of params.yaml's sections (not the profiles) whose value is not a mapping."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from leaves(v, (*path, str(k)))
    else:
        yield path


KEYS = sorted(p for p in leaves({k: v for k, v in RAW.items() if k != "profiles"}) if p)
BAD = st.one_of(st.text(max_size=12), st.integers(-10**15, 10**15), st.booleans(), st.none(),
                st.floats(allow_nan=True, allow_infinity=True), st.lists(st.integers(-3, 3), max_size=3),
                st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))
FUZZ = settings(max_examples=300, deadline=2000, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def with_value(path: tuple, value) -> dict:
    raw = copy.deepcopy(RAW)
    node = raw
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    return raw


def test_params_keys_are_many():
    assert len(KEYS) > 80 and ("clip", "batch_size") in KEYS


@FUZZ
@given(key=st.sampled_from(KEYS), value=BAD)
def test_any_value_of_any_key_is_valid_or_a_config_error_naming_it(key, value):
    raw = with_value(key, value)
    try:
        config.resolve(raw, "default")
        RAN["params: accepted"] += 1
    except config.ConfigError as err:
        # the key's section path and its name: "clip.batch_size: ..." (deeper for list items), or for a
        # check across keys "crawl: Value error, deadline_s ... must be >= timeout_s"
        assert ".".join(key[:-1]) in str(err) and key[-1] in str(err), (key, value, str(err))
        RAN["params: ConfigError naming the key"] += 1


# typed wrong for sure: a number key given text, a text key given a mapping, a list given a number
def surely_wrong(key):
    node = RAW
    for k in key:
        node = node[k]
    if isinstance(node, bool):
        return {"a": 1}
    if isinstance(node, (int, float)):
        return "not a number"
    if isinstance(node, str):
        return {"a": 1}
    if isinstance(node, list):
        return 7
    return None


CLI_KEYS = [k for k in KEYS if surely_wrong(k) is not None]


@settings(max_examples=40, deadline=10000, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(key=st.sampled_from(CLI_KEYS))
def test_the_cli_exits_2_naming_the_key_and_writes_nothing(tmp_path_factory, key):
    root = tmp_path_factory.mktemp("ws")
    (root / "params.yaml").write_text(yaml.safe_dump(with_value(key, surely_wrong(key)), allow_unicode=True))
    result = CliRunner().invoke(cli, ["-w", str(root), "stage", "corpus"])
    assert result.exit_code == 2, (key, result.output, result.exception)
    assert ".".join(key[:-1]) in result.output and key[-1] in result.output and "Traceback" not in result.output
    written = {p.relative_to(root).parts[0] for p in root.rglob("*")} - {"params.yaml"}
    assert not written, (key, written)
    RAN["cli: exit 2, key named, nothing written"] += 1


@pytest.fixture(scope="module", autouse=True)
def report_counts():
    yield
    print("\n[fuzz params.yaml] " + "; ".join(f"{k} {v}" for k, v in sorted(RAN.items()))
          + f" (over {len(KEYS)} keys)")
