"""What a script does before its slow imports (torch takes seconds to load): a Ctrl-C then exits
130 with one line instead of a traceback. `cli.run` puts Python's own handler back once the
script's main starts."""

import signal
import sys


def stop_quietly(signum, frame):
    sys.stderr.write("interrupted while starting\n")
    sys.exit(130)


def quiet_ctrl_c_while_starting():
    signal.signal(signal.SIGINT, stop_quietly)
