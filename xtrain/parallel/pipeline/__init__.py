"""Pipeline parallelism: schedules as data.

- ``schedules.py``: per-rank action lists (GPipe, 1F1B, interleaved 1F1B),
  the one pass that adds sends and receives, the registry and config rules;
- ``validate.py``: rejects a list that would skip work or deadlock;
- ``simulator.py``: per-action costs -> timeline, bubble, activations held;
- ``executor.py``: runs any list over point-to-point communication (torch).

The first three are pure Python (no torch) and are re-exported here; the
executor is imported from its own module.
"""

from xtrain.parallel.pipeline.schedules import (
    CHUNKED_SCHEDULES,
    SCHEDULES,
    Action,
    Schedule,
    add_communication,
    build_schedule,
    check_schedule_config,
    format_schedule,
    from_compute,
    gpipe,
    interleaved_1f1b,
    one_f_one_b,
    parse_actions,
)
from xtrain.parallel.pipeline.simulator import Costs, Interval, Timeline, simulate, timeline_from_json, timeline_to_json
from xtrain.parallel.pipeline.validate import ScheduleError, find_problems, validate

__all__ = [
    "CHUNKED_SCHEDULES",
    "SCHEDULES",
    "Action",
    "Costs",
    "Interval",
    "Schedule",
    "ScheduleError",
    "Timeline",
    "add_communication",
    "build_schedule",
    "check_schedule_config",
    "find_problems",
    "format_schedule",
    "from_compute",
    "gpipe",
    "interleaved_1f1b",
    "one_f_one_b",
    "parse_actions",
    "simulate",
    "timeline_from_json",
    "timeline_to_json",
    "validate",
]
