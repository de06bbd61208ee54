"""The Python API: load a model to generate, stream, score and trace text; train a run. See docs/api.md.

Each call goes through the code the commands use (charrnn.sample's generation loop, charrnn.evaluation,
charrnn.neuron.states, charrnn.train.Trainer), so `Model.loss` is `charrnn eval` and `Model.generate`
is `charrnn sample`. Nothing here prints; problems are the typed errors of charrnn.errors, one line each.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, Union

import torch

from charrnn.checkpoint import DEFAULT_HOME, Warn, load_model
from charrnn.config import SentimentConfig, TrainConfig, parse_duration
from charrnn.data import Vocab
from charrnn.errors import DataError, UsageError
from charrnn.events import Receivers, TrainEvents
from charrnn.lexicon import Lexicon
from charrnn.model import CharRNN

PathLike = Union[str, Path]
Stop = Union[str, Sequence[str], None]


class Model:
    """A trained model with its vocabulary, as `charrnn.load` returns it."""

    def __init__(self, module: CharRNN, vocab: Vocab, checkpoint: dict):
        self.module = module  # the torch module, in eval mode
        self.checkpoint = checkpoint  # the loaded checkpoint payload (config, vocabulary, weights, unit record)
        self._vocab = vocab
        self.lexicon = Lexicon.from_record(checkpoint.get("lexicon"))  # the corpus's words; None in older checkpoints

    def __repr__(self) -> str:
        c = self.config
        return f"<charrnn.Model {c['cell']} {c['layers']}x{c['hidden']} from {self.path}>"

    # ------------------------------------------------------------ what it is

    @property
    def path(self) -> Path:
        """The checkpoint file the model was loaded from."""
        return Path(self.checkpoint["path"])

    @property
    def vocab(self) -> str:
        """The characters the model knows, in id order."""
        return self._vocab.chars

    @property
    def config(self) -> dict[str, Any]:
        """The model's shape: cell, layers, hidden, embed, dropout, vocab_size."""
        return dict(self.checkpoint["model_config"])

    @property
    def sentiment(self) -> dict[str, Any] | None:
        """The sentiment unit record (unit, layer, state, fix_values, ...), or None when the model has none."""
        from charrnn.neuron.steer import RECORD_KEY, upgrade_record

        rec = upgrade_record(self.checkpoint.get(RECORD_KEY))
        return dict(rec) if rec and "unit" in rec else None

    # ------------------------------------------------------------ text out

    def generate(self, prime: str = "", num: int = 1, length: int = 500, temperature: float = 0.8, top_k: int = 0,
                 top_p: float = 1.0, seed: int | None = None, stop: Stop = None, stop_keep: bool = False,
                 sentiment: str | None = None, words: str = "known", precision: str = "auto") -> list[str]:
        """`num` samples, each the prime followed by up to `length` generated characters.

        temperature 0 is greedy; `top_k` > 0 and `top_p` < 1 filter the draws; the same `seed` gives
        the same texts. `stop` (a string or several): each sample ends at its first match in the
        generated text, the match cut off (or kept, with `stop_keep`), and generation ends as soon as
        every sample has. `sentiment` ('positive' or 'negative') fixes the model's sentiment unit,
        as `charrnn sample --sentiment` does. `words` 'known' spells only words of the model's corpus
        (when its checkpoint has their list, `lexicon`), 'any' lets the model spell freely. `precision`
        'auto' samples in fp32 or bf16, whichever this machine measured faster for the model and `num`
        (as `charrnn sample --precision auto`); 'fp32' or 'bf16' fixes it, and with it the texts a
        seed gives (the server samples in fp32).
        """
        from charrnn.sample import generate

        cfg, hook = self._sampling(prime, num, length, temperature, top_k, top_p, seed, stop, stop_keep, sentiment, words,
                                   precision)
        return generate(self.module, self._vocab, cfg, hook=hook, lexicon=self.lexicon)

    def stream(self, prime: str = "", length: int = 500, temperature: float = 0.8, top_k: int = 0,
               top_p: float = 1.0, seed: int | None = None, stop: Stop = None, stop_keep: bool = False,
               sentiment: str | None = None, words: str = "known", precision: str = "auto") -> Iterator[str]:
        """One sample's generated text as it comes, in pieces (the prime is not repeated).

        A piece is one character, except that characters which might begin a stop string are held
        back until they are known not to, and then come together. Arguments as in `generate`, and
        with the same seed `prime + "".join(stream(...)) == generate(...)[0]`. Checked at the call,
        so a bad argument raises here rather than at the first `next()`.
        """
        from charrnn.sample import stream_chars

        cfg, hook = self._sampling(prime, 1, length, temperature, top_k, top_p, seed, stop, stop_keep, sentiment, words,
                                   precision)

        def pieces() -> Iterator[str]:
            for chars in stream_chars(self.module, self._vocab, cfg, hook=hook, lexicon=self.lexicon):
                if chars[0]:
                    yield chars[0]

        return pieces()

    def _sampling(self, prime: str, num: int, length: int, temperature: float, top_k: int, top_p: float,
                  seed: int | None, stop: Stop, stop_keep: bool, sentiment: str | None, words: str,
                  precision: str = "auto"):
        """(SampleConfig, steering hook or None) for the arguments of generate/stream, checked."""
        from charrnn.neuron.steer import steering_hook
        from charrnn.sample import SampleConfig, default_guidance, validate

        self._known(prime, "the prime")
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        guidance = default_guidance(self.module, self.checkpoint, sentiment)
        cfg = SampleConfig(temperature=temperature, top_k=top_k, top_p=top_p, length=length, prime=prime, seed=seed,
                           num=num, guidance=guidance, stop=stops, stop_keep=stop_keep, words=words, precision=precision)
        validate(cfg)
        hook, _ = steering_hook(self.module, self.checkpoint, sentiment, guided_rows=num if guidance > 0 else 0)
        return cfg, hook

    # ------------------------------------------------------------ text in

    def loss(self, text: str) -> float:
        """Mean loss on `text` in nats per character: what `charrnn eval` prints for a file holding it."""
        from charrnn.evaluation import evaluate

        self._known(text, "the text")
        data = torch.tensor(self._vocab.encode(text), dtype=torch.long)
        return evaluate(self.module, data)[0]

    def trace(self, text: str, unit: int | None = None) -> list[float]:
        """A unit's value after each character of `text` (the values `charrnn neuron show` colours by).

        `unit`: a unit of the top layer, read on its cell state (h for GRU and RNN); None: the model's
        sentiment unit, on the state it was found or bound on.
        """
        from charrnn.neuron.states import unit_trace
        from charrnn.neuron.steer import default_state

        self._known(text, "the text")
        if unit is None:
            rec = self.sentiment
            if rec is None:
                raise UsageError(f"{self.path} has no sentiment unit; pass unit=K (0 to {self.config['hidden'] - 1}) "
                                 "or find one with 'charrnn neuron find CHECKPOINT LABELED.tsv'")
            unit, layer, state = rec["unit"], rec["layer"], rec["state"].split("+")[0]  # 'c+h' records hold c's values
        else:
            layer, state = self.config["layers"] - 1, default_state(self.module)
        return unit_trace(self.module, self._vocab, text, unit, layer, state)

    def _known(self, text: str, what: str) -> None:
        if not isinstance(text, str):
            raise UsageError(f"{what} must be a str (got {type(text).__name__})")
        unknown = "".join(dict.fromkeys(c for c in text if c not in self._vocab.stoi))
        if unknown:
            raise DataError(f"{what} has {len(unknown)} character(s) this model never saw ({unknown[:20]!r}); "
                            "remove them (Model.vocab lists the ones it knows)")


