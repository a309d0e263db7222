"""The dashboard and the API docs in real headless Chromium (Debian's /usr/bin/chromium, driven
by Playwright) against the live service with real data (API server, Celery worker,
PostgreSQL, Redis), and the plot endpoints and ``layertrack plot``. A page that logs an error
to its console, or throws, fails its test. Screenshots go to test-artifacts/ (or
$LAYERTRACK_TEST_ARTIFACTS)."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest
from services import layertrack_exe, live_service, wait_until

CFG = {"max_tokens": 600, "seq_len": 64}
ARTIFACTS = Path(os.environ.get("LAYERTRACK_TEST_ARTIFACTS", Path(__file__).resolve().parent.parent / "test-artifacts"))
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SLASHED = "org/llama-350m"  # a run name with a "/", as Hugging Face names models


def flat_run(db_url: str, run: str, steps: tuple[int, ...]) -> None:
    """Scores through the real completion path (jobs.complete) that are the same at every
    step: linearity, linearity_nores, cosine and anisotropy 1.0, norm_ratio 0.5."""
    from services import synthetic_run

    synthetic_run(db_url, run, steps, fingerprint="flat", anisotropy=1.0,
                  pair=lambda step: {"linearity": 1.0, "linearity_nores": 1.0, "cosine": 1.0, "norm_ratio": 0.5})


@pytest.fixture(scope="module")
def live(tmp_path_factory, redis_server, tokenizer):
    """Five runs: a pretraining run (steps 100, 200, 300) with an alert that fired at 200, a
    fine-tune of it (steps 10, 20 from step 300), a run whose only job failed, a run named
    ``org/llama-350m`` (steps 1000, 2000) and a run whose scores are flat at the top of their
    range (steps 1, 2, 3)."""
    from layertrack.workers.scoring import ScoreConfig, score_checkpoint
    from tiny_models import build_checkpoint
    from transformers import BertConfig, BertForMaskedLM

    with live_service(tmp_path_factory.mktemp("dash"), redis_server.new_url()) as svc:
        roots = svc.roots
        tag = uuid.uuid4().hex[:4]
        svc.runs = {"pre": f"pre-{tag}", "ft": f"ft-{tag}", "bad": f"bad-{tag}", "slash": SLASHED,
                    "flat": f"flat-{tag}"}
        pre, ft, bad = svc.runs["pre"], svc.runs["ft"], svc.runs["bad"]
        ck = {s: build_checkpoint(roots / pre / f"s{s}", "llama", tokenizer, seed=s) for s in (100, 200, 300)}
        with svc.client() as c:
            first = c.submit(run=pre, step=100, uri=str(ck[100]), config=CFG)["id"]
            assert c.wait(first, timeout=240)["status"] == "succeeded"
            m1 = c.trend(pre, metric="linearity_nores")["values"][0]
            blocks = [p.linearity_nores for p in score_checkpoint(str(ck[200]), config=ScoreConfig(**CFG)).scores.pairs
                      if not p.final_norm]
            m2 = sum(blocks) / len(blocks)
            mid = (m1 + m2) / 2
            side = {"above": mid} if m2 > m1 else {"below": mid}
            c.create_alert(pre, metric="linearity_nores", kind="threshold", **side)
            ids = [c.submit(run=pre, step=s, uri=str(ck[s]), config=CFG)["id"] for s in (200, 300)]
            for s, seed in ((10, 11), (20, 12)):
                p = build_checkpoint(roots / ft / f"s{s}", "llama", tokenizer, seed=seed)
                ids.append(c.submit(run=ft, step=s, uri=str(p), config=CFG, phase="finetune", parent_run=pre,
                                    parent_step=300)["id"])
            bert = roots / bad / "bert"
            BertForMaskedLM(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                       intermediate_size=64, vocab_size=384)).save_pretrained(bert)
            ids.append(c.submit(run=bad, step=1, uri=str(bert), config=CFG)["id"])
            for s, seed in ((1000, 21), (2000, 22)):
                p = build_checkpoint(roots / SLASHED / f"s{s}", "llama", tokenizer, seed=seed)
                ids.append(c.submit(run=SLASHED, step=s, uri=str(p), config=CFG)["id"])
            for i in ids:
                c.wait(i, timeout=240, poll=0.5)
            assert [f["step"] for f in c.firings(pre)] == [200]
            assert [j["status"] for j in c.jobs(run=SLASHED)] == ["succeeded"] * 2
        flat_run(svc.db_url, svc.runs["flat"], (1, 2, 3))
        yield svc


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail("the browser tests need Debian's chromium (apt-get install chromium; .ci/run installs it)")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


def watch_errors(pg) -> list[str]:
    """Uncaught exceptions and console errors (a failed request logs one too) of the page."""
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(f"page error: {e}"))
    pg.on("console", lambda m: m.type == "error" and errors.append(f"console error: {m.text} ({m.location})"))
    return errors


@pytest.fixture()
def page(browser, live):
    ctx = browser.new_context(viewport={"width": 1366, "height": 900})
    pg = ctx.new_page()
    errors = watch_errors(pg)
    pg.goto(live.url + "/")
    pg.fill("#token-input", live.token)
    pg.click("button[type=submit]")
    pg.wait_for_selector("#runs tbody tr")
    yield pg
    ctx.close()
    assert errors == [], errors


def shot(pg, name: str) -> None:
    pg.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def chart_info(pg, el_id: str) -> dict:
    """Series count, data lengths and whether the canvas has any non-blank pixel."""
    return pg.evaluate("""(id) => {
        const el = document.getElementById(id);
        if (!el || !window.echarts) return null;
        const c = echarts.getInstanceByDom(el);
        if (!c) return null;
        const o = c.getOption();
        const canvas = el.querySelector('canvas');
        if (!canvas) return null;
        const ctx = canvas.getContext('2d');
        const px = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
        let inked = 0;
        for (let i = 0; i < px.length; i += 4)
            if (px[i + 3] > 0 && (px[i] < 240 || px[i + 1] < 240 || px[i + 2] < 240)) inked++;
        return {series: o.series.map(s => ({name: s.name, n: (s.data || []).length, first: (s.data || [])[0],
                                          marks: s.markPoint ? s.markPoint.data.length : 0})),
                inked, width: canvas.width};
    }""", el_id)


def wait_chart(pg, el_id: str, n_series: int, timeout: float = 20) -> dict:
    def drawn() -> dict | None:
        info = chart_info(pg, el_id)
        return info if info and len(info["series"]) == n_series and info["inked"] > 500 else None

    return wait_until(drawn, timeout, what=f"chart {el_id} with {n_series} series drawn")


def y_axis(pg, el_id: str) -> tuple[float, float]:
    """The (min, max) the dashboard set on a chart's y-axis."""
    return tuple(pg.evaluate("""(id) => { const y = echarts.getInstanceByDom(document.getElementById(id))
                                                        .getOption().yAxis[0]; return [y.min, y.max]; }""", el_id))


