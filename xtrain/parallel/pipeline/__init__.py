"""Pipeline parallelism: schedules as data.

- ``schedules.py``: per-rank action lists (GPipe, 1F1B, interleaved 1F1B,
  ZB-H1, DualPipe, DualPipeV), the one pass that adds sends and receives,
  the registry and config rules;
- ``validate.py``: rejects a list that would skip work or deadlock;
- ``simulator.py``: per-action costs -> timeline, bubble, activation memory;
- ``draw.py``: timelines as pictures (matplotlib, imported when drawing);
- ``executor.py``: runs any list over point-to-point communication (torch).

The first three are pure Python (no torch) and are re-exported here; the
drawing and the executor are imported from their own modules.
"""

from xtrain.parallel.pipeline.schedules import (
    CHUNKED_SCHEDULES,
    SCHEDULES,
    SPLIT_BACKWARD_SCHEDULES,
    TWO_STAGE_SCHEDULES,
    Action,
    Schedule,
    add_communication,
    build_schedule,
    check_schedule_config,
    dualpipe,
    dualpipev,
    format_schedule,
    from_compute,
    gpipe,
    interleaved_1f1b,
    n_layer_blocks,
    one_f_one_b,
    parse_actions,
    receives_in_send_order,
    schedule_layout,
    zb1p,
)
from xtrain.parallel.pipeline.simulator import Costs, Interval, Timeline, simulate, timeline_from_json, timeline_to_json
from xtrain.parallel.pipeline.validate import ScheduleError, find_problems, validate

__all__ = [
    "CHUNKED_SCHEDULES",
    "SCHEDULES",
    "SPLIT_BACKWARD_SCHEDULES",
    "TWO_STAGE_SCHEDULES",
    "Action",
    "Costs",
    "Interval",
    "Schedule",
    "ScheduleError",
    "Timeline",
    "add_communication",
    "build_schedule",
    "check_schedule_config",
    "dualpipe",
    "dualpipev",
    "find_problems",
    "format_schedule",
    "from_compute",
    "gpipe",
    "interleaved_1f1b",
    "n_layer_blocks",
    "one_f_one_b",
    "parse_actions",
    "receives_in_send_order",
    "schedule_layout",
    "simulate",
    "timeline_from_json",
    "timeline_to_json",
    "validate",
    "zb1p",
]
