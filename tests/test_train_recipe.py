import math

import pytest

from mobilemoe.errors import ConfigError
from mobilemoe.train.recipe import StageConfig, parse_recipe
from mobilemoe.train.trainer import lr_at


def _recipe(**stage):
    return {"name": "r", "model": "micro-moe", "data": "d.yaml",
            "stages": [{"name": "pretrain", "mixture": {"prose": 1.0}, **stage}]}


def test_schedules():
    cos = StageConfig(name="s", steps=11, lr=1.0, warmup_steps=1, min_lr_ratio=0.1, schedule="cosine")
    assert lr_at(0, cos) == 1.0 and lr_at(1, cos) == pytest.approx(1.0) and lr_at(10, cos) == pytest.approx(0.1)
    assert lr_at(5, cos) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 4 / 9)))
    lin = StageConfig(name="s", steps=11, lr=1.0, min_lr_ratio=0.0, schedule="linear")
    assert [round(lr_at(i, lin), 6) for i in (0, 5, 10)] == [1.0, 0.5, 0.0]
    wsd = StageConfig(name="s", steps=10, lr=1.0, min_lr_ratio=0.0, schedule="wsd", decay_fraction=0.5)
    assert [lr_at(i, wsd) for i in (0, 4)] == [1.0, 1.0] and lr_at(9, wsd) == 0.0 and 0 < lr_at(7, wsd) < 1
    warm = StageConfig(name="s", steps=10, lr=1.0, warmup_steps=4, schedule="constant")
    assert [lr_at(i, warm) for i in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]


def test_recipe_parses_and_resolves_model():
    recipe = parse_recipe(_recipe(steps=5, lr=1e-3))
    assert recipe.stages[0].steps == 5 and recipe.model_config().name == "micro-moe"


@pytest.mark.parametrize("stage,match", [
    ({"stpes": 5}, "unknown key 'stpes'; did you mean 'steps'"),
    ({"kind": "rlhf"}, "'kind' must be one of"),
    ({"mixture": {"prose": 0.0}}, r"mixture.prose.*must be > 0"),
    ({"warmup_steps": 500, "steps": 100}, "warmup_steps"),
])
def test_bad_stage_names_the_field(stage, match):
    with pytest.raises(ConfigError, match=match):
        parse_recipe(_recipe(**stage))


def test_bad_recipe_keys():
    with pytest.raises(ConfigError, match="unknown key 'modle'"):
        parse_recipe({**_recipe(), "modle": "x"})
    with pytest.raises(ConfigError, match="unknown model preset"):
        parse_recipe({**_recipe(), "model": "mobilemoe-xxl"})
    with pytest.raises(ConfigError, match="has no stage 'sft'"):
        parse_recipe(_recipe()).stage("sft")
