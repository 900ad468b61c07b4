"""Split seed records into shards and merge shard outputs, deterministically.

The cluster pipeline fans synthesis out over ``dsl.ParallelFor``: one task per shard of
the seeds, each expanding its seeds (teacher prompts still sample examples from all
seeds, so a shard's jobs are exactly the unsharded run's). Merging orders rows by their
first seed's position in the seed file, then by their order within the shard, so the
merged file is the same for any shard count and any completion order.
"""

from __future__ import annotations

from lorafleet.records import Record

__all__ = ["merge_records", "split_records"]


def split_records(records: list[Record], count: int) -> list[list[Record]]:
    """Deal records round-robin into ``count`` shards (record ``i`` goes to shard ``i % count``).

    Round-robin keeps shards balanced when long and short records cluster in the file.
    """
    if count < 1:
        raise ValueError("count must be >= 1")
    return [records[i::count] for i in range(count)]


def merge_records(shards: list[list[Record]], seeds: list[Record]) -> list[Record]:
    """Merge shard outputs in seed order.

    Args:
        shards: each shard's output records, in the order the shard produced them.
        seeds: the seed records, in file order.

    Returns:
        All records, ordered by the position of their first seed id (``meta.seed_ids[0]``,
        or their own id for seed rows), then by shard and position within the shard.
    """
    rank = {s.id: i for i, s in enumerate(seeds)}

    def first_seed(r: Record) -> int:
        ids = r.meta.get("seed_ids") or [r.id]
        return rank.get(ids[0], len(rank))

    tagged = [
        (first_seed(r), s, i, r) for s, shard in enumerate(shards) for i, r in enumerate(shard)
    ]
    return [r for *_, r in sorted(tagged, key=lambda t: t[:3])]
