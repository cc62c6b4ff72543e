"""``python -m worker.sandbox --port 8700``: the sandbox without the accumsync CLI."""

import typer

from worker.sandbox.cli import sandbox

if __name__ == "__main__":
    typer.run(sandbox)
