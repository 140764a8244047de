from service.backoff import backoff_delay


def test_backoff_grows_is_capped_and_jittered():
    lo = [backoff_delay(n, base=1, cap=30, rand=lambda: 0.0) for n in range(8)]
    hi = [backoff_delay(n, base=1, cap=30, rand=lambda: 1.0) for n in range(8)]
    assert hi == [1, 2, 4, 8, 16, 30, 30, 30]
    assert lo == [h / 2 for h in hi]
    assert backoff_delay(10_000, cap=60) <= 60
