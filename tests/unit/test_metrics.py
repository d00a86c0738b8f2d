"""observe_many() must expose exactly what one observe() per value would have exposed."""

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from kaireon_pub.metrics import observe_many

BUCKETS = (0.005, 0.01, 0.1, 1, 10)
# On a bound, between bounds, below the first, above the last finite one, zero, repeated.
VALUES = [0.005, 0.0051, 0.001, 0.1, 0.5, 1.0, 9.99, 10.0, 42.0, 0.0, 0.5, 0.5]


def exposition(feed) -> str:
    registry = CollectorRegistry()
    histogram = Histogram("age_seconds", "test", buckets=BUCKETS, registry=registry)
    feed(histogram)
    text = generate_latest(registry).decode()
    # The creation timestamp differs between any two histograms; everything else must not.
    return "\n".join(line for line in text.splitlines() if not line.startswith("age_seconds_created"))


def test_observe_many_equals_one_observe_per_value():
    def one_by_one(h):
        for v in VALUES:
            h.observe(v)

    batched = exposition(lambda h: observe_many(h, VALUES))
    assert batched == exposition(one_by_one)
    assert 'age_seconds_bucket{le="0.005"} 3.0' in batched
    assert 'age_seconds_bucket{le="+Inf"} 12.0' in batched


def test_observe_many_of_nothing_changes_nothing():
    assert exposition(lambda h: observe_many(h, [])) == exposition(lambda h: None)
