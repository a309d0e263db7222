"""PyTorch Lightning callback.

    from layertrack.integrations.lightning import LayertrackCallback

    trainer = L.Trainer(callbacks=[ModelCheckpoint(every_n_train_steps=500),
                                   LayertrackCallback(run="llama-350m", tokenizer=tokenizer)])
    trainer.fit(module)

Lightning's own checkpoints are pickled ``.ckpt`` files, which layertrack does not read.
So every time Lightning saves a checkpoint this callback also writes the Hugging Face model
inside the LightningModule as a safetensors directory (``<export_dir>/step-<N>``, with the
tokenizer when given) and posts that directory from a background thread. Training never
waits for the service; while it is unreachable submissions are spooled and sent later.

The model is ``get_model(module)`` when given, else the module's first attribute that is a
``transformers.PreTrainedModel``. The run name is kept in the callback's state inside
Lightning's checkpoints (and in ``<default_root_dir>/layertrack.json``), so ``fit(...,
ckpt_path=...)`` continues the same run. With ``log_scores=True`` the layer-mean scores of
finished jobs are logged through ``LightningModule.log`` (``layertrack/<metric>``) and so
reach the trainer's loggers.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from ._runs import Tracking
from .reporter import Reporter


def find_hf_model(module) -> Any:
    from transformers import PreTrainedModel

    if isinstance(module, PreTrainedModel):
        return module
    for child in module.children():
        if isinstance(child, PreTrainedModel):
            return child
    raise TypeError(
        f"{type(module).__name__} holds no transformers.PreTrainedModel attribute; pass "
        "get_model=lambda module: <the Hugging Face model> to LayertrackCallback"
    )


class LayertrackCallback(Tracking, pl.Callback):
    def __init__(
        self,
        run: str | None = None,
        *,
        export_dir: str | None = None,
        tokenizer: Any = None,
        get_model: Callable[[pl.LightningModule], Any] | None = None,
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
        self.export_dir = export_dir
        self.tokenizer = tokenizer
        self.get_model = get_model or find_hf_model
        self._restored_run: str | None = None

    # ------------------------------------------------------------------ state in Lightning checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {"run": self.run}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored_run = state_dict.get("run")

    # ------------------------------------------------------------------ events
    def _reporter(self, trainer: pl.Trainer) -> Reporter:
        root = trainer.default_root_dir
        return self._start_reporter(root, self.run or self._restored_run, Path(root).resolve().name)

    def on_fit_start(self, trainer, pl_module):
        if trainer.is_global_zero:
            self._reporter(trainer)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        if not trainer.is_global_zero:
            return
        reporter = self._reporter(trainer)
        step = trainer.global_step
        out = Path(self.export_dir or Path(trainer.default_root_dir) / "layertrack-export") / f"step-{step}"
        model = self.get_model(pl_module)
        model.save_pretrained(out, safe_serialization=True)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(out)
        reporter.report(step, out)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.reporter is None or not self.log_scores:
            return
        for rec in self.reporter.finished():
            if rec["status"] != "succeeded":
                continue
            metrics = {f"layertrack/{m}": float(v) for m, v in rec["scores"].items()}
            metrics["layertrack/step"] = float(rec["step"])
            pl_module.log_dict(metrics, on_step=True, on_epoch=False, rank_zero_only=True)

    def on_fit_end(self, trainer, pl_module):
        self._close_reporter()
