"""One refusal report per gunicorn master: which worker exits when every worker refuses the same model.

Light on purpose: gunicorn_conf imports it into the master, which must not load numpy or onnxruntime.
"""

from __future__ import annotations

import os

# Set by the gunicorn master (gunicorn_conf.on_starting): the read end of a pipe holding one byte.
from modelapp_serving.config import REFUSAL_TOKEN_FD_ENV

__all__ = ["REFUSAL_TOKEN_FD_ENV", "create_refusal_token", "take_refusal_token"]


def create_refusal_token() -> int:
    """In the master, before forking: one byte in a pipe that the workers inherit. The first worker to refuse
    takes it and exits; the others see the pipe empty and wait for the master's SIGTERM. Two workers exiting
    with gunicorn's App-failed-to-load code at once make its halt raise again and the master exit 1."""
    read_end, write_end = os.pipe()
    os.write(write_end, b"1")
    os.close(write_end)
    os.set_blocking(read_end, False)
    return read_end


def take_refusal_token() -> bool:
    """True unless another worker of this master has already taken it (then that one exits for all)."""
    token_fd = os.environ.get(REFUSAL_TOKEN_FD_ENV, "")
    if not token_fd.isdigit():
        return True  # not under our gunicorn master: this process is the only one
    try:
        return os.read(int(token_fd), 1) == b"1"
    except BlockingIOError:
        return False
    except OSError:
        return True
