"""``ps``: every parameter on sharded parameter-server actors; workers push gradients, pull parameters.

The driver starts ``sync.ps.num_shards`` :class:`~lepton_ray.sync.ps_shard.ShardServer`
actors (:meth:`ParamServer.launch`), owned by the driver so they outlive a
restarted worker group, restarted by Ray if they die (each then restores its
part of the newest checkpoint). Per step a worker makes one ``push`` call per
shard (a flat buffer of its dense gradients plus the touched rows of each
embedding table); the reply carries the shard's fresh dense parameters.
Embedding rows are pulled in a forward pre-hook on each ``nn.Embedding`` /
``nn.EmbeddingBag``: only the unique ids of the batch, one call per shard that
owns some of them. The tables are switched to ``sparse=True`` so backward
produces row gradients, never the dense ``rows x dim`` table gradient.

Numpy buffers travel through Ray's object store (pickle protocol 5, out-of-band,
no per-tensor calls). The learning rate of each step is read from the loop's
optimizer (the loop's scheduler keeps setting it); that optimizer is never
stepped for parameters that live on the shards, so it holds no state for them.

``sync.ps.mode`` (sync | async | ssp) is described in :mod:`lepton_ray.sync.ps_shard`.

``sync.ps.balance: dynamic`` (async / ssp) makes the strategy *elastic*: shard 0
deals the pieces of each epoch to whichever worker asks first (:meth:`claimer`),
and with ssp a push past the bound is answered at once as ``held`` (with the
freshest parameters): the worker computes up to ``max_batches_per_push - 1``
batches on them, then waits for the release, computes one more batch on the
released parameters and pushes the sum (:meth:`held`). A slow worker therefore
no longer sets everyone's pace, and no push goes out past the bound. The run's
step is ``batches // world`` over every worker's pushes (:meth:`progress`).

Checkpoints: :meth:`state_dict` (rank 0) fetches every shard's parameters and
optimizer state and refreshes the local model, so the saved model is complete;
:meth:`load_state_dict` restores every shard (rank 0) before any worker pushes.
A shard restored behind the workers (it died and Ray restarted it) refuses the
next push with :class:`~lepton_ray.sync.ps_shard.PSStateError`: the worker group
fails and, with ``scaling.max_failures``, resumes from the newest checkpoint,
replaying the steps since.
"""

from __future__ import annotations

import time
import uuid
import warnings
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Literal, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from lepton_ray.config import Config, ConfigError, Section
from lepton_ray.sync.base import Pace, Services, Strategy, options
from lepton_ray.sync.ps_shard import Piece, ShardServer, plan_shards
from lepton_ray.train.optim import make_optimizer

__all__ = ["ParamServer", "PSConfig", "PSServices", "embedding_modules", "NAMESPACE", "SHARD_PREFIX"]


@dataclass(kw_only=True, slots=True)
class PSConfig(Section):
    """Options of the ``ps`` and ``hybrid`` strategies (sharded parameter-server actors)."""

    PATH: ClassVar[str] = "sync.ps"

    num_shards: int = 2
    """Parameter-server actors; parameters are spread over them balanced by bytes (embedding tables by rows)."""
    mode: Literal["sync", "async", "ssp"] = "sync"
    """sync: each step waits for every worker's gradients (= all-reduce SGD); async: each push is applied
    when it arrives; ssp: async, but no worker runs more than ``staleness`` steps ahead of the slowest."""
    staleness: int = 2
    """ssp only: how many steps the fastest worker may be ahead of the slowest (0 behaves as sync)."""
    embedding_optimizer: Literal["adagrad", "sgd"] = "adagrad"
    """Optimizer the shards apply to embedding rows (sparse updates: only the rows a batch touched)."""
    embedding_lr: Optional[float] = None
    """Peak learning rate of the embedding rows; omitted = ``train.lr``. Follows the same schedule."""
    timeout_s: float = 600.0
    """A push that waits longer than this for the other workers fails the step (instead of hanging)."""
    balance: Literal["static", "dynamic"] = "static"
    """How the data reaches the workers (``strategy: ps``, modes async and ssp). static: every worker
    trains on an equal share in a fixed order (resumable mid-epoch). dynamic: pieces of each epoch go to
    whichever worker asks first, so a fast worker takes more of them, and a worker held at the ssp bound
    keeps computing and adds those batches to its next push (work-conserving); the run ends when the
    data is used up; evaluation and checkpoints happen at epoch ends."""
    max_batches_per_push: int = 2
    """balance dynamic: the most batches in one push of a worker held at the ssp bound: up to N - 1
    computed while it waits, then one on the released parameters; their gradients are summed (each batch
    weighs what it weighs in sync). 2 keeps a worker twice as fast as the slowest busy; larger sums are
    larger, staler steps."""

    def validate(self) -> None:
        self._require(self.num_shards >= 1, "num_shards", "must be >= 1")
        self._require(self.staleness >= 0, "staleness", "must be >= 0")
        if self.embedding_lr is not None:
            self._require(self.embedding_lr > 0, "embedding_lr", "must be > 0")
        self._require(self.timeout_s > 0, "timeout_s", "must be > 0")
        self._require(self.max_batches_per_push >= 1, "max_batches_per_push", "must be >= 1")



