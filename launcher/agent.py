"""The per-node process between the kiln launcher and the workers: `accelerate launch` (torch's
elastic agent), with a stop signal treated as an ordinary way for a run to end.

On SIGTERM/SIGUSR1/SIGINT torch's agent forwards the signal to the workers, waits for them
(``PET_SHUTDOWN_TIMEOUT``, set from checkpoint.grace) and then raises ``SignalException``:
a traceback and exit status 1, after warnings ("Received SIGUSR1 death signal", "Sending
process N closing signal") that make a preemption which saved its checkpoint read like a
crash, and make srun cancel the other nodes' tasks. Here that exception ends the process with
128 + the signal's number and no traceback; the kiln launcher then reads the workers' own
reports to tell a clean stop from a failure (``launcher.cli.ended_cleanly``).
"""

from __future__ import annotations

import logging
import os
import sys

from launcher import console
from launcher.signals import follow_parent


def main(argv: list[str]) -> int:
    follow_parent()  # the kiln launcher died: SIGTERM, which stops the workers as usual
    if os.environ.get(console.VERBOSE_ENV) != "1":
        for name in console.QUIET_AGENT_MESSAGES:
            logging.getLogger(name).addFilter(console.drop_agent_messages)
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.api import SignalException

    args = launch_command_parser().parse_args(argv)
    try:
        launch_command(args)
    except SignalException as exc:
        return 128 + int(exc.sigval)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
