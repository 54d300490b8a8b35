"""Character language model on fortunes vs a smoothed n-gram: bits per character, and samples at three temperatures.

One-to-many, autoregressive (the notes: the state at t depends only on the past, so the
model is unidirectional; building it bidirectional is refused). An LSTM reads the
``fortunes`` collection (90/5/5 split by entry, seed 0) as one character stream where
``<eos>`` ends every entry, trained on random 128-character windows. It is scored on the
held-out stream with its state carried through (stateful truncated-BPTT evaluation).

The baseline, fitted in the same run on the same stream: interpolated modified
Kneser-Ney character n-grams for n = 1..6, the order chosen on validation. The bar: the
LSTM's test bits per character at least 10% below the best n-gram's.

``claims()`` checks the LSTM against the n-gram of order ``vs_order`` with margin
``margin``: the mean test bits/char over ``seeds`` seeds plus two standard errors must be
below ``(1 - margin)`` times the n-gram's (deterministic: one number). The full config is
the bar above (best order, 10%); the tour, at 1/400 of the full run's compute, checks that
3 small LSTMs beat the 3-gram, and says which orders they do not beat yet.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxnets import plots, runs, train
from jaxnets.seq import models as M
from jaxnets.seq import ngram, tasks
from jaxnets.seq import text as seqtext

TOUR_ORDER = 81
TOUR_SECONDS = 112  # its tour entry's wall time (2 jobs, 2 cores): longest start first


@dataclasses.dataclass(frozen=True)
class Config(train.LoopSettings):
    """Char LSTM vs modified Kneser-Ney n-grams on the fortunes collection.

    Command line: ``python -m experiments.char_lm [--layers 2] [--steps 8000]``
    Runtime: the full config (2 layers of 512, dropout 0.3, AdamW weight decay 0.1, 8000
    steps of 64 x 128): 179 min wall / 337 min CPU (1.34 s a step) on 2 quiet cores with
    ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (1.67 s a step without it), 0.97 s a step on a
    2-core Intel Xeon with AVX-512 (2 h 9 min), so expect 2-3 hours; the n-gram part takes seconds; ``--quick``: under a minute; tour (3 seeds of
    1 layer of 128, 400 steps of 32 x 64): 112 s wall in the 2-job tour, LSTM 2.963 ±
    0.017 test bits/char vs the 3-gram's 3.122 (the 4-gram: 2.632).
    Expected (seed 0, measured): Kneser-Ney 6-gram 2.197 bits/char on test, the LSTM
    1.970, 10.3% lower (the target: 10% lower, <= 1.977). Earlier settings and their
    figures: the README's results table.
    """

    seed: int = 0  # the first model seed (initial weights, window order, samples)
    seeds: int = 1  # LSTMs trained with seeds seed, seed + 1, ... (one after another)
    data_seed: int = 0  # the train/validation/test split by entry
    cell: Literal["lstm", "gru", "rnn"] = "lstm"
    embed: int = 64
    hidden: int = 512
    layers: int = 2
    dropout: float = 0.3
    variational_dropout: bool = False  # one dropout mask per window, shared over time
    seq_len: int = 128
    batch_size: int = 64
    steps: int = 8000
    lr: float = 2e-3
    weight_decay: float = 0.1  # > 0: AdamW's decoupled decay; 0: plain Adam
    max_order: int = 6
    # The claim checked: the LSTM's test bits/char at least `margin` below the KN n-gram
    # of order `vs_order` (0: the order chosen on validation), by more than 2 standard
    # errors over seeds.
    vs_order: int = 0
    margin: float = 0.10
    max_train_chars: int | None = None  # use only the first N characters of training
    max_eval_chars: int | None = None  # score only the first N characters of val/test
    sample_chars: int = 300
    temperatures: tuple[float, ...] = (0.5, 0.8, 1.0)
    prompt: str = "The "
    log_every: int = 100
    eval_every: int = 1000
    checkpoint_every: int = 1000


QUICK = {
    "weight_decay": 0.0,
    "layers": 1,
    "dropout": 0.25,
    "batch_size": 32,
    "hidden": 32,
    "embed": 16,
    "steps": 40,
    "seq_len": 32,
    "max_order": 4,
    "max_train_chars": 60_000,
    "max_eval_chars": 8_000,
    "sample_chars": 60,
    "log_every": 20,
    "eval_every": 0,
    "checkpoint_every": 40,
}
TOUR = {
    # 3 seeds of a 1-layer LSTM of 128 for 400 steps (under one pass over the 1.9M
    # training chars, so no dropout), against KN n-grams fitted on the same stream: at
    # this budget it beats the 3-gram, not the 4-gram (the full run beats the 6-gram).
    "seeds": 3,
    "weight_decay": 0.0,
    "layers": 1,
    "dropout": 0.0,
    "batch_size": 32,
    "hidden": 128,
    "steps": 400,
    "lr": 2e-2,
    "seq_len": 64,
    "max_eval_chars": 40_000,
    "vs_order": 3,
    "margin": 0.0,
    "log_every": 50,
    "eval_every": 0,
    "checkpoint_every": 250,
}


def _cut(stream: np.ndarray, n: int | None) -> np.ndarray:
    return stream if n is None else stream[: n + 1]


def _check(cfg: Config) -> None:
    if cfg.seeds < 1:
        raise ValueError(f"char_lm: seeds must be >= 1, got {cfg.seeds}")
    if not 1 <= cfg.max_order:
        raise ValueError(f"char_lm: max_order must be >= 1, got {cfg.max_order}")
    if not 0 <= cfg.vs_order <= cfg.max_order:
        raise ValueError(
            f"char_lm: vs_order must be in [0, max_order={cfg.max_order}] (0: the order "
            f"chosen on validation), got {cfg.vs_order}"
        )
    if not 0.0 <= cfg.margin < 1.0:
        raise ValueError(f"char_lm: margin must be in [0, 1), got {cfg.margin}")


def run(cfg: Config, run_dir: runs.RunDir) -> dict:
    _check(cfg)
    texts = seqtext.fortune_lm_texts(seed=cfg.data_seed)
    vocab = seqtext.Vocab.build(texts["train"])
    streams = {s: seqtext.lm_stream(texts[s], vocab) for s in seqtext.SPLITS}
    streams["train"] = _cut(streams["train"], cfg.max_train_chars)
    streams["validation"] = _cut(streams["validation"], cfg.max_eval_chars)
    streams["test"] = _cut(streams["test"], cfg.max_eval_chars)

    # --- the n-gram baselines, every order scored on validation and test; the order with
    # the lowest validation bits is "the best n-gram" (test is never used to choose) ---
    t0 = time.perf_counter()
    val_bits, test_bits = {}, {}
    for n in range(1, cfg.max_order + 1):
        lm = ngram.fit_kneser_ney(streams["train"], n, len(vocab), pad_id=vocab.eos_id)
        val_bits[n] = ngram.bits_per_symbol(lm, streams["validation"])
        test_bits[n] = ngram.bits_per_symbol(lm, streams["test"])
    best_n = min(val_bits, key=val_bits.get)
    ngram_seconds = time.perf_counter() - t0

    # --- the LSTMs: one per seed, trained one after another with the same compiled step ---
    model = M.LanguageModel(
        len(vocab),
        embed_dim=cfg.embed,
        hidden_size=cfg.hidden,
        cell=cfg.cell,
        num_layers=cfg.layers,
        dropout=cfg.dropout,
        variational_dropout=cfg.variational_dropout,
    )
    tx = train.make_optimizer(
        "adamw" if cfg.weight_decay else "adam",
        cfg.lr,
        weight_decay=cfg.weight_decay,
        clip_norm=1.0,
        schedule="cosine",
        total_steps=cfg.steps,
        warmup_fraction=0.1,
        warmup_steps=200,
    )
    trainer = train.Trainer(model, tasks.token_loss, tx, forward=tasks.lm_forward)

    def fit(sub: runs.RunDir, seed: int, with_samples: bool) -> dict:
        batch_fn = tasks.LMWindows(streams["train"], cfg.batch_size, cfg.seq_len, seed)
        val_windows = tasks.LMWindows(streams["validation"], 64, cfg.seq_len, seed + 1)
        state = trainer.init(jax.random.key(seed), batch_fn(0))
        res = trainer.fit(
            state,
            batch_fn,
            cfg.steps,
            run_dir=sub,
            eval_batches=(lambda: [val_windows(i) for i in range(4)]) if cfg.eval_every else None,
            **cfg.loop(),
            desc=f"char lstm (seed {seed})",
        )
        v = res.state.variables
        out = {
            "validation_bpc": tasks.lm_bits_per_symbol(model, v, streams["validation"]),
            "test_bpc": tasks.lm_bits_per_symbol(model, v, streams["test"]),
            "train_minutes": res.minutes,
            "train_cpu_minutes": res.cpu_minutes,
            "params": res.num_params,
            "samples": {},
        }
        prompt = jnp.asarray(np.concatenate([[vocab.eos_id], vocab.encode(cfg.prompt)]))
        for i, temp in enumerate(cfg.temperatures if with_samples else ()):
            toks = M.generate(
                model,
                v,
                prompt,
                cfg.sample_chars,
                jax.random.fold_in(jax.random.key(seed), i),
                temperature=temp,
                suppress_ids=(vocab.pad_id, vocab.unk_id, vocab.bos_id),
            )
            text = "".join(
                "\n%\n" if s == seqtext.EOS else s
                for s in vocab.decode_symbols(np.asarray(toks)[0], strip=False)
            )
            out["samples"][str(temp)] = cfg.prompt + text
        return out

    seeds = [cfg.seed + m for m in range(cfg.seeds)]
    # the first seed's sub-run keeps the name a one-seed run has always had ("lstm")
    names = ["lstm" if m == 0 else f"lstm-seed{s}" for m, s in enumerate(seeds)]
    lstm = [
        run_dir.sub_run(name, lambda sub, s=s, m=m: fit(sub, s, with_samples=m == 0))
        for m, (name, s) in enumerate(zip(names, seeds, strict=True))
    ]
    plots.metric_curves(
        {f"seed {s}": run_dir.sub(n).metrics() for n, s in zip(names, seeds, strict=True)},
        run_dir.plot_path("loss"),
        keys=("bits", "eval_bits"),
        title="char LSTM, bits per character",
    )
    lstm_val = [r["validation_bpc"] for r in lstm]
    plots.bars(
        {f"{n}-gram": b for n, b in val_bits.items()} | {"LSTM": float(np.mean(lstm_val))},
        run_dir.plot_path("bpc"),
        ylabel="validation bits per char",
        title="KN n-grams vs LSTM" + (f" (mean of {len(seeds)} seeds)" if len(seeds) > 1 else ""),
    )
    lstm_test = [r["test_bpc"] for r in lstm]
    return {
        "seeds": seeds,
        "lstm_bpc": lstm_test,  # test bits/char, one per seed
        "lstm_validation_bpc": lstm_val,
        "best_ngram_bpc": test_bits[best_n],
        "best_n": best_n,
        "improvement": 1.0 - float(np.mean(lstm_test)) / test_bits[best_n],
        "ngram_validation_bpc": val_bits,
        "ngram_test_bpc": test_bits,
        "ngram_seconds": ngram_seconds,
        "train_minutes": [r["train_minutes"] for r in lstm],
        "train_cpu_minutes": [r["train_cpu_minutes"] for r in lstm],
        "params": lstm[0]["params"],
        "samples": lstm[0]["samples"],
        "vocab_size": len(vocab),
        "train_chars": int(len(streams["train"]) - 1),
        "test_chars": int(len(streams["test"]) - 1),
    }


def _mean_se(xs: list[float]) -> tuple[float, float | None]:
    """Mean and standard error; no standard error (None) for one seed."""
    return runs.mean_se(xs) if len(xs) > 1 else (float(xs[0]), None)


def _pm(m: float, se: float | None, n: int) -> str:
    if se is None:
        return f"{m:.3f} (1 seed: no standard error)"
    return f"{m:.3f} ± {se:.3f} ({n} seeds)"


def _setting(cfg: Config, results: dict) -> str:
    return (
        f"{cfg.layers} x {cfg.hidden} {cfg.cell.upper()}, {cfg.steps} steps of "
        f"{cfg.batch_size} x {cfg.seq_len} chars, {runs.seeds_text(len(results['seeds']))}; "
        f"{results['train_chars']:,} training chars, {results['test_chars']:,} test chars"
    )


def _beats(results: dict, threshold: float) -> bool:
    """The LSTM's mean test bits/char + 2 SE (the mean alone for one seed) < threshold."""
    m, se = _mean_se(results["lstm_bpc"])
    return m + 2 * (se or 0.0) < threshold


