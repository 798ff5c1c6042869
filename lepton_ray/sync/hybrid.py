"""``hybrid``: dense parameters all-reduced by DDP, embedding tables on the parameter-server shards.

Recommendation models are a few dense layers over huge, sparsely touched
embedding tables. All-reduce is the right tool for the dense part (small,
every element changes every step) and the wrong one for the tables (it would
move the whole ``rows x dim`` gradient every step); a parameter server moves
only the rows a batch touched. So: DDP over Ray Train's process group for every
parameter that is not an ``nn.Embedding`` / ``nn.EmbeddingBag`` weight (those are
excluded from DDP), stepped by the loop's local optimizer; the tables live on the
shards, pulled and pushed row-wise exactly as in ``ps`` and updated there with
``sync.ps.embedding_optimizer``.
"""

from __future__ import annotations

from typing import Any, Callable, ContextManager, Optional

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lepton_ray.config import Config, ConfigError
from lepton_ray.sync.allreduce import AllReduceConfig, build_ddp
from lepton_ray.sync.base import options
from lepton_ray.sync.param_server import ParamServer, PSConfig, PSServices, embedding_modules
from lepton_ray.sync.shm import SharedMemoryAllReduce

__all__ = ["Hybrid"]


class HybridServices(PSServices):
    """The shards hold only the embedding tables; a model without any is refused."""

    name = "hybrid"
    embeddings_only = True

    def check(self, build: Callable[[], nn.Module]) -> None:
        model = build()
        if not embedding_modules(model):
            what = self.config.model.factory or self.config.model.name
            raise ConfigError(
                f"sync.strategy: 'hybrid' needs a model with nn.Embedding or nn.EmbeddingBag tables for the parameter"
                f" servers; model '{what}' has none (use 'allreduce' or 'ps')"
            )
        super().check(lambda: model)


class Hybrid(ParamServer):
    """Dense by all-reduce, embeddings on the PS (``sync.strategy: hybrid``)."""

    name = "hybrid"
    Services = HybridServices
    sections = (AllReduceConfig, PSConfig)
    embeddings_only = True

    def __init__(self, config: Config, worker: Any, services: Any = None):
        super().__init__(config, worker, services)
        self.pace.lockstep = True  # DDP's all-reduce is a collective every step anyway

    def wrap(self, model: nn.Module) -> nn.Module:
        super().wrap(model)
        self._ddp: Optional[DistributedDataParallel] = None
        self._shm: Optional[SharedMemoryAllReduce] = None
        self._describe: dict[str, str] = {}
        if self.worker.distributed:
            dense = [p for n, p in model.named_parameters() if n not in self._tables]  # DDP all-reduces only these
            self._ddp, self._shm, self._describe = build_ddp(model, self.worker, options(AllReduceConfig, self.config), dense, self.synced)
            return self._ddp
        return model

    def describe(self) -> dict[str, Any]:
        return dict(self._describe)

    def close(self) -> None:
        super().close()
        if self._shm is not None:
            self._shm.close()

    def no_sync(self) -> ContextManager[Any]:
        return self._ddp.no_sync() if self._ddp is not None else super().no_sync()

    def step(self, optimizer: torch.optim.Optimizer, precision: Any, batches: int = 1) -> None:
        self._push(optimizer.param_groups[0]["lr"])  # embedding rows to the shards (clears their local grads)
        dense = [p for n, p in self.model.named_parameters() if n not in self._tables]
        precision.step(optimizer, dense, None)
