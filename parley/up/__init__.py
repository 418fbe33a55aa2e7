"""`parley up`: run a distribution on this machine without Docker, from the same compose files.

Three rooms: `dockerfile` reads what an image would run, `plan` turns the merged compose files into
one process per service, `supervisor` starts, watches and stops those processes. The command
(parley.cli) prints; nothing here does. Tests run a distribution with `run_distribution`.
"""

from parley.up.plan import ServicePlan, UpError, check_memory, plan_distribution
from parley.up.supervisor import RunningDistribution, SupervisorOutput, run_distribution, run_services

__all__ = [
    "RunningDistribution", "ServicePlan", "SupervisorOutput", "UpError", "check_memory", "plan_distribution", "run_distribution",
    "run_services",
]
