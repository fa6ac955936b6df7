"""``python -m closedloop``: the ``closedloop`` command, for when the script is not on PATH."""

from closedloop.cli import main

if __name__ == "__main__":
    main(prog_name="closedloop")
