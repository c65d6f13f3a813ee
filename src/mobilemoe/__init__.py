"""MobileMoE: on-device Mixture-of-Experts language models.

The pipeline: config -> model -> data -> train (stages) -> quantize -> export / infer -> eval / bench,
with the scaling-law planner beside it feeding configs in.
"""

import logging

from mobilemoe.config import ModelConfig, get_preset, resolve_model_config
from mobilemoe.errors import ConfigError, MobileMoEError
from mobilemoe.model import Transformer, count_parameters

# torchao's CPU wheel warns on import about its CUDA-only kernels, and torch about a deprecated pytree
# registration torchao makes; neither concerns a CPU user.
logging.getLogger("torchao").setLevel(logging.ERROR)
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)

__all__ = ["ConfigError", "MobileMoEError", "ModelConfig", "Transformer", "count_parameters", "get_preset",
           "resolve_model_config"]
__version__ = "0.1.0"
