"""Run by tests/quantization/test_distributed.py, alone or under a launcher: every command of a plan (argv[1], a JSON
list of {"name", "argv"}) one after the other in this process, through `hfcompress.commands.cli.main` as a user's
script would call it, so that one launch stands for one launch per command. Under a launcher the script sets up the
process group itself and it stays up between the commands. Into the folder argv[2] each process writes, per command,
its stderr (Python's and the C++ side's) as `NAME.rankR.stderr`, and the statuses so far as `statuses.rankR.json`.
The first command that fails ends the run: its peers then see this process leave instead of waiting for it."""

import json
import os
import sys
import traceback
from pathlib import Path

import torch.distributed as dist

from hfcompress.commands.cli import main
from hfcompress.core.distributed import init_from_environment, rank


def run(argv: list[str], stderr: Path) -> int:
    """`hfcompress argv`, this process's file descriptor 2 written to `stderr` meanwhile."""
    sys.stderr.flush()
    saved = os.dup(2)
    with stderr.open("w") as file:
        os.dup2(file.fileno(), 2)
        try:
            return main(argv)
        except (Exception, SystemExit):  # what the command did not turn into a message: the test shows it
            traceback.print_exc()
            return 1
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


if __name__ == "__main__":
    plan, folder = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
    init_from_environment()
    statuses = []
    for command in plan:
        status = run(command["argv"], folder / f"{command['name']}.rank{rank()}.stderr")
        statuses.append({"name": command["name"], "status": status, "group_up": dist.is_initialized()})
        (folder / f"statuses.rank{rank()}.json").write_text(json.dumps(statuses))
        if status != 0:
            sys.exit(status)
    if dist.is_initialized():
        dist.destroy_process_group()
