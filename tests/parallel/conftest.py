"""Parallel-replica test fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray (2 CPUs) for this module only, shut down after it: these tests run before the rest
    of the suite, and a second idle cluster would slow `ray start --head` in test_job_submit. Reuses
    the session's cluster when one is already up."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
