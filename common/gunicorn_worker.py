"""gunicorn's threaded worker, made to drain: on SIGTERM it finishes its requests before it stops.

gunicorn's own stop (its master closes the listening socket, the worker stops accepting and waits
for its connections) leaves a gap: the worker still holds the socket, so a connection that arrives
meanwhile waits in the kernel's backlog, unanswered, until the worker exits and resets it; a
caller may wait the whole grace period for nothing. This worker instead keeps serving: on SIGTERM
it tells the app's `Drain` (common/draining.py) to refuse new work with a 503, which a caller
(the prompted skill) posts again to another replica at once, and /health turns 503; once the
requests in progress are answered it stops as gunicorn's worker does. It waits at most until
shortly before gunicorn's `graceful_timeout` (GUNICORN_GRACEFUL_TIMEOUT), when the master kills it.
An app without a Drain stops at once, as with gunicorn's own worker; SIGINT and SIGQUIT stop it
at once in any case.
"""

from __future__ import annotations

import threading

from gunicorn.workers.gthread import ThreadWorker

from common.draining import drain_of

# Seconds kept back from graceful_timeout for the worker's own stop after the drain.
STOP_MARGIN_SECONDS = 1.0


class DrainingThreadWorker(ThreadWorker):
    def handle_exit(self, sig, frame) -> None:
        drain = drain_of(getattr(self, "wsgi", None))
        if drain is None or not self.alive:
            super().handle_exit(sig, frame)
            return
        if drain.draining:
            return  # a second SIGTERM (the master's, after a group's): the drain already runs
        drain.begin()
        self.log.info("draining: %d request(s) in progress; new ones get 503", drain.ongoing)
        waiting = max(self.cfg.graceful_timeout - STOP_MARGIN_SECONDS, 0.0)

        def stop_when_idle() -> None:
            if drain.wait_idle(waiting):
                self.log.info("drained: every request answered; stopping")
            else:
                self.log.warning("%d request(s) still in progress after %.0fs (GUNICORN_GRACEFUL_TIMEOUT): stopping", drain.ongoing, waiting)
            super(DrainingThreadWorker, self).handle_exit(sig, frame)

        threading.Thread(target=stop_when_idle, name="drain", daemon=True).start()
