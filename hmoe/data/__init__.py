"""The data layer: the schema (features, labels, the batch layout), in-memory batching and the
synthetic "ads world" that is hmoe's embedded default dataset."""

from hmoe.data.batches import BatchIterator, check_columns, iterate_batches, num_rows, to_tensors
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
from hmoe.data.synthetic import GroundTruth, SyntheticConfig, SyntheticWorld, generate, load_world

__all__ = ["BatchIterator", "CategoricalFeature", "GroundTruth", "Label", "NumericFeature",
           "PretrainedFeature", "Schema", "SequenceFeature", "SyntheticConfig", "SyntheticWorld",
           "batch_dtype", "batch_keys", "check_columns", "dump_schema", "generate",
           "iterate_batches", "load_schema", "load_world", "num_rows", "schema_to_dict",
           "to_tensors"]
# preprocess() itself stays in hmoe.data.preprocess: exporting it here would shadow the module.
from hmoe.data.preprocess import (
    DatasetConfig,
    PreprocessedData,
    load_dataset_config,
    load_preprocessed,
)
from hmoe.data.readers import ChunkBudget, DataFileError, ReaderOptions, read_chunks

__all__ += ["ChunkBudget", "DataFileError", "DatasetConfig", "PreprocessedData", "ReaderOptions",
            "load_dataset_config", "load_preprocessed", "read_chunks"]
