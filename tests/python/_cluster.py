"""A pool of CPU worker processes (torch.multiprocessing spawn + gloo) that run test scenarios.

Starting processes and importing torch costs seconds, so every world size gets one pool for the whole
test session: the workers join a gloo process group (file:// rendezvous), build moedist's communicator
over it (moedist.get_comm_name), then run scenarios (functions of _scenarios.py, by name) that the test
sends them, all ranks the same one, and send back ("ok", result) or ("error", type, message, traceback).
Every wait has a timeout; a pool whose worker misbehaved is torn down and started again.
"""
from __future__ import annotations

import os
import tempfile
import time
import traceback

import torch.multiprocessing as mp


def worker_main(rank: int, world: int, init_file: str, conn) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
        import _scenarios

        ctx = _scenarios.Ctx(rank, world)
        conn.send(("ready", rank))
    except BaseException as e:  # noqa: BLE001
        conn.send(("error", type(e).__name__, str(e), traceback.format_exc()))
        return
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            break
        if msg is None:
            break
        name, params = msg
        try:
            if "." in name:  # "module.function": a scenario of another module of this folder
                import importlib

                mod, fn = name.rsplit(".", 1)
                result = getattr(importlib.import_module(mod), fn)(ctx, **params)
            else:
                result = getattr(_scenarios, name)(ctx, **params)
            conn.send(("ok", result))
        except BaseException as e:  # noqa: BLE001
            conn.send(("error", type(e).__name__, str(e), traceback.format_exc()))
    try:
        dist.destroy_process_group()
    except Exception:
        pass


class ScenarioError(AssertionError):
    pass


class Cluster:
    def __init__(self, world: int, start_timeout: float = 120.0):
        self.world = world
        self.dead = False
        fd, self.init_file = tempfile.mkstemp(prefix=f"moedist-gloo-{world}-")
        os.close(fd)
        os.unlink(self.init_file)  # gloo's FileStore creates it
        ctx = mp.get_context("spawn")
        self.conns, self.procs = [], []
        for r in range(world):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=worker_main, args=(r, world, self.init_file, child), daemon=True)
            p.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(p)
        replies = self._gather(start_timeout)
        bad = [r for r in replies if r[0] != "ready"]
        if bad:
            self.close()
            raise ScenarioError(f"workers failed to start: {bad}")

    def _gather(self, timeout: float):
        deadline = time.monotonic() + timeout
        out = []
        for r, c in enumerate(self.conns):
            left = deadline - time.monotonic()
            if left <= 0 or not c.poll(left):
                self.dead = True
                raise ScenarioError(f"rank {r} of {self.world} did not answer within {timeout:.0f} s")
            try:
                out.append(c.recv())
            except EOFError:
                self.dead = True
                raise ScenarioError(f"rank {r} of {self.world} died (exit code {self.procs[r].exitcode})")
        return out

    def run_raw(self, name: str, timeout: float = 60.0, **params):
        """Runs scenario `name` on every rank; returns the per-rank replies as sent."""
        if self.dead:
            raise ScenarioError("the worker pool is dead")
        for c in self.conns:
            c.send((name, params))
        return self._gather(timeout)

    def run(self, name: str, timeout: float = 60.0, **params):
        """Runs scenario `name` on every rank; fails the test if any rank raised; returns the results."""
        replies = self.run_raw(name, timeout, **params)
        errors = [(r, rep) for r, rep in enumerate(replies) if rep[0] != "ok"]
        if errors:
            msg = "\n".join(f"--- rank {r}: {rep[1]}: {rep[2]}\n{rep[3]}" for r, rep in errors)
            raise ScenarioError(f"scenario {name}({params}) failed on {len(errors)} of {self.world} ranks:\n{msg}")
        return [rep[1] for rep in replies]

    def close(self, timeout: float = 10.0):
        for c in self.conns:
            try:
                c.send(None)
            except Exception:
                pass
        deadline = time.monotonic() + timeout
        for p in self.procs:
            p.join(max(0.1, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(5)
        for c in self.conns:
            c.close()
        try:
            os.unlink(self.init_file)
        except OSError:
            pass