NAMESPACE = "lepton_ray"
"""Ray namespace of the shard actors; their names start with :data:`SHARD_PREFIX`."""
SHARD_PREFIX = "ps-shard:"


def embedding_modules(model: nn.Module) -> dict[str, nn.Module]:
    """``{weight parameter name: module}`` of the model's ``nn.Embedding`` / ``nn.EmbeddingBag`` tables.

    >>> embedding_modules(nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 1)))
    {'0.weight': Embedding(10, 4)}
    """
    return {
        (f"{name}.weight" if name else "weight"): m
        for name, m in model.named_modules()
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag))
    }


class _RayShardServer(ShardServer):
    """The shard as a Ray actor: push replies carry an ``ObjectRef`` to one ``ray.put`` snapshot, so
    a sync round serialises the shard's parameters once, not once per worker."""

    def _publish_dense(self) -> Any:
        import ray

        flat = self.flat.numpy() if self.dense else None
        return None if flat is None else ray.put(flat)  # ray.put copies: later updates do not change it


class PSServices(Services):
    """The parameter-server actors: planned over the model's parameters, started before the worker group."""

    name = "ps"
    embeddings_only = False  # hybrid: only the embedding tables live on the shards

    def _plan(self, model: nn.Module) -> list[list[Piece]]:
        tables = embedding_modules(model)
        params = [
            (name, tuple(p.shape), name in tables)
            for name, p in model.named_parameters()
            if name in tables or not self.embeddings_only
        ]
        try:
            return plan_shards(params, options(PSConfig, self.config).num_shards)
        except ValueError as exc:
            raise ConfigError(f"sync.ps.num_shards: {exc}") from None

    def check(self, build: Callable[[], nn.Module]) -> None:
        config = self.config
        if config.train.grad_clip_norm is not None:
            raise ConfigError(
                f"train.grad_clip_norm: not supported with sync.strategy '{self.name}' (gradients are combined on the"
                f" parameter servers, no worker sees the global gradient), got {config.train.grad_clip_norm:g}"
            )
        if config.train.precision == "fp16":
            raise ConfigError(f"train.precision: 'fp16' (gradient scaling) is not supported with sync.strategy '{self.name}'; use 'bf16' or 'fp32'")
        ps = options(PSConfig, config)
        if ps.balance == "dynamic" and (self.name != "ps" or ps.mode == "sync"):
            why = "sync.strategy 'hybrid' all-reduces every step" if self.name != "ps" else "sync.ps.mode 'sync' steps in lock step"
            raise ConfigError(f"sync.ps.balance: 'dynamic' needs sync.strategy 'ps' with sync.ps.mode 'async' or 'ssp' ({why});"
                              f" use balance 'static'")
        if ps.balance == "dynamic" and config.data.engine != "native":
            raise ConfigError("data.engine: 'ray_data' reads each worker's share in the plan's order; sync.ps.balance: 'dynamic'"
                              " deals pieces to whichever worker asks, in its own reading thread: use data.engine 'native' with it")
        self._plan(build())

    def start(self, build: Callable[[], nn.Module], checkpoint_uri: str, run_name: str) -> dict[str, Any]:
        import ray

        config = self.config
        model = build()
        plan = self._plan(model)
        params = {n: p.detach().cpu().numpy() for n, p in model.named_parameters()}
        t, ps = config.train, options(PSConfig, config)
        train = {"optimizer": t.optimizer, "lr": t.lr, "momentum": t.momentum, "weight_decay": t.weight_decay,
                 "embedding_optimizer": ps.embedding_optimizer, "embedding_lr": ps.embedding_lr}
        run_id = uuid.uuid4().hex[:8]
        actor_cls = ray.remote(_RayShardServer)
        shards, inits = [], []
        for i, pieces in enumerate(plan):
            # put explicitly and kept in ``services``: a restart re-runs the constructor with these values
            init = ray.put({p.name: params[p.name][p.row_start : p.row_start + p.shape[0]] if p.sparse else params[p.name] for p in pieces})
            inits.append(init)
            shards.append(
                actor_cls.options(
                    name=f"{SHARD_PREFIX}{run_name}:{run_id}:{i}", namespace=NAMESPACE,
                    num_cpus=0, max_restarts=-1,  # Ray restarts a dead shard; it restores the newest checkpoint itself
                ).remote(
                    i, pieces, init, world_size=config.scaling.max_workers, mode=ps.mode, staleness=ps.staleness,
                    train=train, timeout_s=ps.timeout_s, checkpoint_uri=checkpoint_uri,
                    storage_options=config.checkpoint.storage_options,
                )
            )
        ray.get([s.ready.remote() for s in shards])
        return {"shards": shards, "plan": plan, "inits": inits}

    def stop(self, services: Any) -> None:
        import ray

        for shard in (services or {}).get("shards", []):
            ray.kill(shard, no_restart=True)


