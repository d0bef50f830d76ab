"""The Prometheus text format (0.0.4) our own metrics module writes, read back by its strict parser;
and the parser refusing what Prometheus would refuse."""

from __future__ import annotations

import math

import pytest

from helix_p2p.metrics import MetricsError, Registry, parse_exposition


def test_counters_gauges_and_histograms_round_trip():
    r = Registry()
    requests = r.counter("app_requests_total", "Requests by kind.", ["kind"])
    up = r.gauge("app_up", "Is it up.")
    in_use = r.gauge("app_kv_used", "Read at render time.")
    latency = r.histogram("app_step_seconds", "Step latency.", buckets=(0.1, 1.0, 10.0))
    requests.labels(kind="busy").inc()
    requests.labels(kind="busy").inc(2)
    requests.labels(kind='we"ird\\name\n').inc()
    up.set(1)
    used = [7]
    in_use.set_function(lambda: used[0])
    for value in (0.05, 0.1, 0.5, 3.0, 50.0):
        latency.observe(value)
    used[0] = 9

    text = r.render()
    parsed = parse_exposition(text)
    assert parsed.types == {
        "app_requests_total": "counter", "app_up": "gauge", "app_kv_used": "gauge", "app_step_seconds": "histogram",
    }  # fmt: skip
    assert parsed.helps["app_requests_total"] == "Requests by kind."
    assert parsed.value("app_requests_total", kind="busy") == 3
    assert parsed.value("app_requests_total", kind='we"ird\\name\n') == 1
    assert parsed.value("app_up") == 1 and parsed.value("app_kv_used") == 9
    # cumulative buckets: <= 0.1 holds 0.05 and 0.1 (bounds are inclusive)
    buckets = [parsed.value("app_step_seconds_bucket", le=le) for le in ("0.1", "1.0", "10.0", "+Inf")]
    assert buckets == [2, 3, 4, 5]
    assert parsed.value("app_step_seconds_count") == 5
    assert math.isclose(parsed.value("app_step_seconds_sum"), 53.65)
    assert text.endswith("\n") and "# TYPE app_step_seconds histogram" in text


def test_unlabelled_metrics_are_written_before_any_update():
    r = Registry()
    r.counter("app_tokens_total", "Tokens.")
    r.histogram("app_wait_seconds", "Waits.")
    parsed = parse_exposition(r.render())
    assert parsed.value("app_tokens_total") == 0
    assert parsed.value("app_wait_seconds_bucket", le="+Inf") == 0
    assert parsed.value("app_wait_seconds_count") == 0


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda r: r.counter("app_requests", "no _total"), "end in _total"),
        (lambda r: r.gauge("bad-name", "x"), "bad metric name"),
        (lambda r: r.gauge("app_x", "x", ["le"]), "bad label name"),
        (lambda r: r.histogram("app_h", "x", buckets=(1.0, 0.5)), "increasing"),
        (lambda r: r.counter("app_c_total", "x").inc(-1), "only goes up"),
        (lambda r: r.counter("app_c_total", "x", ["kind"]).inc(), "use .labels"),
        (lambda r: r.counter("app_c_total", "x", ["kind"]).labels(other="a"), "takes labels"),
        (lambda r: [r.gauge("app_g", "x"), r.gauge("app_g", "x")], "registered twice"),
    ],
)
def test_bad_definitions_and_updates_are_named(make, message):
    with pytest.raises(MetricsError, match=message):
        make(Registry())


@pytest.mark.parametrize(
    "text, message",
    [
        ("app_x 1\n", "before a TYPE line"),
        ("# TYPE app_x gauge\napp_x{a=b} 1\n", "bad labels"),
        ("# TYPE app_x gauge\napp_x one\n", "bad value"),
        ("# TYPE app_x gauge\n# TYPE app_x gauge\n", "second TYPE"),
        ("# TYPE app_x sometype\n", "bad TYPE"),
        (
            '# TYPE app_h histogram\napp_h_bucket{le="1.0"} 3\napp_h_bucket{le="+Inf"} 2\napp_h_count 2\n',
            "cumulative",
        ),
        ('# TYPE app_h histogram\napp_h_bucket{le="1.0"} 3\napp_h_count 3\n', r"\+Inf"),
        ('# TYPE app_h histogram\napp_h_bucket{le="+Inf"} 3\napp_h_count 4\n', "must equal _count"),
    ],
)
def test_the_parser_refuses_malformed_text(text, message):
    with pytest.raises(MetricsError, match=message):
        parse_exposition(text)
