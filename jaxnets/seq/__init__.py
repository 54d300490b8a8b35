"""Sequence tasks: the notes' many-to-one, one-to-many and many-to-many shapes, and
seq2seq with attention, on real offline text.

- ``jaxnets.seq.text``: ``Vocab`` (symbols <-> ids with PAD/UNK/BOS/EOS, padded batches
  with ``lengths``) and the offline data sets (fortunes, CMUdict, num2words).
- ``jaxnets.seq.models``: ``SequenceClassifier``, ``LanguageModel`` + ``generate``,
  ``Tagger``, and the pieces they share.
- ``jaxnets.seq.seq2seq``: ``Seq2Seq`` + ``greedy_decode`` / ``beam_search``, attention.
- ``jaxnets.seq.ngram``: modified Kneser-Ney character n-gram baseline.
- ``jaxnets.seq.metrics``: accuracy, macro-F1, segmentation F1, WER/PER.
"""

from jaxnets.seq.models import LanguageModel, SequenceClassifier, Tagger, generate
from jaxnets.seq.seq2seq import Seq2Seq, beam_search, greedy_decode
from jaxnets.seq.text import Vocab

__all__ = [
    "Vocab",
    "SequenceClassifier",
    "LanguageModel",
    "Tagger",
    "Seq2Seq",
    "generate",
    "greedy_decode",
    "beam_search",
]