def meta(live) -> dict:
    with live.http() as h:
        return h.get("/v1/meta").json()


def test_login_runs_list_filter_and_live_update(page, live, tokenizer):
    from tiny_models import build_checkpoint

    rows = page.eval_on_selector_all("#runs tbody tr", "rs => rs.map(r => r.dataset.run)")
    assert set(live.runs.values()) <= set(rows)
    ft_row = page.locator(f"#runs tbody tr[data-run='{live.runs['ft']}']")
    assert live.runs["pre"] in ft_row.inner_text() and "finetune" in ft_row.inner_text()
    bad_cells = page.locator(f"#runs tbody tr[data-run='{live.runs['bad']}'] td").all_inner_texts()
    assert bad_cells[7] == "1"  # failed
    shot(page, "runs")
    page.fill("#run-filter", "ft-")
    page.wait_for_function(
        "() => [...document.querySelectorAll('#runs tbody tr')].every(r => r.dataset.run.startsWith('ft-'))")
    page.fill("#run-filter", "")
    # a new run appears without reloading the page
    new = f"live-{uuid.uuid4().hex[:4]}"
    p = build_checkpoint(live.roots / new / "s1", "llama", tokenizer, seed=5)
    with live.client() as c:
        c.submit(run=new, step=1, uri=str(p), config=CFG)
    page.wait_for_selector(f"#runs tbody tr[data-run='{new}']", timeout=20_000)