class _ElasticPace(Pace):
    """``balance: dynamic`` (async / ssp): the data is dealt to whichever worker is free, a worker held at the ssp
    bound adds batches to its next push, and the run's step counts every worker's batches."""

    lockstep = stepwise = False

    def __init__(self, ps: "ParamServer"):
        self.ps = ps
        dealer = ps.services["shards"][0] if ps.services else None

        def claim(epoch: int, pieces: int) -> Optional[int]:
            """Ask shard 0 for the next piece of ``epoch``."""
            import ray

            return ray.get(dealer.claim.remote(epoch, pieces))

        self.claim = claim if dealer is not None else None

    def held(self, batches: int) -> bool:
        return self.ps.held(batches)

    def advance(self, step: int) -> int:
        return max(step, self.ps.progress())

    def drain(self, optimizer: torch.optim.Optimizer, batches: int, *, last: bool) -> Optional[int]:
        return self.ps.drain(optimizer, batches, last=last)


class ParamServer(Strategy):
    """Every parameter on the shards (``sync.strategy: ps``)."""

    name = "ps"
    Services = PSServices
    sections = (PSConfig,)
    elastic = False  # the shards are sized for a fixed worker count
    embeddings_only = False  # hybrid: only the embedding tables live on the shards

    def __init__(self, config: Config, worker: Any, services: Any = None):
        super().__init__(config, worker, services)
        self.opts = options(PSConfig, config)
        self.elastic_deal = self.opts.balance == "dynamic" and self.opts.mode != "sync"
        if self.elastic_deal:
            self.pace = _ElasticPace(self)
        else:
            self.pace.lockstep = self.opts.mode == "sync"  # async / ssp: no per-step collective

    # ------------------------------------------------------------------ worker side

    def optimizer(self) -> torch.optim.Optimizer:
        return make_optimizer(self.config, list(self.model.parameters()), sparse=True)  # the tables' gradients are sparse

    def wrap(self, model: nn.Module) -> nn.Module:
        self._shards = self.services["shards"]
        plan: list[list[Piece]] = self.services["plan"]
        params = dict(model.named_parameters())
        self._tables = embedding_modules(model)
        self._dense = [[params[p.name] for p in pieces if not p.sparse] for pieces in plan]
        self._rows = {name: [(p.shard, p.row_start, p.row_start + p.shape[0]) for pieces in plan for p in pieces if p.name == name]
                      for name in self._tables}
        for name, module in self._tables.items():
            module.sparse = True  # backward yields the touched rows only, never a dense rows x dim gradient
            module.register_forward_pre_hook(self._row_puller(name))
        self._step = 0
        self._metrics = {"ps_bytes_pushed": 0, "ps_bytes_pulled": 0, "ps_wait_s": 0.0, "ps_emb_rows_pushed": 0, "ps_emb_bytes_pushed": 0}
        self._max_gap = 0
        self._received = 0  # batches the shards received from every worker (progress = this // world)
        self._release: list[tuple[int, Any]] = []  # (shard, ObjectRef of its release) while held at the ssp bound
        if not self.embeddings_only:
            self._pull_dense()
        return model

    def _get(self, refs: list) -> list:
        """``ray.get`` that names the dead shard instead of a bare actor error, and counts the wait."""
        import ray

        t0 = time.perf_counter()
        try:
            return ray.get(refs)
        except ray.exceptions.RayActorError as exc:
            raise RuntimeError(
                f"a parameter-server shard died ({exc.__class__.__name__}); Ray restarts it from the newest checkpoint,"
                " and the worker group resumes from there when scaling.max_failures allows"
            ) from exc
        finally:
            self._metrics["ps_wait_s"] += time.perf_counter() - t0
            self.synced.add(time.perf_counter() - t0)

    def _row_puller(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            ids = torch.unique(args[0].detach().reshape(-1).to("cpu", torch.int64))
            asks = []
            for shard, lo, hi in self._rows[name]:
                sel = ids[(ids >= lo) & (ids < hi)]
                if len(sel):
                    asks.append((sel, self._shards[shard].pull_rows.remote(name, (sel - lo).numpy())))
            rows = self._get([ref for _, ref in asks])
            with torch.no_grad():
                for (sel, _), r in zip(asks, rows):
                    module.weight[sel.to(module.weight.device)] = torch.from_numpy(np.array(r)).to(module.weight.device)
                    self._metrics["ps_bytes_pulled"] += r.nbytes + sel.numel() * 8

        return hook

    def _set_dense(self, shard: int, flat: Optional[np.ndarray]) -> None:
        if flat is None:
            return
        self._metrics["ps_bytes_pulled"] += flat.nbytes
        with warnings.catch_warnings():  # Ray's buffer is read-only; it is only read here (copied into the parameters)
            warnings.simplefilter("ignore", UserWarning)
            src = torch.from_numpy(flat)
        offset = 0
        with torch.no_grad():
            for p in self._dense[shard]:
                p.copy_(src[offset : offset + p.numel()].view_as(p))
                offset += p.numel()

    def _pull_dense(self) -> None:
        flats = self._get([s.pull_dense.remote() for s in self._shards])
        for i, flat in enumerate(flats):
            self._set_dense(i, flat)

    def _sparse_grads(self) -> list[dict[str, tuple[np.ndarray, np.ndarray]]]:
        """Per shard, ``{table: (local row ids, row gradients)}`` of the rows this worker's batch touched."""
        out: list[dict[str, tuple[np.ndarray, np.ndarray]]] = [{} for _ in self._shards]
        for name, module in self._tables.items():
            g = module.weight.grad
            module.weight.grad = None  # the shards own these rows; the local optimizer must not step them
            if g is None:
                continue
            g = g.coalesce() if g.is_sparse else g.to_sparse().coalesce()
            ids, rows = g.indices()[0].cpu(), g.values().float().cpu()
            for shard, lo, hi in self._rows[name]:
                mask = (ids >= lo) & (ids < hi)
                if mask.any():
                    local, vals = (ids[mask] - lo).numpy(), rows[mask].numpy()
                    out[shard][name] = (local, vals)
                    self._metrics["ps_emb_rows_pushed"] += len(local)
                    self._metrics["ps_emb_bytes_pushed"] += local.nbytes + vals.nbytes
        return out

    def _push(self, lr: float, batches: int = 1, advance: bool = True) -> None:
        sparse = self._sparse_grads()
        refs = []
        for i, shard in enumerate(self._shards):
            dense = None
            if self._dense[i]:
                grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self._dense[i]]
                dense = torch.cat([g.detach().reshape(-1).float().cpu() for g in grads]).numpy()
                self._metrics["ps_bytes_pushed"] += dense.nbytes
            self._metrics["ps_bytes_pushed"] += sum(a.nbytes + b.nbytes for a, b in sparse[i].values())
            refs.append(shard.push.remote(self.worker.rank, self._step, lr, dense, sparse[i], batches, not self.elastic_deal, advance))
        replies = self._get(refs)
        if advance:
            self._step += 1
            held = [i for i, r in enumerate(replies) if r["held"]]
            self._release = [(i, self._shards[i].release.remote(self.worker.rank, self._step)) for i in held]
        self._take(replies)

    def _take(self, replies: list[dict[str, Any]]) -> None:
        """Fresh dense parameters and counters from push / release replies."""
        import ray

        refd = [i for i, r in enumerate(replies) if isinstance(r["dense"], ray.ObjectRef)]
        for i, flat in zip(refd, self._get([replies[i]["dense"] for i in refd])):  # one batched get for every shard
            replies[i]["dense"] = flat
        for i, reply in enumerate(replies):
            self._set_dense(i, reply["dense"])
            self._max_gap = max(self._max_gap, reply["max_gap"])
            self._received = max(self._received, reply["batches"])

    def step(self, optimizer: torch.optim.Optimizer, precision: Any, batches: int = 1) -> None:
        self._await_release()  # a push never goes past the staleness bound
        self._push(optimizer.param_groups[0]["lr"], batches)
        if self.opts.max_batches_per_push == 1:
            self._await_release()  # no batch on stale parameters: wait here, as with balance 'static'

    # ------------------------------------------------------------------ elastic (balance: dynamic)

    def held(self, batches: int) -> bool:
        """True = compute another batch before the next push. While this worker's last push waits for its
        ssp release, the batches computed on the parameters it has add up, ``sync.ps.max_batches_per_push``
        - 1 at most (then it waits for the release); once released, one more batch is computed on the fresh
        parameters, and that push goes out."""
        if not self._release:  # only the elastic pace asks (balance: dynamic)
            return False
        import ray

        refs = [ref for _, ref in self._release]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        if len(ready) < len(refs) and batches < self.opts.max_batches_per_push - 1:
            return True
        self._await_release()
        return True

    def _await_release(self) -> None:
        """Wait for the pending ssp release (if any) and take its fresh parameters."""
        if not self._release:
            return
        replies = self._get([ref for _, ref in self._release])
        full: list[dict[str, Any]] = [{"dense": None, "max_gap": 0, "batches": 0} for _ in self._shards]
        for (i, _), reply in zip(self._release, replies):
            full[i] = reply
        self._release = []
        self._take(full)

    def progress(self) -> int:
        """The run's step: batches the shards received from every worker, over the world size."""
        return self._received // self.worker.world_size

    def drain(self, optimizer: torch.optim.Optimizer, batches: int, *, last: bool) -> int:
        """Before an epoch-end evaluation / checkpoint (every worker calls it): push the ``batches`` computed
        while held (applied without counting a step), stop holding the others back while waiting for every
        worker, refresh the parameters. ``last``: no more pushes follow. Returns :meth:`progress`."""
        if batches:
            self._push(optimizer.param_groups[0]["lr"], batches, advance=False)
        self._get([s.finish.remote(self.worker.rank) for s in self._shards])  # a worker held at the bound goes on
        together = self.worker.distributed
        if together:
            dist.barrier()
        self._received = max(r["batches"] for r in self._get([s.ready.remote() for s in self._shards]))
        self._pull_dense()
        if last:
            self._release = []  # nobody pushes any more: a pending release would never come
        else:
            if self.worker.rank == 0:
                self._get([s.resume.remote() for s in self._shards])
            if together:
                dist.barrier()  # nobody pushes before every worker holds the others back again
        return self.progress()

    def step_metrics(self) -> dict[str, float]:
        out = {**self._metrics, "ps_max_gap": self._max_gap}
        self._metrics = {k: 0.0 if k == "ps_wait_s" else 0 for k in self._metrics}
        return out

    # ------------------------------------------------------------------ checkpoints

    def save(self, ckpt: Any, optimizer: torch.optim.Optimizer) -> None:
        """Rank 0 fetches every shard's state and refreshes the local model first, so the saved model is complete."""
        if self.worker.rank != 0:
            return
        states = self._get([s.state.remote() for s in self._shards])
        with torch.no_grad():
            params = dict(self.model.named_parameters())
            for pieces, state in zip(self.services["plan"], states):
                for p in pieces:
                    if p.sparse:
                        params[p.name][p.row_start : p.row_start + p.shape[0]].copy_(state["tables"][p.name])
                    else:
                        params[p.name].copy_(state["dense"][p.name])
        super().save(ckpt, optimizer)
        ckpt.put("strategy", {"shards": states})

    def load(self, ckpt: Any, optimizer: torch.optim.Optimizer) -> None:
        super().load(ckpt, optimizer)
        state = ckpt.get("strategy")
        if self.worker.rank == 0:
            self._get([s.restore.remote(st) for s, st in zip(self._shards, state["shards"])])
        if self.worker.distributed:
            dist.barrier()  # nobody pushes before every shard is back at the checkpoint
        self._step = int(min(state["shards"][0]["clocks"]))
        if not self.embeddings_only:
            self._pull_dense()
