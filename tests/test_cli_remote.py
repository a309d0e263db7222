"""The CLI's service commands against a real API server (SQLite, file broker, no worker: jobs
stay queued, so what a submission stored can be read back as it was sent)."""

from __future__ import annotations

import json
import os
import subprocess
import uuid

import pytest
from services import Service, api_only, free_port, layertrack_exe

EXE = layertrack_exe()


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    with api_only(tmp_path_factory.mktemp("cli-api")) as svc:
        yield svc


def cli(svc: Service, *args: str, cwd=None, token: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, LAYERTRACK_URL=svc.url, LAYERTRACK_TOKEN=token or svc.token,
               LAYERTRACK_DATA_DIR=str(svc.tmp / "cli-data"))
    return subprocess.run([EXE, *args], capture_output=True, text=True, timeout=120, env=env, cwd=cwd)


def one_line_error(out: subprocess.CompletedProcess) -> str:
    assert out.returncode != 0, out.stdout
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    return lines[0]


def job_id(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 0, out.stderr
    first = out.stdout.splitlines()[0].split()
    assert first[0] == "job" and first[2] == "queued", out.stdout
    return first[1]


@pytest.fixture(scope="module")
def ckpt(api, tokenizer):
    from tiny_models import build_checkpoint

    return build_checkpoint(api.roots / "run-a" / "step-5", "llama", tokenizer)


def test_submit_resolves_a_relative_path_here_not_in_the_service(api, ckpt):
    """The API server runs in another working directory: a relative path only works when the
    CLI makes it absolute first."""
    run = f"rel-{uuid.uuid4().hex[:6]}"
    out = cli(api, "submit", run, "5", "step-5", cwd=ckpt.parent)
    with api.client() as c:
        job = c.job(job_id(out))
    assert job["uri"] == str(ckpt.resolve())
    # a URI with a scheme is sent as it is: file:// is resolved by the service
    out = cli(api, "submit", run, "6", ckpt.as_uri())
    with api.client() as c:
        assert c.job(job_id(out))["uri"] == str(ckpt.resolve())
    # an unsupported scheme is left alone too: the service says what is wrong with it
    out = cli(api, "submit", run, "7", "s3://bucket/step-7")
    assert out.returncode == 3 and "outside the allowed remote locations" in one_line_error(out)


def test_submit_sends_probe_replaceability_holdout_and_allow_pickle(api, ckpt, tokenizer):
    from tiny_models import build_checkpoint

    run = f"opts-{uuid.uuid4().hex[:6]}"
    out = cli(api, "submit", run, "5", str(ckpt), "--probe", "default", "--replaceability", "--holdout-tokens", "512",
              "--seq-len", "64", "--max-tokens", "600")
    with api.client() as c:
        job = c.job(job_id(out))
    assert job["probe"] == "default"
    assert job["config"]["replaceability"] is True and job["config"]["holdout_tokens"] == 512
    assert job["config"]["seq_len"] == 64 and job["config"]["max_tokens"] == 600
    assert {"loss_delta_linear", "loss_delta_drop"} <= set(job["config"]["metrics"])
    assert job["config"]["allow_pickle"] is False

    pickled = build_checkpoint(api.roots / run / "step-9", "llama", tokenizer, safe=False)
    refused = cli(api, "submit", run, "9", str(pickled))
    assert refused.returncode == 3 and "only pickle weights" in one_line_error(refused)
    out = cli(api, "submit", run, "9", str(pickled), "--allow-pickle")
    with api.client() as c:
        assert c.job(job_id(out))["config"]["allow_pickle"] is True


def test_api_errors_are_the_problem_detail_on_one_line(api, ckpt):
    out = cli(api, "submit", "r", "5", str(ckpt), "--probe", "no-such-probe")
    line = one_line_error(out)
    assert out.returncode == 3 and line.startswith("error: unknown probe 'no-such-probe'")
    assert line.endswith("(code unknown_probe)")
    out = cli(api, "status", "0" * 32)
    assert out.returncode == 3 and "no job with id" in one_line_error(out)
    assert one_line_error(out).endswith("(code job_not_found)")
    out = cli(api, "trend", "no-such-run")
    assert one_line_error(out) == "error: no run named 'no-such-run' (code run_not_found)" and out.returncode == 3
    out = cli(api, "status", "x", token="lt_not-a-token")
    line = one_line_error(out)
    assert out.returncode == 3 and "(code unauthorized);" in line and "LAYERTRACK_TOKEN" in line


def test_wait_gives_up_after_its_timeout_in_one_line(api, ckpt):
    jid = job_id(cli(api, "submit", f"w-{uuid.uuid4().hex[:6]}", "5", str(ckpt)))
    out = cli(api, "wait", jid, "--timeout", "0.5")
    assert out.returncode == 1 and f"job {jid} still queued after 0.5 s" in one_line_error(out)


def test_an_unreachable_service_says_where_it_looked_and_how_to_start_it(api):
    url = f"http://127.0.0.1:{free_port()}"
    env = dict(os.environ, LAYERTRACK_URL=url, LAYERTRACK_TOKEN="lt_x", LAYERTRACK_DATA_DIR=str(api.tmp / "none"))
    out = subprocess.run([EXE, "status", "abc"], capture_output=True, text=True, timeout=120, env=env)
    line = one_line_error(out)
    assert out.returncode == 3 and f"cannot reach layertrack at {url}" in line and "layertrack up" in line


def test_plot_refuses_a_wrong_file_name_before_any_request(api, tmp_path):
    out = cli(api, "plot", "r", "-o", str(tmp_path / "fig.txt"))
    assert out.returncode == 2 and "must end in .png or .svg" in one_line_error(out)


# ------------------------------------------------------------------ jobs, runs, cancel, retry
def fail_job(svc: Service, jid: str, code: str = "synthetic", message: str = "failed on purpose") -> None:
    """Fail a queued job through the worker side's own transitions (claim, fail): no worker runs here."""
    from layertrack.service import jobs

    assert jobs.claim(svc.db_url, jid, "test-worker") is not None
    assert jobs.fail(svc.db_url, jid, "test-worker", code, message)


def table(out: subprocess.CompletedProcess) -> list[list[str]]:
    assert out.returncode == 0, out.stderr
    return [line.split() for line in out.stdout.splitlines()]


def test_jobs_cancel_and_retry_change_the_jobs_the_api_shows(api, ckpt):
    import json

    run = f"jobs-{uuid.uuid4().hex[:6]}"
    first, second = (job_id(cli(api, "submit", run, str(step), str(ckpt))) for step in (5, 6))
    rows = table(cli(api, "jobs", "--run", run))
    assert rows[0][:3] == ["id", "status", "step"]
    assert [(r[0], r[1], r[2], r[-1]) for r in rows[1:]] == [(second, "queued", "6", run), (first, "queued", "5", run)]
    listed = cli(api, "jobs", "--run", run, "--json")
    with api.client() as c:
        assert json.loads(listed.stdout) == c.jobs(run=run)

    out = cli(api, "cancel", first)
    assert out.returncode == 0 and out.stdout.startswith(f"job {first}  cancelled  run {run} step 5"), out.stdout
    with api.client() as c:
        assert c.job(first)["status"] == "cancelled" and c.job(second)["status"] == "queued"
    again = cli(api, "cancel", first)
    assert one_line_error(again) == (f"error: job {first} is cancelled; only queued or running jobs can be cancelled "
                                     "(code invalid_transition)") and again.returncode == 3

    refused = cli(api, "retry", second)
    assert "only failed or cancelled jobs can be retried (code invalid_transition)" in one_line_error(refused)
    fail_job(api, second, "checkpoint_unreadable", "it broke")
    rows = table(cli(api, "jobs", "--run", run, "--status", "failed"))
    assert [(r[0], r[1], r[-2], r[-1]) for r in rows[1:]] == [(second, "failed", run, "(checkpoint_unreadable)")]
    out = cli(api, "retry", second)
    assert out.returncode == 0 and out.stdout.startswith(f"job {second}  queued  run {run} step 6"), out.stdout
    with api.client() as c:
        job = c.job(second)
    assert job["status"] == "queued" and job["error_code"] is None and job["error"] is None
    assert [r[0] for r in table(cli(api, "jobs", "--run", run, "--status", "cancelled"))[1:]] == [first]
    assert table(cli(api, "jobs", "--run", run, "--status", "succeeded")) == [["no", "jobs", "of", "run", run,
                                                                               "succeeded"]]
    assert len(table(cli(api, "jobs", "--limit", "1"))) == 3  # the header, one job, and the note that there is more

    missing = cli(api, "cancel", "no-such-job")
    assert one_line_error(missing) == "error: no job with id 'no-such-job' (code job_not_found)"
    unknown_run = cli(api, "jobs", "--run", "no-such-run")
    assert one_line_error(unknown_run) == "error: no run named 'no-such-run' (code run_not_found)"


def test_runs_lists_each_run_with_its_job_counts(api, ckpt):
    import json

    tag = uuid.uuid4().hex[:6]
    run = f"runs-{tag}"
    jobs_ = [job_id(cli(api, "submit", run, str(step), str(ckpt))) for step in (5, 6, 7)]
    assert cli(api, "cancel", jobs_[0]).returncode == 0
    fail_job(api, jobs_[1])
    child = f"runs-{tag}-ft"
    assert job_id(cli(api, "submit", child, "1", str(ckpt), "--parent-run", run, "--parent-step", "7"))
    rows = table(cli(api, "runs", "--name", tag))
    assert rows[0] == ["phase", "last", "step", "ckpts", "queued", "running", "done", "failed", "cancelled", "last",
                       "activity", "(UTC)", "run", "(parent)"]
    (parent_row, child_row) = rows[1:]
    assert parent_row[:8] == ["pretrain", "7", "3", "1", "0", "0", "1", "1"] and parent_row[-1] == run
    assert child_row[:3] == ["finetune", "1", "1"] and child_row[-6:] == [child, "(from", run, "at", "step", "7)"]
    with api.client() as c:
        assert json.loads(cli(api, "runs", "--name", tag, "--json").stdout) == c.runs(name=tag)
    assert table(cli(api, "runs", "--name", "nothing-is-called-this")) == [
        ["no", "runs", "whose", "name", "contains", "'nothing-is-called-this'"]]


# ------------------------------------------------------------------ export
def api_scores(svc: Service, run: str) -> dict[tuple[int, int, str], float | None]:
    """Every score of the run as the API's per-layer series give it: {(step, layer, metric): value}."""
    from layertrack.workers.vocabulary import BASE_METRICS

    out = {}
    with svc.client() as c:
        for metric in BASE_METRICS:
            for s in c.scores(run, metric=metric, max_points=100_000)["series"]:
                out |= {(step, s["layer"], metric): v for step, v in zip(s["steps"], s["values"], strict=True)}
    return out


def test_export_writes_csv_and_parquet_whose_rows_are_the_apis_scores(api, tmp_path):
    import csv

    import pyarrow.parquet as pq
    from services import synthetic_run

    run = f"org/export-{uuid.uuid4().hex[:6]}"
    job_ids = synthetic_run(api.db_url, run, (10, 20, 30), fingerprint=f"exp-{run}", anisotropy=0.25,
                            pair=lambda step: {"linearity": 0.9 - step / 1000, "linearity_nores": 0.4 + step / 1000,
                                               "cosine": 0.8, "norm_ratio": 1.0 + step / 100})
    expected = api_scores(api, run)
    assert len(expected) == 3 * (3 * 4 + 4)  # 3 steps × (3 pairs × 4 pair metrics + 4 hidden states' anisotropy)

    out = cli(api, "export", run, "--format", "csv", "-o", str(tmp_path / "s.csv"))
    assert out.returncode == 0 and out.stdout.startswith(f"wrote {tmp_path / 's.csv'} (csv, "), out.stderr
    with open(tmp_path / "s.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {(int(r["step"]), int(r["layer"]), r["metric"]): float(r["value"]) for r in rows} == expected
    assert len(rows) == len(expected) and {r["run"] for r in rows} == {run}
    assert {r["job_id"] for r in rows} == set(job_ids)

    out = cli(api, "export", run, "-o", str(tmp_path / "s.parquet"))  # the format from the suffix
    assert out.returncode == 0 and "(parquet, " in out.stdout, out.stderr
    table = pq.read_table(tmp_path / "s.parquet").to_pylist()
    assert {(r["step"], r["layer"], r["metric"]): r["value"] for r in table} == expected and len(table) == len(expected)
    assert {r["final_norm"] for r in table if r["layer"] == 2 and r["metric"] != "anisotropy"} == {True}

    out = cli(api, "export", run, "--metric", "cosine", "--format", "parquet", "-o", str(tmp_path / "c.bin"))
    assert out.returncode == 0, out.stderr
    table = pq.read_table(tmp_path / "c.bin").to_pylist()
    assert {(r["step"], r["layer"], r["metric"]): r["value"] for r in table} == {
        k: v for k, v in expected.items() if k[2] == "cosine"}

    out = cli(api, "export", run, cwd=tmp_path)  # the default file name, here
    assert out.returncode == 0 and (tmp_path / f"{run.replace('/', '_')}.csv").is_file(), out.stderr

    missing = cli(api, "export", "no-such-run", "-o", str(tmp_path / "x.csv"))
    assert one_line_error(missing) == "error: no run named 'no-such-run' (code run_not_found)"
    assert not (tmp_path / "x.csv").exists() and not list(tmp_path.glob(".*.part"))
    assert "is a directory" in one_line_error(cli(api, "export", run, "-o", str(tmp_path)))
    unwritable = cli(api, "export", run, "-o", str(tmp_path / "no-dir" / "x.csv"))
    assert "cannot write" in one_line_error(unwritable) and unwritable.returncode == 3


# ------------------------------------------------------------------ alert rules
def test_alert_create_list_and_the_firings_of_a_job_that_crosses_the_rule(api):
    import json

    from services import synthetic_run

    run = f"alerts-{uuid.uuid4().hex[:6]}"

    def score(run_, steps):
        return synthetic_run(api.db_url, run_, steps, fingerprint=f"al-{run_}", anisotropy=0.2,
                             pair=lambda step: {"linearity": 0.9, "linearity_nores": 0.3 if step < 25 else 0.7,
                                                "cosine": 0.8, "norm_ratio": 1.0})

    score(run, (10,))  # the run exists, below the threshold
    out = cli(api, "alert", "create", run, "--metric", "linearity_nores", "--above", "0.5",
              "--description", "nores jumps")
    assert out.returncode == 0, out.stderr
    rule_id = int(out.stdout.split()[2])
    assert out.stdout.strip() == f"alert rule {rule_id} on run {run}: linearity_nores layer mean above 0.5 (threshold)"
    out = cli(api, "alert", "create", run, "--metric", "cosine", "--layer", "1", "--k", "3")
    assert out.returncode == 0 and out.stdout.strip().endswith(
        "cosine layer 1 more than 3 sd from the mean of the previous 5 (sigma)"), out.stdout
    sigma_id = int(out.stdout.split()[2])
    with api.client() as c:
        rules = c.alerts(run)
    assert [(r["id"], r["kind"], r["metric"], r["layer"], r["above"], r["k"], r["window"]) for r in rules] == [
        (rule_id, "threshold", "linearity_nores", None, 0.5, None, None), (sigma_id, "sigma", "cosine", 1, None, 3, 5)]
    rows = table(cli(api, "alert", "list", run))
    assert rows[1][:5] == [str(rule_id), "threshold", "linearity_nores", "layer", "mean"]
    assert rows[1][-2:] == ["(nores", "jumps)"] and rows[2][:4] == [str(sigma_id), "sigma", "cosine", "layer"]
    assert json.loads(cli(api, "alert", "list", run, "--json").stdout) == rules

    assert table(cli(api, "alert", "firings", run)) == [["no", "alert", "of", "run", run, "has", "fired"]]
    jobs_ = score(run, (20, 30))  # 30 crosses 0.5
    rows = table(cli(api, "alert", "firings", run))
    assert rows[0] == ["step", "rule", "value", "job", "message"]
    assert [r[:4] for r in rows[1:]] == [["30", str(rule_id), "0.700000", jobs_[1]]]
    assert " ".join(rows[1][4:]) == "linearity_nores layer mean is 0.7 at step 30, above 0.5 (was 0.3 at step 20)"
    with api.client() as c:
        assert json.loads(cli(api, "alert", "firings", run, "--json").stdout) == c.firings(run)

    out = cli(api, "alert", "delete", run, str(sigma_id))
    assert out.returncode == 0, out.stderr
    with api.client() as c:
        assert [r["id"] for r in c.alerts(run)] == [rule_id]

    refused = cli(api, "alert", "create", run, "--metric", "cosine", "--kind", "sigma")
    line = one_line_error(refused)
    assert "a sigma rule needs 'k'" in line and line.endswith("(code invalid_request)") and refused.returncode == 3
    refused = cli(api, "alert", "create", run, "--metric", "cosine")
    assert "a threshold rule needs 'above', 'below' or both" in one_line_error(refused)
    gone = cli(api, "alert", "delete", run, str(sigma_id))
    assert one_line_error(gone).endswith("(code not_found)")
    assert one_line_error(cli(api, "alert", "list", "no-such-run")).endswith("(code run_not_found)")
    assert cli(api, "alert", "create", run, "--metric", "vibes", "--above", "1").returncode == 2


def test_alert_create_needs_an_admin_token_and_says_so(api):
    from layertrack.service.auth import create_token
    from layertrack.service.db import session_scope
    from services import synthetic_run

    run = f"alerts-ro-{uuid.uuid4().hex[:6]}"
    synthetic_run(api.db_url, run, (1,), fingerprint=f"ro-{run}", anisotropy=0.2,
                  pair=lambda step: {"linearity": 0.9, "linearity_nores": 0.3, "cosine": 0.8, "norm_ratio": 1.0})
    with session_scope(api.db_url) as s:
        _row, read_token = create_token(s, "reader", scopes=["read"])
    out = cli(api, "alert", "create", run, "--metric", "cosine", "--above", "0.9", token=read_token)
    line = one_line_error(out)
    assert "lacks the 'admin' scope" in line and line.endswith("(code missing_scope)") and out.returncode == 3
    assert table(cli(api, "alert", "list", run, token=read_token))[0][:4] == ["run", run, "has", "no"]


# ------------------------------------------------------------------ deleting a run
def test_runs_delete_says_what_would_go_and_deletes_only_with_yes(api, ckpt):
    from layertrack.service.auth import create_token
    from layertrack.service.client import ApiError
    from layertrack.service.db import session_scope
    from services import synthetic_run

    run = f"org/delete-{uuid.uuid4().hex[:6]}"
    scored = synthetic_run(api.db_url, run, (1, 2), fingerprint=f"del-{run}", anisotropy=0.2,
                           pair=lambda step: {"linearity": 0.9, "linearity_nores": 0.3, "cosine": 0.8,
                                              "norm_ratio": 1.0})
    queued = job_id(cli(api, "submit", run, "3", str(ckpt)))

    out = cli(api, "runs", "delete", run)
    assert one_line_error(out) == (f"error: run '{run}' was not deleted: add --yes to delete it and all of the above")
    assert out.returncode == 2
    assert out.stdout.splitlines() == [
        f"run {run}: deleting it would delete 3 jobs, 3 checkpoints, 32 scores",
        f"  1 job(s) are queued or running ({queued}): cancel them first ('layertrack cancel JOB')"]
    refused = cli(api, "runs", "delete", run, "--yes")
    line = one_line_error(refused)
    assert line.startswith(f"error: run '{run}' has 1 queued or running job(s) ({queued}): cancel them first")
    assert line.endswith("(code run_has_active_jobs)") and refused.returncode == 3
    with session_scope(api.db_url) as s:
        _row, read_token = create_token(s, "reader", scopes=["read"])
    refused = cli(api, "runs", "delete", run, token=read_token)
    assert "lacks the 'admin' scope" in one_line_error(refused) and refused.returncode == 3
    with api.client() as c:
        assert c.run(run)["jobs"]["queued"] == 1 and len(c.export(run).splitlines()) == 33  # untouched

    assert cli(api, "cancel", queued).returncode == 0
    out = cli(api, "runs", "delete", run, "--yes")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [f"deleted run {run}: 3 jobs, 3 checkpoints, 32 scores"]
    with api.client() as c:
        for read in (lambda: c.run(run), lambda: c.trend(run), lambda: c.job(scored[0]), lambda: c.job(queued)):
            with pytest.raises(ApiError) as e:
                read()
            assert e.value.status == 404 and e.value.code in ("run_not_found", "job_not_found")
    assert run not in cli(api, "runs").stdout
    assert one_line_error(cli(api, "runs", "delete", run, "--yes")) == (
        f"error: no run named '{run}' (code run_not_found)")


def test_trend_of_a_run_without_scores_says_so_in_one_line(api, ckpt):
    run = f"t-{uuid.uuid4().hex[:6]}"
    job_id(cli(api, "submit", run, "5", str(ckpt)))  # no worker: it stays queued
    out = cli(api, "trend", run)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    assert out.stdout.splitlines() == [f"run {run} has no linearity_nores scores yet (jobs: 1 queued); "
                                       f"'layertrack jobs --run {run}' follows them"], out.stdout
    out = cli(api, "trend", run, "--json")  # the API's answer, for scripts
    assert out.returncode == 0 and json.loads(out.stdout)["steps"] == []
