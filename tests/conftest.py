"""Shared fixtures: the demo region (generated once per session), real data from ../shared/data/real, and
the pgstac STAC API (tests/pgstac_fixture.py, started once per session when a test asks for it)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.demo import DemoConfig, generate
from pipeline.ingest import LOCAL_RAY_SYSTEM_CONFIG

pytest_plugins = ["tests.pgstac_fixture", "tests.s3_server", "tests.browser"]

REPO = Path(__file__).resolve().parents[1]
REAL_DATA = Path(os.environ.get("SKYSENSE_REAL_DATA", REPO.parent / "shared" / "data" / "real"))

# Small enough to generate in a few seconds, big enough for every feature (river, town, flood, swath edges).
TEST_DEMO = DemoConfig(size_km=2.0, seed=0, hr_ratio=8)


@pytest.fixture(scope="session")
def ray_local():
    """An isolated local Ray cluster for the session (never attaches to another cluster on the machine)."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR",
             _system_config=LOCAL_RAY_SYSTEM_CONFIG)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def real_data() -> Path:
    if not (REAL_DATA / "README.md").exists():
        pytest.skip(f"real third-party test data not found at {REAL_DATA}: these tests need ../shared/data/real "
                    f"beside the clone (or SKYSENSE_REAL_DATA pointing at a copy)")
    return REAL_DATA


@pytest.fixture(scope="session")
def demo_region(tmp_path_factory) -> tuple[Path, DemoConfig]:
    """(catalog.json path, config) of a demo region generated for this session."""
    out = tmp_path_factory.mktemp("demo-region")
    return generate(TEST_DEMO, out, progress=False), TEST_DEMO


@pytest.fixture(scope="module")
def torch_one_thread():
    """One intra-op torch thread for a module of tiny-tensor model tests: thread start-up costs more than it
    gains, and on a shared 2-core machine spinning OpenMP threads made such tests 10x slower. Restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