def test_run_page_charts_heatmap_alert_and_profile_click(page, live):
    pre = live.runs["pre"]
    page.click(f"a[href='/runs/{pre}']")
    for m in ("linearity", "linearity_nores", "cosine", "norm_ratio", "anisotropy"):
        info = wait_chart(page, f"trend-{m}", 1)
        assert info["series"][0]["n"] == 3
        assert info["series"][0]["marks"] == (1 if m == "linearity_nores" else 0)  # the alert at step 200
    heat = wait_chart(page, "heatmap", 1)
    assert heat["series"][0]["n"] == 3 * 2  # 3 steps × 2 blocks (the final-norm pair left out)
    prof = wait_chart(page, "profile", 1)
    assert prof["series"][0]["name"] == "step 300" and prof["series"][0]["n"] == 2
    shot(page, "run")
    # click the heatmap cell of the first step: the profile follows
    xy = page.evaluate("""() => { const c = echarts.getInstanceByDom(document.getElementById('heatmap'));
                                  return c.convertToPixel({seriesIndex: 0}, [0, 0]); }""")
    page.locator("#heatmap").scroll_into_view_if_needed()
    box = page.locator("#heatmap").bounding_box()
    page.mouse.click(box["x"] + xy[0], box["y"] + xy[1])
    page.wait_for_function("() => document.getElementById('profile').dataset.step === '100'")
    assert wait_chart(page, "profile", 1)["series"][0]["name"] == "step 100"
    page.select_option("#compare-step", "300")
    names = [s["name"] for s in wait_chart(page, "profile", 2)["series"]]
    assert names == ["step 100", "step 300"]
    page.select_option("#metric", "cosine")
    page.wait_for_function("() => echarts.getInstanceByDom(document.getElementById('heatmap')).getOption()"
                           ".series[0].name === 'cosine'")
    page.check("#logx")
    page.wait_for_function("() => echarts.getInstanceByDom(document.getElementById('trend-linearity'))"
                           ".getOption().xAxis[0].type === 'log'")
    shot(page, "run-compare-steps")


def test_the_run_page_shows_the_dynamics_of_its_steps(page, live):
    """The dynamics view: drift_cka per hidden state and weight_update per block, step × layer,
    for the steps that had a previous checkpoint (200 and 300, not 100), every block kept; the
    values are the stored ones; a run without dynamics says so."""
    pre = live.runs["pre"]
    with live.client() as c:
        drift, update = c.heatmap(pre, metric="drift_cka"), c.heatmap(pre, metric="weight_update")
    assert drift["steps"] == update["steps"] == [200, 300]
    page.click(f"a[href='/runs/{pre}']")
    d = wait_chart(page, "dyn-drift_cka", 1)
    w = wait_chart(page, "dyn-weight_update", 1)
    assert d["series"][0]["n"] == 2 * len(drift["layers"]) and w["series"][0]["n"] == 2 * len(update["layers"])
    assert d["series"][0]["first"] == [0, 0, drift["values"][0][0]]
    labels = page.evaluate("""() => ['dyn-drift_cka', 'dyn-weight_update'].map((id) =>
        echarts.getInstanceByDom(document.getElementById(id)).getOption().yAxis[0].data)""")
    assert labels[0] == [f"h{h}" for h in drift["layers"]]
    assert labels[1] == [f"{b}→{b + 1}" for b in update["layers"]]
    page.locator("#dynamics").scroll_into_view_if_needed()
    shot(page, "run-dynamics")
    assert "drift_cka" in page.eval_on_selector_all("#metric option", "els => els.map(e => e.value)")
    page.goto(live.url + f"/runs/{live.runs['flat']}")
    wait_chart(page, "dyn-drift_cka", 1)
    title = page.evaluate("() => echarts.getInstanceByDom(document.getElementById('dyn-drift_cka'))"
                          ".getOption().title[0].text")
    assert title == "drift_cka: not measured for this run yet", title


def test_fine_tune_continues_from_its_parent(page, live):
    page.goto(f"{live.url}/runs/{live.runs['ft']}")
    info = wait_chart(page, "trend-linearity", 2)
    parent, own = info["series"]
    assert parent["name"].endswith("(parent)") and parent["n"] == 3
    assert own["first"][0] == 310  # step 10 of the fine-tune, after step 300 of its parent
    shot(page, "finetune")


