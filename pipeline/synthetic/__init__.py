"""The embedded captioned-shapes dataset: rendering, its loopback server, the analyzer, prompt sets."""
