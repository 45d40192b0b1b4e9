"""Typed config sections: DEFAULTS derived from them, values checked when a config loads,
and no library function with a default that disagrees with its config section."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from taxoclass.config import (
    DEFAULTS,
    AugmentConfig,
    Config,
    FinetuneSettings,
    OpensetConfig,
    TrainConfig,
    load_config,
)
from taxoclass.errors import ConfigError


def test_defaults_are_derived_from_the_sections():
    cfg = Config()
    assert DEFAULTS == cfg.to_dict()
    assert list(DEFAULTS) == ["data", "backbone", "embeddings", "model", "loss", "train",
                              "decode", "augment", "openset", "finetune", "out"]
    assert DEFAULTS["openset"]["detector"] == OpensetConfig().detector == "mahalanobis"
    assert DEFAULTS["train"]["epochs"] == TrainConfig().epochs == 200
    assert DEFAULTS["augment"]["scale"] == [0.45, 1.4]  # YAML-shaped: a list, not a tuple
    assert DEFAULTS["finetune"] == dataclasses.asdict(FinetuneSettings())
    # YAML round trip: what provenance writes reads back as the same config
    assert yaml.safe_load(yaml.safe_dump(DEFAULTS)) == DEFAULTS
    assert Config.from_dict(DEFAULTS) == cfg


def test_partial_section_takes_the_defaults():
    o = OpensetConfig.from_dict({"detector": "knn"})
    assert o.detector == "knn" and o.combiner == "gate" and o.confidence == "path_logit"
    assert Config.from_dict({"train": {"epochs": 5}}).train == TrainConfig(epochs=5)


@pytest.mark.parametrize(("override", "message"), [
    ("train.epochs=five", "train.epochs: expected an integer >= 1, found 'five'."),
    ("train.epochs=0", "train.epochs: expected an integer >= 1, found 0."),
    ("train.lr=-1", "train.lr: expected a number > 0, found -1."),
    ("model.hidden=true", "model.hidden: expected an integer >= 1 or null, found True."),
    ("openset.detector=nope", "openset.detector: expected one of 'knn', 'lof', 'ecod', "
                              "'copod', 'iforest', 'mahalanobis', found 'nope'."),
    ("openset.target_precision.species=1.5",
     "openset.target_precision.species: expected a number > 0 and <= 1, found 1.5."),
    ("openset.target_precision=0", "openset.target_precision: expected a number > 0 and <= 1, "
                                   "found 0."),
    ("augment.scale=[1]", "augment.scale: expected a list of 2 numbers, found [1]."),
    ("data.ranks=genus", "data.ranks: expected a list of ranks, top-down (e.g. [order, family, "
                         "genus, species]), or 'auto', found 'genus'."),
    ("data.ranks=[genus,genus]", "data.ranks: expected distinct ranks, at least one, found "
                                 "['genus', 'genus']."),
    ("decode.method=argmax", "decode.method: expected one of 'path', 'marginal', 'topdown', "
                             "'crm', found 'argmax'."),
    ("finetune.unfreeze_blocks=-2", "finetune.unfreeze_blocks: expected an integer >= -1, "
                                    "found -2."),
    ("data.val_fraction=0", "data.val_fraction: expected a number > 0 and < 1, found 0."),
    ("backbone.image_size=100000", "backbone.image_size: expected an integer >= 16 and <= 4096 "
                                   "or null, found 100000."),
    ("loss.rank_weights={species: -1}", "loss.rank_weights.species: expected a number >= 0, "
                                        "found -1."),
    ("train=5", "train: expected a mapping of keys to values, found int (5)."),
    ("data.allow_outside_root=maybe", "data.allow_outside_root: expected true or false, found "
                                      "'maybe'."),
])
def test_bad_values_are_clear_errors(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert str(err.value) == message


def test_good_values_pass_and_stay_as_written(tmp_path):
    # YAML 1.1 reads 1e-4 as a string: accepted as a number, the config keeps it as written
    cfg = load_config(None, ["finetune.lr=1e-4", "train.patience=null", "train.batch_size=0",
                             "openset.target_precision=0.9", "model.hidden=64"])
    assert cfg["finetune"]["lr"] == "1e-4" and cfg["train"]["patience"] is None
    assert FinetuneSettings.from_mapping(cfg["finetune"]).lr == "1e-4"
    for name in ("leaf.yaml", "leaf-openset.yaml", "leaf-plots.yaml", "leaf-plots-finetune.yaml"):
        assert Config.from_dict(load_config(f"configs/{name}")).data.ranks


def test_target_precision_must_cover_the_configured_ranks():
    # Issue 15: the default names a 'default' target for ranks it does not name (order).
    dflt = load_config(None, ["data.ranks=[order, family, genus]"])
    assert dflt["openset"]["target_precision"]["default"] == 0.95
    with pytest.raises(ConfigError, match=r"openset.target_precision: no value for rank\(s\) "
                                          r"\['order'\] of data.ranks"):
        load_config(None, ["data.ranks=[order, family, genus]",
                           "openset.target_precision={family: 0.9, genus: 0.9}"])
    ok = load_config(None, ["data.ranks=[order, family, genus]", "openset.target_precision=0.9"])
    assert ok["openset"]["target_precision"] == 0.9
    assert load_config(None, ["data.ranks=[order, genus]", "openset.enabled=false"])


def test_unknown_keys_and_sections_are_errors():
    with pytest.raises(ConfigError, match=r"openset: unknown key\(s\) \['detectr'\]"):
        OpensetConfig.from_dict({"detectr": "knn"})
    with pytest.raises(ConfigError, match=r"unknown section\(s\) \['trian'\]"):
        Config.from_dict({"trian": {}})
    with pytest.raises(ConfigError, match="augment: expected a mapping"):
        AugmentConfig.from_dict([1, 2])  # type: ignore[arg-type]


def test_augment_section_feeds_view_settings():
    from taxoclass.features.views import ViewSettings

    a = AugmentConfig()
    assert ViewSettings.from_mapping(a.view_settings()) == ViewSettings()
    assert ViewSettings().views_per_image == a.views_per_image == 0


def _defaults(func) -> dict:
    import inspect

    return {k: p.default for k, p in inspect.signature(func).parameters.items()
            if p.default is not inspect.Parameter.empty}


def test_no_function_default_disagrees_with_its_config_section():
    """Every library default that a config key also sets is the config section's value, so
    a Python caller passing a partial section gets the model a CLI user gets."""
    from taxoclass.features.views import ViewSettings
    from taxoclass.model import decoding, heads, losses
    from taxoclass.openset import detectors, evidence, scorer, thresholds
    from taxoclass.taxonomy.tree import DEFAULT_RANKS

    cfg = Config()
    o, d = dataclasses.asdict(cfg.openset), dataclasses.asdict(cfg.decode)
    loss, model = dataclasses.asdict(cfg.loss), dataclasses.asdict(cfg.model)
    renamed = {"method": "detector", "kind": "confidence", "n_folds": "folds"}
    checks = [  # (function, section values, parameter -> config key)
        (scorer.fit_detector, o, renamed),
        (scorer.fit_evidence, o, {}),
        (thresholds.fit_thresholds, o, {}),
        (scorer.fit_scorer, o, renamed),
        (scorer.confidence_of, o, renamed),
        (scorer.crossfit_predictions, o, renamed),
        (scorer.crossfit_predictions, d, {"decode_method": "method"}),
        (detectors.OutlierDetector.__init__, o, renamed),
        (evidence.EvidenceCombiner.__init__, o, {"method": "combiner"}),
        (decoding.decode, d, {}),
        (losses.ClassDependencyLoss.__init__, loss, {}),
        (losses.class_balanced_weights, loss, {"beta": "class_balanced_beta"}),
        (heads.MultiRankHead.__init__, model, {}),
    ]
    disagree, n_checked = [], 0
    for func, section, names in checks:
        for param, default in _defaults(func).items():
            key = names.get(param, param)
            if key not in section:
                continue
            n_checked += 1
            if section[key] != default:
                disagree.append(f"{func.__qualname__}({param}={default!r}): config says "
                                f"{section[key]!r}")
    views = {f.name: f.default for f in dataclasses.fields(ViewSettings)}
    aug = AugmentConfig().view_settings()
    disagree += [f"ViewSettings.{k}={v!r}: config says {aug[k]!r}" for k, v in views.items()
                 if aug.get(k) != (list(v) if isinstance(v, tuple) else v)]
    if list(DEFAULT_RANKS) != cfg.data.ranks:
        disagree.append(f"taxonomy.tree.DEFAULT_RANKS={DEFAULT_RANKS}: config says "
                        f"{cfg.data.ranks}")
    assert not disagree, "\n".join(disagree)
    assert n_checked >= 32  # the mapping above still finds the parameters it checks


def test_split_file_is_checked(tmp_path, caplog):
    from taxoclass.pipelines.data import read_split_file, validation_mask

    path = tmp_path / "split.csv"
    with pytest.raises(ConfigError, match="not found"):
        read_split_file(path)
    for text, message in (("id,part\n1,val\n", "expected columns image_id and split"),
                          ("image_id,split\n1,val\n2,test\n", "found \\['test'\\]"),
                          ("image_id,split\n1,val\n1,train\n", "listed twice")):
        path.write_text(text)
        with pytest.raises(ConfigError, match=message):
            read_split_file(path)
    path.write_text("image_id,split,fold\n1,val,0\n2,train,1\n")
    with caplog.at_level("WARNING", logger="taxoclass"):
        mask = validation_mask(["1", "2", "3"], [], {"split_file": str(path)})
    assert mask.tolist() == [True, False, False] and "1 of 3 labelled images" in caplog.text
