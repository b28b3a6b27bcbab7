"""``ti batch``: words for whole datasets. :mod:`.sources` reads what to do, :mod:`.ledger` records
what is done (SQLite), :mod:`.runner` does it on the group engine."""
