"""Leaving a distributed script with its exit status: `exit_cleanly`.

With torch 2.13, a process that used a gloo process group can abort as Python shuts down, after all of its
work: the group's worker threads outlive ``torch.distributed.destroy_process_group()``, and one that frees a
finished collective's tensors while the interpreter tears itself down ends the process with ``terminate called
without an active exception`` (SIGABRT). Under ``torchrun`` that one rank's abort makes the whole job fail
(``ChildFailedError``, exit status 1): seen in about 1 run in 8 of a small DDP script on 2 CPU processes of a
2-core machine; it is a race, and its odds depend on the machine and its load.

`exit_cleanly` ends the process without that teardown. distclip's examples, ``distclip demo`` and the launch
scripts end with it::

    from distclip.shutdown import exit_cleanly

    ...  # the training script
    exit_cleanly()  # the last line, on every rank
"""

import logging
import os
import sys
import traceback
from typing import NoReturn

import torch.distributed as dist

__all__ = ["exit_cleanly"]


def exit_cleanly(status: int = 0) -> NoReturn:
    """Destroy the default process group (if one is initialised), flush the output and end the process now,
    with exit status ``status``.

    Call it last, on every rank, once everything the script writes is written: it flushes ``sys.stdout``,
    ``sys.stderr`` and the `logging` handlers, then leaves with `os._exit`, which skips the rest of Python's
    shutdown (``atexit`` handlers, object finalizers, buffered files other than those), where torch 2.13's gloo
    threads can abort the process after its work is done. Nothing is waited for: ranks that are still
    communicating with this one see it gone, as they would at any exit.

    Args:
        status: the process's exit status, 0 for success (an int in ``[0, 255]``, as `sys.exit` takes).
    """
    status = int(status)
    try:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # reported, and the process still ends, unsuccessfully
        traceback.print_exc()
        status = status or 1
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):  # closed, or a broken pipe: nothing more can be written to it
            pass
    os._exit(status)
