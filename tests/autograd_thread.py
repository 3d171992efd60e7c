"""Backward passes on a thread of their own, as CUDA runs them (DESIGN.md §5, "Autograd threads").

For CUDA tensors PyTorch's autograd engine runs the backward on a worker thread per device; on CPU it runs on the
calling thread. Gradient checkpointing recomputes the forward inside the backward, so state kept in a context
variable, a thread-local or a global set around the forward is missing from the recomputation on a GPU only.
:func:`backward_on_another_thread` makes CPU behave like CUDA here: every ``Tensor.backward``,
``torch.autograd.backward`` and ``torch.autograd.grad`` runs on a new ``threading.Thread``, which (unlike asyncio
tasks) starts with an empty ``contextvars`` context.
"""

from __future__ import annotations

import contextlib
import functools
import threading

import torch.autograd


def _on_a_new_thread(function):
    @functools.wraps(function)
    def run(*args, **kwargs):
        outcome: dict = {}

        def target():
            try:
                outcome["value"] = function(*args, **kwargs)
            except BaseException as err:  # raised again on the caller's thread
                outcome["error"] = err

        thread = threading.Thread(target=target, name="autograd-worker")
        thread.start()
        thread.join()
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]

    run.threads_backward = True
    return run


@contextlib.contextmanager
def backward_on_another_thread():
    """Run every backward started inside on a fresh thread (``Tensor.backward`` calls ``torch.autograd.backward``
    through the module attribute, so patching the module covers it, and Lightning's ``manual_backward`` too)."""
    saved = torch.autograd.backward, torch.autograd.grad
    torch.autograd.backward, torch.autograd.grad = map(_on_a_new_thread, saved)
    try:
        yield
    finally:
        torch.autograd.backward, torch.autograd.grad = saved
