"""The daemon: a thin pump over three ports.

Every tick is the same short walk: take what happened since the last tick
from one inbox, ask the **observer** for an Observation, call the core's
``step()`` once, hand the actions to the **effects** port (after the
**reporter** has written down memguard's own stops: a record on disk is all
that stands between a decision and its signal), have the reporter log them,
answer the requests the tick handled, and sleep until the next reading is
due or something happens.

Everything that reaches the daemon is an input of the next tick: exits,
spawns, trial reports, administrators' requests (answered after the tick),
signals (SIGHUP reloads, SIGTERM/SIGINT stop), a parsed configuration.
Nothing steps the core outside the tick. A *full* tick uses the observer's
sample (trees, cgroups, GPUs; measured off the loop); a *fast* one re-reads
only the scope's memory (and, after a crossing that can stop a victim, each
worker's). Between ticks the observer watches the band of byte thresholds
the last tick planned (:func:`~memguard.decide.pacing.watch_plan`) through
a kernel notification or cheap reads, and wakes the pump only when memory
leaves it: holding memory near a threshold costs reads, not ticks.

The ports and the clock are constructor arguments: ``memguard daemon`` and
``memguard run`` compose the real ones (:mod:`memguard.compose`); tests
compose fakes in virtual time (:mod:`memguard.testing`).
"""

from __future__ import annotations

import asyncio
import signal
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping

from .clock import Clock, MonotonicClock
from .decide.core import all_stopped, step
from .decide.pacing import next_wake, watch_plan
from .decide.state import CoreState, Phase
from .model import Event, Notice, Observation, Operator, Reconcile, Shutdown
from .policy import DaemonPolicy
from .reloader import Loaded, Reloader

__all__ = ["Daemon", "EXIT_START_FAILED"]

_HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_OPERATOR_OPS = ("stop", "start", "restart")
EXIT_START_FAILED = 2  # the daemon could not start (control socket taken, required cgroups missing)


@dataclass(frozen=True)
class _Signal:
    signum: int


@dataclass
class _Admin:
    request: dict[str, Any]
    reply: asyncio.Future


