"""`python -m automask ...`: the `automask` command line, for when the console script is not on PATH."""

from automask.cli import main

if __name__ == "__main__":
    main(prog_name="automask")
