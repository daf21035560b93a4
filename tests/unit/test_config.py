import pytest

from orchestrator.config import CampaignConfig, ConfigError, load_config, parse_override


def test_no_config_gives_the_cpu_sized_defaults():
    assert load_config() == CampaignConfig()


def test_overrides_reach_nested_sections_and_are_parsed_as_yaml():
    cfg = load_config(None, ["train.epochs=3", "strategy.options={distance: js}", "budget.counts=[5, 9]"])
    assert (cfg.train.epochs, cfg.strategy.options, cfg.budget.counts) == (3, {"distance": "js"}, (5, 9))


def test_an_unknown_key_is_an_error_listing_the_valid_ones(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['epoch'\].*epochs"):
        load_config(path)


def test_a_wrongly_typed_value_is_an_error():
    with pytest.raises(ConfigError, match="train.epochs: expected a number"):
        load_config(None, ["train.epochs=many"])


@pytest.mark.parametrize("override, message", [
    ("score.buffer_mb=0", "score.buffer_mb: must be at least 1"),
    ("score.warm_below_rows=-1", "score.warm_below_rows: must be at least 0"),
    ("score.actors=-1", "score.actors: must be at least 0"),
    ("score.batch_size=0", "score.batch_size: must be at least 1"),
    ("score.cpus_per_actor=0", "score.cpus_per_actor must be > 0"),
    ("strategy.junk_threshold=0", r"strategy.junk_threshold: must be in \(0, 1\], got 0"),
    ("strategy.junk_threshold=1.5", r"strategy.junk_threshold: must be in \(0, 1\], got 1.5"),
    ("strategy.initial_options={embedding: pixels}",
     r"strategy.initial_options.embedding: 'pixels' is not one of \['density', 'radial'\]"),
])
def test_an_out_of_range_scoring_setting_is_refused_when_the_config_loads(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_an_override_without_equals_sign_is_an_error():
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_override("train.epochs")


def test_a_missing_config_file_names_the_path():
    with pytest.raises(ConfigError, match="no-such-config"):
        load_config("no-such-config")


@pytest.mark.parametrize("name", ["default", "paper", "smoke"])
def test_every_shipped_campaign_config_loads(name):
    assert isinstance(load_config(name), CampaignConfig)


def test_the_shipped_default_config_is_what_no_config_means():
    assert load_config("default") == CampaignConfig()