def test_jobs_page_shows_errors_and_retry_and_cancel_work(page, live, tokenizer):
    from tiny_models import build_checkpoint

    page.goto(live.url + "/jobs")
    page.wait_for_selector("#jobs tbody tr[data-status='failed']")
    failed = page.locator("#jobs tbody tr[data-status='failed']").first
    assert "not_a_causal_lm" in failed.locator(".job-error").inner_text()
    assert "not a causal language model" in failed.inner_text()
    shot(page, "jobs")
    job_id = failed.get_attribute("data-job")
    failed.locator("button[data-action=retry]").click()
    with live.client() as c:  # it runs again, and fails again
        def failed_twice() -> dict | None:
            j = c.job(job_id)
            return j if j["attempts"] == 2 and j["status"] == "failed" else None

        assert wait_until(failed_twice, 120, what="the retried job to fail a second time")["error_code"] == (
            "not_a_causal_lm")
    # the page shows it without a reload
    page.wait_for_function(
        f"() => document.querySelector(\"#jobs tr[data-job='{job_id}'] td:nth-child(5)\").textContent === '2'",
        timeout=20_000)
    # cancel: with no worker running, a new job stays queued
    live.kill_worker("w1")
    try:
        p = build_checkpoint(live.roots / "cancel-me" / "s1", "llama", tokenizer, seed=9)
        with live.client() as c:
            queued = c.submit(run=f"cancel-{uuid.uuid4().hex[:4]}", step=1, uri=str(p), config=CFG)["id"]
        row = f"#jobs tr[data-job='{queued}']"
        page.wait_for_selector(f"{row}[data-status='queued']", timeout=20_000)
        page.click(f"{row} button[data-action=cancel]")
        page.wait_for_selector(f"{row}[data-status='cancelled']", timeout=20_000)
    finally:
        live.start_worker("w1")


def test_job_ids_on_the_jobs_page_link_to_the_job(page, live):
    page.goto(live.url + "/jobs")
    page.wait_for_selector("#jobs tbody tr[data-status='failed']")
    rows = page.locator("#jobs tbody tr[data-job]")
    assert rows.count() >= 8
    for i in range(rows.count()):  # every job id cell is an anchor to that job's page
        row = rows.nth(i)
        job_id = row.get_attribute("data-job")
        link = row.locator("td:first-child a")
        assert link.count() == 1 and link.get_attribute("href") == f"/jobs/{job_id}"
        assert link.inner_text() == job_id[:8]
    failed = page.locator("#jobs tbody tr[data-status='failed']").first
    job_id = failed.get_attribute("data-job")
    failed.locator("td:first-child a").click()
    page.wait_for_url(f"{live.url}/jobs/{job_id}")
    page.wait_for_selector(f"#job[data-job='{job_id}']")
    assert page.locator("#job-id").inner_text() == job_id
    with live.client() as c:
        job = c.job(job_id)
    text = page.locator("#job").inner_text()
    assert job["run"] in text and job["uri"] in text and "not_a_causal_lm" in text
    assert page.locator("#job").get_attribute("data-status") == job["status"]
    assert page.locator("nav a.active").inner_text().strip().lower() == "jobs"
    shot(page, "job")
    # a succeeded job shows its result
    page.goto(live.url + "/jobs")
    done = page.locator("#jobs tbody tr[data-status='succeeded']").first
    page.wait_for_selector("#jobs tbody tr[data-status='succeeded']")
    done_id = done.get_attribute("data-job")
    done.locator("td:first-child a").click()
    page.wait_for_selector(f"#job[data-job='{done_id}'][data-status='succeeded']")
    assert '"n_tokens"' in page.locator("#job-result").inner_text()


def test_the_profile_x_axis_ticks_whole_blocks_only(page, live):
    page.goto(f"{live.url}/runs/{live.runs['pre']}")
    wait_chart(page, "profile", 1)
    ticks = page.evaluate("""() => {
        const axis = echarts.getInstanceByDom(document.getElementById('profile')).getModel()
                            .getComponent('xAxis', 0).axis;
        return {values: axis.scale.getTicks().map(t => t.value),
                labels: axis.getViewLabels().map(l => l.formattedLabel)};
    }""")
    assert len(ticks["values"]) >= 2 and all(v == int(v) for v in ticks["values"]), ticks
    assert all(label.lstrip("-").isdigit() for label in ticks["labels"]), ticks