def load(path: PathLike | None = None, device: str = "cpu", home: PathLike = DEFAULT_HOME,
         on_warn: Warn | None = None) -> Model:
    """A model from a run folder (its best checkpoint), a checkpoint file, or None (the latest run under `home`).

    `device`: cpu, cuda, mps or auto. A damaged checkpoint in a run folder is set aside and the next
    best used; `on_warn(message)`, when given, hears of it.
    """
    from charrnn.device import pick_device

    module, vocab, ck = load_model(None if path is None else Path(path), pick_device(device), Path(home), on_warn)
    return Model(module, vocab, ck)


# ---------------------------------------------------------------- training


@dataclass(frozen=True)
class Run:
    """A finished (or interrupted) training run, as `charrnn.train` returns it."""

    run_dir: Path  # the run folder: checkpoints, metrics.jsonl
    reason: str  # "done", "early stop" (patience) or "interrupted" (a signal)
    step: int  # optimiser steps done
    best_val_loss: float | None  # nats/char on the held-out text; None when never evaluated
    best_step: int | None
    val_loss: float | None  # the last evaluation's
    elapsed_s: float
    params: int  # trainable parameters

    def load(self, device: str = "cpu") -> Model:
        """The run's best checkpoint, loaded."""
        return load(self.run_dir, device)


Callback = Union[TrainEvents, Callable[[Any], None], None]
TIME_FIELD = "time_s"  # TrainConfig's field for train(time=...)


