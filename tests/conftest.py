"""Session-wide test settings: no Ray usage stats, one render cache shared by every test."""
import os

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Every Ray cluster of the tests lives on 127.0.0.1. `sweeps.cli.connect` says so to Ray only when
# Ray is not imported yet, and a test module may import Ray before the session cluster starts.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


@pytest.fixture(scope="session", autouse=True)
def _shared_render_cache(tmp_path_factory):
    """Rendered datasets are cached once per test session, not per test, and never in ~/.cache."""
    path = tmp_path_factory.mktemp("amtl-cache")
    old = os.environ.get("AMTL_CACHE_DIR")
    os.environ["AMTL_CACHE_DIR"] = str(path)
    yield path
    if old is None:
        os.environ.pop("AMTL_CACHE_DIR", None)
    else:
        os.environ["AMTL_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster (127.0.0.1 only, token auth on) for the whole test session."""
    import ray

    from sweeps.cli import connect

    connect(None)
    yield ray
    ray.shutdown()
