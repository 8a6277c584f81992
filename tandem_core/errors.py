"""The two kinds of error a Tandem command reports in one line, without a traceback (the
commands' `--debug` shows it): the user's input, and the run's surroundings failing; and the
exit status of each."""

EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
"""What a shell reports for a process ended by Ctrl-C (128 + SIGINT)."""


class InputError(ValueError):
    """Bad input from the user (config, data, model directory, checkpoints): the message names
    the key, file, row or checkpoint. The commands exit with status 2."""


class RunFailure(RuntimeError):
    """Something the run needs failed outside its code (a full or read-only disk while
    saving): the message names the path and the cause. The commands exit with status 1."""
