"""engine.cluster on a real local Ray cluster (ray.init(num_cpus=2), one per module, nothing mocked): the
cluster report equals the single-process report in every domain; a worker killed mid-job changes nothing;
an interrupted cluster job resumes from its checkpoint; several sources in one CLI job; bad addresses."""
import json
import os
import signal
import socket
import threading
import time

import numpy as np
import pytest

import unspeakable.engine.pipeline as es
from unspeakable.engine.cli import main
from unspeakable.engine.cluster import Cluster, task_memory
from unspeakable.engine.ledger import Ledger
from unspeakable.engine.loader import load

ray = pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")  # a dependency of ray

LOCAL = {"device": "cpu", "backend": "torch"}


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield Cluster(screen_rows=128)
    finally:
        ray.shutdown()


def _same(a, b, resumed: bool = False):
    """Two reports agree on everything but the timings (JSON, per-token arrays, counts). ``resumed``: b was
    resumed from a checkpoint, whose bounds are re-derived one token at a time (issue 18): a bound may then
    differ in its last digits from what the batched check proved (both are proven)."""
    ja, jb = a.to_json(), b.to_json()
    for j in (ja, jb):
        j.pop("timings_s")
        j.pop("memory", None)  # the budget and the process's peak RSS
        for t in j["tokens"]:
            t.pop("time_s")
            if resumed:
                lo, hi = t.pop("margin_lower"), t.pop("margin_upper")
                t["bounds"] = (lo, hi)
    if resumed:
        for ta, tb in zip(ja["tokens"], jb["tokens"]):
            (la, ha), (lb, hb) = ta.pop("bounds"), tb.pop("bounds")
            for x, y in ((la, lb), (ha, hb)):
                assert (x is None) == (y is None)
                if x is not None:
                    assert abs(x - y) <= 1e-12 * max(1.0, abs(x)), (ta["id"], x, y)
    assert ja == jb
    assert np.array_equal(a.verdicts_all, b.verdicts_all)
    for x, y in ((a.margin_lower_all, b.margin_lower_all), (a.margin_upper_all, b.margin_upper_all)):
        assert np.allclose(x, y, rtol=1e-12, atol=0, equal_nan=True) if resumed else np.array_equal(x, y, equal_nan=True)
    assert np.array_equal(a.gram_argmax_all, b.gram_argmax_all)


CASES = [("synthetic:V=300,d=8,seed=1", "layernorm", True), ("synthetic:V=300,d=8,seed=2", "rmsnorm", True),
         ("synthetic:V=300,d=8,seed=3", "box", True), ("synthetic:V=300,d=8,seed=4", "cone", True),
         ("synthetic:V=300,d=8,seed=5", "box", False)]  # no bias in a box: the cone of the rows, "margin exactly 0"
BOX = CASES[2]


@pytest.fixture(scope="module")
def local_reports():
    """Single-process reports, each computed once for the module."""
    out = {}

    def get(case):
        if case not in out:
            src, domain, bias = case
            out[case] = es.scan_head(load(src), domain=domain, bias=bias, **LOCAL)
        return out[case]

    return get


@pytest.mark.parametrize("case", CASES, ids=[f"{c[1]}{'' if c[2] else '-nobias'}" for c in CASES])
def test_cluster_report_equals_single_process(cluster, local_reports, case):
    src, domain, bias = case
    remote = es.scan_head(load(src), domain=domain, bias=bias, cluster=cluster, **LOCAL)
    local = local_reports(case)
    _same(local, remote)
    assert remote.screen_stats["tasks"] == 3 and remote.screen_stats["blocks_redone"] == 0
    assert cluster.stats["open_tasks_failed"] == 0 and cluster.stats["tokens_handed_back"] == 0
    assert local.counts["speakable"] > 0 and local.counts["unspeakable"] > 0


def test_task_memory_is_stated_from_shapes():
    # the 262144 x 4096 sizing row of benchmarks/RESULTS.md: every task fits a 16 GiB worker
    for kind in ("screen", "search", "decide"):
        assert 2**30 < task_memory(kind, 262144, 4096, 4096 if kind == "screen" else 256) < 16 * 2**30
    assert task_memory("screen", 262144, 4096, 4096) == 12 * 262144 * 4096 + 24 * 4096 * 4096 + 4 * 4 * 1024 * 8192 \
        + 600 * 2**20


def _kill_running(tasks: tuple, killed: dict, stop: threading.Event) -> None:
    """SIGKILL, once per task name, a worker process of this test's own Ray (a descendant of this process)
    while it runs that task (Ray titles a busy worker ``ray::<task>``)."""
    me = psutil.Process()
    while not stop.is_set() and len(killed) < len(tasks):
        for p in me.children(recursive=True):
            try:
                title = " ".join(p.cmdline())
                task = next((t for t in tasks if t not in killed and title.startswith(f"ray::{t}")), None)
                if task is not None:
                    os.kill(p.pid, signal.SIGKILL)
                    killed[task] = p.pid
            except (psutil.Error, OSError):
                continue
        time.sleep(0.002)


