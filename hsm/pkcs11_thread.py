"""The process's single PKCS#11 thread, shared by every open key store.

python-pkcs11 calls C_Initialize(NULL), which tells the module the application is
single-threaded, so SoftHSM2 (and other modules) take no locks; two threads inside the module at
once crash the process. Every PKCS#11 call in the process therefore runs on the one worker
thread kept here. Parallelism comes from several processes, each with its own module handle and
session.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
from typing import Final

from hsm.errors import TokenAlreadyOpen

__all__ = ["PKCS11_THREAD", "Pkcs11Thread"]


class Pkcs11Thread:
    """The single-worker executor every PKCS#11 call of the process runs on.

    This is process-wide state on purpose: the constraint it enforces (one thread inside the
    module) is process-wide. The thread starts with the first open store and stops with the last.
    It also keeps the (module, token) pairs that are open, since login belongs to the process.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._thread_id: int | None = None
        self._open_tokens: set[tuple[str, str]] = set()

    def _record_thread(self) -> None:
        self._thread_id = threading.get_ident()

    def acquire(self, module_path: str, token_label: str) -> concurrent.futures.ThreadPoolExecutor:
        """Reserve (module, token) for a new store and return the running executor."""
        key = (os.path.realpath(module_path), token_label)
        with self._lock:
            if key in self._open_tokens:
                raise TokenAlreadyOpen(
                    f"token {token_label!r} is already open in this process; "
                    "share the open key store instead of opening it twice"
                )
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix="pkcs11", initializer=self._record_thread
                )
            self._open_tokens.add(key)
            return self._executor

    def release(self, module_path: str, token_label: str) -> None:
        """Give back (module, token); stop the thread when no store is open any more."""
        key = (os.path.realpath(module_path), token_label)
        with self._lock:
            self._open_tokens.discard(key)
            if self._open_tokens or self._executor is None:
                return
            executor, self._executor = self._executor, None
            on_thread = self.on_thread()
            self._thread_id = None
        # Waiting for ourselves would deadlock; the thread then ends after this task returns.
        executor.shutdown(wait=not on_thread)

    def on_thread(self) -> bool:
        """True when the caller is the PKCS#11 thread itself."""
        return self._thread_id is not None and threading.get_ident() == self._thread_id

    def reset_after_fork(self) -> None:
        # A forked child inherits this object but not the thread: start afresh instead of
        # queueing work that would never run.
        self._lock = threading.Lock()
        self._executor = None
        self._thread_id = None
        self._open_tokens = set()


PKCS11_THREAD: Final = Pkcs11Thread()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=PKCS11_THREAD.reset_after_fork)
