"""The training and validation streams: the data stage's Parquet shards as Ray Datasets.

Not `ray.data.read_parquet`: in Ray 2.60 it starts with a file-listing task that asks for
a whole CPU whatever `ray_remote_args` say, and a 1-CPU head whose training workers hold
part of the CPU can never place it (the stream waits forever). Here the driver lists the
shards itself (it wrote them), and every read task reserves only `read_cpus`.

The read units are slices of row groups, in a seeded random order when shuffling: the
shards hold chunks in file order, so this (with each worker's local shuffle buffer) is
what mixes files into a batch. It replaces `randomize_block_order`, which had to
materialise the whole read first.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pyarrow as pa

SLICE_ROWS = 1024  # chunks per read unit: the granularity of the block-order shuffle


def read_units(folder: str | Path, slice_rows: int = SLICE_ROWS) -> list[dict[str, Any]]:
    """(file, row group, offset, rows) for every slice of every shard, in file order."""
    import pyarrow.parquet as pq

    units = []
    for f in sorted(Path(folder).glob("*.parquet")):
        meta = pq.ParquetFile(f).metadata
        for rg in range(meta.num_row_groups):
            n = meta.row_group(rg).num_rows
            units.extend({"file": str(f), "row_group": rg, "offset": o, "rows": min(slice_rows, n - o)}
                         for o in range(0, n, slice_rows))
    return units


def read_slices(batch: pa.Table) -> pa.Table:
    import pyarrow.parquet as pq

    tables = []
    for u in batch.to_pylist():
        rg = pq.ParquetFile(u["file"]).read_row_group(u["row_group"], columns=["input_ids", "labels"])
        tables.append(rg.slice(u["offset"], u["rows"]))
    return pa.concat_tables(tables)


def chunk_stream(folder: str | Path, read_cpus: float, seed: int | None = None) -> Any:
    """A lazy Dataset of the chunks under folder; seed=None keeps file order."""
    import ray

    units = read_units(folder)
    if seed is not None:
        random.Random(seed).shuffle(units)
    ds = ray.data.from_items(units, override_num_blocks=max(1, len(units)))
    return ds.map_batches(read_slices, batch_size=1, batch_format="pyarrow", num_cpus=read_cpus)
