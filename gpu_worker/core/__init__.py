"""Engine core (pure CPU, no torch): requests, KV block accounting and the scheduler."""

from gpu_worker.core.block_pool import BlockPool, KVBlock
from gpu_worker.core.kv_cache_manager import KVCacheManager, PrefixCacheStats
from gpu_worker.core.request import Request, RequestStatus
from gpu_worker.core.scheduler import Scheduler
from llmserve.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent

__all__ = [
    "AllBlocksCleared",
    "BlockPool",
    "BlockRemoved",
    "BlockStored",
    "KVBlock",
    "KVCacheManager",
    "KVEvent",
    "PrefixCacheStats",
    "Request",
    "RequestStatus",
    "Scheduler",
]
