"""Runs first in every worker process of a local Ray instance (`worker_process_setup_hook`).

Kept free of heavy imports: every Ray worker, the torch-free decoding tasks included, runs it.
"""

from __future__ import annotations

import logging

# Ray Train V2's detached PlacementGroupCleaner asks the state API whether the controller is
# alive once a second; the state API lives in the dashboard, which a local instance does not
# start, so each check logs "Failed to query Ray Train Controller actor state" to the driver's
# console (~1 line/s for a whole run). With no dashboard, the check cannot succeed, so it has
# nothing to say: the driver process owns the local instance and its placement groups go with it.
QUIET_LOGGERS = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",)


def quiet_worker_logs() -> None:
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
