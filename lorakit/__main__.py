"""The `lorakit` command's entry point (also `python -m lorakit`): imports the CLI, then runs it. Importing takes a
moment (typer, rich); a Ctrl-C during it ends with the CLI's own exit code and message, not a traceback."""

from __future__ import annotations

import sys


def main() -> int:
    try:
        from lorakit.cli import main as cli_main
    except KeyboardInterrupt:
        sys.stderr.write("lorakit: interrupted\n")
        return 130
    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
