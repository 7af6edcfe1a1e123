"""The training-data n-gram index (tokengrams suffix arrays), pre-scanned from the dataset or streamed from batches."""

from memwatch.corpus.build import (
    DatasetIndex,
    dataset_index,
    documents_of_batch,
    iter_documents,
    latest_dataset_index,
)
from memwatch.corpus.feed import MODES, NgramFeed
from memwatch.corpus.index import (
    CorpusIndex,
    InfiniGramIndex,
    MissingPackageError,
    NgramSource,
    Part,
    Vocabulary,
    build_part,
    require_tokengrams,
)
from memwatch.corpus.stats import MAX_ORDER, kneser_ney_logprobs, ngram_products, window_counts
from memwatch.corpus.stream import StreamingIndex

__all__ = [
    "MAX_ORDER",
    "MODES",
    "CorpusIndex",
    "DatasetIndex",
    "InfiniGramIndex",
    "MissingPackageError",
    "NgramFeed",
    "NgramSource",
    "Part",
    "StreamingIndex",
    "Vocabulary",
    "build_part",
    "dataset_index",
    "documents_of_batch",
    "iter_documents",
    "kneser_ney_logprobs",
    "latest_dataset_index",
    "ngram_products",
    "require_tokengrams",
    "window_counts",
]
