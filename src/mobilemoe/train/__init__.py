"""Training: recipes, the one trainer for all four stages, distributed helpers and plots."""

from mobilemoe.train.recipe import Recipe, StageConfig, load_recipe
from mobilemoe.train.trainer import run_recipe

__all__ = ["Recipe", "StageConfig", "load_recipe", "run_recipe"]
