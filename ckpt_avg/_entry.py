"""The console entry point, kept free of heavy imports so Ctrl-C during start-up is one line."""

from __future__ import annotations

import gc
import os
import sys
import threading


def entry() -> None:
    # numpy's OpenBLAS threads are never used here but spin for CPU time on start-up.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    gc.disable()  # importing torch makes a million objects: collecting them then is wasted time
    try:
        from .cli import entry as run
    except KeyboardInterrupt:
        sys.stderr.write("Error: interrupted; no output was written\n")
        sys.exit(130)
    gc.freeze()  # what the imports made lives to the end: later collections need not walk it
    gc.enable()
    try:
        run()
    except SystemExit as leaving:
        if threading.active_count() == 1 and not _joined_a_process_group():
            raise
        # A worker thread interrupted inside torch (Ctrl-C, SIGTERM, an error) may still be
        # winding down. Interpreter shutdown would end it with pthread_exit through C++
        # frames, which aborts the process ("terminate called without an active exception",
        # status -6); the output's temp file is already gone, so leave without a shutdown.
        # gloo's threads under torchrun do the same; every rank has settled by now.
        code = leaving.code
        if not isinstance(code, int):
            if code is not None:
                sys.stderr.write(f"{code}\n")
            code = 0 if code is None else 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _joined_a_process_group() -> bool:
    distributed = sys.modules.get("torch.distributed")
    return distributed is not None and distributed.is_available() and distributed.is_initialized()
