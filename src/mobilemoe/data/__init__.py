"""Data: open corpora from the registries, tokenizers, packed token shards, mixtures, chat data."""
