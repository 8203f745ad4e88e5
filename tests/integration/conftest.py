"""Fixtures: a herald process per test (or per module) on a temporary configuration.

    def test_x(herald): ...                       # the default configuration
    @pytest.mark.herald(limits={"ping_interval": 0.5}, publish_token="s3cret")
    def test_y(herald): ...                       # with overrides
    def test_z(herald_factory):
        a = herald_factory(limits={...})          # several brokers, or one started late

A module may set HERALD_CONFIG = {...} for its module-scoped `herald_module` broker.
`redis_server` is a redis-server of the test's own (redis_util.RedisServer), stopped afterwards.
On teardown each broker gets SIGTERM and must exit 0 within a bounded time with no sanitizer
report on its stderr.
"""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from herald_util import Herald, herald_bin  # noqa: E402
from redis_util import RedisServer  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "herald(**overrides): configuration overrides for `herald`")


@pytest.fixture(scope="session", autouse=True)
def _binary_exists():
    path = herald_bin()
    if not os.access(path, os.X_OK):
        pytest.exit("herald binary not found at %s (set HERALD_BIN or build it)" % path, returncode=2)


@pytest.fixture
def herald_factory(tmp_path):
    started = []

    def start(**overrides):
        h = Herald(tmp_path / ("srv%d" % len(started)), overrides)
        started.append(h)
        return h.start()

    yield start
    problems = []
    for h in started:
        try:
            h.check_clean_exit()
        except AssertionError as e:
            problems.append(str(e))
    assert not problems, "\n\n".join(problems)


@pytest.fixture
def herald(request, herald_factory):
    marker = request.node.get_closest_marker("herald")
    overrides = dict(marker.kwargs) if marker else {}
    return herald_factory(**overrides)


@pytest.fixture(scope="module")
def herald_module(request, tmp_path_factory):
    overrides = getattr(request.module, "HERALD_CONFIG", {})
    h = Herald(tmp_path_factory.mktemp("herald"), overrides)
    h.start()
    yield h
    h.check_clean_exit()


@pytest.fixture
def redis_server(tmp_path):
    r = RedisServer(tmp_path / "redis")
    r.start()
    yield r
    r.stop()
