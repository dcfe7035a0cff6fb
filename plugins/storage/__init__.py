"""Storage: Tortoise ORM models, migrations, the write-behind queue and the admin queries."""
