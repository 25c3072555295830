"""The data stage: corpus -> filters -> tokenizer -> fixed-length chunks as Parquet shards.

Kept import-light on purpose: Ray Data actors import `training.data.chunking` and friends,
and every module imported here would be paid for at each actor start.
"""
