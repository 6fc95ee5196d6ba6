"""cbir_tf.config: the shipped configs by name, and defaults from configs/default.py only."""

import pathlib

import ml_collections
import pytest

from cbir_tf import config

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_shipped_configs_load_by_name_or_path_and_start_from_the_default():
    assert pathlib.Path(config.config_dir()) == ROOT / "configs"
    demo = config.load_config("demo")
    assert demo == config.load_config(str(ROOT / "configs" / "demo.py"))
    assert (demo.model.backbone, demo.model.alpha, demo.data.dataset) == ("mobilenet", 0.25, "demo")
    assert demo.rerank.qe == config.default_config().rerank.qe  # the rest is default.py's
    with pytest.raises(FileNotFoundError, match="no config file"):
        config.load_config("nothing")


def test_default_reads_one_field_and_the_model_block_builds_the_model_arguments():
    assert config.default("search.block_size") == config.default_config().search.block_size
    assert config.default("rerank.qe") == {"n": "auto", "alpha": 3.0}
    # An old manifest's block without some fields: the defaults fill them.
    block = config.block({"model": {"backbone": "vgg16", "pooling": "gem"}}, "model")
    assert block == {**config.defaults("model"), "backbone": "vgg16", "pooling": "gem"}


def test_block_merges_over_the_defaults_and_as_dict_is_plain():
    cfg = ml_collections.ConfigDict({"rerank": {"qe": {"n": 5}}})
    rerank = config.block(cfg, "rerank")
    assert rerank["qe"] == {"n": 5, "alpha": config.default_config().rerank.qe.alpha}
    assert rerank["diffusion"] == config.default_config().rerank.diffusion.to_dict()
    assert config.block(None, "rerank") == config.defaults("rerank")
    plain = config.as_dict(config.default_config())
    assert type(plain) is dict and type(plain["model"]) is dict
    config.defaults("model")["backbone"] = "changed"  # a copy: the defaults stay
    assert config.defaults("model")["backbone"] == config.default_config().model.backbone


def test_differences_and_set_field_write_a_config_file_that_loads(tmp_path):
    cfg = config.default_config()
    config.set_field(cfg, "rerank.diffusion.k", 7)  # a str ('auto') field takes "7"
    config.set_field(cfg, "data.image_size", "448")  # an int field takes 448
    config.set_field(cfg, "whitening.shrinkage", "0.5")
    config.set_field(cfg, "rerank.methods", "('plain', 'dba')")
    assert cfg.rerank.diffusion.k == "7" and cfg.data.image_size == 448
    diff = config.differences(cfg)
    assert diff == {
        "data.image_size": 448,
        "whitening.shrinkage": 0.5,
        "rerank.methods": ("plain", "dba"),
        "rerank.diffusion.k": "7",
    }
    path = tmp_path / "tuned.py"
    path.write_text(config.config_file_text(diff, "Chosen by a test."))
    loaded = config.load_config(str(path))
    assert config.differences(loaded) == diff
    with pytest.raises(KeyError, match="config has no field rerank.qe.m; valid: alpha, n"):
        config.set_field(cfg, "rerank.qe.m", 1)
    with pytest.raises(ValueError, match=r"data.image_size='big': expected a value of type int"):
        config.set_field(cfg, "data.image_size", "big")
