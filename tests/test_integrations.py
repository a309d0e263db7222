"""Training loops attached to a live service: a real ``transformers.Trainer.train()`` and a
real Lightning ``Trainer.fit()`` on CPU post their checkpoints through the callbacks to the
API server; a real Celery worker scores them in PostgreSQL; Redis is the broker. Also: the
service down during training (the spool), and a plain loop with ``report_checkpoint``."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import uuid

import pytest
import torch
from services import Service, free_port, layertrack_exe, live_service, wait_until
from tiny_models import lm_examples, tiny_lm

CFG = {"max_tokens": 600, "seq_len": 64}
FINAL = ("succeeded", "failed", "cancelled")


@pytest.fixture(scope="module")
def live(tmp_path_factory, redis_server):
    with live_service(tmp_path_factory.mktemp("train"), redis_server.new_url()) as svc:
        yield svc


def hf_trainer(tokenizer, out_dir, callbacks, max_steps: int):
    from transformers import Trainer, TrainingArguments, default_data_collator

    args = TrainingArguments(
        output_dir=str(out_dir), max_steps=max_steps, save_strategy="steps", save_steps=2,
        per_device_train_batch_size=4, learning_rate=1e-3, logging_steps=1, report_to="none",
        use_cpu=True, disable_tqdm=True, seed=0, dataloader_num_workers=0,
    )
    return Trainer(model=tiny_lm(tokenizer), args=args, train_dataset=lm_examples(tokenizer),
                   data_collator=default_data_collator, processing_class=tokenizer, callbacks=callbacks)


def finished_jobs(client, run: str, n: int, timeout: float = 240) -> dict[int, dict]:
    """step -> job, once ``n`` jobs of the run have finished."""
    def done() -> list[dict] | None:
        jobs = client.jobs(run=run)
        return jobs if len(jobs) >= n and all(j["status"] in FINAL for j in jobs) else None

    return {j["step"]: j for j in wait_until(done, timeout, what=f"{n} finished jobs of run {run}")}


def test_hf_trainer_posts_every_save_and_resume_keeps_the_run(live, tokenizer, tmp_path):
    from layertrack.integrations.hf import LayertrackCallback
    from transformers import TrainerCallback

    out = live.roots / f"hf-{uuid.uuid4().hex[:6]}"
    opts = dict(url=live.url, token=live.token, config=CFG, spool_dir=tmp_path / "spool")

    class Gate(TrainerCallback):
        """At step 5, wait until steps 2 and 4 are scored, so their scores come back in-run."""

        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 5:
                reporter = ours.reporter
                wait_until(lambda: 4 in reporter.submitted, 120, what="the checkpoint of step 4 to be posted")
                with live.client() as c:
                    for step in (2, 4):
                        assert c.wait(reporter.submitted[step], timeout=180, poll=0.3)["status"] == "succeeded"
                ids = {reporter.submitted[step] for step in (2, 4)}

                def pulled() -> bool:  # the reporter has fetched both jobs' scores
                    with reporter._lock:
                        return not ids & set(reporter._pending_jobs)

                wait_until(pulled, 30, what="the reporter to pull the scores of steps 2 and 4")

    seen_logs: list[dict] = []

    class Recorder(TrainerCallback):  # stands for a reporting integration (W&B, TensorBoard...)
        def on_log(self, args, state, control, logs=None, **kw):
            seen_logs.append(dict(logs))

    trainer = hf_trainer(tokenizer, out, [Gate(), Recorder()], max_steps=6)
    ours = LayertrackCallback.attach(trainer, log_scores=True, poll_every_s=0.2, **opts)
    trainer.train()

    run = json.loads((out / "layertrack.json").read_text())["run"]
    assert ours.run == run and run.startswith(out.name + "-")
    with live.client() as c:
        jobs = finished_jobs(c, run, 3)
        assert sorted(jobs) == [2, 4, 6]
        assert all(j["status"] == "succeeded" for j in jobs.values()), (jobs, live.logs())
        assert {j["uri"] for j in jobs.values()} == {str(out / f"checkpoint-{s}") for s in (2, 4, 6)}
        series = c.scores(run, metric="linearity")["series"]
        assert {tuple(s["steps"]) for s in series} == {(2, 4, 6)}
        trend = c.trend(run, metric="linearity_nores")

    # the scores of steps 2 and 4 came back during training, into the logs and log_history
    logged = [h for h in trainer.state.log_history if "layertrack/step" in h]
    assert [h["layertrack/step"] for h in logged] == [2, 4]
    for h in logged:
        i = trend["steps"].index(h["layertrack/step"])
        assert h["layertrack/linearity_nores"] == pytest.approx(trend["values"][i], rel=1e-12)
    assert any(log.get("layertrack/step") == 4 and "layertrack/linearity" in log for log in seen_logs)

    # resume from checkpoint-4 in the same output directory: the same run, steps 6 and 8 added
    trainer = hf_trainer(tokenizer, out, [LayertrackCallback(**opts)], max_steps=8)
    trainer.train(resume_from_checkpoint=str(out / "checkpoint-4"))
    with live.client() as c:
        assert [r["name"] for r in c.runs(name=out.name)] == [run]
        jobs = finished_jobs(c, run, 4)
        assert {2, 4, 6, 8} <= set(jobs)
        assert all(j["status"] == "succeeded" for j in jobs.values())
        assert c.run(run)["last_step"] == 8


def test_lightning_fit_posts_every_checkpoint_and_resume_keeps_the_run(live, tokenizer, tmp_path):
    import lightning.pytorch as pl
    from layertrack.integrations.lightning import LayertrackCallback
    from lightning.pytorch.callbacks import ModelCheckpoint

    class LitLM(pl.LightningModule):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def training_step(self, batch, _idx):
            return self.model(**batch).loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    root = live.roots / f"pl-{uuid.uuid4().hex[:6]}"
    data = torch.utils.data.DataLoader(lm_examples(tokenizer), batch_size=4)

    def fit(max_steps: int, ckpt_path=None) -> LayertrackCallback:
        cb = LayertrackCallback(tokenizer=tokenizer, url=live.url, token=live.token, config=CFG,
                                spool_dir=tmp_path / "spool")
        trainer = pl.Trainer(
            max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
            enable_model_summary=False, default_root_dir=str(root),
            callbacks=[ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=2, save_top_k=-1), cb],
        )
        trainer.fit(LitLM(tiny_lm(tokenizer)), train_dataloaders=data, ckpt_path=ckpt_path)
        return cb

    cb = fit(6)
    run = cb.run
    with live.client() as c:
        jobs = finished_jobs(c, run, 3)
        assert sorted(jobs) == [2, 4, 6]
        assert all(j["status"] == "succeeded" for j in jobs.values()), (jobs, live.logs())
        assert jobs[4]["uri"] == str(root / "layertrack-export" / "step-4")
        assert (root / "layertrack-export" / "step-4" / "model.safetensors").is_file()

    # resume: the run name comes back from the callback's state in Lightning's checkpoint
    (root / "layertrack.json").unlink()
    step4 = next((root / "ckpt").glob("*step=4*.ckpt"))
    cb2 = fit(8, ckpt_path=str(step4))
    assert cb2.run == run
    with live.client() as c:
        jobs = finished_jobs(c, run, 4)
        assert {2, 4, 6, 8} <= set(jobs)
        assert all(j["status"] == "succeeded" for j in jobs.values())
        assert len(c.runs(name=root.name)) == 1


def test_service_down_training_goes_on_and_the_spool_is_delivered_later(live, tokenizer, tmp_path, caplog):
    from layertrack.integrations.hf import LayertrackCallback

    port = free_port()  # nothing listens here until later
    url = f"http://127.0.0.1:{port}"
    spool = tmp_path / "spool"
    out = live.roots / f"down-{uuid.uuid4().hex[:6]}"
    cb = LayertrackCallback(url=url, token=live.token, config=CFG, spool_dir=spool, flush_timeout_s=30)
    with caplog.at_level(logging.WARNING, logger="layertrack.integrations"):
        trainer = hf_trainer(tokenizer, out, [cb], max_steps=6)
        trainer.train()
    assert trainer.state.global_step == 6
    unreachable = [r for r in caplog.records if "cannot be reached" in r.getMessage()]
    assert len(unreachable) == 1, [r.getMessage() for r in caplog.records]  # once, not every save
    spooled = sorted(json.loads(p.read_text())["body"]["step"] for p in spool.glob("*.json"))
    assert spooled == [2, 4, 6]

    # the service comes back (on the address training knew); the spool is sent
    back = Service(tmp=tmp_path, db_url=live.db_url, broker_url=live.broker_url, roots=live.roots,
                   token=live.token)
    back.start_api(port=port)
    try:
        env = dict(os.environ, LAYERTRACK_URL=url, LAYERTRACK_TOKEN=live.token,
                   LAYERTRACK_DATA_DIR=str(tmp_path / "data"))
        done = subprocess.run([layertrack_exe(), "spool", "flush", "--dir", str(spool)], env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "sent 3 spooled submission(s); 0 left" in done.stdout
        assert list(spool.glob("*.json")) == []
        # flushing again (or a second copy of the spool) creates no second job
        again = subprocess.run([layertrack_exe(), "spool", "flush", "--dir", str(spool)], env=env,
                               capture_output=True, text=True, timeout=60)
        assert "sent 0 spooled submission(s); 0 left" in again.stdout
    finally:
        back.stop()
    run = cb.run
    with live.client() as c:
        jobs = finished_jobs(c, run, 3)
        assert sorted(jobs) == [2, 4, 6] and len(c.jobs(run=run)) == 3
        assert all(j["status"] == "succeeded" for j in jobs.values()), jobs


def test_plain_loop_reporter(live, tokenizer, tmp_path):
    """A hand-written loop: save, report, carry on; close waits for the queue."""
    from layertrack.integrations import Reporter

    model = tiny_lm(tokenizer)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    run = f"loop-{uuid.uuid4().hex[:6]}"
    reporter = Reporter(run, url=live.url, token=live.token, config=CFG, spool_dir=tmp_path / "spool")
    for step, batch in enumerate(lm_examples(tokenizer, n=4), start=1):
        loss = model(input_ids=batch["input_ids"][None], labels=batch["labels"][None]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 2 == 0:
            path = live.roots / run / f"step-{step}"
            model.save_pretrained(path)
            tokenizer.save_pretrained(path)
            reporter.report(step, path)
    assert reporter.close(timeout=60) == 0
    assert sorted(reporter.submitted) == [2, 4]
    with live.client() as c:
        jobs = finished_jobs(c, run, 2)
        assert all(j["status"] == "succeeded" for j in jobs.values())


def test_reporter_waits_for_a_checkpoint_being_written(tmp_path):
    from layertrack.integrations.reporter import checkpoint_snapshot

    ckpt = tmp_path / "c"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    assert checkpoint_snapshot(ckpt) is None  # no weights yet
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    (ckpt / "model-00001-of-00002.safetensors").write_bytes(b"x")
    assert checkpoint_snapshot(ckpt) is None  # one shard missing
    (ckpt / "model-00002-of-00002.safetensors").write_bytes(b"y")
    snap = checkpoint_snapshot(ckpt)
    assert snap is not None and set(snap) == {"config.json", "model.safetensors.index.json",
                                              "model-00001-of-00002.safetensors",
                                              "model-00002-of-00002.safetensors"}
    shard = ckpt / "model-00002-of-00002.safetensors"
    times = (shard.stat().st_atime_ns, shard.stat().st_mtime_ns)
    shard.write_bytes(b"z")  # rewritten: the same size, the old times put back
    os.utime(shard, ns=times)
    assert checkpoint_snapshot(ckpt) != snap  # a new Idempotency-Key: the service sees a new checkpoint


def test_reporter_knows_when_a_framework_checkpoint_is_written(tmp_path):
    """nanoGPT's ckpt.pt is complete when its zip archive is whole; a DCP directory when its
    .metadata is there (DCP writes it after every rank's files)."""
    from layertrack.integrations.reporter import checkpoint_snapshot
    from test_format_nanogpt import write_ckpt

    out = tmp_path / "out"
    out.mkdir()
    write_ckpt(tmp_path / "whole.pt", bias=False, compiled=False)
    data = (tmp_path / "whole.pt").read_bytes()
    (out / "ckpt.pt").write_bytes(data[: len(data) // 2])
    assert checkpoint_snapshot(out) is None  # still being written
    (out / "ckpt.pt").write_bytes(data)
    assert set(checkpoint_snapshot(out)) == {"ckpt.pt"}
    dcp = tmp_path / "step-3"
    dcp.mkdir()
    (dcp / "__0_0.distcp").write_bytes(b"x")
    assert checkpoint_snapshot(dcp) is None  # no .metadata: detected as nothing yet
    assert checkpoint_snapshot(dcp, "dcp") is None  # named: still incomplete
    (dcp / ".metadata").write_bytes(b"m")
    assert set(checkpoint_snapshot(dcp)) == {".metadata", "__0_0.distcp"}


def test_the_reporter_posts_a_nanogpt_checkpoint_once_it_is_whole(live, tokenizer, tmp_path):
    """The plain-loop Reporter given a tokenizer once (its config) posts nanoGPT's out dir
    when ckpt.pt is whole, and the job scores it."""
    import threading

    from layertrack.integrations import Reporter
    from test_format_nanogpt import write_ckpt

    run = f"nano-{uuid.uuid4().hex[:6]}"
    tok = live.roots / f"{run}-tok"
    tokenizer.save_pretrained(tok)
    write_ckpt(tmp_path / "whole.pt", bias=True, compiled=False)
    data = (tmp_path / "whole.pt").read_bytes()
    out = live.roots / run / "out"
    out.mkdir(parents=True)
    (out / "ckpt.pt").write_bytes(data[:1000])  # being written when it is reported
    reporter = Reporter(run, url=live.url, token=live.token, config={**CFG, "tokenizer": str(tok)},
                        spool_dir=tmp_path / "spool")
    reporter.report(1, out)
    finish = threading.Timer(1.5, lambda: (out / "ckpt.pt").write_bytes(data))
    finish.start()
    try:
        assert reporter.close(timeout=120) == 0
    finally:
        finish.cancel()
    assert sorted(reporter.submitted) == [1]
    with live.client() as c:
        [job] = finished_jobs(c, run, 1).values()
        assert job["status"] == "succeeded", (job, live.logs())


def test_demo_short_mode_end_to_end(live, tmp_path):
    """``layertrack demo --short`` against the live service: trains both phases, every posted
    step is scored, the table has one row per posted step, the plots are valid PNGs."""
    import struct

    out = live.roots / f"demo-{uuid.uuid4().hex[:6]}"
    name = f"d{uuid.uuid4().hex[:6]}"
    env = dict(os.environ, LAYERTRACK_DATA_DIR=str(tmp_path / "data"), OMP_NUM_THREADS="1")
    done = subprocess.run([layertrack_exe(), "demo", "--short", "--url", live.url, "--token", live.token,
                           "--out", str(out), "--name", name], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    posted = summary["posted_steps"]
    assert posted == {"pretrain": [1, 2, 4, 8], "finetune": [1, 2, 4]}
    rows = [line.split() for line in done.stdout.splitlines() if line.startswith(f"{name}-")]
    assert [(r[0], int(r[1])) for r in rows] == (
        [(f"{name}-pretrain", s) for s in posted["pretrain"]] + [(f"{name}-finetune", s) for s in posted["finetune"]])
    assert all(0 <= float(v) <= 1 for r in rows for v in r[2:4])
    for png in ("trend.png", "heatmap_pretrain.png", "heatmap_finetune.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", png
        width, height = struct.unpack(">II", data[16:24])
        assert width > 300 and height > 200
    with live.client() as c:
        ft = c.run(f"{name}-finetune")
        assert (ft["phase"], ft["parent_run"], ft["parent_step"]) == ("finetune", f"{name}-pretrain", 8)
        rep = c.scores(f"{name}-pretrain", metric="loss_delta_drop")["series"]
        assert rep and all(s["steps"] == [8] for s in rep)
    assert summary["replaceability"]["pretrain"]["step"] == 8
