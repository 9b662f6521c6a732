"""params.yaml validation: every setting typed, unknown keys and bad values named, nothing written."""
import subprocess
import sys

import pytest
import yaml

from pipeline import config


def base(params_path):
    return yaml.safe_load(params_path.read_text())


def test_repo_params_validate_for_every_profile(params_path):
    raw = base(params_path)
    for name in raw["profiles"]:
        cfg = config.resolve(raw, name)
        assert cfg.profile == name
    assert config.resolve(raw, "smoke").corpus.n_scenes < config.resolve(raw, "default").corpus.n_scenes


def test_profile_overrides_are_deep_merged(params_path):
    raw = base(params_path)
    smoke = config.resolve(raw, "smoke")
    assert smoke.clip.model.vision_layers == raw["profiles"]["smoke"]["clip"]["model"]["vision_layers"]
    # keys the profile does not mention keep their base value
    assert smoke.clip.model.vision_patch_size == raw["clip"]["model"]["vision_patch_size"]


def test_profile_from_environment(params_path, monkeypatch):
    monkeypatch.setenv(config.PROFILE_ENV, "smoke")
    assert config.load(params_path).profile == "smoke"


@pytest.mark.parametrize("mutate, key", [
    (lambda r: r["clip"].update(batch_sizee=3), "clip.batch_sizee: unknown key"),
    (lambda r: r["corpus"].update(n_scenes=-5), "corpus.n_scenes"),
    (lambda r: r["crawl"].update(timeout_s="soon"), "crawl.timeout_s"),
    (lambda r: r["filter"].update(min_caption_words=50), "filter"),
    (lambda r: r.update(bogus_section={}), "bogus_section: unknown key"),
    (lambda r: r["clip"]["model"].update(image_size=60), "clip.model"),
    (lambda r: r["clip"].update(hard_negatives_after=1.0), "clip.hard_negatives_after"),
    (lambda r: r["profiles"]["smoke"]["embed"].update(min_similarity=3), "embed.min_similarity"),
    # the smoke profile embeds a rewrite, which would be drawn without the pronoun-first frame
    (lambda r: r["clip"].update(rewrites_pronoun_first=True, rewrites_pronoun_first_after=0.0), "embed.rewrites draws"),
    (lambda r: r["clip"].update(rewrites_pronoun_first_after=1.0), "clip.rewrites_pronoun_first_after"),
    (lambda r: r["clip"].update(rewrites_align=1.0, rewrites=0), "clip.rewrites_align"),
    (lambda r: r["clip"].update(rewrites_align=-1.0), "clip.rewrites_align"),
])
def test_bad_config_names_the_key(params_path, mutate, key):
    raw = base(params_path)
    mutate(raw)
    with pytest.raises(config.ConfigError) as err:
        config.resolve(raw, "smoke" if "embed" in key else "default")
    assert key in str(err.value)


def test_a_retired_key_of_an_older_params_yaml_is_read_without_it(params_path):
    raw = base(params_path)
    raw["clip"]["num_workers"] = 1          # CLIP's DataLoader workers, before its decoded-shard buffer
    cfg = config.resolve(raw, "default")
    assert cfg.clip == config.resolve(base(params_path), "default").clip


def test_unknown_profile(params_path):
    with pytest.raises(config.ConfigError, match="profile 'nope' is not defined"):
        config.resolve(base(params_path), "nope")


def test_cli_bad_param_exits_nonzero_and_writes_nothing(params_path, tmp_path):
    raw = base(params_path)
    raw["corpus"]["image_sise"] = 64
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "--workspace", str(tmp_path), "stage", "corpus"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "corpus.image_sise: unknown key" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_code_defaults_are_the_params_yaml_defaults(params_path):
    """One set of defaults: every key params.yaml sets (the default profile) has that value as the
    config model's default too, so a section left out of a workspace's params.yaml (or a model
    built in code, as the benches and tests do) means what the repo's params.yaml means."""
    import yaml

    from pipeline import config
    raw = yaml.safe_load(params_path.read_text())
    raw.pop("profiles", None)

    def differences(code, yaml_value, path=""):
        if isinstance(code, dict) and isinstance(yaml_value, dict):
            return [d for k in sorted(set(code) | set(yaml_value))
                    for d in differences(code.get(k), yaml_value.get(k), f"{path}.{k}".lstrip("."))]
        return [] if code == yaml_value else [f"{path}: config.py {code!r}, params.yaml {yaml_value!r}"]

    code = config.Config.model_validate({}).model_dump(mode="json")
    assert differences(code, config.resolve(raw, "default").model_dump(mode="json")) == []


