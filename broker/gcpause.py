"""Keep the garbage collector's full collections off the audio path.

CPython's cyclic collector, every so often, walks every container object the process holds
(its "generation 2"). A process of this project holds tens of thousands of them once it has
started: the modules, pydantic's models, a voice's phonemizer tables. Measured during a minute
of passages and short lines through ``serve`` (2 cores), one such walk came every minute or so in
each of the worker and the broker, and each one took 29-36 ms: a stall of every stream the
process was relaying or synthesising at that moment, as long as a short line's whole first
audio. What a process builds at start-up lives as long as the process, so there is nothing for
those walks to find in it.

Every long-lived process here (worker, broker, ``serve``, the gateways) therefore freezes what
it holds once it is ready (:func:`gc.freeze`): later collections walk only what was made since,
and garbage made while serving is collected as before.
"""

from __future__ import annotations

import gc
import logging

log = logging.getLogger("broker.gcpause")


def freeze_startup_objects() -> None:
    """Collect start-up's garbage once, then exempt every object still alive from later
    collections. Call when the process is ready to serve; calling it again later freezes what
    has been made since (harmless, but what is frozen is never freed if it becomes cyclic
    garbage)."""
    gc.collect()
    gc.freeze()
    log.debug("garbage collector: %d start-up objects frozen", gc.get_freeze_count())
