"""The training loop: truncated BPTT over contiguous streams, evaluated and saved on the way, resumable exactly.

`Trainer` holds the step and the loop; the jobs around them live beside it: building new and
resumed runs (assemble.py), the run folder (runfolder.py), recovery from bad steps (recovery.py),
loss spikes (spike.py), evaluation (evaluation.py), device and precision (device.py). Progress goes
to a `TrainEvents` receiver (events.py); this module never prints.
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import asdict
from pathlib import Path

import torch

from charrnn import checkpoint as ckpt_mod
from charrnn.assemble import Parts, new_run, payload, resumed_run
from charrnn.config import TrainConfig
from charrnn.data import StreamBatcher
from charrnn.device import autocast_dtype, pick_device  # noqa: F401 (the CLI imports them from here)
from charrnn.distributed import Dist
from charrnn.errors import DistributedError
from charrnn.evalsample import eval_sample
from charrnn.evaluation import evaluate
from charrnn.events import EndEvent, EvalEvent, RollbackEvent, StartEvent, StepEvent, TrainEvents, WarnEvent
from charrnn.recovery import Recovery, judge
from charrnn.runstate import Session
from charrnn.spike import LIMITS as SPIKE
from charrnn.spike import SpikeDetector

LOG_EVERY = 10  # steps between StepEvents and metrics lines


def lr_at(step: int, total: int, cfg: TrainConfig, scale: float = 1.0) -> float:
    """Linear warm-up, then cosine decay to lr * min_lr_frac at the last step."""
    peak = cfg.lr * scale
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    floor = peak * cfg.min_lr_frac
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _receiver(callback: TrainEvents | None) -> TrainEvents:
    """Only the main process reports (the others' events would repeat its own)."""
    return (callback or TrainEvents()) if Dist.from_env().main else TrainEvents()


class Trainer:
    """One training run. Build it with `Trainer.new` or `Trainer.resume`; then call `run()`."""

    def __init__(self, parts: Parts, callback: TrainEvents | None = None):
        p = parts
        self.cfg, self.corpus, self.vocab, self.state = p.cfg, p.corpus, p.vocab, p.state
        self.train_data, self.val_data, self.folder, self.run_dir = p.train_data, p.val_data, p.folder, p.folder.path
        self.device, self.dist, self.model, self.optimizer, self.precision = p.device, p.dist, p.model, p.optimizer, p.precision
        self.precision_choice = p.precision_choice  # its name and why (charrnn/precision.py)
        self.rows, self.carry, self.objective = p.rows, p.carry, p.objective  # objective: see charrnn/objective.py
        self.net, self.corpus_sha256 = p.net, p.corpus_sha256  # net: the model, or its DDP wrapper
        self.lexicon = p.lexicon  # the corpus's words, kept in checkpoints (charrnn/lexicon.py)
        self.events = _receiver(callback)
        self.batcher = StreamBatcher(self.train_data, self.cfg.batch_size, self.cfg.seq_len)
        self.local_batch = self.rows.stop - self.rows.start
        self.recovery = Recovery(self.cfg, self.model, self.optimizer, self.state)
        self.spike = SpikeDetector(self.state)
        self._stop_signal: int | None = None
        self._last_saved_step = self.state.step if p.evaluated else None  # evaluated and saved: the end need not redo it
        self._last_val: float | None = None
        self._good_val: float | None = None  # the validation loss of the last good state (a rollback's target)

    @classmethod
    def new(cls, corpus: list[Path], cfg: TrainConfig, run_dir: Path | None = None,
            init_from: Path | None = None, home: Path = ckpt_mod.DEFAULT_HOME,
            callback: TrainEvents | None = None) -> "Trainer":
        return cls(new_run(corpus, cfg, run_dir, init_from, home, _receiver(callback)), callback)

    @classmethod
    def resume(cls, run_dir: Path, callback: TrainEvents | None = None, threads: int | None = None,
               device: str | None = None, allow_changed_corpus: bool = False,
               precision: str | None = None) -> "Trainer":
        """Continue a run from its newest readable checkpoint (see assemble.resumed_run), in its own
        precision unless `precision` switches it."""
        return cls(resumed_run(run_dir, threads, device, allow_changed_corpus, _receiver(callback), precision),
                   callback)

    # ------------------------------------------------------------ the loop

    def run(self) -> dict:
        """Train to the end of the run (or a signal), evaluating and saving on the way; returns EndEvent's fields.

        SIGINT and SIGTERM stop the loop at the next step boundary; the run then saves and returns
        with reason "interrupted". The handlers stay installed until the last save is on disk.
        """
        old_handlers = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                old_handlers[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread
                pass
        ok = False
        try:
            end = self._run()
            ok = True
            return asdict(end)
        except DistributedError as e:  # another process failed: say how to go on from what is saved
            raise DistributedError(f"{e}; {self.folder.resume_hint()}") from None
        finally:
            for sig, h in old_handlers.items():
                signal.signal(sig, h)
            self.dist.close(ok)
            self.folder.release()  # the run folder's lock, held since the run was built

    def _run(self) -> EndEvent:
        st = self.state
        self.model.train()
        self.events.on_start(self._start_event())
        session = Session(st)
        self.recovery.snapshot(self.carry)
        while True:
            reason = self._stop_reason(session)
            if reason is not None:
                break
            result = self._timed_step()
            if result is None:  # a bad step: skipped, or rolled back
                continue
            if st.timed:
                self._estimate_total(session)
            if st.step % LOG_EVERY == 0 or st.step == st.total_steps:
                self._report_step(session, *result)
            if st.eval_due():  # the last evaluation happens in the loop too, so a rollback there trains on
                self._eval_and_save(session)
                if st.out_of_patience(self.cfg.patience):
                    reason = "early stop"
                    break
        return self._finish(reason, session)

    def _stop_reason(self, session: Session) -> str | None:
        """"done" at the schedule's end or the budget's, "interrupted" after a signal, else None."""
        st = self.state
        st.elapsed_s = session.elapsed()
        out_of_time = st.timed and st.elapsed_s >= st.time_budget_s
        stop = self._stop_signal is not None
        if self.dist.enabled:  # all processes stop together
            out_of_time, stop = (bool(v) for v in self.dist.max([float(out_of_time), float(stop)]))
            if stop and self._stop_signal is None:
                self._stop_signal = signal.SIGTERM
        if st.step >= st.total_steps or out_of_time:
            return "done"
        return "interrupted" if stop else None

    def _timed_step(self) -> tuple[float, float] | None:
        """One step, its time counted; (loss, grad norm), or None when the step was bad."""
        st = self.state
        t0 = time.perf_counter()
        loss, norm, problem = self._train_step()
        st.train_s += time.perf_counter() - t0
        if problem is None:
            self.recovery.step_ok()
            st.step += 1
            st.chars_seen += self.cfg.batch_size * self.cfg.seq_len
            if self.spike.observe(loss) and self._spike_roll_back("loss spike", self.spike.recent(), self.spike.level()):
                return None
            return loss, norm
        self._warn(f"step {st.step}: {problem}, step skipped")
        if self.recovery.step_bad():
            self._roll_back()
        else:
            st.step += 1  # skip this batch
        return None

    def _train_step(self) -> tuple[float, float, str | None]:
        """One optimiser step. Returns (loss, grad norm, problem); on a problem nothing is updated."""
        cfg, st = self.cfg, self.state
        x, y, epoch_start = self.batcher.get(st.step)
        x, y = x[self.rows], y[self.rows]  # (b, T): this process's streams
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        if epoch_start:
            self.carry = self.model.init_state(self.local_batch, self.device)
        for g in self.optimizer.param_groups:
            g["lr"] = lr_at(st.step, st.total_steps, cfg, st.lr_scale)
        self.recovery.poison(self.model, st.step)
        with self.precision.autocast():
            self.carry = self.objective.before_step(st.step, self.carry, st.total_steps)
            loss, objective, carry = self.objective.forward(self.net, x, y, self.carry)
        self.optimizer.zero_grad(set_to_none=True)
        with self.dist.guard():  # under torchrun, DDP averages the gradients over the processes here
            self.precision.backward(objective, self.optimizer)
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        loss_v, norm_v = loss.item(), norm.item()
        if self.dist.enabled:  # every process must take the same decision: judge the mean loss
            loss_v = self.dist.sum([loss_v])[0] / self.dist.world
        problem = judge(loss_v, norm_v, len(self.vocab), self.precision.skips_overflow)
        if problem is None:
            self.precision.step(self.optimizer)
            self.carry = self.precision.carried(carry)  # detached, fp32
        return loss_v, norm_v, problem

    def _roll_back(self) -> None:
        """To the last good state with half the learning rate (or, after too many, save it and give up)."""
        bad_step = self.state.step
        self.carry = self.recovery.restore()
        message = self.recovery.halve_lr(bad_step, save=lambda: self.save(None))
        self._report_rollback(message, "non-finite", bad_step, self.state.step, None, None)

    def _spike_roll_back(self, reason: str, observed: float, level: float) -> bool:
        """A loss spike (spike.py): back to the last good state with a lower learning rate; True when it
        rolled back. After SPIKE.max_rollbacks it only says so, stops judging and trains on."""
        st = self.state
        found = st.step
        what = (f"loss spike: the training loss stayed well above its recent level for {SPIKE.streak} steps "
                f"({observed:.3f} against {level:.3f})" if reason == "loss spike" else
                f"validation spike: {observed:.4f} is {observed - level:.3f} above the best ({level:.4f}) and the "
                "training loss did not improve")
        if st.spike_rollbacks >= SPIKE.max_rollbacks:
            self.spike.give_up()
            self._report_rollback(
                f"step {found}: {what}; after {st.spike_rollbacks} rollbacks it rolls back no more and "
                f"trains on at the learning rate it has ({self.cfg.lr * st.lr_scale:.3g})",
                reason, found, None, observed, level)
            return False
        self.carry = self.recovery.restore()
        st.spike_rollbacks += 1
        st.lr_scale *= SPIKE.lr_factor
        self._report_rollback(
            f"step {found}: {what}; rolled back to step {st.step} (the last good state) and lowered "
            f"the learning rate to {self.cfg.lr * st.lr_scale:.3g}", reason, found, st.step, observed, level)
        return True

    def _estimate_total(self, session: Session) -> None:
        """For a time budget: fit the schedule's length to the speed measured so far (after 20 and 100
        steps of this session, then at every evaluation)."""
        st = self.state
        done = st.step - session.step0
        if not (done in (20, 100) or (st.eval_every and st.step % st.eval_every == 0)):
            return
        if st.fit_to_budget(done, time.perf_counter() - session.t0) and self.dist.enabled:
            total, every = self.dist.broadcast([float(st.total_steps), float(st.eval_every)])  # rank 0's, everywhere
            st.total_steps, st.eval_every = int(total), int(every)

    # ------------------------------------------------------------ reporting, evaluation, saving

    def _warn(self, message: str) -> None:
        self.events.on_warn(WarnEvent(message))

    def _report_rollback(self, message: str, reason: str, step: int, to_step: int | None,
                         observed: float | None, level: float | None) -> None:
        """A rollback (or the end of them) as a metrics.jsonl line of kind "rollback" and a RollbackEvent."""
        st = self.state
        fields = {"step": step, "to_step": to_step, "reason": reason,
                  "observed": round(observed, 5) if observed is not None else None,
                  "level": round(level, 5) if level is not None else None, "lr_scale": st.lr_scale}
        self.folder.append_metrics({"kind": "rollback", **fields, "elapsed_s": round(st.elapsed_s, 3)})
        self.events.on_rollback(RollbackEvent(message=message, **fields))

    def _speed(self) -> float:
        return round(self.state.chars_seen / max(self.state.train_s, 1e-9), 1)

    def _start_event(self) -> StartEvent:
        st = self.state
        return StartEvent(
            run_dir=self.run_dir, params=self.model.num_params(), config=self.cfg, train_chars=len(self.train_data),
            val_chars=len(self.val_data), vocab_size=len(self.vocab), total_steps=st.total_steps,
            time_budget_s=st.time_budget_s, device=str(self.device), resumed_from=st.step or None,
            precision=self.precision_choice.name, precision_why=self.precision_choice.why,
        )

    def _report_step(self, session: Session, loss: float, norm: float) -> None:
        st = self.state
        now = time.perf_counter()
        rec = {
            "step": st.step, "elapsed_s": round(session.elapsed(now), 3), "chars_per_s": self._speed(),
            "loss": round(loss, 5), "lr": lr_at(st.step - 1, st.total_steps, self.cfg, st.lr_scale),
            "grad_norm": round(norm, 5) if math.isfinite(norm) else None,
        }
        self.folder.append_metrics(rec)
        self.events.on_step(StepEvent(**{**rec, "grad_norm": rec["grad_norm"] or 0.0}, total_steps=st.total_steps,
                                      recent_chars_per_s=session.recent_speed(now, st.chars_seen),
                                      time_budget_s=st.time_budget_s, lr_scale=st.lr_scale))

    def _eval_and_save(self, session: Session) -> None:
        st = self.state
        val, _ = evaluate(self.model, self.val_data, self.cfg.eval_chars, device=self.device, dist=self.dist)
        if not math.isfinite(val):
            self._warn(f"step {st.step}: validation loss is not finite; rolling back")
            self._roll_back()
            self._last_val = float("nan")
            return
        spiked = self.spike.val_spike(val, st.best_val_loss)  # judged against the best before this one
        best = st.record_eval(val)
        if best:
            self.spike.note_best()
        st.elapsed_s = session.elapsed()
        rec = {"step": st.step, "elapsed_s": round(st.elapsed_s, 3), "chars_per_s": self._speed(),
               "val_loss": val, "val_bpc": val / math.log(2)}
        self.folder.append_metrics(rec)
        sample = eval_sample(self.model, self.vocab, self.cfg) if self.dist.main else None  # off the training RNG
        if sample is not None:
            self.folder.append_sample({"step": st.step, "time_s": rec["elapsed_s"], "val_loss": val, "text": sample})
        self.events.on_eval(EvalEvent(**rec, best=best, total_steps=st.total_steps, sample=sample))
        if spiked and self._spike_roll_back("validation spike", val, st.best_val_loss):
            st.evals_since_best -= 1  # the run went back from this state: its evaluation does not count for --patience
            self._last_val = self._good_val
            return
        self.save(val)
        self._last_saved_step, self._last_val = st.step, val
        self._good_val = val
        self.recovery.snapshot(self.carry)

    def save(self, val_loss: float | None) -> Path:
        """Save this step's checkpoint (see RunFolder.save); returns its path."""
        step, mc = self.state.step, self.model.config
        carry = self.dist.gather_rows(self.carry)  # collective: every process takes part
        event = self.folder.save(step, val_loss, lambda: payload(self, val_loss, carry), self.cfg.keep,
                                 {"cell": mc.cell, "layers": mc.layers, "hidden": mc.hidden}, on_warn=self._warn)
        if event is not None:
            self.events.on_save(event)
        return self.folder.checkpoint_path(step)

    def _finish(self, reason: str, session: Session) -> EndEvent:
        st = self.state
        st.elapsed_s = session.elapsed()
        path = None
        if reason == "interrupted":
            if self.recovery.unsafe_to_save():  # stopped inside a streak of bad steps: save the last good state
                self.carry = self.recovery.restore()
            path = self.save(None)  # a no-op when this step was just evaluated and saved
        elif st.step != self._last_saved_step:  # a time budget ran out between evaluations
            final_step = st.step
            self._eval_and_save(session)
            if self._last_val is not None and not math.isfinite(self._last_val):  # rolled back from NaN, no time left
                raise self.recovery.final_diverged(final_step, self.save(None))
        end = EndEvent(
            reason=reason, step=st.step, run_dir=self.run_dir,
            val_loss=None if reason == "interrupted" else self._last_val, best_val_loss=st.best_val_loss,
            best_step=st.best_step, elapsed_s=st.elapsed_s, chars_per_s=st.chars_seen / max(st.train_s, 1e-9),
            params=self.model.num_params(), patience=self.cfg.patience,
            signal=self._stop_signal if reason == "interrupted" else None, path=path,
        )
        self.events.on_end(end)
        return end

    def _on_signal(self, signum, frame) -> None:
        self._stop_signal = signum