def claims(results: dict, cfg: Config) -> list[runs.Claim]:
    """The LSTM vs the (deterministic) KN n-gram of order ``cfg.vs_order`` on test.

    Holds iff the LSTM's mean test bits/char plus two standard errors over seeds is below
    ``(1 - cfg.margin)`` times the n-gram's (one seed: the mean alone, said so). The
    evidence also lists every n-gram order the LSTM beats, in the same sense, and those it
    does not.
    """
    n_test = {int(k): v for k, v in results["ngram_test_bpc"].items()}
    order = cfg.vs_order or int(results["best_n"])
    chosen = " (the order chosen on validation)" if not cfg.vs_order else ""
    target = n_test[order]
    bar = (1.0 - cfg.margin) * target
    lstm = results["lstm_bpc"]
    m, se = _mean_se(lstm)
    beaten = [n for n in sorted(n_test) if _beats(results, n_test[n])]
    not_beaten = [f"{n}-gram {n_test[n]:.3f}" for n in sorted(n_test) if n not in beaten]
    how = f"at least {100 * cfg.margin:.0f}% below" if cfg.margin else "below"
    evidence = (
        f"LSTM {_pm(m, se, len(lstm))} vs KN {order}-gram {target:.3f}"
        + (f" (bar {bar:.3f})" if cfg.margin else "")
        + (f"; LSTM mean + 2 SE {m + 2 * se:.3f}. " if se is not None else ". ")
        + (
            f"It beats the {', '.join(f'{n}-gram' for n in beaten) or 'no n-gram'}; "
            f"not yet the {', '.join(not_beaten)}"
            if not_beaten
            else f"It beats every order fitted ({', '.join(map(str, sorted(n_test)))})"
        )
    )
    return [
        runs.Claim(
            topic="RNN: generation (char LM)",
            claim=(
                f"A char LSTM ({_setting(cfg, results)}) predicts the next character of "
                f"held-out fortunes with test bits/char {how} a Kneser-Ney {order}-gram"
                f"{chosen} fitted on the same training text "
                + ("(mean + 2 SE over seeds)" if se is not None else "(one seed: its value alone)")
            ),
            holds=_beats(results, bar),
            evidence=evidence,
            seeds=len(lstm),
        )
    ]


