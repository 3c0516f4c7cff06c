"""Storage: the `BillerStore` and `ConsumerStore` interfaces (`base`) and their SQLite back ends."""

from agent.stores.base import AlreadyExists, BillerStore, BillStatus, ConsumerStore, StoreConflict, ThreadOutcome
from agent.stores.consumer_sqlite import SqliteConsumerStore
from agent.stores.sqlite import SqliteBillerStore

__all__ = [
    "AlreadyExists",
    "BillStatus",
    "BillerStore",
    "ConsumerStore",
    "SqliteBillerStore",
    "SqliteConsumerStore",
    "StoreConflict",
    "ThreadOutcome",
]
