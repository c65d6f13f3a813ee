"""MobileMoE: on-device Mixture-of-Experts language models.

The pipeline: config -> model -> data -> train (stages) -> quantize -> export / infer -> eval / bench,
with the scaling-law planner beside it feeding configs in.
"""

from mobilemoe.config import ModelConfig, get_preset, resolve_model_config
from mobilemoe.errors import ConfigError, MobileMoEError
from mobilemoe.model import Transformer, count_parameters

__all__ = ["ConfigError", "MobileMoEError", "ModelConfig", "Transformer", "count_parameters", "get_preset",
           "resolve_model_config"]
__version__ = "0.1.0"