def _run_config(run_dir: runs.RunDir) -> Config | None:
    if not run_dir.config_path.exists():
        return None
    return runs.config_from_args(sys.modules[__name__], runs.read_json(run_dir.config_path))


def report(results: dict, run_dir: runs.RunDir) -> str:
    lstm = results["lstm_bpc"]
    m, se = _mean_se(lstm)
    n_test = {int(k): v for k, v in results["ngram_test_bpc"].items()}
    n_val = {int(k): v for k, v in results["ngram_validation_bpc"].items()}
    cfg = _run_config(run_dir)
    lines = [f"Configuration: {_setting(cfg, results)}.", ""] if cfg else []
    lines += [
        "| model | validation bits/char | test bits/char |",
        "|---|---|---|",
    ]
    for n in sorted(n_test):
        best = " (chosen on validation)" if n == results["best_n"] else ""
        lines.append(f"| KN {n}-gram{best} | {n_val[n]:.3f} | {n_test[n]:.3f} |")
    vm, vse = _mean_se(results["lstm_validation_bpc"])
    lines += [
        f"| LSTM ({results['params']:,} params; mean ± SE over seeds "
        f"{', '.join(map(str, results['seeds']))}) | {_pm(vm, vse, len(lstm))} | "
        f"{_pm(m, se, len(lstm))} |",
        "",
        "LSTM test bits/char per seed: " + ", ".join(f"{b:.3f}" for b in lstm) + ". "
        f"Training: {sum(results['train_minutes']):.1f} min wall, "
        f"{sum(results['train_cpu_minutes']):.1f} min CPU over all seeds; the n-grams "
        f"{results['ngram_seconds']:.0f} s.",
        "",
        f"LSTM (mean) vs the best n-gram: **{100 * results['improvement']:.1f}%** fewer bits "
        f"per character over {results['test_chars']:,} test characters (the full-size "
        "target: >= 10%).",
        "",
    ]
    for temp, text in results["samples"].items():
        lines += [f"Sample at temperature {temp} (seed {results['seeds'][0]}):", "", "```"]
        lines += [text, "```", ""]
    lines += ["![bits per char](bpc.png)", "", "![loss](loss.png)"]
    return "\n".join(lines)


if __name__ == "__main__":
    runs.main(__name__)
