"""The broker's persistent store: schema, migrations and the dataclasses it returns."""
