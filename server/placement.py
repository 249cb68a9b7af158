"""Where an engine core runs: a child process of the API process (`mp`), or a Ray actor in its
replica's placement group, on whichever node Ray placed it (`ray`).

The engine client (server/engine_client.py) binds its sockets where the placement says (IPC
paths on this host, TCP on this node's address for Ray, whose actors may live on other nodes),
starts the engine core with the addresses it got, and watches it: a Ray actor that dies, or whose
node dies, ends its `run` call, which `alive` sees. Ray is imported only by the `ray` backend
(an optional extra: `pip install 'tessera[ray]'`); nothing here imports torch.
"""
import logging
import os
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path

from engine.config import EngineConfig
from engine.engine_process import run_engine_core
from server.config import ServerConfig

logger = logging.getLogger("tessera.server")


class LocalEngine:
    """The engine core as a child process, `python -m engine.engine_process` with its arguments
    pickled on stdin. Not multiprocessing's spawn: that also starts a resource-tracker process,
    13 MiB resident that tracks nothing here."""

    def __init__(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="tessera-")
        self._process: subprocess.Popen | None = None
        self.node = "local"

    def bind_address(self, name: str) -> str:
        return f"ipc://{Path(self._dir.name) / name}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    async def start(self, *args) -> None:
        # -P and the API process's own sys.path: the child imports the same code, never a
        # directory named `engine` that happens to be the current one
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
        self._process = subprocess.Popen([sys.executable, "-P", "-m", "engine.engine_process"],
                                         stdin=subprocess.PIPE, env=env)
        with self._process.stdin as stdin:  # a few KB: the pipe's buffer takes them at once
            stdin.write(pickle.dumps(args))
        logger.info("engine core process started (pid %d)", self._process.pid)

    def alive(self) -> bool:
        return self._process.poll() is None

    def exit_reason(self) -> str:
        return f"engine core process exited with code {self._process.returncode}"

    def kill(self) -> None:
        if self._process is not None and self.alive():
            self._process.kill()

    def join(self, timeout: float) -> None:
        if self._process is not None:
            try:
                self._process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass

    def close(self) -> None:
        self._dir.cleanup()


class _EngineActor:
    """A Ray actor whose one long call runs the engine core in the actor's process."""

    def where(self) -> tuple[int, str]:
        import ray

        return os.getpid(), ray.util.get_node_ip_address()

    def run(self, *args) -> None:
        run_engine_core(*args)


class RayPlacement:
    """A placement group per replica, a bundle per tensor-parallel rank (`cpus` CPUs, and a
    GPU on CUDA), packed onto one node where they fit (PACK); the engine core takes bundle 0
    and starts its workers in the others (engine/executor.py). Ray places the groups on the
    cluster's nodes."""

    def __init__(self, replicas: int, ranks: int, cpus: int, gpus: int,
                 address: str | None) -> None:
        import ray
        from ray.util.placement_group import placement_group

        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, log_to_driver=False,
                     logging_level=logging.WARNING)
        self.bundle = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
        self.groups = [placement_group([self.bundle] * ranks, strategy="PACK")
                       for _ in range(replicas)]
        logger.info("Ray cluster: %s; placing %d replicas of %d ranks of %s",
                    ray.cluster_resources(), replicas, ranks, self.bundle)

    async def ready(self, timeout_s: float) -> None:
        import asyncio

        try:
            await asyncio.wait_for(asyncio.gather(*(g.ready() for g in self.groups)),
                                   timeout_s)
        except TimeoutError:
            raise RuntimeError(f"the Ray cluster cannot place the replicas within "
                               f"{timeout_s:.0f} s: each rank needs {self.bundle}") from None


def ray_placement(engine: EngineConfig, settings: ServerConfig) -> RayPlacement | None:
    """The replicas' placement groups under `--distributed-executor-backend ray`: each rank's
    bundle has `--cpus-per-engine` CPUs (at least 1) and, on CUDA, a GPU."""
    parallel = engine.parallel
    if parallel.distributed_executor_backend != "ray":
        return None
    return RayPlacement(settings.data_parallel_size, parallel.tensor_parallel_size,
                        max(1, settings.cpus_per_engine),
                        1 if engine.device.startswith("cuda") else 0, parallel.ray_address)


class RayEngine:
    """The engine core of replica `index` in a Ray actor, in its placement group's bundle 0."""

    def __init__(self, placement: RayPlacement, index: int) -> None:
        import ray

        self._ray, self._placement, self._index = ray, placement, index
        self._actor = self._done = None
        self.pid: int | None = None
        self.node = ray.util.get_node_ip_address()  # until the actor says where it is

    def bind_address(self, name: str) -> str:
        return f"tcp://{self._ray.util.get_node_ip_address()}:*"

    async def start(self, *args) -> None:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        p = self._placement
        actor_class = self._ray.remote(_EngineActor)
        self._actor = actor_class.options(
            num_cpus=p.bundle["CPU"], num_gpus=p.bundle.get("GPU", 0), max_restarts=0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                p.groups[self._index], placement_group_bundle_index=0)).remote()
        where = self._actor.where.remote()  # answered before `run` takes the actor
        self._done = self._actor.run.remote(*args)
        self.pid, self.node = await where
        logger.info("engine core started in a Ray actor (pid %d on %s)", self.pid, self.node)

    def alive(self) -> bool:
        ready, _ = self._ray.wait([self._done], timeout=0)
        return not ready

    def exit_reason(self) -> str:
        try:
            self._ray.get(self._done, timeout=0)
            return "the engine core's Ray actor returned"
        except Exception as exc:  # RayActorError: the actor or its node died
            return f"the engine core's Ray actor died: {type(exc).__name__}"

    def kill(self) -> None:
        if self._actor is not None:
            self._ray.kill(self._actor, no_restart=True)

    def join(self, timeout: float) -> None:
        if self._done is not None:
            self._ray.wait([self._done], timeout=timeout)

    def close(self) -> None:
        """Nothing to clean up on this host."""
