"""The one way the project puts an error into words: one line, as every script prints it
(`error: <one line>`) and as messages quote the errors they wrap."""


def one_line(error, limit=None):
    """An error's message on one line, cut to `limit` characters when given.

    Two kinds of message are reduced to the line that says what is wrong: an exception raised in a
    DataLoader worker, raised again in the main process with the worker's whole traceback as its
    message ("Caught DataError in DataLoader worker process 0. Original Traceback ...", whose last
    line "module.DataError: <message>" holds the message), and torch.load's refusal under
    weights_only (its "WeightsUnpickler error:" line, without the advice to load unsafely).
    """
    lines = [" ".join(line.split()) for line in str(error).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Caught ") and "DataLoader worker" in lines[0]:
        text = lines[-1].split(": ", 1)[-1]
    elif unpickler := [line for line in lines if line.startswith("WeightsUnpickler error:")]:
        text = unpickler[0].removeprefix("WeightsUnpickler error:").split(". Please use")[0].strip()
    else:
        text = " ".join(lines) or type(error).__name__
    return text if limit is None or len(text) <= limit else text[: limit - 3] + "..."
