"""The one-shot commands: `dalle export`, `sample`, `plan` and `validate`."""