def test_compare_page_overlays_runs(page, live):
    page.goto(f"{live.url}/compare?runs={live.runs['pre']},{live.runs['ft']}&metric=linearity")
    info = wait_chart(page, "compare", 2)
    assert [s["name"] for s in info["series"]] == [live.runs["pre"], live.runs["ft"]]
    assert info["series"][1]["first"][0] == 310
    shot(page, "compare")


# ------------------------------------------------------------------ plot files
def test_plot_endpoints_return_png_and_svg_and_clear_errors(live):
    pre, ft = live.runs["pre"], live.runs["ft"]
    with live.http() as h:
        cases = (("trend", ""), ("trend", "&log_x=true"), ("heatmap", ""), ("profile", "&step=100&step=300"))
        for kind, extra in cases:
            for run in (pre, ft) if kind != "profile" else (pre,):
                png = h.get(f"/v1/runs/{run}/{kind}/plot.png?metric=linearity_nores{extra}")
                assert png.status_code == 200 and png.headers["content-type"] == "image/png", png.text[:300]
                assert png.content[:8] == b"\x89PNG\r\n\x1a\n" and len(png.content) > 5000
            svg = h.get(f"/v1/runs/{pre}/{kind}/plot.svg?metric=linearity_nores{extra}")
            assert svg.status_code == 200 and svg.headers["content-type"].startswith("image/svg+xml")
            assert b"<svg" in svg.content[:2000] and svg.content.rstrip().endswith(b"</svg>")
        r = h.get("/v1/runs/no-such-run/trend/plot.png")
        assert r.status_code == 404 and "no run named 'no-such-run'" in r.json()["detail"]
        r = h.get(f"/v1/runs/{pre}/heatmap/plot.png?metric=bogus")
        assert r.status_code == 422 and "unknown metric 'bogus'" in r.json()["detail"]
        r = h.get(f"/v1/runs/{pre}/trend/plot.gif")
        assert r.status_code == 404 and "plot.png or plot.svg" in r.json()["detail"]
        r = h.get(f"/v1/runs/{pre}/profile/plot.png?step=12345")
        assert r.status_code == 404 and "12345" in r.json()["detail"]
        assert httpx.get(f"{live.url}/v1/runs/{pre}/trend/plot.png").status_code == 401


