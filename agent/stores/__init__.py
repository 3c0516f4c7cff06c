"""Biller storage: the `BillerStore` interface (`base`) and its back ends (`sqlite`)."""

from agent.stores.base import AlreadyExists, BillerStore, BillStatus, StoreConflict, ThreadOutcome
from agent.stores.sqlite import SqliteBillerStore

__all__ = ["AlreadyExists", "BillStatus", "BillerStore", "SqliteBillerStore", "StoreConflict", "ThreadOutcome"]
