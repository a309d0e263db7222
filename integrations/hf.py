"""Hugging Face ``transformers.Trainer`` callback.

    from layertrack.integrations.hf import LayertrackCallback

    trainer = Trainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer,
                      callbacks=[LayertrackCallback(run="llama-350m")])
    trainer.train()

On every save (``save_steps``) the checkpoint directory the Trainer has just written is
posted to layertrack from a background thread: training never waits for the service, and
while it is unreachable the submissions are spooled and sent later. Save the tokenizer with
the checkpoints (``processing_class=``) so that the worker can read the probe text.

The run name is ``run``, else ``args.run_name``, else the output directory's name plus the
start time; it is kept in ``<output_dir>/layertrack.json``, so resuming from a checkpoint in
the same output directory continues the same run.

With ``log_scores=True`` the layer-mean scores of finished jobs are added to the Trainer's
logs (``layertrack/<metric>`` and ``layertrack/step``, the checkpoint's step) and so reach
the reporters in ``report_to`` (W&B, TensorBoard, MLflow, ...); they are also kept in
``trainer.state.log_history``. Trainer callbacks given in ``callbacks=`` run after the
reporters, so add this one with ``LayertrackCallback.attach(trainer, ...)`` for the scores
to reach them.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from ._runs import Tracking

log = logging.getLogger("layertrack.integrations")


class LayertrackCallback(Tracking, TrainerCallback):
    def __init__(
        self,
        run: str | None = None,
        *,
        phase: str | None = None,
        parent_run: str | None = None,
        parent_step: int | None = None,
        config: dict[str, Any] | None = None,
        url: str | None = None,
        token: str | None = None,
        log_scores: bool = False,
        flush_timeout_s: float = 60.0,
        **reporter_options: Any,
    ):
        self._init_tracking(run, log_scores=log_scores, flush_timeout_s=flush_timeout_s, phase=phase,
                            parent_run=parent_run, parent_step=parent_step, config=config, url=url, token=token,
                            **reporter_options)
        self._to_log: list[dict[str, Any]] = []

    @classmethod
    def attach(cls, trainer, run: str | None = None, **options: Any) -> LayertrackCallback:
        """Create the callback and put it first among the trainer's callbacks (so that scores
        added to the logs reach the reporting integrations)."""
        cb = cls(run, **options)
        trainer.callback_handler.callbacks.insert(0, cb)
        return cb

    # ------------------------------------------------------------------ events
    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero or self.reporter is not None:
            return
        self._start_reporter(args.output_dir, self.run, args.run_name or Path(args.output_dir).resolve().name)

    def on_save(self, args, state, control, **kwargs):
        if self.reporter is None:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not folder.is_dir():  # a subclass of Trainer saving elsewhere
            log.warning("layertrack: no checkpoint folder at %s; nothing posted", folder)
            return
        self.reporter.report(state.global_step, os.fspath(folder))

    def on_step_end(self, args, state, control, **kwargs):
        if self.reporter is not None and self.log_scores:
            done = [r for r in self.reporter.finished() if r["status"] == "succeeded"]
            if done:
                self._to_log.extend(done)
                control.should_log = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self._to_log or logs is None:
            return
        for rec in self._to_log:
            entry = {f"layertrack/{m}": v for m, v in rec["scores"].items()}
            entry["layertrack/step"] = rec["step"]
            state.log_history.append({**entry, "step": state.global_step})
            logs.update(entry)  # the latest checkpoint's scores, for the reporters after us
        self._to_log = []

    def on_train_end(self, args, state, control, **kwargs):
        self._close_reporter()