def test_workers_killed_mid_job_change_nothing(cluster, local_reports):
    """Workers are SIGKILLed while they run a search task (and a screen task, when one is caught: they are
    short): Ray retries the tasks and the report is the single-process one."""
    killed, stop = {}, threading.Event()
    watcher = threading.Thread(target=_kill_running, args=(("search_task", "_screen_task"), killed, stop),
                               daemon=True)
    watcher.start()
    try:
        remote = es.scan_head(load(BOX[0]), domain="box", cluster=cluster, **LOCAL)
    finally:
        stop.set()
        watcher.join()
    assert "search_task" in killed, f"no search task was caught running (killed: {killed})"
    _same(local_reports(BOX), remote)
    assert cluster.stats["open_tasks_failed"] == 0  # Ray retried the lost tasks; nothing came back to the driver


def test_an_interrupted_cluster_job_resumes_from_its_checkpoint(cluster, local_reports, tmp_path, monkeypatch):
    head, ckpt = load(BOX[0]), str(tmp_path / "r.json.partial")
    real, calls = Ledger.record, {"n": 0}

    def record_then_die(self, reports, **k):
        real(self, reports, **k)
        if k.get("persist", True) and reports:
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt

    monkeypatch.setattr(Ledger, "record", record_then_die)
    with pytest.raises(KeyboardInterrupt):
        es.scan_head(head, domain="box", cluster=cluster, checkpoint=ckpt, **LOCAL)
    monkeypatch.setattr(Ledger, "record", real)
    with open(ckpt) as f:
        kept = len(f.read().splitlines()) - 1
    local = local_reports(BOX)
    assert 0 < kept < len(local.tokens)
    resumed = es.scan_head(head, domain="box", cluster=cluster, checkpoint=ckpt, resume=True, **LOCAL)
    _same(local, resumed, resumed=True)
    assert not os.path.exists(ckpt)


def test_cli_several_sources_one_job(cluster, local_reports, tmp_path, capsys):
    other = "synthetic:V=300,d=8,seed=6"
    lst = tmp_path / "models.txt"
    lst.write_text(f"# two heads\n{other}\n\n")
    out = tmp_path / "out"
    out.mkdir()
    assert main(["scan", BOX[0], f"@{lst}", "--domain", "box", "--device", "cpu", "--backend", "torch",
                 "--ray", "--max-in-flight", "3", "--out-dir", str(out)]) == 0
    table = capsys.readouterr().out
    names = ["synthetic_V_300_d_8_seed_3.json", "synthetic_V_300_d_8_seed_6.json"]
    assert sorted(os.listdir(out)) == sorted(names + ["summary.json"])
    summary = json.loads((out / "summary.json").read_text())
    assert [m["source"] for m in summary["models"]] == [BOX[0], other]
    first = json.loads((out / names[0]).read_text())
    local = local_reports(BOX)
    assert summary["models"][0]["unspeakable"] == first["counts"]["unspeakable"] == local.counts["unspeakable"]
    assert [(t["id"], t["verdict"]) for t in first["tokens"]] == [(t.id, t.verdict) for t in local.tokens]
    assert BOX[0] in table and other in table and "unspeak" in table
    # --resume: both models are reported already, so nothing is scanned again
    assert main(["scan", BOX[0], f"@{lst}", "--domain", "box", "--ray", "--out-dir", str(out), "--resume"]) == 0
    assert all(m["resumed"] for m in json.loads((out / "summary.json").read_text())["models"])


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("args,words", [
    (["--ray", "nohost.invalid:6379"], ["--ray nohost.invalid:6379", "cannot reach"]),
    (["--ray", "CLOSED"], ["cannot reach"]),
    (["--ray", "10.0.0.1"], ["HOST:PORT"]),
    (["--ray", "10.0.0.1:6379", "--ray-cpus", "2"], ["--ray-cpus", "local Ray"]),
    (["--max-in-flight", "2"], ["need --ray"]),
    (["@MISSING", "--ray"], ["cannot read the source list"]),
    (["synthetic:V=300,d=8,seed=6", "--ray"], ["--out", "--out-dir"]),
])
def test_cli_bad_cluster_input_exits_2_and_writes_nothing(cluster, tmp_path, capsys, args, words):
    args = [a.replace("CLOSED", f"127.0.0.1:{_closed_port()}").replace("MISSING", str(tmp_path / "none.txt"))
            for a in args]
    out = tmp_path / "r.json"
    assert main(["scan", BOX[0], *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words), err
    assert os.listdir(tmp_path) == []
