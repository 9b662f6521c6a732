"""Scale-out (issue 21): the `cluster` section, and the engines giving the local engine's outputs."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline import config

REPO = Path(__file__).resolve().parents[1]


def test_cluster_section_is_in_no_stage_recipe():
    """Switching engine or launcher must not make DVC rerun anything: no stage lists it."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        params = (stage.get("do") or stage).get("params", [])
        assert not [p for p in params if str(p).split(".")[0] == "cluster"], name


@pytest.mark.parametrize("mutate, key", [
    (lambda c: c.update(engine="ray"), "cluster.engine"),
    (lambda c: c["train"].update(launcher="torchrun", nnodes=2), "rdzv_endpoint"),
    (lambda c: c["train"].update(node_rank=1), "node_rank"),
    (lambda c: c["train"].update(rdzv_endpoint="no-port"), "cluster.train.rdzv_endpoint"),
    (lambda c: c["spark"].update(mastr="local[2]"), "cluster.spark.mastr: unknown key"),
])
def test_bad_cluster_config_names_the_key(params_path, mutate, key):
    raw = yaml.safe_load(params_path.read_text())
    mutate(raw["cluster"])
    with pytest.raises(config.ConfigError) as err:
        config.resolve(raw, "default")
    assert key in str(err.value)


def test_bundle_config_leaves_out_where_it_ran(smoke_cfg):
    from pipeline.bundle import run_config
    spark = smoke_cfg.model_copy(update={"cluster": config.ClusterConfig(engine="spark")})
    assert run_config(spark) == run_config(smoke_cfg)
