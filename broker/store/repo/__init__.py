"""The repository's queries, one module per aggregate; :class:`broker.store.repository.Tx`
composes them into the one object a transaction yields."""
