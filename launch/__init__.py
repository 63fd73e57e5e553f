"""Entry points. Importing this package is the first thing ``python -m launch.X`` does after the
interpreter's own start: the time is kept as the command's start where the process is older than
the interpreter (a shell that ran other commands, then exec'd Python; see orchestrator.clock)."""
import time

STARTED = time.time()