class Daemon:
    def __init__(self, policy: DaemonPolicy, observer: Any, effects: Any, reporter: Any, clock: Clock | None = None,
                 *, load_config: Callable[[], DaemonPolicy] | None = None, one_shot: bool = False,
                 capture_signals: bool = True, executor: Any = None) -> None:
        self.policy = policy
        self.observer = observer
        self.effects = effects
        self.reporter = reporter
        self.clock = clock or MonotonicClock()
        self.one_shot = one_shot  # `memguard run`: exit once no worker will run again
        self.capture_signals = capture_signals
        self.state = CoreState()
        self.last: Observation | None = None
        self._inbox: list[Any] = []
        self._wake: asyncio.Event | None = None
        self._reloader = Reloader(load_config, self.post, executor)
        self.ticks = {"full": 0, "fast": 0}  # steps of the core, by kind (status reply, tests)
        self._poked = False
        self._psi_told: object = None

    # ------------------------------------------------------------------ the inbox

    def post(self, item: Any) -> None:
        """Queue an input for the next tick (events from effects, signals, notices)."""
        self._inbox.append(item)
        if self._wake is not None:
            self._wake.set()

    def admin(self, request: dict[str, Any]) -> "asyncio.Future[Mapping[str, Any]]":
        """An administrator's request from the control socket; the reply comes after the next tick."""
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self.post(_Admin(dict(request), fut))
        return fut

    def _poke(self) -> None:
        """The observer saw memory leave the watched band (or a PSI trigger fire): tick now."""
        self._poked = True
        if self._wake is not None:
            self._wake.set()

    def output(self, worker: str, stream: str, line: str) -> None:
        self.reporter.output(worker, stream, line)

    # ------------------------------------------------------------------ run

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        saved = {sig: signal.getsignal(sig) for sig in _HANDLED} if self.capture_signals else {}
        for sig in saved:  # handlers only enqueue; the loop handles the signal by name
            loop.add_signal_handler(sig, lambda sig=sig: self.post(_Signal(sig)))
        try:
            try:
                notes = await self.effects.start(self)
            except Exception as e:  # the effects port could not start (StartError and the like)
                self.reporter.note("start_failed", str(e), level="error")
                return EXIT_START_FAILED
            self.reporter.decisions(notes, False)
            gpu = await self.observer.start(self._poke)
            self.reporter.started(self.policy, scope=self.observer.describe(), effects=self.effects.describe(),
                                  gpu=gpu)
            self.post(Reconcile("start"))
            return await self._pump()
        finally:
            for sig, handler in saved.items():
                loop.remove_signal_handler(sig)
                signal.signal(sig, handler)  # the original handler, not just the default
            self._reloader.cancel()
            await self.effects.close()
            self.observer.close()
            await self.reporter.close()

    async def _pump(self) -> int:
        assert self._wake is not None
        next_full = self.clock.now()
        sampling: asyncio.Task | None = None
        ready = False
        sample_started = 0.0
        while True:
            now = self.clock.now()
            if sampling is None and now >= next_full:
                sampling = asyncio.ensure_future(self.observer.sample(self.effects.snapshot()))
                sampling.add_done_callback(lambda _: self._wake.set())  # type: ignore[union-attr]
                sample_started = now
            if sampling is not None and not sampling.done() and not self._inbox and not self._poked:
                # The full tick waits for its sample; only an input or a crossing ticks meanwhile (and the
                # watchdog, should the sample take longer than its interval).
                watchdog = self.reporter.max_sleep()
                if now < sample_started + (watchdog if watchdog is not None else 3600.0):
                    self._wake.clear()
                    await self.clock.sleep_until(sample_started + (watchdog or 3600.0), self._wake)
                    continue
            self._wake.clear()
            self._poked = False
            events, admins, replies = self._take_inbox()
            sample = None
            if sampling is not None and sampling.done():
                try:
                    sample = sampling.result()
                except Exception as e:  # noqa: BLE001 - a sensing failure is reported; guarding goes on
                    self.reporter.note("sense_error", f"a full reading failed ({type(e).__name__}: {e}); "
                                                      "this tick uses the last one", level="error")
                sampling = None
            now = self.clock.now()
            if sample is not None:
                self.reporter.gpu_problems(sample.gpu_problems)
            obs = self.observer.full(sample, events, now) if sample is not None else self.observer.fast(events, now)
            full, before = obs.full, self.state
            self.state, actions = step(self.state, obs, self.policy, now)  # the one call
            self.ticks["full" if full else "fast"] += 1
            self.reporter.before_acting(actions, self.policy.dry_run)  # records of its own stops, on disk
            notes = self.effects.execute(actions, self.policy, obs)
            self.reporter.decisions(actions, self.policy.dry_run)
            self.reporter.decisions(notes, False)
            gone = set(before.workers) - set(self.state.workers)
            if gone:
                self.effects.forget(gone)
            self.last = obs
            self._answer(admins, replies)
            if not ready:
                self.reporter.ready(self.state)
                ready = True
            self.reporter.tick(obs, self.state)
            if self._finished():
                break
            now = self.clock.now()
            next_full, wake_at = next_wake(self.state, obs, self.policy, now, next_full, full)
            self.observer.watch(watch_plan(self.state, obs, self.policy))
            psi = self.observer.watch_stats().get("psi")
            if psi and psi != self._psi_told:  # the watcher armed the PSI triggers (or could not): told once
                self._psi_told = psi
                self.reporter.note("psi_trigger", str(psi), level="debug")
            watchdog = self.reporter.max_sleep()
            if watchdog is not None:
                wake_at = min(wake_at, now + watchdog)
            await self.clock.sleep_until(wake_at, self._wake)  # at once if something is already waiting
        if sampling is not None:
            sampling.cancel()
        self.reporter.stopped(self.state)
        return 0

    def _finished(self) -> bool:
        if self.state.shutting_down and all_stopped(self.state):
            return True
        return self.one_shot and bool(self.state.workers) and all(
            w.phase in (Phase.STOPPED, Phase.FAILED) for w in self.state.workers.values())

    # ------------------------------------------------------------------ inputs -> events

    def _take_inbox(self) -> tuple[tuple[Event, ...], list[_Admin], list[tuple[asyncio.Future, dict]]]:
        """Turn what arrived since the last tick into the core's events; the rest is handled here."""
        items, self._inbox = self._inbox, []
        events: list[Event] = []
        admins: list[_Admin] = []
        replies: list[tuple[asyncio.Future, dict]] = []
        for item in items:
            if isinstance(item, _Signal):
                self._on_signal(item.signum, events)
            elif isinstance(item, Notice):
                self.reporter.decisions([item], False)
            elif isinstance(item, _Admin):
                self._on_admin(item, events, admins)
            elif isinstance(item, Loaded):
                replies += self._on_loaded(item, events)
            else:
                events.append(item)
        return tuple(events), admins, replies

    def _on_signal(self, signum: int, events: list[Event]) -> None:
        if signum == signal.SIGHUP:
            self._reload()
            return
        name = signal.Signals(signum).name
        if self.state.shutting_down or any(isinstance(e, Shutdown) for e in events):
            self.reporter.note("stopping", "already stopping; waiting for workers to exit")
            return
        self.reporter.note("stopping", f"{name} received: stopping every worker", signal=name)
        self.reporter.stopping()
        events.append(Shutdown(name))

    def _on_admin(self, item: _Admin, events: list[Event], admins: list[_Admin]) -> None:
        op, worker = item.request.get("op"), item.request.get("worker")
        if op == "reload":
            self._reload(item.reply)
            return
        if op in _OPERATOR_OPS:
            if worker not in self.state.workers:
                item.reply.set_result({"ok": False, "error": f"no worker named {worker!r}"})
                return
            self.reporter.note("operator", f"operator asked to {op} {worker}", op=op, worker=worker)
            events.append(Operator(str(op), str(worker)))
        elif op != "status":
            item.reply.set_result({"ok": False, "error": f"unknown admin op {op!r}"})
            return
        admins.append(item)

    def _answer(self, admins: list[_Admin], replies: list[tuple[asyncio.Future, dict]]) -> None:
        """Replies to the requests this tick handled, now that the core has acted on them."""
        for item in admins:
            if item.reply.done():
                continue
            if item.request.get("op") == "status":
                reply = dict(self.reporter.status_reply(self.state))
                reply["watch"] = dict(self.observer.watch_stats(), ticks=dict(self.ticks))
                item.reply.set_result(reply)
            else:
                w = self.state.workers.get(str(item.request.get("worker")))
                item.reply.set_result({"ok": True, "phase": w.phase.value if w is not None else "removed"})
        for fut, reply in replies:
            if not fut.done():
                fut.set_result(reply)

    # ------------------------------------------------------------------ reload

    def _reload(self, reply: asyncio.Future | None = None) -> None:
        if self._reloader.request(reply):
            self.reporter.reloading()

    def _on_loaded(self, loaded: Loaded, events: list[Event]) -> list[tuple[asyncio.Future, dict]]:
        if loaded.policy is None:
            self.reporter.config_errors(loaded.errors, reload=True)
            self.reporter.ready(self.state)
            reply = {"ok": False, "error": "the new configuration has errors; the running policy stays in force",
                     "errors": [e.as_dict() if hasattr(e, "as_dict") else {"message": str(e)} for e in loaded.errors]}
            return [(f, reply) for f in loaded.replies]
        new = replace(loaded.policy, runtime_dir=self.policy.runtime_dir)  # takes effect at the next start
        if self.policy.dry_run:
            new = replace(new, dry_run=True)  # --dry-run on the command line outlives reloads
        self.policy = new
        changed = self.observer.configure(new)
        if changed:
            self.reporter.note("reload_note", changed)
        events.append(Reconcile("reload"))
        self.reporter.reloaded(new)
        self.reporter.ready(self.state)
        return [(f, {"ok": True}) for f in loaded.replies]
