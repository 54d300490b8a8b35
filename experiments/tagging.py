"""Many-to-many tagging: word segmentation of space-stripped text, unidirectional vs bidirectional LSTM.

Every line of the ``fortunes`` collection is lower-cased, cut into words of letters and
apostrophes, and run together ("thequickbrownfox"); the tagger labels each character
1 if a word starts there. Deciding whether a word starts at character t needs the
characters after t ("the rapist" vs "therapist"), so this non-autoregressive task is
where the notes' point shows: a bidirectional layer (every state sees the whole line) is
allowed and clearly better than a unidirectional one (each state sees only the past).

Split by entry (90/5/5, seed 0), lines cut at word boundaries to at most ``max_chars``.
Reported: word-level F1 (a word is right when both its ends are) and boundary F1 (word
starts after the first character), on the test lines.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import numpy as np

from jaxnets import data, plots, runs, train
from jaxnets.seq import metrics, tasks
from jaxnets.seq import models as M
from jaxnets.seq import text as seqtext

TOUR_ORDER = 82


@dataclasses.dataclass(frozen=True)
class Config(train.LoopSettings):
    """Word segmentation by per-character tagging, uni- vs bidirectional.

    Command line: ``python -m experiments.tagging [--hidden 128] [--steps 3000]``
    Runtime: the full config took 3.5 min of CPU time (measured on a shared machine);
    ``--quick``: under a minute; tour: about 20 s.
    Measured (seed 0): word F1 0.728 unidirectional vs 0.879 bidirectional.
    Expected: bidirectional word F1 well above unidirectional (the future decides
    where a word ends).
    """

    seed: int = 0
    cell: Literal["lstm", "gru", "rnn"] = "lstm"
    embed: int = 32
    hidden: int = 128
    layers: int = 1
    dropout: float = 0.0
    max_chars: int = 64
    max_train: int | None = 40_000  # training lines (seeded subset)
    max_eval: int | None = 5_000  # test lines (seeded subset)
    batch_size: int = 64
    steps: int = 3000
    lr: float = 3e-3


QUICK = {
    "hidden": 16,
    "embed": 8,
    "steps": 40,
    "max_train": 2000,
    "max_eval": 300,
    "max_chars": 32,
    "log_every": 10,
    "eval_every": 0,
    "checkpoint_every": 40,
}
TOUR = {
    "hidden": 64,
    "steps": 300,
    "max_train": 20_000,
    "max_eval": 2_000,
    "log_every": 25,
    "eval_every": 150,
    "checkpoint_every": 150,
}


def _segment(chars: str, tags: np.ndarray) -> str:
    return "".join(
        (" " if t and i else "") + c for i, (c, t) in enumerate(zip(chars, tags, strict=True))
    )


def run(cfg: Config, run_dir: runs.RunDir) -> dict:
    texts = seqtext.fortune_lm_texts(seed=cfg.seed)
    ex = {s: seqtext.segmentation_examples(texts[s], cfg.max_chars) for s in seqtext.SPLITS}
    ex["train"] = data.subset(ex["train"], cfg.max_train, cfg.seed)
    ex["validation"] = data.subset(ex["validation"], 2000, cfg.seed + 1)
    ex["test"] = data.subset(ex["test"], cfg.max_eval, cfg.seed + 2)
    vocab = seqtext.Vocab.build(c for c, _ in ex["train"])
    arrays = {s: tasks.tagging_arrays(vocab, ex[s], cfg.max_chars) for s in seqtext.SPLITS}
    bounds = sorted({min(b, cfg.max_chars) for b in (32, 48, cfg.max_chars)})
    true_tags = [t for _, t in ex["test"]]

    out: dict = {}
    for name, bi in (("unidirectional", False), ("bidirectional", True)):
        model = M.Tagger(
            len(vocab),
            2,
            embed_dim=cfg.embed,
            hidden_size=cfg.hidden,
            cell=cfg.cell,
            num_layers=cfg.layers,
            bidirectional=bi,
            dropout=cfg.dropout,
        )

        def fit(sub: runs.RunDir, model=model, name=name) -> dict:
            tx = train.make_optimizer(
                "adam",
                cfg.lr,
                clip_norm=1.0,
                schedule="cosine",
                total_steps=cfg.steps,
                warmup_fraction=0.1,
                warmup_steps=100,
            )
            trainer = train.Trainer(model, tasks.token_loss, tx, forward=tasks.tagger_forward)
            batch_fn = tasks.BucketBatches(arrays["train"], cfg.batch_size, cfg.seed, bounds)
            state = trainer.init(jax.random.key(cfg.seed), batch_fn(0))
            res = trainer.fit(
                state,
                batch_fn,
                cfg.steps,
                run_dir=sub,
                eval_batches=(lambda: data.eval_batches(arrays["validation"], 256))
                if cfg.eval_every
                else None,
                **cfg.loop(),
                desc=name,
            )
            minutes, cpu_minutes = res.minutes, res.cpu_minutes
            pred = tasks.predict_tags(model, res.state.variables, arrays["test"])
            word, boundary = metrics.word_f1(true_tags, pred), metrics.boundary_f1(true_tags, pred)
            return {
                "word_f1": word["f1"],
                "word_precision": word["precision"],
                "word_recall": word["recall"],
                "boundary_f1": boundary["f1"],
                "train_minutes": minutes,
                "train_cpu_minutes": cpu_minutes,
                "params": res.num_params,
                "examples": [
                    _segment(c, p) for (c, _), p in zip(ex["test"][:5], pred[:5], strict=True)
                ],
            }

        out[name] = run_dir.sub_run(name, fit)

    plots.bars(
        {f"{n} word F1": r["word_f1"] for n, r in out.items()}
        | {f"{n} boundary F1": r["boundary_f1"] for n, r in out.items()},
        run_dir.plot_path("f1"),
        ylabel="test F1",
        title="Word segmentation",
    )
    plots.metric_curves(
        {n: run_dir.sub(n).metrics() for n in out},
        run_dir.plot_path("loss"),
        keys=("loss", "eval_loss"),
        title="per-character tagging loss",
    )
    return {
        "unidirectional_f1": out["unidirectional"]["word_f1"],
        "bidirectional_f1": out["bidirectional"]["word_f1"],
        "unidirectional_boundary_f1": out["unidirectional"]["boundary_f1"],
        "bidirectional_boundary_f1": out["bidirectional"]["boundary_f1"],
        "details": out,
        "reference": [_segment(c, t) for c, t in ex["test"][:5]],
        "train_lines": len(ex["train"]),
        "test_lines": len(ex["test"]),
    }


def report(results: dict, run_dir: runs.RunDir) -> str:
    d = results["details"]
    lines = [
        f"{results['train_lines']:,} training lines, {results['test_lines']:,} test lines.",
        "",
        "| tagger | word F1 | boundary F1 | train minutes |",
        "|---|---|---|---|",
    ]
    for name, r in d.items():
        lines.append(
            f"| {name} | {r['word_f1']:.3f} | {r['boundary_f1']:.3f} | {r['train_minutes']:.1f} |"
        )
    lines += ["", "| reference | unidirectional | bidirectional |", "|---|---|---|"]
    for ref, u, b in zip(
        results["reference"],
        d["unidirectional"]["examples"],
        d["bidirectional"]["examples"],
        strict=True,
    ):
        lines.append(f"| {ref} | {u} | {b} |")
    lines += ["", "![F1](f1.png)", "", "![loss](loss.png)"]
    return "\n".join(lines)


if __name__ == "__main__":
    runs.main(__name__)
