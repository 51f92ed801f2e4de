"""How a study's documents are laid out in jobs: shards of fixed size in source order (so adding
documents leaves every full shard as it was), and which documents the calibration and a
surrogate's training read (the ones after the study's, never evaluated)."""

# Evaluation jobs (shards) per method and value, at most: shard files are numbered in three digits
# (shard000 to shard999), and Snakemake plans every job before it runs one.
MAX_SHARDS = 1000


def n_shards(max_documents: int, shard_size: int) -> int:
    """Shards of `shard_size` documents holding the first `max_documents`."""
    return -(-max_documents // shard_size)


def documents_per_shard(config: dict) -> int:
    """Documents per evaluation job: `dataset.shard_size` if set, else as many documents of
    `max_length` tokens as fit in `dataset.shard_tokens` (at least one). Not rounded to the batch
    size, which changes speed only and must rerun nothing: the default budget (128 documents of
    8,192 tokens) fills batches of 8 and 16.

    Shards are fixed-size runs of the documents in source order, so adding documents leaves every
    full shard as it was: only the last (partial) shard and the new ones are evaluated."""
    dataset = config["dataset"]
    if dataset["shard_size"] is not None:
        return dataset["shard_size"]
    return max(dataset["shard_tokens"] // dataset["max_length"], 1)


def calibration_offset(config: dict) -> int:
    """Qualifying documents before the calibration documents: `calibration.skip_documents`, or by
    default the study's own (the calibration documents follow them)."""
    skip = config["calibration"]["skip_documents"]
    return config["dataset"]["max_documents"] if skip is None else skip


def surrogate_offset(config: dict) -> int:
    """Qualifying documents before the surrogate's training documents: the study's and the
    calibration's (the training documents follow them)."""
    return calibration_offset(config) + config["calibration"]["documents"]
