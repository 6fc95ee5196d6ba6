"""cbir_tf.config: the one reader of configs; defaults come from cbir_tf/configs/default.py only."""

import ml_collections

from cbir_tf import config
from cbir_tf.configs import default, demo


def test_model_kwargs_of_a_config_and_of_a_partial_block():
    cfg = demo.get_config()
    assert config.model_kwargs(cfg.model) == {
        "backbone": "mobilenet", "weights": "imagenet", "alpha": 0.25, "pooling": "rmac",
        "gem_p": 3.0, "rmac_levels": 3,
    }  # fmt: skip
    # An old manifest's block without some fields: the default config fills them.
    d = default.get_config().model
    partial = config.model_kwargs({"backbone": "vgg16", "pooling": "gem"})
    expected = {"backbone": "vgg16", "weights": d.weights, "alpha": d.alpha, "pooling": "gem",
                "gem_p": d.gem_p, "rmac_levels": d.rmac_levels}  # fmt: skip
    assert partial == expected


def test_block_merges_over_the_defaults_and_as_dict_is_plain():
    cfg = ml_collections.ConfigDict({"rerank": {"qe": {"n": 5}}})
    rerank = config.block(cfg, "rerank")
    assert rerank["qe"] == {"n": 5, "alpha": default.get_config().rerank.qe.alpha}
    assert rerank["diffusion"] == default.get_config().rerank.diffusion.to_dict()
    assert config.block(None, "rerank") == config.defaults("rerank")
    plain = config.as_dict(default.get_config())
    assert type(plain) is dict and type(plain["model"]) is dict
    config.defaults("model")["backbone"] = "changed"  # a copy: the defaults stay
    assert config.defaults("model")["backbone"] == default.get_config().model.backbone
