"""`moe-lab dashboard`: a self-contained page that renders in headless Chromium without console errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from moe_lab.analysis.pages import write_dashboard
from moe_lab.errors import DashboardError
from moe_lab.training.train import train

from conftest import REPO, chromium, run_cli

ARTIFACTS = REPO / "tests" / "artifacts"


def assert_self_contained(page: str) -> None:
    assert not re.search(r"<script[^>]+src=", page)  # plotly.js and the data are inlined
    assert not re.search(r"<link[^>]+href=\"?https?:", page)
    assert page.count("Plotly.newPlot") >= 3


def test_run_page(make_cfg, tmp_path):
    train(make_cfg("metrics.dashboard=false", name="run"))
    out = write_dashboard(tmp_path / "run")
    page = out.read_text()
    assert out == tmp_path / "run" / "dashboard.html"
    assert_self_contained(page)
    for title in (
        "Loss",
        "Expert load over time",
        "Balance, drops, entropy and specialisation",
        "Which experts take which domain",
        "Throughput",
    ):
        assert f"<h2>{title}</h2>" in page, title
    assert '"code"' in page and '"math"' in page  # the domains of the expert x domain tables
    # One tokens/s, named: the run's average, as summary.json and the terminal give it; and how the run computed.
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert f"{summary['tokens_per_sec_run']:,.0f}" in page and "tokens / s, run average" in page
    commit = summary["produced_by"]["code"].get("commit")
    assert "ran on cpu x 1" in page and "32-true, eager" in page and (commit is None or commit[:12] in page)


def test_never_writes_over_a_foreign_file(make_cfg, tmp_path):
    train(make_cfg("metrics.dashboard=false", name="run"))
    mine = tmp_path / "notes.html"
    mine.write_text("<html>my notes</html>")
    with pytest.raises(DashboardError, match="was not written by moe-lab"):
        write_dashboard(tmp_path / "run", mine)
    assert mine.read_text() == "<html>my notes</html>"
    write_dashboard(tmp_path / "run", tmp_path / "report.html")
    write_dashboard(tmp_path / "run", tmp_path / "report.html")  # its own page it may refresh
    with pytest.raises(DashboardError, match="neither a run directory"):
        write_dashboard(tmp_path / "run" / "checkpoints")


def render(page: Path, screenshot: Path) -> tuple[str, str]:
    """(DOM after scripts ran, Chromium's console log) of a page in headless Chromium."""
    binary = chromium()
    if binary is None:
        if os.environ.get("MOE_LAB_REQUIRE_CHROMIUM"):
            pytest.fail("Chromium is required here (MOE_LAB_REQUIRE_CHROMIUM) but not installed")
        pytest.skip("headless Chromium is not installed (apt-get install chromium)")
    flags = [
        binary,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={screenshot.parent / ('profile-' + screenshot.stem)}",
        "--enable-logging=stderr",
        "--v=0",
        "--virtual-time-budget=15000",
        "--window-size=1400,3400",
    ]
    dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=180)
    shot = subprocess.run(
        [*flags, f"--screenshot={screenshot}", page.as_uri()], capture_output=True, text=True, timeout=180
    )
    assert shot.returncode == 0 and screenshot.stat().st_size > 50_000, shot.stderr[-2000:]
    return dom.stdout, dom.stderr


@pytest.mark.slow
@pytest.mark.parametrize("which", ["sweep", "run"])
def test_pages_render_in_headless_chromium(sweep_dir, which):
    page = sweep_dir / "dashboard.html" if which == "sweep" else sweep_dir / "0" / "dashboard.html"
    ARTIFACTS.mkdir(exist_ok=True)
    dom, log = render(page, ARTIFACTS / f"dashboard_{which}.png")
    console = [line for line in log.splitlines() if ":CONSOLE" in line]
    assert not console, console  # no JavaScript errors or warnings
    source = page.read_text()
    figures = source.count('class="plotly-graph-div"')
    assert figures >= (4 if which == "sweep" else 5)
    assert dom.count("js-plotly-plot") >= figures  # every figure was drawn by plotly.js
    assert dom.count('class="main-svg"') >= figures
    if which == "sweep":
        assert "Runs, best validation loss first" in dom and "Which experts specialised in which domain" in dom


@pytest.mark.slow
def test_dashboard_command(sweep_dir, tmp_path):
    result = run_cli(["dashboard", str(sweep_dir), "-o", str(tmp_path / "report.html")], cwd=tmp_path)
    assert result.returncode == 0 and "wrote" in result.stdout, result.stderr
    assert_self_contained((tmp_path / "report.html").read_text())
    missing = run_cli(["dashboard", str(tmp_path / "nope")], cwd=tmp_path)
    assert (
        missing.returncode == 2
        and missing.stderr.startswith("moe-lab: error:")
        and "no such directory" in missing.stderr
    )


