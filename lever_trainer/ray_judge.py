"""The judge fanned out on Ray: ``--judge-backend ray``.

:class:`RayEnvironment` stands where the environment stands for the judge driver
(:mod:`lever_trainer.judge_driver`): its ``judge`` is an ``async def`` that hands the
batch to one of ``--judge-workers`` Ray actors and awaits the answer. Each actor holds
one instance of the environment, built inside the actor from the plugin's
``environments`` hook and configured with the run's options (``Environment.configure``),
so that a model is loaded once per actor (one per GPU with ``--judge-gpus-per-worker
1``). Batching, concurrency, timeouts, retries, the rate limit, the budget and the store
stay the driver's: this module only decides which actor a batch goes to (the one with
the fewest calls in flight; further calls wait in the actor's own Ray queue) and what a
Ray failure means.

Failures. An error the environment raises in its actor reaches the driver as that
error (its kind decides a retry, as in-process). An actor that died (a crash, an
out-of-memory kill, ``ray.kill``, a lost node: ``RayActorError``) is replaced by a new
one, and its batch fails as transient, so that the driver asks it again after its
backoff (``--judge-retries``).

The cluster. ``--ray-address`` joins a running cluster; without it a local one is
started with ``ray.init`` (offering at least one CPU per worker) and shut down when the
process ends. When Ray is already initialised in the process (a test, a notebook), that
cluster is used and left running. Ray is an extra: ``pip install 'lever-trainer[ray]'``.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import LeverError, PluginError
from .judge import Environment, environments_from_plugins
from .judge_driver import TransientJudgeError
from .plugins import load_plugins

#: The backends of ``--judge-backend``.
BACKENDS = ("local", "ray")
#: What to install for ``--judge-backend ray``.
INSTALL_HINT = "pip install 'lever-trainer[ray]'"
#: Seconds the actors may take to start by default (``--ray-start-timeout``; a model
#: loaded in ``configure`` included).
START_SECONDS = 600.0


def import_ray() -> Any:
    """The ``ray`` module, or one line saying how to install it."""
    try:
        import ray
    except ImportError:
        raise LeverError(f"--judge-backend ray: Ray is not installed; {INSTALL_HINT}") from None
    return ray


@dataclass(frozen=True)
class PluginEnvironment:
    """Builds the run's environment inside an actor: the plugins of the run (by name)
    are loaded, environment ``name`` taken from their ``environments`` hook and
    configured with ``options``. Plain data, so that Ray ships it to any node."""

    plugin: str
    name: str
    enable: tuple[str, ...]
    disable: tuple[str, ...]
    options: Mapping[str, Any] = field(default_factory=dict)

    def __call__(self) -> Environment:
        plugins = load_plugins(list(self.enable), list(self.disable))
        envs = environments_from_plugins(plugins)
        if self.name not in envs:
            raise PluginError(
                f"plugin {self.plugin}: environment {self.name} is not provided on this "
                "Ray worker (is the plugin installed on every node?)"
            )
        env = envs[self.name][1]
        env.configure(dict(self.options))
        return env


class _EnvironmentActor:
    """One environment in one Ray actor (made a Ray actor class by :func:`_actor_class`)."""

    def __init__(self, factory: Callable[[], Environment]) -> None:
        self.env = factory()

    def describe(self) -> tuple[str, str]:
        return str(self.env.name), str(self.env.version)

    def placement(self) -> tuple[str, list[str]]:
        """The node this actor runs on and the GPU ids Ray gave it."""
        import ray

        context = ray.get_runtime_context()
        return str(context.get_node_id()), [str(g) for g in context.get_accelerator_ids()["GPU"]]

    def judge(self, query_ids: list[int], sequences: list[list[int]]) -> list[Any]:
        answer = self.env.judge(query_ids, sequences)
        if inspect.isawaitable(answer):
            answer = asyncio.run(_awaited(answer))
        return list(answer)


async def _awaited(value: Any) -> Any:
    return await value


class RayEnvironment(Environment):
    """The environment ``local`` run in ``workers`` Ray actors (see the module docstring).

    ``local`` is the run's own instance, configured in this process: it gives the name,
    version, batch size and cheapness the store and the driver use; the actors must
    report the same name and version. ``factory`` builds one configured instance in an
    actor (:class:`PluginEnvironment` for a plugin's environment; any picklable
    callable will do)."""

    def __init__(
        self,
        local: Environment,
        plugin: str,
        factory: Callable[[], Environment],
        workers: int = 1,
        gpus_per_worker: float = 0.0,
        address: str | None = None,
        notice: Callable[[str], None] | None = None,
        start_seconds: float = START_SECONDS,
    ) -> None:
        self.ray = import_ray()
        self.plugin = plugin
        self.name, self.version = local.name, str(local.version)
        self.cheap, self.batch_size = local.cheap, local.batch_size
        #: verdict fields the environment may leave unavailable (the judge checks them)
        self.optional_fields = tuple(getattr(local, "optional_fields", ()) or ())
        self.unavailable_fields = tuple(getattr(local, "unavailable_fields", ()) or ())
        self.factory, self.workers, self.gpus = factory, int(workers), float(gpus_per_worker)
        self.start_seconds = float(start_seconds)
        #: Actors replaced after they died.
        self.replaced = 0
        self._owns_cluster = False
        #: whether this process started the cluster itself (it cannot grow)
        self._local_cluster = False
        self._lock = threading.Lock()
        self._load: dict[Any, int] = {}
        #: Actors a call found dead, to be replaced.
        self._dead: set[Any] = set()
        self._start_cluster(address)
        self._check_gpus(notice)
        self._actor_cls = self.ray.remote(_EnvironmentActor)
        self.actors = [self._new_actor() for _ in range(self.workers)]
        self._finalizer: Any = None
        self._check_actors()
        # at the end (close, garbage collection or the process's exit): actors, cluster
        self._finalizer = weakref.finalize(
            self, _shutdown, self.ray, self.actors, self._owns_cluster
        )

    # -- the cluster and the actors ---------------------------------------------------
    def _start_cluster(self, address: str | None) -> None:
        ray = self.ray
        if ray.is_initialized():
            return
        try:
            if address:
                ray.init(address=address, log_to_driver=False)
            else:
                cpus = max(os.cpu_count() or 1, self.workers)
                # "local": a new cluster even when one runs on this machine (ray start)
                ray.init(
                    address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False
                )
        except Exception as exc:
            where = f"--ray-address {address}" if address else "a local Ray cluster"
            raise LeverError(
                f"--judge-backend ray: could not start or join {where} "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
            ) from None
        self._owns_cluster = True
        self._local_cluster = not address

    def _check_gpus(self, notice: Callable[[str], None] | None) -> None:
        """Enough GPUs for every worker: at once one line when a cluster this run started
        lacks them; a warning when a joined cluster lacks them now (it may grow)."""
        if not self.gpus:
            return
        need = self.gpus * self.workers
        have = float(self.ray.cluster_resources().get("GPU", 0))
        if have >= need:
            return
        what = (
            f"--judge-workers {self.workers} with --judge-gpus-per-worker {self.gpus:g} "
            f"need {need:g} GPUs"
        )
        if self._local_cluster:
            self.ray.shutdown()
            raise LeverError(
                f"{what}; the local Ray cluster has {have:g} (join a cluster with GPUs with "
                "--ray-address, or give fewer workers or GPUs)"
            )
        if notice is not None:
            notice(
                f"warning: {what}; the Ray cluster offers {have:g} now: waiting up to "
                f"{self.start_seconds:g} s (--ray-start-timeout) for the actors to start"
            )

    def placement(self) -> str:
        """Where the actors run: nodes, and each actor's GPU ids (one line)."""
        places = self.ray.get([a.placement.remote() for a in self.actors])
        nodes = len({node for node, _ in places})
        line = f"judge on Ray: {len(places)} actor(s) on {nodes} node(s)"
        if self.gpus:
            line += "; GPU ids " + " | ".join(",".join(ids) or "-" for _, ids in places)
        return line

    def _new_actor(self) -> Any:
        actor = self._actor_cls.options(
            num_cpus=1, num_gpus=self.gpus, scheduling_strategy="SPREAD"
        ).remote(self.factory)
        self._load[actor] = 0
        return actor

    def _check_actors(self) -> None:
        """Wait for the actors to start; each must judge as ``name`` ``version``."""
        ray = self.ray
        refs = [a.describe.remote() for a in self.actors]
        _, pending = ray.wait(refs, num_returns=len(refs), timeout=self.start_seconds)
        if pending:
            offers = ", ".join(f"{k} {v:g}" for k, v in sorted(ray.cluster_resources().items())
                               if k in ("CPU", "GPU"))  # fmt: skip
            self.close()  # read before: closing may disconnect from the cluster
            gpus = f", {self.gpus:g} GPU each" if self.gpus else ""
            raise LeverError(
                f"--judge-workers {self.workers}: {len(pending)} of the Ray actors did not "
                f"start within {self.start_seconds:g} s (--ray-start-timeout; each needs "
                f"1 CPU{gpus}; the cluster offers {offers or 'none'})"
            )
        for ref in refs:
            try:
                name, version = ray.get(ref)
            except self.ray.exceptions.RayError as exc:
                self.close()
                raise PluginError(
                    f"plugin {self.plugin}: environment {self.name} could not start in a "
                    f"Ray actor: {_cause_line(exc)}"
                ) from None
            if (name, version) != (self.name, self.version):
                self.close()
                raise PluginError(
                    f"plugin {self.plugin}: environment {self.name} {self.version} runs as "
                    f"{name} {version} in a Ray actor (install the same plugin version on "
                    "every node)"
                )

    def _pick(self) -> Any:
        """The actor with the fewest calls in flight (the first such one)."""
        for dead in [a for a in self.actors if a in self._dead]:
            self._replace(dead)
        with self._lock:
            actor = min(self.actors, key=lambda a: self._load.get(a, 0))
            self._load[actor] = self._load.get(actor, 0) + 1
            return actor

    def _done(self, actor: Any, future: Any) -> None:
        with self._lock:
            if actor in self._load:
                self._load[actor] -= 1
        if not future.cancelled() and isinstance(
            future.exception(), self.ray.exceptions.RayActorError
        ):
            with self._lock:  # replaced by the next pick (not here, in Ray's own thread)
                self._dead.add(actor)

    def _replace(self, actor: Any) -> None:
        """A dead actor's place goes to a new one (once, whichever call noticed first)."""
        with self._lock:
            if actor not in self.actors:
                return
            self.actors[self.actors.index(actor)] = self._new_actor()
            self._load.pop(actor, None)
            self._dead.discard(actor)
            self.replaced += 1
        try:
            self.ray.kill(actor)
        except Exception:  # already gone
            pass

    # -- judging ----------------------------------------------------------------------
    async def judge(  # type: ignore[override]
        self, query_ids: Sequence[int], sequences: Sequence[Sequence[int]]
    ) -> list[Any]:
        """One batch, judged by a free actor."""
        ray = self.ray
        actor = self._pick()
        ref = actor.judge.remote([int(q) for q in query_ids], [list(s) for s in sequences])
        done = ref.future()
        # the actor counts as busy until its call ends, even one the driver gave up; a
        # dead one is replaced at once, before another batch can be handed to it
        done.add_done_callback(lambda f: self._done(actor, f))
        try:
            return list(await asyncio.wrap_future(done))
        except ray.exceptions.RayActorError as exc:
            self._replace(actor)
            raise TransientJudgeError(
                f"Ray actor died ({_cause_line(exc)}); replaced by a new one"
            ) from None
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause
            if isinstance(cause, BaseException):
                raise cause from None
            raise PluginError(
                f"plugin {self.plugin}: environment {self.name} failed in a Ray actor: "
                f"{_cause_line(exc)}"
            ) from None

    def close(self) -> None:
        """Stop the actors, and the cluster when this process started it."""
        if self._finalizer is not None:
            self._finalizer()
        else:  # failed while starting
            _shutdown(self.ray, self.actors, self._owns_cluster)


def _shutdown(ray: Any, actors: list[Any], cluster: bool) -> None:
    if not ray.is_initialized():
        return
    for actor in actors:
        try:
            ray.kill(actor)
        except Exception:  # already gone
            pass
    if cluster:
        ray.shutdown()


def _cause_line(exc: BaseException) -> str:
    """The first line of a Ray error's message."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


__all__ = ["BACKENDS", "INSTALL_HINT", "PluginEnvironment", "RayEnvironment", "import_ray"]
