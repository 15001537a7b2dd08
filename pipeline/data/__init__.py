"""The data plane: webdataset shards, the resumable training loader, images, URL lists."""
