"""What the command-line scripts share: user errors become one line, not a traceback."""

import sys


def run(main):
    """Calls main(); a user error (bad path, bad file, bad value) exits 2 with one line on stderr."""
    try:
        main()
    except (ValueError, OSError, FloatingPointError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
