"""The household's private space in a browser: `parley consumer serve` and `parley demo --serve`.

Pages on the web kit (`agent.web`, docs/WEB.md) drawn from the household's status document: bills with their
provenance, a tracker per bill that follows the bot live, approvals answered by the person, agreements with
their files, payments and receipts, and the cash-flow chart. See docs/HOUSEHOLD.md.
"""

from reference_consumer.web.app import LIVE_EVENT, HouseholdSource, StateDirSource, create_space_app, space_config
from reference_consumer.web.views import bill_key, cash_flow_chart, short_fingerprint, tracker

__all__ = [
    "LIVE_EVENT",
    "HouseholdSource",
    "StateDirSource",
    "bill_key",
    "cash_flow_chart",
    "create_space_app",
    "short_fingerprint",
    "space_config",
    "tracker",
]
