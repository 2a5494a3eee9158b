"""Mounts `hfcompress` under `optimum-cli` (optimum imports every module of this namespace package and reads
its REGISTER_COMMANDS). Kept light: the parser imports no torch, the real work is imported when a command runs."""

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo

from hfcompress.commands.cli import command_names


class HfcompressCommand(BaseOptimumCLICommand):
    COMMAND = CommandInfo(
        name="hfcompress",
        help=f"Compress models with hfcompress ({', '.join(command_names())}).",
    )

    @staticmethod
    def parse_args(parser):
        from hfcompress.commands.cli import add_commands

        add_commands(parser)

    def run(self):
        import sys

        from hfcompress.commands.cli import run

        code = run(self.args, prog="optimum-cli hfcompress")
        if code:
            sys.exit(code)


REGISTER_COMMANDS = [HfcompressCommand]
