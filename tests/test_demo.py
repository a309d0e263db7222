"""The demo's pieces without a full training: Spearman and the tables, the figures (drawn by
layertrack.service.plots), the up-front check that the service can read --out, the embedded
service; and one ``layertrack demo --short`` through the embedded service."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shlex
import subprocess
from pathlib import Path

import httpx
import matplotlib
import pytest
from layertrack.service.demo import report
from layertrack.service.demo.run import CHECK_DIR, DemoError, check_service_reads, demo_service
from layertrack.service.demo.training import PLANS
from services import api_only, free_port, layertrack_exe

EXE = layertrack_exe()


# ------------------------------------------------------------------ Spearman and the tables
def test_spearman_known_values():
    assert report.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert report.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties take their average rank: ranks (0, 1.5, 1.5, 3) against (0, 1, 2, 3)
    assert report.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(4.5 * 5))
    # docs/REPRODUCTION.md, pretraining: linearity_nores ~ Δloss linear over 7 blocks = -1/28
    nores = [0.746, 0.241, 0.225, 0.229, 0.298, 0.408, 0.451]
    lin = [0.0121, 0.0182, 0.0084, 0.0020, -0.0019, -0.0035, 0.0072]
    assert report.spearman(nores, lin) == pytest.approx(-1 / 28)
    # unknown values (None from the API, NaN) are left out with their partner
    assert report.spearman([1, None, 2, 3, math.nan], [1, 5, 2, 3, 9]) == pytest.approx(1.0)
    assert report.spearman([1, 2], [2, 1]) is None  # too few pairs to rank
    assert report.spearman([1, 1, 1], [1, 2, 3]) is None  # one side constant


def blocks(n: int) -> dict[int, dict[str, float]]:
    return {i: {"linearity": 0.9 - 0.01 * i, "linearity_nores": 0.3 + 0.05 * (i % 3),
                "loss_delta_linear": 0.001 * (i + 1), "loss_delta_drop": 0.02 - 0.001 * i} for i in range(n)}


def spearman_cells(table: str) -> list[str]:
    """The Spearman values of a replaceability table (its rows start with a metric's name)."""
    rows = [words for words in map(str.split, table.splitlines()) if words and words[0] in report.METRICS]
    return [cell for row in rows for cell in row[1:]]


def test_the_dynamics_summary_says_whether_drift_falls_and_lower_layers_settle_first():
    heat = {"steps": [2, 4, 8, 16], "layers": [0, 1, 2],
            "values": [[0.30, 0.50, 0.70], [0.10, 0.40, 0.60], [0.05, 0.20, 0.50], [0.01, 0.10, 0.40]]}
    d = report.dynamics(heat)
    assert d["mean_per_step"] == pytest.approx([0.5, 1.1 / 3, 0.25, 0.17])
    assert d["late_mean_per_layer"] == pytest.approx([0.03, 0.15, 0.45])
    assert d["spearman"] == {"step~mean_drift": pytest.approx(-1.0), "layer~late_drift": pytest.approx(1.0)}
    table = report.dynamics_table("r", d)
    assert "ρ(step, mean drift) -1.000" in table and "drift over the later half) +1.000" in table
    assert "no drift_cka measured" in report.dynamics_table("r", report.dynamics(
        {"steps": [], "layers": [], "values": []}))


def test_the_replaceability_table_prints_spearman_numbers():
    table = report.replaceability_table("pretrain", report.replaceability(8, blocks(4)))
    assert "Spearman ρ over 4 blocks" in table
    cells = spearman_cells(table)
    assert len(cells) == 4 and all(re.fullmatch(r"[+-]\d\.\d{3}", c) for c in cells), table
    assert float(cells[0]) == pytest.approx(report.spearman(
        [b["linearity"] for b in blocks(4).values()], [b["loss_delta_linear"] for b in blocks(4).values()]), abs=5e-4)
    # with fewer than 3 blocks it says why there is no number
    table = report.replaceability_table("pretrain", report.replaceability(8, blocks(2)))
    assert spearman_cells(table) == ["n/a"] * 4 and "at least 3 blocks" in table


def test_the_short_plan_has_enough_blocks_for_spearman():
    # every block but the one into the final norm is ranked
    assert PLANS["short"].layers - 1 >= 3 and PLANS["default"].layers - 1 >= 3


def test_the_trend_table_has_a_row_per_step():
    trend = {m: {"steps": [1, 2, 4], "values": [0.5, None, 0.25]} for m in report.TABLE_METRICS}
    rows = report.trend_table({"d-pretrain": trend}).splitlines()
    assert rows[0].split() == ["run", "step", *report.TABLE_METRICS]
    assert [r.split() for r in rows[1:]] == [["d-pretrain", "1", *["0.500000"] * 3], ["d-pretrain", "2", *["-"] * 3],
                                             ["d-pretrain", "4", *["0.250000"] * 3]]


# ------------------------------------------------------------------ the figures
def svg_texts(data: bytes) -> list[str]:
    return re.findall(r"<text[^>]*>([^<]*)</text>", data.decode())


@pytest.mark.parametrize("steps", [[1, 2, 4, 8], [1, 2, 5, 10, 22, 46, 100, 215, 464, 1000]])
def test_log_step_axes_carry_plain_step_labels(steps):
    from layertrack.service import plots

    trend = {"steps": steps, "values": [0.3 + 0.01 * i for i in range(len(steps))]}
    with matplotlib.rc_context({"svg.fonttype": "none"}):  # keep labels as text
        texts = svg_texts(plots.trend_figure("r", "linearity_nores", trend, log_x=True, fmt="svg"))
    ticks = texts[:texts.index("training step")]  # the x axis is drawn first
    assert all(re.fullmatch(r"\d+", t) for t in ticks), ticks  # not 1.0, not 10^0
    want = {"1", "2", "4"} if steps[-1] < 10 else {"1", "10", "100", "1000"}
    assert want <= set(ticks), ticks


def test_the_demo_draws_its_figures_with_the_service_plots(tmp_path):
    steps = {"pretrain": [1, 2, 4, 8], "finetune": [1, 2, 4]}
    trends = {p: {m: {"steps": s, "values": [0.4 + 0.01 * k for k in range(len(s))]} for m in report.TABLE_METRICS}
              for p, s in steps.items()}
    heatmaps = {p: {"metric": report.FIGURE_METRIC, "steps": s, "layers": [0, 1, 2],
                    "values": [[0.3, 0.4, 0.9]] * len(s), "final_norm_layers": [2]} for p, s in steps.items()}
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        files = report.figures(tmp_path, runs={"pretrain": "d-pre", "finetune": "d-ft"}, trends=trends,
                               heatmaps=heatmaps, parent_step=8, fmt="svg")
    assert [f.name for f in files] == ["trend.svg", "trend_finetune.svg", "heatmap_pretrain.svg",
                                       "heatmap_finetune.svg"]
    trend = svg_texts((tmp_path / "trend.svg").read_bytes())
    assert {"1", "2", "4"} <= set(trend[:trend.index("training step")])
    assert "d-pre (parent)" in svg_texts((tmp_path / "trend_finetune.svg").read_bytes())
    heat = svg_texts((tmp_path / "heatmap_pretrain.svg").read_bytes())
    assert "0→1" in heat and "2→3" not in heat  # the final-norm pair is left out


# ------------------------------------------------------------------ the service it uses
@pytest.fixture(scope="module")
def api(tmp_path_factory):
    """An API server (SQLite, no worker) whose only checkpoint root is ``tmp/ckpts``."""
    with api_only(tmp_path_factory.mktemp("demo-api")) as svc:
        yield svc


def demo(*args: str, tmp_path) -> subprocess.CompletedProcess:
    env = dict(os.environ, LAYERTRACK_DATA_DIR=str(tmp_path / "data"), OMP_NUM_THREADS="1")
    for k in ("LAYERTRACK_URL", "LAYERTRACK_TOKEN"):
        env.pop(k, None)
    return subprocess.run([EXE, "demo", *args], capture_output=True, text=True, timeout=900, env=env)


def error_line(out: subprocess.CompletedProcess) -> str:
    """The one error line a failing demo prints, before it built or trained anything."""
    assert out.returncode == 3, out.stdout + out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in out.stderr, out.stderr
    assert "building the corpus" not in out.stderr
    return errors[0]


def test_check_service_reads_passes_under_the_roots_and_stores_nothing(api):
    out = api.roots / "demo-out"
    with api.client() as c:
        check_service_reads(c, out)
        assert not (out / CHECK_DIR).exists()
        assert [r["name"] for r in c.runs()] == [] and c.jobs() == []
        with pytest.raises(DemoError, match="outside the service's checkpoint roots"):
            check_service_reads(c, api.tmp / "not-a-root")


def test_the_demo_stops_at_once_when_the_service_cannot_read_out(api, tmp_path):
    out = tmp_path / "demo-out"  # not under the service's root
    line = error_line(demo("--short", "--url", api.url, "--token", api.token, "--out", str(out), tmp_path=tmp_path))
    assert f"layertrack at {api.url} cannot read --out {out}" in line
    assert f"layertrack up --roots {out}" in line


def test_the_demo_reports_service_problems_in_one_line(api, tmp_path):
    out = api.roots / "demo-out"
    line = error_line(demo("--short", "--url", api.url, "--token", "lt_wrong", "--out", str(out), tmp_path=tmp_path))
    assert "refused the demo's token" in line and "--token" in line
    url = f"http://127.0.0.1:{free_port()}"
    line = error_line(demo("--short", "--url", url, "--token", api.token, "--out", str(out), tmp_path=tmp_path))
    assert f"layertrack at {url} cannot be reached" in line
    line = error_line(demo("--hidden", "30", "--out", str(out), tmp_path=tmp_path))
    assert "--hidden must be a multiple of 4" in line


def test_without_a_service_the_demo_starts_an_embedded_one(tmp_path, monkeypatch):
    from layertrack.service.client import Client
    from layertrack.service.settings import get_settings

    monkeypatch.delenv("LAYERTRACK_URL", raising=False)
    monkeypatch.delenv("LAYERTRACK_TOKEN", raising=False)
    monkeypatch.setenv("LAYERTRACK_DATA_DIR", str(tmp_path / "nothing-saved"))
    get_settings.cache_clear()
    out = tmp_path / "out"
    out.mkdir()
    try:
        with demo_service(None, None, out) as (url, token, embedded):
            assert embedded and (out / "service" / "layertrack.db").is_file()
            with Client(url, token) as c:
                check_service_reads(c, out)  # its root is --out
                assert c.runs() == []
    finally:
        get_settings.cache_clear()

    def answers() -> bool:
        with contextlib.suppress(httpx.TransportError):
            httpx.get(url + "/healthz", timeout=2)
            return True
        return False

    assert not answers()  # stopped with the block


def test_a_saved_service_is_used_only_when_it_can_read_out(api, tmp_path, monkeypatch, capsys):
    """What ``layertrack up`` saved (client.json) is used when it answers and can read --out;
    otherwise the demo says why and starts an embedded service instead."""
    from layertrack.service.settings import get_settings

    data = tmp_path / "data"
    data.mkdir()
    (data / "client.json").write_text(json.dumps({"url": api.url, "token": api.token}))
    monkeypatch.delenv("LAYERTRACK_URL", raising=False)
    monkeypatch.delenv("LAYERTRACK_TOKEN", raising=False)
    monkeypatch.setenv("LAYERTRACK_DATA_DIR", str(data))
    get_settings.cache_clear()
    try:
        with demo_service(None, None, api.roots / "demo-saved") as (url, token, embedded):
            assert (url, token, embedded) == (api.url, api.token, False)
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        with demo_service(None, None, elsewhere) as (url, _token, embedded):
            assert embedded and url != api.url
        assert f"not using layertrack at {api.url}" in capsys.readouterr().err
    finally:
        get_settings.cache_clear()


@pytest.fixture(scope="module")
def short_demo(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """``layertrack demo --short`` through its embedded service, run once: (--out, its run)."""
    tmp = tmp_path_factory.mktemp("short-demo")
    out = tmp / "out"
    done = demo("--short", "--out", str(out), "--name", "emb", tmp_path=tmp)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, done


@pytest.mark.slow
def test_demo_short_through_the_embedded_service(short_demo):
    out, done = short_demo
    assert "starting an embedded layertrack" in done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["posted_steps"] == {"pretrain": [1, 2, 4, 8], "finetune": [1, 2, 4]}
    rows = [line.split() for line in done.stdout.splitlines() if line.startswith("emb-")]
    assert [(r[0], int(r[1])) for r in rows] == [("emb-pretrain", s) for s in (1, 2, 4, 8)] + [
        ("emb-finetune", s) for s in (1, 2, 4)]
    # the Spearman rows print numbers, for both phases
    cells = spearman_cells(done.stdout)
    assert len(cells) == 8 and all(re.fullmatch(r"[+-]\d\.\d{3}", c) for c in cells), done.stdout
    for phase in ("pretrain", "finetune"):
        assert all(v is not None for v in summary["replaceability"][phase]["spearman"].values())
    # drift per hidden state against each step's previous checkpoint: not at the first step of
    # pretraining (nothing before it), at the fine-tune's first (against its parent)
    drift = summary["dynamics"]
    assert drift["pretrain"]["steps"] == [2, 4, 8] and drift["finetune"]["steps"] == [1, 2, 4]
    for phase in ("pretrain", "finetune"):
        assert all(0 <= v <= 1 for row in drift[phase]["values"] for v in row), drift[phase]
        assert len(drift[phase]["layers"]) == 6  # 5 blocks: h0 ... h5
    assert done.stdout.count("drift_cka (1 − linear CKA against the previous checkpoint)") == 2
    assert done.stdout.count("Spearman ρ(step, mean drift)") == 2
    for name in ("trend.png", "trend_finetune.png", "heatmap_pretrain.png", "heatmap_finetune.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


@pytest.mark.slow
def test_the_command_the_demo_prints_opens_its_results_in_the_dashboard(short_demo, tmp_path):
    """The demo's embedded service is gone when it ends; its last lines say how to serve what it
    stored (OUT/service) again. That command, run as printed (on a free port), serves the demo's
    runs to the token the demo saved, and the dashboard's pages with them."""
    from layertrack.service.client import Client
    from services import interrupt_group, ready, wait_until

    out, done = short_demo
    lines = done.stdout.splitlines()
    prefix = "to open the results in the dashboard, run: "
    assert lines[-2].startswith(prefix), done.stdout[-2000:]
    command = shlex.split(lines[-2].removeprefix(prefix))
    assert command[:2] == ["layertrack", "up"] and str(out / "service") in command, command
    assert lines[-1] == (f"  then open http://127.0.0.1:8321/runs/emb-pretrain with the token saved in "
                         f"{out / 'service' / 'client.json'}")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAYERTRACK_")}
    env["OMP_NUM_THREADS"] = "1"
    env["LAYERTRACK_DATA_DIR"] = str(tmp_path / "elsewhere")  # the command names its data directory itself
    log_out, log_err = tmp_path / "up.out", tmp_path / "up.err"
    with open(log_out, "wb") as o, open(log_err, "wb") as e:
        up = subprocess.Popen([EXE, *command[1:], "--port", str(port)], env=env, stdout=o, stderr=e,
                              start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: ready(url) or up.poll() is not None, 90, what="the printed command to serve")
        assert up.poll() is None, log_out.read_text() + log_err.read_text()
        client_file = out / "service" / "client.json"
        assert f"API token for the CLI and client: {client_file}" in log_out.read_text(), log_out.read_text()
        saved = json.loads(client_file.read_text())
        assert saved["url"] == url  # up put its own URL in
        with Client(url, saved["token"]) as c:
            assert {r["name"] for r in c.runs()} >= {"emb-pretrain", "emb-finetune"}
            assert c.trend("emb-pretrain", metric="linearity_nores")["steps"] == [1, 2, 4, 8]
        page = httpx.get(f"{url}/runs/emb-pretrain", timeout=10)
        assert page.status_code == 200 and "app.js" in page.text
        # and the CLI, pointed at that data directory, finds the service and the token there
        cli_env = {**env, "LAYERTRACK_DATA_DIR": str(out / "service")}
        trend = subprocess.run([EXE, "trend", "emb-finetune"], env=cli_env, capture_output=True, text=True,
                               timeout=60)
        assert trend.returncode == 0 and trend.stdout.splitlines()[0].startswith("run emb-finetune"), trend.stderr
    finally:
        interrupt_group(up, timeout=60)
