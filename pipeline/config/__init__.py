"""The recipe: a typed, frozen section per stage, YAML in, `key=value` overrides."""