@pytest.mark.slow
def test_live_dashboard_reloads_until_stopped(sweep_dir, tmp_path):
    import signal
    import time

    from conftest import moe_lab_script

    out = tmp_path / "live.html"
    # Started as a non-interactive shell starts a background job: with SIGINT ignored. It stops on SIGINT anyway.
    proc = subprocess.Popen(
        [moe_lab_script(), "dashboard", str(sweep_dir / "1"), "--live", "--interval", "2", "-o", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    try:
        deadline = time.time() + 90
        while not out.exists() and time.time() < deadline:
            time.sleep(0.5)
        assert 'http-equiv="refresh" content="2"' in out.read_text()  # the open page reloads itself
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=90)
    finally:
        proc.kill()
    assert proc.returncode == 0 and 'http-equiv="refresh"' not in out.read_text()  # the final page stays put


@pytest.mark.slow
def test_comparing_runs_of_different_sweeps(sweep_dir, make_cfg, tmp_path):
    """`moe-lab dashboard RUN1 RUN2 ...`: runs of a sweep and a lone run on one page, and the ranking printed."""
    train(make_cfg("experts=e4", "trainer.max_steps=9", "trainer.val_check_interval=9", name="lone"))
    result = run_cli(
        [
            "dashboard",
            str(sweep_dir / "0"),
            str(sweep_dir / "3"),
            str(tmp_path / "lone"),
            "-o",
            str(tmp_path / "compare.html"),
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    page = (tmp_path / "compare.html").read_text()
    assert_self_contained(page)
    assert "moe-lab comparison: 3 runs" in page and "Runs, best validation loss first" in page
    assert os.path.relpath(sweep_dir / "0" / "dashboard.html", tmp_path) in page  # each run's own page, linked
    table = result.stdout.splitlines()
    assert table[0].split()[:3] == ["#", "run", "val/loss"] and [line.split()[0] for line in table[1:4]] == [
        "1",
        "2",
        "3",
    ]
    assert table[4] == f"moe-lab: wrote {tmp_path / 'compare.html'}"
    # A sweep directory counts as all its runs, each once; the default output is in the current directory.
    again = run_cli(["dashboard", str(sweep_dir), str(sweep_dir / "0"), str(tmp_path / "lone")], cwd=tmp_path)
    assert again.returncode == 0 and (tmp_path / "moe-lab-comparison.html").is_file(), again.stderr[-2000:]
    assert len([line for line in again.stdout.splitlines() if line[:1].isdigit()]) == 5
    missing = run_cli(["dashboard", str(sweep_dir / "0"), str(tmp_path / "nope")], cwd=tmp_path)
    assert missing.returncode == 2 and "no such directory" in missing.stderr


def test_a_job_folders_name_never_becomes_a_link_with_a_scheme(sweep_dir, tmp_path):
    """A job folder named `javascript:alert(document.domain)` in a sweep someone hands you: the sweep page links its
    run page by a relative path whose parts are percent-encoded, so a click opens a file and never runs a script."""
    import html
    import shutil

    sweep = tmp_path / "sweep"
    shutil.copytree(sweep_dir, sweep)
    hostile = "javascript:alert(document.domain)"
    (sweep / "1").rename(sweep / hostile)
    write_dashboard(sweep, sweep / "dashboard.html")
    page = (sweep / "dashboard.html").read_text()
    links = [html.unescape(h) for h in re.findall(r"<td><a href=\"([^\"]*)\">open</a>", page)]
    assert len(links) == 4 and all(link.startswith(("./", "../")) and ":" not in link for link in links), links
    assert "./javascript%3Aalert%28document.domain%29/dashboard.html" in links


def test_a_date_folder_is_not_taken_for_a_sweep(tmp_path, capsys):
    """`moe-lab dashboard outputs/DATE` (the folder of a day's runs) says what it is and how to look at its runs, and
    writes nothing into it."""
    from moe_lab.cli.main import main

    day = tmp_path / "2026-12-06"
    for time in ("07-01-25", "07-02-00"):
        (day / time).mkdir(parents=True)
        (day / time / "metrics.csv").write_text("step,train/loss\n1,5.0\n")
    assert main(["dashboard", str(day)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("moe-lab: error:"), err
    assert "not a sweep" in err[0] and "2 separate runs" in err[0] and f"{day}/* -o compare.html" in err[0]
    assert sorted(p.name for p in day.iterdir()) == ["07-01-25", "07-02-00"]