def train(corpus: PathLike | Sequence[PathLike] | None = None, *, time: str | float | None = None,
          run_dir: PathLike | None = None, resume: PathLike | None = None, init_from: PathLike | None = None,
          allow_changed_corpus: bool = False, home: PathLike = DEFAULT_HOME, progress: bool = False,
          callback: Callback = None, **options: Any) -> Run:
    """Train a model on the corpus files, as `charrnn train` does, and return the run.

    `time` is a wall-clock budget ('90s', '5m', '1h30m', or seconds); `options` are the fields of
    charrnn.config.TrainConfig (cell, layers, hidden, steps, epochs, lr, seed, ...; `sentiment=True`
    or a SentimentConfig for --sentiment-unit), each as the option of the same name. `resume` continues
    a run folder instead (only `threads` and `device` may be given with it). `progress` shows
    the command's progress display on stderr; `callback` receives the run's events: a TrainEvents
    subclass, or a function called with every event (charrnn/events.py).
    """
    from charrnn.train import Trainer

    events = _receiver(callback, progress)
    try:
        if resume is not None:
            trainer = _resumed(resume, corpus, time, run_dir, init_from, allow_changed_corpus, options, events)
        else:
            if allow_changed_corpus:
                raise UsageError("allow_changed_corpus goes with resume=RUN_DIR")
            trainer = Trainer.new(_corpus_paths(corpus), _train_config(time, options),
                                  run_dir=None if run_dir is None else Path(run_dir),
                                  init_from=None if init_from is None else Path(init_from), home=Path(home),
                                  callback=events)
        end = trainer.run()
    finally:
        events.close()
    return Run(**{f.name: end[f.name] for f in fields(Run)})


def _corpus_paths(corpus) -> list[Path]:
    if corpus is None or (not isinstance(corpus, (str, Path)) and len(corpus) == 0):
        raise UsageError("name a corpus file to train on, e.g. charrnn.train(['corpus.txt']), or resume=RUN_DIR")
    return [Path(corpus)] if isinstance(corpus, (str, Path)) else [Path(p) for p in corpus]


def _train_config(time: str | float | None, options: dict) -> TrainConfig:
    """The TrainConfig of train()'s keyword options; an unknown name is a one-line UsageError."""
    names = [f.name for f in fields(TrainConfig)]
    unknown = sorted(set(options) - set(names))
    if unknown:
        raise UsageError(f"charrnn.train() has no option {unknown[0]!r}; the options are TrainConfig's fields: "
                         f"{', '.join(names)}")
    if time is not None:
        if options.get(TIME_FIELD) is not None:
            raise UsageError("give time= or time_s=, not both")
        options = {**options, TIME_FIELD: parse_duration(time) if isinstance(time, str) else float(time)}
    sentiment = options.get("sentiment")
    if isinstance(sentiment, bool):
        options = {**options, "sentiment": SentimentConfig(unit=sentiment)}
    elif isinstance(sentiment, dict):
        options = {**options, "sentiment": SentimentConfig.from_dict(sentiment)}
    return TrainConfig(**options)


def _resumed(resume, corpus, time, run_dir, init_from, allow_changed_corpus: bool, options: dict, events):
    from charrnn.train import Trainer

    extra = sorted(set(options) - {"threads", "device"})
    if corpus is not None or time is not None or run_dir is not None or init_from is not None or extra:
        raise UsageError("resume= continues a run with its own corpus and settings; give only threads= or device= "
                         f"with it (got {', '.join(extra) or 'a corpus, time, run_dir or init_from'})")
    device = options.get("device")
    return Trainer.resume(Path(resume), callback=events, threads=options.get("threads"),
                          device=None if device in (None, "auto") else device, allow_changed_corpus=allow_changed_corpus)


class _Function(Receivers):
    """A plain function as a receiver: called with every event object (Receivers' forwarding, one target)."""

    def __init__(self, fn: Callable[[Any], None]):
        super().__init__()
        self.fn = fn

    def _deliver(self, name: str, e) -> None:
        self.fn(e)


def _receiver(callback: Callback, progress: bool) -> Receivers:
    if isinstance(callback, TrainEvents):
        receivers: list[TrainEvents] = [callback]
    elif callable(callback):
        receivers = [_Function(callback)]
    elif callback is None:
        receivers = []
    else:
        raise UsageError(f"callback must be a TrainEvents subclass or a function of one event (got {type(callback).__name__})")
    if progress:
        from charrnn import ui  # the display prints; it is made only when asked for

        receivers.insert(0, ui.TrainDisplay())
    return Receivers(*receivers)
