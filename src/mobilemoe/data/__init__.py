"""Data: open corpora from the registries, packed token shards, mixtures, chat data."""

from mobilemoe.data.loader import IGNORE_INDEX, PackedBatches, iter_eval_batches
from mobilemoe.data.prepare import PreparedData, load_data_recipe, prepare
from mobilemoe.data.shards import Shard, write_shard

__all__ = ["IGNORE_INDEX", "PackedBatches", "PreparedData", "Shard", "iter_eval_batches",
           "load_data_recipe", "prepare", "write_shard"]
