"""bench.load_table's arithmetic: load levels, batch sizes from a /metrics page, the table's ratios."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import HistogramMetricFamily

from bench.load_table import LoadRow, batch_totals, levels, to_markdown


def _metrics_page(series: dict[str, tuple[float, float]]) -> str:
    """A /metrics page as the server writes it: tandem:batch_size per role, (sum, count)."""

    class Collector:
        def collect(self):
            family = HistogramMetricFamily("tandem:batch_size", "batch", labels=["model_name", "role"])
            for role, (total, count) in series.items():
                family.add_metric(["m", role], [("1.0", count / 2), ("+Inf", count)], sum_value=total)
            yield family

    registry = CollectorRegistry()
    registry.register(Collector())
    return generate_latest(registry).decode()


def test_levels_give_each_client_its_requests_with_a_floor():
    assert [(lv.clients, lv.requests) for lv in levels([1, 4, 16], 4, 8)] == [(1, 8), (4, 16), (16, 64)]


def test_batch_totals_read_the_verify_role_only():
    # catches summing the draft's passes into the target's batch size, or reading buckets as the count
    page = _metrics_page({"verify": (30.0, 12.0), "draft": (99.0, 50.0)})
    assert batch_totals(page) == (30.0, 12.0)
    assert batch_totals(page, role="draft") == (99.0, 50.0)
    assert batch_totals("") == (0.0, 0.0)


def _row(label: str, clients: int, tokens_per_s: float, peer: bool = False, batch: float | None = None) -> LoadRow:
    spread = {"p50": 0.5, "p99": 1.5}
    summary = {"output_tokens_per_s": tokens_per_s, "ttft_s": spread, "itl_s": spread, "failed": 0}
    return LoadRow(label, peer, clients, summary, batch)


def test_the_table_scales_each_row_by_its_own_solo_figure_and_the_best_peer_at_the_same_load():
    # catches a ratio taken against another row's solo figure or against a peer at another client count
    rows = [_row("ar", 1, 10.0, batch=1.0), _row("ar", 8, 45.0, batch=6.25),
            _row("p1", 1, 20.0, peer=True), _row("p1", 8, 30.0, peer=True), _row("p2", 8, 50.0, peer=True)]
    table = to_markdown(rows, {"config": "c"})
    assert "| ar | tandem | 1 | 10.0 | 1.00x | 0.50x | 500 / 1500 | 500 / 1500 | 1.00 | 0 |" in table
    assert "| ar | tandem | 8 | 45.0 | 4.50x | 0.90x | 500 / 1500 | 500 / 1500 | 6.25 | 0 |" in table
    assert "| p2 | peer | 8 | 50.0 | - | 1.00x |" in table  # no 1-client figure of its own
    assert "- config: c" in table
