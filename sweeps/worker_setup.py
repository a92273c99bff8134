"""Set-up run in every Ray worker process of a sweep (Ray's ``worker_process_setup_hook``).

Kept free of heavy imports: it runs at the start of every worker, before any task.
"""
from __future__ import annotations

import os

#: Where Ray's ``"auto"`` address resolution looks first (``ray._private.services``).
RAY_ADDRESS_ENV = "RAY_ADDRESS"


def bind_to_own_cluster() -> None:
    """Make ``"auto"`` in this worker mean the cluster it belongs to.

    Ray Train V2's detached ``PlacementGroupCleaner`` (and other Ray internals) query the state API
    with the address ``"auto"``, which scans the machine for GCS processes and fails with
    ``Found multiple active Ray instances`` when another sweep's cluster runs on the same machine.
    The cleaner's monitor thread then dies, a stopped trial's placement group is never removed and
    the next trials wait for its CPUs forever. ``RAY_ADDRESS`` is what that resolution reads first.
    """
    import ray

    os.environ[RAY_ADDRESS_ENV] = ray.get_runtime_context().gcs_address


#: The import path Ray is given (a path, not a function: nothing to pickle into the GCS).
HOOK = f"{__name__}.{bind_to_own_cluster.__name__}"