def test_write_resolved_writes_the_whole_config_atomically_and_only_when_it_changed(params_path, tmp_path):
    import json
    raw = base(params_path)
    smoke = config.resolve(raw, "smoke")
    path = tmp_path / "params.resolved.json"
    assert config.write_resolved(smoke, tmp_path)
    assert json.loads(path.read_text()) == smoke.model_dump(mode="json")
    before = path.stat()
    assert not config.write_resolved(config.resolve(raw, "smoke"), tmp_path)        # same values: untouched
    assert (path.stat().st_ino, path.stat().st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert config.write_resolved(config.resolve(raw, "default"), tmp_path)
    assert json.loads(path.read_text())["corpus"]["n_scenes"] == raw["corpus"]["n_scenes"]
    assert [p.name for p in tmp_path.iterdir()] == ["params.resolved.json"]             # no temp file left


def test_dvc_sees_the_resolved_config_and_no_profile_names():
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    text = (root / "dvc.yaml").read_text()
    assert "profiles" not in text
    stages = yaml.safe_load(text)["stages"]
    assert stages["config"]["always_changed"] and "params.resolved.json" in str(stages["config"]["outs"])
    for name, spec in stages.items():
        params = spec.get("do", spec).get("params", [])
        if name != "config":
            assert params and all(isinstance(p, dict) and list(p) == ["params.resolved.json"] for p in params), name


def test_the_upsampler_stages_are_params_yaml_s_chain_and_a_profile_may_not_add_one(params_path):
    from pipeline.stages import STAGES, registry
    raw = base(params_path)
    ups = [s for s in STAGES if s.startswith("upsample@")]
    assert ups == [f"upsample@{k}" for k in raw["upsample"]["stages"]]
    raw["upsample"]["stages"]["3"] = dict(raw["upsample"]["stages"]["2"])
    names = list(registry(config.resolve(raw, "smoke")))
    assert names[names.index("decoder") + 1:] == [*ups, "upsample@3", "evaluate"]
    raw = base(params_path)
    raw["profiles"]["smoke"]["upsample"]["stages"]["3"] = {"steps": 2}
    with pytest.raises(config.ConfigError, match=r"profiles.smoke.upsample.stages: a profile may not add upsamplers \(3\)"):
        config.resolve(raw, "smoke")


def test_an_upsampler_names_the_shards_it_trains_on_in_params_yaml_and_a_profile_keeps_them(params_path):
    # dvc.yaml's data dependency of upsample@<key> is data/${item.images_from}, read from params.yaml
    raw = base(params_path)
    assert {k: u["images_from"] for k, u in raw["upsample"]["stages"].items()} == {"1": "filtered", "2": "filtered"}
    del raw["upsample"]["stages"]["2"]["images_from"]
    with pytest.raises(config.ConfigError, match=r"upsample.stages.2.images_from is missing: dvc.yaml reads it"):
        config.resolve(raw, "smoke")
    raw = base(params_path)
    raw["profiles"]["smoke"]["upsample"]["stages"]["1"]["images_from"] = "embeddings"
    with pytest.raises(config.ConfigError, match=r"profiles.smoke.upsample.stages.1.images_from: a profile may not change it"):
        config.resolve(raw, "smoke")
    raw = base(params_path)                 # z_i comes only with the embed stage's shards
    raw["upsample"]["stages"]["1"]["condition"] = "image_embed"
    with pytest.raises(config.ConfigError, match=r"set images_from: embeddings"):
        config.resolve(raw, "smoke")
    raw["upsample"]["stages"]["1"]["images_from"] = "embeddings"
    assert config.resolve(raw, "smoke").upsample.stages["1"].images_from == "embeddings"


def test_resolved_config_with_characters_outside_the_bmp_reads_as_dvc_reads_it(params_path, tmp_path):
    # DVC reads params.resolved.json with a YAML parser, which refuses JSON's surrogate-pair
    # escapes (json.dumps' default for an emoji): the file is written as raw UTF-8
    import json
    from ruamel.yaml import YAML
    raw = base(params_path)
    raw["evaluate"]["prompts"] = ["a red bicycle \U0001F6B2", "un café"]
    config.write_resolved(config.resolve(raw, "smoke"), tmp_path)
    text = (tmp_path / "params.resolved.json").read_text(encoding="utf-8")
    assert YAML(typ="safe").load(text)["evaluate"]["prompts"] == raw["evaluate"]["prompts"]
    assert json.loads(text)["evaluate"]["prompts"] == raw["evaluate"]["prompts"]
