"""One module per stage of the DAG (ingest ... evaluate); `base.py` holds the contract."""
