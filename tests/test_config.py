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


# -- issue 26 item 1: every block of a config is checked against configs/default.py -------------


def _leaves(tree, path=()):
    """(dotted path, default value) of every field of a nested dict."""
    for name, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, (*path, name))
        else:
            yield ".".join((*path, name)), value


def _with(tree, dotted, value):
    """A deep copy of `tree` with field `dotted` set to `value`."""
    import copy

    out = copy.deepcopy(tree)
    *parents, leaf = dotted.split(".")
    node = out
    for name in parents:
        node = node[name]
    node[leaf] = value
    return out


def _misspelt(name):
    """`name` with a typo: its last letter but one dropped ('pooling' -> 'poolig'), or its last
    letter doubled when it is that short ('k' -> 'kk')."""
    return name + name[-1] if len(name) <= 2 else name[:-2] + name[-1]


def test_an_unknown_field_in_any_block_names_the_file_the_field_and_the_nearest_name():
    defaults = config.as_dict(config.default_config())
    blocks = [name for name, value in defaults.items() if isinstance(value, dict)]
    assert {"model", "data", "whitening", "extract", "search", "rerank", "eval", "train"} <= set(
        blocks
    )
    fields = list(_leaves(defaults))
    for block in blocks:
        # Every field of the block, nested ones (search.ann.*, rerank.qe.*) included.
        for dotted, _ in (f for f in fields if f[0].startswith(block + ".")):
            *parents, leaf = dotted.split(".")
            wrong = ".".join((*parents, _misspelt(leaf)))
            bad = _with(defaults, wrong, 1)
            with pytest.raises(config.ConfigError) as e:
                config.check_config(bad, source="mine.py")
            message = str(e.value)
            assert "\n" not in message
            assert message == f'mine.py: config has no field {wrong}: did you mean "{leaf}"?'
    # The issue's own example, and a name close to nothing: the block's fields are listed.
    with pytest.raises(config.ConfigError, match='model.polling: did you mean "pooling"'):
        config.check_config({"model": {"polling": "gem"}})
    with pytest.raises(config.ConfigError, match="config.model has: alpha, backbone, gem_p"):
        config.check_config({"model": {"xyzzy": 1}})
    with pytest.raises(config.ConfigError, match='no field modle: did you mean "model"'):
        config.check_config({"modle": {"pooling": "gem"}})


def _wrong_value(like):
    """A value of another type than the default value `like`."""
    if isinstance(like, bool):
        return "yes"
    if isinstance(like, (int, float)):
        return "3"
    if isinstance(like, tuple):
        return "not a sequence"
    return ["not", "a", "string"] if like == "auto" else 7


def test_a_value_of_the_wrong_type_names_the_field_and_the_type():
    defaults = config.as_dict(config.default_config())
    config.check_config(defaults)  # the defaults themselves pass
    for dotted, like in _leaves(defaults):
        bad = _with(defaults, dotted, _wrong_value(like))
        with pytest.raises(config.ConfigError) as e:
            config.check_config(bad)
        assert str(e.value).startswith(f"config.{dotted} must be {config.type_name(like)} like")
    with pytest.raises(
        config.ConfigError, match=r"config.data.image_size must be an int like 1024"
    ):
        config.check_config({"data": {"image_size": 512.5}})
    with pytest.raises(
        config.ConfigError, match=r"config.data.scales must be a sequence of numbers"
    ):
        config.check_config({"data": {"scales": (1.0, "half")}})
    with pytest.raises(config.ConfigError, match=r"config.rerank.qe must be a block of fields"):
        config.check_config({"rerank": {"qe": 2}})


def test_values_of_the_right_type_pass():
    ok = {
        "model": {"gem_p": 3, "weights": None, "pooling": "GeM"},  # an int where a number goes
        "data": {"scales": [1.0, 0.5, 0.25], "image_size": 512},  # any length, list or tuple
        "rerank": {"methods": ("plain",), "diffusion": {"truncate": 1000}},
        "eval": {"kappas": [1, 100]},
        "workdir": "runs/mine",
    }
    config.check_config(ok)


def test_auto_fields_take_numbers_and_number_strings():
    # Issue 25 makes re-ranking settings 'auto' by default (rerank.diffusion.k = "auto"): such a
    # field takes a number, or the number string a command-line override leaves in a str field.
    for value in ("auto", 100, 0.5, "100", "0.5"):
        assert config.value_fits(value, "auto")
    assert not config.value_fits(True, "auto") and not config.value_fits([1], "auto")
    assert not config.value_fits(100, "gem")  # a plain string field takes no number
    schema = {"rerank": {"diffusion": {"k": "auto", "gamma": 3.0}}}
    config.check_config({"rerank": {"diffusion": {"k": 100}}}, schema=schema)
    config.check_config({"rerank": {"diffusion": {"k": "100"}}}, schema=schema)
    with pytest.raises(config.ConfigError, match="must be a string or a number like 'auto'"):
        config.check_config({"rerank": {"diffusion": {"k": [100]}}}, schema=schema)


def test_a_block_added_to_the_defaults_later_is_checked_without_new_code():
    schema = {**config.as_dict(config.default_config()), "tune": {"queries": 50, "grid": (1, 2)}}
    config.check_config({"tune": {"queries": 10, "grid": [3]}}, schema=schema)
    with pytest.raises(config.ConfigError, match='tune.querys: did you mean "queries"'):
        config.check_config({"tune": {"querys": 10}}, schema=schema)
    with pytest.raises(config.ConfigError, match="config.tune.grid must be a sequence of ints"):
        config.check_config({"tune": {"grid": [0.5]}}, schema=schema)


def test_complete_and_fill_defaults():
    with pytest.raises(config.ConfigError, match="config.train lacks margin"):
        train = config.defaults("train")
        del train["margin"]
        config.check_config({"train": train}, blocks=("train",), complete=True)
    partial = ml_collections.ConfigDict({"model": {"pooling": "gem"}})
    partial.lock()
    filled = config.fill_defaults(partial)
    assert filled.model.pooling == "gem" and filled.model.backbone == "efficientnetb1"
    assert filled.rerank.qe.n == config.default("rerank.qe.n")
    expected = config.as_dict(config.default_config())
    expected["model"]["pooling"] = "gem"
    assert config.as_dict(filled) == expected


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