def test_plot_cli_writes_files(live, tmp_path):
    env = dict(os.environ, LAYERTRACK_URL=live.url, LAYERTRACK_TOKEN=live.token,
               LAYERTRACK_DATA_DIR=str(tmp_path / "data"))
    for kind, name in (("trend", "t.png"), ("heatmap", "h.svg"), ("profile", "p.png")):
        out = subprocess.run([layertrack_exe(), "plot", live.runs["pre"], "--kind", kind, "-o", str(tmp_path / name)],
                             env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        data = (tmp_path / name).read_bytes()
        assert data[:4] == b"\x89PNG" if name.endswith(".png") else b"<svg" in data[:2000]
    bad = subprocess.run([layertrack_exe(), "plot", "nope", "-o", str(tmp_path / "x.png")], env=env,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "no run named 'nope'" in bad.stderr


# ------------------------------------------------------------------ meta, run names with "/", axes
def test_sign_in_says_where_the_first_token_is(browser, live):
    ctx = browser.new_context()
    pg = ctx.new_page()
    errors = watch_errors(pg)
    pg.goto(live.url + "/")
    text = pg.locator("#login").inner_text()
    assert "$LAYERTRACK_DATA_DIR/client.json" in text and "~/.local/share/layertrack/client.json" in text
    assert "layertrack token create NAME" in text
    assert pg.evaluate("() => fetch('/favicon.ico').then(r => r.status)") == 200
    ctx.close()
    assert errors == [], errors


def test_metric_list_and_labels_come_from_meta(page, live):
    m = meta(live)
    page.click(f"a[href='/runs/{live.runs['pre']}']")
    wait_chart(page, "heatmap", 1)
    shown = [x["name"] for x in m["metrics"] if x["default"]]
    assert page.eval_on_selector_all("#trends .chart", "cs => cs.map(c => c.dataset.metric)") == shown
    options = page.eval_on_selector_all("#metric option", "os => os.map(o => o.value)")
    assert options == [x["name"] for x in m["metrics"]]
    assert page.input_value("#metric") == m["default_metric"]
    for x in m["metrics"]:
        if x["default"]:
            y_name = page.evaluate("(id) => echarts.getInstanceByDom(document.getElementById(id)).getOption()"
                                   ".yAxis[0].name", f"trend-{x['name']}")
            assert y_name == x["label"]


def test_bounded_metrics_keep_their_y_axis_within_their_range(page, live):
    """A flat series at the top of its range: the axis ends at the range's end (linearity at
    1.0 used to get an axis from 0.4 to 1.6). And real data never leaves its metric's range."""
    metrics = meta(live)["metrics"]
    ranges = {x["name"]: x["range"] for x in metrics}
    page.goto(f"{live.url}/runs/{live.runs['flat']}")
    for name in ("linearity", "linearity_nores", "cosine", "anisotropy"):
        wait_chart(page, f"trend-{name}", 1)
        low, high = y_axis(page, f"trend-{name}")
        assert high == 1 and ranges[name][0] <= low < 1, (name, low, high)
    wait_chart(page, "trend-norm_ratio", 1)
    low, high = y_axis(page, "trend-norm_ratio")
    assert 0 <= low < 0.5 < high, (low, high)
    shot(page, "run-flat")
    page.goto(f"{live.url}/runs/{live.runs['pre']}")
    for name in [x["name"] for x in metrics if x["default"]]:
        wait_chart(page, f"trend-{name}", 1)
        low, high = y_axis(page, f"trend-{name}")
        lo, hi = ranges[name]
        assert low < high and (lo is None or low >= lo) and (hi is None or high <= hi), (name, low, high)


def test_a_run_named_with_a_slash_walks_the_run_page(page, live):
    run = live.runs["slash"]
    link = page.locator(f"#runs tbody tr[data-run='{run}'] a").first
    assert link.get_attribute("href") == "/runs/org/llama-350m"
    link.click()
    page.wait_for_url(f"{live.url}/runs/org/llama-350m")
    assert page.locator("h1").inner_text().startswith(run)
    for x in meta(live)["metrics"]:
        if x["default"]:
            assert wait_chart(page, f"trend-{x['name']}", 1)["series"][0]["n"] == 2
    assert wait_chart(page, "heatmap", 1)["series"][0]["n"] == 2 * 2
    prof = wait_chart(page, "profile", 1)
    assert prof["series"][0]["name"] == "step 2000"
    page.select_option("#profile-step", "1000")
    page.wait_for_function("() => document.getElementById('profile').dataset.step === '1000'")
    page.select_option("#compare-step", "2000")
    assert [s["name"] for s in wait_chart(page, "profile", 2)["series"]] == ["step 1000", "step 2000"]
    page.select_option("#metric", "cosine")
    page.wait_for_function("() => echarts.getInstanceByDom(document.getElementById('heatmap')).getOption()"
                           ".series[0].name === 'cosine'")
    downloads = []
    page.on("download", lambda d: downloads.append(d))
    page.click("#png")

    def three_downloads() -> bool:
        page.evaluate("0")  # Playwright's sync API hands over events (downloads) only during its calls
        return len(downloads) == 3

    wait_until(three_downloads, 30, what="three PNG downloads")
    assert sorted(d.suggested_filename for d in downloads) == [
        "org_llama-350m-cosine-heatmap.png", "org_llama-350m-cosine-profile.png", "org_llama-350m-cosine-trend.png"]
    for d in downloads:
        assert Path(d.path()).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    shot(page, "run-slashed")
    # the page at its own address (a reload, a shared link), and the links of the other pages
    page.goto(f"{live.url}/runs/org/llama-350m")
    wait_chart(page, "heatmap", 1)
    page.goto(f"{live.url}/jobs")
    page.wait_for_selector("#jobs tbody tr[data-job]")
    page.select_option("#job-status", "succeeded")
    page.fill("#job-run", run)
    page.press("#job-run", "Enter")
    page.wait_for_function("""() => { const rows = [...document.querySelectorAll('#jobs tbody tr[data-job]')];
        return rows.length === 2
            && rows.every(r => r.querySelector('td:nth-child(2) a').getAttribute('href')
                            === '/runs/org/llama-350m'); }""")
    page.goto(f"{live.url}/compare?runs={live.runs['pre']},{run}&metric=linearity")
    assert [s["name"] for s in wait_chart(page, "compare", 2)["series"]] == [live.runs["pre"], run]


def test_api_docs_work_offline(browser, live):
    """/docs draws every operation with Swagger UI's files from the package: nothing but the
    local server is reachable, and nothing else is asked for."""
    operations = sum(len(ops) for ops in httpx.get(live.url + "/openapi.json").json()["paths"].values())
    ctx = browser.new_context(viewport={"width": 1366, "height": 900})
    outside: list[str] = []

    def only_local(route):
        if urlparse(route.request.url).hostname == "127.0.0.1":
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    ctx.route("**/*", only_local)
    pg = ctx.new_page()
    errors = watch_errors(pg)
    pg.goto(live.url + "/docs")
    pg.wait_for_selector(".opblock")
    wait_until(lambda: pg.locator(".opblock").count() == operations, 20,
               what=f"{operations} operations listed")
    paths = set(pg.eval_on_selector_all(".opblock-summary-path", "es => es.map(e => e.dataset.path)"))
    assert {"/v1/checkpoints", "/v1/meta", "/v1/runs/{run}/trend"} <= paths
    shot(pg, "docs")
    ctx.close()
    assert outside == [] and errors == [], (outside, errors)


def test_deleting_a_run_from_its_page_after_confirming(page, live, browser):
    """The Delete button says what would go (the API's dry run), Keep leaves the run, Delete
    removes it and goes back to the runs list; with a token without admin the button is
    disabled and says why. No console error on the way (the page fixture checks)."""
    from layertrack.service.auth import create_token
    from layertrack.service.db import session_scope

    run = f"org/doomed-{uuid.uuid4().hex[:4]}"
    flat_run(live.db_url, run, (1, 2))
    with live.client() as c:
        c.create_alert(run, metric="cosine", kind="threshold", below=0.5)
    page.goto(f"{live.url}/runs/{run}")
    wait_chart(page, "heatmap", 1)
    page.click("#delete-run")
    page.wait_for_selector("#delete-dialog[open]")
    page.wait_for_selector("#delete-confirm:enabled")
    assert page.inner_text("#delete-what") == ("This deletes 2 jobs, 2 checkpoints, 32 scores, 1 alert rule with "
                                               "0 firings.")
    shot(page, "run-delete-dialog")
    page.click("#delete-keep")
    page.wait_for_selector("#delete-dialog[open]", state="detached")
    with live.client() as c:
        assert c.run(run)["jobs"]["succeeded"] == 2  # kept

    page.click("#delete-run")
    page.wait_for_selector("#delete-confirm:enabled")
    page.click("#delete-confirm")
    page.wait_for_function("() => location.pathname === '/' && document.getElementById('status').textContent"
                           ".startsWith('deleted run ')")
    assert page.inner_text("#status") == (f"deleted run {run}: 2 jobs, 2 checkpoints, 32 scores, 1 alert rule "
                                          "with 0 firings")
    page.wait_for_selector("#runs tbody tr")
    assert run not in page.eval_on_selector_all("#runs tbody tr[data-run]", "rs => rs.map(r => r.dataset.run)")
    assert live.runs["pre"] in page.eval_on_selector_all("#runs tbody tr[data-run]", "rs => rs.map(r => r.dataset.run)")
    assert httpx.get(f"{live.url}/v1/runs/{run}", headers={"Authorization": f"Bearer {live.token}"}).status_code == 404

    with session_scope(live.db_url) as s:
        _row, read_token = create_token(s, "dash-reader", scopes=["read"])
    ctx = browser.new_context(viewport={"width": 1366, "height": 900})
    pg = ctx.new_page()
    errors = watch_errors(pg)
    pg.goto(live.url + "/")
    pg.fill("#token-input", read_token)
    pg.click("button[type=submit]")
    pg.wait_for_selector("#runs tbody tr")
    pg.goto(f"{live.url}/runs/{live.runs['pre']}")
    wait_chart(pg, "heatmap", 1)
    button = pg.locator("#delete-run")
    assert button.is_disabled()
    assert button.get_attribute("title") == "needs a token with the admin scope; this one has: read"
    ctx.close()
    assert errors == [], errors
