"""Seq2seq with attention: grapheme-to-phoneme on CMUdict (with vs without attention) and numbers to Korean words.

Many-to-many with an autoregressive decoder (the notes' machine-translation shape): a
bidirectional LSTM reads the spelling, an LSTM decoder writes the phonemes one at a time,
fed its own previous output (teacher forcing in training, greedy or beam search at test
time). With attention (Bahdanau et al. 2015) the decoder looks back at every letter at
every step; without it the whole word must squeeze through the encoder's final state, the
long-range bottleneck the notes end on ("attention solves it").

Data: CMUdict from the ``cmudict`` package, split by word 90/5/5 (seed 0), stress removed
(39 phonemes), words of letters and apostrophes; a word with several pronunciations
trains on each and is right if the output matches any (PER against the closest).
Published on the standard CMUdict split (Bisani & Ney's, not ours): WER 23.6% (bi-LSTM,
Yao & Zweig 2015), 21.7% (attention, Toshniwal & Livescu 2016).

The quick demo: numbers 0..99,999 to Korean words with ``num2words`` (e.g. 12345 ->
"만 이천삼백사십오"), a small attention model; exact-match accuracy on held-out numbers.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Literal

import jax
import numpy as np

from jaxnets import data, plots, runs, train
from jaxnets.seq import figures, metrics, seq2seq, tasks
from jaxnets.seq import text as seqtext

TOUR_ORDER = 83
TOUR_SECONDS = 126  # its tour entry's wall time (2 jobs, 2 cores): longest start first
MAX_LEN = 28  # longest word and longest pronunciation in CMUdict (letters/apostrophes)
BOUNDS = (6, 8, 10, 12, 16, MAX_LEN + 1)


@dataclasses.dataclass(frozen=True)
class Config(train.LoopSettings):
    """G2P with and without attention on CMUdict, plus numbers -> Korean words.

    Command line: ``python -m experiments.translation [--steps 12000] [--hidden 256]``
    Runtime (measured on 2 quiet CPU cores): the full config trains two g2p models for
    ``steps`` each, the attention model in 10.8 min and the other in 5.8 min; 17 min in all.
    ``--quick``: about 1 minute. Tour (3 seeds of each arm, hidden 64, 250 steps, words
    of at most 8 letters, no Korean): 126 s wall in the 2-job tour, attention WER 59.6 ±
    0.9% vs no attention 89.9 ± 2.9% on 500 test words.
    Measured (seed 0, twice, identical): attention WER 25.8%, PER 6.1%; no attention WER
    29.7%, PER 7.6%; numbers to Korean words 99.7% exact.
    Expected: attention WER <= 30% (published 21.7% on the standard split) and below
    the no-attention model's; Korean numbers nearly all right.
    """

    seed: int = 0  # the first model seed (initial weights and batch order)
    seeds: int = 1  # each g2p model trained with seeds seed, seed + 1, ... (one after another)
    data_seed: int = 0  # the word split and the subsets of train/test words
    cell: Literal["lstm", "gru", "rnn"] = "lstm"
    attention: Literal["bahdanau", "luong"] = "bahdanau"
    compare_no_attention: bool = True
    embed: int = 64
    hidden: int = 256
    dropout: float = 0.0
    batch_size: int = 64
    buckets: tuple[int, ...] = BOUNDS  # length buckets of the training batches
    steps: int = 12000
    lr: float = 3e-3
    max_train_words: int | None = None  # a seeded subset of the training words
    max_eval_words: int | None = None  # a seeded subset of the test words
    # only words of at most this many letters whose pronunciations have at most as many
    # phonemes (every split, before the subsets); None: every word
    max_word_len: int | None = None
    eval_beam: int = 1  # 1 = greedy decoding
    korean: bool = True  # also train the numbers -> Korean words demo
    ko_numbers: int = 6000
    ko_hidden: int = 64
    ko_steps: int = 1500
    log_every: int = 100
    eval_every: int = 2000
    checkpoint_every: int = 1000


QUICK = {
    "hidden": 32,
    "embed": 16,
    "steps": 60,
    "max_train_words": 2000,
    "buckets": (29,),
    "max_eval_words": 200,
    "ko_numbers": 1000,
    "ko_hidden": 32,
    "ko_steps": 60,
    "log_every": 20,
    "eval_every": 0,
    "checkpoint_every": 60,
    "batch_size": 32,
}
TOUR = {
    # 3 seeds of each arm, same optimiser, lr and steps: words of at most 8 letters (and
    # phonemes) in one length bucket, so each arm's step compiles once; greedy decoding
    "seeds": 3,
    "hidden": 64,
    "embed": 32,
    "steps": 250,
    "lr": 1e-2,
    "max_word_len": 8,
    "buckets": (9,),
    "max_train_words": 30000,
    "max_eval_words": 500,
    "korean": False,
    "log_every": 50,
    "eval_every": 0,
    "checkpoint_every": 150,
}


def _trainer(cfg: Config, model: seq2seq.Seq2Seq, steps: int) -> train.Trainer:
    """Teacher-forced training: Adam, clipping, warm-up and cosine decay (every arm alike)."""
    tx = train.make_optimizer(
        "adam",
        cfg.lr,
        clip_norm=1.0,
        schedule="cosine",
        total_steps=steps,
        warmup_fraction=0.1,
        warmup_steps=200,
    )
    return train.Trainer(model, tasks.token_loss, tx, forward=tasks.seq2seq_forward)


def _train_seq2seq(
    cfg: Config,
    sub: runs.RunDir,
    trainer: train.Trainer,
    arrays: dict,
    val: dict,
    steps: int,
    desc: str,
    seed: int,
):
    """Train with length buckets; model seed ``seed`` (initial weights and batch order).

    Returns ``(state, (wall minutes, process CPU minutes), parameter count)``; CPU time
    counts every thread of this process, so on a dedicated machine the training's wall
    time is at most about that (less when XLA uses both cores). Seeds share ``trainer``,
    so its step compiles once.
    """
    batch_fn = tasks.BucketBatches(
        arrays,
        cfg.batch_size,
        seed,
        cfg.buckets,
        length_keys=("src_lengths", "lengths"),
        width_keys=("src", "x", "y"),
    )
    state = trainer.init(jax.random.key(seed), batch_fn(0))
    result = trainer.fit(
        state,
        batch_fn,
        steps,
        run_dir=sub,
        eval_batches=(lambda: data.eval_batches(val, 256)) if cfg.eval_every else None,
        **cfg.loop(),
        desc=desc,
    )
    minutes, cpu_minutes = result.minutes, result.cpu_minutes
    return result.state, (minutes, cpu_minutes), result.num_params


def _g2p_model(cfg: Config, attention: str | None, sv, tv) -> seq2seq.Seq2Seq:
    return seq2seq.Seq2Seq(
        len(sv),
        len(tv),
        embed_dim=cfg.embed,
        hidden_size=cfg.hidden,
        cell=cfg.cell,
        bidirectional_encoder=True,
        attention=attention,
        attention_size=cfg.hidden,
        dropout=cfg.dropout,
    )


def _g2p(cfg: Config, sub: runs.RunDir, trainer: train.Trainer, data: dict, seed: int) -> dict:
    """Train one g2p model (seed ``seed``) and score it on the test words."""
    model, sv, tv = trainer.model, data["sv"], data["tv"]
    name = model.attention or "none"
    state, minutes, n_params = _train_seq2seq(
        cfg, sub, trainer, data["train"], data["val"], cfg.steps, f"g2p {name} (seed {seed})", seed
    )
    test = data["test"]
    src, src_len = sv.encode_batch([w for w, _ in test], max_len=MAX_LEN)
    t0 = time.perf_counter()
    outs, weights = tasks.decode_dataset(
        model, state.variables, src, src_len, MAX_LEN + 1, beam_size=cfg.eval_beam
    )
    decode_s = time.perf_counter() - t0
    hyps = [tuple(tv.decode_symbols(o)) for o in outs]
    rates = metrics.error_rates(hyps, [prons for _, prons in test])
    examples = []
    for i in range(min(6, len(test))):
        ex = {
            "word": test[i][0],
            "output": " ".join(hyps[i]),
            "reference": " | ".join(" ".join(p) for p in test[i][1]),
        }
        if weights is not None:
            # one row per decoder step: the output symbols, then EOS if it came in time
            rows = min(len(hyps[i]) + 1, MAX_LEN + 1)
            ex["weights"] = weights[i, :rows, : len(test[i][0])].round(4).tolist()
        examples.append(ex)
    return {
        "wer": rates["wer"],
        "per": rates["per"],
        "train_minutes": minutes[0],
        "train_cpu_minutes": minutes[1],
        "params": n_params,
        "decode_seconds": decode_s,
        "examples": examples,
    }


def _g2p_seeds(cfg: Config, run_dir: runs.RunDir, attention: str | None, data: dict) -> dict:
    """One arm (with or without attention) over ``cfg.seeds`` seeds: per-seed lists."""
    name = "attention" if attention else "no_attention"
    trainer = _trainer(cfg, _g2p_model(cfg, attention, data["sv"], data["tv"]), cfg.steps)
    seeds = [cfg.seed + m for m in range(cfg.seeds)]
    per_seed = [
        # the first seed's sub-run keeps the name a one-seed run has always had
        run_dir.sub_run(
            f"g2p-{name}" if m == 0 else f"g2p-{name}-seed{s}",
            lambda sub, s=s: _g2p(cfg, sub, trainer, data, s),
        )
        for m, s in enumerate(seeds)
    ]
    out = {k: [r[k] for r in per_seed] for k in per_seed[0] if k not in ("params", "examples")}
    return out | {
        "seeds": seeds,
        "steps": cfg.steps,
        "params": per_seed[0]["params"],
        "test_words": len(data["test"]),
        "examples": per_seed[0]["examples"],  # the first seed's
    }


def _korean(cfg: Config, sub: runs.RunDir) -> dict:
    splits = seqtext.number_word_pairs(cfg.ko_numbers, lang="ko", seed=cfg.data_seed)
    sv = seqtext.Vocab.build([s for s, _ in splits["train"]])
    tv = seqtext.Vocab.build([t for _, t in splits["train"]])
    max_src, max_tgt = 5, max(len(t) for s in seqtext.SPLITS for _, t in splits[s]) + 1
    arrays = tasks.seq2seq_arrays(sv, tv, splits["train"], max_src, max_tgt)
    val = tasks.seq2seq_arrays(sv, tv, splits["validation"], max_src, max_tgt)
    model = seq2seq.Seq2Seq(
        len(sv),
        len(tv),
        embed_dim=32,
        hidden_size=cfg.ko_hidden,
        cell="lstm",
        attention=cfg.attention,
        attention_size=cfg.ko_hidden,
    )
    trainer = _trainer(cfg, model, cfg.ko_steps)
    state, minutes, _ = _train_seq2seq(
        cfg, sub, trainer, arrays, val, cfg.ko_steps, "numbers->ko", cfg.seed
    )
    test = splits["test"]
    src, src_len = sv.encode_batch([s for s, _ in test], max_len=max_src)
    outs, _ = tasks.decode_dataset(model, state.variables, src, src_len, max_tgt)
    hyps = [tv.decode(o) for o in outs]
    cer = metrics.error_rates([tuple(h) for h in hyps], [[tuple(t)] for _, t in test])["per"]
    return {
        "accuracy": float(np.mean([h == t for h, (_, t) in zip(hyps, test, strict=True)])),
        "cer": cer,
        "test_numbers": len(test),
        "train_minutes": minutes[0],
        "train_cpu_minutes": minutes[1],
        "examples": [
            {"number": s, "output": h, "reference": t}
            for h, (s, t) in list(zip(hyps, test, strict=True))[:8]
        ],
    }


def run(cfg: Config, run_dir: runs.RunDir) -> dict:
    if cfg.seeds < 1:
        raise ValueError(f"translation: seeds must be >= 1, got {cfg.seeds}")
    if cfg.max_word_len is not None and not 1 <= cfg.max_word_len <= MAX_LEN:
        raise ValueError(
            f"translation: max_word_len must be in [1, {MAX_LEN}] or None, got {cfg.max_word_len}"
        )
    splits = seqtext.g2p_splits(seed=cfg.data_seed)
    if cfg.max_word_len is not None:
        short = cfg.max_word_len
        splits = {
            k: [(w, p) for w, p in v if len(w) <= short and all(len(q) <= short for q in p)]
            for k, v in splits.items()
        }
    splits["train"] = data.subset(splits["train"], cfg.max_train_words, cfg.data_seed)
    splits["test"] = data.subset(splits["test"], cfg.max_eval_words, cfg.data_seed + 1)
    splits["validation"] = data.subset(splits["validation"], 2000, cfg.data_seed + 2)
    sv = seqtext.Vocab.build([w for w, _ in splits["train"]])
    tv = seqtext.Vocab.build([p for _, prons in splits["train"] for p in prons], sep=" ")
    train_pairs = [(w, p) for w, prons in splits["train"] for p in prons]
    val_pairs = [(w, prons[0]) for w, prons in splits["validation"]]
    g2p_data = {
        "sv": sv,
        "tv": tv,
        "train": tasks.seq2seq_arrays(sv, tv, train_pairs, MAX_LEN, MAX_LEN + 1),
        "val": tasks.seq2seq_arrays(sv, tv, val_pairs, MAX_LEN, MAX_LEN + 1),
        "test": splits["test"],
    }
    kinds = {"attention": cfg.attention}
    if cfg.compare_no_attention:
        kinds["no_attention"] = None
    g2p = {name: _g2p_seeds(cfg, run_dir, a, g2p_data) for name, a in kinds.items()}
    ko = run_dir.sub_run("numbers-ko", lambda sub: _korean(cfg, sub)) if cfg.korean else None

    # the first seed's training curves
    curves = {name: run_dir.sub(f"g2p-{name}").metrics() for name in g2p}
    plots.metric_curves(
        curves,
        run_dir.plot_path("g2p_loss"),
        keys=("loss", "eval_loss"),
        title="G2P teacher-forced loss",
        logy=True,
    )
    att = [e for e in g2p["attention"]["examples"] if "weights" in e]
    if att:
        figures.attention_maps(
            [
                (
                    list(e["word"]),
                    (e["output"].split() + ["<eos>"])[: len(e["weights"])],
                    np.asarray(e["weights"]),
                )
                for e in att
            ],
            run_dir.plot_path("attention"),
            title=f"{cfg.attention} attention (test words)",
        )
    plots.bars(
        {f"{k} WER": 100 * float(np.mean(v["wer"])) for k, v in g2p.items()}
        | {f"{k} PER": 100 * float(np.mean(v["per"])) for k, v in g2p.items()},
        run_dir.plot_path("g2p_error_rates"),
        ylabel="% (test)",
        title="CMUdict g2p error rates"
        + (f" (mean of {cfg.seeds} seeds)" if cfg.seeds > 1 else ""),
    )
    out = {
        "g2p": g2p,
        "train_words": len(splits["train"]),
        "test_words": len(splits["test"]),
    }
    return out | ({"num2words_ko": ko} if ko is not None else {})


def _setting(cfg: Config, results: dict) -> str:
    decode = "greedy decoding" if cfg.eval_beam == 1 else f"beam {cfg.eval_beam}"
    return (
        f"bi-{cfg.cell.upper()} encoder, {cfg.cell.upper()} decoder, hidden {cfg.hidden}, "
        f"{cfg.steps} Adam steps (lr {cfg.lr:g}) of batch {cfg.batch_size} on "
        f"{results['train_words']:,} training words"
        + (
            f" of at most {cfg.max_word_len} letters and phonemes"
            if cfg.max_word_len is not None
            else ""
        )
        + f", {decode} of {results['test_words']:,} test words, "
        + runs.seeds_text(len(results["g2p"]["attention"]["wer"]))
    )


def claims(results: dict, cfg: Config) -> list[runs.Claim]:
    """Attention vs no attention on test WER (lower is better), per seed.

    Over several seeds the attention model must be better by more than two standard
    errors of the difference (`runs.compare`); a one-seed (full-size) run is judged on
    the two numbers alone and its evidence says there is no standard error.
    """
    g2p = results["g2p"]
    if "no_attention" not in g2p:
        return []
    att = [100 * w for w in g2p["attention"]["wer"]]
    none = [100 * w for w in g2p["no_attention"]["wer"]]
    n = min(len(att), len(none))
    holds, evidence = runs.compare(
        att,
        none,
        higher_is_better=False,
        names=(f"{cfg.attention} attention WER %", "no attention WER %"),
        digits=1,
        min_seeds=min(n, 3),
    )
    return [
        runs.Claim(
            topic="Attention vs no attention",
            claim=(
                f"G2P on CMUdict ({_setting(cfg, results)}): with {cfg.attention} attention "
                "the test word error rate is lower than without it"
                + (
                    ", by more than 2 standard errors over seeds"
                    if n > 1
                    else " (one seed: the two numbers alone)"
                )
            ),
            holds=holds,
            evidence=evidence,
            seeds=n,
        )
    ]


def _run_config(run_dir: runs.RunDir) -> Config | None:
    if not run_dir.config_path.exists():
        return None
    return runs.config_from_args(sys.modules[__name__], runs.read_json(run_dir.config_path))


def report(results: dict, run_dir: runs.RunDir) -> str:
    g2p = results["g2p"]
    cfg = _run_config(run_dir)
    n = len(g2p["attention"]["wer"])
    lines = [f"Configuration: {_setting(cfg, results)}.", ""] if cfg else []
    lines += [
        f"| g2p model | test WER | test PER | train minutes (wall / CPU, {runs.seeds_text(n)}) | steps "
        "| params |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in g2p.items():
        lines.append(
            f"| {name} | {runs.pm(r['wer'], 1, scale=100, unit='%')} | {runs.pm(r['per'], 1, scale=100, unit='%')} | "
            f"{sum(r['train_minutes']):.1f} / {sum(r['train_cpu_minutes']):.1f} | "
            f"{r['steps']} | {r['params']:,} |"
        )
    lines += ["| published (standard split) | 21.7% attention, 23.6% bi-LSTM | | | | |", ""]
    lines.append(
        f"Mean ± standard error over seeds {', '.join(map(str, g2p['attention']['seeds']))}; "
        "WER per seed: "
        + "; ".join(
            f"{name} " + ", ".join(f"{100 * w:.1f}%" for w in r["wer"]) for name, r in g2p.items()
        )
        + "."
    )
    lines += ["", "| word | output | reference(s) |", "|---|---|---|"]
    for e in g2p["attention"]["examples"]:
        lines.append(f"| {e['word']} | {e['output']} | {e['reference']} |")
    ko = results.get("num2words_ko")
    if ko is not None:
        lines += [
            "",
            f"Numbers -> Korean words: exact match {100 * ko['accuracy']:.1f}%, "
            f"character error rate {100 * ko['cer']:.1f}% on {ko['test_numbers']} held-out "
            "numbers.",
            "",
            "| number | output | reference |",
            "|---|---|---|",
        ]
        for e in ko["examples"]:
            lines.append(f"| {e['number']} | {e['output']} | {e['reference']} |")
    else:
        lines += ["", "Numbers -> Korean words: not run in this configuration (`--no-korean`)."]
    lines += [
        "",
        "![attention](attention.png)",
        "",
        "![error rates](g2p_error_rates.png)",
        "",
        "![loss](g2p_loss.png)",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    runs.main(__name__)
