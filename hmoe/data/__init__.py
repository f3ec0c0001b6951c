"""The data layer, along its seams:

    schema            features, labels and the batch layout
    readers           raw CSV / Parquet files, read in bounded chunks
    dataset_config    a schema plus how raw columns become rows (configs/datasets/*.yaml)
    parse, fit, encode, behaviour_log   preprocessing's parts: raw chunks -> values, pass 1
                      (vocabularies, statistics), pass 2 (the batch layout), event logs -> samples
    preprocess        the two passes into a cached Parquet store
    store             the Parquet store: batch-layout columns on disk, read a row group at a time
    stream            every source -> batches, shuffled in bounded memory, with workers
    batches           in-memory columns -> batches, and the boundary check
    synthetic         the synthetic "ads world", hmoe's embedded default dataset
"""

from hmoe.data.batches import BatchIterator, check_columns, iterate_batches, num_rows, to_tensors
from hmoe.data.dataset_config import DatasetConfig, load_dataset_config

# preprocess() itself stays in hmoe.data.preprocess: exporting it here would shadow the module.
from hmoe.data.preprocess import PreprocessedData, load_preprocessed
from hmoe.data.readers import ChunkBudget, DataFileError, ReaderOptions, read_chunks
from hmoe.data.schema import (
    CategoricalFeature,
    Label,
    NumericFeature,
    PretrainedFeature,
    Schema,
    SequenceFeature,
    batch_dtype,
    batch_keys,
    dump_schema,
    load_schema,
    schema_to_dict,
)
from hmoe.data.store import ParquetStore, StoreWriter
from hmoe.data.stream import ColumnSource, StoreSource, Subset, stream_batches
from hmoe.data.synthetic import (
    GroundTruth,
    SyntheticConfig,
    SyntheticWorld,
    generate,
    load_world,
    open_world,
    write_world,
)

__all__ = ["BatchIterator", "CategoricalFeature", "ChunkBudget", "ColumnSource", "DataFileError",
           "DatasetConfig", "GroundTruth", "Label", "NumericFeature", "ParquetStore",
           "PreprocessedData", "PretrainedFeature", "ReaderOptions", "Schema", "SequenceFeature",
           "StoreSource", "StoreWriter", "Subset", "SyntheticConfig", "SyntheticWorld",
           "batch_dtype", "batch_keys", "check_columns", "dump_schema", "generate",
           "iterate_batches", "load_dataset_config", "load_preprocessed", "load_schema",
           "load_world", "num_rows", "open_world", "read_chunks", "schema_to_dict",
           "stream_batches", "to_tensors", "write_world"]
