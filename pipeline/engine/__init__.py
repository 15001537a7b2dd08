"""What runs every stage's shards: the ledger (commits), the data contracts and the executor."""
