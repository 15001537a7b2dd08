"""Ray clusters: the driver's connection to Ray, the Jobs API client, and `dalle submit/jobs/logs/stop`."""
