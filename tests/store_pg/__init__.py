"""The broker store on a real PostgreSQL server."""
